"""Sequential-editing state per version (paper Alg. 2): the capability cache plus every earlier edit's share.

A version stores its own edit's statistics per module in the smaller of two exact forms: the per-token K-FAC
features (a, g), whose size grows with the edit's tokens (one request's edit), or the factors (A, S) with their
token count, whose size is fixed by the layer (a large batch). The state an edit on top of version v must respect
is the capability cache folded with the contributions along v's curvature chain (which follows rollbacks and
reverts), so editing after a rollback continues from the rolled-back state, not the head's.
"""

from __future__ import annotations

import logging

from crispedit.cache import CurvatureCache
from crispedit.edit import EditResult
from crispedit.kfac import KFACFactors, factors_from_features
from registry.store import Registry

log = logging.getLogger(__name__)


def contribution(result: EditResult) -> dict[str, dict]:
    """What a commit stores for an edit's curvature, per module: its token features, else its factors."""
    if result.features is not None:
        return {name: {"a": a, "g": g, "tokens": int(a.shape[0])} for name, (a, g) in result.features.items()}
    return {name: {"A": f.A, "S": f.S, "tokens": f.num_tokens} for name, f in (result.own_factors or {}).items()}


def stored_factors(registry: Registry, parts: dict) -> KFACFactors:
    """One module's stored contribution as factors, from either form."""
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
