"""Multiple-choice accuracy of a model, scored like lm-evaluation-harness's log-likelihood tasks.

Each choice is scored by the sum of the log-probabilities of its tokens after the context (no lm-eval at run
time); ``lab/lm_eval_check/crosscheck.py`` checks the scores against lm-eval itself.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from crispedit.capability import MAX_CONTEXT_TOKENS, _batches, _device, _pad_id, _pad_right
from lab.edit_sets import shared_data_dir

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
