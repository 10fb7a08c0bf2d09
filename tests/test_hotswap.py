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
        return subprocess.run([sys.executable, "-m", "crispedit.cli", "registry", *args, "--root", str(reg.root),
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
