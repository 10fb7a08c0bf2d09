"""The edit loss's cost: a right-padded batch against the same batch packed into one sequence (crispedit.packing).

One optimizer step's forward and backward on SmolLM2 (gradients on the edited layers' weights), on batches of
``--batch`` rows drawn as the worker trains them: ZsRE train edits in their plain and chat forms, shuffled together.
Both layouts take logits only where a target token is predicted. They are timed interleaved on ``--reps`` batches;
the script prints the tokens each layout runs, the median seconds of each, their ratio and the largest differences
of loss and gradient between them.

Usage: .venv/bin/python -m lab.edit_loss_cost [--batch 4] [--reps 10]    (needs ../shared/data)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from crispedit.arch import default_layers, editable_modules
from crispedit.models import load_model
from crispedit.packing import pack
from crispedit.requests import EditRequest, target_nll, target_positions, tokenize_edit_batch
from lab.edit_sets import load_edit_dataset, shared_data_dir


def padded_nll(model, batch: dict) -> torch.Tensor:
    """The edit loss on the padded batch, logits at the target positions only."""
    predicts = target_positions(batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=predicts).logits
    return F.cross_entropy(logits, batch["labels"][:, 1:][predicts[:, :-1]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    model, tok = load_model("smollm2")
    records = load_edit_dataset("zsre", shared_data_dir() / "editing/zsre/zsre_mend_train_1k.json",
                                n=(args.reps + 1) * args.batch)
    plain = [EditRequest(r.prompt, r.target) for r in records]
    rows = plain + [r.in_chat_form(tok) for r in plain]
    random.Random(0).shuffle(rows)
    weights = [m.weight for m in editable_modules(model, default_layers(model)).values()]
    for w in weights:
        w.requires_grad_(True)
    seconds: dict[str, list[float]] = {"padded": [], "packed": []}
    tokens = {"padded": 0, "packed": 0}
    loss_gap = grad_gap = 0.0
    for rep in range(args.reps + 1):  # the first round warms up
        batch = tokenize_edit_batch(tok, rows[rep * args.batch : (rep + 1) * args.batch])
        packed = pack(batch)
        out = {}
        for label, loss_fn, inputs in (("padded", padded_nll, batch), ("packed", target_nll, packed)):
            started = time.perf_counter()
            loss = loss_fn(model, inputs)
            loss.backward()
            if rep:
                seconds[label].append(time.perf_counter() - started)
            out[label] = (float(loss.detach()), [w.grad.clone() for w in weights])
            for w in weights:
                w.grad = None
        if rep:
            tokens["padded"] += batch["input_ids"].numel()
            tokens["packed"] += packed["input_ids"].numel()
        loss_gap = max(loss_gap, abs(out["padded"][0] - out["packed"][0]))
        grad_gap = max(grad_gap, max(float((a - b).abs().max() / a.abs().max())
                                     for a, b in zip(out["padded"][1], out["packed"][1], strict=True)))
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"{args.reps} batches of {args.batch} rows; tokens run: padded {tokens['padded']}, packed {tokens['packed']}")
    for label, s in medians.items():
        print(f"  {label}: median {s:.3f} s per forward + backward")
    print(f"ratio {medians['packed'] / medians['padded']:.2f}; largest loss difference {loss_gap:.1e}, "
          f"gradient {grad_gap:.1e} of its largest element")


if __name__ == "__main__":
    main()
