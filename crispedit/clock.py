"""Wall-clock time that counts a GPU's queued work.

CUDA kernels run asynchronously: a timer read right after a step measures only their launch. ``now(device)``
waits for the device's queue first, so step and build timings mean the same on a GPU as on a CPU.
"""

from __future__ import annotations

import time

import torch


def now(device: torch.device | str | None = None) -> float:
    """``time.perf_counter()`` once every kernel queued on ``device`` has finished (no wait on a CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
