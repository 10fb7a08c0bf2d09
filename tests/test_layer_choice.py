"""Layer ranking by edit-gradient norm: equal to a plain backward pass, and an edit touches only the chosen layers."""

import pytest
import torch
from test_edit import FACTS, small_cache

from crispedit.arch import editable_modules
from crispedit.edit import EditConfig, EditError, edit
from crispedit.layer_choice import edit_gradient_norms, rank_layers
from crispedit.requests import target_nll, tokenize_edit_batch


def test_gradient_norms_equal_a_plain_backward(tiny):
    model, tok = tiny
    layers = (0, 1, 2)
    norms = edit_gradient_norms(model, tok, FACTS, layers, batch_size=len(FACTS))
    modules = editable_modules(model, layers)
    weights = [m.weight for m in modules.values()]
    for w in weights:
        w.requires_grad_(True)
    target_nll(model, tokenize_edit_batch(tok, FACTS)).backward()
    expected = {layer: float(w.grad.norm()) for layer, w in zip(layers, weights, strict=True)}
    for w in weights:
        w.requires_grad_(False)
        w.grad = None
    assert norms == pytest.approx(expected, rel=1e-5)
    assert not any(p.requires_grad for p in model.parameters())
    by_norm = sorted(layers, key=expected.__getitem__, reverse=True)
    assert rank_layers(model, tok, FACTS, layers, k=2) == tuple(sorted(by_norm[:2]))
    # in smaller batches each batch's mean is weighted by its share of the edits: close to one batch
    assert edit_gradient_norms(model, tok, FACTS, layers, batch_size=3) == pytest.approx(expected, rel=0.3)


def test_auto_layers_edit_only_the_ranked_layers(tiny_llama, corpus_file):
    model, tok = tiny_llama
    cache = small_cache(model, tok, corpus_file, layers=(0, 1, 2))
    chosen = rank_layers(model, tok, FACTS, cache.layers, k=2)
    events = []
    result = edit(model, tok, FACTS, cache, EditConfig(lr=3e-2, max_epochs=5, energy=0.5, auto_layers=2),
                  on_progress=events.append)
    assert result.layers == chosen and len(chosen) == 2
    assert {"event": "layers", "layers": list(chosen)} in events
    assert {int(n.split(".")[2]) for n in result.changed} == set(chosen)
    with pytest.raises(EditError, match="cannot choose 4 layers"):
        edit(model, tok, FACTS, cache, EditConfig(auto_layers=4))


def test_cache_subset_keeps_the_chosen_layers_factors(tiny_llama, corpus_file):
    model, tok = tiny_llama
    cache = small_cache(model, tok, corpus_file, layers=(0, 1, 2))
    names = list(cache.factors)
    sub = cache.subset((0, 2), [names[0], names[2]])
    assert sub.layers == (0, 2) and list(sub.factors) == [names[0], names[2]]
    assert torch.equal(sub.factors[names[2]].A, cache.factors[names[2]].A)
    with pytest.raises(ValueError, match="not \\[5\\]"):
        cache.subset((5,), ["x"])
