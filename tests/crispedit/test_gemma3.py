"""The second architecture end to end: the bundled Gemma 3 270M (base) takes two facts of our own."""


import pytest
from conftest import FIXTURES

from crispedit import EditConfig, build_cache, edit, edit_quality, load_model, read_edits_jsonl
from crispedit.arch import default_layers, editable_modules

pytestmark = pytest.mark.slow


def test_edit_two_facts_on_gemma3():
    try:
        model, tok = load_model("gemma3-270m")
    except FileNotFoundError as err:
        pytest.fail(f"Gemma 3 270M must be installed for this test (scripts/setup.sh does): {err}")
    assert model.config.model_type == "gemma3_text"
    layers = default_layers(model)
    assert all(name.endswith("mlp.down_proj") for name in editable_modules(model, layers))
    facts = read_edits_jsonl(FIXTURES / "facts.jsonl")[:2]
    cache = build_cache(model, tok, layers, str(FIXTURES / "corpus.txt"), n_samples=4, seq_len=64, progress=False)
    before = edit_quality(model, tok, facts, generated=False)["rel_tf"]
    result = edit(model, tok, facts, cache, EditConfig(lr=3e-3, batch_size=2, max_epochs=40))
    after = edit_quality(model, tok, facts, generated=False)["rel_tf"]
    assert before < 0.5 and after == 1.0, (before, after)
    assert set(result.changed) == {f"model.layers.{i}.mlp.down_proj.weight" for i in layers}
