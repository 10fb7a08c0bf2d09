"""Batch (Alg. 1) and sequential (Alg. 2) edits on tiny models really change the target's probability."""

import pytest
import torch
from conftest import CORPUS, FACTS, small_cache, target_logprob

from crispedit.cache import build_cache
from crispedit.edit import EditConfig, EditError, edit, epoch_bar
from crispedit.requests import EditRequest, target_nll


@pytest.mark.parametrize("method", ["crispedit", "nullspace", "ft"])
def test_batch_edit_raises_target_probability(tiny, corpus_file, method):
    model, tok = tiny
    cache = small_cache(model, tok, corpus_file)
    before = target_logprob(model, tok, FACTS)
    all_before = {n: p.clone() for n, p in model.named_parameters()}
    result = edit(model, tok, FACTS, cache, EditConfig(method=method, lr=3e-2, max_epochs=30, energy=0.5))
    after = target_logprob(model, tok, FACTS)
    assert after > before + 1.0, (before, after)
    assert result.steps > 0 and len(result.epoch_losses) >= 1
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    # only the editable weights changed, and `changed` says exactly which
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, all_before[n])}
    assert moved == set(result.changed) and moved
    assert all(".mlp." in n for n in moved)
    for n, t in result.changed.items():
        torch.testing.assert_close(dict(model.named_parameters())[n], t)
        torch.testing.assert_close(result.original[n], all_before[n])
    assert not any(p.requires_grad for p in model.parameters())


def test_sequential_edit_folds_each_chunk(tiny_llama, corpus_file):
    model, tok = tiny_llama
    cache = small_cache(model, tok, corpus_file)
    events = []
    before = target_logprob(model, tok, FACTS)
    result = edit(model, tok, FACTS, cache, EditConfig(lr=3e-2, max_epochs=30, energy=0.5, sequential_chunk=2),
                  on_progress=events.append)
    assert target_logprob(model, tok, FACTS) > before + 1.0
    folds = [e for e in events if e["event"] == "fold"]
    assert [e["chunk"] for e in folds] == [0, 1]
    assert result.cache is not None and result.cache.num_tokens > cache.num_tokens
    assert result.cache.meta["edit_folds"] == 2
    assert {e["chunk"] for e in events if e["event"] == "epoch"} == {0, 1}
    # the edit's own statistics rebuild the folded state exactly (what a registry version stores)
    from crispedit.kfac import merge_factors

    for name, own in result.own_factors.items():
        assert own.num_tokens == result.cache.num_tokens - cache.num_tokens
        rebuilt = merge_factors([cache.factors[name], own])
        torch.testing.assert_close(rebuilt.A, result.cache.factors[name].A, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rebuilt.S, result.cache.factors[name].S, atol=1e-9, rtol=1e-4)


def test_chat_form_trains_both_forms_in_the_same_chunk(tiny_llama, corpus_file):
    model, tok = tiny_llama
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    events = []
    config = EditConfig(lr=3e-2, max_epochs=2, energy=0.5, chat_form=True, sequential_chunk=len(FACTS))
    result = edit(model, tok, FACTS, small_cache(model, tok, corpus_file), config, on_progress=events.append)
    assert [e["chunk"] for e in events if e["event"] == "fold"] == [0]  # one chunk, not one per form
    edit_tokens = result.cache.num_tokens - small_cache(model, tok, corpus_file).num_tokens
    plain = sum(len(tok(f.spaced_target)["input_ids"]) for f in FACTS)
    assert edit_tokens > plain  # the chat forms' tokens are folded too


def test_epoch_bar_counts_the_epochs(tiny_llama, corpus_file, capsys):
    model, tok = tiny_llama
    config = EditConfig(lr=3e-2, max_epochs=3, energy=0.5)
    with epoch_bar(config, len(FACTS), desc="tiny edit") as report:
        result = edit(model, tok, FACTS, small_cache(model, tok, corpus_file), config, on_progress=report)
    shown = capsys.readouterr().err
    assert f"tiny edit: {100 * len(result.epoch_losses) // 3}%" in shown and "loss=" in shown


def test_gpt2_conv1d_edit(tiny_gpt2, corpus_file):
    model, tok = tiny_gpt2
    cache = small_cache(model, tok, corpus_file)
    before = target_logprob(model, tok, FACTS)
    result = edit(model, tok, FACTS, cache, EditConfig(lr=3e-2, max_epochs=30, energy=0.5))
    assert target_logprob(model, tok, FACTS) > before + 1.0
    assert all(n.endswith("mlp.c_proj.weight") for n in result.changed)


