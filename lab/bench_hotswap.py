"""Hot-swap latency between two SmolLM2 versions (5 edited layers) vs a plain in-memory copy; bytes per version.

Usage: .venv/bin/python -m lab.bench_hotswap [--reps 50] [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from crispedit.arch import default_layers, editable_modules
from crispedit.models import load_model, model_fingerprint
from registry import HotSwapModel, Registry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--root", default=None)
    args = parser.parse_args()
    model, _ = load_model("smollm2", device="cpu")
    root = args.root or tempfile.mkdtemp(prefix="crispedit-registry-")
    reg = Registry(root)
    reg.create_model("smollm2", "smollm2", model_fingerprint(model))
    names = [f"{n}.weight" for n in editable_modules(model, default_layers(model))]
    params = dict(model.named_parameters())
    originals = {n: params[n].detach().clone() for n in names}
    g = torch.Generator().manual_seed(0)
    head = "v0"
    for _ in range(2):  # two versions, each changing all five layers (what an edit commits)
        new = {n: originals[n] + 1e-3 * torch.randn(originals[n].shape, generator=g) for n in names}
        head = reg.commit("smollm2", head, new, originals=originals).id
    changed_bytes = sum(t.numel() * t.element_size() for t in originals.values())
    v2 = reg.get("smollm2", "v2")
    stored = sum(reg.blobs.path(d).stat().st_size for d in v2.tensors.values())

    holder = HotSwapModel(model, reg, "smollm2")
    holder.switch_to("v1")
    holder.switch_to("v2")  # both versions now in the LRU: what a serving process sees in steady state
    swap = []
    for i in range(args.reps):
        t0 = time.perf_counter()
        holder.switch_to("v1" if i % 2 == 0 else "v2")
        swap.append(time.perf_counter() - t0)
    sources = [{n: originals[n].clone() for n in names}, reg.tensors("smollm2", "v1")]
    copy = []
    with torch.no_grad():
        for i in range(args.reps):
            t0 = time.perf_counter()
            for n, t in sources[i % 2].items():
                params[n].copy_(t)
            copy.append(time.perf_counter() - t0)
    result = {
        "swap_ms_median": 1e3 * statistics.median(swap), "copy_ms_median": 1e3 * statistics.median(copy),
        "swap_over_copy": statistics.median(swap) / statistics.median(copy),
        "changed_tensor_bytes": changed_bytes, "stored_bytes_per_version": stored,
        "stored_over_changed": stored / changed_bytes, "reps": args.reps, "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
