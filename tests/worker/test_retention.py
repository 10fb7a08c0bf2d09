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
    for k in range(1, 6):
        reg.commit("m", f"v{k - 1}", {name: torch.full((8, 8), float(k))}, originals={name: torch.zeros(8, 8)})
    old = time.time() - 2 * PRUNE_GC_GRACE  # committed long ago, so past the grace of a concurrent commit
    for digest in reg.blobs.digests():
        os.utime(reg.blobs.path(digest), (old, old))
    rt = SimpleNamespace(registry=reg, name="m", settings=SimpleNamespace(keep_last=2, keep_every=2))
    retain(rt)
    assert [v.id for v in reg.versions("m") if not v.pruned] == ["v0", "v2", "v4", "v5"]
    stored = {float(reg.blobs.get(d)[0, 0]) for d in reg.blobs.digests()}
    assert stored == {0.0, 2.0, 4.0, 5.0}  # v1's and v3's weights are gone from disk
