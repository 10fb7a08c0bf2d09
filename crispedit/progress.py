"""Progress of long work (sampling a corpus, a curvature cache's K-FAC pass): a tqdm bar on the terminal that
also tells a listener, when one is set around the work (the worker turns it into its edits' job events)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from tqdm.auto import tqdm

Listener = Callable[[str, int, int], None]  # (phase, done, total)
_listener: ContextVar[Listener | None] = ContextVar("crispedit_progress_listener", default=None)


class Bar(tqdm):
    """tqdm, counting for the listener too (also when the bar itself is disabled)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.done = 0  # tqdm keeps no count, nor its desc, when the bar is disabled
        self.phase = kwargs.get("desc") or ""

    def update(self, n: float | None = 1) -> bool | None:
        self.done += int(n or 0)
        listener = _listener.get()
        if listener is not None:
            listener(self.phase, self.done, int(self.total or 0))
        return super().update(n)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Within this block, every :class:`Bar` reports each update to ``listener``."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
