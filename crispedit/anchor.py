"""An exact Bregman penalty on anchor prompts: keep the base model's predictions on unrelated questions.

CrispEdit constrains the quadratic (Gauss-Newton) model of the capability loss's Bregman divergence,
which for softmax cross-entropy is KL(p_base ‖ p_edited) of next-token distributions (paper §3). Text
curvature does not protect question answering well (BENCHMARKS.md §8: locality agreement ≈ 0.4), so
this adds the divergence itself, on a set of anchor (prompt, continuation) pairs, to the edit loss:

    L = L_edit + β · mean over anchored positions of KL(p_base ‖ p_edited),

a penalty form of a trust region on the Bregman divergence. The base distributions are recorded once,
before the edit, as their top-k tokens (the tail beyond k is dropped from the sum).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from crispedit.augment import QA_FORMS
from crispedit.requests import IGNORE, EditRequest, tokenize_edit_batch

TUNED_WEIGHT = 1.0  # β chosen on the ZsRE train file (BENCHMARKS.md §9)


@dataclass
class Anchors:
    """Anchor sequences and the base model's top-k next-token log-probabilities at each anchored position."""

    input_ids: torch.Tensor  # (n, L), right padded
    attention_mask: torch.Tensor  # (n, L)
    anchored: torch.Tensor  # (n, L - 1) bool: position t predicts a continuation token t + 1
    top_ids: torch.Tensor  # (n, L - 1, k)
    top_logp: torch.Tensor  # (n, L - 1, k), log p_base

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def read_anchor_pairs(path: str | Path) -> list[tuple[str, str]]:
    """ANCHORS.jsonl: ``{"prompt": ..., "answer": ...}`` lines (an unrelated question and its answer)."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt, answer = record["prompt"], record["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: expected {{\"prompt\": ..., \"answer\": ...}} ({err})") from err
            if not (isinstance(prompt, str) and isinstance(answer, str) and prompt.strip() and answer.strip()):
                raise ValueError(f"{path}:{lineno}: prompt and answer must be non-empty strings")
            pairs.append((prompt, answer))
    if not pairs:
        raise ValueError(f"{path} holds no anchor pairs")
    return pairs


def with_question_forms(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs, then each again inside one of the QA framings of ``crispedit.augment.QA_FORMS`` (in turn),
    so the penalty also keeps answers to questions asked that way."""
    framed = [(QA_FORMS[i % len(QA_FORMS)].format(q=p), a) for i, (p, a) in enumerate(pairs)]
    return list(pairs) + framed


@torch.no_grad()
def base_anchors(
    model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], top_k: int = 32, batch_size: int = 32
) -> Anchors:
    """Record the (base) model's predictions over each continuation, given its prompt."""
    if not pairs:
        raise ValueError("no anchor (prompt, continuation) pairs given")
    device = next(model.parameters()).device
    batch = tokenize_edit_batch(tokenizer, [EditRequest(p, c) for p, c in pairs], device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    top_ids, top_logp = [], []
    for i in range(0, len(pairs), batch_size):
        logits = model(input_ids=ids[i : i + batch_size], attention_mask=mask[i : i + batch_size]).logits[:, :-1]
        top = torch.log_softmax(logits.float(), -1).topk(top_k, dim=-1)
        top_ids.append(top.indices)
        top_logp.append(top.values)
    return Anchors(ids, mask, batch["labels"][:, 1:] != IGNORE, torch.cat(top_ids), torch.cat(top_logp))


def load_anchors(model: nn.Module, tokenizer, path: str | Path) -> Anchors:
    """The base model's predictions on an ANCHORS.jsonl file, each pair raw and framed as a question."""
    return base_anchors(model, tokenizer, with_question_forms(read_anchor_pairs(path)))


def anchor_kl(model: nn.Module, anchors: Anchors, rows: torch.Tensor) -> torch.Tensor:
    """Mean over the anchored positions of ``rows`` of Σ_top-k p_base (log p_base − log p_edited)."""
    mask = anchors.attention_mask[rows]
    length = int(mask.sum(dim=1).max())  # drop padding columns that no row of this minibatch needs
    logits = model(input_ids=anchors.input_ids[rows, :length], attention_mask=mask[:, :length]).logits[:, :-1]
    logq = torch.log_softmax(logits.float(), -1).gather(-1, anchors.top_ids[rows, : length - 1])
    logp = anchors.top_logp[rows, : length - 1]
    kl = (logp.exp() * (logp - logq)).sum(-1)
    anchored = anchors.anchored[rows, : length - 1]
    return (kl * anchored).sum() / anchored.sum().clamp_min(1)
