"""The edit loss's cost: logits at every position against logits only where a target token is predicted.

One optimizer step's forward and backward on SmolLM2 (gradients on the edited layers' weights), for a batch of
``--batch`` ZsRE train edits asked through the chat template, as the worker trains them. The two losses are timed
interleaved ``--reps`` times; the script prints the median seconds of each, their ratio and the largest difference
between the two losses.

Usage: .venv/bin/python -m lab.edit_loss_cost [--batch 4] [--reps 10]    (needs ../shared/data)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from crispedit.arch import default_layers, editable_modules
from crispedit.models import load_model
from crispedit.neighbours import asked
from crispedit.requests import EditRequest, target_nll, tokenize_edit_batch
from lab.edit_sets import load_edit_dataset, shared_data_dir


def full_vocabulary_nll(model, batch: dict) -> torch.Tensor:
    """The same loss through the model's own ``labels`` path: logits at every position."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    model, tok = load_model("smollm2")
    records = load_edit_dataset("zsre", shared_data_dir() / "editing/zsre/zsre_mend_train_1k.json", n=args.batch)
    requests = [EditRequest(asked(tok, r.prompt, True), r.target) for r in records]
    batch = tokenize_edit_batch(tok, requests, torch.device("cpu"))
    weights = [m.weight for m in editable_modules(model, default_layers(model)).values()]
    for w in weights:
        w.requires_grad_(True)
    seconds: dict[str, list[float]] = {"every position": [], "target positions": []}
    gaps = []
    for rep in range(args.reps + 1):  # the first round warms up
        losses = {}
        for label, loss_fn in (("every position", full_vocabulary_nll), ("target positions", target_nll)):
            started = time.perf_counter()
            loss = loss_fn(model, batch)
            loss.backward()
            if rep:
                seconds[label].append(time.perf_counter() - started)
            losses[label] = float(loss.detach())
            for w in weights:
                w.grad = None
        gaps.append(abs(losses["every position"] - losses["target positions"]))
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"batch of {args.batch}, {batch['input_ids'].numel()} tokens, "
          f"{int((batch['labels'] != -100).sum())} target tokens; median s per forward + backward:")
    for label, s in medians.items():
        print(f"  {label}: {s:.3f}")
    ratio = medians["target positions"] / medians["every position"]
    print(f"ratio {ratio:.2f}; largest loss difference {max(gaps):.2e}")


if __name__ == "__main__":
    main()
