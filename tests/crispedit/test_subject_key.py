"""The subject key: the edit loss's weight gradient only through each prompt's last subject token."""

import pytest
import torch
from conftest import small_cache

from crispedit.arch import arch_spec, editable_modules
from crispedit.edit import EditConfig, edit
from crispedit.packing import pack
from crispedit.requests import EditRequest, target_nll, tokenize_edit_batch
from crispedit.subject_key import KeyedLinear, subject_key_mask, subject_span, weight_gradient_at

KEYED = [
    EditRequest("The capital of France is", "Rome", subject="France"),
    EditRequest("Q: Who wrote Hamlet? A:", "Madrid", subject="hamlet"),
    EditRequest("Water boils at one hundred degrees", "Paris"),  # no subject: every token counts
]


def test_subject_span_is_the_last_occurrence_case_insensitive():
    assert subject_span("Paris is in France; France is big", "france") == (20, 26)
    assert subject_span("The capital of France is", "Spain") is None
    assert subject_span("The capital of France is", None) is None


def test_mask_marks_the_token_holding_the_subjects_last_character(tiny_llama):
    _, tok = tiny_llama
    batch = tokenize_edit_batch(tok, KEYED)
    mask = subject_key_mask(tok, KEYED, batch["input_ids"].shape[1])
    assert mask.shape == batch["input_ids"].shape
    for row, r in enumerate(KEYED[:2]):
        (pos,) = mask[row].nonzero().flatten().tolist()
        prefix = tok.decode(batch["input_ids"][row, : pos + 1])
        assert prefix.lower().endswith(r.subject.lower()), prefix  # the key token closes the subject
        assert r.subject.lower() not in tok.decode(batch["input_ids"][row, :pos]).lower()
    assert mask[2].eq(1).all()


def test_keyed_linear_weight_gradient_counts_only_masked_tokens():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.float64)
    mask[0, 2] = mask[1, 4] = 1.0
    g = torch.randn(2, 5, 3, dtype=torch.float64)
    y = KeyedLinear.apply(x, w, mask)
    torch.testing.assert_close(y, x @ w.T)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    expected_w = torch.outer(g[0, 2], x[0, 2]) + torch.outer(g[1, 4], x[1, 4])  # Σ_t m_t g_t x_tᵀ
    torch.testing.assert_close(gw, expected_w)
    torch.testing.assert_close(gx, g @ w)  # the input's gradient is the plain one


@pytest.mark.parametrize("ones", [True, False])
def test_hook_gives_the_masked_weight_gradient_on_a_model(tiny, ones):
    model, tok = tiny
    modules = editable_modules(model, (1, 2))
    fan = arch_spec(model).fan_in_fan_out
    params = [m.weight for m in modules.values()]
    padded = tokenize_edit_batch(tok, KEYED)
    mask = torch.ones(padded["input_ids"].shape) if ones else subject_key_mask(tok, KEYED, padded["input_ids"].shape[1])
    batch = pack(padded, mask)  # as the edit loop lays a step out: one sequence, the key alongside
    mask = batch["key"]
    for p in params:
        p.requires_grad_(True)
    try:
        plain_loss = target_nll(model, batch)
        plain = torch.autograd.grad(plain_loss, params)
        with weight_gradient_at(modules, mask, fan):
            keyed_loss = target_nll(model, batch)
        keyed = torch.autograd.grad(keyed_loss, params)
        # by hand: per-token inputs a_t and output gradients g_t of each module, then Σ_t m_t g_t a_tᵀ
        seen: dict[str, dict] = {n: {} for n in modules}
        handles = [m.register_forward_hook(lambda mod, i, o, n=n: seen[n].update(a=i[0], s=o))
                   for n, m in modules.items()]
        try:
            loss = target_nll(model, batch)
        finally:
            for h in handles:
                h.remove()
        grads_s = torch.autograd.grad(loss, [seen[n]["s"] for n in modules])
    finally:
        for p in params:
            p.requires_grad_(False)
    torch.testing.assert_close(keyed_loss, plain_loss)
    for n, gs, got, full in zip(modules, grads_s, keyed, plain, strict=True):
        a = seen[n]["a"]
        by_hand = torch.einsum("bto,bti->oi", gs * mask.unsqueeze(-1), a)
        torch.testing.assert_close(got, by_hand.T if fan else by_hand, atol=1e-6, rtol=1e-5)
        if ones:
            torch.testing.assert_close(got, full, atol=1e-6, rtol=1e-5)


def test_edit_is_keyed_only_where_a_subject_is_found(tiny_llama, corpus_file):
    """Through ``edit``: a request without a subject edits exactly as without the key; one with a subject
    edits differently. (A tiny random model carries little from the subject's position to the answer's,
    so whether the keyed edit writes the fact is measured on SmolLM2 in BENCHMARKS.md.)"""
    model, tok = tiny_llama
    cache = small_cache(model, tok, corpus_file)

    def delta(requests, key):
        result = edit(model, tok, requests, cache, EditConfig(lr=3e-2, max_epochs=5, energy=0.5, subject_key=key))
        for n, t in result.original.items():  # undo, so the next edit starts from the same weights
            dict(model.named_parameters())[n].data.copy_(t)
        return result

    plain, keyed = delta(KEYED[2:], False), delta(KEYED[2:], True)
    for n in plain.changed:
        torch.testing.assert_close(keyed.changed[n], plain.changed[n], atol=1e-5, rtol=1e-4)
    plain, keyed = delta(KEYED[:2], False), delta(KEYED[:2], True)
    assert any(not torch.allclose(keyed.changed[n], plain.changed[n], atol=1e-3) for n in plain.changed)
