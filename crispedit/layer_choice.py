"""Which layers to edit: rank candidate layers by how strongly the edit loss pulls on their weight.

The paper edits a fixed block of middle layers. The cheap alternative ranked here: the Frobenius norm of
∇_W L_edit (Eq. 1) for each candidate layer's editable weight, on the edit batch itself, from one
backward pass; the ``k`` largest are edited. CrispEdit then needs curvature for those layers, so the
candidates are the layers of the curvature cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from crispedit.arch import editable_modules
from crispedit.requests import EditRequest, target_nll, tokenize_edit_batch


def edit_gradient_norms(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], layers: Sequence[int], batch_size: int = 32
) -> dict[int, float]:
    """‖∇_W L_edit‖_F of each layer's editable weight, the edit loss averaged over the batches of ``requests``."""
    modules = editable_modules(model, tuple(layers))
    weights = [m.weight for m in modules.values()]
    device = weights[0].device
    batches = [list(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]
    for p in weights:
        p.requires_grad_(True)
    try:
        grads = [torch.zeros_like(p) for p in weights]
        for chunk in batches:
            loss = target_nll(model, tokenize_edit_batch(tokenizer, chunk, device)) * len(chunk) / len(requests)
            for total, g in zip(grads, torch.autograd.grad(loss, weights), strict=True):
                total += g
        squares = torch.stack([g.double().pow(2).sum() for g in grads])
    finally:
        for p in weights:
            p.requires_grad_(False)
    return {int(layer): float(s.sqrt()) for layer, s in zip(layers, squares, strict=True)}


def rank_layers(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], candidates: Sequence[int], k: int
) -> tuple[int, ...]:
    """The ``k`` candidate layers with the largest edit-gradient norm, in layer order."""
    if not 1 <= k <= len(candidates):
        raise ValueError(f"cannot choose {k} layers among {len(candidates)} candidates {list(candidates)}")
    norms = edit_gradient_norms(model, tokenizer, requests, candidates)
    return tuple(sorted(sorted(norms, key=norms.__getitem__, reverse=True)[:k]))
