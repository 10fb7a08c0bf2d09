"""Where a CrispEdit step's projection time goes: the whole Eq. 6 projection of every cached layer, its two
U_S rotations alone, one plain matmul of the same shape (the machine's matmul speed), the projector build,
per layer how many eigenvectors take part in a removed direction, and the staircase against its form before
2026-12-01 (16 equal row blocks, each over the columns it removes) and at other row-block counts, alternated.

Usage: .venv/bin/python -m lab.bench_projector CACHE.safetensors [--energy 0.8] [--reps 20] [--blocks 2,4,6,8,16]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from crispedit.cache import CurvatureCache
from crispedit.projector import build_projector, staircase_blocks


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


def staircase_multiply_adds(projectors) -> int:
    """Multiply-adds of the staircase blocks (both matmuls of each), the U_S rotations left out."""
    return sum(2 * (r1 - r0) * p.U_in.shape[0] * (p.U_in.shape[1] - c if from_kept else c)
               for p in projectors for r0, r1, c, from_kept in p.blocks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("--energy", type=float, default=0.8)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--blocks", type=lambda t: [int(x) for x in t.split(",")], default=[],
                        help="also time the staircase split into at most these many row blocks, e.g. 2,4,6,8,16")
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
    forms = {"current": projectors,
             "removed side only, 16 equal blocks (before 2026-12-01)":
                 [dataclasses.replace(p, blocks=removed_side_blocks(p.removed)) for p in projectors]}
    for n in args.blocks:
        forms[f"at most {n} blocks"] = [dataclasses.replace(p, blocks=staircase_blocks(p.removed, n))
                                        for p in projectors]
    times = {name: [] for name in forms}
    for _ in range(args.reps):  # alternately, so machine noise hits every form alike
        for name, form in forms.items():
            times[name].append(median_seconds(lambda form=form: [p(g) for p, g in zip(form, grads, strict=True)], 1))
    reference = sorted(times["current"])[args.reps // 2]
    for name, form in forms.items():
        seconds = sorted(times[name])[args.reps // 2]
        difference = max(float((p(g) - q(g)).abs().max()) for p, q, g in zip(form, projectors, grads, strict=True))
        print(f"{name}: {seconds * 1e3:.1f} ms ({seconds / reference:.3f} of current), staircase "
              f"{staircase_multiply_adds(form) / 1e9:.2f} G multiply-adds, largest difference {difference:.1e}")
    for name, p in zip(cache.factors, projectors, strict=True):  # what sets each layer's cost
        print(f"  {name}: removed {1 - p.kept_fraction:.1%} of the products, over {p.U_out.shape[1]} of "
              f"{p.U_out.shape[0]} S-eigenvectors and {int(p.removed.any(dim=0).sum())} of {p.U_in.shape[0]} "
              f"A-eigenvectors; {sum(b[3] for b in p.blocks)} of {len(p.blocks)} row blocks from the kept side")


if __name__ == "__main__":
    main()
