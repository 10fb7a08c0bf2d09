"""Eigenbases of the K-FAC factors and the γ-energy mask (arXiv 2602.15823, Eq. 3 and Eq. 6).

The eigenvalues of A ⊗ S are all products λ^S_i λ^A_j. Sorted descending, the top k of them hold a
fraction γ of the total curvature "energy"; the γ-approximate null space is spanned by the rest. The
mask M_ij = 1 marks the eigen-directions (i, j) that edits may move along.
"""

from __future__ import annotations

import torch

# the precision of the eigendecompositions, on the factors' own device. On SmolLM2's cache fp32 keeps the same
# share of directions as fp64 and gives a projected step of the same curvature to 5 digits (lab/eigh_precision.py),
# in half the time on a CPU; a GPU's fp64 throughput is a fraction of its fp32
EIGH_PRECISION = torch.float32


def eigh_psd(matrix: torch.Tensor, precision: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, eigenvectors) of a symmetric PSD matrix, computed in ``precision`` on its device and returned
    in fp32; tiny negatives clipped to 0."""
    m = matrix.to(precision or EIGH_PRECISION)
    eigenvalues, eigenvectors = torch.linalg.eigh((m + m.T) / 2)
    return eigenvalues.clamp_min(0).float(), eigenvectors.float()


def energy_rank(sorted_desc: torch.Tensor, gamma: float) -> int:
    """k = min{r : Σ_{i≤r} σ_i / Σ σ ≥ γ} for eigenvalues sorted descending (Eq. 3); 0 when γ = 0."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"energy threshold γ must be in [0, 1], got {gamma}")
    total = sorted_desc.sum()
    if gamma == 0.0 or total <= 0:
        return 0
    ratio = sorted_desc.cumsum(0) / total
    k = int(torch.searchsorted(ratio, torch.tensor(gamma - 1e-12, dtype=ratio.dtype, device=ratio.device))) + 1
    return min(k, sorted_desc.numel())


def energy_threshold(curvatures: list[torch.Tensor], gamma: float) -> float | None:
    """τ = the k-th largest value over all the given curvature arrays together (Eq. 3 over their union).

    One array is the paper's per-layer split. None when k = 0 (γ = 0 or no curvature at all).
    """
    sorted_desc = torch.cat([c.double().flatten() for c in curvatures]).sort(descending=True).values
    k = energy_rank(sorted_desc, gamma)
    return None if k == 0 else float(sorted_desc[k - 1])


def mask_below(curvature: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """M_ij = 1[curvature_ij < τ]: the directions an edit may move along; all of them when τ is None."""
    if threshold is None:
        return torch.ones_like(curvature, dtype=torch.bool)
    return curvature.double() < threshold


def energy_mask(curvature: torch.Tensor, gamma: float) -> torch.Tensor:
    """M_ij = 1[curvature_ij < k-th largest curvature value]: keep the low-curvature directions (Eq. 6).

    ``curvature`` holds the eigenvalue of each eigen-direction: the outer product λ^S ⊗ λ^A for K-FAC
    (d_out, d_in), the corrected values for EK-FAC, or λ^A alone (d_in,) for the null-space baseline.
    Directions of exactly zero curvature are always kept. γ = 0 keeps everything; γ = 1 keeps only zeros.
    """
    return mask_below(curvature, energy_threshold([curvature], gamma))


def kronecker_eigenvalues(eig_out: torch.Tensor, eig_in: torch.Tensor) -> torch.Tensor:
    """(d_out, d_in) matrix of the eigenvalues λ^S_i λ^A_j of A ⊗ S."""
    return torch.outer(eig_out, eig_in)
