"""A version's tensor as its parent's plus a low-rank change, where that is much smaller than the whole tensor.

An edit that acts on a few keys changes a weight by a matrix of small rank (the keyed solve's ΔW* has rank at
most its number of keys), so W_new = W_parent + U V with U (d_out × r) and V (r × d_in) stores r (d_out + d_in)
numbers instead of d_out · d_in. The factors come from the SVD of W_new − W_parent; they are kept only if
rebuilding gives W_new back to within ``ULPS`` units in the last place of its largest entry (the rounding of the
edited weight itself), so a stored version is the weight the edit made.
"""

from __future__ import annotations

import torch

CUTS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)  # ranks tried: singular values above these shares of the largest
ULPS = 2  # rebuilt weight within 2 ulps of |W_new|'s largest entry: its own rounding, not a different weight
MAX_SHARE = 0.5  # factors at most half the whole tensor's size, else the whole tensor is stored


def rebuild(parent: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """W_parent + U V, in the parent's dtype (the sum in float32 at least)."""
    work = torch.promote_types(parent.dtype, torch.float32)
    return (parent.to(work) + U.to(work) @ V.to(work)).to(parent.dtype)


def low_rank_change(parent: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U, V) with ``rebuild(parent, U, V)`` equal to ``new`` up to its rounding, or None when the change is not
    of low rank (or not a matrix, or the factors would not be at most ``MAX_SHARE`` of the tensor)."""
    if new.dim() != 2 or parent.shape != new.shape or not new.is_floating_point():
        return None
    m, n = new.shape
    most = int(MAX_SHARE * m * n / (m + n))
    change = new.double() - parent.double()
    if not torch.any(change):
        return None
    left, s, right = torch.linalg.svd(change, full_matrices=False)
    work = torch.promote_types(new.dtype, torch.float32)
    tolerance = ULPS * torch.finfo(new.dtype).eps * float(new.abs().max())
    # the rounding of W_new adds singular values of its own; drop the largest share of the spectrum that can go
    for r in sorted({int((s > s[0] * rtol).sum()) for rtol in CUTS}):
        if r > most:
            return None
        U, V = (left[:, :r] * s[:r]).to(work).contiguous(), right[:r].to(work).contiguous()
        if float((rebuild(parent, U, V).double() - new.double()).abs().max()) <= tolerance:
            return U, V
    return None
