"""Where does CounterFact's perplexity drift go? (issue 2)

On the 100 CounterFact test edits every CrispEdit recipe raises held-out WikiText-2 perplexity by about
1.8 %, the paper recipe and the augmented one alike (BENCHMARKS.md §13, §15). This script edits the
tuning records (CounterFact 2000 on, never tested), scores every token of held-out texts before and
after, and splits the rise in summed NLL by the token predicted:

- ``new target``: the first token of some edit's new object (" Madrid" for "Alois Hudal was employed in");
- ``true object``: the first token of some edit's true object (" Rome"), which the edit argues against;
- ``other``: every other token.

It also reports how concentrated the rise is (the share carried by the 1 % and 10 % of tokens whose NLL
rose most), per class the mean change of log p at every position (a shift of the token's prior, whether
or not the text then says it), and what a Taylor expansion around the base predicts (``order_terms``):
the first-order term, and K-FAC's (or EK-FAC's) quadratic model of the KL, to set against the measured
KL of the whole edit, of each layer's change alone (``--layer-kl``) and of the edit scaled (``--scales``, with
the scaled edit's teacher-forced reliability, generality and locality).
BENCHMARKS.md §16 has the figures.

Usage: .venv/bin/python scripts/cf_drift.py CACHE.safetensors [--n 100] [--layers 4,5,6] [--energy 0.8] [--texts 200]
       [--method crispedit|ft] [--early-stop 0.1] [--project-update]
       [--augment paraphrase,prefix,qa --anchors 256 --text-anchor-weight 10]
       [--subject-key] [--soft-mask] [--adam-eps E] [--lr L]
       [--layer-kl] [--scales 0.5] [--compare-cache sampled=OTHER.safetensors] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
import torch.nn.functional as F
from cf_tuning import emit, tuning_setup

from crispedit.anchor import TUNED_WEIGHT, base_anchors, load_text_anchors, with_question_forms
from crispedit.bench import DATASET_FILES, HELDOUT_TEXT, TRAIN_CORPUS, anchor_pairs
from crispedit.cache import CurvatureCache
from crispedit.capability import _encode, _pad_right, heldout_texts, mean_kl, swapped_weights
from crispedit.edit import EditConfig, edit, epoch_bar
from crispedit.evaluate import edit_quality, locality_reference
from crispedit.kfac import ekfac_quadratic, kfac_quadratic
from crispedit.projector import build_projector


@torch.no_grad()
def token_logprobs(model, seqs: list[list[int]], watched: torch.Tensor, batch_size: int = 8):
    """Per text: log p of each next token (len − 1) and log p of the ``watched`` tokens at each position
    (len − 1, len(watched)); the full distributions would take gigabytes."""
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = _pad_right(seqs[i : i + batch_size], 0)
        logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
        nxt = logp.gather(2, ids[:, 1:, None]).squeeze(2)
        for j in range(len(ids)):
            n = int(mask[j].sum()) - 1
            out.append((nxt[j, :n], logp[j, :n][:, watched]))
    return out


def first_tokens(tok, words: list[str]) -> set[int]:
    return {tok(" " + w.strip(), add_special_tokens=False)["input_ids"][0] for w in words if w.strip()}


def drift_report(tok, seqs, base, edited, classes: dict[str, set[int]], watched: list[int]) -> dict:
    """The rise in summed NLL split by class of the predicted token, its concentration and prior shifts."""
    column = {t: k for k, t in enumerate(watched)}
    prior_shift = {}
    for name, ids in classes.items():
        cols = torch.tensor([column[t] for t in sorted(ids)])
        shift = torch.cat([(e[1][:, cols] - b[1][:, cols]).flatten() for b, e in zip(base, edited, strict=True)])
        prior_shift[name] = shift.mean().item()
    d = torch.cat([b[0] - e[0] for b, e in zip(base, edited, strict=True)])  # NLL_edited − NLL_base
    words = [t for seq in seqs for t in seq[1:]]
    labels = [next((c for c, ids in classes.items() if t in ids), "other") for t in words]
    total = d.sum().item()
    by_class = defaultdict(lambda: [0.0, 0])
    for x, c in zip(d.tolist(), labels, strict=True):
        by_class[c][0] += x
        by_class[c][1] += 1
    top = d.argsort(descending=True)
    by_token = defaultdict(float)
    for x, t in zip(d.tolist(), words, strict=True):
        by_token[t] += x
    worst = sorted(by_token.items(), key=lambda kv: -kv[1])[:15]
    return {
        "tokens": len(d), "ppl_change_pct": 100 * (torch.exp(d.mean()).item() - 1), "summed_nll_rise": total,
        "by_class": {c: {"tokens": n, "nll_rise": s, "share": s / total if total else 0.0}
                     for c, (s, n) in by_class.items()},
        "share_top_1pct": d[top[: max(1, len(d) // 100)]].sum().item() / total,
        "share_top_10pct": d[top[: max(1, len(d) // 10)]].sum().item() / total,
        "share_rising_tokens": (d > 0).float().mean().item(),
        "prior_shift_logp": prior_shift,
        "worst_tokens": [(tok.decode([t]), round(x, 3)) for t, x in worst],
    }


def heldout_gradient(model, seqs: list[list[int]], names: list[str], batch_size: int = 8) -> dict[str, torch.Tensor]:
    """∇ of the held-out texts' summed NLL with respect to the named weights, at the model's current weights."""
    params = dict(model.named_parameters())
    grads = {n: torch.zeros_like(params[n]) for n in names}
    were = {n: params[n].requires_grad for n in names}
    for n in names:
        params[n].requires_grad_(True)
    try:
        for i in range(0, len(seqs), batch_size):
            ids, mask = _pad_right(seqs[i : i + batch_size], 0)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
            for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True):
                grads[n] += g
    finally:
        for n in names:
            params[n].requires_grad_(were[n])
    return grads


def order_terms(cache: CurvatureCache, result, grads: dict[str, torch.Tensor], energy: float, tokens: int,
                others: dict[str, CurvatureCache]) -> dict:
    """Per layer, what a Taylor expansion around the base predicts for the edit ΔW:

    - ``linear_nll``: ⟨ΔW, ∇NLL⟩ / tokens, the first-order change of the held-out NLL per token;
    - ``kfac_kl``: ½ tr(ΔWᵀ S ΔW A), K-FAC's quadratic model of the per-token KL (Eq. 4, one block);
    - ``grad_kept``: ‖P∇‖² / ‖∇‖², the share of the held-out gradient that the projector lets through;
    - ``dw_kept``: ‖PΔW‖² / ‖ΔW‖², the share of the edit itself inside the kept subspace (Adam's per-coordinate
      step need not stay there), and ``kfac_kl_of_kept_part``: the quadratic model of PΔW alone;
    - ``kfac_kl <name>``: the same quadratic model with the factors of another cache (``others``).
    """
    out = {}
    for name, new in result.changed.items():
        f = cache.factors[name.removesuffix(".weight")]
        dw = (new - result.original[name]).float()
        g = grads[name].float()
        project = build_projector(f, energy)
        kept, dw_kept = project(g), project(dw)
        out[name] = {"linear_nll": (dw * g).sum().item() / tokens,
                     "kfac_kl": kfac_quadratic(f, dw),
                     "kfac_kl_of_kept_part": kfac_quadratic(f, dw_kept),
                     "dw_kept": (dw_kept.norm() ** 2 / dw.norm() ** 2).item(),
                     "grad_kept": (kept.norm() ** 2 / g.norm() ** 2).item()}
        for label, other in others.items():
            o = other.factors[name.removesuffix(".weight")]
            out[name][f"kfac_kl {label}"] = kfac_quadratic(o, dw)
            if other.ekfac:
                out[name][f"ekfac_kl {label}"] = ekfac_quadratic(o, other.ekfac[name.removesuffix(".weight")], dw)
    keys = [k for k in next(iter(out.values())) if k not in ("grad_kept", "dw_kept")]
    out["sum"] = {k: sum(v[k] for v in out.values()) for k in keys}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--offset", type=int, default=2000)
    parser.add_argument("--layers", default="", help="edit only these of the cache's layers (default: all)")
    parser.add_argument("--energy", type=float, default=0.8)
    parser.add_argument("--method", default="crispedit")
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--early-stop", type=float, default=EditConfig.early_stop)
    parser.add_argument("--epochs", type=int, default=EditConfig.max_epochs)
    parser.add_argument("--augment", default="")
    parser.add_argument("--text-anchor-weight", type=float, default=0.0)
    parser.add_argument("--project-update", action="store_true", help="project Adam's step too (optim.py)")
    parser.add_argument("--subject-key", action="store_true", help="the edit loss reaches the weights only through "
                        "each prompt's last subject token (subject_key.py)")
    parser.add_argument("--anchors", type=int, default=0, help="question anchors at β 1, as the bench's '+' recipe")
    parser.add_argument("--compare-cache", action="append", default=[], metavar="LABEL=CACHE",
                        help="also K-FAC's quadratic model of the KL under this cache's factors")
    parser.add_argument("--soft-mask", action="store_true",
                        help="τ/(τ+c) per direction, not a mask (soft_projector.py)")
    parser.add_argument("--adam-eps", type=float, default=EditConfig.adam_eps)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--layer-kl", action="store_true", help="also the KL of each layer's change alone")
    parser.add_argument("--scales", default="", help="also the KL and the teacher-forced quality of s·ΔW for these s")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    data, model, tok, cache, requests = tuning_setup(args.cache, args.n, args.offset, args.layers)
    records = json.loads((data / DATASET_FILES["counterfact"]).read_text())[args.offset : args.offset + args.n]
    classes = {"new target": first_tokens(tok, [r["target_new"] for r in records]),
               "true object": first_tokens(tok, [r["ground_truth"] for r in records])}
    classes["true object"] -= classes["new target"]
    watched = sorted(set().union(*classes.values()))
    texts = heldout_texts(data / HELDOUT_TEXT, args.texts)
    seqs = _encode(tok, texts, 256)
    base = token_logprobs(model, seqs, torch.tensor(watched))

    text = load_text_anchors(model, tok, str(data / TRAIN_CORPUS)) if args.text_anchor_weight else None
    config = EditConfig(method=args.method, energy=args.energy, early_stop=args.early_stop, max_epochs=args.epochs,
                        anchor_weight=TUNED_WEIGHT if args.anchors else 0.0,
                        augment=tuple(a for a in args.augment.split(",") if a),
                        text_anchor_weight=args.text_anchor_weight, project_update=args.project_update,
                        subject_key=args.subject_key, soft_mask=args.soft_mask, adam_eps=args.adam_eps, lr=args.lr)
    pairs = with_question_forms(anchor_pairs(data, args.anchors)) if args.anchors else []
    questions = base_anchors(model, tok, pairs) if pairs else None
    reference = locality_reference(model, tok, requests, generated=False)
    with epoch_bar(config, len(requests)) as progress:
        result = edit(model, tok, requests, cache, config, anchors=questions, text_anchors=text,
                      on_progress=progress)
    edited = token_logprobs(model, seqs, torch.tensor(watched))
    quality = edit_quality(model, tok, requests, reference, generated=False)
    kl = mean_kl(model, tok, texts, result.original, result.changed)
    anchor_kl = None  # the same KL on the text anchors' own windows: does the penalty hold beyond them?
    if text:
        windows = [tok.decode(ids[mask.bool()]) for ids, mask in zip(text.input_ids, text.attention_mask, strict=True)]
        anchor_kl = mean_kl(model, tok, windows, result.original, result.changed)
    with swapped_weights(model, result.original):
        grads = heldout_gradient(model, seqs, list(result.changed))
    tokens = sum(len(s) - 1 for s in seqs)
    others = {label: CurvatureCache.load(path, model=model)
              for label, path in (spec.split("=", 1) for spec in args.compare_cache)}
    layer_kl = {}
    if args.layer_kl:  # each layer's change alone, the other layers at their base weights
        with swapped_weights(model, result.original):
            layer_kl = {n: mean_kl(model, tok, texts, {n: result.original[n]}, {n: result.changed[n]})
                        for n in result.changed}
    scaled = {}
    for scale in (float(x) for x in args.scales.split(",") if x):
        partial = {n: result.original[n] + scale * (result.changed[n] - result.original[n]) for n in result.changed}
        with swapped_weights(model, partial):
            scaled_quality = edit_quality(model, tok, requests, reference, generated=False)
        scaled[scale] = {"kl": mean_kl(model, tok, texts, result.original, partial), **scaled_quality}
    report = {"cache": args.cache, "layers": list(result.layers), "method": args.method, "energy": args.energy,
              "augment": args.augment, "anchors": args.anchors, "text_anchor_weight": args.text_anchor_weight,
              "project_update": args.project_update, "subject_key": args.subject_key,
              "soft_mask": args.soft_mask, "adam_eps": args.adam_eps, "lr": args.lr, "epochs": args.epochs,
              "edits": len(requests), "early_stop": args.early_stop,
              "epoch_losses": result.epoch_losses, "final_loss": result.epoch_losses[-1], "kl": kl,
              "anchor_kl": anchor_kl, **quality,
              "layer_kl": layer_kl, "layer_kl_sum": sum(layer_kl.values()), "scaled_kl": scaled,
              "order_terms": order_terms(cache, result, grads, args.energy, tokens, others),
              **drift_report(tok, seqs, base, edited, classes, watched)}
    emit(report, args.out)


if __name__ == "__main__":
    main()
