"""Query load on `/v1/completions` (real SmolLM2, real HTTP): 1, 4 and 16 concurrent clients.

Each level sends a fixed number of greedy completions of ``--max-tokens`` tokens (official openai client,
one client object per thread) and reports p50/p99 latency and throughput. The API runs alone
(`crispedit serve --no-worker`, embedded Redis), so the figures are the serving path only.

Usage: .venv/bin/python -m lab.bench_load [--levels 1,4,16] [--requests 32] [--max-tokens 16] [--out DIR]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="completions per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", default="runs/bench-load")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CRISPEDIT_REDIS_URL"}
    env.update(CRISPEDIT_REGISTRY_ROOT=str(out / "registry"), CRISPEDIT_API_KEYS="load-key:reader")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--no-worker", "--port", str(port)],
                            env=env, stdout=open(out / "serve.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:  # the API alone: no worker here
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        results = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "max_tokens": args.max_tokens,
                   "requests_per_level": args.requests, "levels": []}
        for level in map(int, args.levels.split(",")):
            clients = [OpenAI(base_url=f"{url}/v1", api_key="load-key", max_retries=0) for _ in range(level)]

            def one(i: int, clients=clients) -> tuple[float, int]:
                started = time.perf_counter()
                r = clients[i % len(clients)].completions.create(model="smollm2@v0", prompt=PROMPTS[i % len(PROMPTS)],
                                                                 max_tokens=args.max_tokens, temperature=0)
                return time.perf_counter() - started, r.usage.completion_tokens

            one(0)  # warm-up
            started = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                done = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - started
            latencies = [d for d, _ in done]
            row = {"clients": level, "p50_s": round(statistics.median(latencies), 3),
                   "p99_s": round(percentile(latencies, 0.99), 3), "requests_per_s": round(len(done) / wall, 2),
                   "tokens_per_s": round(sum(t for _, t in done) / wall, 1), "wall_s": round(wall, 1)}
            results["levels"].append(row)
            print(json.dumps(row), flush=True)
        (out / "load.json").write_text(json.dumps(results, indent=1))
        print("| clients | p50 (s) | p99 (s) | requests/s | tokens/s |\n|---|---|---|---|---|")
        for r in results["levels"]:
            print(f"| {r['clients']} | {r['p50_s']} | {r['p99_s']} | {r['requests_per_s']} | {r['tokens_per_s']} |")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
