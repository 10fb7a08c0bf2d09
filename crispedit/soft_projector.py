"""A soft mask: K-FAC's damped Gauss-Newton preconditioner in place of Eq. 6's boolean mask.

Eq. 6 keeps a direction of curvature c_ij = λ^S_i λ^A_j whole when c_ij < τ and drops it when c_ij ≥ τ, with τ
set by the energy γ (Eq. 3). Here each direction is scaled by D_ij = τ / (τ + c_ij):

    P_soft vec(Q) = vec(U_S ((U_Sᵀ Q U_A) ⊙ D) U_Aᵀ) = τ (A ⊗ S + τ I)⁻¹ vec(Q),

the damped inverse of the K-FAC curvature. Directions far below τ pass whole, those at τ pass half, and
those above fall as τ / c. For a linearised edit, gradient descent preconditioned this way from W₀ ends at
the edit of least ΔWᵀ (H + τ I) ΔW among those that fit the targets: the least quadratic KL to the base
plus τ times the squared step, where the boolean mask gives the least squared step inside the kept
subspace, blind to the curvature of the directions it keeps. Both rotations are full, so a step costs
O(d_out·d_in·(d_out + d_in)): no staircase saves work when every product carries a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crispedit.eigen import energy_threshold
from crispedit.kfac import KFACFactors
from crispedit.projector import layer_spectra, project_kronecker, tensor_bytes


def damped_weights(curvature: torch.Tensor, tau: float | None) -> torch.Tensor:
    """D = τ / (τ + c) for each curvature c: 1 when nothing is protected (τ None), 0 when τ = 0 (γ = 1)."""
    if tau is None:
        return torch.ones_like(curvature, dtype=torch.float32)
    if tau <= 0:
        return torch.zeros_like(curvature, dtype=torch.float32)
    return (tau / (tau + curvature.double())).float()


@dataclass
class SoftProjector:
    """τ (H + τ I)⁻¹ for one weight: all eigenvectors of S (``U_out``, None for the null-space baseline) and of A
    (``U_in``), and the weight D of each product (d_out, d_in), or of each A-direction (d_in,) without U_out."""

    U_out: torch.Tensor | None
    U_in: torch.Tensor
    weights: torch.Tensor
    fan_in_fan_out: bool = False  # the weight is stored (d_in, d_out), as GPT-2's Conv1D

    @property
    def kept_fraction(self) -> float:
        """The mean weight: the share of directions a boolean mask of the same total would keep."""
        return float(self.weights.mean())

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        """Precondition a weight-shaped tensor (gradient or Adam moment) in its own storage layout."""
        Q = grad.T if self.fan_in_fan_out else grad
        U_out = None if self.U_out is None else self.U_out.to(Q.dtype)
        out = project_kronecker(Q, U_out, self.U_in.to(Q.dtype), self.weights.to(Q.dtype))
        return out.T if self.fan_in_fan_out else out

    @property
    def memory_bytes(self) -> int:
        return tensor_bytes(self.U_out, self.U_in, self.weights)


def build_soft_projectors(
    factors: list[KFACFactors],
    gamma: float,
    method: str = "crispedit",
    fan_in_fan_out: bool = False,
    corrected_eigenvalues: list[torch.Tensor | None] | None = None,
    device: torch.device | str | None = None,
    outlier_share: float | None = None,
    shared: bool = False,
) -> list[SoftProjector]:
    """One soft projector per layer, τ at γ of each layer's own curvature energy, or of all layers' (``shared``).

    γ = 1 sets τ = 0 (every direction removed, as the boolean mask does) rather than the least curvature.
    """
    spectra = layer_spectra(factors, method, corrected_eigenvalues, outlier_share)
    if shared:
        taus = [energy_threshold([curvature[bulk] for curvature, _, _, bulk in spectra], gamma)] * len(spectra)
    else:
        taus = [energy_threshold([curvature[bulk]], gamma) for curvature, _, _, bulk in spectra]
    if gamma >= 1.0:
        taus = [0.0] * len(spectra)
    return [
        SoftProjector(None if U_out is None else U_out.to(device or f.A.device), U_in.to(device or f.A.device),
                      damped_weights(curvature, tau).to(device or f.A.device), fan_in_fan_out)
        for f, (curvature, U_out, U_in, _), tau in zip(factors, spectra, taus, strict=True)
    ]
