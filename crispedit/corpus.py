"""The capability corpus whose curvature an edit must respect: text files, JSONL, or the model itself.

Sources (``capability_windows``):
- a ``.txt``/``.jsonl`` path: one token stream cut into ``n_samples`` full windows of ``seq_len`` tokens
  (the paper uses documents truncated to 512 tokens);
- ``self``: ``n_samples`` sequences sampled from the base model (temperature 1), so a fresh install
  needs no dataset;
- ``self-raw:PROMPTS`` / ``self-chat:PROMPTS``: the first ``n_samples`` prompts of a file (one per line,
  or JSONL ``prompt``/``text``), each followed by the model's own sampled answer of at most ``seq_len``
  tokens, as raw text or through the chat template. This is curvature of answer-style behaviour.
A mixture of sources with weights is built in ``crispedit.cache`` (``parse_mixture``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from crispedit.progress import Bar


def read_documents(path: str | Path, fields: tuple[str, ...] = ("text",)) -> list[str]:
    """Non-empty lines of a text file, or of each JSONL record the first of ``fields`` it has."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"capability corpus {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                record = json.loads(line)
                text = next((record[f] for f in fields if f in record), None)
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: a JSONL corpus needs a string field "
                                     + " or ".join(repr(f) for f in fields))
                docs.append(text)
        return docs
    return [line for line in lines if line.strip()]


def read_prompts(path: str | Path) -> list[str]:
    """Prompts, one per non-empty line, or the ``prompt`` (else ``text``) field of each JSONL record."""
    return read_documents(path, fields=("prompt", "text"))


def token_windows(
    tokenizer, documents: list[str], n_samples: int, seq_len: int, allow_fewer: bool = False
) -> list[list[int]]:
    """The first ``n_samples`` windows of ``seq_len`` tokens from the documents' concatenated token stream
    (with ``allow_fewer``, as many as the documents hold, if that is at least one)."""
    windows: list[list[int]] = []
    stream: list[int] = []
    for doc in documents:
        stream.extend(tokenizer(doc)["input_ids"])
        while len(stream) >= seq_len and len(windows) < n_samples:
            windows.append(stream[:seq_len])
            stream = stream[seq_len:]
        if len(windows) == n_samples:
            return windows
    if allow_fewer and windows:
        return windows
    raise ValueError(
        f"corpus too small: it holds {len(windows)} full windows of {seq_len} tokens, {n_samples} were asked for; "
        "pass fewer --samples, a shorter --seq-len, or a bigger corpus"
    )


class _TokenProgress:
    """A logits processor that only advances a progress bar: ``generate`` calls it once per new token."""

    def __init__(self, bar: Bar, batch: int) -> None:
        self.bar, self.batch = bar, batch

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.bar.update(self.batch)
        return scores


@torch.no_grad()
def sample_from_model(
    model: nn.Module, tokenizer, n_samples: int, seq_len: int, batch_size: int = 32, seed: int = 0,
    progress: bool = True,
) -> list[list[int]]:
    """``n_samples`` sequences of ``seq_len`` tokens drawn from the model itself (temperature 1).

    Wide batches: on a CPU, decoding 32 sequences at once costs about twice as much per step as 8.
    """
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    out: list[list[int]] = []
    with Bar(total=n_samples * (seq_len - 1), unit="tok", desc="sampling capability text",
              disable=not progress) as bar:
        while len(out) < n_samples:
            b = min(batch_size, n_samples - len(out))
            prompt = torch.full((b, 1), start, dtype=torch.long, device=device)
            generated = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([_TokenProgress(bar, b)]),
            )
            out.extend(generated.tolist())
    return out


@torch.no_grad()
def answer_from_model(
    model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, chat: bool, batch_size: int = 32,
    seed: int = 0, progress: bool = True,
) -> list[list[int]]:
    """Each prompt's tokens followed by the model's own answer (temperature 1), up to and including its end
    token: the model's behaviour on questions, which edits must not change for unrelated ones."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    torch.manual_seed(seed)
    out: list[list[int]] = []
    with Bar(total=len(prompts), unit="answer", desc="sampling answers", disable=not progress) as bar:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left").to(device)
            generated = model.generate(
                **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )[:, enc["input_ids"].shape[1] :].tolist()
            for prompt, answer in zip(chunk, generated, strict=True):
                end = answer.index(eos) + 1 if eos in answer else len(answer)
                out.append(tokenizer(prompt)["input_ids"] + answer[:end])
            bar.update(len(chunk))
    return out


def batches_of(windows: list[list[int]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Token sequences as model batches, right padded; the attention mask marks each sequence's own tokens
    (the padding value is masked out whatever it is, so an answer's own end token still counts)."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, w in enumerate(chunk):
            ids[row, : len(w)] = torch.tensor(w, dtype=torch.long)
            mask[row, : len(w)] = 1
        yield {"input_ids": ids, "attention_mask": mask}


def fingerprint_windows(windows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(windows).encode()).hexdigest()[:16]


def capability_windows(
    model: nn.Module, tokenizer, corpus: str, n_samples: int, seq_len: int, seed: int = 0
) -> list[list[int]]:
    """Token sequences for one source: a .txt/.jsonl path, ``self``, ``self-raw:PROMPTS`` or ``self-chat:PROMPTS``."""
    if n_samples <= 0 or seq_len < 2:
        raise ValueError("need at least one sample of at least 2 tokens")
    if corpus == "self":
        return sample_from_model(model, tokenizer, n_samples, seq_len, seed=seed)
    kind, _, path = corpus.partition(":")
    if kind in PROMPTED_SOURCES and path:
        prompts = read_prompts(path)[:n_samples]
        if not prompts:
            raise ValueError(f"prompt file {path} holds no prompts")
        if kind == "self-chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("a self-chat corpus needs a tokenizer with a chat template; this model has none")
        return answer_from_model(model, tokenizer, prompts, seq_len, chat=kind == "self-chat", seed=seed)
    return token_windows(tokenizer, read_documents(corpus), n_samples, seq_len)


PROMPTED_SOURCES = ("self-raw", "self-chat")
