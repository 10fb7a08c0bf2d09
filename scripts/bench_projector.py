"""Where a CrispEdit step's projection time goes: the whole Eq. 6 projection of every cached layer, its two
U_S rotations alone, one plain matmul of the same shape (the machine's matmul speed), the projector build,
and per layer how many eigenvectors take part in a removed direction.

Usage: .venv/bin/python scripts/bench_projector.py CACHE.safetensors [--energy 0.8] [--reps 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from crispedit.cache import CurvatureCache
from crispedit.projector import build_projector


def median_seconds(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def removed_side_blocks(removed: torch.Tensor, n_blocks: int = 16) -> list[tuple[int, int, int, bool]]:
    """The staircase's row blocks before 2026-12-01: equal row ranges, each over the columns up to its last removed."""
    bounds = torch.linspace(0, removed.shape[0], min(n_blocks, removed.shape[0]) + 1).round().long().tolist()
    blocks = []
    for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
        used = removed[r0:r1].any(dim=0).nonzero()
        if r1 > r0 and used.numel():
            blocks.append((r0, r1, int(used.max()) + 1, False))
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("--energy", type=float, default=0.8)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    cache = CurvatureCache.load(args.cache)
    started = time.perf_counter()
    projectors = [build_projector(f, args.energy) for f in cache.factors.values()]
    build = time.perf_counter() - started
    torch.manual_seed(0)
    grads = [torch.randn(p.U_out.shape[0], p.U_in.shape[0]) for p in projectors]
    whole = median_seconds(lambda: [p(g) for p, g in zip(projectors, grads, strict=True)], args.reps)
    rotations = median_seconds(lambda: [p.U_out @ (p.U_out.T @ g) for p, g in zip(projectors, grads, strict=True)],
                               args.reps)
    d_out, d_in = grads[0].shape
    a, b = torch.randn(d_out, d_out), torch.randn(d_out, d_in)
    matmul = median_seconds(lambda: a @ b, args.reps)
    print(f"{len(projectors)} layers at γ = {args.energy}: projection {whole * 1e3:.1f} ms, of which the two U_S "
          f"rotations {rotations * 1e3:.1f} ms; one {d_out}×{d_out}×{d_in} matmul {matmul * 1e3:.2f} ms "
          f"({2 * d_out * d_out * d_in / matmul / 1e9:.0f} GFLOP/s); building the projectors {build:.2f} s")
    earlier = [dataclasses.replace(p, blocks=removed_side_blocks(p.removed)) for p in projectors]
    difference = max(float((p(g) - e(g)).abs().max()) for p, e, g in zip(projectors, earlier, grads, strict=True))
    now_t, earlier_t = [], []
    for _ in range(args.reps):  # alternately, so machine noise hits both alike
        now_t.append(median_seconds(lambda: [p(g) for p, g in zip(projectors, grads, strict=True)], 1))
        earlier_t.append(median_seconds(lambda: [p(g) for p, g in zip(earlier, grads, strict=True)], 1))
    now_s, earlier_s = sorted(now_t)[len(now_t) // 2], sorted(earlier_t)[len(earlier_t) // 2]
    print(f"staircase from each block's narrower side {now_s * 1e3:.1f} ms against removed side only "
          f"{earlier_s * 1e3:.1f} ms: ratio {now_s / earlier_s:.3f} (largest difference {difference:.1e})")
    for name, p in zip(cache.factors, projectors, strict=True):  # what sets each layer's cost
        print(f"  {name}: removed {1 - p.kept_fraction:.1%} of the products, over {p.U_out.shape[1]} of "
              f"{p.U_out.shape[0]} S-eigenvectors and {int(p.removed.any(dim=0).sum())} of {p.U_in.shape[0]} "
              f"A-eigenvectors; {sum(b[3] for b in p.blocks)} of {len(p.blocks)} row blocks from the kept side")


if __name__ == "__main__":
    main()
