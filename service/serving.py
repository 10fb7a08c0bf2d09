"""Answering queries from the registry: the ``model`` field picks a version, hot swap puts its weights in.

``name@v3`` is version 3, ``name@production`` follows that alias, plain ``name`` means its
``production`` alias or else ``latest``. Aliases are read from the registry on every request, so a
rollback or a promotion done anywhere takes effect at once, without a restart.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from queue import Empty, Full, Queue

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from crispedit.models import load_model, model_fingerprint
from crispedit.stopping import stop_strings
from registry import Gone, HotSwapModel, NotFound, Registry, RegistryError
from service.batching import Batcher, Job, RowLimits
from service.metrics import TOKENS_GENERATED

QUEUED_PIECES = 64  # text pieces a stream runs ahead of its reader
STALL_SECONDS = 10.0  # a reader that takes no piece for this long, with the queue full, has its generation ended


class UnknownModel(LookupError):
    pass


class BadPrompt(ValueError):
    """A prompt this model cannot take (too long for its context); the routes answer 400."""


@dataclass
class Generation:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prompt_ids: list[int] = field(default_factory=list)
    new_ids: list[int] = field(default_factory=list)  # the generated tokens, through the one a stop cut in


def finish_reason(new_ids: list[int], max_tokens: int, stopped: bool, eos: int | None) -> str:
    """OpenAI's: "stop" when a stop sequence or the end of text ended the answer, "length" at max_tokens."""
    ended = stopped or len(new_ids) < max_tokens or (bool(new_ids) and new_ids[-1] == eos)
    return "stop" if ended else "length"


