"""Local by default, measured: edits applied by the worker's own code with the service's default settings,
then what changed next to them.

For each dataset, the first N records of its evaluation file (the test split: nothing was tuned on them)
are posted as one edit request (with ``--rounds R``, as R requests in turn, each editing the version the last
committed: the service's sequential editing), with their locality fields left out, so the dataset's locality
prompts stay held out. The worker's code applies it (`process_pending_leased`: real Redis job records, the runtime that
`crispedit worker` loads, the capability guard, a committed version). Then, on that version against v0:
- Rel / Gen TF: teacher-forced reliability on the prompts and generality on the rephrases;
- Loc: the dataset's locality prompts, asked raw as the dataset asks them, whose greedy answer (up to its
  first "." or newline, at most 24 tokens) is the same as v0's;
- Nbr: derived neighbours asked through the chat template, the same measure; "protected" are those the
  edit was given (its report's), "held out" another draw (seed 1) minus those; at most 300 of each;
- KL (the guard's figure; after R rounds, the last version's against v0) and the perplexity change on 40
  WikiText-2 test paragraphs; job seconds.
`--paper` runs the paper's recipe (CRISPEDIT_PROTECT_NEIGHBOURS off) on the same edits.

`--timing 3` instead times one fact ("What is the capital of France?" → "Rome") by both recipes, interleaved.

Usage: .venv/bin/python -m lab.bench_neighbours --datasets zsre,counterfact --n 100 [--paper]
       [--out runs/neighbours] [--path RECORDS.json] [--hyper '{"sequential_chunk": 10}' --label chunk10]
       [--layers 3,4,5,6,7,8,10,12,13,14]
       .venv/bin/python -m lab.bench_neighbours --datasets facts --path lab/tuning_facts.json --n 8 --rounds 8
       (needs the Redis at 127.0.0.1:6379 and ../shared/data)
       .venv/bin/python -m lab.bench_neighbours --timing 3 --out runs/neighbours
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

import redis
import torch

import crispedit.keyed_solve as keyed_solve
import worker.runtime as worker_runtime
from core.jobs import JobStore
from core.settings import Settings
from crispedit.arch import editable_modules, weight_name
from crispedit.capability import heldout_texts, mean_kl, perplexity
from crispedit.evaluate import edit_quality
from crispedit.neighbours import asked, derive_neighbours, first_line, greedy_answers
from lab.edit_sets import load_edit_dataset, shared_data_dir
from worker.runtime import load_runtime
from worker.tasks import process_pending_leased

MEASURED = 300  # derived neighbours measured per set (greedy answers on v0 and the version)


def unchanged(rt, version: str, texts: list[str]) -> tuple[float | None, list[dict]]:
    """Share of ``texts`` whose greedy first line under ``version`` is v0's, and the pairs."""
    if not texts:
        return None, []
    rt.holder.switch_to("v0")
    before = [first_line(rt.tokenizer, a) for a in greedy_answers(rt.model, rt.tokenizer, texts)]
    rt.holder.switch_to(version)
    after = [first_line(rt.tokenizer, a) for a in greedy_answers(rt.model, rt.tokenizer, texts)]
    pairs = [{"text": t, "before": b, "after": a} for t, b, a in zip(texts, before, after, strict=True)]
    return sum(b == a for b, a in zip(before, after, strict=True)) / len(texts), pairs


def kl_against(rt, version: str, base: str = "v0") -> float:
    """The guard's KL(``base`` ‖ ``version``) on its texts, over the edited layers' weights."""
    modules = editable_modules(rt.model, rt.capability.layers)
    weights = {}
    for ref in (base, version):
        rt.holder.switch_to(ref)
        weights[ref] = {weight_name(n): m.weight.detach().clone() for n, m in modules.items()}
    return mean_kl(rt.model, rt.tokenizer, rt.guard_texts, weights[base], weights[version])


