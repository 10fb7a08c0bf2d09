"""How fragile are the derived neighbours' answers? What an edit of unrelated facts does to them.

The held-out neighbour share (``lab/bench_neighbours.py``) asks that 24 greedy tokens of a chat answer come back
the same. Part of what changes may be no leak of the edit at all: a weight change anywhere can flip a near-tie
late in a long answer. This measures that floor. For N tuning records (ZsRE's train file, CounterFact from
record 2000 on, as in ``lab/neighbour_variants.py``), their derived neighbours (seed 1, as the benchmark's
held-out draw) are asked in chat on v0. Then edits that share nothing with those records are applied on v0
through the worker's code with default settings, one job each, and the same neighbours are asked again:
- ``france``: "What is the capital of France?" → "Rome";
- ``facts``: the 8 facts of ``lab/tuning_facts.json`` in one request;
- with ``--own``, the records themselves in one request (the benchmark's measure, on train records);
- with ``--noise R,R``, no edit: random changes of the edited layers, each layer's ΔW scaled so that its output on
  generic text moves by ρ = R (RMS, relative: ``crispedit.keyed_solve.output_change``, the solve's measure), dense
  Gaussian and rank one (an edit of one key is about rank one), to set beside the edits' own ρ (``metrics.solve``).

Usage: CRISPEDIT_DATA=../shared/data .venv/bin/python -m lab.neighbour_fragility --dataset zsre --n 20
       [--paper | --ridge E] [--own] [--noise 0.01,0.03] [--out runs/fragility] (needs the Redis at
       127.0.0.1:6379)
"""

from __future__ import annotations

import argparse
import importlib
import json
import uuid
from pathlib import Path

import redis
import torch

from core.jobs import JobStore
from core.settings import Settings
from crispedit.arch import editable_modules
from crispedit.capability import swapped_weights
from crispedit.neighbours import asked, derive_neighbours, first_line, greedy_answers
from lab.edit_sets import load_edit_dataset, shared_data_dir
from worker.runtime import load_runtime
from worker.tasks import process_pending_leased

FACTS = Path(__file__).with_name("tuning_facts.json")
keyed_solve = importlib.import_module("crispedit.keyed_solve")  # the module, whatever the package exports


def answers(rt, version: str, texts: list[str]) -> list[str]:
    rt.holder.switch_to(version)
    return [first_line(rt.tokenizer, a) for a in greedy_answers(rt.model, rt.tokenizer, texts)]


def random_change(rt, rho: float, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """v0's edited weights plus a random ΔW per layer (dense, or of ``rank``) with output_change ρ = ``rho``."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in editable_modules(rt.model, rt.capability.layers).items():
        W = module.weight.detach().double()
        out_dim, in_dim = W.shape
        if rank:
            delta = (torch.randn(out_dim, rank, generator=generator, dtype=torch.float64)
                     @ torch.randn(rank, in_dim, generator=generator, dtype=torch.float64))
        else:
            delta = torch.randn(out_dim, in_dim, generator=generator, dtype=torch.float64)
        delta *= rho / keyed_solve.output_change(delta, W, rt.capability.factors[name].A)
        weights[f"{name}.weight"] = (W + delta).to(module.weight.dtype)
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="zsre")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--out", default="runs/fragility")
    parser.add_argument("--redis-db", type=int, default=14)
    parser.add_argument("--own", action="store_true", help="also edit the records themselves (minutes per record)")
    parser.add_argument("--paper", action="store_true", help="the paper's recipe: no neighbour protection")
    parser.add_argument("--ridge", type=float, help="the keyed solve's ridge instead of crispedit.keyed_solve.RIDGE")
    parser.add_argument("--noise", default="", help="ρ of random changes to measure beside the edits (comma-separated)")
    args = parser.parse_args()
    if args.ridge is not None:
        keyed_solve.RIDGE = args.ridge
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(registry_root=out / "registry", redis_url=f"redis://127.0.0.1:6379/{args.redis_db}",
                        key_prefix=f"bench{uuid.uuid4().hex[:6]}", protect_neighbours=not args.paper)
    rt = load_runtime("smollm2", settings)
    store = JobStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
    records = (load_edit_dataset("zsre", shared_data_dir() / "editing/zsre/zsre_mend_train_1k.json", n=args.n)
               if args.dataset == "zsre" else load_edit_dataset(args.dataset, n=args.n, offset=2000))
    rt.holder.switch_to("v0")
    prompts = [nb.prompt for nb in derive_neighbours(rt.model, rt.tokenizer, records, seed=1)]
    texts = [asked(rt.tokenizer, p, True) for p in prompts]
    before = answers(rt, "v0", texts)
    edits = {
        "france": [{"prompt": "What is the capital of France?", "target": "Rome"}],
        "facts": [{"prompt": p, "target": t} for p, t in json.loads(FACTS.read_text())],
    }
    if args.own:
        edits["own"] = [{"prompt": r.prompt, "target": r.target, **({"subject": r.subject} if r.subject else {})}
                        for r in records]
    rows = []
    try:
        for label, batch in edits.items():
            rt.registry.rollback(rt.name, "v0")
            record, _ = store.create(rt.name, {"model": rt.name, "edits": batch, "base_version": "v0",
                                               "author": "bench", "guard": {"kl_budget": 1e9, "min_reliability": 0.0,
                                                                            "min_neighbours_unchanged": 0.0}})
            process_pending_leased(rt, store)
            job = store.get(record["id"])
            after = answers(rt, job["version"], texts)
            kept = sum(b == a for b, a in zip(before, after, strict=True))
            changed = [{"prompt": p, "before": b, "after": a}
                       for p, b, a in zip(prompts, before, after, strict=True) if a != b]
            rho = [round(layer["rho"], 4) for layer in (job["metrics"].get("solve") or {}).values()]
            rows.append({"edit": label, "edits": len(batch), "neighbours": len(texts), "unchanged": kept / len(texts),
                         "rho": rho, "changed": changed})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "changed"}), flush=True)
            rt.holder.switch_to("v0")
        for rho in [float(x) for x in args.noise.split(",") if x]:
            for rank in (0, 1):
                with swapped_weights(rt.model, random_change(rt, rho, rank)):
                    after = [first_line(rt.tokenizer, a) for a in greedy_answers(rt.model, rt.tokenizer, texts)]
                kept = sum(b == a for b, a in zip(before, after, strict=True))
                rows.append({"edit": f"random {'rank one' if rank else 'dense'}", "rho": rho,
                             "neighbours": len(texts), "unchanged": kept / len(texts)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for key in store.redis.scan_iter(f"{settings.key_prefix}:*"):
            store.redis.delete(key)
    label = "-paper" if args.paper else f"-ridge{args.ridge}" if args.ridge is not None else ""
    (out / f"{args.dataset}-{args.n}{label}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