class Cancelled(StoppingCriteria):
    """Ends a generation at its next token once ``event`` is set."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class PieceStreamer(BaseStreamer):
    """Decoded text pieces into a bounded queue. A reader that takes none for ``stall_seconds`` while the queue
    is full cancels the generation: a stalled client must not hold a generation slot."""

    def __init__(self, tokenizer, queue: Queue, cancelled: Cancelled, stall_seconds: float) -> None:
        self.tokenizer, self.queue, self.cancelled, self.stall_seconds = tokenizer, queue, cancelled, stall_seconds
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already queued
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.ids += value.flatten().tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        self._queue(text[self.sent:])
        self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._queue(text[self.sent:])
        self.sent = len(text)

    def _queue(self, piece: str) -> None:
        if not piece or self.cancelled.event.is_set():
            return
        try:
            self.queue.put(piece, timeout=self.stall_seconds)
        except Full:
            self.cancelled.event.set()


class Stream:
    """A generation's text pieces as they come, with stop sequences applied; ``close`` ends the generation.

    ``next_piece`` blocks (call it from a worker thread); ``finish_reason`` is known once the pieces end."""

    def __init__(self, tokenizer, max_tokens: int, stop: list[str], stall_seconds: float) -> None:
        self.queue: Queue = Queue(maxsize=QUEUED_PIECES)
        self.cancelled = Cancelled()
        self.streamer = PieceStreamer(tokenizer, self.queue, self.cancelled, stall_seconds)
        self.max_tokens, self.stop, self.tokenizer = max_tokens, stop, tokenizer
        self.done = threading.Event()
        self.error: Exception | None = None
        self.text = ""
        self.stopped = False
        self.prompt_tokens = 0

    @property
    def usage(self) -> dict:
        completion = len(self.streamer.ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def fail(self, err: Exception) -> None:
        self.error = err

    def finish(self) -> None:
        self.done.set()
        with contextlib.suppress(Full):
            self.queue.put_nowait(None)  # wake a reader waiting on an empty queue

    def close(self) -> None:
        """The reader is gone or has what it wants: end the generation at its next token."""
        self.cancelled.event.set()

    def next_piece(self) -> str | None:
        """The next piece of text, or None when there is no more."""
        while not self.stopped:
            try:
                piece = self.queue.get(timeout=0.5)
            except Empty:
                if self.done.is_set() and self.queue.empty():
                    break
                continue
            if piece is None:
                break
            text, self.stopped = ModelServer._cut(self.text + piece, self.stop)
            new, self.text = text[len(self.text):], text
            if self.stopped:
                self.close()
            if new:
                return new
        if self.error is not None:
            raise self.error
        return None

    @property
    def finish_reason(self) -> str:
        return finish_reason(self.streamer.ids, self.max_tokens, self.stopped, self.tokenizer.eos_token_id)


class ModelServer:
    """One loaded base model serving every version of one registered model."""

    def __init__(self, name: str, base: str, registry: Registry, device: str = "auto", slots: int = 4,
                 dtype: str = "float32", batch: int = 16) -> None:
        self.name = name
        # at most `slots` forward passes at once: beyond a few, CPU threads only thrash
        self.slots = threading.BoundedSemaphore(slots)
        self.model, self.tokenizer = load_model(base, device=device, dtype=dtype)
        self.registry = registry
        registry.create_model(name, base, model_fingerprint(self.model))
        self.holder = HotSwapModel(self.model, registry, name)
        self.device = next(self.model.parameters()).device
        ends = self.model.generation_config.eos_token_id
        self.eos_ids = {*(ends if isinstance(ends, list) else [ends] if ends is not None else []),
                        self.tokenizer.eos_token_id} - {None}
        self.batcher = Batcher(self._run_batch, self.slots, batch, name=f"batcher-{name}")

    def resolve(self, ref: str | None) -> str:
        if ref is None:
            ref = "production" if "production" in self.registry.aliases(self.name) else "latest"
        try:
            return self.registry.live(self.name, ref).id
        except Gone:
            raise
        except (NotFound, RegistryError) as err:
            raise UnknownModel(f"{self.name}@{ref}: {err}") from err

    def chat_prompt(self, messages: list[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def _inputs(self, prompt: str | list[int], max_tokens: int = 0) -> dict:
        """Model inputs of a text or of token ids (checked against the vocabulary and the context)."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            if bad := [t for t in ids if t >= len(self.tokenizer)]:
                raise BadPrompt(f"token ids {bad[:5]} are not in this model's vocabulary of {len(self.tokenizer)}")
        if not ids:  # an empty prompt starts a new document, as OpenAI's does
            tok = self.tokenizer
            ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        self.check_length(len(ids) + max_tokens)
        ids_t = torch.tensor([ids], device=self.device)
        return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}

    def check_length(self, n_tokens: int) -> None:
        context = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None)
        if context and n_tokens > context:
            raise BadPrompt(f"prompt and max_tokens make {n_tokens} tokens, more than this model's context of "
                            f"{context}; shorten the prompt or lower max_tokens")

    def _gen_kwargs(self, max_tokens: int, temperature: float, top_p: float, seed: int | None) -> dict:
        if seed is not None:
            torch.manual_seed(seed)
        sample = temperature >= 1e-4  # below that, sampling divides logits into inf: it is greedy anyway
        return dict(max_new_tokens=max_tokens, do_sample=sample, temperature=temperature if sample else None,
                    top_p=top_p if sample else None, top_k=None, pad_token_id=self.tokenizer.pad_token_id)

    @staticmethod
    def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
        cuts = [text.index(s) for s in stop if s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    @torch.no_grad()
    def generate(self, version: str, prompt: str, max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 stop: list[str] | None = None, seed: int | None = None,
                 cancel: threading.Event | None = None) -> Generation:
        """The whole answer; ``cancel`` (set when the client goes away) ends the generation at the next token."""
        inputs = self._inputs(prompt, max_tokens)
        prompt_ids = inputs["input_ids"][0].tolist()
        if max_tokens == 0:  # echo alone: the prompt is scored, nothing generated
            return Generation("", "length", len(prompt_ids), 0, prompt_ids, [])
        sample = temperature >= 1e-4
        if sample and seed is not None:  # its own sampler, seeded: it cannot share a batch
            criteria = StoppingCriteriaList(([Cancelled(cancel)] if cancel is not None else [])
                                            + ([stop_strings(self.tokenizer, stop)] if stop else []))
            with self.slots, self.holder.use(version) as model:
                out = model.generate(**inputs, **self._gen_kwargs(max_tokens, temperature, top_p, seed),
                                     stopping_criteria=criteria)
            new = out[0, len(prompt_ids):].tolist()
        else:
            new = self._batched(Job(version, prompt_ids, max_tokens, stop or [],
                                    (sample, temperature if sample else None, top_p if sample else None),
                                    cancel or threading.Event()))
        text, stopped = self._cut(self.tokenizer.decode(new, skip_special_tokens=True), stop or [])
        if stopped:  # the tokens through the one the stop sequence starts in
            new = next((new[:k] for k in range(1, len(new) + 1)
                        if len(self.tokenizer.decode(new[:k], skip_special_tokens=True)) > len(text)), new)
        reason = finish_reason(new, max_tokens, stopped, self.tokenizer.eos_token_id)
        TOKENS_GENERATED.labels(self.name).inc(len(new))
        return Generation(text, reason, len(prompt_ids), len(new), prompt_ids, new)

    def _batched(self, job: Job) -> list[int]:
        """A job's generated tokens, from a batch shared with the other requests pending with its sampling settings."""
        self.batcher.submit(job)
        while not job.done.wait(0.25):
            if job.cancel.is_set() and self.batcher.withdraw(job):
                return []
        if job.error is not None:
            raise job.error
        return job.new_ids

    @torch.no_grad()
    def _run_batch(self, jobs: list[Job]) -> None:
        """One generation for every job of a batch (one sampling setting, any versions), rows left-padded.

        A version that cannot be loaded (pruned, damaged) fails its own jobs, not the batch."""
        for version in {j.version for j in jobs}:
            try:
                self.holder.preload(version)
            except Exception as err:
                for job in jobs:
                    if job.version == version:
                        job.error = err
        jobs = [j for j in jobs if j.error is None]
        if not jobs:
            return
        sample, temperature, top_p = jobs[0].key
        rows_of: dict[str, list[int]] = {}
        for row, job in enumerate(jobs):
            rows_of.setdefault(job.version, []).append(row)
        width = max(len(j.prompt_ids) for j in jobs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, job in enumerate(jobs):
            ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[row, width - len(job.prompt_ids):] = 1
        limits = RowLimits(jobs, width, self.tokenizer, self.eos_ids)
        kwargs = self._gen_kwargs(max(j.max_tokens for j in jobs), temperature if sample else 0.0,
                                  top_p if sample else 1.0, None)
        with self.holder.use_rows(rows_of) as model:
            out = model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs,
                                 stopping_criteria=StoppingCriteriaList([limits]))
        for row, job in enumerate(jobs):
            new = out[row, width:].tolist()
            job.new_ids = new[: limits.lengths[row]] if limits.lengths[row] is not None else new[: job.max_tokens]

    @torch.no_grad()
    def token_logprobs(self, version: str, ids: list[int], top: int) -> tuple[list[float | None], list[dict | None]]:
        """log p of each token given those before it (None for the first), and each position's ``top`` most
        likely tokens with theirs, under a version: one forward pass."""
        self.check_length(len(ids))
        x = torch.tensor([ids], device=self.device)
        with self.slots, self.holder.use(version) as model:
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        chosen = logp.gather(1, x[0, 1:, None])[:, 0].tolist()
        best = logp.topk(top, dim=-1) if top else None
        tops: list[dict | None] = [None]
        for i in range(len(ids) - 1):
            pairs = zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True) if best is not None else ()
            tops.append({self.tokenizer.decode([t]): v for t, v in pairs})
        return [None, *chosen], tops

    def open_stream(self, version: str, prompt: str, max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                    stop: list[str] | None = None, seed: int | None = None,
                    stall_seconds: float = STALL_SECONDS) -> Stream:
        """Start a generation in its own thread and return its :class:`Stream`. Blocking: it tokenises, then waits
        for a slot, so a bad prompt raises here, and the slot is held before any response is sent."""
        inputs = self._inputs(prompt, max_tokens)
        self.holder.preload(version)  # a damaged version fails here, while an error can still be a status code
        self.slots.acquire()
        try:
            stream = Stream(self.tokenizer, max_tokens, stop or [], stall_seconds)
            stream.prompt_tokens = int(inputs["input_ids"].shape[1])
            kwargs = {**inputs, **self._gen_kwargs(max_tokens, temperature, top_p, seed), "streamer": stream.streamer,
                      "stopping_criteria": StoppingCriteriaList([stream.cancelled])}
            thread = threading.Thread(target=self._run_stream, args=(version, kwargs, stream), daemon=True)
            thread.start()
        except BaseException:
            self.slots.release()
            raise
        return stream

    def _run_stream(self, version: str, kwargs: dict, stream: Stream) -> None:
        """The generation thread: holds the slot (taken by ``open_stream``) and the version's weights until the
        generation ends, is cancelled, or finds its reader stalled."""
        try:
            with self.holder.use(version) as model, torch.no_grad():
                model.generate(**kwargs)
        except Exception as err:  # surfaced to the reader, who is past the point of a status code
            stream.fail(err)
        finally:
            self.slots.release()
            TOKENS_GENERATED.labels(self.name).inc(len(stream.streamer.ids))
            stream.finish()

    @torch.no_grad()
    def score(self, version: str, prompt: str, target: str) -> dict:
        """log p(target | prompt) under a version: the sum over the target's tokens, and per token."""
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        target_ids = self.tokenizer((" " + target) if not target.startswith(" ") else target,
                                    add_special_tokens=False)["input_ids"]
        self.check_length(len(prompt_ids) + len(target_ids))
        ids = torch.tensor([prompt_ids + target_ids], device=self.device)
        with self.slots, self.holder.use(version) as model:
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        pos = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1, device=self.device)
        token_logprobs = logp[pos, ids[0, len(prompt_ids):]].tolist()
        return {"logprob": sum(token_logprobs), "token_logprobs": token_logprobs,
                "tokens": self.tokenizer.convert_ids_to_tokens(target_ids)}


def completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())
