"""One worker at a time edits a model: a Redis lease, renewed by a heartbeat while the worker holds it.

Edits of one model are sequential by nature (each version builds on the head), so N workers on one
queue give fail-over, not parallel edits of the same model. Whoever holds the lease may treat anything
left in the model's processing list as abandoned by a dead holder, whose lease has expired.
"""

from __future__ import annotations

import threading
import time
import uuid

from redis import Redis

# renew or delete only while the lease is still ours
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class ModelLease:
    """``with ModelLease(redis, key):`` blocks until this process holds ``key``, and keeps it alive."""

    def __init__(self, redis: Redis, key: str, ttl_s: float = 15.0, poll_s: float = 0.2) -> None:
        self.redis, self.key, self.ttl_ms, self.poll_s = redis, key, int(ttl_s * 1000), poll_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> ModelLease:
        while not self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            time.sleep(self.poll_s)  # another worker is editing this model, or a dead one's lease runs out
        self._heartbeat = threading.Thread(target=self._renew, daemon=True, name=f"lease {self.key}")
        self._heartbeat.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            self.redis.eval(_RENEW, 1, self.key, self.token, self.ttl_ms)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        self.redis.eval(_RELEASE, 1, self.key, self.token)
