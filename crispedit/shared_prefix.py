"""Generation that reads a batch's common beginning once: a chat template's system prompt, few-shot examples.

Rows are laid out as ``[common prefix][left padding][the rest]``: the prefix's key-value cache is computed for one
row and repeated for every row, padding is masked, and positions count from each row's first real token as
``generate`` counts them, so every row sees what it would alone. A prefix that every row shares is most of a short
chat query (SmolLM2's default system prompt) and of a few-shot prompt, and reading it costs a forward pass per
token per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import StoppingCriteriaList


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the rows' longest common beginning, leaving every row at least one token of its own: generation
    starts from a row's last token."""
    shortest = min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


@torch.no_grad()
def generate_rows(
    model: nn.Module, rows: Sequence[Sequence[int]], pad_token_id: int, copies: int = 1,
    stopping: Callable[[int], StoppingCriteriaList | None] | None = None, **options,
) -> tuple[torch.Tensor, int]:
    """``model.generate`` over token ``rows``, each ``copies`` times (row-major), their common prefix read once.

    Returns the generated ids (rows × copies, prompt width + new tokens) and the prompt width; ``stopping``, a
    function of that width, gives the stopping criteria."""
    device = next(model.parameters()).device
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
    ids, mask = ids.repeat_interleave(copies, 0).to(device), mask.repeat_interleave(copies, 0).to(device)
    cache = None
    if shared:
        cache = model(input_ids=ids[:1, :shared], use_cache=True, logits_to_keep=1).cache
        cache.batch_repeat_interleave(ids.shape[0])
    out = model.generate(input_ids=ids, attention_mask=mask, cache=cache, pad_token_id=pad_token_id,
                         stopping_criteria=stopping(width) if stopping else None, **options)
    return out, width
