"""``crispedit bench``: the paper-style benchmark on a real model, one suite at a time.

Suites (each writes ``<out>/<suite>.json`` and ``<out>/<suite>.md``):
- ``main``: methods × datasets on N edits: edit quality, perplexity change, KL(base‖edited), MC accuracy, time.
- ``sweep``: γ sweep for crispedit and nullspace (reliability against capability drop, paper Fig. 3) + PNG.
- ``fisher``: empirical vs sampled Fisher vs a ``self``-sampled corpus, crispedit rows.
- ``sequential``: R rounds of K edits, curvature folded each round (Alg. 2), crispedit and ft.
- ``quality``: issue 8's rows: the paper recipe, + a mixed capability set (text + the model's own answers
  to questions, raw and through the chat template), + paraphrase/prefix augmentation, + both, and ft.
- ``anchor``: the paper recipe with the KL penalty on anchor questions (``crispedit.anchor``) at each β.
- ``combined``: issue 8's targets in one row: paraphrase + QA-form augmentation with anchors (raw and
  QA-framed), beside the paper recipe and ft.
- ``layers``: the fixed middle layers against as many layers ranked by edit-gradient norm (all layers cached).
- ``speed``: CrispEdit step / FT step on identical batches, cache build per token / fwd+bwd per token,
  projector memory.
Capability data, edit sets and benchmarks are read from the shared data folder (``--data``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from crispedit.arch import default_energy, default_layers, editable_modules
from crispedit.cache import CurvatureCache, build_cache
from crispedit.capability import heldout_texts, mean_kl, perplexity_change, perplexity_of, swapped_weights, text_nlls
from crispedit.edit import EditConfig, edit, epoch_bar
from crispedit.evaluate import edit_quality, locality_reference
from crispedit.models import load_model
from lab.edit_sets import load_edit_dataset, shared_data_dir
from lab.multiple_choice import capability_report, mc_drop

log = logging.getLogger("lab.bench")

TRAIN_CORPUS = "capability/wikitext2/wiki.train.raw_excerpt.txt"  # curvature: disjoint from the test text
HELDOUT_TEXT = "capability/wikitext2/wiki.test.raw"  # perplexity and KL


class Bench:
    """The model, data and base-model reference figures shared by every run of a suite."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data = Path(args.data) if args.data else shared_data_dir()
        self.model, self.tok = load_model(args.model, device=args.device)
        self.layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else default_layers(self.model)
        self.texts = heldout_texts(self.data / HELDOUT_TEXT, args.ppl_texts)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._base_capability: dict | None = None
        self._base_mc_correct: dict[str, list[bool]] | None = None
        self._base_ppl_terms: list[tuple[float, int]] = []

    def cache(self, corpus: str = "wikitext", fisher: str = "empirical", samples: int | None = None,
              layers: tuple[int, ...] | None = None) -> CurvatureCache:
        samples, layers = samples or self.args.samples, layers or self.layers
        tag = "" if layers == self.layers else f"-layers{layers[0]}-{layers[-1]}"
        tag += "-ekfac" if self.args.ekfac else ""
        path = self.out / f"cache-{corpus}-{fisher}-{samples}x{self.args.seq_len}{tag}.safetensors"
        if path.exists():
            return CurvatureCache.load(path, model=self.model, layers=layers)
        source = "self" if corpus == "self" else str(self.data / TRAIN_CORPUS)
        cache = build_cache(self.model, self.tok, layers, source, samples, self.args.seq_len, fisher,
                            ekfac=self.args.ekfac)
        cache.save(path)
        return cache

    def part_cache(self, source: str, name: str, samples: int, seq_len: int) -> CurvatureCache:
        path = self.out / f"cache-{name}-{samples}x{seq_len}.safetensors"
        if path.exists():
            return CurvatureCache.load(path, model=self.model, layers=self.layers)
        cache = build_cache(self.model, self.tok, self.layers, source, samples, seq_len)
        cache.save(path)
        return cache

    def mixed_cache(self) -> CurvatureCache:
        """WikiText-2 + the model's own answers to training-split questions (raw, chat), mixed by ``--mix``."""
        prompts = write_train_prompts(self.data, self.out / "train-prompts.txt")
        n = self.args.prompt_samples
        parts = [self.cache(),
                 self.part_cache(f"self-raw:{prompts}", "self-raw", n, 48),
                 self.part_cache(f"self-chat:{prompts}", "self-chat", n, 64)]
        return CurvatureCache.mixed(parts, [float(w) for w in self.args.mix.split(",")])

    def requests(self, dataset: str, split: str = "test"):
        """Test items: the first N records. Tuning items, never tested: ZsRE's train file, and CounterFact
        records from 2000 on (records 1000-1999 give anchors, 0-99 are the test items)."""
        if split == "train" and dataset == "counterfact":
            return load_edit_dataset(dataset, self.data / DATASET_FILES[dataset], n=self.args.n, offset=2000)
        if split == "train":
            path = self.data / "editing/zsre/zsre_mend_train_1k.json"
            return load_edit_dataset("zsre", path, n=self.args.n)
        return load_edit_dataset(dataset, self.data / DATASET_FILES[dataset], n=self.args.n)

    def capability(self, result=None, mc: bool = True) -> dict:
        terms = text_nlls(self.model, self.tok, self.texts, progress=True)
        metrics = {"perplexity": perplexity_of(terms), "ppl_terms": terms}
        if result is not None and result.changed:
            metrics["kl"] = mean_kl(self.model, self.tok, self.texts, result.original, result.changed, progress=True)
        else:
            metrics["kl"] = 0.0
        if mc and self.args.mc_limit > 0:
            metrics.update(capability_report(self.model, self.tok, self.data, limit=self.args.mc_limit, items=True,
                                             progress=True))
        return metrics

    def base_capability(self, mc: bool = True) -> dict:
        """The base model's figures, computed once per out folder and MC/perplexity setting (saved there as
        ``base-….json``; per-text NLLs and per-item MC results kept aside for the paired changes)."""
        if self._base_capability is None or (mc and "mc_mean" not in self._base_capability):
            a = self.args
            path = self.out / f"base-{Path(a.model).name}-mc{a.mc_limit if mc else 0}-ppl{a.ppl_texts}.json"
            found = json.loads(path.read_text()) if path.exists() else {}
            if "ppl_terms" not in found or (mc and a.mc_limit > 0 and "mc_correct" not in found):
                found = self.capability(mc=mc)  # new, or saved before per-text and per-item results were kept
            path.write_text(json.dumps(found))
            self._base_ppl_terms = found.pop("ppl_terms")
            self._base_mc_correct = found.pop("mc_correct", None)
            self._base_capability = found
        return self._base_capability

    def text_anchors(self):
        """The base model's predictions on ``--text-anchors`` windows of the WikiText-2 train excerpt."""
        from crispedit.anchor import load_text_anchors

        return load_text_anchors(self.model, self.tok, str(self.data / TRAIN_CORPUS), self.args.text_anchors,
                                 self.args.text_anchor_len)

    def run(self, requests, cache, config: EditConfig, reference=None, generated=True, mc=True, anchors=None,
            text_anchors=None) -> dict:
        """Edit, measure, and put the base weights back."""
        return self.run_scaled(requests, cache, config, (1.0,), reference, generated, mc, anchors, text_anchors)[0]

    def run_scaled(self, requests, cache, config: EditConfig, scales: tuple[float, ...], reference=None,
                   generated=True, mc=True, anchors=None, text_anchors=None) -> list[dict]:
        """Edit once, measure W₀ + s·ΔW for each scale s (one row each), and put the base weights back. A
        sequential edit is measured unscaled: later rounds were made on top of the earlier ones in full."""
        if config.sequential_chunk is not None and scales != (1.0,):
            raise ValueError("a sequential edit is measured unscaled (--edit-scale 1)")
        self.base_capability(mc=mc)  # before the edit: the paired changes below need the base model's terms
        gamma = "default" if config.energy is None else config.energy
        with epoch_bar(config, len(requests), desc=f"{config.method} γ={gamma}") as report:
            result = edit(self.model, self.tok, requests, cache, config, on_progress=report, anchors=anchors,
                          text_anchors=text_anchors)
        params = dict(self.model.named_parameters())
        rows = []
        try:
            for scale in scales:
                with torch.no_grad():
                    scaled = {n: torch.lerp(result.original[n], t, scale) for n, t in result.changed.items()}
                    for name, t in scaled.items():
                        params[name].copy_(t)
                row = {"method": config.method, "energy": result.energy, "lr": result.lr, "edits": len(requests),
                       "edit_scale": scale, "epochs": len(result.epoch_losses), "final_loss": result.epoch_losses[-1],
                       "steps": result.steps, "edit_seconds": round(result.seconds, 1),
                       "edited_layers": list(result.layers)}
                row.update(edit_quality(self.model, self.tok, requests, reference, generated=generated))
                cap = self.capability(replace(result, changed=scaled), mc=mc)
                row.update(cap)
                row["ppl_change_pct"], row["ppl_change_se"] = perplexity_change(self._base_ppl_terms,
                                                                                row.pop("ppl_terms"))
                if "mc_mean" in cap:  # the same as 100 × (base − edited MC mean), with a paired standard error
                    row["mc_drop_points"], row["mc_drop_se"] = mc_drop(self._base_mc_correct, row.pop("mc_correct"))
                log.info("row: %s", json.dumps(row))
                rows.append(row)
        finally:
            with torch.no_grad():
                for name, t in result.original.items():
                    params[name].copy_(t)
        return rows

    def config(self, **overrides) -> EditConfig:
        a = self.args
        options = dict(energy=a.energy, lr=a.lr, batch_size=a.batch_size, max_epochs=a.epochs,
                       subject_key=a.subject_key, seed=a.seed)
        return EditConfig(**(options | overrides))

    def write(self, suite: str, payload: dict, table: str) -> None:
        payload = {"suite": suite, "date": time.strftime("%Y-%m-%d"), "command": a_command(self.args),
                   "layers": list(self.layers), "cpu_threads": torch.get_num_threads(), **payload}
        (self.out / f"{suite}.json").write_text(json.dumps(payload, indent=2))
        (self.out / f"{suite}.md").write_text(f"Command: `{payload['command']}` ({payload['date']})\n\n{table}\n")
        log.info("wrote %s", self.out / f"{suite}.md")


