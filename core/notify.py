"""Alias moves reach every API process: a Redis pub/sub notification, with polling of the registry as fallback.

Queries resolve aliases from the registry on every request, so they are right without any of this. The
follower makes them fast: when ``production`` or ``latest`` moves (a commit, a promotion, a rollback, from
any process or machine), it loads the new version's tensors into the hot-swap LRU before the first query
asks for them. A move made without a notification (``crispedit registry`` from a shell, a lost message) is
found by the next poll.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from redis import Redis
from redis.exceptions import RedisError

from registry import Registry

log = logging.getLogger("crispedit.notify")


def alias_channel(prefix: str) -> str:
    return f"{prefix}:aliases"


def announce_aliases(redis: Redis, prefix: str, registry: Registry, model: str) -> None:
    """Publish the model's aliases after a move; a failure only costs the followers one poll interval."""
    try:
        redis.publish(alias_channel(prefix), json.dumps({"model": model, "aliases": registry.aliases(model)}))
    except RedisError as err:
        log.warning("could not announce the aliases of %s (followers will poll): %s", model, err)


class AliasFollower(threading.Thread):
    """Preloads each newly aliased version into its model's hot-swap LRU (``servers``: name → ModelServer)."""

    def __init__(self, redis: Redis, prefix: str, servers: dict, poll_seconds: float = 5.0) -> None:
        super().__init__(name="alias-follower", daemon=True)
        self.redis, self.channel, self.servers, self.poll_seconds = redis, alias_channel(prefix), servers, poll_seconds
        self.seen: dict[str, dict[str, str]] = {}
        self.stopped = threading.Event()

    def stop(self) -> None:
        self.stopped.set()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.listen()
            except RedisError as err:  # Redis down: keep polling the registry until it is back
                log.warning("alias notifications unavailable (%s); polling every %.0f s", err, self.poll_seconds)
                self.sync_all()
                self.stopped.wait(self.poll_seconds)

    def listen(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        try:
            next_poll = 0.0
            while not self.stopped.is_set():
                if time.monotonic() >= next_poll:
                    self.sync_all()
                    next_poll = time.monotonic() + self.poll_seconds
                message = pubsub.get_message(timeout=min(1.0, self.poll_seconds))  # short, so stop() is prompt
                if message is not None:
                    model = json.loads(message["data"]).get("model")
                    if model in self.servers:
                        self.sync(model)
        finally:
            pubsub.close()

    def sync_all(self) -> None:
        for name in self.servers:
            self.sync(name)

    def sync(self, name: str) -> None:
        server = self.servers[name]
        try:
            aliases = server.registry.aliases(name)
            for alias, version in sorted(aliases.items()):
                if self.seen.get(name, {}).get(alias) != version:
                    server.holder.preload(version)
                    log.info("%s@%s → %s: preloaded", name, alias, version)
            self.seen[name] = aliases
        except Exception as err:  # a version half-written by another process, a transient read error
            log.warning("could not follow the aliases of %s: %s", name, err)
