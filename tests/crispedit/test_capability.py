"""Capability metrics on the tiny random models, checked against direct computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from crispedit.capability import (
    heldout_texts,
    mean_kl,
    mean_kls,
    perplexity,
    perplexity_change,
    swapped_weights,
    text_nlls,
)

TEXTS = [
    "The capital of France is Paris.",
    "Water boils at one hundred degrees Celsius at sea level, said the teacher.",
    "Q: Who wrote Hamlet? A: Shakespeare.",
]

WEIGHT = "model.layers.1.mlp.down_proj.weight"


def test_perplexity_matches_hf_loss(tiny):
    model, tok = tiny
    ids = tok(TEXTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert perplexity(model, tok, TEXTS[1:2]) == pytest.approx(math.exp(loss), rel=1e-5)


def test_text_nlls_are_each_texts_summed_loss(tiny_llama):
    model, tok = tiny_llama
    terms = text_nlls(model, tok, TEXTS, batch_size=2)
    with torch.no_grad():
        for text, (nll, count) in zip(TEXTS, terms, strict=True):
            ids = tok(text, return_tensors="pt")["input_ids"]
            assert count == ids.shape[1] - 1
            assert nll == pytest.approx(model(input_ids=ids, labels=ids).loss.item() * count, rel=1e-5)


def test_perplexity_change_is_the_ratio_with_a_paired_standard_error(tiny_llama):
    model, tok = tiny_llama
    base = text_nlls(model, tok, TEXTS)
    edited_weight = dict(model.named_parameters())[WEIGHT].detach() * 1.5
    with swapped_weights(model, {WEIGHT: edited_weight}):
        edited = text_nlls(model, tok, TEXTS)
        ppl_edited = perplexity(model, tok, TEXTS)
    change, se = perplexity_change(base, edited)
    assert change == pytest.approx(100 * (ppl_edited / perplexity(model, tok, TEXTS) - 1), rel=1e-6)
    # by hand: D = Σd / ΣN, SE(D) = sqrt(n var(d)) / ΣN, SE = 100 exp(D) SE(D)
    d = [e - b for (b, _), (e, _) in zip(base, edited, strict=True)]
    count, mean = sum(c for _, c in base), sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    assert se == pytest.approx(100 * math.exp(sum(d) / count) * math.sqrt(len(d) * var) / count, rel=1e-6)
    assert perplexity_change(base, base) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same texts"):
        perplexity_change(base, edited[:2])


def test_perplexity_does_not_depend_on_padding(tiny_llama):
    model, tok = tiny_llama
    one = perplexity(model, tok, TEXTS, batch_size=1)
    assert perplexity(model, tok, TEXTS, batch_size=3) == pytest.approx(one, rel=1e-5)
    assert perplexity(model, tok, TEXTS, max_length=8) != pytest.approx(one, rel=1e-3)


def test_swapped_weights_restores_exactly(tiny_llama):
    model, _ = tiny_llama
    param = dict(model.named_parameters())[WEIGHT]
    before = param.detach().clone()
    new = torch.randn_like(before)
    with swapped_weights(model, {WEIGHT: new}):
        assert torch.equal(param, new)
    assert torch.equal(param, before)
    with pytest.raises(RuntimeError, match="boom"), swapped_weights(model, {WEIGHT: new}):
        raise RuntimeError("boom")
    assert torch.equal(param, before)
    with pytest.raises(KeyError), swapped_weights(model, {"no.such.weight": new}):
        pass


def test_mean_kl_zero_positive_and_by_hand(tiny):
    model, tok = tiny
    name = next(n for n, p in model.named_parameters() if p.ndim == 2 and ".1." in n)
    base = {name: dict(model.named_parameters())[name].detach().clone()}
    edited = {name: base[name] + 10 * torch.randn_like(base[name])}
    assert mean_kl(model, tok, TEXTS, base, base, batch_size=2) == pytest.approx(0.0, abs=1e-6)
    kl = mean_kl(model, tok, TEXTS[:1], base, edited)
    assert kl > 0
    assert torch.equal(dict(model.named_parameters())[name], base[name])  # model left as it was

    other = copy.deepcopy(model)
    with torch.no_grad():
        dict(other.named_parameters())[name].copy_(edited[name])
        ids = tok(TEXTS[0], return_tensors="pt")["input_ids"]
        p = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        q = torch.log_softmax(other(input_ids=ids).logits[0, :-1], -1)
    by_hand = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl == pytest.approx(by_hand, rel=1e-4)
    assert mean_kl(model, tok, TEXTS, base, edited, batch_size=3) == pytest.approx(
        mean_kl(model, tok, TEXTS, base, edited, batch_size=1), rel=1e-3
    )


def test_mean_kls_is_mean_kl_against_each_reference(tiny_llama):
    """One edited forward for several references gives each reference's own KL."""
    model, tok = tiny_llama
    torch.manual_seed(0)
    name = WEIGHT
    weight = dict(model.named_parameters())[name].detach().clone()
    first, second = ({name: weight + s * torch.randn_like(weight)} for s in (1.0, 3.0))
    edited = {name: weight + 2 * torch.randn_like(weight)}
    both = mean_kls(model, tok, TEXTS, [first, second], edited, batch_size=2)
    assert both == pytest.approx([mean_kl(model, tok, TEXTS, ref, edited, batch_size=2) for ref in (first, second)],
                                 rel=1e-6)
    assert both[0] != pytest.approx(both[1], rel=1e-3)
    with pytest.raises(ValueError, match="different tensors"):
        mean_kls(model, tok, TEXTS, [first, {}], edited)


def test_heldout_texts(tmp_path):
    lines = [" = Title = ", "", " short line ", " = = Section = = "]
    lines += [f" para {i} " + "x" * 50 for i in range(10)]
    path = tmp_path / "wiki.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    picked = heldout_texts(path, 4, min_chars=40, seed=1)
    assert len(picked) == 4 and all(t.startswith("para ") for t in picked)
    assert picked == heldout_texts(path, 4, min_chars=40, seed=1)
    assert heldout_texts(path, 10, min_chars=40) == [f"para {i} " + "x" * 50 for i in range(10)]
    with pytest.raises(ValueError):
        heldout_texts(path, 11, min_chars=40)
