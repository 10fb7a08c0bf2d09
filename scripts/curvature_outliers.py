"""Which layers does γ barely protect, and is one token's activation the reason? (BENCHMARKS.md §18)

For each layer of a curvature cache: the share of A's trace in its top eigenvalue, the same for S, and the
fraction of the products λ^S_i λ^A_j that γ removes, under each layer's own split and under one threshold
shared by all the cache's layers (``--energy-scope global``). Then, on ``--windows`` capability windows, the share
of the top eigenvalue of Σ a aᵀ with and without position 0 (the attention-sink token), and that token's
input norm against the median token's, and the mean input's share of A's trace and its angle to A's top
eigenvector (A = E[a aᵀ] is not centred, so a large mean shows up as one large eigenvalue).

With ``--outlier-share R`` it also prints the fraction removed when directions above R of their factor's
trace are left out of γ's energy (``EditConfig.outlier_share``, BENCHMARKS.md §23), and each factor's top
three eigenvalue shares.

Usage: .venv/bin/python scripts/curvature_outliers.py CACHE.safetensors [--model smollm2] [--energy 0.8]
       [--windows 8] [--outlier-share R]
"""

from __future__ import annotations

import argparse

import torch

from crispedit.arch import editable_modules
from crispedit.bench import TRAIN_CORPUS
from crispedit.cache import CurvatureCache
from crispedit.corpus import batches_of, capability_windows
from crispedit.datasets import shared_data_dir
from crispedit.kfac import capture_layer_io
from crispedit.models import load_model
from crispedit.projector import build_projector, build_shared_projectors


def top_share(x: torch.Tensor) -> float:
    """Top eigenvalue of Σ x xᵀ over the rows of ``x`` (tokens, d), as a share of its trace."""
    ev = torch.linalg.eigvalsh(x.T.double() @ x.double())
    return float(ev[-1] / ev.sum())


def top_three(ascending: torch.Tensor) -> str:
    """The three largest of a factor's eigenvalues (eigvalsh order), each as a share of the trace."""
    return ", ".join(f"{float(x):.1%}" for x in ascending.flip(0)[:3] / ascending.sum())


@torch.no_grad()
def layer_inputs(model, modules: dict, batches) -> dict[str, torch.Tensor]:
    """Each module's input, (windows, T, d_in)."""
    seen = {n: [] for n in modules}
    with capture_layer_io(modules) as captured:
        for batch in batches:
            model(**batch)
            for n in modules:
                seen[n].append(captured[n]["a"])
    return {n: torch.cat(xs) for n, xs in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--energy", type=float, default=0.8)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--outlier-share", type=float, default=None)
    args = parser.parse_args()
    model, tok = load_model(args.model)
    cache = CurvatureCache.load(args.cache, model=model)
    windows = capability_windows(model, tok, str(shared_data_dir() / TRAIN_CORPUS), args.windows, 512)
    inputs = layer_inputs(model, editable_modules(model, cache.layers), batches_of(windows, 4))
    shared = build_shared_projectors(list(cache.factors.values()), args.energy)
    for layer, (name, f), s in zip(cache.layers, cache.factors.items(), shared, strict=True):
        (la, UA), ls = torch.linalg.eigh(f.A.double()), torch.linalg.eigvalsh(f.S.double())
        removed = 1 - build_projector(f, args.energy).kept_fraction
        a = inputs[name]
        norms = a.norm(dim=-1)
        mean = a.flatten(0, 1).double().mean(0)  # is A's top direction the mean input? (A is not centred)
        top_vector = UA[:, -1]
        mean_share, mean_cos = float(mean @ mean / la.sum()), float((top_vector @ mean).abs() / mean.norm())
        print(f"layer {layer:>2}: γ {args.energy} removes {removed:6.2%} of the products ({1 - s.kept_fraction:6.2%} "
              f"under a shared threshold; curvature trace {float(la.sum() * ls.sum()):.3g}); top eigenvalue "
              f"{float(la[-1] / la.sum()):6.1%} of A's trace, {float(ls[-1] / ls.sum()):5.1%} of S's | on "
              f"{args.windows} windows: top share {top_share(a.flatten(0, 1)):6.1%}, without position 0 "
              f"{top_share(a[:, 1:].flatten(0, 1)):6.1%}; |a| at position 0 {float(norms[:, 0].mean()):7.1f}, "
              f"median {float(norms.median()):.1f}; mean input: {mean_share:5.1%} of A's trace, |cos| with A's top "
              f"eigenvector {mean_cos:.3f}")
        if args.outlier_share is not None:
            rule = 1 - build_projector(f, args.energy, outlier_share=args.outlier_share).kept_fraction
            print(f"          outlier share {args.outlier_share}: γ removes {rule:6.2%}; top 3 of A "
                  f"{top_three(la)}, of S {top_three(ls)}")


if __name__ == "__main__":
    main()
