"""Where an edit's perplexity rise comes from: the held-out NLL change, token by token (issue 2).

Edits the first N test records of a dataset with the paper recipe, then compares the base and edited
models' next-token NLL on the held-out WikiText-2 texts of the benchmark. Reports the total NLL change,
the share carried by positions whose true next token is a token of some edit target, and the tokens with
the largest summed change. If CounterFact's counterfactual targets ("English", "Microsoft", ...) are
common words of Wikipedia text, raising them everywhere shows up here as drift on exactly those tokens.

Usage: .venv/bin/python -m lab.drift_by_token CACHE.safetensors [--dataset counterfact] [--n 100]
       [--energy 0.8] [--texts 40] [--top 15]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
import torch.nn.functional as F

from crispedit.cache import CurvatureCache
from crispedit.capability import heldout_texts, swapped_weights
from crispedit.edit import EditConfig, edit
from crispedit.models import load_model
from lab.bench import DATASET_FILES, HELDOUT_TEXT
from lab.edit_sets import load_edit_dataset, shared_data_dir


@torch.no_grad()
def token_nll(model, tok, texts: list[str], max_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token ids, their NLL) over every predicted position of ``texts``, as ``perplexity`` counts them."""
    ids_all, nll_all = [], []
    for text in texts:
        ids = torch.tensor([tok(text, truncation=True, max_length=max_length)["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        ids_all.append(ids[0, 1:])
        nll_all.append(F.cross_entropy(logits, ids[0, 1:], reduction="none"))
    return torch.cat(ids_all), torch.cat(nll_all)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("--dataset", default="counterfact")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--energy", type=float, default=0.8)
    parser.add_argument("--texts", type=int, default=40)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    data = shared_data_dir()
    model, tok = load_model("smollm2")
    cache = CurvatureCache.load(args.cache, model=model)
    requests = load_edit_dataset(args.dataset, data / DATASET_FILES[args.dataset], n=args.n)
    texts = heldout_texts(data / HELDOUT_TEXT, args.texts)

    result = edit(model, tok, requests, cache, EditConfig(energy=args.energy))
    targets, nll_edited = token_nll(model, tok, texts)
    with swapped_weights(model, result.original):
        _, nll_base = token_nll(model, tok, texts)
    delta = nll_edited - nll_base

    target_ids = {i for r in requests for i in tok(" " + r.target, add_special_tokens=False)["input_ids"]}
    on_target = torch.tensor([int(t) in target_ids for t in targets])
    by_token: dict[int, float] = defaultdict(float)
    for t, d in zip(targets.tolist(), delta.tolist(), strict=True):
        by_token[t] += d
    top = sorted(by_token.items(), key=lambda kv: -kv[1])[: args.top]
    report = {
        "dataset": args.dataset, "edits": len(requests), "energy": args.energy, "positions": len(delta),
        "ppl_change_pct": round(100 * (float(torch.exp(delta.mean())) - 1), 3),
        "total_delta_nll": round(float(delta.sum()), 2),
        "target_token_positions": int(on_target.sum()),
        "target_token_share_of_positions": round(float(on_target.float().mean()), 4),
        "target_token_share_of_delta": round(float(delta[on_target].sum() / delta.sum()), 3),
        "ppl_change_pct_without_target_tokens": round(100 * (float(torch.exp(delta[~on_target].mean())) - 1), 3),
        "top_tokens": [{"token": tok.decode([t]), "delta_nll": round(d, 2), "count": int((targets == t).sum()),
                        "edit_target_token": t in target_ids} for t, d in top],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
