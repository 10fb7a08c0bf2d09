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
    blocks: list[tuple[int, int, int, bool]],
) -> torch.Tensor:
    """:func:`project_kronecker_complement`, one block of rows of the mask at a time.

    With eigenvalues sorted in decreasing order, the removed products λ^S_i λ^A_j ≥ τ form a staircase:
    row i removes columns j < c_i, with c_i non-increasing. Block (r0, r1, c, False) covers rows r0..r1-1,
    which remove nothing past column c, so only U_in[:, :c] enters. Block (r0, r1, c, True) covers rows
    that keep nothing before column c and is computed from the kept side, R − ((R U) ⊙ M) Uᵀ with
    U = U_in[:, c:]: the narrower of the two serves rows that remove most of a row. Exact for any mask.
    """
    R = U_out.T @ Q
    Y = torch.zeros_like(R)  # the removed part of each row, in S's eigenbasis
    for r0, r1, c, from_kept in blocks:
        rows = R[r0:r1]
        if from_kept:
            U = U_in[:, c:]
            Y[r0:r1] = rows - ((rows @ U) * (~removed[r0:r1, c:]).to(Q.dtype)) @ U.T
        else:
            U = U_in[:, :c]
            Y[r0:r1] = ((rows @ U) * removed[r0:r1, :c].to(Q.dtype)) @ U.T
    return Q - U_out @ Y


