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


def project_kronecker_complement(
    Q: torch.Tensor, U_out: torch.Tensor | None, U_in: torch.Tensor, removed: torch.Tensor
) -> torch.Tensor:
    """Eq. 6 written as Q − U_out ((U_outᵀ Q U_in) ⊙ (1 − M)) U_inᵀ, over the removed directions only.

    The same projection as :func:`project_kronecker`, since U_out and U_in are orthogonal; here U_out and
    U_in hold only the eigenvectors that take part in some removed (high-curvature) product, so a step
    costs O(d_out·d_in·(r_out + r_in)) instead of O(d_out·d_in·(d_out + d_in)).
    """
    if U_out is None:
        return Q - ((Q @ U_in) * removed) @ U_in.T
    return Q - U_out @ ((U_out.T @ Q @ U_in) * removed) @ U_in.T


@dataclass
class LayerProjector:
    """Eq. 6 for one weight, in complement form: the eigenvectors of the removed directions and their mask.

    ``U_out`` (d_out, r_out) and ``U_in`` (d_in, r_in) are the eigenvectors of S and A that take part in
    at least one removed product; ``removed`` (r_out, r_in) marks the removed products among them.
    """

    U_out: torch.Tensor | None
    U_in: torch.Tensor
    removed: torch.Tensor
    kept_fraction: float
    fan_in_fan_out: bool = False  # the weight is stored (d_in, d_out), as GPT-2's Conv1D

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        """Project a weight-shaped tensor (gradient or Adam moment) in its own storage layout."""
        Q = grad.T if self.fan_in_fan_out else grad
        U_out = None if self.U_out is None else self.U_out.to(Q.dtype)
        projected = project_kronecker_complement(Q, U_out, self.U_in.to(Q.dtype), self.removed.to(Q.dtype))
        return projected.T if self.fan_in_fan_out else projected

    @property
    def memory_bytes(self) -> int:
        tensors = [t for t in (self.U_out, self.U_in, self.removed) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def complement_form(
    U_out: torch.Tensor | None, U_in: torch.Tensor, mask: torch.Tensor, fan_in_fan_out: bool, device
) -> LayerProjector:
    """Keep only the eigenvectors that take part in a removed product (mask == 0)."""
    removed = ~mask
    if U_out is None:
        cols = removed
        return LayerProjector(None, U_in[:, cols].to(device), removed[cols].to(device),
                              float(mask.float().mean()), fan_in_fan_out)
    rows, cols = removed.any(dim=1), removed.any(dim=0)
    return LayerProjector(U_out[:, rows].to(device), U_in[:, cols].to(device), removed[rows][:, cols].to(device),
                          float(mask.float().mean()), fan_in_fan_out)


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
    return complement_form(U_out, U_in, mask, fan_in_fan_out, device or factors.A.device)
