"""The worker's retention step after a commit: prune what the policy does not keep, free what nothing references."""

import os
import time
from types import SimpleNamespace

import torch

from registry import Registry
from worker.tasks import PRUNE_GC_GRACE, retain


def test_retention_after_a_commit_prunes_and_frees_old_blobs(tmp_path):
    reg = Registry(tmp_path)
    reg.create_model("m", base="/nowhere", fingerprint="fp")
    name = "w"
    g = torch.Generator().manual_seed(0)
    for k in range(1, 6):  # full-rank changes, each stored whole (a low-rank one would be chained to its parent)
        reg.commit("m", f"v{k - 1}", {name: torch.full((8, 8), float(k)) + 0.1 * torch.randn(8, 8, generator=g)},
                   originals={name: torch.zeros(8, 8)})
    old = time.time() - 2 * PRUNE_GC_GRACE  # committed long ago, so past the grace of a concurrent commit
    for digest in reg.blobs.digests():
        os.utime(reg.blobs.path(digest), (old, old))
    rt = SimpleNamespace(registry=reg, name="m", settings=SimpleNamespace(keep_last=2, keep_every=2))
    retain(rt)
    assert [v.id for v in reg.versions("m") if not v.pruned] == ["v0", "v2", "v4", "v5"]
    stored = {round(float(reg.blobs.get(d).mean())) for d in reg.blobs.digests()}
    assert stored == {0, 2, 4, 5}  # v1's and v3's weights are gone from disk
