"""How much precision the eigendecompositions need: fp64 against fp32 on a real curvature cache.

For each layer of CACHE (e.g. the worker's default SmolLM2 cache): the seconds of each `eigh`, the share of the
γ-mask that differs, and what matters for an edit, the projected step's curvature under the fp64 factors,
tr(S P(Q) A P(Q)ᵀ) / tr(S Q A Qᵀ) (the capability loss a unit step costs, Eq. 2 with K-FAC), for gradient-like
Q = Σ g aᵀ drawn from each factor's own distribution, plus ‖P32 Q − P64 Q‖ / ‖P64 Q‖.

Usage: .venv/bin/python -m lab.eigh_precision CACHE [--gamma 0.8] [--out runs/eigh_precision.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from crispedit.cache import CurvatureCache
from crispedit.eigen import eigh_psd
from crispedit.projector import build_projector


def timed_eigh(matrix: torch.Tensor, precision: torch.dtype) -> float:
    started = time.perf_counter()
    eigh_psd(matrix, precision)
    return time.perf_counter() - started


def curvature_of(Q: torch.Tensor, A: torch.Tensor, S: torch.Tensor) -> float:
    return float(torch.trace(S @ Q @ A @ Q.T))


def gradient_like(A: torch.Tensor, S: torch.Tensor, tokens: int, seed: int) -> torch.Tensor:
    """Σ_t g_t a_tᵀ with a ~ N(0, A), g ~ N(0, S): a weight gradient over ``tokens`` tokens."""
    g = torch.Generator().manual_seed(seed)
    root_a = torch.linalg.cholesky(A + 1e-6 * A.diagonal().mean() * torch.eye(len(A), dtype=A.dtype))
    root_s = torch.linalg.cholesky(S + 1e-6 * S.diagonal().mean() * torch.eye(len(S), dtype=S.dtype))
    a = torch.randn(tokens, len(A), generator=g, dtype=A.dtype) @ root_a.T
    s = torch.randn(tokens, len(S), generator=g, dtype=S.dtype) @ root_s.T
    return s.T @ a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--gamma", type=float, default=0.8)
    parser.add_argument("--out", default="runs/eigh_precision.json")
    args = parser.parse_args()
    cache = CurvatureCache.load(args.cache)
    rows = []
    for name, f in cache.factors.items():
        A, S = f.A.double(), f.S.double()
        p64 = build_projector(f, args.gamma, precision=torch.float64)
        p32 = build_projector(f, args.gamma, precision=torch.float32)
        row = {"layer": name, "d_out": len(S), "d_in": len(A),
               "eigh_s": {"fp64": timed_eigh(f.A, torch.float64) + timed_eigh(f.S, torch.float64),
                          "fp32": timed_eigh(f.A, torch.float32) + timed_eigh(f.S, torch.float32)},
               "kept_fraction": {"fp64": p64.kept_fraction, "fp32": p32.kept_fraction}}
        ratios = {"fp64": [], "fp32": []}
        differences = []
        for seed in range(4):
            Q = gradient_like(A, S, 32, seed)
            q64, q32 = p64(Q.float()).double(), p32(Q.float()).double()
            total = curvature_of(Q, A, S)
            ratios["fp64"].append(curvature_of(q64, A, S) / total)
            ratios["fp32"].append(curvature_of(q32, A, S) / total)
            differences.append(float((q32 - q64).norm() / q64.norm()))
        row["step_curvature"] = {k: max(v) for k, v in ratios.items()}
        row["relative_difference"] = max(differences)
        rows.append(row)
        print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
