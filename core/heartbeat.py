"""Which workers are alive, per model: each worker refreshes a short-lived Redis key; a dead one's key expires.

RQ's own worker registry keeps a worker killed mid-job for as long as the job's timeout (hours), so readiness
cannot be read from it."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

BEAT_SECONDS = 2.0  # how often a worker says it is alive
ALIVE_SECONDS = 6.0  # how long one beat counts: a worker silent this long is taken for dead


def beat_key(prefix: str, model: str, ident: str = "*") -> str:
    return f"{prefix}:alive:{model}:{ident}"


class Heartbeat:
    """Beats for this process in a daemon thread until :meth:`stop`, which also takes the key away at once (Redis
    down: tried again at the next beat)."""

    def __init__(self, redis: Redis, prefix: str, model: str) -> None:
        self.redis, self.model = redis, model
        self.key = beat_key(prefix, model, f"{socket.gethostname()}:{os.getpid()}")
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"heartbeat {model}", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.redis.set(self.key, "1", ex=int(ALIVE_SECONDS))
            except RedisError as err:
                log.warning("heartbeat for %s: %s", self.model, err)
            self.stopping.wait(BEAT_SECONDS)
        with contextlib.suppress(RedisError):
            self.redis.delete(self.key)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2)


def alive_workers(redis: Redis, prefix: str, model: str) -> int:
    return sum(1 for _ in redis.scan_iter(beat_key(prefix, model), count=100))
