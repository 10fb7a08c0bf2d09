"""The FastAPI application: ``create_app()`` loads each served model once and mounts the routers."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis import Redis
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.heartbeat import alive_workers
from core.jobs import preparing
from core.notify import AliasFollower
from core.settings import Settings, get_settings
from registry import BlobError, Gone
from service.auth import unknown_key
from service.body_limit import BodyLimit
from service.deps import State
from service.errors import error_response
from service.metrics import HTTP_REQUESTS, HTTP_SECONDS, exposition
from service.routes import console, edits, openai, registry
from service.serving import BadPrompt, ModelServer

log = logging.getLogger("crispedit.service")


HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    torch.set_num_threads(settings.threads("api"))
    redis = Redis.from_url(settings.redis_url)
    from registry import Registry

    reg = Registry(settings.registry_root)
    servers = {name: ModelServer(name, base, reg, settings.device, settings.generation_slots,
                                 settings.dtype, settings.generation_batch)
               for name, base in settings.model_bases().items()}

    @asynccontextmanager
    async def follow_aliases(_: FastAPI) -> AsyncIterator[None]:
        follower = AliasFollower(redis, settings.key_prefix, servers, settings.alias_poll_seconds)
        follower.start()
        yield
        follower.stop()

    app = FastAPI(title="CrispEdit Service", version="0.1.0", lifespan=follow_aliases,
                  description="Edit a language model over HTTP; every edit is a new immutable version.")
    app.state.crispedit = State(settings, servers, redis)
    for router in (openai.router, edits.router, registry.router, console.router):
        app.include_router(router)

    @app.middleware("http")
    async def key_before_body(request: Request, call_next):
        return unknown_key(request) or await call_next(request)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        method = request.method if request.method in HTTP_METHODS else "other"  # any token is a method: bound it
        HTTP_REQUESTS.labels(method, route, str(response.status_code)).inc()
        HTTP_SECONDS.labels(method, route).observe(time.perf_counter() - started)
        return response

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(exposition(app.state.crispedit), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, exc.detail, headers=exc.headers)

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError) -> Response:
        """Redis (queues, job records) unreachable: a 503 to retry, not a bare 500; queries go on meanwhile."""
        log.error("%s %s: Redis: %s", request.method, request.url.path, exc)
        return error_response(503, f"the job store (Redis) is unreachable: {exc}; retry shortly",
                              headers={"Retry-After": "5"})

    @app.exception_handler(BlobError)
    async def damaged_blob(request: Request, exc: BlobError) -> Response:
        """The registry's storage is damaged (a missing or corrupt blob): say which, and how to mend it."""
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return error_response(500, f"the registry could not read this version: {exc}", kind="storage_error")

    @app.exception_handler(Gone)
    async def pruned_version(request: Request, exc: Gone) -> Response:
        """A version the retention policy pruned: 410, with the versions still kept."""
        return error_response(410, str(exc), kind="version_pruned", kept=exc.kept)

    @app.exception_handler(BadPrompt)
    async def bad_prompt(request: Request, exc: BadPrompt) -> Response:
        return error_response(400, str(exc), param="prompt")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        """422 naming each problem. The input is not echoed: it may be NaN or a lone surrogate, which JSON
        cannot carry, or huge."""
        errors = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        where = [".".join(p for p in e["loc"] if p != "body") for e in errors]
        problems = [f"{w}: {e['msg']}" for w, e in zip(where, errors, strict=True)]
        return error_response(422, "; ".join(problems), param=where[0] if where else None, errors=errors)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Ready when Redis answers and every model has a live worker to take its edits (queries alone would
        work without one, but edits would wait unseen)."""
        try:
            redis.ping()
            workers = {m: alive_workers(redis, settings.key_prefix, m) for m in sorted(servers)}
        except Exception as err:  # report, do not crash: readiness is a question
            return JSONResponse({"status": "not ready", "redis": str(err)}, status_code=503)
        idle = [m for m, n in workers.items() if n == 0]
        if idle:
            loading = {m: p for m in idle if (p := preparing(redis, settings.key_prefix, m))}
            return JSONResponse({"status": "not ready", "workers": workers, "preparing": loading,
                                 "reason": f"no live worker takes edits for {', '.join(idle)}"}, status_code=503)
        return JSONResponse({"status": "ready", "models": sorted(servers), "workers": workers})

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)  # added last: it runs first, before any route
    log.info("serving %s from %s", sorted(servers), settings.registry_root)
    return app
