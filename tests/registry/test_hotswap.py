"""Hot swap gives exactly each version's logits, also under concurrent readers; export round-trips."""

import random
import threading

import pytest
import torch
from conftest import make_tiny

from crispedit.models import load_model, model_fingerprint
from registry import HotSwapModel, Registry, export_version

NAMES = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]


@pytest.fixture
def store(tmp_path):
    base_dir = tmp_path / "base"
    model, tok = make_tiny("llama")
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    reg = Registry(tmp_path / "reg")
    reg.create_model("tiny", base=str(base_dir), fingerprint=model_fingerprint(model))
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    expected = {"v0": {}}
    head = "v0"
    for names in ([NAMES[0]], NAMES, [NAMES[1]]):
        new = {n: params[n] + 0.5 * torch.randn(params[n].shape, generator=g) for n in names}
        head = reg.commit("tiny", head, new, originals={n: params[n].detach() for n in names}).id
        expected[head] = {**expected[list(expected)[-1]], **new}
    return reg, base_dir, tok, expected


def reference_logits(base_dir, tensors, ids):
    model, _ = load_model(str(base_dir), device="cpu")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
        return model(input_ids=ids).logits


def test_hot_swap_matches_freshly_built_versions_under_concurrent_readers(store):
    reg, base_dir, tok, expected = store
    ids = tok(["The capital of France is Paris."], return_tensors="pt")["input_ids"]
    references = {v: reference_logits(base_dir, t, ids) for v, t in expected.items()}
    assert not torch.allclose(references["v1"], references["v0"])
    model, _ = load_model(str(base_dir), device="cpu")
    holder = HotSwapModel(model, reg, "tiny", capacity=2)  # smaller than the version count: LRU evicts
    for v in ("v2", "v1", "v3", "v0", "v2"):
        with holder.use(v) as m, torch.no_grad():
            torch.testing.assert_close(m(input_ids=ids).logits, references[v], rtol=0, atol=0)

    errors = []

    def reader(seed):
        rng = random.Random(seed)
        for _ in range(25):
            v = rng.choice(list(expected))
            with holder.use(v) as m, torch.no_grad():
                if not torch.equal(m(input_ids=ids).logits, references[v]):
                    errors.append(v)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []


def test_export_round_trip_has_identical_logits(store, tmp_path):
    from transformers import AutoModelForCausalLM

    reg, base_dir, tok, expected = store
    out = export_version(reg, "tiny", "v2", tmp_path / "export")
    ids = tok(["Water boils at one hundred degrees."], return_tensors="pt")["input_ids"]
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, reference_logits(base_dir, expected["v2"], ids),
                                   rtol=0, atol=0)


def test_registry_cli(store, tmp_path):
    import json
    import subprocess
    import sys

    reg, base_dir, tok, expected = store

    def run(*args):
        return subprocess.run([sys.executable, "-m", "cli.main", "registry", *args, "--root", str(reg.root),
                               "--model", "tiny"], capture_output=True, text=True, timeout=120)

    log = run("log")
    assert log.returncode == 0 and log.stdout.splitlines()[0].split()[:3] == ["v3", "<-", "v2"]
    assert "[latest]" in log.stdout.splitlines()[0]
    assert json.loads(run("diff", "v2", "--to", "v3").stdout).keys() == {"model.layers.2.mlp.down_proj.weight"}
    assert json.loads(run("alias", "v2", "--alias", "production").stdout) == {"production": "v2"}
    assert json.loads(run("rollback", "v1").stdout)["aliases"] == {"latest": "v1", "production": "v1"}
    assert run("verify").stdout.startswith("ok")
    bad = run("show", "v9")
    assert bad.returncode == 2 and "version v9 of 'tiny' not found" in bad.stderr
    digest = reg.get("tiny", "v2").tensors["model.layers.1.mlp.down_proj.weight"]
    reg.blobs.path(digest).unlink()
    broken = run("verify")
    assert broken.returncode == 1 and "missing" in broken.stdout


