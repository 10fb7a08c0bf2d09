"""The matrix-free Kronecker projector (arXiv 2602.15823, Eq. 6 and Prop. 3).

P_γ vec(Q) = vec(U_S ((U_Sᵀ Q U_A) ⊙ M) U_Aᵀ) for a weight gradient Q of shape (d_out, d_in).
It costs two small rotations per step and O(d_in² + d_out² + d_in·d_out) memory; the
(d_in·d_out)² projector is never built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crispedit.eigen import eigh_psd, energy_mask, kronecker_eigenvalues
from crispedit.kfac import KFACFactors

METHODS = ("crispedit", "nullspace", "ft")


def project_kronecker(
    Q: torch.Tensor, U_out: torch.Tensor | None, U_in: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Eq. 6: U_out ((U_outᵀ Q U_in) ⊙ M) U_inᵀ, with Q (d_out, d_in), M (d_out, d_in).

    With ``U_out=None`` and M of shape (d_in,), this is the input-side projector Q U_in diag(M) U_inᵀ
    of the null-space baseline (AlphaEdit / Adam-NSCL: null space of A alone).
    """
    if U_out is None:
        return ((Q @ U_in) * mask) @ U_in.T
    return U_out @ ((U_out.T @ Q @ U_in) * mask) @ U_in.T


@dataclass
class LayerProjector:
    """Everything Eq. 6 needs for one weight: its eigenbases and mask, plus the weight's storage layout."""

    U_out: torch.Tensor | None
    U_in: torch.Tensor
    mask: torch.Tensor
    fan_in_fan_out: bool = False  # the weight is stored (d_in, d_out), as GPT-2's Conv1D

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        """Project a weight-shaped tensor (gradient or Adam moment) in its own storage layout."""
        Q = grad.T if self.fan_in_fan_out else grad
        U_out = None if self.U_out is None else self.U_out.to(Q.dtype)
        projected = project_kronecker(Q, U_out, self.U_in.to(Q.dtype), self.mask.to(Q.dtype))
        return projected.T if self.fan_in_fan_out else projected

    @property
    def kept_fraction(self) -> float:
        return float(self.mask.float().mean())

    @property
    def memory_bytes(self) -> int:
        tensors = [t for t in (self.U_out, self.U_in, self.mask) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def build_projector(
    factors: KFACFactors,
    gamma: float,
    method: str = "crispedit",
    fan_in_fan_out: bool = False,
    corrected_eigenvalues: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> LayerProjector:
    """Eigendecompose A and S and mask by energy γ over all products λ^S_i λ^A_j (or EK-FAC's λ̃_ij).

    ``method="nullspace"`` keeps only the low-energy directions of A (Prop. 1: a subset of CrispEdit's).
    """
    eig_in, U_in = eigh_psd(factors.A)
    if method == "nullspace":
        mask = energy_mask(eig_in, gamma)
        U_out = None
    elif method == "crispedit":
        eig_out, U_out = eigh_psd(factors.S)
        curvature = corrected_eigenvalues if corrected_eigenvalues is not None else kronecker_eigenvalues(
            eig_out, eig_in
        )
        mask = energy_mask(curvature, gamma)
    else:
        raise ValueError(f"no projector for method {method!r}; projected methods are crispedit and nullspace")
    device = device or factors.A.device
    return LayerProjector(
        U_out=None if U_out is None else U_out.to(device),
        U_in=U_in.to(device),
        mask=mask.to(device),
        fan_in_fan_out=fan_in_fan_out,
    )
