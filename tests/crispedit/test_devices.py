"""The engine on any device and dtype: no tensor is created on an implicit device, bf16 weights are stepped
through fp32 masters, and the eigendecompositions' precision is a choice that changes the projector by little.

A CPU-only machine has one real device, so the device check puts PyTorch's *default* device on ``meta``: any
tensor the code creates without naming a device lands there, and mixing it with the real (CPU) inputs fails, as a
CPU tensor would against CUDA inputs on a GPU worker.
"""

import pytest
import torch
from conftest import FACTS, small_cache, target_logprob

from crispedit.cache import CurvatureCache
from crispedit.edit import EditConfig, edit, make_projectors
from crispedit.eigen import energy_mask
from crispedit.kfac import KFACFactors
from crispedit.optim import ProjectedAdam
from crispedit.projector import build_projector, staircase_blocks


def factors(d_out: int, d_in: int, seed: int = 0) -> KFACFactors:
    g = torch.Generator().manual_seed(seed)
    a, s = torch.randn(200, d_in, generator=g), torch.randn(200, d_out, generator=g)
    a[:, 0] *= 30  # a massive input direction, as real models have
    return KFACFactors(a.T @ a / 200, s.T @ s / 200, 200)


@pytest.mark.parametrize("method", ["crispedit", "nullspace"])
def test_projector_creates_no_tensor_on_an_implicit_device(method):
    f = factors(16, 24)
    Q = torch.randn(16, 24)
    expected = build_projector(f, 0.8, method)(Q)
    with torch.device("meta"):
        projector = build_projector(f, 0.8, method, device="cpu")
        projected = projector(Q)
        assert projected.device.type == "cpu"
        ProjectedAdam([torch.nn.Parameter(torch.zeros(16, 24, device="cpu"))], [projector], lr=1e-2)
    torch.testing.assert_close(projected, expected)


def test_staircase_blocks_and_masks_run_beside_a_meta_default_device():
    curvature = torch.outer(torch.rand(12).sort(descending=True).values, torch.rand(20).sort(descending=True).values)
    removed = ~energy_mask(curvature, 0.7)
    expected = staircase_blocks(removed)
    with torch.device("meta"):
        assert staircase_blocks(removed) == expected
        assert energy_mask(curvature, 0.7).device.type == "cpu"


def test_folding_and_projectors_of_a_cache_stay_on_the_given_device(tiny_llama, corpus_file):
    model, tok = tiny_llama
    cache = small_cache(model, tok, corpus_file)
    names = list(cache.factors)
    edit_factors = {n: KFACFactors(f.A * 2, f.S * 2, 7) for n, f in cache.factors.items()}
    with torch.device("meta"):
        folded = cache.folded(edit_factors)
        projectors = make_projectors(folded, EditConfig(energy=0.8), names, False, torch.device("cpu"))
    assert all(p.U_in.device.type == "cpu" for p in projectors)
    assert folded.num_tokens == cache.num_tokens + 7


def test_eigh_precision_changes_the_projector_little():
    f = factors(32, 48, seed=1)
    Q = torch.randn(32, 48, generator=torch.Generator().manual_seed(2))
    p64 = build_projector(f, 0.8, precision=torch.float64)(Q)
    p32 = build_projector(f, 0.8, precision=torch.float32)(Q)
    assert float((p64 - p32).norm() / p64.norm()) < 1e-4


def test_a_bf16_weight_keeps_steps_below_its_resolution():
    """Adam steps of 1e-3 on weights near 1 are below bf16's spacing there (2⁻⁷): rounded one by one they vanish."""
    start = torch.ones(4, 6)
    weights = {dtype: torch.nn.Parameter(start.clone().to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    optimizers = {dtype: ProjectedAdam([w], [None], lr=1e-3) for dtype, w in weights.items()}
    for step in range(20):
        grad = torch.randn(4, 6, generator=torch.Generator().manual_seed(step)).abs()
        for dtype, w in weights.items():
            optimizers[dtype].zero_grad()
            w.grad = grad.to(dtype)
            optimizers[dtype].step()
    fp32, bf16 = weights[torch.float32].detach(), weights[torch.bfloat16].detach()
    assert float((fp32 - start).abs().mean()) > 0.015  # 20 steps of about lr each
    torch.testing.assert_close(bf16.float(), fp32.to(torch.bfloat16).float())  # the fp32 result, rounded once
    optimizers[torch.bfloat16].zero_grad()
    assert weights[torch.bfloat16].grad is None  # the model's own gradient is cleared too, not only the master's


def test_a_bf16_model_is_edited(tiny_llama, corpus_file):
    model, tok = tiny_llama
    cache = small_cache(model, tok, corpus_file)
    model.to(torch.bfloat16)
    before = target_logprob(model, tok, FACTS)
    result = edit(model, tok, FACTS, cache, EditConfig(lr=3e-2, max_epochs=30, energy=0.5))
    assert target_logprob(model, tok, FACTS) > before + 1.0
    assert all(t.dtype == torch.bfloat16 for t in result.changed.values())


def test_sequential_editing_holds_its_statistics_in_constant_memory(tiny_llama, corpus_file):
    """Many chunks: the per-token features are dropped once larger than the factors, which average every chunk."""
    from crispedit.kfac import factors_from_features, merge_factors

    model, tok = tiny_llama
    cache: CurvatureCache = small_cache(model, tok, corpus_file)
    facts = FACTS * 6
    few = edit(model, tok, facts[:1], cache, EditConfig(lr=1e-3, max_epochs=1, energy=0.5, sequential_chunk=1))
    assert few.features is not None  # one short edit: its tokens take less than the 32² + 16² factors
    a, g = next(iter(few.features.values()))
    name = next(iter(few.features))
    torch.testing.assert_close(few.own_factors[name].A, factors_from_features(a, g).A)
    many = edit(model, tok, facts, cache, EditConfig(lr=1e-3, max_epochs=1, energy=0.5, sequential_chunk=1))
    assert many.features is None and many.own_factors is not None
    for name, own in many.own_factors.items():
        rebuilt = merge_factors([cache.factors[name], own])
        torch.testing.assert_close(rebuilt.A, many.cache.factors[name].A, atol=1e-6, rtol=1e-5)
        assert own.num_tokens == many.cache.num_tokens - cache.num_tokens