def write_train_prompts(data: Path, path: Path) -> Path:
    """Questions and sentence starts for the answer-style capability corpus, from data that is never tested:
    ZsRE train (each record's question and NQ locality question) and CounterFact records 1000-2999 (the
    benchmark tests records 0-99); interleaved so any prefix of the file mixes both."""
    from lab.edit_sets import load_edit_dataset

    zsre = load_edit_dataset("zsre", data / "editing/zsre/zsre_mend_train_1k.json")
    cf = load_edit_dataset("counterfact", data / DATASET_FILES["counterfact"], offset=1000)
    zsre_prompts = [p for r in zsre for p in (r.prompt, r.locality_prompt) if p]
    cf_prompts = [p for r in cf for p in (r.prompt, r.locality_prompt) if p]
    lines = [p for pair in zip(zsre_prompts, cf_prompts, strict=False) for p in pair]
    path.write_text("\n".join(" ".join(p.split()) for p in lines) + "\n")
    return path


DATASET_FILES = {
    "zsre": "editing/zsre/zsre_mend_eval_3k.json",
    "counterfact": "editing/counterfact/counterfact_edit_3k.json",
    "wikibigedit": "editing/wikibigedit/wikibigedit_3k.json",
}

COLUMNS = [
    ("rel_tf", "Rel TF"), ("gen_tf", "Gen TF"), ("loc_tf_agree", "Loc TF agree"), ("loc_tf_acc", "Loc TF acc"),
    ("rel_nc_contains", "Rel gen NC"), ("gen_nc_contains", "Gen gen NC"),
    ("rel_qa_contains", "Rel gen QA"), ("gen_qa_contains", "Gen gen QA"), ("loc_gen_agree", "Loc gen agree"),
    ("loc_gen_acc", "Loc gen acc"), ("loc_qa_agree", "Loc QA agree"), ("loc_qa_acc", "Loc QA acc"),
    ("ppl_change_pct", "ΔPPL %"), ("ppl_change_se", "± SE"), ("kl", "KL"), ("arc_easy", "ARC-E"),
    ("arc_challenge", "ARC-C"),
    ("hellaswag", "HS"), ("piqa", "PIQA"), ("boolq", "BoolQ"), ("mmlu", "MMLU"), ("mc_mean", "MC mean"),
    ("mc_drop_points", "MC drop (points)"), ("mc_drop_se", "± SE"),
    ("edit_seconds", "edit s"),
]


