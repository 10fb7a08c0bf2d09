"""Cross-check crispedit.capability's compact multiple-choice scorer against EleutherAI lm-evaluation-harness.

Run with the project's venv (it imports crispedit); lm-eval runs as a subprocess from its own venv:

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m lab.lm_eval_check.crosscheck --limit 40

lm-eval reads the shared data files through the local task YAMLs in ./tasks (``dataset_path: json``), so
no hub access is needed. Both sides score the same records: for every task but mmlu these are the first
``limit`` lines of the file (``--limit``); for mmlu our scorer takes a round robin over subjects, so
lm-eval gets exactly those file indices through ``--samples``. The script then checks, per item, that
lm-eval's document equals our record, that its (context, continuation) strings equal ours, and compares
the per-choice log-likelihoods and the chosen answers.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402

torch.set_num_threads(1)

from crispedit.models import load_model, resolve_checkpoint  # noqa: E402
from lab import multiple_choice as cap  # noqa: E402
from lab.edit_sets import shared_data_dir  # noqa: E402

HERE = Path(__file__).resolve().parent

def _capitalize_last(ctx: str) -> str:
    i = ctx.rfind(". ") + 2
    return ctx[:i] + ctx[i:].capitalize()


# lm-eval task name -> (our task name, transform applied to our records before scoring)
TASKS = {
    "cc_arc_easy": ("arc_easy", None),
    "cc_arc_challenge": ("arc_challenge", None),
    "cc_piqa": ("piqa", None),
    "cc_hellaswag": ("hellaswag", None),
    "cc_boolq": ("boolq", None),
    # lm-eval's own boolq prompt has no "Passage: " prefix; score that variant on our side too
    "cc_boolq_lmevalfmt": ("boolq", lambda r: {**r, "query": r["query"].replace("Passage: ", "", 1)}),
    "cc_mmlu": ("mmlu", None),
    # approximation of lm-eval's hellaswag prompt (it capitalises ctx_b; see the task YAML)
    "cc_hellaswag_lmevalfmt": ("hellaswag", lambda r: {**r, "ctx": _capitalize_last(r["ctx"])}),
}



def our_selection(task: str, limit: int) -> tuple[list[dict], list[int]]:
    records = cap._read_jsonl(Path(shared_data_dir()) / cap.MC_TASKS[task][0])
    chosen = cap.select_records(task, records, limit)
    index = {id(r): i for i, r in enumerate(records)}
    return chosen, [index[id(r)] for r in chosen]


def task_folder(out: Path) -> Path:
    """The task YAMLs with their data paths pointed at this machine's data folder ($CRISPEDIT_DATA)."""
    folder = out / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for yaml in (HERE / "tasks").glob("*.yaml"):
        (folder / yaml.name).write_text(yaml.read_text().replace(YAML_DATA_DIR, str(shared_data_dir())))
    return folder


YAML_DATA_DIR = "/work/shared/data"  # as written in tasks/*.yaml; replaced at run time


def run_lmeval(venv: Path, model_dir: Path, tasks: list[str], out: Path, limit: int | None,
               samples: dict | None, batch_size: int) -> None:
    cmd = ["nice", "-n", "10", str(venv / "bin" / "lm_eval"), "run", "--model", "hf",
           "--model_args", f"pretrained={model_dir},dtype=float32", "--device", "cpu",
           "--batch_size", str(batch_size), "--include_path", str(task_folder(out)),
           "--tasks", ",".join(tasks), "--log_samples", "--output_path", str(out)]
    cmd += ["--limit", str(limit)] if samples is None else ["--samples", json.dumps(samples)]
    print("+", " ".join(cmd), flush=True)
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=os.environ)


