"""The registry: compare-and-set commits, aliases, rollback/revert, diff, integrity, crash consistency."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from registry import BlobError, Conflict, Gone, Registry, RegistryError, gc, verify

NAME = "model.layers.1.mlp.down_proj.weight"
OTHER = "model.layers.2.mlp.down_proj.weight"


def new_registry(tmp_path) -> Registry:
    reg = Registry(tmp_path / "reg")
    reg.create_model("tiny", base="/nowhere", fingerprint="fp")
    return reg


def commit(reg, parent, value: float, name=NAME, **kw):
    return reg.commit("tiny", parent, {name: torch.full((4, 3), value)}, originals={name: torch.ones(4, 3)}, **kw)


def test_commit_is_compare_and_set(tmp_path):
    reg = new_registry(tmp_path)
    v1 = commit(reg, "v0", 1.0, message="first", author="ann")
    assert (v1.id, v1.parent, reg.resolve("tiny", "latest")) == ("v1", "v0", "v1")
    with pytest.raises(Conflict, match="head is v1, not v0"):
        commit(reg, "v0", 2.0)
    v2 = commit(reg, "v1", 2.0, name=OTHER)
    assert set(v2.tensors) == {NAME, OTHER}  # a version maps every tensor that differs from the base
    assert torch.equal(reg.tensors("tiny", "v2")[NAME], torch.full((4, 3), 1.0))
    assert [v.id for v in reg.lineage("tiny")] == ["v2", "v1", "v0"]
    assert reg.get("tiny", "v1").message == "first"


def test_aliases_rollback_revert_diff(tmp_path):
    reg = new_registry(tmp_path)
    commit(reg, "v0", 1.0)
    commit(reg, "v1", 3.0)
    reg.set_alias("tiny", "production", "v2")
    with pytest.raises(Conflict, match="moved"):
        reg.set_alias("tiny", "production", "v1", expected="v1")
    assert reg.rollback("tiny", "v1") == "v1"
    assert reg.aliases("tiny") == {"latest": "v1", "production": "v1"}
    assert [v.id for v in reg.versions("tiny")] == ["v0", "v1", "v2"]  # history untouched
    v3 = commit(reg, "v1", 5.0)  # editing after a rollback continues from the rolled-back version
    assert v3.parent == "v1" and v3.curvature["parent"] == "v1"
    rev = reg.revert("tiny", "v0")
    assert rev.id == "v4" and rev.tensors == {} and rev.parent == "v3"
    assert reg.diff("tiny", "v0", "v1") == {NAME: pytest.approx(0.0)}  # v1 = 1.0 everywhere, like the base
    assert reg.diff("tiny", "v1", "v2") == {NAME: pytest.approx(2.0)}  # ‖3 − 1‖ / ‖1‖
    assert reg.diff("tiny", "v4", "v0") == {}


def test_curvature_chain_follows_rollback_and_revert(tmp_path):
    reg = new_registry(tmp_path)
    for parent, value in (("v0", 1.0), ("v1", 2.0), ("v2", 3.0)):
        commit(reg, parent, value, curvature={"m": {"a": torch.full((2, 3), value), "tokens": 2}})
    chain = reg.curvature_chain("tiny", "v3")
    assert [reg.blobs.get(c["m"]["a"])[0, 0].item() for c in chain] == [1.0, 2.0, 3.0]
    reg.rollback("tiny", "v1")
    v4 = commit(reg, "v1", 9.0, curvature={"m": {"a": torch.full((2, 3), 9.0), "tokens": 2}})
    assert [reg.blobs.get(c["m"]["a"])[0, 0].item() for c in reg.curvature_chain("tiny", v4.id)] == [1.0, 9.0]
    rev = reg.revert("tiny", "v2")
    assert [reg.blobs.get(c["m"]["a"])[0, 0].item() for c in reg.curvature_chain("tiny", rev.id)] == [1.0, 2.0]


def test_edits_in_force_follow_rollback_and_revert(tmp_path):
    reg = new_registry(tmp_path)
    for parent, value in (("v0", 1.0), ("v1", 2.0), ("v2", 3.0)):
        commit(reg, parent, value, edits=[{"prompt": f"p{value:g}", "target": "t"}])

    def prompts(ref: str, limit: int = 10) -> list[str]:
        return [e["prompt"] for e in reg.edits_in_force("tiny", ref, limit)]

    assert prompts("v3") == ["p1", "p2", "p3"]  # oldest first
    assert prompts("v3", 2) == ["p2", "p3"] and prompts("v3", 0) == []  # the newest, as many as asked
    reg.rollback("tiny", "v1")
    commit(reg, "v1", 9.0, edits=[{"prompt": "p9", "target": "t"}])
    assert prompts("v4") == ["p1", "p9"]  # v2 and v3 were rolled back: not in v4's weights
    rev = reg.revert("tiny", "v2")
    assert prompts(rev.id) == ["p1", "p2"]


def test_names_are_validated(tmp_path):
    reg = Registry(tmp_path / "reg")
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(RegistryError, match="invalid model name"):
            reg.create_model(bad, base="b", fingerprint="f")
    reg = new_registry(tmp_path)
    with pytest.raises(RegistryError, match="invalid alias name"):
        reg.set_alias("tiny", "../../latest", "v0")
    with pytest.raises(RegistryError, match="v<N>"):
        reg.set_alias("tiny", "v7", "v0")


def test_corrupt_and_missing_blobs_give_clear_errors(tmp_path):
    reg = new_registry(tmp_path)
    v1 = commit(reg, "v0", 1.0)
    digest = v1.tensors[NAME]
    path = reg.blobs.path(digest)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BlobError, match="corrupt"):
        reg.tensors("tiny", "v1")
    assert any("corrupt" in p for p in verify(reg))
    path.unlink()
    with pytest.raises(BlobError, match="missing"):
        reg.tensors("tiny", "v1")
    assert any("missing" in p for p in verify(reg))


def test_gc_removes_only_unreferenced_blobs(tmp_path):
    reg = new_registry(tmp_path)
    commit(reg, "v0", 1.0)
    stray = reg.blobs.put(torch.ones(2))
    assert gc(reg, grace_seconds=3600)["removed"] == 0  # too young: could be an in-flight commit
    result = gc(reg, grace_seconds=0)
    assert result["removed"] == 1 and not reg.blobs.path(stray).exists()
    assert verify(reg) == []


def test_retention_prunes_weights_keeps_records_and_says_what_was_kept(tmp_path):
    reg = new_registry(tmp_path)
    for i in range(1, 11):
        commit(reg, f"v{i - 1}", 10.0 + i, curvature={"m": {"a": torch.full((2, 3), float(i)), "tokens": 2}})
    reg.set_alias("tiny", "production", "v3")
    size = sum(reg.blobs.path(d).stat().st_size for d in reg.blobs.digests())
    assert reg.prune("tiny", keep_last=3, keep_every=4) == ["v1", "v2", "v5", "v6", "v7"]
    assert reg.prune("tiny", keep_last=3, keep_every=4) == []  # already pruned
    kept = ["v0", "v3", "v4", "v8", "v9", "v10"]
    assert [v.id for v in reg.versions("tiny") if not v.pruned] == kept
    with pytest.raises(Gone, match="v5 was pruned .* Kept: v0, v3, v4, v8, v9, v10") as gone:
        reg.tensors("tiny", "v5")
    assert gone.value.kept == kept
    for refuse in (lambda: reg.set_alias("tiny", "x", "v5"), lambda: reg.rollback("tiny", "v6"),
                   lambda: reg.revert("tiny", "v7"), lambda: reg.diff("tiny", "v4", "v5")):
        with pytest.raises(Gone):
            refuse()
    assert reg.get("tiny", "v5").pruned["policy"] == {"keep_last": 3, "keep_every": 4}  # the record stays
    # every later version's curvature still folds the pruned versions' contributions in
    assert [reg.blobs.get(c["m"]["a"])[0, 0].item() for c in reg.curvature_chain("tiny", "v10")] == list(
        map(float, range(1, 11)))
    freed = gc(reg, grace_seconds=0)
    assert freed["removed"] == 5 and freed["bytes_freed"] < size
    assert torch.equal(reg.tensors("tiny", "v4")[NAME], torch.full((4, 3), 14.0)) and verify(reg) == []
    with pytest.raises(RegistryError, match="keep_last must be at least 1"):
        reg.prune("tiny", keep_last=0)


def test_a_reused_blob_is_touched_so_gc_grace_covers_it(tmp_path):
    reg = new_registry(tmp_path)
    digest = reg.blobs.put(torch.ones(3))
    old = reg.blobs.path(digest).stat().st_mtime - 7200
    os.utime(reg.blobs.path(digest), (old, old))
    assert reg.blobs.put(torch.ones(3)) == digest  # a commit reusing it, before its manifest is written
    assert gc(reg, grace_seconds=3600)["removed"] == 0


WORKER = textwrap.dedent("""
    import sys, torch
    from registry import Conflict, Registry
    reg, me, n = Registry(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    name = "model.layers.1.mlp.down_proj.weight"
    done = 0
    while done < n:
        head = reg.resolve("tiny", "latest")
        try:
            reg.commit("tiny", head, {name: torch.randn(4, 3)}, originals={name: torch.zeros(4, 3)},
                       job_id=f"{me}-{done}")
            done += 1
        except Conflict:
            pass
""")


def test_concurrent_commits_from_processes_give_a_linear_history(tmp_path):
    reg = new_registry(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(reg.root), f"p{i}", "5"]) for i in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    versions = reg.versions("tiny")
    assert [v.id for v in versions] == [f"v{i}" for i in range(21)]
    assert all(v.parent == f"v{i}" for i, v in enumerate(versions[1:]))  # linear
    jobs = sorted(v.job_id for v in versions[1:])
    assert jobs == sorted(f"p{i}-{j}" for i in range(4) for j in range(5))  # none lost, none doubled
    assert reg.find_job("tiny", "p2-3") is not None
    assert verify(reg) == []


CRASH = textwrap.dedent("""
    import os, signal, sys, torch
    import registry.store as store
    from registry import Registry
    reg, point = Registry(sys.argv[1]), sys.argv[2]
    original_write = store.write_atomic
    def write(path, data):
        kind = path.parent.name
        if (point == "before-manifest" and kind == "versions") or (point == "before-alias" and kind == "aliases"):
            os.kill(os.getpid(), signal.SIGKILL)
        original_write(path, data)
    store.write_atomic = write
    name = "model.layers.1.mlp.down_proj.weight"
    reg.commit("tiny", "v1", {name: torch.randn(4, 3)}, originals={name: torch.zeros(4, 3)})
""")


@pytest.mark.parametrize("point", ["before-manifest", "before-alias"])
def test_killed_commit_leaves_a_consistent_store(tmp_path, point):
    reg = new_registry(tmp_path)
    commit(reg, "v0", 1.0)
    proc = subprocess.run([sys.executable, "-c", CRASH, str(reg.root), point], timeout=120)
    assert proc.returncode == -9
    assert verify(reg) == []
    assert reg.resolve("tiny", "latest") == "v1"  # no ref moved to a half-written version
    # killed before its manifest: the job left only unreferenced blobs, which gc may collect; killed after it:
    # a complete version that no alias points at (a retried job finds it by job id instead of editing again)
    nxt = commit(reg, "v1", 2.0)
    assert (nxt.id, nxt.parent) == ("v2" if point == "before-manifest" else "v3", "v1")
    assert verify(reg) == []
    leftovers = [p.name for p in (reg.root / "models" / "tiny").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_crash_while_creating_a_model_leaves_no_half_made_model(tmp_path):
    reg = new_registry(tmp_path)
    (reg.model_dir("tiny") / "model.json").unlink()  # as if killed after v0, before model.json
    assert "tiny" not in reg.models()
    assert reg.create_model("tiny", "/nowhere", "fp").id == "v0"  # the next start simply registers it again
    assert reg.models() == ["tiny"] and reg.resolve("tiny", "latest") == "v0"
