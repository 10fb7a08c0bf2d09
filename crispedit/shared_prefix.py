"""Generation that reads a batch's common beginning once: a chat template's system prompt, few-shot examples.

Rows are laid out as ``[common prefix][left padding][the rest]``: the prefix's key-value cache is computed for one
row and repeated for every row, padding is masked, and positions count from each row's first real token as
``generate`` counts them, so every row sees what it would alone. A prefix that every row shares is most of a short
chat query (SmolLM2's default system prompt) and of a few-shot prompt, and reading it costs a forward pass per
token per row. A row drawn several times (sampled copies) likewise reads its own tokens once: its cache is copied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the rows' longest common beginning, leaving every row at least one token of its own: generation
    starts from a row's last token."""
    shortest = min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


class GreedyRows(LogitsProcessor):
    """In a sampled generation, leaves the flagged rows their most likely token alone: they decode greedily
    (temperature and top-p keep a lone candidate) beside rows that sample."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows  # bool per row of the batch

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        best = scores.argmax(-1, keepdim=True)
        lone = torch.full_like(scores, float("-inf")).scatter_(-1, best, scores.gather(-1, best))
        return torch.where(self.rows[:, None], lone, scores)


@torch.no_grad()
def generate_rows(
    model: nn.Module, rows: Sequence[Sequence[int]], pad_token_id: int, copies: int | Sequence[int] = 1,
    stopping: Callable[[int], StoppingCriteriaList | None] | None = None, greedy: Sequence[bool] | None = None,
    **options,
) -> tuple[torch.Tensor, int]:
    """``model.generate`` over token ``rows``, row i ``copies[i]`` times (row-major), their common prefix read once
    and each row's own tokens once for all its copies. With ``greedy`` (a flag per row, in a sampled generation),
    the flagged rows decode greedily (:class:`GreedyRows`).

    Returns the generated ids (one row per copy, prompt width + new tokens) and the prompt width; ``stopping``, a
    function of that width, gives the stopping criteria."""
    device = next(model.parameters()).device
    counts = [copies] * len(rows) if isinstance(copies, int) else list(copies)
    shared = common_prefix(rows)
    rest = [list(r[shared:]) for r in rows]
    width = shared + max(len(r) for r in rest)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    ids[:, :shared] = torch.tensor(rows[0][:shared], dtype=torch.long)
    mask[:, :shared] = 1
    for i, r in enumerate(rest):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    cache = None
    if shared:
        cache = model(input_ids=ids[:1, :shared], use_cache=True, logits_to_keep=1).cache
        cache.batch_repeat_interleave(len(rows))
    if max(counts) > 1 and width - 1 > shared:  # each row's own tokens but its last, read once for its copies
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # counted from each row's first real token, as generate does
        cache = model(input_ids=ids[:, shared : width - 1], attention_mask=mask[:, : width - 1],
                      position_ids=positions[:, shared : width - 1], cache=cache, use_cache=True,
                      logits_to_keep=1).cache
    copy_of = torch.repeat_interleave(torch.arange(len(rows), device=device), torch.tensor(counts, device=device))
    ids, mask = ids[copy_of], mask[copy_of]
    if cache is not None:
        cache.batch_select_indices(copy_of)
    if greedy is not None and any(greedy):
        options["logits_processor"] = LogitsProcessorList([GreedyRows(torch.tensor(greedy, device=device)[copy_of])])
    out = model.generate(input_ids=ids, attention_mask=mask, cache=cache, pad_token_id=pad_token_id,
                         stopping_criteria=stopping(width) if stopping else None, **options)
    return out, width
