"""Edit jobs: post (202 + status URL), status, SSE progress events, cancel."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Header, HTTPException, Query, Request
from sse_starlette import EventSourceResponse

from core.jobs import TERMINAL, EditStatus, IdempotencyConflict, preparing
from core.settings import Settings
from service.auth import Editor, Reader
from service.deps import StateDep, split_model
from service.ratelimit import EditorWithinLimit
from service.schemas import EditAccepted, EditJob, EditList, EditPost
from service.serving import UnknownModel

router = APIRouter(prefix="/v1/edits", tags=["edits"])

JOB_TIMEOUT = 6 * 3600  # a long edit is not an abandoned one
PING_SECONDS = 15  # a keep-alive comment this often on an event stream


@router.post("", status_code=202, response_model=EditAccepted)
def post_edit(body: EditPost, request: Request, state: StateDep, who: EditorWithinLimit,
              idempotency_key: str | None = Header(None, max_length=200)) -> EditAccepted:
    if body.promote and who["role"] != "admin":  # as PUT .../aliases/production would need
        raise HTTPException(403, f"promote moves the production alias, which needs the admin role; this key has the "
                                 f"{who['role']} role")
    server, ref = split_model(state, body.model)
    if ref is not None:
        raise HTTPException(400, "post edits to a plain model name; put the version in base_version")
    if body.base_version is not None:
        try:
            server.resolve(body.base_version)
        except UnknownModel as err:
            raise HTTPException(404, f"base_version: {err}") from err
    refuse_weights_without_anchors(body, state.settings)
    request_body = body.model_dump(exclude_none=True)
    payload = {**request_body, "author": f"{who['role']}:{who['key_id']}"}
    try:
        record, created = state.jobs.create(server.name, payload, idempotency_key, owner=who["key_id"],
                                            request=request_body)
    except IdempotencyConflict as err:
        raise HTTPException(422, str(err)) from err
    if created:
        state.audit.record(who, "post_edit", model=server.name, job=record["id"], edits=len(body.edits))
        # the wake-up job carries the edit's id, so `rq info` and rq-dashboard name the edit that posted it
        state.queue(server.name).enqueue("worker.tasks.process_pending", server.name, job_timeout=JOB_TIMEOUT,
                                         result_ttl=86400, job_id=record["id"],
                                         description=f"edit {record['id']}: apply the pending edits of {server.name}")
    return EditAccepted(id=record["id"], status=record["status"],
                        # a path, not a URL: the Host header is the client's to write, so it is not echoed
                        status_url=str(request.app.url_path_for("get_edit", job_id=record["id"])))


@router.get("", response_model=EditList)
def list_edits(state: StateDep, _: Reader, model: str = Query(..., description="a served model's name"),
               status: EditStatus | None = None, limit: int = Query(50, ge=1, le=500)) -> dict:
    """A model's edit jobs, newest first (filter by status): what the console lists after a reload."""
    server, ref = split_model(state, model)
    if ref is not None:
        raise HTTPException(400, "list the edits of a plain model name")
    return {"object": "list", "data": state.jobs.recent(server.name, status.value if status else None, limit)}


def refuse_weights_without_anchors(body: EditPost, settings: Settings) -> None:
    """A KL-penalty weight needs the anchors it weighs; the API and the workers share these settings."""
    hyper = body.hyperparameters
    configured = {"anchors": bool(settings.anchors), "text_anchors": settings.text_anchor_source() is not None}
    for weight, anchors in (("anchor_weight", "anchors"), ("text_anchor_weight", "text_anchors")):
        if hyper is not None and (getattr(hyper, weight) or 0.0) > 0 and not configured[anchors]:
            raise HTTPException(400, f"hyperparameters.{weight} > 0 needs the server's {anchors}, and "
                                     f"CRISPEDIT_{anchors.upper()} gives none here: send 0 or leave it out")


def fetch(state, job_id: str) -> dict:
    record = state.jobs.get(job_id)
    if record is None:
        raise HTTPException(404, f"edit job {job_id!r} not found")
    return record


@router.get("/{job_id}", response_model=EditJob)
def get_edit(job_id: str, state: StateDep, _: Reader) -> dict:
    """The edit job; while it is queued behind a worker that is still loading its model (building the curvature
    cache), its progress is that worker's: {"phase", "done", "total"}."""
    record = fetch(state, job_id)
    if record["status"] == "queued":
        record["progress"] = preparing(state.redis, state.settings.key_prefix, record["model"])
    return record


@router.delete("/{job_id}", response_model=EditJob)
def cancel_edit(job_id: str, state: StateDep, who: Editor) -> dict:
    """Cancel a queued edit: its poster's key may, and an admin's."""
    record = fetch(state, job_id)
    posted_by = record["payload"].get("author", "").rpartition(":")[2]
    if who["role"] != "admin" and posted_by != who["key_id"]:
        raise HTTPException(403, f"edit job {job_id} was posted by another key; only its poster or an admin may "
                                 "cancel it")
    if not state.jobs.cancel(job_id):
        raise HTTPException(409, f"edit job {job_id} is {record['status']}; only queued jobs can be cancelled")
    state.audit.record(who, "cancel_edit", job=job_id)
    return state.jobs.get(job_id)


@router.get("/{job_id}/events", response_class=EventSourceResponse)
async def edit_events(job_id: str, state: StateDep, _: Reader) -> EventSourceResponse:
    """The job's events as server-sent events, from its first, until it ends: sse-starlette sends a keep-alive
    comment every ``PING_SECONDS`` (proxies close silent streams) and stops polling when the client goes."""
    fetch(state, job_id)

    async def body():
        sent = 0
        while True:
            events = state.jobs.events(job_id, sent)
            for e in events:
                yield {"event": e["event"], "data": json.dumps(e)}
            sent += len(events)
            if state.jobs.get(job_id)["status"] in TERMINAL and not state.jobs.events(job_id, sent):
                return
            await asyncio.sleep(0.2)

    return EventSourceResponse(body(), ping=PING_SECONDS, sep="\n")
