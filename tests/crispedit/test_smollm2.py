"""End to end on the real SmolLM2-135M-Instruct: edit three facts of our own and check them."""


import pytest
import torch
from conftest import FIXTURES

from crispedit import CurvatureCache, EditConfig, build_cache, edit, edit_quality, load_model, read_edits_jsonl
from crispedit.arch import default_layers
from crispedit.evaluate import generate_answers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_model("smollm2")
    except FileNotFoundError as err:
        pytest.fail(f"the bundled model must be installed for this test: {err}")


def test_edit_three_facts_on_smollm2(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    facts = read_edits_jsonl(FIXTURES / "facts.jsonl")
    layers = default_layers(model)
    assert layers == (4, 5, 6, 7, 8)  # measured for SmolLM2, BENCHMARKS.md §13
    cache = build_cache(model, tok, layers, str(FIXTURES / "corpus.txt"), n_samples=4, seq_len=64, progress=False)
    path = cache.save(tmp_path / "cache.safetensors")
    cache = CurvatureCache.load(path, model=model, layers=layers)
    before = edit_quality(model, tok, facts, generated=False)
    assert before["rel_tf"] < 0.5
    assert generate_answers(model, tok, ["The capital of France is"]) == ["Paris"]

    result = edit(model, tok, facts, cache, EditConfig(lr=3e-3, batch_size=3, max_epochs=40))
    after = edit_quality(model, tok, facts, generated=False)
    assert after["rel_tf"] == 1.0, after
    answers = generate_answers(model, tok, [f.prompt for f in facts])
    assert all(f.target in a for f, a in zip(facts, answers, strict=True)), answers
    # an unrelated fact survives the edit
    assert generate_answers(model, tok, ["The capital of France is"]) == ["Paris"]
    assert set(result.changed) == {f"model.layers.{i}.mlp.down_proj.weight" for i in layers}

    # the edited model saves as a standard checkpoint with identical logits
    model.save_pretrained(tmp_path / "edited")
    tok.save_pretrained(tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited").eval()
    ids = tok([facts[0].prompt], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, model(**ids).logits)
    assert reloaded.get_input_embeddings().weight.shape == model.get_input_embeddings().weight.shape

    with torch.no_grad():  # leave the shared fixture as it was loaded
        params = dict(model.named_parameters())
        for name, t in result.original.items():
            params[name].copy_(t)


def test_registry_export_round_trip_on_smollm2(smollm2, tmp_path):
    """A committed SmolLM2 version exports to a checkpoint whose logits equal the hot-swapped model's."""
    from transformers import AutoModelForCausalLM

    from crispedit.models import model_fingerprint
    from registry import HotSwapModel, Registry, export_version

    model, tok = smollm2
    reg = Registry(tmp_path / "reg")
    reg.create_model("smol", "smollm2", model_fingerprint(model))
    params = dict(model.named_parameters())
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in (12, 16)]
    new = {n: params[n].detach() + 1e-2 * torch.randn(params[n].shape) for n in names}
    reg.commit("smol", "v0", new, originals={n: params[n].detach().clone() for n in names})
    out = export_version(reg, "smol", "v1", tmp_path / "v1")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok(["The capital of France is"], return_tensors="pt")
    holder = HotSwapModel(model, reg, "smol")
    with torch.no_grad():
        with holder.use("v1") as m:
            swapped = m(**ids).logits
        torch.testing.assert_close(exported(**ids).logits, swapped, rtol=0, atol=0)
        with holder.use("v0") as m:
            assert not torch.equal(m(**ids).logits, swapped)
    holder.switch_to("v0")  # leave the shared fixture as loaded
