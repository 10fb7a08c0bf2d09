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


def project_kronecker_staircase(
    Q: torch.Tensor, U_out: torch.Tensor, U_in: torch.Tensor, removed: torch.Tensor,
    blocks: list[tuple[int, int, int]],
) -> torch.Tensor:
    """:func:`project_kronecker_complement`, one block of rows of the mask at a time.

    With eigenvalues sorted in decreasing order, the removed products λ^S_i λ^A_j ≥ τ form a staircase:
    row i removes columns j < c_i, with c_i non-increasing. Block (r0, r1, c) covers rows r0..r1-1,
    which remove nothing past column c, so only U_in[:, :c] enters. The cost falls from
    O(d_out·d_in·(r_out + r_in)) to O(d_out·d_in·r_out + d_in·#removed). Exact for any mask.
    """
    R = U_out.T @ Q
    Y = torch.zeros_like(R)
    for r0, r1, c in blocks:
        U = U_in[:, :c]
        Y[r0:r1] = ((R[r0:r1] @ U) * removed[r0:r1, :c].to(Q.dtype)) @ U.T
    return Q - U_out @ Y


def staircase_blocks(removed: torch.Tensor, n_blocks: int = 16) -> list[tuple[int, int, int]]:
    """Split the rows of a (staircase-ordered) mask into ``n_blocks`` ranges, each with its last removed column."""
    bounds = torch.linspace(0, removed.shape[0], min(n_blocks, removed.shape[0]) + 1).round().long().tolist()
    blocks = []
    for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
        used = removed[r0:r1].any(dim=0).nonzero()
        if r1 > r0 and used.numel():
            blocks.append((r0, r1, int(used.max()) + 1))
    return blocks


@dataclass
class LayerProjector:
    """Eq. 6 for one weight, in complement form: the eigenvectors of the removed directions and their mask.

    ``U_out`` (d_out, r_out) and ``U_in`` (d_in, r_in) are the eigenvectors of S and A that take part in
    at least one removed product, ordered so that the removed products ``removed`` (r_out, r_in) form a
    staircase; ``blocks`` are its row blocks (see :func:`project_kronecker_staircase`).
    """

    U_out: torch.Tensor | None
    U_in: torch.Tensor
    removed: torch.Tensor
    kept_fraction: float
    fan_in_fan_out: bool = False  # the weight is stored (d_in, d_out), as GPT-2's Conv1D
    blocks: list[tuple[int, int, int]] | None = None

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        """Project a weight-shaped tensor (gradient or Adam moment) in its own storage layout."""
        Q = grad.T if self.fan_in_fan_out else grad
        U_in = self.U_in.to(Q.dtype)
        if self.U_out is None or self.blocks is None:
            U_out = None if self.U_out is None else self.U_out.to(Q.dtype)
            projected = project_kronecker_complement(Q, U_out, U_in, self.removed.to(Q.dtype))
        else:
            projected = project_kronecker_staircase(Q, self.U_out.to(Q.dtype), U_in, self.removed, self.blocks)
        return projected.T if self.fan_in_fan_out else projected

    @property
    def memory_bytes(self) -> int:
        tensors = [t for t in (self.U_out, self.U_in, self.removed) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def complement_form(
    U_out: torch.Tensor | None, U_in: torch.Tensor, mask: torch.Tensor, fan_in_fan_out: bool, device
) -> LayerProjector:
    """Keep only the eigenvectors that take part in a removed product (mask == 0), most-removed first."""
    removed = ~mask
    if U_out is None:
        cols = removed
        return LayerProjector(None, U_in[:, cols].to(device), removed[cols].to(device),
                              float(mask.float().mean()), fan_in_fan_out)
    rows, cols = removed.any(dim=1).nonzero().squeeze(1), removed.any(dim=0).nonzero().squeeze(1)
    sub = removed[rows][:, cols]
    rows = rows[sub.sum(dim=1).argsort(descending=True, stable=True)]  # K-FAC: by decreasing λ^S
    cols = cols[sub.sum(dim=0).argsort(descending=True, stable=True)]  # K-FAC: by decreasing λ^A
    sub = removed[rows][:, cols]
    U_in = U_in[:, cols].T.contiguous().T  # column-contiguous, so each block's U_in[:, :c] is a plain view
    return LayerProjector(U_out[:, rows].to(device), U_in.to(device), sub.to(device),
                          float(mask.float().mean()), fan_in_fan_out, staircase_blocks(sub))


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
