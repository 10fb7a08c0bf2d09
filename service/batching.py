"""Batched generation: concurrent requests share each forward pass, across versions of one model.

A decoding step of a small model on a CPU (or of any model on a GPU) costs about the same for one sequence as
for sixteen: it is bound by reading the weights, not by arithmetic. So requests wait in ``pending`` until a
generation slot is free, and the oldest one leaves with every other pending request of the same sampling
settings (up to ``max_batch``), whatever version each asks for: versions differ only in a few edited layers,
which ``HotSwapModel.use_rows`` applies to their own rows. Under load batches grow by themselves; alone, a
request waits only ``window`` seconds for company.

Each row keeps its own prompt (left-padded), its own ``max_tokens``, stop sequences and cancellation, through
:class:`RowLimits`; a row that is done is padded while the others go on. A seeded sampled request runs alone,
since a shared sampler could not give it its own seed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria


@dataclass(eq=False)  # jobs are told apart by identity: two alike requests are two jobs
class Job:
    """One request waiting for, then taking part in, a batched generation."""

    version: str
    prompt_ids: list[int]
    max_tokens: int
    stop: list[str]
    key: tuple  # the sampling settings: who may share a batch (versions may differ: HotSwapModel.use_rows)
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    new_ids: list[int] = field(default_factory=list)
    stopped: bool = False  # a stop sequence ended it
    error: BaseException | None = None


class RowLimits(StoppingCriteria):
    """Per row: done at its own ``max_tokens``, at an end-of-text token, at a stop sequence, or when cancelled.

    ``lengths[row]`` is how many generated tokens the row keeps (None while it runs); tokens after that are the
    padding the other rows' steps give it.
    """

    def __init__(self, jobs: list[Job], width: int, tokenizer, eos_ids: set[int]) -> None:
        self.jobs, self.width, self.tokenizer, self.eos_ids = jobs, width, tokenizer, eos_ids
        self.lengths: list[int | None] = [None] * len(jobs)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        generated = input_ids[:, self.width:].tolist()
        for row, (job, ids) in enumerate(zip(self.jobs, generated, strict=True)):
            if self.lengths[row] is not None:
                continue
            if ids and ids[-1] in self.eos_ids or len(ids) >= job.max_tokens or job.cancel.is_set():
                self.lengths[row] = len(ids)
            elif job.stop and any(s in self.tokenizer.decode(ids, skip_special_tokens=True) for s in job.stop):
                self.lengths[row] = len(ids)
                job.stopped = True
        return torch.tensor([n is not None for n in self.lengths], dtype=torch.bool, device=input_ids.device)


class Batcher:
    """Groups pending jobs into batches and runs each batch with ``run`` on its own thread, holding a slot."""

    def __init__(self, run: Callable[[list[Job]], None], slots: threading.Semaphore, max_batch: int,
                 window: float = 0.005, name: str = "batcher") -> None:
        self.run, self.slots, self.max_batch, self.window = run, slots, max_batch, window
        self.pending: list[Job] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._dispatch, daemon=True, name=name).start()

    def submit(self, job: Job) -> Job:
        with self.cond:
            self.pending.append(job)
            self.cond.notify()
        return job

    def withdraw(self, job: Job) -> bool:
        """Take back a job that has not started (its client left); False once it is running."""
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)
                return True
            return False

    def _dispatch(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending)
            time.sleep(self.window)  # requests sent together arrive a few milliseconds apart
            self.slots.acquire()  # while every slot is busy, more requests join the batch
            with self.cond:
                key = self.pending[0].key
                batch = [j for j in self.pending if j.key == key][: self.max_batch]
                self.pending = [j for j in self.pending if j not in batch]
            for job in [j for j in batch if j.cancel.is_set()]:  # the client left before its turn
                job.done.set()
            batch = [j for j in batch if not j.cancel.is_set()]
            if not batch:
                self.slots.release()
                continue
            threading.Thread(target=self._run, args=(batch,), daemon=True).start()

    def _run(self, batch: list[Job]) -> None:
        try:
            self.run(batch)
        except BaseException as err:  # each waiting request raises it in its own thread
            for job in batch:
                job.error = err
        finally:
            self.slots.release()
            for job in batch:
                job.done.set()
