"""Sequential-editing state per version (paper Alg. 2): the capability cache plus every earlier edit's share.

A version stores only its own edit's per-token K-FAC features (a, g) per module, a cost that grows with
the number of edit tokens, not with d². The state an edit on top of version v must respect is the
capability cache folded with the contributions along v's curvature chain (which follows rollbacks and
reverts), so editing after a rollback continues from the rolled-back state, not the head's.
"""

from __future__ import annotations

import logging

import torch

from crispedit.cache import CurvatureCache
from crispedit.kfac import factors_from_features
from registry.store import Registry

log = logging.getLogger(__name__)


def contribution(features: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict]:
    """What a commit stores for an edit's curvature: per module, its stacked token features."""
    return {name: {"a": a, "g": g, "tokens": int(a.shape[0])} for name, (a, g) in features.items()}


def version_cache(registry: Registry, model: str, ref: str, capability: CurvatureCache) -> CurvatureCache:
    """The curvature state to edit on top of ``ref``: ``capability`` folded with ``ref``'s chain, oldest first."""
    cache = capability
    for layers in registry.curvature_chain(model, ref):
        if set(layers) != set(capability.factors):  # recorded before an upgrade changed the editable layers
            log.warning("%s@%s: skipping an earlier edit's curvature on %s; the cache covers %s", model, ref,
                        sorted(layers), sorted(capability.factors))
            continue
        cache = cache.folded({
            name: factors_from_features(registry.blobs.get(parts["a"]), registry.blobs.get(parts["g"]))
            for name, parts in layers.items()
        })
    return cache
