"""One worker at a time edits a model: a lease, held with redis-py's ``Lock`` (token-checked release and
renewal), renewed by a heartbeat thread while the worker holds it.

Edits of one model are sequential by nature (each version builds on the head), so N workers on one
queue give fail-over, not parallel edits of the same model. Whoever holds the lease may treat anything
left in the model's processing list as abandoned by a dead holder, whose lease has expired.
"""

from __future__ import annotations

import logging
import threading

from redis import Redis
from redis.exceptions import LockError, RedisError

log = logging.getLogger("crispedit.worker")


class ModelLease:
    """``with ModelLease(redis, key):`` blocks until this process holds ``key``, and keeps it alive."""

    def __init__(self, redis: Redis, key: str, ttl_s: float = 15.0, poll_s: float = 0.2) -> None:
        # not thread-local: the heartbeat thread renews the token that the job's thread acquired
        self.lock = redis.lock(key, timeout=ttl_s, sleep=poll_s, thread_local=False)
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> ModelLease:
        self.lock.acquire(blocking=True)  # another worker is editing this model, or a dead one's lease runs out
        self._heartbeat = threading.Thread(target=self._renew, daemon=True, name=f"lease {self.lock.name}")
        self._heartbeat.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.lock.reacquire()
            except LockError:  # expired while Redis was out of reach: another worker may hold it now
                log.error("lost the lease %s; another worker may take this model's edits", self.lock.name)
                return
            except RedisError as err:  # try again at the next beat, while the lease lasts
                log.warning("could not renew the lease %s: %s", self.lock.name, err)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        try:
            self.lock.release()
        except LockError:
            log.warning("the lease %s had expired before its release", self.lock.name)
