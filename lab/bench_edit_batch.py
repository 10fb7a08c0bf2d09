"""How the minibatch size changes a coalesced batch's edit time (issue 4), in process on the real SmolLM2.

Edits ZsRE records as the worker does (chat form on, one sequential chunk so the batch's curvature is
folded), once per batch size, then a few of them alone; each row: seconds, epochs, steps, teacher-forced
reliability and KL(base‖edited) on held-out WikiText-2. With ``--text-anchors FILE`` every row runs twice,
without and with the worker's text anchors (β 10, one window per 8 edits of a step), side by side.

Usage: .venv/bin/python -m lab.bench_edit_batch CACHE.safetensors [--batch-sizes 32,8,4] [--n 30] [--singles 2]
       [--text-anchors FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crispedit.anchor import load_text_anchors
from crispedit.arch import Recipe
from crispedit.cache import CurvatureCache
from crispedit.capability import heldout_texts, mean_kl
from crispedit.edit import EditConfig, edit
from crispedit.evaluate import edit_quality
from crispedit.models import load_model
from lab.edit_sets import load_edit_dataset, shared_data_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("--batch-sizes", default="32,8,4")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--offset", type=int, default=204, help="ZsRE eval records (the service benchmark's)")
    parser.add_argument("--singles", type=int, default=2)
    parser.add_argument("--text-anchors", default=None, help="also run each row with text anchors from this file")
    args = parser.parse_args()
    model, tok = load_model("smollm2")
    cache = CurvatureCache.load(args.cache, model=model)
    data = shared_data_dir()
    requests = load_edit_dataset("zsre", data / "editing/zsre/zsre_mend_eval_3k.json", n=args.n, offset=args.offset)
    texts = heldout_texts(data / "capability/wikitext2/wiki.test.raw", 20)
    text = load_text_anchors(model, tok, args.text_anchors) if args.text_anchors else None

    def run(batch: list, batch_size: int, with_text: bool = False) -> dict:
        config = EditConfig(batch_size=batch_size, chat_form=True, sequential_chunk=len(batch),
                            text_anchor_weight=Recipe().text_anchor_weight if with_text else 0.0)
        started = time.perf_counter()
        result = edit(model, tok, batch, cache, config, text_anchors=text if with_text else None)
        seconds = time.perf_counter() - started
        row = {"edits": len(batch), "batch_size": batch_size, "text_anchors": with_text, "seconds": round(seconds, 1),
               "epochs": len(result.epoch_losses), "steps": result.steps,
               "rel_tf": edit_quality(model, tok, batch, generated=False)["rel_tf"],
               "kl": mean_kl(model, tok, texts, result.original, result.changed)}
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in result.original.items():
                params[name].copy_(value)
        print(json.dumps(row), flush=True)
        return row

    arms = (False, True) if text else (False,)
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        for with_text in arms:
            run(requests, batch_size, with_text)
    for i in range(args.singles):
        for with_text in arms:
            run(requests[i : i + 1], 4, with_text)  # one edit: any batch size, but the service's text windows


if __name__ == "__main__":
    main()
