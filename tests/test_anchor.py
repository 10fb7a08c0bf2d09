"""The anchor penalty is KL(base ‖ edited) on the anchored positions, and editing with it keeps those predictions."""

import pytest
import torch
from conftest import make_tiny
from test_edit import FACTS

from crispedit.anchor import anchor_kl, base_anchors, with_question_forms
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
    edited, _ = make_tiny("llama")
    anchors = base_anchors(base, tok, PAIRS, top_k=len(tok), batch_size=3)
    rows = torch.arange(len(PAIRS))
    assert float(anchor_kl(base, anchors, rows)) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in edited.model.layers[1].mlp.parameters():
            p.add_(0.3 * torch.randn_like(p))
    expected = dense_kl(base, edited, tok, PAIRS)
    assert expected > 1e-3
    assert float(anchor_kl(edited, anchors, rows)) == pytest.approx(expected, rel=1e-4)
    # a subset of rows only needs its own length: padding columns are cut, the value is the subset's
    assert float(anchor_kl(edited, anchors, torch.tensor([2]))) == pytest.approx(
        dense_kl(base, edited, tok, PAIRS[2:3]), rel=1e-4)


def test_editing_with_the_penalty_keeps_anchor_predictions():
    drift = {}
    for weight in (0.0, 3.0):
        model, tok = make_tiny("llama")
        anchors = base_anchors(model, tok, PAIRS)
        config = EditConfig(method="ft", lr=3e-2, max_epochs=20, layers=(1, 2), anchor_weight=weight, anchor_batch=4)
        edit(model, tok, FACTS, None, config, anchors=anchors)
        drift[weight] = float(anchor_kl(model, anchors, torch.arange(len(PAIRS))))
    assert drift[3.0] < 0.5 * drift[0.0], drift


def test_a_weight_without_anchors_is_refused():
    model, tok = make_tiny("llama")
    with pytest.raises(EditError, match="needs anchors"):
        edit(model, tok, FACTS, None, EditConfig(method="ft", anchor_weight=1.0))
    with pytest.raises(ValueError, match="anchor_weight must be non-negative"):
        EditConfig(anchor_weight=-1.0)


def test_question_forms_add_each_pair_framed_as_a_question_in_turn():
    pairs = [("Who wrote Dracula?", "Bram Stoker"), ("Capital of Peru?", "Lima"), ("2 + 2?", "4"), ("x?", "y")]
    out = with_question_forms(pairs)
    assert out[:4] == pairs
    assert out[4:] == [(QA_FORMS[i % len(QA_FORMS)].format(q=p), a) for i, (p, a) in enumerate(pairs)]
