"""K-FAC factors (Eq. 5) against per-token outer products summed by hand."""

import pytest
import torch
import torch.nn.functional as F

from crispedit.arch import arch_spec, editable_modules
from crispedit.eigen import eigh_psd
from crispedit.kfac import (
    KFACFactors,
    ekfac_quadratic,
    factors_from_features,
    kfac_factors,
    kfac_quadratic,
    merge_factors,
    next_token_labels,
)

TEXTS = ["The capital of France is Paris.", "Water boils at one hundred degrees.", "Gold is Au."]


def per_token_io_by_hand(model, tok, module, text):
    """a_t from a forward hook; g_t = ∂(Σ_t ℓ_t)/∂s_t via a zero perturbation added to the layer output."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    store = {}

    def hook(mod, inputs, output):
        store["a"] = inputs[0].detach()
        store["delta"] = torch.zeros_like(output, requires_grad=True)
        return output + store["delta"]

    handle = module.register_forward_hook(hook)
    try:
        logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    (g,) = torch.autograd.grad(loss, store["delta"])
    return store["a"][0, :-1], g[0, :-1]


def test_kfac_equals_hand_summed_outer_products(tiny):
    model, tok = tiny
    layers = (0, 2)
    modules = editable_modules(model, layers)
    batch = tok(TEXTS, return_tensors="pt", padding=True, padding_side="right")  # padding must not count
    factors = kfac_factors(model, modules, [batch])
    for name, module in modules.items():
        A = S = 0
        n = 0
        for text in TEXTS:
            a, g = per_token_io_by_hand(model, tok, module, text)
            A, S, n = A + a.T @ a, S + g.T @ g, n + a.shape[0]
        assert factors[name].num_tokens == n
        torch.testing.assert_close(factors[name].A, A / n, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(factors[name].S, S / n, atol=1e-7, rtol=1e-4)
        d_out = module.weight.shape[1] if arch_spec(model).fan_in_fan_out else module.weight.shape[0]
        assert factors[name].S.shape == (d_out, d_out)


def test_gpt2_conv1d_factor_shapes(tiny_gpt2):
    model, tok = tiny_gpt2
    modules = editable_modules(model, (1,))
    (name, module), = modules.items()
    assert module.weight.shape == (64, 16)  # Conv1D stores (in, out)
    f = kfac_factors(model, modules, [tok(TEXTS[:1], return_tensors="pt")])[name]
    assert f.A.shape == (64, 64) and f.S.shape == (16, 16)


def test_batches_stream_into_the_same_average(tiny_llama):
    model, tok = tiny_llama
    modules = editable_modules(model, (1,))
    one = kfac_factors(model, modules, [tok(TEXTS, return_tensors="pt", padding=True)])
    many = kfac_factors(model, modules, [tok([t], return_tensors="pt") for t in TEXTS])
    for name in modules:
        torch.testing.assert_close(one[name].A, many[name].A, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(one[name].S, many[name].S, atol=1e-8, rtol=1e-4)


def test_sampled_labels_follow_the_model_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(20000, 3)
    generator = torch.Generator().manual_seed(0)
    labels = next_token_labels(logits, torch.zeros(20000, dtype=torch.long), "sampled", generator)
    freq = torch.bincount(labels, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)
    peaked = torch.tensor([[0.0, 50.0, 0.0]]).expand(100, 3)
    assert next_token_labels(peaked, torch.zeros(100, dtype=torch.long), "sampled").eq(1).all()
    true = torch.arange(100) % 3
    assert next_token_labels(peaked, true, "empirical").equal(true)


def test_sampled_mode_differs_from_empirical_and_is_seeded(tiny_llama):
    model, tok = tiny_llama
    modules = editable_modules(model, (1,))
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    (name,) = modules
    emp = kfac_factors(model, modules, [batch], fisher="empirical")[name]
    s1 = kfac_factors(model, modules, [batch], fisher="sampled", seed=1)[name]
    s1b = kfac_factors(model, modules, [batch], fisher="sampled", seed=1)[name]
    torch.testing.assert_close(s1.S, s1b.S)
    torch.testing.assert_close(s1.A, emp.A)  # A does not depend on the labels
    assert not torch.allclose(s1.S, emp.S)


def test_unknown_fisher_mode_is_refused(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="fisher"):
        kfac_factors(model, editable_modules(model, (0,)), [tok(TEXTS[:1], return_tensors="pt")], fisher="exact")


def test_merge_is_token_weighted():
    a = KFACFactors(A=torch.eye(2), S=torch.eye(3), num_tokens=30)
    b = KFACFactors(A=torch.zeros(2, 2), S=3 * torch.eye(3), num_tokens=10)
    m = merge_factors([a, b])
    assert m.num_tokens == 40
    torch.testing.assert_close(m.A, 0.75 * torch.eye(2))
    torch.testing.assert_close(m.S, 1.5 * torch.eye(3))


def test_bad_layers_name_the_valid_range(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="layers 0..2"):
        editable_modules(model, (7,))


def test_ekfac_eigenvalues_match_hand_computation(tiny_llama):
    """λ̃_ij = E_t[(U_outᵀ g_t)_i² (U_inᵀ a_t)_j²]; their sum is E_t[‖g_t‖² ‖a_t‖²] (rotation invariance)."""
    from crispedit.eigen import eigh_psd
    from crispedit.kfac import ekfac_eigenvalues

    model, tok = tiny_llama
    modules = editable_modules(model, (1,))
    (name, module), = modules.items()
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    f = kfac_factors(model, modules, [batch])[name]
    bases = {name: (eigh_psd(f.S)[1], eigh_psd(f.A)[1])}
    corrected = ekfac_eigenvalues(model, modules, [batch], bases)[name]
    assert corrected.shape == (f.S.shape[0], f.A.shape[0])
    total, n = 0.0, 0
    for text in TEXTS:
        a, g = per_token_io_by_hand(model, tok, module, text)
        total += float(((g**2).sum(1) * (a**2).sum(1)).sum())
        n += a.shape[0]
    assert abs(float(corrected.sum()) - total / n) < 1e-4 * max(1.0, total / n)


def test_kfac_quadratic_equals_the_dense_kronecker_form():
    torch.manual_seed(0)
    a, g = torch.randn(50, 6, dtype=torch.float64), torch.randn(50, 4, dtype=torch.float64)
    f = factors_from_features(a, g)
    delta = torch.randn(4, 6, dtype=torch.float64)
    vec = delta.T.reshape(-1)  # column-stacked vec(ΔW), the convention of kron(A, S)
    dense = 0.5 * vec @ torch.kron(f.A, f.S) @ vec
    assert kfac_quadratic(f, delta) == pytest.approx(float(dense), rel=1e-12)
    assert kfac_quadratic(f, 2 * delta) == pytest.approx(4 * float(dense), rel=1e-12)


def test_ekfac_quadratic_with_kfac_eigenvalues_is_the_kfac_quadratic():
    torch.manual_seed(1)
    f = factors_from_features(torch.randn(40, 5), torch.randn(40, 3))
    (lam_out, _), (lam_in, _) = eigh_psd(f.S), eigh_psd(f.A)
    delta = torch.randn(3, 5)
    products = lam_out[:, None] * lam_in[None, :]
    assert ekfac_quadratic(f, products, delta) == pytest.approx(kfac_quadratic(f, delta), rel=1e-4)
    assert ekfac_quadratic(f, 2 * products, delta) == pytest.approx(2 * kfac_quadratic(f, delta), rel=1e-4)


def test_a_cache_build_reports_its_progress_to_a_listener(tiny_llama, corpus_file):
    from conftest import small_cache

    from crispedit.progress import listening

    model, tok = tiny_llama
    heard = []
    with listening(lambda phase, done, total: heard.append((phase, done, total))):
        small_cache(model, tok, corpus_file)
    kfac = [h for h in heard if h[0] == "K-FAC"]
    assert kfac and kfac[-1][1] == kfac[-1][2] > 0 and [h[1] for h in kfac] == sorted(h[1] for h in kfac)
    count = len(heard)
    small_cache(model, tok, corpus_file)  # outside the block: nobody hears
    assert len(heard) == count
