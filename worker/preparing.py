"""While a worker loads its model and builds a missing curvature cache (minutes on a CPU), the edits already
queued for that model say so: a ``preparing`` event (phase, done, total) on each, and a short-lived Redis key that
the API shows as a queued edit's progress and in ``/readyz``. Job records are not rewritten here: the API may be
cancelling one at the same moment."""

from __future__ import annotations

import json
import logging
import time

from core.jobs import JobStore, preparing_key

log = logging.getLogger("crispedit.worker")

EVERY_SECONDS = 1.0  # at most one report per phase this often (a K-FAC pass updates per batch)
KEY_SECONDS = 30  # the preparing key outlives a silent spell of this long, no more: a dead worker's goes away


class Announcer:
    """A progress listener (``crispedit.progress.listening``) that reports to the model's queued edits."""

    def __init__(self, store: JobStore, model: str) -> None:
        self.store, self.model = store, model
        self.last: dict[str, float] = {}
        self.logged: dict[str, int] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last.get(phase, -EVERY_SECONDS) < EVERY_SECONDS:
            return
        self.last[phase] = now
        state = {"phase": phase, "done": done, "total": total}
        tenth = 10 * done // total if total else 0
        if tenth != self.logged.get(phase):
            self.logged[phase] = tenth
            log.info("%s: %s %d/%d", self.model, phase, done, total)
        try:
            self.store.redis.set(preparing_key(self.store.prefix, self.model), json.dumps(state), ex=KEY_SECONDS)
            for raw in self.store.redis.lrange(self.store.key("pending", self.model), 0, -1):
                self.store.event(raw.decode(), {"event": "preparing", **state})
        except Exception as err:  # progress is news, not work: never fail a load over it
            log.warning("%s: could not report %s progress: %s", self.model, phase, err)

    def done(self) -> None:
        self.store.redis.delete(preparing_key(self.store.prefix, self.model))