def markdown_table(rows: list[dict], lead: list[tuple[str, str]]) -> str:
    cols = lead + [(k, h) for k, h in COLUMNS if any(k in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            cells.append("–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def edit_scales(text: str) -> tuple[float, ...]:
    """``--edit-scale``'s comma-separated shares, each in (0, 1]."""
    try:
        scales = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,0.8, got {text!r}") from None
    if not all(0.0 < s <= 1.0 for s in scales):
        raise argparse.ArgumentTypeError(f"each edit scale must be in (0, 1], got {text!r}")
    return scales


def a_command(args: argparse.Namespace) -> str:
    skip = {"func", "command", "verbose"}

    def option(key: str, v) -> str:
        flag = f"--{key.replace('_', '-')}"
        if isinstance(v, bool):  # a store_true flag: named when set, left out when not
            return flag if v else ""
        return f"{flag} {','.join(map(str, v)) if isinstance(v, tuple) else v}"

    opts = " ".join(filter(None, (option(k, v) for k, v in vars(args).items() if k not in skip and v is not None)))
    return f"crispedit bench {opts}"


def suite_main(b: Bench) -> None:
    rows = []
    cache = b.cache()
    base = b.base_capability()
    for dataset in b.args.datasets.split(","):
        requests = b.requests(dataset)
        reference = locality_reference(b.model, b.tok, requests)
        base_row = {"dataset": dataset, "method": "base", **edit_quality(b.model, b.tok, requests, reference),
                    **base, "ppl_change_pct": 0.0}
        rows.append(base_row)
        for method in b.args.methods.split(","):
            rows.append({"dataset": dataset, **b.run(requests, cache, b.config(method=method), reference)})
    b.write("main", {"base": base, "rows": rows}, markdown_table(rows, [("dataset", "data"), ("method", "method")]))


def suite_quality(b: Bench) -> None:
    """Issue 8: which of mixed capability data and edit-time augmentation improves generality and locality."""
    paper, mixed = b.cache(), b.mixed_cache()
    augment = tuple(b.args.augment.split(","))
    variants = [("paper recipe", "crispedit", paper, ()), ("+ mixed capability set", "crispedit", mixed, ()),
                ("+ augmentation", "crispedit", paper, augment), ("+ both", "crispedit", mixed, augment),
                ("fine-tuning", "ft", None, ())]
    rows = []
    base = b.base_capability()
    for dataset in b.args.datasets.split(","):
        requests = b.requests(dataset)
        reference = locality_reference(b.model, b.tok, requests)
        rows.append({"dataset": dataset, "variant": "base", "method": "base", **base, "ppl_change_pct": 0.0,
                     **edit_quality(b.model, b.tok, requests, reference)})
        for name, method, cache, aug in variants:
            row = b.run(requests, cache, b.config(method=method, augment=aug), reference)
            rows.append({"dataset": dataset, "variant": name, **row})
    b.write("quality", {"mix": b.args.mix, "augment": augment, "rows": rows, "mixed_parts": mixed.meta["parts"]},
            markdown_table(rows, [("dataset", "data"), ("variant", "variant")]))


def anchor_pairs(data: Path, n: int) -> list[tuple[str, str]]:
    """Anchor (question, answer) pairs from data that is never tested: the locality prompts and answers of
    ZsRE train records 500 on (records 0-499 serve as tuning edits) and of CounterFact records 1000 on."""
    zsre = load_edit_dataset("zsre", data / "editing/zsre/zsre_mend_train_1k.json", offset=500)
    cf = load_edit_dataset("counterfact", data / DATASET_FILES["counterfact"], offset=1000)
    pairs = [[(r.locality_prompt, r.locality_answer) for r in rs if r.locality_prompt and r.locality_answer]
             for rs in (zsre, cf)]
    return [p for pair in zip(*pairs, strict=False) for p in pair][:n]


def suite_anchor(b: Bench) -> None:
    """Issue 8: the paper recipe with the KL penalty on anchor questions at each β (β = 0: without)."""
    from crispedit.anchor import base_anchors

    cache = b.cache()
    anchors = base_anchors(b.model, b.tok, anchor_pairs(b.data, b.args.anchors))
    test = b.args.split == "test"
    base = b.base_capability(mc=test)
    rows = []
    for dataset in b.args.datasets.split(",") if test else ["zsre"]:
        requests = b.requests(dataset, split=b.args.split)
        reference = locality_reference(b.model, b.tok, requests, generated=test)
        for weight in (float(w) for w in b.args.anchor_weights.split(",")):
            row = b.run(requests, cache, b.config(anchor_weight=weight), reference, generated=test, mc=test,
                        anchors=anchors)
            rows.append({"dataset": dataset, "anchor_weight": weight, **row})
    b.write("anchor", {"split": b.args.split, "anchors": len(anchors), "base": base, "rows": rows},
            markdown_table(rows, [("dataset", "data"), ("anchor_weight", "β")]))


def suite_combined(b: Bench) -> None:
    """Issue 8: what helped, together: augmentation (``--augment``) and β = 1 anchors, raw and QA-framed,
    with the KL penalty on WikiText-2 windows at each ``--text-anchor-weights`` β (0: without)."""
    from crispedit.anchor import base_anchors, with_question_forms
    from crispedit.arch import Recipe

    anchor_beta = Recipe().anchor_weight

    cache = b.cache()
    anchors = base_anchors(b.model, b.tok, with_question_forms(anchor_pairs(b.data, b.args.anchors)))
    text_weights = [float(w) for w in b.args.text_anchor_weights.split(",")]
    text = b.text_anchors() if any(text_weights) else None
    augment = tuple(b.args.augment.split(","))
    variants = [("paper recipe", cache, b.config())]
    variants += [("+ augmentation + anchors", cache, b.config(augment=augment, anchor_weight=anchor_beta,
                                                              text_anchor_weight=w)) for w in text_weights]
    variants += [("text anchors (paper recipe + text KL)", cache, b.config(text_anchor_weight=w))
                 for w in text_weights if w > 0]
    chosen = [v.strip() for v in b.args.variants.split(",")]
    if "mixed" in chosen:  # section 8's mixed capability set (--mix), with the text penalty at each β
        variants += [("mixed capability set (+ text KL)", b.mixed_cache(), b.config(text_anchor_weight=w))
                     for w in text_weights]
    if "mixed+" in chosen:  # the mixed capability set under the "+" recipe (augmentation + anchors + text KL)
        variants += [("mixed+ (mixed capability set, augmentation, anchors)", b.mixed_cache(),
                      b.config(augment=augment, anchor_weight=anchor_beta, text_anchor_weight=w))
                     for w in text_weights]
    if "ft+" in chosen:  # fine-tuning under the "+" recipe: is the projector what keeps capability there?
        variants += [("ft+ (fine-tuning, augmentation, anchors)", None,
                      b.config(method="ft", layers=b.layers, augment=augment, anchor_weight=anchor_beta,
                               text_anchor_weight=w)) for w in text_weights]
    variants += [("fine-tuning", None, b.config(method="ft", layers=b.layers))]
    test = b.args.split == "test"
    base = b.base_capability(mc=test)
    rows = []
    for dataset in b.args.datasets.split(","):  # train split: ZsRE train, CounterFact records 2000 on
        requests = b.requests(dataset, split=b.args.split)
        reference = locality_reference(b.model, b.tok, requests)
        for name, cache_, config in variants:
            if name.split()[0] in chosen or name in chosen:
                for row in b.run_scaled(requests, cache_, config, b.args.edit_scale, reference, mc=test,
                                        anchors=anchors, text_anchors=text):
                    rows.append({"dataset": dataset, "variant": name, "text_beta": config.text_anchor_weight, **row})
    b.write("combined", {"split": b.args.split, "augment": augment, "anchors": len(anchors),
                         "text_anchors": len(text) if text else 0, "base": base, "rows": rows},
            markdown_table(rows, [("dataset", "data"), ("variant", "variant"), ("text_beta", "text β"),
                                  ("edit_scale", "scale")]))


def suite_sweep(b: Bench) -> None:
    cache = b.cache()
    requests = b.requests("zsre", split=b.args.split)
    rows = []
    b.base_capability(mc=False)
    for method in ("crispedit", "nullspace"):
        for gamma in (float(g) for g in b.args.gammas.split(",")):
            row = b.run(requests, cache, replace(b.config(method=method), energy=gamma), generated=False, mc=False)
            rows.append({"gamma": gamma, **row})
    rows.append({"gamma": None, **b.run(requests, None, b.config(method="ft"), generated=False, mc=False)})
    b.write("sweep", {"split": b.args.split, "rows": rows},
            markdown_table(rows, [("method", "method"), ("gamma", "γ")]))
    plot_sweep(rows, b.out / "gamma_sweep.png")


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Reliability and generality against perplexity increase, one point per γ (cf. paper Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, key, label in ((axes[0], "rel_tf", "teacher-forced reliability"),
                           (axes[1], "gen_tf", "teacher-forced generality (rephrases)")):
        for method, marker, dy in (("crispedit", "o", 6), ("nullspace", "s", -10)):
            pts = [r for r in rows if r["method"] == method]
            ax.plot([r["ppl_change_pct"] for r in pts], [r[key] for r in pts], marker=marker, label=method)
            for r in pts:
                ax.annotate(f"{r['gamma']:g}", (r["ppl_change_pct"], r[key]), textcoords="offset points",
                            xytext=(0, dy), ha="center", fontsize=7)
        ft = [r for r in rows if r["method"] == "ft"]
        ax.scatter([r["ppl_change_pct"] for r in ft], [r[key] for r in ft], color="red", marker="x", label="ft")
        ax.set_xscale("log")
        ax.set_xlabel("perplexity increase on held-out WikiText-2 (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(title="labels: γ")
    fig.suptitle("γ sweep: editing success against capability drop (cf. paper Fig. 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def suite_fisher(b: Bench) -> None:
    requests = b.requests("zsre", split=b.args.split)
    rows = []
    b.base_capability(mc=False)
    for corpus, fisher in (("wikitext", "empirical"), ("wikitext", "sampled"), ("self", "empirical")):
        cache = b.cache(corpus, fisher)
        row = b.run(requests, cache, b.config(method="crispedit"), generated=False, mc=False)
        rows.append({"corpus": corpus, "fisher": fisher, "cache_seconds": cache.meta.get("seconds"), **row})
    b.write("fisher", {"split": b.args.split, "rows": rows},
            markdown_table(rows, [("corpus", "corpus"), ("fisher", "Fisher"), ("cache_seconds", "cache s")]))


def suite_sequential(b: Bench) -> None:
    """Alg. 2 on the first ``--rounds`` × ``--chunk`` ZsRE edits of ``--split``: a crispedit row for each text
    β (``--text-anchor-weights``), then sequential ft.
    MC accuracy is scored on the test split only."""
    requests = b.requests("zsre", split=b.args.split)[: b.args.rounds * b.args.chunk]
    cache = b.cache(samples=b.args.seq_samples)
    methods = b.args.methods.split(",")
    text_weights = [float(w) for w in b.args.text_anchor_weights.split(",")]
    text = b.text_anchors() if any(text_weights) and "crispedit" in methods else None
    test = b.args.split == "test"
    base = b.base_capability(mc=test)
    runs = []
    if "crispedit" in methods:
        runs += [(cache, b.config(method="crispedit", sequential_chunk=b.args.chunk, text_anchor_weight=w))
                 for w in text_weights]
    if "ft" in methods:  # the plain baseline: no projector (so no mask) and no anchors
        runs.append((None, b.config(method="ft", layers=b.layers, sequential_chunk=b.args.chunk)))
    rows = []
    for cache_, config in runs:
        row = b.run(requests, cache_, config, generated=False, mc=test, text_anchors=text)
        rows.append({"samples": b.args.seq_samples, "text_beta": config.text_anchor_weight, **row})
    b.write("sequential", {"split": b.args.split, "rounds": b.args.rounds, "chunk": b.args.chunk, "base": base,
                           "rows": rows},
            markdown_table(rows, [("method", "method"), ("energy", "γ"), ("samples", "cap. samples"),
                                  ("text_beta", "text β")]))


CACHE_REPS = 5  # timed passes of the cache build and of the plain forward+backward, each


def suite_speed(b: Bench) -> None:
    from crispedit.corpus import batches_of, capability_windows
    from crispedit.kfac import kfac_factors
    from crispedit.optim import ProjectedAdam
    from crispedit.packing import pack
    from crispedit.projector import build_projector
    from crispedit.requests import target_nll, tokenize_edit_batch

    cache = b.cache()
    modules = editable_modules(b.model, b.layers)
    params = [m.weight for m in modules.values()]
    batch = pack(tokenize_edit_batch(b.tok, b.requests("zsre")[: b.args.batch_size], params[0].device))
    gamma = b.args.energy if b.args.energy is not None else default_energy(b.model)
    projectors = [build_projector(cache.factors[n], gamma) for n in modules]
    originals = {f"{n}.weight": m.weight.detach().clone() for n, m in modules.items()}

    projecting = [0.0]  # seconds spent inside the projectors during the current step

    def sync() -> None:  # CUDA kernels run asynchronously: wait for them before reading the clock
        if params[0].is_cuda:
            torch.cuda.synchronize()

    def timed(projector):
        def project(grad: torch.Tensor) -> torch.Tensor:
            sync()
            t0 = time.perf_counter()
            out = projector(grad)
            sync()
            projecting[0] += time.perf_counter() - t0
            return out
        return project

    def step_time(opt, reps: int) -> list[float]:
        times = []
        for _ in range(reps):
            projecting[0] = 0.0
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            target_nll(b.model, batch).backward()
            opt.step()
            sync()
            times.append(time.perf_counter() - t0)
        return times

    reps = b.args.reps
    for p in params:
        p.requires_grad_(True)
    with swapped_weights(b.model, originals):
        ft = ProjectedAdam(params, [None] * len(params), lr=1e-5)
        crisp = ProjectedAdam(params, [timed(p) for p in projectors], lr=1e-5)
        step_time(ft, 2)
        ft_t, crisp_t, proj_t = [], [], []
        for _ in range(reps):  # interleaved, so machine noise hits both alike
            ft_t += step_time(ft, 1)
            crisp_t += step_time(crisp, 1)
            proj_t.append(projecting[0])
    for p in params:
        p.requires_grad_(False)
    windows = capability_windows(b.model, b.tok, str(b.data / TRAIN_CORPUS), 8, b.args.seq_len)
    tokens = len(windows) * b.args.seq_len

    def cache_pass() -> None:
        kfac_factors(b.model, modules, batches_of(windows, 4))

    def plain_pass() -> None:  # LM loss, gradients on the same weights
        for p in params:
            p.requires_grad_(True)
        for batch_ in batches_of(windows, 4):
            b.model(**batch_, labels=batch_["input_ids"]).loss.backward()
        for p in params:
            p.requires_grad_(False)
            p.grad = None

    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    kfac_t, plain_t = [], []
    for i in range(0 if b.args.steps_only else 1 + CACHE_REPS):  # interleaved after a warm-up pass, as the steps
        for fn, times in ((cache_pass, kfac_t), (plain_pass, plain_t)):
            t0 = time.perf_counter()
            fn()
            sync()
            if i:
                times.append((time.perf_counter() - t0) / tokens)
    shapes = {n: tuple(m.weight.shape) for n, m in modules.items()}
    row = {
        "ft_step_s": median(ft_t), "crispedit_step_s": median(crisp_t),
        "step_ratio": median(crisp_t) / median(ft_t),
        # the same ratio within each CrispEdit step: its time over its time less the projection, which is
        # the FT step on the same forward and backward, free of the noise between two steps
        "projection_s": median(proj_t),
        "step_ratio_within": median([c / (c - p) for c, p in zip(crisp_t, proj_t, strict=True)]),
        **({} if b.args.steps_only else {"kfac_s_per_token": median(kfac_t), "fwd_bwd_s_per_token": median(plain_t),
                                          "cache_ratio": median(kfac_t) / median(plain_t)}),
        "projector_bytes_per_layer": projectors[0].memory_bytes, "weight_shape": list(next(iter(shapes.values()))),
        "dense_projector_bytes": 4 * (params[0].numel() ** 2),
    }
    table = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in row.items())
    times = {"ft_step_s": ft_t, "crispedit_step_s": crisp_t, "projection_s": proj_t,
             "kfac_s_per_token": kfac_t, "fwd_bwd_s_per_token": plain_t}
    b.write("speed", {"reps": reps, "row": row, "times": times}, "| quantity | value |\n|---|---|\n" + table)


SUITES = {"main": suite_main, "quality": suite_quality, "combined": suite_combined,
          "anchor": suite_anchor, "sweep": suite_sweep, "fisher": suite_fisher, "sequential": suite_sequential,
          "speed": suite_speed}


def cmd_bench(args: argparse.Namespace) -> None:
    bench = Bench(args)
    for suite in args.suite.split(","):
        log.info("suite %s (config %s)", suite, asdict(bench.config()))
        SUITES[suite](bench)


def add_bench_parser(sub) -> None:
    d = EditConfig()
    p = sub.add_parser("bench", help="paper-style benchmark on a real model (see BENCHMARKS.md)")
    p.add_argument("--suite", default="main", help=f"comma-separated, from {sorted(SUITES)}")
    p.add_argument("--model", default="smollm2", help="a bundled model or a checkpoint folder")
    p.add_argument("--data", default=None, help="data folder (default $CRISPEDIT_DATA or ../shared/data)")
    p.add_argument("--out", default="runs/bench", help="folder for the results (JSON, plots)")
    p.add_argument("--datasets", default="zsre,counterfact", help="comma-separated edit datasets")
    p.add_argument("--methods", default="crispedit,nullspace,ft", help="main: comma-separated methods")
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="sweep/fisher/anchor/layers: zsre train (tuning) or test items")
    p.add_argument("--n", type=int, default=100, help="edits per dataset")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: the model's)")
    p.add_argument("--energy", type=float, default=d.energy, help="γ (default: the model's, arch.default_energy)")
    p.add_argument("--gammas", default="0.5,0.7,0.8,0.9,0.95,0.99", help="sweep: the γ values")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: the model's)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="edits per optimizer step")
    p.add_argument("--epochs", type=int, default=d.max_epochs, help="at most this many epochs")
    p.add_argument("--samples", type=int, default=40, help="curvature cache: sequences")
    p.add_argument("--seq-len", type=int, default=512, help="curvature cache: tokens per sequence")
    p.add_argument("--ekfac", action="store_true", help="project with EK-FAC corrected eigenvalues (George 2018)")
    p.add_argument("--rounds", type=int, default=10, help="sequential: rounds of edits")
    p.add_argument("--chunk", type=int, default=10, help="sequential: edits per round")
    p.add_argument("--seq-samples", type=int, default=40, help="sequential: cache sequences")
    p.add_argument("--mc-limit", type=int, default=50, help="items per multiple-choice task")
    p.add_argument("--ppl-texts", type=int, default=40, help="WikiText-2 test paragraphs for perplexity")
    p.add_argument("--reps", type=int, default=10, help="speed: timed repetitions")
    p.add_argument("--steps-only", action="store_true",
                   help="speed: time the optimizer steps only, not the cache build against a plain pass")
    p.add_argument("--mix", default="0.5,0.25,0.25", help="quality: weights of WikiText-2, self-raw, self-chat")
    p.add_argument("--prompt-samples", type=int, default=256, help="quality: prompts answered for self-raw/chat")
    p.add_argument("--augment", default="paraphrase,prefix", help="quality: augmentations of the + rows")
    p.add_argument("--anchors", type=int, default=256, help="anchor: number of anchor (question, answer) pairs")
    p.add_argument("--anchor-weights", default="0,1", help="anchor: β values, comma-separated (0: without)")
    p.add_argument("--text-anchors", type=int, default=256, help="combined: WikiText-2 train windows kept by KL")
    p.add_argument("--text-anchor-len", type=int, default=128, help="combined: tokens per text anchor window")
    p.add_argument("--text-anchor-weights", default="0",
                   help="combined: β values of the text-window KL penalty of the '+' rows, comma-separated (0: off)")
    p.add_argument("--variants", default="paper,+,fine-tuning",
                   help="combined: rows to run, by first word: 'paper', '+' (augmentation + anchors), "
                        "'text' (the paper recipe + text anchors), 'mixed' (section 8's mixed capability set, "
                        "+ text anchors at each β), 'mixed+' (the mixed set under the '+' recipe), 'ft+' (fine-tuning "
                        "under the '+' recipe), 'fine-tuning'")
    p.add_argument("--edit-scale", type=edit_scales, default=(1.0,), metavar="S[,S...]",
                   help="combined: also measure W₀ + S·ΔW of each edit, for each S")
    p.add_argument("--subject-key", action="store_true",
                   help="the edit loss's weight gradient only through each prompt's last subject token")
    p.add_argument("--seed", type=int, default=d.seed, help="the edits' seed (minibatch order, prompt variants)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.set_defaults(func=cmd_bench)
