"""Why CounterFact generality is low: the distracting prefix, or the reworded relation? (issue 2)

A CounterFact rephrase is an unrelated sentence followed by the fact asked in other words:
"Unlike most snub polyhedra, it has reflection symmetries. Reedy Glacier is located in the continent".
This script splits each rephrase at the last sentence break before the subject into its prefix and its
reworded question, edits the tuning records (CounterFact 2000 on, never tested), and reports
teacher-forced target accuracy on four prompt families, for the base and the edited model:

- ``prompt``: the edit prompt itself (reliability);
- ``prefix + prompt``: the rephrase's prefix before the edit prompt (only the distraction changes);
- ``reworded``: the rephrase without its prefix (only the wording changes);
- ``rephrase``: the whole rephrase (generality as the benchmark counts it).

Usage: .venv/bin/python -m lab.cf_generality CACHE.safetensors [--n 50] [--energy 0.8]
       [--augment prefix,paraphrase] [--text-anchors FILE --text-anchor-weight 100] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import re

from cf_tuning import emit, tuning_setup

from crispedit.anchor import load_text_anchors
from crispedit.capability import swapped_weights
from crispedit.edit import EditConfig, edit
from crispedit.evaluate import mean, teacher_forced_predictions, token_accuracy
from crispedit.requests import EditRequest

SENTENCE_BREAK = re.compile(r"[.!?\n]\s*")


def split_rephrase(rephrase: str, subject: str) -> tuple[str, str] | None:
    """(prefix, reworded question): the rephrase cut at the last sentence break before the subject."""
    at = rephrase.find(subject)
    if at <= 0:
        return None
    breaks = [m.end() for m in SENTENCE_BREAK.finditer(rephrase, 0, at)]
    if not breaks:
        return None
    return rephrase[: breaks[-1]].strip(), rephrase[breaks[-1] :].strip()


def families(requests: list[EditRequest]) -> dict[str, list[tuple[str, str]]]:
    """The four (prompt, target) families, over the requests whose rephrase splits."""
    out: dict[str, list[tuple[str, str]]] = {"prompt": [], "prefix + prompt": [], "reworded": [], "rephrase": []}
    for r in requests:
        parts = split_rephrase(r.rephrases[0], r.subject) if r.rephrases and r.subject else None
        if parts is None:
            continue
        prefix, reworded = parts
        out["prompt"].append((r.prompt, r.target))
        out["prefix + prompt"].append((f"{prefix} {r.prompt}", r.target))
        out["reworded"].append((reworded, r.target))
        out["rephrase"].append((r.rephrases[0], r.target))
    return out


def accuracies(model, tok, fams: dict[str, list[tuple[str, str]]]) -> dict[str, float | None]:
    return {name: mean(token_accuracy(teacher_forced_predictions(model, tok, [p for p, _ in pairs],
                                                                 [t for _, t in pairs])))
            for name, pairs in fams.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--offset", type=int, default=2000)
    parser.add_argument("--energy", type=float, default=0.8)
    parser.add_argument("--augment", default="")
    parser.add_argument("--text-anchors", default=None)
    parser.add_argument("--text-anchor-weight", type=float, default=0.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    data, model, tok, cache, requests = tuning_setup(args.cache, args.n, args.offset)
    fams = families(requests)
    print(f"{len(fams['prompt'])} of {len(requests)} rephrases split into prefix + reworded question")

    text = load_text_anchors(model, tok, args.text_anchors, 256, 128) if args.text_anchor_weight else None
    config = EditConfig(energy=args.energy, augment=tuple(a for a in args.augment.split(",") if a),
                        text_anchor_weight=args.text_anchor_weight)
    result = edit(model, tok, requests, cache, config, text_anchors=text)
    edited = accuracies(model, tok, fams)
    with swapped_weights(model, result.original):
        base = accuracies(model, tok, fams)
    report = {"cache": args.cache, "layers": list(result.layers), "energy": args.energy, "augment": args.augment,
              "text_anchor_weight": args.text_anchor_weight, "n": len(fams["prompt"]), "base": base,
              "edited": edited}
    print("| family | base | edited |\n|---|---|---|")
    for name in fams:
        print(f"| {name} | {base[name]:.3f} | {edited[name]:.3f} |")
    emit(report, args.out)


if __name__ == "__main__":
    main()
