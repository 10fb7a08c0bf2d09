"""Edit jobs in Redis: one JSON record per posted edit request, its progress events, per-model pending lists.

An edit request's life: ``queued`` (in the model's pending list) → ``running`` (moved to the processing
list by a worker) → ``succeeded`` (a new version) | ``rejected`` (the capability guard said no; nothing
committed) | ``failed`` (with the error) | ``cancelled`` (deleted while queued). RQ carries a wake-up job
per post; whichever wake-up runs takes every pending edit of that model at once, so edits that arrive
while the worker is busy are applied together as one CrispEdit batch. Only the worker holding the
model's lease (``worker/lease.py``) touches its processing list, so what it finds there was left by a dead one.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from enum import StrEnum

from redis import Redis

from core.stats import record_outcome

TERMINAL = {"succeeded", "rejected", "failed", "cancelled"}


def preparing_key(prefix: str, model: str) -> str:
    """Where a worker loading the model (and building its curvature cache) keeps its progress, briefly."""
    return f"{prefix}:preparing:{model}"


def preparing(redis: Redis, prefix: str, model: str) -> dict | None:
    """{"phase", "done", "total"} while a worker prepares ``model``, else None."""
    raw = redis.get(preparing_key(prefix, model))
    return json.loads(raw) if raw else None


class EditStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    rejected = "rejected"
    failed = "failed"
    cancelled = "cancelled"


class IdempotencyConflict(ValueError):
    """An Idempotency-Key posted again with a different request body."""


class JobStore:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def queue_name(self, model: str) -> str:
        return self.key("edits", model)

    # ---------------------------------------------------------------- records
    def create(self, model: str, payload: dict, idempotency_key: str | None = None, owner: str = "",
               request: dict | None = None) -> tuple[dict, bool]:
        """(record, created). An Idempotency-Key belongs to its ``owner`` (the posting API key) and to its
        ``request`` (the body as posted): the same key again with the same body gives the existing record and
        False; with another body it raises :class:`IdempotencyConflict`, so a different edit is never lost."""
        job_id = "edit-" + uuid.uuid4().hex[:16]
        idem = self.key("idem", owner, idempotency_key) if idempotency_key else None
        digest = hashlib.sha256(json.dumps(request or payload, sort_keys=True).encode()).hexdigest()
        if idem and not self.redis.set(idem, json.dumps({"job": job_id, "request": digest}), nx=True, ex=7 * 86400):
            held = json.loads(self.redis.get(idem))
            if held["request"] != digest:
                raise IdempotencyConflict(f"Idempotency-Key {idempotency_key!r} was used for a different request "
                                          f"(job {held['job']}); use a new key for a new edit")
            for _ in range(50):  # the first request may still be writing its record
                if (record := self.get(held["job"])) is not None:
                    return record, False
                time.sleep(0.02)
            raise RuntimeError(f"Idempotency-Key {idempotency_key!r} is held by a request that did not finish")
        record = {"id": job_id, "model": model, "status": EditStatus.queued.value, "created_at": time.time(),
                  "payload": payload, "progress": None, "version": None, "metrics": None, "error": None}
        pipe = self.redis.pipeline()
        pipe.set(self.key("edit", job_id), json.dumps(record))
        pipe.rpush(self.key("pending", model), job_id)
        pipe.zadd(self.key("edits", model), {job_id: record["created_at"]})  # the list of a model's edits
        pipe.execute()
        self.event(job_id, {"event": "queued"})
        return record, True

    def recent(self, model: str, status: str | None = None, limit: int = 50) -> list[dict]:
        """A model's edit jobs, newest first, at most ``limit`` (of ``status`` only, when given)."""
        out: list[dict] = []
        start = 0
        while len(out) < limit:
            ids = self.redis.zrevrange(self.key("edits", model), start, start + 4 * limit - 1)
            if not ids:
                break
            records = [json.loads(r) for r in self.redis.mget([self.key("edit", i.decode()) for i in ids]) if r]
            out += [r for r in records if status is None or r["status"] == status]
            start += len(ids)
        return out[:limit]

    def get(self, job_id: str) -> dict | None:
        raw = self.redis.get(self.key("edit", job_id))
        return json.loads(raw) if raw else None

    def update(self, job_id: str, **fields) -> dict | None:
        """The record with ``fields`` set; None, writing nothing, when the record is gone (deleted or evicted)."""
        record = self.get(job_id)
        if record is None:
            return None
        record.update(fields, updated_at=time.time())
        self.redis.set(self.key("edit", job_id), json.dumps(record))
        return record

    def event(self, job_id: str, event: dict) -> None:
        self.redis.rpush(self.key("edit", job_id, "events"), json.dumps({"time": time.time(), **event}))

    def events(self, job_id: str, start: int = 0) -> list[dict]:
        return [json.loads(e) for e in self.redis.lrange(self.key("edit", job_id, "events"), start, -1)]

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued edit; False if a worker already took it."""
        record = self.get(job_id)
        if record is None or not self.redis.lrem(self.key("pending", record["model"]), 0, job_id):
            return False
        record = self.update(job_id, status=EditStatus.cancelled.value)
        self.event(job_id, {"event": "cancelled"})
        pipe = self.redis.pipeline(transaction=True)
        record_outcome(pipe, self.prefix, record["model"], record, time.time())
        pipe.execute()
        return True

    # ---------------------------------------------------------------- worker side
    def take_pending(self, model: str, limit: int) -> list[str]:
        """Move up to ``limit`` pending edits to the processing list (crash-safe: LMOVE)."""
        taken = []
        for _ in range(limit):
            job_id = self.redis.lmove(self.key("pending", model), self.key("processing", model), "LEFT", "RIGHT")
            if job_id is None:
                break
            taken.append(job_id.decode())
        return taken

    def processing(self, model: str) -> list[str]:
        return [j.decode() for j in self.redis.lrange(self.key("processing", model), 0, -1)]

    def finish(self, model: str, job_id: str, **fields) -> None:
        # one MULTI/EXEC: a worker killed here leaves the job either to redo or finished with its terminal
        # event, never finished without the event or finished yet still in the processing list
        record = self.get(job_id)
        if record is None:  # gone (deleted, or evicted): nothing to report to, but never left in processing
            self.redis.lrem(self.key("processing", model), 0, job_id)
            return
        now = time.time()
        record.update(fields, updated_at=now)
        event = {"time": now, "event": fields["status"], **{k: v for k, v in fields.items() if k != "status"}}
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.key("edit", job_id), json.dumps(record))
        record_outcome(pipe, self.prefix, model, record, now)
        pipe.lrem(self.key("processing", model), 0, job_id)
        pipe.rpush(self.key("edit", job_id, "events"), json.dumps(event))
        pipe.execute()
