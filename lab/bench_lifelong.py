"""Lifelong editing through the service: N ZsRE edits posted to `crispedit serve`, one request each.

Every edit is posted at once (coalescing on, as by default), and the worker applies them batch after batch, each
version on top of the last. While they run: each job's end, the API process's memory. After the run, in this
process, on the versions holding the first C edits for each checkpoint C (e.g. 100, 500, 1000):
- Rel TF: teacher-forced reliability of every edit committed so far, on that version;
- Loc: the greedy first line of (at most 100 of) those edits' ZsRE locality prompts, against v0's;
- KL(base ‖ version) on the guard's kind of text (sampled from the model) and the perplexity change on 40
  WikiText-2 test paragraphs;
and the time per edit over the run's first and last windows, the registry's bytes on disk (weights and curvature
apart) in all and per version, and each version's figures as the service recorded them (KL against its parent and
against v0). Rejected batches are counted and left out of the checkpoints.

Usage: .venv/bin/python -m lab.bench_lifelong --n 300 [--checkpoints 100,200,300] [--window 100]
       [--minutes M] [--cache CACHE] [--threads T] [--out runs/lifelong]    (needs ../shared/data; a built cache saves a
       first build; after M minutes the edits still queued are cancelled and the rest measured;
       --measure-only measures the registry of an earlier run at --checkpoints)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import psutil

from lab.bench_service import DONE, Stack
from lab.edit_sets import load_edit_dataset, shared_data_dir


def poll(stack: Stack, ids: list[str], api: psutil.Process, deadline: float,
         every: float = 10.0) -> tuple[dict, list[float]]:
    """Wait for every job (those still queued at ``deadline`` are cancelled); returns {id: job} and the API's RSS
    (MB) at each poll. One list request per poll, so that polling does not load the API."""
    jobs: dict[str, dict] = {}
    rss = []
    cancelled = False
    while len(jobs) < len(ids):
        if time.time() > deadline and not cancelled:
            cancelled = True
            for job_id in set(ids) - set(jobs):
                stack.http.delete(f"/v1/edits/{job_id}")  # 409 for the running batch: it finishes
        listed = stack.http.get("/v1/edits", params={"model": "smollm2", "limit": 500}).json()["data"]
        jobs.update({j["id"]: j for j in listed if j["status"] in DONE and j["id"] in set(ids)})
        rss.append(api.memory_info().rss / 2**20)
        print(f"{len(jobs)} / {len(ids)} done, API {rss[-1]:.0f} MB", flush=True)
        time.sleep(every)
    return jobs, rss


def seconds_per_edit(root: Path, window: int) -> dict:
    """Edits end in batches, each committed as a version: the time per edit over a window is the time from the commit
    before its first batch to its last batch's commit, over the edits those batches hold. The first window starts
    after v1 (the worker's first batch takes what had been posted by then), the last ends at the head; each takes
    whole batches until it holds ``window`` edits. A rejected batch's time falls into the next commit's."""
    from registry import Registry

    lineage = Registry(root).lineage("smollm2", "latest")[::-1][1:]  # v1 onwards, oldest first
    sizes = [len(v.edits) for v in lineage]

    def over(first: int, last: int) -> dict:
        edits = sum(sizes[first:last + 1])
        seconds = lineage[last].created_at - lineage[first - 1].created_at
        return {"versions": f"{lineage[first].id}-{lineage[last].id}", "edits": edits,
                "s_per_edit": round(seconds / edits, 2)}

    first = 1
    while first < len(lineage) - 1 and sum(sizes[1:first + 1]) < window:
        first += 1
    last = len(lineage) - 1
    while last > first + 1 and sum(sizes[last:]) < window:
        last -= 1
    early, late = over(1, first), over(last, len(lineage) - 1)
    return {"first": early, "last": late, "ratio": round(late["s_per_edit"] / early["s_per_edit"], 3),
            "per_batch": [{"version": v.id, "edits": n, "s_per_edit": round((v.created_at - p.created_at) / n, 2)}
                          for p, v, n in zip(lineage, lineage[1:], sizes[1:], strict=False)]}


def disk(root: Path) -> dict:
    from registry import Registry

    reg = Registry(root)
    versions = reg.versions("smollm2")
    weights = {d for v in versions for d in v.tensors.values()}
    curvature = {d for v in versions for p in v.curvature.get("layers", {}).values() for d in p.values()
                 if isinstance(d, str)}
    size = {d: reg.blobs.path(d).stat().st_size for d in weights | curvature}
    return {"versions": len(versions), "weights_mb": round(sum(size[d] for d in weights) / 1e6, 1),
            "curvature_mb": round(sum(size[d] for d in curvature) / 1e6, 1),
            "per_version_mb": round(sum(size.values()) / 1e6 / max(1, len(versions) - 1), 2)}


def version_rows(root: Path) -> list[dict]:
    """What the service recorded of each version in the lineage: its edits, and KL against its parent and v0."""
    from registry import Registry

    rows = []
    for v in Registry(root).lineage("smollm2", "latest")[::-1][1:]:
        m = v.metrics or {}
        rows.append({"version": v.id, "edits": len(v.edits), "reliability": m.get("reliability"),
                     "kl": m.get("kl"), "kl_base": m.get("kl_base"),
                     "neighbours_unchanged": m.get("neighbours_unchanged"), "committed": v.created_at})
    return rows


def checkpoint_rows(root: Path, requests, checkpoints: list[int]) -> list[dict]:
    from crispedit.capability import heldout_texts, mean_kl, perplexity
    from crispedit.evaluate import edit_quality
    from crispedit.models import load_model
    from lab.bench_neighbours import unchanged
    from registry import HotSwapModel, Registry
    from worker.runtime import guard_texts

    model, tok = load_model("smollm2", device="cpu")
    reg = Registry(root)
    holder = HotSwapModel(model, reg, "smollm2")
    runtime = SimpleNamespace(model=model, tokenizer=tok, holder=holder)  # what bench_neighbours.unchanged reads
    by_prompt = {r.prompt: r for r in requests}
    applied, rows = [], []
    lineage = reg.lineage("smollm2", "latest")[::-1]
    guard = guard_texts(model, tok)
    paragraphs = heldout_texts(shared_data_dir() / "capability/wikitext2/wiki.test.raw", 40)
    holder.switch_to("v0")
    base_ppl = perplexity(model, tok, paragraphs)
    base = {n: reg.base_tensor("smollm2", n) for n in reg.model_info("smollm2")["base_tensors"]}
    todo = list(checkpoints)
    for version in lineage[1:]:
        applied += [by_prompt[e["prompt"]] for e in version.edits if e["prompt"] in by_prompt]
        if not todo or len(applied) < todo[0]:
            continue
        todo.pop(0)
        # the share of locality answers kept; unchanged() leaves ``version`` in place for the rows below
        loc, _ = unchanged(runtime, version.id, [r.locality_prompt for r in applied if r.locality_prompt][:100])
        rel = edit_quality(model, tok, applied, generated=False)["rel_tf"]
        ppl = perplexity(model, tok, paragraphs)
        tensors = reg.tensors("smollm2", version.id)
        kl = mean_kl(model, tok, guard, {n: base[n] for n in tensors}, tensors)
        rows.append({"edits": len(applied), "version": version.id, "rel_tf": round(rel, 3),
                     "loc": round(loc, 3),
                     "kl": round(kl, 4), "ppl_change_pct": round(100 * (ppl / base_ppl - 1), 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--offset", type=int, default=0, help="first ZsRE test record")
    parser.add_argument("--checkpoints", default="100,200,300")
    parser.add_argument("--window", type=int, default=100, help="edits in the first and last timing windows")
    parser.add_argument("--cache", default="", help="a built curvature cache for SmolLM2 (saves a first build)")
    parser.add_argument("--minutes", type=float, default=1e9, help="cancel the edits still queued after this long")
    parser.add_argument("--measure-only", action="store_true", help="measure the registry in --out, post nothing")
    parser.add_argument("--threads", type=int, default=0, help="CRISPEDIT_TORCH_THREADS of the API and the worker "
                        "(0: the default, 1 and one less than the cores; with no queries the worker may take all)")
    parser.add_argument("--home", default=str(Path.home() / ".cache" / "crispedit"))
    parser.add_argument("--out", default="runs/lifelong")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    requests = load_edit_dataset("zsre", n=args.n, offset=args.offset)
    if args.measure_only:  # a run's registry, measured again (other checkpoints, or after a cut-short run)
        report = {"disk": disk(out / "registry"), "seconds_per_edit": seconds_per_edit(out / "registry", args.window),
                  "versions": version_rows(out / "registry"),
                  "checkpoints": checkpoint_rows(out / "registry", requests,
                                                 [int(c) for c in args.checkpoints.split(",")])}
        (out / "checkpoints.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report["disk"]))
        return
    # one client posts every edit: the per-key rate limit would refuse most of them
    stack = Stack(Path(args.home), out, coalesce_max=32, curvature=Path(args.cache),
                  extra={"CRISPEDIT_EDIT_POSTS_PER_MINUTE": "0", "CRISPEDIT_TORCH_THREADS": str(args.threads)})
    try:
        api = psutil.Process(stack.proc.pid)
        started = time.time()
        ids = [stack.post([{"prompt": r.prompt, "target": r.target, **({"subject": r.subject} if r.subject else {})}])
               for r in requests]
        jobs, rss = poll(stack, ids, api, started + 60 * args.minutes)
    finally:
        stack.stop()
    done = list(jobs.values())
    ended = [j for j in done if j["status"] in ("succeeded", "rejected")]  # a cancelled job never ran
    statuses = [j["status"] for j in done]
    versions = version_rows(out / "registry")
    report = {"n": len(requests), "date": time.strftime("%Y-%m-%d"),  # wall: to the last commit (jobs carry no end)
              "wall_s": round(max([v["committed"] for v in versions], default=started) - started, 1),
              **{s: statuses.count(s) for s in sorted(set(statuses))},
              "batches": len({tuple(sorted(j["batch"] or [j["id"]])) for j in ended}),
              "seconds_per_edit": seconds_per_edit(out / "registry", args.window),
              "api_rss_mb": {"first": round(rss[0]), "max": round(max(rss)), "last": round(rss[-1])},
              "disk": disk(out / "registry"), "versions": versions,
              "rejections": sorted({j["error"] for j in done if j["status"] == "rejected"})[:5]}
    (out / "lifelong.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1), flush=True)
    report["checkpoints"] = checkpoint_rows(out / "registry", requests,
                                            [int(c) for c in args.checkpoints.split(",")])
    (out / "lifelong.json").write_text(json.dumps(report, indent=1))
    print("median batch size:", statistics.median(len(j["batch"] or [1]) for j in ended))


if __name__ == "__main__":
    main()
