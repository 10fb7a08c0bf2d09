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


def start_heartbeat(redis: Redis, prefix: str, model: str) -> threading.Event:
    """Beat for this process in a daemon thread until the returned event is set (Redis down: tried again)."""
    key = beat_key(prefix, model, f"{socket.gethostname()}:{os.getpid()}")
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                redis.set(key, "1", ex=int(ALIVE_SECONDS))
            except RedisError as err:
                log.warning("heartbeat for %s: %s", model, err)
            stop.wait(BEAT_SECONDS)
        with contextlib.suppress(RedisError):
            redis.delete(key)

    threading.Thread(target=run, name=f"heartbeat {model}", daemon=True).start()
    return stop


def alive_workers(redis: Redis, prefix: str, model: str) -> int:
    return sum(1 for _ in redis.scan_iter(beat_key(prefix, model), count=100))
