"""Bytes on disk per version: edits applied one after another by the worker's code, default settings, then one
by the paper's recipe; each version's new blobs against its whole edited tensors.

Each of the 8 facts of `lab/tuning_facts.json` is posted as its own request and committed on the head, so the
versions form one lineage (v_k's changes are chained to v_(k-1)'s). Reported per version: the bytes of the
blobs it added, the whole tensors' bytes, each blob's chain depth, and how far the stored weight is from the
one the edit made, in units in the last place of the tensor's largest entry. Then the time to read the last
version's tensors from disk (every change down to the whole tensors, hashes checked) against a version stored
whole.

Usage: .venv/bin/python -m lab.bench_storage [--out runs/storage] [--n 8]
       (needs the Redis at 127.0.0.1:6379; reuses the registry's curvature cache under --out if there is one)
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

import redis
import torch

from core.jobs import JobStore
from core.settings import Settings
from registry.store import Registry
from worker.runtime import load_runtime
from worker.tasks import process_pending_leased

FACTS = Path(__file__).with_name("tuning_facts.json")


def record_fidelity(errors: list[float]) -> None:
    """Wrap Registry._put_weight: after each put, the stored tensor's distance from the given one, in ulps."""
    put = Registry._put_weight

    def measured(self, parent, tensor):
        digest = put(self, parent, tensor)
        ulp = torch.finfo(tensor.dtype).eps * float(tensor.abs().max())
        errors.append(float((self.blobs.get(digest).double() - tensor.double().cpu()).abs().max()) / ulp)
        return digest
    Registry._put_weight = measured


def post(rt, store: JobStore, edit: dict, protect: bool, default: Settings) -> dict:
    rt.settings = default.model_copy(update={"protect_neighbours": protect})
    record, _ = store.create(rt.name, {"model": rt.name, "edits": [edit], "author": "bench",
                                       "base_version": rt.registry.resolve(rt.name, "latest"),
                                       "guard": {"kl_budget": 1e9, "min_reliability": 0.0,
                                                 "min_neighbours_unchanged": 0.0}})
    started = time.perf_counter()
    process_pending_leased(rt, store)
    job = store.get(record["id"])
    return {"version": job["version"], "status": job["status"], "job_s": round(time.perf_counter() - started, 1)}


def version_bytes(reg: Registry, model: str, vid: str) -> dict:
    v = reg.get(model, vid)
    parent = reg.get(model, v.parent).tensors
    new = [d for n, d in v.tensors.items() if parent.get(n) != d]
    whole = sum(t.numel() * t.element_size() for t in map(reg.blobs.get, new))
    return {"stored_bytes": sum(reg.blobs.path(d).stat().st_size for d in new), "whole_bytes": whole,
            "depths": sorted({reg.blobs.depth(d) for d in new})}


def read_seconds(reg: Registry, model: str, vid: str, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        reg.tensors(model, vid)
        times.append(time.perf_counter() - started)
    return sorted(times)[reps // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/storage")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--redis-db", type=int, default=14)
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(registry_root=out / "registry", redis_url=f"redis://127.0.0.1:6379/{args.redis_db}",
                        key_prefix=f"bench{uuid.uuid4().hex[:6]}")
    rt = load_runtime("smollm2", settings)
    store = JobStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
    errors: list[float] = []
    record_fidelity(errors)
    facts = json.loads(FACTS.read_text())[: args.n]
    rows = []
    try:
        rt.registry.rollback(rt.name, "v0")
        for k, (prompt, target) in enumerate([*facts, facts[0]]):
            recipe = "default" if k < len(facts) else "paper"
            puts = len(errors)
            row = {"edit": prompt, "recipe": recipe,
                   **post(rt, store, {"prompt": prompt, "target": target}, recipe == "default", settings)}
            if row["version"]:
                row.update(version_bytes(rt.registry, rt.name, row["version"]))
                row["ulps_max"] = round(max(errors[puts:]), 2)
                row["read_s"] = round(read_seconds(rt.registry, rt.name, row["version"]), 4)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        for key in store.redis.scan_iter(f"{settings.key_prefix}:*"):
            store.redis.delete(key)
    (out / "storage.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
