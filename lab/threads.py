"""Torch's thread count for the API and the worker, measured: greedy generation in one process while another
process edits (forward and backward steps on SmolLM2), as `crispedit serve` runs them on one machine.

For each pair of thread counts (the generating process's, the editing process's), with the editing process
idle or busy: the seconds to generate 32 tokens (median of 3), and the editing process's steps per second
alone and while the other generates.

Usage: .venv/bin/python -m lab.threads [--threads 1/1,1/2,2/2] [--out runs/threads.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch


def editing(threads: int, stop, steps) -> None:
    """A worker's edit loop: forward and backward over two 48-token sequences, counting steps."""
    from crispedit.models import load_model

    torch.set_num_threads(threads)
    model, _ = load_model("smollm2", device="cpu")
    model.model.layers[4].mlp.down_proj.weight.requires_grad_(True)
    ids = torch.randint(0, 1000, (2, 48))
    while not stop.is_set():
        model(input_ids=ids, labels=ids).loss.backward()
        steps.value += 1


def generation_seconds(model, tok, reps: int = 3) -> float:
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        model.generate(**enc, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    n = torch.get_num_threads()
    parser.add_argument("--threads", default=f"1/1,1/{n},{n}/{n}", help="API/worker thread counts, comma-separated")
    parser.add_argument("--out", default="runs/threads.json")
    args = parser.parse_args()
    from crispedit.models import load_model

    model, tok = load_model("smollm2", device="cpu")
    rows = []
    ctx = mp.get_context("spawn")
    for pair in args.threads.split(","):
        threads, worker_threads = map(int, pair.split("/"))
        torch.set_num_threads(threads)
        idle = generation_seconds(model, tok)
        stop, steps = ctx.Event(), ctx.Value("i", 0)
        proc = ctx.Process(target=editing, args=(worker_threads, stop, steps))
        proc.start()
        while steps.value < 2:  # loaded and stepping
            time.sleep(0.5)
        before, started = steps.value, time.perf_counter()
        time.sleep(10)
        alone = (steps.value - before) / (time.perf_counter() - started)
        before, started = steps.value, time.perf_counter()
        busy = generation_seconds(model, tok)
        rate = (steps.value - before) / (time.perf_counter() - started)
        stop.set()
        proc.join()
        rows.append({"api_threads": threads, "worker_threads": worker_threads, "generate_s_idle": round(idle, 2),
                     "generate_s_while_editing": round(busy, 2),
                     "edit_steps_per_s_alone": round(alone, 2),
                     "edit_steps_per_s_while_generating": round(rate, 2)})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