def test_rollback_then_edit_continues_from_the_rolled_back_state(tmp_path):
    """Engine + registry: v1, v2 edited sequentially; roll back to v1; the next edit sees v1's state only."""
    from conftest import CORPUS

    from crispedit.cache import build_cache
    from crispedit.edit import EditConfig, edit
    from crispedit.requests import EditRequest
    from registry.curvature import contribution, version_cache

    model, tok = make_tiny("llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 3))
    capability = build_cache(model, tok, (1, 2), str(corpus), n_samples=6, seq_len=16, progress=False)
    reg = Registry(tmp_path / "reg")
    reg.create_model("tiny", base="unused", fingerprint=model_fingerprint(model))
    holder = HotSwapModel(model, reg, "tiny")
    batches = {"v1": [EditRequest("The capital of France is", "Rome")],
               "v2": [EditRequest("Hamlet was written by", "Madrid")],
               "v3": [EditRequest("The chemical symbol for gold is", "Ag")]}

    def edit_on(parent, requests):
        holder.switch_to(parent)
        state = version_cache(reg, "tiny", parent, capability)
        result = edit(model, tok, requests, state, EditConfig(lr=3e-2, max_epochs=5, sequential_chunk=len(requests)))
        with torch.no_grad():  # the holder owns the weights: put the parent back, then commit
            params = dict(model.named_parameters())
            for n, t in result.original.items():
                params[n].copy_(t)
        version = reg.commit("tiny", parent, result.changed, originals=result.original,
                             curvature=contribution(result), edits=[r.to_dict() for r in requests])
        return version, result

    v1, r1 = edit_on("v0", batches["v1"])
    v2, _ = edit_on("v1", batches["v2"])
    reg.rollback("tiny", "v1")
    state = version_cache(reg, "tiny", "latest", capability)
    assert state.num_tokens == capability.num_tokens + r1.features[next(iter(r1.features))][0].shape[0]
    for name, f in state.factors.items():
        torch.testing.assert_close(f.A, r1.cache.factors[name].A, atol=1e-6, rtol=1e-5)
    v3, r3 = edit_on("v1", batches["v3"])
    assert (v3.id, v3.parent) == ("v3", "v1")
    assert len(reg.curvature_chain("tiny", "v3")) == 2  # v1's and v3's contributions, not v2's
    # a worker's memo of v3's state: the walk stops there instead of folding v1's and v3's blobs again
    assert version_cache(reg, "tiny", "v3", capability, known=("v3", r3.cache)) is r3.cache
    assert version_cache(reg, "tiny", "v3", capability, known=("v2", r1.cache)).num_tokens == r3.cache.num_tokens

    # a batch larger than its factors is stored as the factors' lower triangles, and folds back the same
    big = [EditRequest(f"Fact number {i} is", f"value {i}") for i in range(12)]
    v4, r4 = edit_on("v3", big)
    parts = next(iter(v4.curvature["layers"].values()))
    assert r4.features is None and set(parts) == {"A_tril", "S_tril", "tokens"}
    d_in = next(iter(r4.own_factors.values())).A.shape[0]
    assert reg.blobs.get(parts["A_tril"]).numel() == d_in * (d_in + 1) // 2
    for name, f in version_cache(reg, "tiny", "v4", capability).factors.items():
        torch.testing.assert_close(f.A, r4.cache.factors[name].A, atol=1e-6, rtol=1e-5)

    # an upgrade that edits other layers: the rebuilt cache cannot fold v1's and v3's contributions
    other = build_cache(model, tok, (0,), str(corpus), n_samples=6, seq_len=16, progress=False)
    assert version_cache(reg, "tiny", "v3", other).num_tokens == other.num_tokens


def test_a_factor_is_stored_as_its_lower_triangle_and_read_back_whole():
    """Float64: the triangle holds (M + Mᵀ)/2, the matrix eigh_psd decomposes, exactly; reading it back gives that
    matrix, symmetric, to the bit."""
    from registry.curvature import lower_triangle, symmetric

    a = torch.randn(50, 7, dtype=torch.float64)
    M = a.T @ a / 50
    triangle = lower_triangle(M)
    assert triangle.shape == (7 * 8 // 2,)
    back = symmetric(triangle)
    assert torch.equal(back, back.T) and torch.equal(back, (M + M.T) / 2)
    assert torch.equal(symmetric(lower_triangle(torch.ones(1, 1))), torch.ones(1, 1))
