"""Answering queries from the registry: the ``model`` field picks a version, hot swap puts its weights in.

``name@v3`` is version 3, ``name@production`` follows that alias, plain ``name`` means its
``production`` alias or else ``latest``. Aliases are read from the registry on every request, so a
rollback or a promotion done anywhere takes effect at once, without a restart.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from crispedit.models import load_model, model_fingerprint
from registry import HotSwapModel, NotFound, Registry, RegistryError


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


class ModelServer:
    """One loaded base model serving every version of one registered model."""

    def __init__(self, name: str, base: str, registry: Registry, device: str = "auto", slots: int = 4) -> None:
        self.name = name
        # at most `slots` forward passes at once: beyond a few, CPU threads only thrash
        self.slots = threading.BoundedSemaphore(slots)
        self.model, self.tokenizer = load_model(base, device=device)
        self.registry = registry
        registry.create_model(name, base, model_fingerprint(self.model))
        self.holder = HotSwapModel(self.model, registry, name)
        self.device = next(self.model.parameters()).device

    def resolve(self, ref: str | None) -> str:
        if ref is None:
            ref = "production" if "production" in self.registry.aliases(self.name) else "latest"
        try:
            return self.registry.get(self.name, ref).id
        except (NotFound, RegistryError) as err:
            raise UnknownModel(f"{self.name}@{ref}: {err}") from err

    def chat_prompt(self, messages: list[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def _inputs(self, prompt: str, max_tokens: int = 0) -> dict:
        ids = self.tokenizer(prompt)["input_ids"]
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
                 stop: list[str] | None = None, seed: int | None = None) -> Generation:
        inputs = self._inputs(prompt, max_tokens)
        with self.slots, self.holder.use(version) as model:
            out = model.generate(**inputs, **self._gen_kwargs(max_tokens, temperature, top_p, seed))
        new = out[0, inputs["input_ids"].shape[1]:]
        text, stopped = self._cut(self.tokenizer.decode(new, skip_special_tokens=True), stop or [])
        ended = stopped or (len(new) < max_tokens) or (len(new) and int(new[-1]) == self.tokenizer.eos_token_id)
        return Generation(text, "stop" if ended else "length", int(inputs["input_ids"].shape[1]), len(new))

    def stream(self, version: str, prompt: str, max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
               stop: list[str] | None = None, seed: int | None = None) -> Iterator[str]:
        """Text pieces as they are generated; a bad prompt raises here, before any response is sent."""
        inputs = self._inputs(prompt, max_tokens)
        return self._pieces(version, inputs, max_tokens, temperature, top_p, stop, seed)

    def _pieces(self, version: str, inputs: dict, max_tokens: int, temperature: float, top_p: float,
                stop: list[str] | None, seed: int | None) -> Iterator[str]:
        """The version's weights stay in place until the last piece."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**inputs, **self._gen_kwargs(max_tokens, temperature, top_p, seed), "streamer": streamer}
        with self.slots, self.holder.use(version) as model:
            thread = threading.Thread(target=lambda: torch.no_grad()(model.generate)(**kwargs))
            thread.start()
            sent = ""
            for piece in streamer:
                text, stopped = self._cut(sent + piece, stop or [])
                if text[len(sent):]:
                    yield text[len(sent):]
                sent = text
                if stopped:
                    break
            thread.join()

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
