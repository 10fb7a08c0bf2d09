"""Capability metrics for an edited model: perplexity and KL to the base model (the capability guard's).

Multiple-choice accuracy, the benchmarks' third measure, is scored in ``lab/multiple_choice.py``.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MAX_CONTEXT_TOKENS = 512
_HEADING = re.compile(r"^\s*=+ .* =+\s*$")


# ----------------------------------------------------------------------------------------------- helpers


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (len(seqs), longest), padded on the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


def _batches(items: Sequence, batch_size: int, progress: bool, desc: str) -> Iterator[Sequence]:
    starts = range(0, len(items), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for s in starts:
        yield items[s : s + batch_size]


def _next_token_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities of the next token at every position but the last: (batch, len - 1, vocab)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


# ---------------------------------------------------------------------------------------------- held-out


def heldout_texts(path: str | Path, n_texts: int, min_chars: int = 200, seed: int = 0) -> list[str]:
    """``n_texts`` paragraphs of at least ``min_chars`` characters from a plain text file.

    A paragraph is a non-empty line, stripped; WikiText headings (`` = Title = ``) are skipped. The pick
    is a seeded random sample, returned in file order.
    """
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    paragraphs = [s for s in lines if len(s) >= min_chars and not _HEADING.match(s)]
    if n_texts > len(paragraphs):
        raise ValueError(f"{path}: {len(paragraphs)} paragraphs of >= {min_chars} chars, {n_texts} asked")
    picked = sorted(random.Random(seed).sample(range(len(paragraphs)), n_texts))
    return [paragraphs[i] for i in picked]


@torch.no_grad()
def text_nlls(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """Per text: (summed next-token NLL, number of predicted tokens), the terms of :func:`perplexity`.

    Each text is tokenised as the tokenizer does by default (special tokens included), truncated to
    ``max_length`` tokens; every token after the first is predicted.
    """
    seqs = _encode(tokenizer, texts, max_length)
    pad, dev = _pad_id(tokenizer), _device(model)
    terms = []
    for batch in _batches(seqs, batch_size, progress, "perplexity"):
        ids, mask = _pad_right(batch, pad)
        ids, mask = ids.to(dev), mask.to(dev)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(1)
        terms += [(float(n), int(c)) for n, c in zip(nll.tolist(), mask[:, 1:].sum(1).tolist(), strict=True)]
    return terms


def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], **options) -> float:
    """Token-level perplexity over ``texts``; ``options`` (max_length, batch_size, progress) as :func:`text_nlls`."""
    return perplexity_of(text_nlls(model, tokenizer, texts, **options))


def perplexity_of(terms: Sequence[tuple[float, int]]) -> float:
    """``exp(total NLL / total predicted tokens)`` from :func:`text_nlls`' per-text terms."""
    count = sum(c for _, c in terms)
    if count == 0:
        raise ValueError("no token to predict: every text is at most one token long")
    return math.exp(sum(n for n, _ in terms) / count)


def perplexity_change(base: Sequence[tuple[float, int]], edited: Sequence[tuple[float, int]]) -> tuple[float, float]:
    """100 × (PPL_edited / PPL_base − 1) over the same texts, and its standard error, paired by text.

    With D = Σ_i (NLL_edited,i − NLL_base,i) / Σ_i N_i the change is exp(D) − 1; texts are the sampled
    unit, so Var(D) ≈ n · var_i(d_i) / (Σ N)², and the delta method gives SE = 100 · exp(D) · SE(D).
    """
    if len(base) != len(edited) or len(base) < 2 or [c for _, c in base] != [c for _, c in edited]:
        raise ValueError("need the same texts, at least 2, scored for both models")
    d = torch.tensor([e - b for (b, _), (e, _) in zip(base, edited, strict=True)], dtype=torch.float64)
    count = sum(c for _, c in base)
    change = d.sum().item() / count
    se = (len(d) * d.var(unbiased=True).item()) ** 0.5 / count
    return 100 * math.expm1(change), 100 * math.exp(change) * se


# ------------------------------------------------------------------------------------------ KL to base


@contextmanager
def swapped_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Copy ``tensors`` (named as in ``model.named_parameters()``) into the model in place; restore the
    previous values on exit, also when the body raises."""
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise KeyError(f"not parameters of the model: {missing}")
    for name, t in tensors.items():
        if t.shape != params[name].shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {tuple(params[name].shape)}")
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, t in tensors.items():
                saved[name] = params[name].detach().clone()
                params[name].copy_(t)
        yield model
    finally:
        with torch.no_grad():
            for name, old in saved.items():
                params[name].copy_(old)


@torch.no_grad()
def mean_kl(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    base: dict[str, torch.Tensor],
    edited: dict[str, torch.Tensor],
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Mean over predicted (non-pad) tokens of KL(p_base || p_edited) between next-token distributions.

    The base model is ``model`` with ``base`` swapped in, the edited one ``model`` with ``edited`` swapped
    in (same keys). Each batch runs the edited then the base forward, in float32 log-space; the model is
    left as it was.
    """
    return mean_kls(model, tokenizer, texts, [base], edited, max_length, batch_size, progress)[0]


def mean_kls(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    references: Sequence[dict[str, torch.Tensor]],
    edited: dict[str, torch.Tensor],
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> list[float]:
    """:func:`mean_kl` of ``edited`` against each of ``references`` (each naming the same tensors as ``edited``),
    with one edited forward per batch for all of them."""
    for base in references:
        if set(base) != set(edited):
            raise ValueError(f"base and edited name different tensors: {sorted(set(base) ^ set(edited))}")
    seqs = _encode(tokenizer, texts, max_length)
    pad, dev = _pad_id(tokenizer), _device(model)
    totals, count = [0.0] * len(references), 0
    for batch in _batches(seqs, batch_size, progress, "KL"):
        ids, mask = _pad_right(batch, pad)
        ids, mask = ids.to(dev), mask.to(dev)
        with swapped_weights(model, edited):
            logp_edit = _next_token_logprobs(model, ids, mask)
        keep = mask[:, 1:].bool()
        for i, base in enumerate(references):
            with swapped_weights(model, base):
                logp_base = _next_token_logprobs(model, ids, mask)
            kl = (logp_base.exp() * (logp_base - logp_edit)).sum(-1)  # (batch, len - 1)
            totals[i] += kl[keep].sum().item()
        count += int(keep.sum())
    if count == 0:
        raise ValueError("no token to predict: every text is at most one token long")
    return [total / count for total in totals]
