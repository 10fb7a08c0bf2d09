"""Capability metrics for an edited model: perplexity, KL to the base model, multiple-choice accuracy.

Compact re-implementations (no lm-evaluation-harness): multiple-choice tasks are scored like lm-eval's
log-likelihood tasks, i.e. each choice by the sum of the log-probabilities of its tokens after the context.
``scripts/lm_eval_check/crosscheck.py`` checks that against lm-eval itself (BENCHMARKS.md section 7).
"""

from __future__ import annotations

import inspect
import json
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from crispedit.datasets import shared_data_dir

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
    in (same keys). Each batch runs the base then the edited forward, in float32 log-space; the model is
    left as it was.
    """
    if set(base) != set(edited):
        raise ValueError(f"base and edited name different tensors: {sorted(set(base) ^ set(edited))}")
    seqs = _encode(tokenizer, texts, max_length)
    pad, dev = _pad_id(tokenizer), _device(model)
    total, count = 0.0, 0
    for batch in _batches(seqs, batch_size, progress, "KL"):
        ids, mask = _pad_right(batch, pad)
        ids, mask = ids.to(dev), mask.to(dev)
        with swapped_weights(model, base):
            logp_base = _next_token_logprobs(model, ids, mask)
        with swapped_weights(model, edited):
            logp_edit = _next_token_logprobs(model, ids, mask)
        kl = (logp_base.exp() * (logp_base - logp_edit)).sum(-1)  # (batch, len - 1)
        keep = mask[:, 1:].bool()
        total += kl[keep].sum().item()
        count += int(keep.sum())
    if count == 0:
        raise ValueError("no token to predict: every text is at most one token long")
    return total / count


# -------------------------------------------------------------------------------------- multiple choice

Example = tuple[str, list[str], int]  # (context, choices without the leading space, gold index)


def _arc(r: dict) -> Example:
    return r["query"] + "\nAnswer:", list(r["choices"]), int(r["gold"])


def _hellaswag(r: dict) -> Example:
    return r["ctx"], list(r["endings"]), int(r["label"])


def _piqa(r: dict) -> Example:
    return r["query"] + "Answer:", list(r["choices"]), int(r["gold"])


def _mmlu(r: dict) -> Example:
    """lm-eval's MMLU prompt: subject header, question, lettered options; the choices are the letters."""
    subject = r.get("subject", "").replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    options = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", r["choices"], strict=True))
    return header + r["question"].strip() + options + "\nAnswer:", ["A", "B", "C", "D"], int(r["answer"])