def run(rt, store: JobStore, dataset: str, n: int, label: str, out: Path, path: str | None = None,
        hyper: dict | None = None, rounds: int = 1) -> dict:
    """Post the first ``n`` records in ``rounds`` sequential jobs (each on the version the last committed, the
    first on v0), then measure the last version against v0 over all of them."""
    requests = load_edit_dataset(dataset, path, n=n)
    rt.registry.rollback(rt.name, "v0")  # each run starts on the base
    size = -(-len(requests) // rounds)
    row = {"dataset": dataset, "recipe": label, "n": len(requests), "rounds": []}
    reports, version = [], "v0"
    for start in range(0, len(requests), size):
        part = requests[start : start + size]
        edits = [{"prompt": r.prompt, "target": r.target, **({"subject": r.subject} if r.subject else {})}
                 for r in part]
        # the guard's verdict is recorded, not enforced, so that every recipe's edit can be measured
        record, _ = store.create(rt.name, {"model": rt.name, "edits": edits, "base_version": version,
                                           "message": f"bench {dataset} {label}", "author": "bench",
                                           **({"hyperparameters": hyper} if hyper else {}),
                                           "guard": {"kl_budget": 1e9, "min_reliability": 0.0,
                                                     "min_neighbours_unchanged": 0.0}})
        started = time.perf_counter()
        process_pending_leased(rt, store)
        job = store.get(record["id"])
        metrics = job["metrics"] or {}
        defaults = Settings()
        kept = metrics.get("neighbours_unchanged")
        row["rounds"].append({
            "status": job["status"], "error": job["error"], "job_s": round(time.perf_counter() - started, 1),
            "kl": metrics.get("kl"), "guard_reliability": metrics.get("reliability"), "report_unchanged": kept,
            "default_guard_passes": (metrics.get("kl", 1e9) <= defaults.kl_budget
                                     and metrics.get("reliability", 0) >= defaults.min_reliability
                                     and (kept is None or kept >= defaults.min_neighbours_unchanged))})
        print(json.dumps(row["rounds"][-1]), flush=True)
        if job["version"] is None:
            print(json.dumps(row))
            return row
        version = job["version"]
        reports.append(metrics.get("neighbours"))
    row.update({k: row["rounds"][-1][k] for k in ("status", "error", "kl", "guard_reliability", "report_unchanged",
                                                  "default_guard_passes")}, version=version,
               job_s=round(sum(r["job_s"] for r in row["rounds"]), 1))
    if rounds == 1:
        del row["rounds"]
    else:  # the guard's KL of each round is against its parent; this row's is against v0
        row["kl"] = kl_against(rt, version)
    chat = bool(getattr(rt.tokenizer, "chat_template", None))
    rt.holder.switch_to("v0")
    protected = ([n["prompt"] for report in reports for e in report["edits"] for n in e["neighbours"]]
                 if all(reports) else [nb.prompt for nb in derive_neighbours(rt.model, rt.tokenizer, requests, seed=0)])
    held_out = [nb.prompt for nb in derive_neighbours(rt.model, rt.tokenizer, requests, seed=1)
                if nb.prompt not in set(protected)]
    row["loc"], loc_pairs = unchanged(rt, version, [r.locality_prompt for r in requests if r.locality_prompt])
    row["nbr_protected"], prot_pairs = unchanged(rt, version, [asked(rt.tokenizer, p, chat)
                                                                for p in protected[:MEASURED]])
    row["nbr_held_out"], held_pairs = unchanged(rt, version, [asked(rt.tokenizer, p, chat)
                                                               for p in held_out[:MEASURED]])
    row["nbr_counts"] = [len(protected), len(held_out)]
    rt.holder.switch_to(version)
    quality = edit_quality(rt.model, rt.tokenizer, requests, generated=False)
    row.update(rel_tf=quality["rel_tf"], gen_tf=quality["gen_tf"])
    paragraphs = heldout_texts(shared_data_dir() / "capability/wikitext2/wiki.test.raw", 40)
    edited_ppl = perplexity(rt.model, rt.tokenizer, paragraphs)
    rt.holder.switch_to("v0")
    base_ppl = perplexity(rt.model, rt.tokenizer, paragraphs)
    row["ppl_change_pct"] = 100 * (edited_ppl / base_ppl - 1)
    (out / f"{dataset}-{label}-pairs.json").write_text(json.dumps(
        {"locality": loc_pairs, "protected": prot_pairs, "held_out": held_pairs, "reports": reports}, indent=1))
    print(json.dumps(row), flush=True)
    return row


def timing(rt, store: JobStore, reps: int) -> dict:
    """One fact, edited on v0 by the paper's recipe and by the default, interleaved ``reps`` times: job seconds."""
    edit = {"prompt": "What is the capital of France?", "target": "Rome"}
    seconds: dict[str, list[float]] = {"paper": [], "default": []}
    default = rt.settings
    for _ in range(reps):
        for label, protect in (("paper", False), ("default", True)):
            rt.settings = default.model_copy(update={"protect_neighbours": protect})
            rt.registry.rollback(rt.name, "v0")
            record, _ = store.create(rt.name, {"model": rt.name, "edits": [edit], "base_version": "v0",
                                               "author": "bench", "guard": {"min_neighbours_unchanged": 0.0}})
            started = time.perf_counter()
            process_pending_leased(rt, store)
            seconds[label].append(round(time.perf_counter() - started, 1))
            print(label, seconds[label][-1], store.get(record["id"])["status"], flush=True)
            if label == "default":
                job = store.get(record["id"])
    rt.settings = default
    medians = {k: sorted(v)[len(v) // 2] for k, v in seconds.items()}
    # the README's example: the last default edit's report, and three capitals asked before and after it
    questions = [f"What is the capital of {c}?" for c in ("Germany", "Spain", "Italy", "France")]
    texts = [asked(rt.tokenizer, q, True) for q in questions]
    answers = {}
    for version in ("v0", job["version"]):
        rt.holder.switch_to(version)
        answers[version] = [first_line(rt.tokenizer, a) for a in greedy_answers(rt.model, rt.tokenizer, texts)]
    rt.holder.switch_to("v0")
    return {"seconds": seconds, "median": medians, "ratio": medians["default"] / medians["paper"],
            "report": job["metrics"]["neighbours"], "questions": questions, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="zsre,counterfact")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--paper", action="store_true", help="the paper's recipe: no neighbour protection")
    parser.add_argument("--redis-db", type=int, default=14)
    parser.add_argument("--timing", type=int, default=0, metavar="REPS",
                        help="instead: one fact by each recipe, interleaved REPS times (job seconds)")
    parser.add_argument("--out", default="runs/neighbours")
    parser.add_argument("--path", help="the records' file (default: the dataset's test file); one dataset only")
    parser.add_argument("--hyper", help="hyperparameters posted with the request, as JSON")
    parser.add_argument("--rounds", type=int, default=1, help="post the N edits as this many sequential jobs")
    parser.add_argument("--capability-weight", type=float,
                        help="a fixed λ of the capability factor in the keyed solve's metric (default: the product's "
                             "search for the least λ within the budget)")
    parser.add_argument("--label", help="the run's name in the output files (default: default or paper)")
    parser.add_argument("--layers", help="edit these layers (comma-separated) instead of the model's recipe's")
    args = parser.parse_args()
    if args.layers:
        layers = tuple(int(x) for x in args.layers.split(","))
        worker_runtime.default_layers = lambda model: layers  # what the worker's runtime builds its cache for
    if args.capability_weight is not None:
        keyed_solve.LAMBDAS = (args.capability_weight,)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = args.label or ("paper" if args.paper else "default")
    hyper = json.loads(args.hyper) if args.hyper else None
    settings = Settings(registry_root=out / "registry", redis_url=f"redis://127.0.0.1:6379/{args.redis_db}",
                        key_prefix=f"bench{uuid.uuid4().hex[:6]}", protect_neighbours=not args.paper)
    rt = load_runtime("smollm2", settings)
    store = JobStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
    rows = []
    try:
        if args.timing:
            result = timing(rt, store, args.timing)
            print(json.dumps(result))
            (out / "timing.json").write_text(json.dumps(result, indent=1))
            return
        for dataset in args.datasets.split(","):
            rows.append(run(rt, store, dataset, args.n, label, out, args.path, hyper, args.rounds))
            (out / f"rows-{label}.json").write_text(json.dumps(rows, indent=1))
    finally:
        for key in store.redis.scan_iter(f"{settings.key_prefix}:*"):
            store.redis.delete(key)


if __name__ == "__main__":
    main()
