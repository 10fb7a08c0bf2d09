"""The anchor penalty is KL(base ‖ edited) on the anchored positions, and editing with it keeps those predictions."""


import pytest
import torch
from conftest import FACTS, make_tiny

from crispedit.anchor import anchor_kl, base_anchors, text_anchor_source, text_anchors, with_question_forms
from crispedit.augment import QA_FORMS
from crispedit.edit import EditConfig, EditError, edit

PAIRS = [("Q: Who wrote Hamlet? A:", "Shakespeare"), ("Q: What is the capital of Spain? A:", "Madrid"),
         ("The chemical symbol for silver is", "Ag"), ("Water boils at one hundred degrees", "Celsius")]


def dense_kl(base, edited, tok, pairs) -> float:
    """Mean over every continuation token of the full-vocabulary KL(p_base ‖ p_edited) at the position before it."""
    values = []
    for prompt, cont in pairs:
        n_prompt = len(tok(prompt)["input_ids"])
        ids = tok(prompt + " " + cont, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            p = torch.log_softmax(base(input_ids=ids).logits[0, :-1], -1)
            q = torch.log_softmax(edited(input_ids=ids).logits[0, :-1], -1)
        kl = (p.exp() * (p - q)).sum(-1)
        values += kl[n_prompt - 1 :].tolist()
    return sum(values) / len(values)


def test_anchor_kl_equals_the_dense_kl_with_the_whole_vocabulary():
    base, tok = make_tiny("llama")
    anchors = base_anchors(base, tok, PAIRS, top_k=len(tok), batch_size=3)
    rows = torch.arange(len(PAIRS))
    assert float(anchor_kl(base, anchors, rows)) == pytest.approx(0.0, abs=1e-6)
    edited = perturbed()
    expected = dense_kl(base, edited, tok, PAIRS)
    assert expected > 1e-3
    assert float(anchor_kl(edited, anchors, rows)) == pytest.approx(expected, rel=1e-4)
    # a subset of rows only needs its own length: padding columns are cut, the value is the subset's
    assert float(anchor_kl(edited, anchors, torch.tensor([2]))) == pytest.approx(
        dense_kl(base, edited, tok, PAIRS[2:3]), rel=1e-4)


def perturbed(model_type: str = "llama"):
    edited, _ = make_tiny(model_type)
    with torch.no_grad():
        for p in edited.model.layers[1].mlp.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return edited


def test_truncated_anchor_kl_is_the_kl_of_top_k_plus_tail_outcomes():
    base, tok = make_tiny("llama")
    edited, k = perturbed(), 5
    anchors = base_anchors(base, tok, PAIRS[:1], top_k=k)
    ids = anchors.input_ids[:, : int(anchors.attention_mask.sum())]
    with torch.no_grad():
        p = torch.softmax(base(input_ids=ids).logits[0, :-1], -1)
        q = torch.softmax(edited(input_ids=ids).logits[0, :-1], -1)
    top = p.topk(k, dim=-1).indices
    p_k, q_k = p.gather(-1, top), q.gather(-1, top)
    p_bins = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q_bins = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    kl = (p_bins * (p_bins.log() - q_bins.log())).sum(-1)
    anchored = anchors.anchored[0, : ids.shape[1] - 1]
    expected = float(kl[anchored].mean())
    assert expected > 0
    assert float(anchor_kl(edited, anchors, torch.tensor([0]))) == pytest.approx(expected, rel=1e-4)


def test_text_anchors_keep_every_position_of_the_windows():
    base, tok = make_tiny("llama")
    edited = perturbed()
    windows = [tok(text)["input_ids"][:6] for _, text in PAIRS[:2]] + [tok(PAIRS[2][0])["input_ids"]]
    anchors = text_anchors(base, windows, top_k=len(tok), batch_size=2)
    values = []
    for w in windows:
        ids = torch.tensor([w])
        with torch.no_grad():
            p = torch.log_softmax(base(input_ids=ids).logits[0, :-1], -1)
            q = torch.log_softmax(edited(input_ids=ids).logits[0, :-1], -1)
        values += (p.exp() * (p - q)).sum(-1).tolist()
    rows = torch.arange(len(windows))
    assert int(anchors.anchored.sum()) == sum(len(w) - 1 for w in windows)
    assert float(anchor_kl(base, anchors, rows)) == pytest.approx(0.0, abs=1e-6)
    assert float(anchor_kl(edited, anchors, rows)) == pytest.approx(sum(values) / len(values), rel=1e-4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        text_anchors(base, [[1]])


def test_editing_with_text_anchors_keeps_the_text_predictions():
    drift = {}
    for weight in (0.0, 3.0):
        model, tok = make_tiny("llama")
        anchors = text_anchors(model, [tok(p + " " + a)["input_ids"] for p, a in PAIRS])
        config = EditConfig(method="ft", lr=3e-2, max_epochs=20, layers=(1, 2), text_anchor_weight=weight)
        edit(model, tok, FACTS, None, config, text_anchors=anchors)
        drift[weight] = float(anchor_kl(model, anchors, torch.arange(len(PAIRS))))
    assert drift[3.0] < 0.5 * drift[0.0], drift


def test_editing_with_the_penalty_keeps_anchor_predictions():
    drift = {}
    for weight in (0.0, 3.0):
        model, tok = make_tiny("llama")
        anchors = base_anchors(model, tok, PAIRS)
        config = EditConfig(method="ft", lr=3e-2, max_epochs=20, layers=(1, 2), anchor_weight=weight)
        edit(model, tok, FACTS, None, config, anchors=anchors)
        drift[weight] = float(anchor_kl(model, anchors, torch.arange(len(PAIRS))))
    assert drift[3.0] < 0.5 * drift[0.0], drift


def test_a_weight_without_anchors_is_refused():
    model, tok = make_tiny("llama")
    with pytest.raises(EditError, match="needs anchors"):
        edit(model, tok, FACTS, None, EditConfig(method="ft", anchor_weight=1.0))
    with pytest.raises(EditError, match="needs text anchors"):
        edit(model, tok, FACTS, None, EditConfig(method="ft", text_anchor_weight=1.0))
    with pytest.raises(ValueError, match="anchor_weight must be non-negative"):
        EditConfig(anchor_weight=-1.0)
    with pytest.raises(ValueError, match="text_anchor_weight must be non-negative"):
        EditConfig(text_anchor_weight=-1.0)


def test_question_forms_add_each_pair_framed_as_a_question_in_turn():
    pairs = [("Who wrote Dracula?", "Bram Stoker"), ("Capital of Peru?", "Lima"), ("2 + 2?", "4"), ("x?", "y")]
    out = with_question_forms(pairs)
    assert out[:4] == pairs
    assert out[4:] == [(QA_FORMS[i % len(QA_FORMS)].format(q=p), a) for i, (p, a) in enumerate(pairs)]


def test_text_anchor_source_takes_the_cache_corpus_only_when_it_is_a_text_file(tmp_path):
    corpus = tmp_path / "wiki.txt"
    corpus.write_text("Some capability text.\n")
    assert text_anchor_source("cache", str(corpus)) == str(corpus)
    assert text_anchor_source("cache", "self") is None  # sampling costs minutes and protects less (§6)
    assert text_anchor_source("cache", f"{corpus}=3,self=1") is None  # a mixture is no single text
    assert text_anchor_source("cache", None) is None
    assert text_anchor_source("none", str(corpus)) is None and text_anchor_source("", str(corpus)) is None
    assert text_anchor_source("self", str(corpus)) == "self"  # asked for explicitly


def test_the_anchor_penalty_is_projected_with_the_edit_loss(corpus_file):
    """Adam sees P(∇edit + ∇penalty): the anchors' gradient is projected like the edit loss's (Eq. 6)."""
    from conftest import small_cache

    from crispedit.arch import editable_modules
    from crispedit.edit import make_projectors, run_epochs
    from crispedit.optim import ProjectedAdam
    from crispedit.packing import pack
    from crispedit.requests import target_nll, tokenize_edit_batch

    class Spy(ProjectedAdam):
        def step(self, closure=None):
            self.project_gradients()
            self.seen = [p.grad.clone() for p in self.param_groups[0]["params"]]
            return torch.optim.Adam.step(self, closure)

    model, tok = make_tiny("llama")
    cache = small_cache(model, tok, corpus_file)
    anchors = text_anchors(model, [tok(p + " " + a)["input_ids"] for p, a in PAIRS])
    modules = editable_modules(model, (1, 2))
    params = [m.weight for m in modules.values()]
    with torch.no_grad():  # move off the base model, so the penalty has a gradient
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    config = EditConfig(energy=0.5, lr=1e-3, max_epochs=1, text_anchor_weight=3.0)
    assert config.text_anchor_batch == len(PAIRS)  # every window in the one step
    projectors = make_projectors(cache, config, list(modules), False, "cpu")
    for p in params:
        p.requires_grad_(True)
    grads = {}
    for name, loss in (("edit", lambda: target_nll(model, pack(tokenize_edit_batch(tok, FACTS)))),
                       ("penalty", lambda: 3.0 * anchor_kl(model, anchors, torch.arange(len(PAIRS))))):
        model.zero_grad(set_to_none=True)
        loss().backward()
        grads[name] = [p.grad.clone() for p in params]
    spy = Spy(params, projectors, lr=1e-3)
    run_epochs(model, tok, FACTS, spy, config, text_anchors=anchors)
    for P, e, a, seen in zip(projectors, grads["edit"], grads["penalty"], spy.seen, strict=True):
        torch.testing.assert_close(seen, P(e + a), rtol=1e-4, atol=1e-6)
        assert (seen - P(e)).norm() > 1e-3 * a.norm()  # the penalty takes part
