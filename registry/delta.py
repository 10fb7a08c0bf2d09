"""A version's tensor as its parent's plus a low-rank change, where that is much smaller than the whole tensor.

An edit that acts on a few keys changes a weight by a matrix of small rank (the keyed solve's ΔW* has rank at
most its number of keys), so W_new = W_parent + U V with U (d_out × r) and V (r × d_in) stores r (d_out + d_in)
numbers instead of d_out · d_in. The factors come from a truncated SVD of W_new − W_parent; they are kept only if
rebuilding gives W_new back to within ``ULPS`` units in the last place of its largest entry (the rounding of the
edited weight itself), so a stored version is the weight the edit made.
"""

from __future__ import annotations

import torch

CUTS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)  # ranks tried: singular values above these shares of the largest
ULPS = 2  # rebuilt weight within 2 ulps of |W_new|'s largest entry: its own rounding, not a different weight
SKETCH_WIDTHS = (16, 128)  # then the widest worth storing: a single edit's keys fit the first
MAX_SHARE = 0.5  # factors at most half the whole tensor's size, else the whole tensor is stored


def rebuild(parent: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """W_parent + U V, in the parent's dtype (the sum in float32 at least)."""
    work = torch.promote_types(parent.dtype, torch.float32)
    return (parent.to(work) + U.to(work) @ V.to(work)).to(parent.dtype)


def low_rank_change(parent: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U, V) with ``rebuild(parent, U, V)`` equal to ``new`` up to its rounding, or None when the change is not
    of low rank (or not a matrix, or the factors would not be at most ``MAX_SHARE`` of the tensor).

    The range of the change is found from random sketches of growing width (Halko et al. 2011, Alg. 4.1):
    a sketch as wide as the rank spans it, so a rank-4 edit costs one thin product, not an SVD of the tensor."""
    if new.dim() != 2 or parent.shape != new.shape or not new.is_floating_point():
        return None
    m, n = new.shape
    most = int(MAX_SHARE * m * n / (m + n))
    work = torch.promote_types(new.dtype, torch.float32)
    change = (new.double() - parent.double()).to(work)
    if most < 1 or not torch.any(change):
        return None
    tolerance = ULPS * torch.finfo(new.dtype).eps * float(new.abs().max())
    seed = torch.Generator(device=change.device).manual_seed(0)  # the same blob (and digest) for the same change
    for width in sorted({min(w, most) for w in SKETCH_WIDTHS} | {most}):
        Q = torch.linalg.qr(change @ torch.randn(n, width, generator=seed, device=change.device, dtype=work))[0]
        left, s, V = torch.linalg.svd(Q.T @ change, full_matrices=False)
        U = Q @ (left * s)
        # the rounding of W_new adds singular values of its own; keep the fewest that rebuild it
        for r in sorted({int((s > s[0] * rtol).sum()) for rtol in CUTS}):
            if float((rebuild(parent, U[:, :r], V[:r]).double() - new.double()).abs().max()) <= tolerance:
                return U[:, :r].contiguous(), V[:r].contiguous()
    return None