def test_projected_method_without_cache_is_refused(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(EditError, match="curvature cache"):
        edit(model, tok, FACTS, None, EditConfig(method="crispedit"))


def test_bad_input_is_refused_and_model_untouched(tiny_llama, corpus_file, monkeypatch):
    model, tok = tiny_llama
    cache = small_cache(model, tok, corpus_file)
    snapshot = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="target"):
        EditRequest("The capital of France is", "  ")
    with pytest.raises(EditError, match="no edit requests"):
        edit(model, tok, [], cache)
    with pytest.raises(ValueError, match="method"):
        EditConfig(method="rome")
    # a loss that turns NaN after a few real steps: the error names it and the weights are restored
    import importlib

    edit_module = importlib.import_module("crispedit.edit")  # the package re-exports a function named `edit`

    calls = []

    def nan_after_three(model_, batch):
        calls.append(1)
        loss = target_nll(model_, batch)
        return loss * float("nan") if len(calls) > 3 else loss

    monkeypatch.setattr(edit_module, "target_nll", nan_after_three)
    monkeypatch.setattr(edit_module, "EARLY_STOP", 0.0)
    with pytest.raises(EditError, match="became nan"):
        edit(model, tok, FACTS, cache, EditConfig(lr=1e-2, max_epochs=5))
    assert len(calls) == 4
    for n, p in model.named_parameters():
        assert torch.equal(p, snapshot[n]), n


def test_cache_mismatch_is_refused(tiny_llama, corpus_file, tmp_path):
    from conftest import make_tiny

    from crispedit.cache import CurvatureCache

    model, tok = tiny_llama
    path = small_cache(model, tok, corpus_file).save(tmp_path / "c.safetensors")
    loaded = CurvatureCache.load(path, model=model, layers=(1, 2))
    assert loaded.layers == (1, 2) and loaded.meta["fisher"] == "empirical" and loaded.meta["samples"] == 6
    other, _ = make_tiny("llama", seed=1)
    with pytest.raises(ValueError, match="another model"):
        CurvatureCache.load(path, model=other)
    with pytest.raises(ValueError, match="layers"):
        CurvatureCache.load(path, model=model, layers=(0, 1))
    with pytest.raises(ValueError, match="corpus too small"):
        build_cache(model, tok, (1,), str(corpus_file), n_samples=10_000, seq_len=16, progress=False)


def test_self_and_jsonl_corpora(tiny_llama, tmp_path):
    import json

    model, tok = tiny_llama
    cache = build_cache(model, tok, (1,), "self", n_samples=3, seq_len=12, progress=False)
    assert cache.num_tokens == 3 * 11 and cache.meta["corpus"] == "self"
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS))
    assert build_cache(model, tok, (1,), str(path), n_samples=2, seq_len=16, progress=False).num_tokens == 2 * 15
    path.write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="'text'"):
        build_cache(model, tok, (1,), str(path), n_samples=1, seq_len=8, progress=False)


def test_ekfac_cache_edits(tiny_llama, corpus_file, tmp_path):
    from crispedit.cache import CurvatureCache

    model, tok = tiny_llama
    cache = small_cache(model, tok, corpus_file, ekfac=True)
    assert set(cache.ekfac) == set(cache.factors)
    loaded = CurvatureCache.load(cache.save(tmp_path / "e.safetensors"), model=model)
    assert loaded.ekfac is not None
    before = target_logprob(model, tok, FACTS)
    edit(model, tok, FACTS, loaded, EditConfig(lr=3e-2, max_epochs=30, energy=0.5))
    assert target_logprob(model, tok, FACTS) > before + 1.0


def test_default_lr_keeps_the_step_relative_to_the_weights(tiny_llama, corpus_file):
    """2e-3 at SmolLM2's weight RMS (0.1863), 12× less on weights 12× smaller; an edit reports the lr it used."""
    from crispedit.edit import REFERENCE_LR, REFERENCE_RMS, default_lr

    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 96, generator=g), torch.randn(64, 96, generator=g)]
    rms = float(torch.cat([w.flatten() for w in weights]).pow(2).mean().sqrt())
    smol = [w * REFERENCE_RMS / rms for w in weights]
    assert default_lr(smol) == REFERENCE_LR
    assert default_lr([w / 12 for w in smol]) == pytest.approx(REFERENCE_LR / 12, rel=0.03)
    with pytest.raises(ValueError, match="lr"):
        EditConfig(lr=0.0)

    model, tok = tiny_llama
    cache = small_cache(model, tok, corpus_file)
    result = edit(model, tok, FACTS[:2], cache, EditConfig(max_epochs=1))
    assert result.original and result.lr == default_lr(list(result.original.values()))
    assert result.lr != REFERENCE_LR  # the tiny model's weights are larger than SmolLM2's
    assert edit(model, tok, FACTS[:2], cache, EditConfig(lr=1e-3, max_epochs=1)).lr == 1e-3


def test_default_energy_is_measured_per_checkpoint(tiny_llama, corpus_file):
    """γ defaults to 0.8, except on checkpoints measured otherwise (Gemma 3 270M, where 0.8 drifts like FT)."""
    from types import SimpleNamespace

    from crispedit.arch import RECIPES, Recipe, default_energy

    gemma = SimpleNamespace(config=SimpleNamespace(model_type="gemma3_text", num_hidden_layers=18, hidden_size=640))
    assert default_energy(gemma) == RECIPES[("gemma3_text", 18, 640)].energy > Recipe().energy
    model, tok = tiny_llama
    assert default_energy(model) == Recipe().energy == 0.8
    result = edit(model, tok, FACTS[:2], small_cache(model, tok, corpus_file), EditConfig(max_epochs=1))
    assert result.energy == Recipe().energy
    with pytest.raises(ValueError, match="energy"):
        EditConfig(energy=1.5)
