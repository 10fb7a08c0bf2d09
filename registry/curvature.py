"""Sequential-editing state per version (paper Alg. 2): the capability cache plus every earlier edit's share.

A version stores its own edit's statistics per module in the smaller of two exact forms: the per-token K-FAC
features (a, g), whose size grows with the edit's tokens (one request's edit), or the factors (A, S) with their
token count, whose size is fixed by the layer (a large batch). A factor is symmetric, so only its lower triangle is
stored: n(n+1)/2 numbers instead of n², which halves a large batch's share of the disk.

The state an edit on top of version v must respect is the capability cache folded with the contributions along
v's curvature chain (which follows rollbacks and reverts), so editing after a rollback continues from the
rolled-back state, not the head's.
"""

from __future__ import annotations

import logging
import math

import torch

from crispedit.cache import CurvatureCache
from crispedit.edit import EditResult
from crispedit.kfac import KFACFactors, factors_from_features
from registry.store import Registry

log = logging.getLogger(__name__)


def lower_triangle(matrix: torch.Tensor) -> torch.Tensor:
    """The lower triangle of (M + Mᵀ)/2, row by row: the matrix that eigen.eigh_psd decomposes, in n(n+1)/2 numbers."""
    rows, cols = torch.tril_indices(*matrix.shape)
    return ((matrix + matrix.T) / 2)[rows, cols].contiguous()


def symmetric(triangle: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose :func:`lower_triangle` is ``triangle``."""
    n = (math.isqrt(8 * triangle.numel() + 1) - 1) // 2
    rows, cols = torch.tril_indices(n, n)
    matrix = triangle.new_zeros(n, n)
    matrix[rows, cols] = triangle
    matrix[cols, rows] = triangle
    return matrix


def contribution(result: EditResult) -> dict[str, dict]:
    """What a commit stores for an edit's curvature, per module: its token features, or its factors' lower triangles
    where those take fewer bytes."""
    own = result.own_factors or {}
    if result.features is not None:
        feature_bytes = sum((a.numel() + g.numel()) * a.element_size() for a, g in result.features.values())
        if feature_bytes <= sum(triangle_bytes(f.A) + triangle_bytes(f.S) for f in own.values()):
            return {name: {"a": a, "g": g, "tokens": int(a.shape[0])} for name, (a, g) in result.features.items()}
    return {name: {"A_tril": lower_triangle(f.A), "S_tril": lower_triangle(f.S), "tokens": f.num_tokens}
            for name, f in own.items()}


def triangle_bytes(matrix: torch.Tensor) -> int:
    n = matrix.shape[0]
    return n * (n + 1) // 2 * matrix.element_size()


def stored_factors(registry: Registry, parts: dict) -> KFACFactors:
    """One module's stored contribution as factors, from any form (whole factors: versions stored before triangles)."""
    if "A_tril" in parts:
        return KFACFactors(symmetric(registry.blobs.get(parts["A_tril"])),
                           symmetric(registry.blobs.get(parts["S_tril"])), int(parts["tokens"]))
    if "A" in parts:
        return KFACFactors(registry.blobs.get(parts["A"]), registry.blobs.get(parts["S"]), int(parts["tokens"]))
    return factors_from_features(registry.blobs.get(parts["a"]), registry.blobs.get(parts["g"]))


def version_cache(
    registry: Registry, model: str, ref: str, capability: CurvatureCache,
    known: tuple[str, CurvatureCache] | None = None,
) -> CurvatureCache:
    """The curvature state to edit on top of ``ref``: ``capability`` folded with ``ref``'s chain, oldest first.

    ``known`` = (a version, its state), as a worker keeps after each commit: the walk back from ``ref`` stops
    there, so editing on top of the head costs O(1) folds instead of one per earlier version.
    """
    cache, chain = capability, []
    for version in registry.curvature_walk(model, ref):
        if known is not None and version.id == known[0]:
            cache = known[1]
            break
        if version.curvature.get("layers"):
            chain.append(version.curvature["layers"])
    for layers in reversed(chain):
        if set(layers) != set(capability.factors):  # recorded before an upgrade changed the editable layers
            log.warning("%s@%s: skipping an earlier edit's curvature on %s; the cache covers %s", model, ref,
                        sorted(layers), sorted(capability.factors))
            continue
        cache = cache.folded({name: stored_factors(registry, parts) for name, parts in layers.items()})
    return cache