def staircase_blocks(removed: torch.Tensor, n_blocks: int = 6, grid: int = 256) -> list[tuple[int, int, int, bool]]:
    """Split the rows of a mask into at most ``n_blocks`` ranges of least total width, each from its narrower side.

    A block's cost is its rows times the columns it needs: up to its last removed column (removed side) or
    from its first kept column (kept side). The split is the dynamic programme over ≤ ``grid`` row bounds.
    More blocks cover fewer surplus products but make thinner matmuls; on a CPU 4–8 were fastest for
    576 × 1536 weights.
    """
    n, d = removed.shape
    if n == 0:
        return []
    cpu = torch.device("cpu")  # a small programme steered by Python ints: on the CPU, whatever the mask's device
    removed = removed.to(cpu)
    j = torch.arange(d, device=cpu)
    last_removed = torch.where(removed, j + 1, 0).amax(dim=1)
    first_kept = torch.where(removed, d, j).amin(dim=1)
    bounds = torch.linspace(0, n, min(n, grid) + 1, device=cpu).round().long().unique()
    m = len(bounds) - 1
    seg_removed = torch.stack([last_removed[a:b].max() for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    seg_kept = torch.stack([first_kept[a:b].min() for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    width = torch.full((m, m), d, dtype=torch.long, device=cpu)  # width[s, e]: one block over segments s..e
    side = torch.zeros((m, m), dtype=torch.bool, device=cpu)
    for s in range(m):
        rem, keep = seg_removed[s:].cummax(0).values, d - seg_kept[s:].cummin(0).values
        width[s, s:], side[s, s:] = torch.minimum(rem, keep), keep < rem
    rows = (bounds[1:].view(1, -1) - bounds[:-1].view(-1, 1)).double()
    cost = torch.where(torch.ones(m, m, dtype=torch.bool, device=cpu).triu(), rows * width, torch.inf)
    best = torch.full((m + 1,), torch.inf, dtype=torch.float64, device=cpu)
    best[0] = 0
    start = torch.zeros((n_blocks, m + 1), dtype=torch.long, device=cpu)
    never, zero = torch.tensor([False], device=cpu), torch.zeros(1, dtype=torch.long, device=cpu)
    for k in range(n_blocks):  # best[e + 1]: least cost of segments 0..e in at most k + 1 blocks
        value, arg = (best[:-1].view(-1, 1) + cost).min(dim=0)
        improved = torch.cat([never, value < best[1:]])
        start[k] = torch.where(improved, torch.cat([zero, arg]), -1)
        best = torch.where(improved, torch.cat([best[:1], value]), best)
    blocks, e, k = [], m, n_blocks - 1
    while e > 0:
        while start[k, e] < 0:  # the least cost of segments 0..e-1 was already reached with fewer blocks
            k -= 1
        s = int(start[k, e])
        from_kept = bool(side[s, e - 1])
        c = int(seg_kept[s:e].min()) if from_kept else int(seg_removed[s:e].max())
        if from_kept or c > 0:  # a removed-side block of width 0 removes nothing
            blocks.append((int(bounds[s]), int(bounds[e]), c, from_kept))
        e, k = s, k - 1
    return blocks[::-1]


@dataclass
class LayerProjector:
    """Eq. 6 for one weight, in complement form: the eigenvectors of the removed directions and their mask.

    ``U_out`` (d_out, r_out) holds the eigenvectors of S that take part in at least one removed product and
    ``U_in`` (d_in, d_in) all of A's, ordered so that the removed products ``removed`` (r_out, d_in) form a
    staircase; ``blocks`` are its row blocks (see :func:`project_kronecker_staircase`). The null-space
    baseline keeps only its removed A-eigenvectors, in ``U_in`` (d_in, r_in) and ``removed`` (r_in,).
    """

    U_out: torch.Tensor | None
    U_in: torch.Tensor
    removed: torch.Tensor
    kept_fraction: float
    fan_in_fan_out: bool = False  # the weight is stored (d_in, d_out), as GPT-2's Conv1D
    blocks: list[tuple[int, int, int, bool]] | None = None

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        """Project a weight-shaped tensor (gradient or Adam moment) in its own storage layout and dtype.

        The rotations run in the eigenvectors' precision (fp32): in bf16 they would not stay orthogonal.
        """
        Q = (grad.T if self.fan_in_fan_out else grad).to(self.U_in.dtype)
        if self.U_out is None or self.blocks is None:
            projected = project_kronecker_complement(Q, self.U_out, self.U_in, self.removed.to(Q.dtype))
        else:
            projected = project_kronecker_staircase(Q, self.U_out, self.U_in, self.removed, self.blocks)
        return (projected.T if self.fan_in_fan_out else projected).to(grad.dtype)

    @property
    def memory_bytes(self) -> int:
        return tensor_bytes(self.U_out, self.U_in, self.removed)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by the given tensors (None counts nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def complement_form(
    U_out: torch.Tensor | None, U_in: torch.Tensor, mask: torch.Tensor, fan_in_fan_out: bool, device
) -> LayerProjector:
    """Keep the S-eigenvectors that take part in a removed product (mask == 0), most-removed first."""
    removed = ~mask
    if U_out is None:
        cols = removed
        return LayerProjector(None, U_in[:, cols].to(device), removed[cols].to(device),
                              float(mask.float().mean()), fan_in_fan_out)
    rows = removed.any(dim=1).nonzero().squeeze(1)
    rows = rows[removed[rows].sum(dim=1).argsort(descending=True, stable=True)]  # K-FAC: by decreasing λ^S
    # every column, those in most removed products first (K-FAC: by decreasing λ^A), so that a row block
    # can use either the columns it removes (a prefix) or the columns it keeps (a suffix)
    cols = removed[rows].sum(dim=0).argsort(descending=True, stable=True) if rows.numel() else rows
    sub = removed[rows][:, cols]
    U_in = U_in[:, cols].T.contiguous().T  # column-contiguous, so each block's columns are a plain view
    return LayerProjector(U_out[:, rows].to(device), U_in.to(device), sub.to(device),
                          float(mask.float().mean()), fan_in_fan_out, staircase_blocks(sub))


def layer_spectrum(
    factors: KFACFactors, method: str = "crispedit", corrected_eigenvalues: torch.Tensor | None = None,
    precision: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(curvature of each eigen-direction, U_S, U_A): the products λ^S_i λ^A_j, or EK-FAC's λ̃_ij, on the
    factors' device, the eigendecompositions in ``precision`` (``eigen.EIGH_PRECISION`` when None).

    ``method="nullspace"`` gives λ^A alone and no U_S: the null space of A (Prop. 1: a subset of CrispEdit's).
    """
    eig_in, U_in = eigh_psd(factors.A, precision)
    if method == "nullspace":
        return eig_in, None, U_in
    if method != "crispedit":
        raise ValueError(f"no projector for method {method!r}; projected methods are crispedit and nullspace")
    eig_out, U_out = eigh_psd(factors.S, precision)
    curvature = corrected_eigenvalues if corrected_eigenvalues is not None else kronecker_eigenvalues(eig_out, eig_in)
    return curvature, U_out, U_in


def build_projector(
    factors: KFACFactors,
    gamma: float,
    method: str = "crispedit",
    fan_in_fan_out: bool = False,
    corrected_eigenvalues: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    precision: torch.dtype | None = None,
) -> LayerProjector:
    """Eigendecompose A and S and mask by energy γ over all products λ^S_i λ^A_j of this layer (Eq. 3, Eq. 6).

    Everything runs on ``device`` (default: the factors'), so a GPU worker decomposes on its GPU.
    """
    device = torch.device(device) if device is not None else factors.A.device
    factors = KFACFactors(factors.A.to(device), factors.S.to(device), factors.num_tokens)
    if corrected_eigenvalues is not None:
        corrected_eigenvalues = corrected_eigenvalues.to(device)
    curvature, U_out, U_in = layer_spectrum(factors, method, corrected_eigenvalues, precision)
    return complement_form(U_out, U_in, energy_mask(curvature, gamma), fan_in_fan_out, device)
