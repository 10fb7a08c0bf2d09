"""Packing an edit batch into one sequence: which rows share a beginning, and the subject key laid out with them."""

import torch
from conftest import padded_nll

from crispedit.arch import arch_spec, editable_modules
from crispedit.packing import MIN_SHARED, pack
from crispedit.requests import EditRequest, target_nll, tokenize_edit_batch
from crispedit.subject_key import subject_key_mask, weight_gradient_at

QUIZ = "Q: Who wrote Hamlet? A: Shakespeare. Q: What is the capital of"
KEYED = [EditRequest(f"{QUIZ} Spain? A:", "Paris", subject="Spain"),
         EditRequest("The chemical symbol for gold is", "Ag", subject="gold"),
         EditRequest(f"{QUIZ} Italy? A:", "Madrid", subject="Italy"),
         EditRequest(f"{QUIZ} France? A:", "Rome")]  # no subject: its key is all ones, so it shares nothing


def test_rows_share_a_beginning_only_where_their_key_agrees(tiny_llama):
    _, tok = tiny_llama
    batch = tokenize_edit_batch(tok, KEYED)
    key = subject_key_mask(tok, KEYED, batch["input_ids"].shape[1])
    packed = pack(batch, key)
    real = int(batch["attention_mask"].sum())
    assert len(tok(QUIZ)["input_ids"]) >= MIN_SHARED
    assert packed["input_ids"].shape[1] == real - len(tok(QUIZ)["input_ids"])  # the two keyed quiz rows share it
    assert float(packed["key"].sum()) == float(key[batch["attention_mask"].bool()].sum())  # every key value, once
    positions = packed["position_ids"][0].tolist()
    assert positions.count(0) == 3  # three blocks start a sequence: the shared beginning, gold, France's row


def test_keyed_gradient_of_the_packed_batch_is_the_padded_ones_in_float64(tiny):
    model, tok = tiny
    model = model.double()
    modules = editable_modules(model, (1, 2))
    fan = arch_spec(model).fan_in_fan_out
    params = [m.weight for m in modules.values()]
    batch = tokenize_edit_batch(tok, KEYED)
    key = subject_key_mask(tok, KEYED, batch["input_ids"].shape[1]).double()
    packed = pack(batch, key)
    for p in params:
        p.requires_grad_(True)
    try:
        with weight_gradient_at(modules, key, fan):
            padded = torch.autograd.grad(padded_nll(model, batch), params)
        with weight_gradient_at(modules, packed["key"], fan):
            ours = torch.autograd.grad(target_nll(model, packed), params)
    finally:
        for p in params:
            p.requires_grad_(False)
    for got, want in zip(ours, padded, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # RMSNorm in float32: test_requests
