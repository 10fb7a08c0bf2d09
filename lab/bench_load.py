"""Query load on `/v1/completions` (real SmolLM2, real HTTP): 1, 4 and 16 concurrent clients.

Each level sends a fixed number of greedy completions of ``--max-tokens`` tokens (official openai client,
one client object per thread) and reports p50/p99 latency and throughput. The API runs alone
(`crispedit serve --no-worker`, embedded Redis), so the figures are the serving path only. With ``--batches
1,16`` the same levels run against one server per ``CRISPEDIT_GENERATION_BATCH`` value, one after the other in
this run (1: every request alone, as before batching). ``--versions N`` spreads the requests over v0 and N - 1
versions committed for the run (each down_proj of layers 4-8 nudged by noise: as an edit's, only those layers
differ), so batches mix versions.

Usage: .venv/bin/python -m lab.bench_load [--levels 1,4,16] [--batches 1,16] [--versions 1] [--requests 32]
       [--max-tokens 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from openai import OpenAI

from cli.serve import free_port

PROMPTS = ["The capital of France is", "Water boils at", "The author of Hamlet is", "The largest planet is",
           "Photosynthesis is the process", "The speed of light is", "In 1492, Columbus", "A prime number is"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def commit_versions(root: Path, n: int) -> None:
    """v1 … v(n-1) of smollm2, each with noise on the edited layers' down_proj, committed straight to the registry."""
    import torch

    from crispedit.arch import default_layers, editable_modules
    from crispedit.models import load_model, model_fingerprint
    from registry import Registry

    model, _ = load_model("smollm2", device="cpu")
    reg = Registry(root)
    reg.create_model("smollm2", "smollm2", model_fingerprint(model))
    names = [f"{m}.weight" for m in editable_modules(model, default_layers(model))]
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    for _ in range(len(reg.versions("smollm2")), n):
        tensors = {name: params[name] + 1e-3 * torch.randn(params[name].shape, generator=g) for name in names}
        reg.commit("smollm2", reg.resolve("smollm2", "latest"), tensors, originals={n: params[n] for n in names})


def run_levels(url: str, levels: list[int], requests: int, max_tokens: int, versions: int) -> list[dict]:
    rows = []
    for level in levels:
        clients = [OpenAI(base_url=f"{url}/v1", api_key="load-key", max_retries=0) for _ in range(level)]

        def one(i: int, clients=clients) -> tuple[float, int]:
            started = time.perf_counter()
            r = clients[i % len(clients)].completions.create(model=f"smollm2@v{i % versions}",
                                                             prompt=PROMPTS[i % len(PROMPTS)],
                                                             max_tokens=max_tokens, temperature=0)
            return time.perf_counter() - started, r.usage.completion_tokens

        for v in range(versions):  # warm-up: every version loaded once
            one(v)
        started = time.perf_counter()
        with ThreadPoolExecutor(level) as pool:
            done = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - started
        latencies = [d for d, _ in done]
        rows.append({"clients": level, "p50_s": round(statistics.median(latencies), 3),
                     "p99_s": round(percentile(latencies, 0.99), 3), "requests_per_s": round(len(done) / wall, 2),
                     "tokens_per_s": round(sum(t for _, t in done) / wall, 1), "wall_s": round(wall, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def serve(out: Path, batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CRISPEDIT_REDIS_URL"}
    env.update(CRISPEDIT_REGISTRY_ROOT=str(out / "registry"), CRISPEDIT_API_KEYS="load-key:reader",
               CRISPEDIT_GENERATION_BATCH=str(batch))
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--no-worker", "--port", str(port)],
                            env=env, stdout=open(out / f"serve-batch{batch}.log", "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:  # the API alone: no worker here
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--batches", default="16", help="CRISPEDIT_GENERATION_BATCH values, one server each")
    parser.add_argument("--versions", type=int, default=1, help="spread the requests over this many versions")
    parser.add_argument("--requests", type=int, default=32, help="completions per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", default="runs/bench-load")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.versions > 1:
        commit_versions(out / "registry", args.versions)
    results = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "max_tokens": args.max_tokens,
               "requests_per_level": args.requests, "versions": args.versions, "runs": []}
    for batch in map(int, args.batches.split(",")):
        proc, url = serve(out, batch)
        try:
            levels = run_levels(url, [int(x) for x in args.levels.split(",")], args.requests, args.max_tokens,
                                args.versions)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        results["runs"].append({"generation_batch": batch, "levels": levels})
        (out / "load.json").write_text(json.dumps(results, indent=1))
    print("| generation batch | clients | p50 (s) | p99 (s) | requests/s | tokens/s |\n|---|---|---|---|---|---|")
    for run in results["runs"]:
        for r in run["levels"]:
            print(f"| {run['generation_batch']} | {r['clients']} | {r['p50_s']} | {r['p99_s']} | "
                  f"{r['requests_per_s']} | {r['tokens_per_s']} |")


if __name__ == "__main__":
    main()
