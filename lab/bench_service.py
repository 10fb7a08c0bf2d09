"""Service benchmarks on the real SmolLM2 over real HTTP, each stack started with `crispedit serve`.

1. post → live: one edit posted, until its job succeeded and until a query on ``smollm2@latest`` is
   answered by the new version (warm worker, curvature cache built).
2. 32 concurrent single-edit requests (ZsRE records), with coalescing (CRISPEDIT_COALESCE_MAX=32)
   and without (=1): wall time until every job ended, and how many batches and versions it took.
3. ``/v1/completions`` (official openai client, sequential, greedy) against ``ModelServer.generate``
   called directly in this process on the same version, in alternating rounds.

Usage: .venv/bin/python -m lab.bench_service [--edits 32] [--queries 16] [--max-tokens 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from openai import OpenAI

from cli.serve import free_port
from lab.edit_sets import load_edit_dataset

KEY = "bench-key"
DONE = {"succeeded", "rejected", "failed", "cancelled"}


class Stack:
    """`crispedit serve` (API, one worker, embedded Redis) on its own registry, sharing converted models."""

    def __init__(self, home: Path, root: Path, coalesce_max: int, curvature: Path, extra: dict | None = None) -> None:
        (root / "registry" / "curvature").mkdir(parents=True, exist_ok=True)
        if curvature.exists():
            shutil.copy(curvature, root / "registry" / "curvature" / "smollm2.safetensors")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRISPEDIT_")}
        env.update(CRISPEDIT_HOME=str(home), CRISPEDIT_REGISTRY_ROOT=str(root / "registry"),
                   CRISPEDIT_API_KEYS=f"{KEY}:admin", CRISPEDIT_COALESCE_MAX=str(coalesce_max), **(extra or {}))
        self.log = root / "serve.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(self.port)],
                                     env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)
        self.openai = OpenAI(base_url=f"{self.url}/v1", api_key=KEY)
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited; see {self.log}")
            time.sleep(0.2)
        raise TimeoutError(f"not ready; see {self.log}")

    def post(self, edits: list[dict]) -> str:
        r = self.http.post("/v1/edits", json={"model": "smollm2", "edits": edits})
        r.raise_for_status()
        return r.json()["id"]

    def wait(self, job_id: str, poll: float = 0.05) -> dict:
        while True:
            job = self.http.get(f"/v1/edits/{job_id}").json()
            if job["status"] in DONE:
                return job
            time.sleep(poll)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def post_to_live(stack: Stack, edit: dict) -> dict:
    started = time.perf_counter()
    job = stack.wait(stack.post([edit]))
    succeeded = time.perf_counter() - started
    if job["status"] != "succeeded":
        return {"status": job["status"], "error": job["error"]}
    messages = [{"role": "user", "content": edit["prompt"]}]
    out = stack.openai.chat.completions.create(model="smollm2@latest", messages=messages, max_tokens=8, temperature=0)
    live = time.perf_counter() - started
    return {"status": "succeeded", "version": job["version"], "job_seconds": round(succeeded, 2),
            "live_seconds": round(live, 2), "served_by": out.model, "edit_seconds": job["metrics"]["seconds"],
            "answer": out.choices[0].message.content, "target": edit["target"]}


def concurrent_edits(stack: Stack, edits: list[dict]) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(len(edits)) as pool:
        ids = list(pool.map(lambda e: stack.post([e]), edits))
        jobs = list(pool.map(lambda i: stack.wait(i, poll=1.0), ids))  # 32 clients at 20 Hz would load the CPU
    wall = time.perf_counter() - started
    batches = {tuple(sorted(j["batch"] or [j["id"]])) for j in jobs}
    statuses = [j["status"] for j in jobs]
    return {"requests": len(edits), "wall_seconds": round(wall, 1),
            "edits_per_minute": round(60 * len(edits) / wall, 2),
            "batches": len(batches), "versions": len({j["version"] for j in jobs if j["version"]}),
            "succeeded": statuses.count("succeeded"), "rejected": statuses.count("rejected"),
            "failed": statuses.count("failed"),
            "reliability": [j["metrics"]["reliability"] for j in jobs if j.get("metrics")][:1],
            "errors": sorted({j["error"] for j in jobs if j["error"]})}


def completion_throughput(stack: Stack, home: Path, root: Path, prompts: list[str], max_tokens: int,
                          rounds: int) -> dict:
    os.environ["CRISPEDIT_HOME"] = str(home)
    from registry import Registry
    from service.serving import ModelServer

    direct = ModelServer("smollm2", "smollm2", Registry(root / "registry"), device="cpu")
    version = direct.resolve("latest")
    http_tps, direct_tps = [], []
    for _ in range(rounds):
        t, tokens = time.perf_counter(), 0
        for p in prompts:
            tokens += direct.generate(version, p, max_tokens, temperature=0).completion_tokens
        direct_tps.append(tokens / (time.perf_counter() - t))
        t, tokens = time.perf_counter(), 0
        for p in prompts:
            out = stack.openai.completions.create(model=f"smollm2@{version}", prompt=p, max_tokens=max_tokens,
                                                  temperature=0)
            tokens += out.usage.completion_tokens
        http_tps.append(tokens / (time.perf_counter() - t))
    return {"version": version, "prompts": len(prompts), "max_tokens": max_tokens, "rounds": rounds,
            "direct_tokens_per_s": [round(x, 1) for x in direct_tps],
            "http_tokens_per_s": [round(x, 1) for x in http_tps],
            "ratio_median": round(statistics.median(h / d for h, d in zip(http_tps, direct_tps, strict=True)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=32)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-reps", type=int, default=3)
    parser.add_argument("--out", default="runs/bench-service")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    home = out / "home"
    curvature = out / "curvature-smollm2.safetensors"
    records = load_edit_dataset("zsre", n=args.edits + args.latency_reps + 1, offset=200)
    edits = [{"prompt": r.prompt, "target": r.target} for r in records]
    warmup, latency_edits, batch_edits = edits[0], edits[1 : 1 + args.latency_reps], edits[1 + args.latency_reps :]
    results: dict = {"cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}

    for arm, coalesce_max in (("coalescing", args.edits), ("one_by_one", 1)):
        shutil.rmtree(out / arm, ignore_errors=True)
        t = time.perf_counter()
        stack = Stack(home, out / arm, coalesce_max, curvature)
        try:
            ready = time.perf_counter() - t
            first = post_to_live(stack, warmup)  # loads the worker (and builds the curvature cache once)
            print(f"[{arm}] ready {ready:.1f}s, first edit {first}", flush=True)
            results[arm] = {"ready_seconds": round(ready, 1), "first_edit": first}
            if not curvature.exists():
                shutil.copy(out / arm / "registry" / "curvature" / "smollm2.safetensors", curvature)
            if arm == "coalescing":
                results["post_to_live"] = [post_to_live(stack, e) for e in latency_edits]
                print(json.dumps(results["post_to_live"], indent=1), flush=True)
                prompts = [e["prompt"] for e in edits[: args.queries]]
                results["completions"] = completion_throughput(stack, home, out / arm, prompts, args.max_tokens,
                                                               args.rounds)
                print(json.dumps(results["completions"], indent=1), flush=True)
            results[arm]["concurrent"] = concurrent_edits(stack, batch_edits)
            print(f"[{arm}] {json.dumps(results[arm]['concurrent'])}", flush=True)
        finally:
            stack.stop()
    on, off = results["coalescing"]["concurrent"], results["one_by_one"]["concurrent"]
    results["coalescing_speedup"] = round(off["wall_seconds"] / on["wall_seconds"], 2)
    (out / "service.json").write_text(json.dumps(results, indent=1))
    print(f"coalescing speed-up {results['coalescing_speedup']}×; results in {out / 'service.json'}")


if __name__ == "__main__":
    main()
