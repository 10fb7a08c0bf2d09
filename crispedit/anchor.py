"""An exact Bregman penalty on anchor prompts: keep the base model's predictions on unrelated questions.

CrispEdit constrains the quadratic (Gauss-Newton) model of the capability loss's Bregman divergence,
which for softmax cross-entropy is KL(p_base ‖ p_edited) of next-token distributions (Definition 1). Text
curvature does not protect question answering well (locality agreement ≈ 0.4 on ZsRE), so
this adds the divergence itself, on a set of anchor (prompt, continuation) pairs, to the edit loss:

    L = L_edit + β · mean over anchored positions of KL(p_base ‖ p_edited),

a penalty form of a trust region on the Bregman divergence. The base distributions are recorded once,
before the edit, as their top-k tokens; the rest of the vocabulary is one "tail" outcome, so the penalty
is the exact KL between the two distributions coarsened to k + 1 outcomes (never negative, zero only when
they agree on those outcomes).

Text anchors (``text_anchors``) apply the same penalty at every position of capability text windows:
the divergence that the curvature cache approximates to second order (Definition 1, Eq. 2), kept
exactly on a sample of the corpus, because the quadratic model stops describing it once an edit moves far.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from crispedit.augment import QA_FORMS
from crispedit.corpus import batches_of, capability_windows, read_documents, token_windows
from crispedit.requests import IGNORE, EditRequest, tokenize_edit_batch


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
def record_base(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, anchored: torch.Tensor, top_k: int, batch_size: int
) -> Anchors:
    """The model's top-k next-token log-probabilities at every position of ``ids``."""
    top_ids, top_logp = [], []
    for i in range(0, len(ids), batch_size):
        logits = model(input_ids=ids[i : i + batch_size], attention_mask=mask[i : i + batch_size]).logits[:, :-1]
        top = torch.log_softmax(logits.float(), -1).topk(top_k, dim=-1)
        top_ids.append(top.indices)
        top_logp.append(top.values)
    return Anchors(ids, mask, anchored, torch.cat(top_ids), torch.cat(top_logp))


def base_anchors(
    model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], top_k: int = 32, batch_size: int = 32
) -> Anchors:
    """Record the (base) model's predictions over each continuation, given its prompt."""
    if not pairs:
        raise ValueError("no anchor (prompt, continuation) pairs given")
    device = next(model.parameters()).device
    batch = tokenize_edit_batch(tokenizer, [EditRequest(p, c) for p, c in pairs], device)
    anchored = batch["labels"][:, 1:] != IGNORE
    return record_base(model, batch["input_ids"], batch["attention_mask"], anchored, top_k, batch_size)


def text_anchors(model: nn.Module, windows: Sequence[Sequence[int]], top_k: int = 32, batch_size: int = 8) -> Anchors:
    """Record the (base) model's predictions at every position of token windows of capability text."""
    if not windows or min(len(w) for w in windows) < 2:
        raise ValueError("text anchors need at least one window of at least 2 tokens")
    device = next(model.parameters()).device
    batch = next(batches_of([list(w) for w in windows], len(windows)))
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    return record_base(model, ids, mask, mask[:, 1:].bool(), top_k, batch_size)


def load_text_anchors(model: nn.Module, tokenizer, source: str, n_windows: int = 256, seq_len: int = 128) -> Anchors:
    """The base model's predictions on ``n_windows`` windows of a capability corpus (``self`` or a .txt/.jsonl
    path; a small file gives as many full windows as it holds)."""
    if source == "self":
        windows = capability_windows(model, tokenizer, source, n_windows, seq_len)
    else:
        windows = token_windows(tokenizer, read_documents(source), n_windows, seq_len, allow_fewer=True)
    return text_anchors(model, windows)


def text_anchor_source(spec: str | None, corpus: str | None) -> str | None:
    """Where text anchors come from: ``spec`` itself, nothing for ``none`` or '', or for ``cache`` the
    curvature cache's capability corpus when that is a text file (not ``self``, whose text protects less and
    costs minutes of sampling, nor a mixture)."""
    if not spec or spec == "none":
        return None
    if spec != "cache":
        return spec
    return corpus if corpus and Path(corpus).is_file() else None


def load_anchors(model: nn.Module, tokenizer, path: str | Path) -> Anchors:
    """The base model's predictions on an ANCHORS.jsonl file, each pair raw and framed as a question."""
    return base_anchors(model, tokenizer, with_question_forms(read_anchor_pairs(path)))


def anchor_kl(model: nn.Module, anchors: Anchors, rows: torch.Tensor) -> torch.Tensor:
    """Mean over the anchored positions of ``rows`` of KL(p_base ‖ p_edited) over the top-k tokens + the tail."""
    mask = anchors.attention_mask[rows]
    length = int(mask.sum(dim=1).max())  # drop padding columns that no row of this minibatch needs
    logits = model(input_ids=anchors.input_ids[rows, :length], attention_mask=mask[:, :length]).logits[:, :-1]
    logq = torch.log_softmax(logits.float(), -1).gather(-1, anchors.top_ids[rows, : length - 1])
    logp = anchors.top_logp[rows, : length - 1]
    kl = (logp.exp() * (logp - logq)).sum(-1) + tail_kl(logp, logq)
    anchored = anchors.anchored[rows, : length - 1]
    return (kl * anchored).sum() / anchored.sum().clamp_min(1)


def tail_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """The tail outcome's term p_tail (log p_tail − log q_tail), where p_tail = 1 − Σ_top-k p."""
    p_tail = (1 - logp.exp().sum(-1)).clamp_min(0)
    q_tail = (1 - logq.exp().sum(-1)).clamp_min(1e-12)
    return p_tail * (torch.log(p_tail.clamp_min(1e-12)) - torch.log(q_tail))
