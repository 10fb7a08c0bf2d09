"""Does a curvature cache underestimate held-out input energy along A's small-eigenvalue directions?

For each layer and each cache: A's eigenvectors u_j (ascending λ^A_j), and the held-out input energy along
them, u_jᵀ Â u_j with Â = E[a aᵀ] over ``--windows`` held-out WikiText-2 windows. Both are summed over bands of
eigenvectors. The ratio held-out / cache is 1 for an unbiased estimate; a finite sample spreads the
eigenvalues, so the smallest come out too small (ratio > 1) and the largest too large (ratio < 1). The
projector keeps the directions where the cache's products are small, which is where an edit goes (§17).

Usage: .venv/bin/python scripts/cache_tail.py CACHE.safetensors [CACHE2 ...] [--windows 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from curvature_outliers import layer_inputs

from crispedit.arch import editable_modules
from crispedit.bench import HELDOUT_TEXT
from crispedit.cache import CurvatureCache
from crispedit.corpus import batches_of, capability_windows
from crispedit.datasets import shared_data_dir
from crispedit.models import load_model

BANDS = ((0, 512), (512, 1024), (1024, 1408), (1408, 1536))  # SmolLM2's d_in = 1536, smallest λ first


def band_energy(A_cache: torch.Tensor, A_heldout: torch.Tensor) -> list[tuple[float, float]]:
    """(cache, held-out) energy summed over each band of the cache's eigenvectors, in ascending order."""
    lam, U = torch.linalg.eigh(A_cache.double())
    held = torch.einsum("ij,ik,kj->j", U, A_heldout, U)
    return [(float(lam[lo:hi].sum()), float(held[lo:hi].sum())) for lo, hi in BANDS]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("caches", nargs="+")
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    model, tok = load_model("smollm2")
    caches = {Path(p).name: CurvatureCache.load(p, model=model) for p in args.caches}
    first = next(iter(caches.values()))
    windows = capability_windows(model, tok, str(shared_data_dir() / HELDOUT_TEXT), args.windows, 512)
    inputs = layer_inputs(model, editable_modules(model, first.layers), batches_of(windows, 4))
    print("held-out / cache energy along A's eigenvectors, by band (smallest eigenvalues first): "
          + ", ".join(f"{lo}-{hi}" for lo, hi in BANDS))
    for name in first.factors:
        a = inputs[name].reshape(-1, inputs[name].shape[-1]).double()
        A_heldout = a.T @ a / a.shape[0]
        for label, cache in caches.items():
            ratios = [h / c for c, h in band_energy(cache.factors[name].A, A_heldout)]
            print(f"  {name}  {label}: " + "  ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
