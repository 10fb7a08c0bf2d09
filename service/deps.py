"""Dependencies injected into the routes: settings, the registry, model servers, the job store, the queue."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from core.jobs import JobStore
from core.notify import announce_aliases
from core.settings import Settings
from registry import Registry
from service.auth import AuditLog, KeyRing
from service.serving import ModelServer


class State:
    """Everything the API process holds, built once at start-up (``service.app.create_app``)."""

    def __init__(self, settings: Settings, servers: dict[str, ModelServer], redis: Redis) -> None:
        self.settings = settings
        self.servers = servers
        self.redis = redis
        self.registry = Registry(settings.registry_root)
        self.jobs = JobStore(redis, settings.key_prefix)
        self.edit_limiter = MovingWindowRateLimiter(RedisStorage(settings.redis_url,
                                                                 key_prefix=f"{settings.key_prefix}:rate"))
        self.keys = KeyRing(settings.api_keys, settings.data_dir / "api-keys.json")
        self.audit = AuditLog(settings.data_dir / "audit.log")

    def announce(self, model: str) -> None:
        """Tell every API process that the model's aliases moved (they preload the new versions)."""
        announce_aliases(self.redis, self.settings.key_prefix, self.registry, model)

    def queue(self, model: str) -> Queue:
        return Queue(self.jobs.queue_name(model), connection=self.redis, serializer=JSONSerializer)


def get_state(request: Request) -> State:
    return request.app.state.crispedit


StateDep = Annotated[State, Depends(get_state)]


def split_model(state: State, model: str) -> tuple[ModelServer, str | None]:
    """``name@ref`` → (server, ref); 404 naming the served models when unknown."""
    name, _, ref = model.partition("@")
    if name not in state.servers:
        raise HTTPException(404, f"model {name!r} is not served; available: {sorted(state.servers)}")
    return state.servers[name], ref or None
