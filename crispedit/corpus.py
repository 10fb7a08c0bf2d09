"""The capability corpus whose curvature an edit must respect: text files, JSONL, or the model itself.

``n_samples`` sequences of ``seq_len`` tokens each (the paper uses documents truncated to 512 tokens).
Files are read as one token stream cut into consecutive windows, so every window is full length.
``self`` samples the text from the base model (temperature 1), so a fresh install needs no dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


def read_documents(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, or the ``text`` field of each JSONL record."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"capability corpus {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: a JSONL corpus needs a string field 'text'")
                docs.append(record["text"])
        return docs
    return [line for line in lines if line.strip()]


def token_windows(tokenizer, documents: list[str], n_samples: int, seq_len: int) -> list[list[int]]:
    """The first ``n_samples`` windows of ``seq_len`` tokens from the documents' concatenated token stream."""
    windows: list[list[int]] = []
    stream: list[int] = []
    for doc in documents:
        stream.extend(tokenizer(doc)["input_ids"])
        while len(stream) >= seq_len and len(windows) < n_samples:
            windows.append(stream[:seq_len])
            stream = stream[seq_len:]
        if len(windows) == n_samples:
            return windows
    raise ValueError(
        f"corpus too small: it holds {len(windows)} full windows of {seq_len} tokens, {n_samples} were asked for; "
        "pass fewer --samples, a shorter --seq-len, or a bigger corpus"
    )


class _TokenProgress:
    """A logits processor that only advances a progress bar: ``generate`` calls it once per new token."""

    def __init__(self, bar: tqdm, batch: int) -> None:
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
    with tqdm(total=n_samples * (seq_len - 1), unit="tok", desc="sampling capability text",
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


def batches_of(windows: list[list[int]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Full-length windows as model batches (all real tokens, so the attention mask is all ones)."""
    for i in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[i : i + batch_size], dtype=torch.long)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def fingerprint_windows(windows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(windows).encode()).hexdigest()[:16]


def capability_windows(
    model: nn.Module, tokenizer, corpus: str, n_samples: int, seq_len: int, seed: int = 0
) -> list[list[int]]:
    """Token windows for ``corpus``: a path to a .txt/.jsonl file, or ``self``."""
    if n_samples <= 0 or seq_len < 2:
        raise ValueError("need at least one sample of at least 2 tokens")
    if corpus == "self":
        return sample_from_model(model, tokenizer, n_samples, seq_len, seed=seed)
    return token_windows(tokenizer, read_documents(corpus), n_samples, seq_len)
