"""Tune the neighbour protection on facts of our own (no benchmark data): β of the kept outputs, and the chat
target phrased as the model answers (`protect` always does; `--bare` trains the bare target instead).

Each β edits the same facts on the same curvature cache and prints the share of derived neighbours whose
greedy answer is unchanged (the service's report), by kind, with the edit's time and chat-form hit rate.

Usage: .venv/bin/python scripts/neighbour_tuning.py CACHE.safetensors [--facts scripts/tuning_facts.json]
       [--betas 0,300,1000] [--bare] [--verbose]
   (CACHE: e.g. the worker's, REGISTRY/curvature/smollm2.safetensors, or `crispedit build-cache --corpus self
   --samples 32 --seq-len 256`)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from crispedit.arch import arch_spec, editable_modules
from crispedit.cache import CurvatureCache
from crispedit.edit import EditConfig, edit
from crispedit.evaluate import edit_quality
from crispedit.models import load_model
from crispedit.neighbours import asked, first_line, greedy_answers, neighbour_report, protect
from crispedit.requests import EditRequest

FACTS = Path(__file__).with_name("tuning_facts.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--facts", default=str(FACTS))
    parser.add_argument("--betas", default="0,300,1000")
    parser.add_argument("--bare", action="store_true", help="train the bare target in chat form")
    parser.add_argument("--verbose", action="store_true", help="print every neighbour, not only the changed")
    args = parser.parse_args()
    model, tok = load_model("smollm2")
    cache = CurvatureCache.load(args.cache, model=model)
    requests = [EditRequest(p, t) for p, t in json.loads(Path(args.facts).read_text())]
    started = time.perf_counter()
    protection = protect(model, tok, requests, True, editable_modules(model, cache.layers),
                         arch_spec(model).fan_in_fan_out)
    print(f"protect: {time.perf_counter() - started:.1f} s, {len(protection.neighbours)} neighbours; chat targets "
          f"{[r.chat_target for r in protection.requests]}")
    trained = requests if args.bare else protection.requests
    for beta in map(float, args.betas.split(",")):
        config = EditConfig(chat_form=True, batch_size=4, sequential_chunk=len(requests), neighbour_weight=beta)
        started = time.perf_counter()
        result = edit(model, tok, trained, cache, config, kept=protection.kept)
        seconds = time.perf_counter() - started
        rel = edit_quality(model, tok, requests, generated=False)["rel_tf"]
        report = neighbour_report(model, tok, requests, protection)
        answers = [first_line(tok, a) for a in greedy_answers(model, tok, [asked(tok, r.prompt, True)
                                                                            for r in requests])]
        hits = sum(r.target.lower() in a.lower() for r, a in zip(requests, answers, strict=True))
        kinds: dict[str, list[bool]] = {}
        for e in report["edits"]:
            for n in e["neighbours"]:
                kinds.setdefault(n["kind"], []).append(n["unchanged"])
        by_kind = {k: round(sum(v) / len(v), 2) for k, v in kinds.items()}
        print(f"β {beta:g}: unchanged {report['unchanged']:.2f} {by_kind}, Rel TF {rel:.2f}, chat answers with "
              f"the target {hits}/{len(requests)}, edit {seconds:.1f} s ({result.steps} steps)", flush=True)
        for e in report["edits"]:
            for n in e["neighbours"]:
                if args.verbose or not n["unchanged"]:
                    mark = "kept   " if n["unchanged"] else "CHANGED"
                    print(f"   {mark} {n['kind']:8} {n['prompt']} | {n['before'][:60]} → {n['after'][:60]}")
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, tensor in result.original.items():
                params[name].copy_(tensor)


if __name__ == "__main__":
    main()