def read_samples(out: Path, task: str) -> list[dict]:
    # samples_<task>_<timestamp>.jsonl; the timestamp check keeps cc_boolq from matching cc_boolq_lmevalfmt
    files = sorted(f for f in glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
                   if re.fullmatch(rf"samples_{re.escape(task)}_\d{{4}}-.*\.jsonl", Path(f).name))
    if not files:
        raise FileNotFoundError(f"no lm-eval samples for {task} under {out}")
    with open(files[-1]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sorted(rows, key=lambda r: r["doc_id"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lmeval-venv", type=Path, default=Path("/tmp/lmeval-venv"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/lmeval-crosscheck"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reuse", action="store_true", help="reuse lm-eval outputs already in --out")
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    model_dir = resolve_checkpoint("smollm2")
    args.out.mkdir(parents=True, exist_ok=True)

    selections = {t: our_selection(TASKS[t][0], args.limit) for t in tasks}
    if not args.reuse:
        plain = [t for t in tasks if TASKS[t][0] != "mmlu"]
        if plain:
            run_lmeval(args.lmeval_venv, model_dir, plain, args.out / "limit", args.limit, None, args.batch_size)
        for t in tasks:
            if TASKS[t][0] == "mmlu":
                run_lmeval(args.lmeval_venv, model_dir, [t], args.out / "samples", None,
                           {t: selections[t][1]}, args.batch_size)

    model, tok = load_model(str(model_dir), device="cpu")
    summary = {}
    for t in tasks:
        ours_task, transform = TASKS[t]
        chosen, idx = selections[t]
        records = [transform(r) for r in chosen] if transform else chosen
        rows = read_samples(args.out / ("samples" if ours_task == "mmlu" else "limit"), t)
        assert [r["doc_id"] for r in rows] == idx, f"{t}: lm-eval doc ids {[r['doc_id'] for r in rows]} != {idx}"
        assert [r["doc"] for r in rows] == chosen, f"{t}: lm-eval documents differ from our records"

        to_example = cap.MC_TASKS[ours_task][1]
        examples = [to_example(r) for r in records]
        pairs = [(ctx, " " + c) for ctx, choices, _ in examples for c in choices]
        scores = iter(cap.score_continuations(model, tok, pairs, batch_size=16))
        agg = cap.multiple_choice_accuracy(model, tok, ours_task, limit=None, records=records)

        n_prompt_same = agree = agree_norm = 0
        max_diff = 0.0
        ours_acc = lm_acc = 0
        diffs_items = []
        for k, ((ctx, choices, gold), row) in enumerate(zip(examples, rows, strict=True)):
            args_ = [row["arguments"][f"gen_args_{j}"] for j in range(len(row["arguments"]))]
            same = [(a["arg_0"], a["arg_1"]) for a in args_] == [(ctx, " " + c) for c in choices]
            n_prompt_same += same
            ll = [float(r[0]) for r in row["filtered_resps"]]
            s = [next(scores) for _ in choices]
            max_diff = max(max_diff, max(abs(a - b) for a, b in zip(ll, s, strict=True)))
            pred_o = max(range(len(s)), key=s.__getitem__)
            pred_l = max(range(len(ll)), key=ll.__getitem__)
            norm_o = max(range(len(s)), key=lambda j: s[j] / max(len(choices[j]), 1))
            norm_l = max(range(len(ll)), key=lambda j: ll[j] / max(len(choices[j]), 1))
            assert int(row["target"]) == gold, f"{t} item {k}: gold {row['target']} != {gold}"
            assert bool(row["acc"]) == (pred_l == gold)
            agree += pred_o == pred_l
            agree_norm += norm_o == norm_l
            ours_acc += pred_o == gold
            lm_acc += row["acc"]
            if pred_o != pred_l or not same:
                diffs_items.append({"doc_id": row["doc_id"], "ours": s, "lm_eval": ll, "prompt_same": same})
        n = len(rows)
        summary[t] = {
            "n": n, "doc_ids": idx if ours_task == "mmlu" else f"0..{n - 1}",
            "acc_lm_eval": lm_acc / n, "acc_ours": ours_acc / n, "acc_ours_multiple_choice_accuracy": agg["acc"],
            "acc_norm_lm_eval": sum(r["acc_norm"] for r in rows) / n, "acc_norm_ours": agg["acc_norm"],
            "items_same_pred": agree, "items_same_pred_norm": agree_norm,
            "items_same_prompt_strings": n_prompt_same, "max_abs_loglik_diff": max_diff,
            "disagreements": diffs_items,
        }
        print(f"{t:20s} n={n} acc lm-eval={lm_acc / n:.3f} ours={agg['acc']:.3f} | acc_norm lm-eval="
              f"{summary[t]['acc_norm_lm_eval']:.3f} ours={agg['acc_norm']:.3f} | same pred {agree}/{n}, "
              f"same pred(norm) {agree_norm}/{n}, same prompts {n_prompt_same}/{n}, "
              f"max |dlogp| {max_diff:.2e}", flush=True)
    path = args.out / "summary.json"  # merged with an earlier run's tasks
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **summary}, indent=1))
    print("summary:", args.out / "summary.json")


if __name__ == "__main__":
    sys.exit(main())
