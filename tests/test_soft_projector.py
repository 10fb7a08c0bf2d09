"""The soft mask τ (A ⊗ S + τ I)⁻¹ against its dense form on small random PSD factors, in float64."""

import pytest
import torch
from test_projector import random_psd, unvec, vec

from crispedit.eigen import energy_rank
from crispedit.kfac import KFACFactors
from crispedit.soft_projector import build_soft_projectors, damped_weights


def dense_tau(C: torch.Tensor, gamma: float) -> float:
    """τ of Eq. 3 from the dense curvature: the k-th largest eigenvalue, k the γ energy rank."""
    eigenvalues = torch.linalg.eigvalsh(C).clamp_min(0).sort(descending=True).values
    return float(eigenvalues[energy_rank(eigenvalues, gamma) - 1])


@pytest.mark.parametrize("gamma", [0.3, 0.8, 0.95])
def test_soft_projector_equals_the_dense_damped_inverse(gamma):
    d_out, d_in = 4, 3
    A, S = random_psd(d_in, 1), random_psd(d_out, 2)
    Q = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    C = torch.kron(A, S)
    tau = dense_tau(C, gamma)
    expected = unvec(tau * torch.linalg.solve(C + tau * torch.eye(d_out * d_in, dtype=torch.float64), vec(Q)),
                     d_out, d_in)
    (soft,) = build_soft_projectors([KFACFactors(A=A, S=S, num_tokens=1)], gamma)
    torch.testing.assert_close(soft(Q), expected, atol=1e-5, rtol=1e-4)


def test_soft_nullspace_is_the_damped_inverse_of_A():
    d_out, d_in = 3, 5
    A, S = random_psd(d_in, 4), random_psd(d_out, 5)
    Q = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    tau = dense_tau(A, 0.8)
    expected = Q @ (tau * torch.linalg.inv(A + tau * torch.eye(d_in, dtype=torch.float64)))
    (soft,) = build_soft_projectors([KFACFactors(A=A, S=S, num_tokens=1)], 0.8, method="nullspace")
    assert soft.U_out is None
    torch.testing.assert_close(soft(Q), expected, atol=1e-5, rtol=1e-4)


def test_soft_weights_lie_between_the_masks_and_meet_them_at_the_limits():
    """γ = 0 protects nothing (identity); γ = 1 protects all (zero); in between every weight is in (0, 1]
    and falls as curvature rises, halving at the threshold itself."""
    A, S = random_psd(5, 7), random_psd(4, 8)
    factors = KFACFactors(A=A, S=S, num_tokens=1)
    Q = torch.randn(4, 5, dtype=torch.float64)
    # the eigenvectors are float32, so U Uᵀ = I holds to float32 precision
    torch.testing.assert_close(build_soft_projectors([factors], 0.0)[0](Q), Q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(build_soft_projectors([factors], 1.0)[0](Q), torch.zeros_like(Q))
    curvature = torch.tensor([0.0, 0.5, 1.0, 4.0])
    torch.testing.assert_close(damped_weights(curvature, 1.0), torch.tensor([1.0, 2 / 3, 0.5, 0.2]))
    soft = build_soft_projectors([factors], 0.8)[0]
    assert 0 < soft.kept_fraction < 1


def test_soft_conv1d_layout_preconditions_the_transpose():
    factors = KFACFactors(A=random_psd(6, 8), S=random_psd(3, 9), num_tokens=1)
    (linear,) = build_soft_projectors([factors], 0.8)
    (conv,) = build_soft_projectors([factors], 0.8, fan_in_fan_out=True)
    grad_out_in = torch.randn(3, 6)
    torch.testing.assert_close(conv(grad_out_in.T.contiguous()), linear(grad_out_in).T)


def test_shared_soft_threshold_is_one_tau_over_all_layers():
    factors = [KFACFactors(A=random_psd(3, s), S=random_psd(2, s + 1), num_tokens=1) for s in (10, 20)]
    curvatures = [torch.kron(f.A, f.S) for f in factors]
    tau = dense_tau(torch.block_diag(*curvatures), 0.8)
    for C, soft in zip(curvatures, build_soft_projectors(factors, 0.8, shared=True), strict=True):
        Q = torch.randn(2, 3, dtype=torch.float64)
        expected = unvec(tau * torch.linalg.solve(C + tau * torch.eye(6, dtype=torch.float64), vec(Q)), 2, 3)
        torch.testing.assert_close(soft(Q), expected, atol=1e-5, rtol=1e-4)