MC_TASKS: dict[str, tuple[str, Callable[[dict], Example]]] = {
    "arc_easy": ("capability/arc/arc_easy_test.jsonl", _arc),
    "arc_challenge": ("capability/arc/arc_challenge_test.jsonl", _arc),
    "hellaswag": ("capability/hellaswag/hellaswag_val_first2000.jsonl", _hellaswag),
    "piqa": ("capability/piqa/piqa_val.jsonl", _piqa),
    "boolq": ("capability/boolq/boolq_val.jsonl", _arc),  # query/choices/gold, "\nAnswer:" as ARC
    "mmlu": ("capability/mmlu/mmlu_test_35per_subject.jsonl", _mmlu),
}


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def select_records(task: str, records: list[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` records; for mmlu a round robin over subjects (the first question of every
    subject, then the second of every subject, ...) until ``limit``, returned in file order."""
    if limit is None or limit >= len(records):
        return list(records)
    if task != "mmlu":
        return records[:limit]
    by_subject: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_subject.setdefault(r.get("subject", ""), []).append(i)
    picked: list[int] = []
    for rank in range(max(len(v) for v in by_subject.values())):
        picked += [v[rank] for v in by_subject.values() if rank < len(v)]
    return [records[i] for i in sorted(picked[:limit])]


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = False,
) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context, continuation) pair.

    Context and continuation are tokenised separately and their ids concatenated, so the boundary is
    exact; the context keeps at most its last ``MAX_CONTEXT_TOKENS`` tokens. A pair needs one forward of
    ``context + continuation[:-1]``; pairs needing the same input share it (so single-token choices after
    one context, as in MMLU or BoolQ, cost one forward). Inputs are batched longest first with right
    padding, one forward per batch, logits kept only from the first scored position on.
    """
    encoded: list[tuple[list[int], list[int]]] = []
    users: dict[tuple[int, ...], list[int]] = {}  # input ids -> the pairs scored on them
    for k, (ctx, cont) in enumerate(pairs):
        ctx_ids = tokenizer(ctx)["input_ids"][-MAX_CONTEXT_TOKENS:] if ctx else [tokenizer.eos_token_id]
        cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        if not cont_ids:
            raise ValueError(f"continuation {cont!r} has no tokens")
        encoded.append((ctx_ids, cont_ids))
        users.setdefault(tuple(ctx_ids + cont_ids[:-1]), []).append(k)
    inputs = sorted(users, key=len, reverse=True)
    pad, dev = _pad_id(tokenizer), _device(model)
    can_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    scores = [0.0] * len(pairs)
    for batch in _batches(inputs, batch_size, progress, "choices"):
        ids, mask = _pad_right(batch, pad)
        first = min(len(encoded[k][0]) for seq in batch for k in users[seq]) - 1  # first scored position
        keep = {"logits_to_keep": ids.shape[1] - first} if can_keep else {}
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **keep).logits
        logp = torch.log_softmax(logits[:, -(ids.shape[1] - first) :].float(), dim=-1)
        for row, seq in enumerate(batch):
            for k in users[seq]:
                ctx_ids, cont_ids = encoded[k]
                pos = torch.arange(len(cont_ids), device=dev) + len(ctx_ids) - 1 - first
                scores[k] = logp[row, pos, torch.tensor(cont_ids, device=dev)].sum().item()
    return scores


def multiple_choice_accuracy(
    model: nn.Module,
    tokenizer,
    task: str,
    data_dir: Path | None = None,
    limit: int | None = 100,
    batch_size: int = 16,
    records: list[dict] | None = None,
    progress: bool = False,
) -> dict:
    """Log-likelihood multiple-choice accuracy on ``task`` (a key of ``MC_TASKS``), lm-eval style.

    Each choice (with a leading space) is scored by the summed log-probability of its tokens after the
    context. ``acc``: the highest sum is the gold choice; ``acc_norm``: the same with each sum divided by
    the choice's length in characters. Records come from the task's file in ``data_dir`` (default: the
    shared data folder) or from ``records``; :func:`select_records` picks ``limit`` of them (the first
    ones; for mmlu a round robin over the 57 subjects). Returns ``{"acc", "acc_norm", "n", "correct"}``,
    ``correct`` being one bool per example (``acc``'s rule), for paired comparisons (:func:`mc_drop`).
    """
    if task not in MC_TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {sorted(MC_TASKS)}")
    rel_path, to_example = MC_TASKS[task]
    if records is None:
        records = _read_jsonl(Path(data_dir or shared_data_dir()) / rel_path)
    examples = [to_example(r) for r in select_records(task, records, limit)]
    if not examples:
        raise ValueError(f"{task}: no records to score")
    pairs = [(ctx, " " + choice) for ctx, choices, _ in examples for choice in choices]
    scores = iter(score_continuations(model, tokenizer, pairs, batch_size, progress))
    correct, acc_norm = [], 0
    for _, choices, gold in examples:
        s = [next(scores) for _ in choices]
        norm = [x / max(len(c), 1) for x, c in zip(s, choices, strict=True)]
        correct.append(max(range(len(s)), key=s.__getitem__) == gold)
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == gold
    n = len(examples)
    return {"acc": sum(correct) / n, "acc_norm": acc_norm / n, "n": n, "correct": correct}


def capability_report(
    model: nn.Module,
    tokenizer,
    data_dir: Path | None = None,
    limit: int | None = 100,
    tasks: Sequence[str] = tuple(MC_TASKS),
    batch_size: int = 16,
    progress: bool = False,
    items: bool = False,
) -> dict:
    """``{task: acc}`` for each multiple-choice task, plus ``"mc_mean"``, the mean of those accuracies.

    With ``items``, also ``"mc_correct"``: ``{task: [bool per example]}``, the input of :func:`mc_drop`.
    """
    results = {
        t: multiple_choice_accuracy(model, tokenizer, t, data_dir, limit, batch_size, progress=progress)
        for t in tasks
    }
    report: dict = {t: r["acc"] for t, r in results.items()}
    report["mc_mean"] = sum(report.values()) / len(report)
    if items:
        report["mc_correct"] = {t: r["correct"] for t, r in results.items()}
    return report


def mc_drop(base: dict[str, list[bool]], edited: dict[str, list[bool]]) -> tuple[float, float]:
    """Drop of the MC mean from ``base`` to ``edited`` in points, and its standard error, paired by item.

    The MC mean averages T task accuracies, so its drop is (1/T) Σ_t mean_i(b_ti − e_ti) over the same
    items; with per-item differences d_ti ∈ {−1, 0, 1}, its variance is (1/T²) Σ_t var(d_t)/n_t. Pairing
    cancels the items both models get right or wrong, which is most of the spread of either accuracy.
    """
    if set(base) != set(edited):
        raise ValueError(f"tasks differ: {sorted(base)} against {sorted(edited)}")
    drop = var = 0.0
    for task in base:
        if len(base[task]) != len(edited[task]) or len(base[task]) < 2:
            raise ValueError(f"{task}: need the same items, at least 2, in both ({len(base[task])} against "
                             f"{len(edited[task])})")
        d = torch.tensor(base[task], dtype=torch.float64) - torch.tensor(edited[task], dtype=torch.float64)
        drop += d.mean().item()
        var += d.var(unbiased=True).item() / len(d)
    t = len(base)
    return 100 * drop / t, 100 * var**0.5 / t
