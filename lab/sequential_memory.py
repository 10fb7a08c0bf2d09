"""Memory and time of sequential CrispEdit (Alg. 2) as the number of edits grows.

Each run is its own process: it loads SmolLM2 and CACHE, then applies the first N ZsRE test records in chunks
of CHUNK (``EditConfig.sequential_chunk``), and reports its peak resident memory (``ru_maxrss``) against the
memory after loading, and the seconds of each chunk (from one fold event to the next). ``--epochs 1`` measures
the statistics' memory and the fold's cost, not edit quality, in a fraction of the time.

Usage: .venv/bin/python -m lab.sequential_memory CACHE [--n 100,1000] [--chunk 10] [--epochs 1]
       [--out runs/sequential_memory.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path


def run(cache_path: str, n: int, chunk: int, epochs: int, queue) -> None:
    import torch

    from crispedit.cache import CurvatureCache
    from crispedit.edit import EditConfig, edit
    from crispedit.models import load_model
    from lab.edit_sets import load_edit_dataset

    torch.manual_seed(0)
    model, tok = load_model("smollm2", device="cpu")
    cache = CurvatureCache.load(cache_path, model=model)
    requests = load_edit_dataset("zsre", n=n)
    loaded_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    marks = [time.perf_counter()]
    config = EditConfig(max_epochs=epochs, sequential_chunk=chunk, batch_size=chunk)
    result = edit(model, tok, requests, cache, config,
                  on_progress=lambda e: marks.append(time.perf_counter()) if e["event"] == "fold" else None)
    chunk_seconds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    queue.put({"n": len(requests), "chunks": len(chunk_seconds), "loaded_mb": loaded_kb / 1024,
               "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "seconds": round(result.seconds, 1),
               "first_10_chunks_s": round(statistics.median(chunk_seconds[:10]), 2),
               "last_10_chunks_s": round(statistics.median(chunk_seconds[-10:]), 2),
               "features_kept": result.features is not None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--n", default="100,1000")
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", default="runs/sequential_memory.json")
    args = parser.parse_args()
    rows = []
    ctx = mp.get_context("spawn")
    for n in (int(x) for x in args.n.split(",")):
        queue = ctx.Queue()
        process = ctx.Process(target=run, args=(args.cache, n, args.chunk, args.epochs, queue))
        process.start()
        rows.append(queue.get())
        process.join()
        rows[-1]["growth_mb"] = round(rows[-1]["peak_mb"] - rows[-1]["loaded_mb"], 1)
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        print(f"peak {rows[-1]['n']} / {rows[0]['n']} edits: {rows[-1]['peak_mb'] / rows[0]['peak_mb']:.3f}×; "
              f"last 10 chunks / first 10: {rows[-1]['last_10_chunks_s'] / rows[-1]['first_10_chunks_s']:.2f}×")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
