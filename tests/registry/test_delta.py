"""Low-rank changes as blobs: exact to rounding, chained to their parents, kept by gc, capped in depth."""

import pytest
import torch
from safetensors.torch import save

import registry.store
from registry import BlobError, Registry, RegistryError, gc, verify
from registry.delta import low_rank_change, rebuild

NAME = "model.layers.1.mlp.down_proj.weight"


def rank_r_change(W: torch.Tensor, r: int, seed: int, scale: float = 1e-3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(W.shape[0], r, generator=g), torch.randn(r, W.shape[1], generator=g)
    return (W.double() + scale * U.double() @ V.double()).to(W.dtype)  # the edit's sum, rounded once as ΔW* is


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_low_rank_change_rebuilds_the_new_weight_to_its_rounding(dtype):
    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    new = rank_r_change(W, 3, seed=1, scale=0.1 if dtype == torch.bfloat16 else 1e-3)  # bf16 rounds 1e-3 away
    U, V = low_rank_change(W, new)
    assert U.shape == (64, 3) and V.shape == (3, 96)
    err = (rebuild(W, U, V).double() - new.double()).abs().max()
    assert err <= 2 * torch.finfo(dtype).eps * new.abs().max().double()
    assert rebuild(W, U, V).dtype == dtype


def test_full_rank_or_tiny_changes_are_not_factored():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 96, generator=g)
    assert low_rank_change(W, W + 1e-3 * torch.randn(64, 96, generator=g)) is None  # Adam's steps: full rank
    assert low_rank_change(W, W.clone()) is None  # nothing changed
    assert low_rank_change(W[0], W[0] + 1) is None  # not a matrix
    assert low_rank_change(torch.ones(4, 3), torch.full((4, 3), 2.0)) is None  # rank 1 of 4 × 3: not smaller


def chain(tmp_path, n: int) -> tuple[Registry, list[torch.Tensor]]:
    reg = Registry(tmp_path / "reg")
    reg.create_model("tiny", base="/nowhere", fingerprint="fp")
    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    values = [W]
    for k in range(n):
        values.append(rank_r_change(values[-1], 2, seed=k + 1))
        reg.commit("tiny", f"v{k}", {NAME: values[-1]}, originals={NAME: W})
    return reg, values


def test_a_small_edit_is_stored_as_its_change_from_the_parent(tmp_path):
    reg, values = chain(tmp_path, 3)
    base = reg.model_info("tiny")["base_tensors"][NAME]
    digests = [reg.get("tiny", f"v{k}").tensors[NAME] for k in (1, 2, 3)]
    assert [reg.blobs.parent(d) for d in digests] == [base, *digests[:2]]
    assert [reg.blobs.depth(d) for d in digests] == [1, 2, 3]
    whole = reg.blobs.path(base).stat().st_size
    assert all(reg.blobs.path(d).stat().st_size < whole / 10 for d in digests)  # 2 (64 + 96) of 64 · 96 numbers
    for k, value in enumerate(values[1:], start=1):
        assert torch.allclose(reg.tensors("tiny", f"v{k}")[NAME], value, rtol=0, atol=1e-6)
    assert verify(reg) == []


def test_a_corrupt_parent_is_reported_for_every_version_built_on_it(tmp_path):
    reg, _ = chain(tmp_path, 2)
    v1 = reg.get("tiny", "v1").tensors[NAME]
    path = reg.blobs.path(v1)
    path.write_bytes(path.read_bytes()[:-4] + b"oops")
    problems = verify(reg)
    assert len(problems) == 2 and all(v1 in p for p in problems)  # v1's own blob, and v2's parent
    path.write_bytes(b"\0" * 8)  # now even its header is unreadable
    with pytest.raises(RegistryError, match="gc stopped"):  # its parent is unknown: nothing may be freed
        gc(reg, grace_seconds=0)


def test_a_blob_that_is_neither_tensor_nor_change_is_refused(tmp_path):
    reg, _ = chain(tmp_path, 1)
    odd = reg.blobs._write(save({"X": torch.ones(2)}))  # its bytes match its hash, yet it is not ours
    assert "neither a tensor nor a change" in reg.blobs.check(odd)
    with pytest.raises(BlobError, match="neither"):
        reg.blobs.get(odd)


def test_gc_keeps_the_parents_of_kept_changes(tmp_path):
    reg, values = chain(tmp_path, 4)
    reg.prune("tiny", keep_last=1)  # v1..v3 lose their weights; v4's change is built on v3's, on v2's, …
    assert gc(reg, grace_seconds=0)["removed"] == 0
    assert torch.allclose(reg.tensors("tiny", "v4")[NAME], values[4], rtol=0, atol=1e-6)
    assert verify(reg) == []


def test_a_long_chain_is_cut_by_a_whole_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(registry.store, "MAX_CHAIN", 2)
    reg, values = chain(tmp_path, 4)
    depths = [reg.blobs.depth(reg.get("tiny", f"v{k}").tensors[NAME]) for k in (1, 2, 3, 4)]
    assert depths == [1, 2, 0, 1]
    assert torch.allclose(reg.tensors("tiny", "v4")[NAME], values[4], rtol=0, atol=1e-6)
