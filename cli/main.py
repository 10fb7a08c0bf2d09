"""``crispedit`` command line: build-cache, mix-cache, edit, eval, registry, serve, worker, config, and bench (lab/)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import sys
from dataclasses import asdict
from importlib.metadata import version as package_version
from pathlib import Path
from types import ModuleType

log = logging.getLogger("crispedit")

DEFAULT_AUGMENT = "auto"  # all augmentations with --anchors, none without (alone they cost capability)
DEFAULT_TEXT_ANCHORS = "cache"  # the cache's own corpus: less drift on every row measured
DEFAULT_SAMPLES = 40  # capability windows of --seq-len tokens; the paper finds n ≥ 100 docs enough (Table 7)


def lab(name: str) -> ModuleType:
    """A module of the lab: the evaluation harness in the checkout's lab/ folder, which is not installed."""
    root = Path(__file__).resolve().parents[1]
    if (root / "lab").is_dir() and str(root) not in sys.path:
        sys.path.append(str(root))
    try:
        return importlib.import_module(f"lab.{name}")
    except ModuleNotFoundError as err:
        if err.name not in ("lab", f"lab.{name}"):  # a dependency of the lab module is missing: say which
            raise
        raise SystemExit(f"this needs lab/{name}.py from a source checkout of CrispEdit Service") from err


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError as err:
        raise SystemExit(f"--layers must be comma-separated integers, got {text!r}") from err


DEVICE_HELP = "auto (CUDA when present), cpu or cuda[:N]"
DTYPE_CHOICES = ("float32", "bfloat16")  # crispedit.models.DTYPES, named here so that --help need not import torch
DTYPE_HELP = "the weights' precision (bfloat16 halves a GPU's memory; the edit's statistics and steps stay fp32)"
EDITS_HELP = 'EDITS.jsonl: one {"prompt", "target", "rephrases"?, "locality_prompt"?, "subject"?} per line'


class HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default, unless it names the default itself or there is none to name."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or not action.option_strings \
                or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def add_edit_options(p: argparse.ArgumentParser) -> None:
    """The options of an edit; one left out takes the model's recipe (``crispedit.recipe.recommended_config``)."""
    from crispedit.edit import EditConfig

    d = EditConfig()
    p.add_argument("--method", choices=["crispedit", "nullspace", "ft"], default=d.method,
                   help="crispedit: steps projected off high capability curvature (K-FAC); nullspace: off the "
                        "layer inputs' top directions only; ft: plain fine-tuning")
    p.add_argument("--energy", type=float, default=d.energy,
                   help="γ, fraction of curvature energy protected (default 0.8; per model in crispedit/arch.py)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="Adam learning rate (default: 2e-3 scaled to the edited weights' RMS against SmolLM2's)")
    p.add_argument("--batch-size", type=int, default=None, help="edits per step (default: 4 on a CPU, 32 on a GPU)")
    p.add_argument("--epochs", type=int, default=None, help="at most this many epochs (default 40 with neighbour "
                   "protection, 25 without; they stop early once the mean target NLL is below 0.1, 0.01 without)")
    p.add_argument("--sequential-chunk", type=int, default=None, help="Alg. 2: fold curvature every K edits")
    p.add_argument("--chat-form", action=argparse.BooleanOptionalAction, default=None,
                   help="also train each edit through the chat template (default: when the model has one)")
    p.add_argument("--anchors", default=None, metavar="ANCHORS.jsonl",
                   help='{"prompt", "answer"} lines whose base-model predictions the edit keeps (with --anchor-weight)')
    p.add_argument("--neighbours", action=argparse.BooleanOptionalAction, default=True,
                   help="derive each edit's neighbours (the same question about other subjects, other questions "
                        "about the same subject, its locality_prompt), keep the edited layers' outputs on them, "
                        "phrase chat targets as the model answers, and report which answers changed (default: on)")
    p.add_argument("--neighbour-weight", type=float, default=None,
                   help="β of the penalty on the edited layers' output change over the neighbours' tokens "
                        "(default with --neighbours: the model's recipe in crispedit/arch.py, 30; 0: not kept)")
    p.add_argument("--anchor-weight", type=float, default=None,
                   help="β of the KL(base‖edited) penalty on the anchors (default with --anchors: 1, tuned on "
                        "ZsRE train; 0: off, the paper's recipe)")
    p.add_argument("--text-anchors", default=DEFAULT_TEXT_ANCHORS, metavar="CORPUS",
                   help="capability text (.txt/.jsonl or 'self') whose base-model predictions the edit keeps: "
                        "KL(base‖edited) at every position of 256 windows of 128 tokens (with --text-anchor-weight);"
                        " 'cache' (default): the curvature cache's corpus when it is a text file; 'none': off")
    p.add_argument("--text-anchor-weight", type=float, default=None,
                   help="β of that penalty (default with --text-anchors: 10)")
    p.add_argument("--subject-key", action=argparse.BooleanOptionalAction, default=None,
                   help="the edit loss reaches the weights only through each prompt's last subject token (ROME's "
                        "key; the 'subject' of EDITS.jsonl, else inferred with --neighbours; default: on with "
                        "--neighbours)")
    p.add_argument("--keyed-solve", action=argparse.BooleanOptionalAction, default=None,
                   help="after the epochs, keep the edit's change at its subject keys and make it the smallest on "
                        "its neighbours (crispedit/keyed_solve.py; the edit then stops at loss 0.1; default: on "
                        "with --neighbours and the subject key)")
    p.add_argument("--capability-budget", type=float, default=None, metavar="RHO",
                   help="the most the keyed solve may change an edited layer's output on generic text (RMS, "
                        "relative; default 0.04): larger keeps more of one edit's neighbours, smaller drifts less "
                        "over many edits")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the minibatch order and the model-written prompt variants of --augment")
    p.add_argument("--augment", default=DEFAULT_AUGMENT,
                   help="comma-separated: 'paraphrase', 'prefix' (model-written variants of each prompt) and/or 'qa' "
                        "(the prompt and its paraphrases framed as a question); '' for none (the paper's recipe); "
                        "'auto' (default): all three with --anchors, none without")


def edit_config(args: argparse.Namespace, model, tokenizer, layers: tuple[int, ...] | None = None,
                text_source: str | None = None):
    """The EditConfig of the edit options around the model's recipe; ``text_source`` is where the text anchors
    come from (None: none)."""
    from crispedit.recipe import recommended_config

    given = dict(method=args.method, energy=args.energy, lr=args.lr, batch_size=args.batch_size,
                 max_epochs=args.epochs, sequential_chunk=args.sequential_chunk, chat_form=args.chat_form,
                 layers=layers, anchor_weight=args.anchor_weight, text_anchor_weight=args.text_anchor_weight,
                 neighbour_weight=args.neighbour_weight, subject_key=args.subject_key,
                 keyed_solve=args.keyed_solve, capability_budget=args.capability_budget, seed=args.seed)
    try:
        return recommended_config(model, tokenizer, given, protect=getattr(args, "neighbours", False),
                                  anchors=bool(args.anchors), text_anchors=bool(text_source), augment=args.augment)
    except ValueError as err:
        if "augment" in str(err):
            raise SystemExit(f"--augment: {err}") from err
        raise


def cmd_build_cache(args: argparse.Namespace) -> None:
    from crispedit.arch import default_layers
    from crispedit.cache import build_cache
    from crispedit.models import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    layers = parse_layers(args.layers) or default_layers(model)
    cache = build_cache(model, tok, layers, args.corpus, args.samples, args.seq_len, args.fisher,
                        batch_size=args.batch_size, ekfac=args.ekfac, seed=args.seed)
    path = cache.save(args.out)
    log.info("curvature cache for layers %s (%d tokens, %s Fisher) written to %s in %.1f s",
             list(layers), cache.num_tokens, args.fisher, path, cache.meta["seconds"])


def cmd_mix_cache(args: argparse.Namespace) -> None:
    from crispedit.cache import CurvatureCache, parse_mixture

    parts = parse_mixture(",".join(args.caches))
    mixed = CurvatureCache.mixed([CurvatureCache.load(path) for path, _ in parts], [w for _, w in parts])
    log.info("mixed %d caches (%s) into %s", len(parts), mixed.meta["corpus"], mixed.save(args.out))


def cmd_edit(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from crispedit.anchor import load_anchors, load_text_anchors, text_anchor_source
    from crispedit.arch import arch_spec, default_layers, editable_modules
    from crispedit.cache import CurvatureCache
    from crispedit.edit import edit, epoch_bar
    from crispedit.models import load_model
    from crispedit.neighbours import neighbour_report, protect
    from crispedit.requests import read_edits_jsonl

    requests = read_edits_jsonl(args.edits)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    cache = CurvatureCache.load(args.cache, model=model) if args.cache else None
    if cache is None and args.method != "ft":
        raise SystemExit(f"--method {args.method} needs --cache CACHE (build one with `crispedit build-cache`)")
    text_source = text_anchor_source(args.text_anchors, cache.meta.get("corpus") if cache else None)
    if args.text_anchors == "cache" and text_source is None:
        log.info("no text anchors: %s", f"the cache's corpus {cache.meta.get('corpus')!r} is not a text file"
                 if cache else "no --cache")
    config = edit_config(args, model, tok, parse_layers(args.layers), text_source)
    if config.anchor_weight > 0 and not args.anchors:
        raise SystemExit("--anchor-weight needs --anchors ANCHORS.jsonl")
    if config.text_anchor_weight > 0 and not text_source:
        raise SystemExit("--text-anchor-weight needs --text-anchors CORPUS (or a cache built from one text corpus)")
    if config.neighbour_weight > 0 and not args.neighbours:
        raise SystemExit("--neighbour-weight needs --neighbours")
    protection = None
    if args.neighbours:
        layers = cache.layers if cache is not None else (config.layers or default_layers(model))
        protection = protect(model, tok, requests, config.chat_form, editable_modules(model, layers),
                             arch_spec(model).fan_in_fan_out, seed=config.seed)
        requests = protection.requests
    if protection is None or protection.kept is None:
        config = replace(config, neighbour_weight=0.0)  # nothing to keep: no neighbour could be derived
    anchors = load_anchors(model, tok, args.anchors) if args.anchors else None
    text_anchors = load_text_anchors(model, tok, text_source) if config.text_anchor_weight > 0 else None

    with epoch_bar(config, len(requests), desc=f"{config.method} edit") as report:
        result = edit(model, tok, requests, cache, config, on_progress=report, anchors=anchors,
                      text_anchors=text_anchors, kept=protection.kept if protection else None)
    neighbours = neighbour_report(model, tok, requests, protection) if protection else None
    out = Path(args.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "crispedit_edit.json").write_text(json.dumps({
        "base_model": args.model, "config": {**asdict(config), "lr": result.lr, "energy": result.energy},
        "edits": len(requests), "layers": list(result.layers),
        "epoch_losses": result.epoch_losses, "steps": result.steps, "seconds": round(result.seconds, 2),
        "changed": result.relative_change(), "kept_fraction": result.kept_fraction, "neighbours": neighbours,
    }, indent=2))
    if result.cache is not None and args.cache_out:
        result.cache.save(args.cache_out)
    log.info("%d edits applied to layers %s in %.1f s (%d steps); checkpoint written to %s",
             len(requests), list(result.layers), result.seconds, result.steps, out)
    if neighbours is not None:
        log.info("neighbours: %d of %d kept their answers%s", neighbours["checked"] - neighbours["changed"],
                 neighbours["checked"], "".join(f"\n  changed: {n['prompt']!r}: {n['before']!r} → {n['after']!r}"
                                                for e in neighbours["edits"] for n in e["neighbours"]
                                                if not n["unchanged"]))


def cmd_eval(args: argparse.Namespace) -> None:
    from crispedit.evaluate import edit_quality, locality_reference
    from crispedit.models import load_model
    from crispedit.requests import read_edits_jsonl

    requests = read_edits_jsonl(args.edits)
    reference = None
    if args.base:
        base, base_tok = load_model(args.base, device=args.device, dtype=args.dtype)
        reference = locality_reference(base, base_tok, requests)
        del base
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    metrics = edit_quality(model, tok, requests, reference, generated=not args.no_generate)
    if args.capability:
        from crispedit.capability import heldout_texts, perplexity

        capability_report = lab("multiple_choice").capability_report
        data = Path(args.data) if args.data else lab("edit_sets").shared_data_dir()
        texts = heldout_texts(data / "capability/wikitext2/wiki.test.raw", args.ppl_texts)
        metrics["perplexity"] = perplexity(model, tok, texts)
        metrics.update(capability_report(model, tok, data_dir=data, limit=args.mc_limit))
    print(json.dumps(metrics, indent=2))


def cmd_serve(args: argparse.Namespace) -> None:
    from cli.serve import serve

    serve(args.host, args.port, args.model, worker=not args.no_worker)


def cmd_config(args: argparse.Namespace) -> None:
    from core.settings import Settings

    current = Settings()
    for env, default, meaning in Settings.describe():
        value = getattr(current, env.removeprefix("CRISPEDIT_").lower())
        print(f"{env}={value}\n    default: {default}\n    {meaning}")


def cmd_worker(args: argparse.Namespace) -> None:
    from worker.main import run_worker

    run_worker(args.model, burst=args.burst)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crispedit", description=__doc__, formatter_class=HelpWithDefaults)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version('crispedit-service')}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-cache", help="K-FAC curvature of the capability loss for the editable layers")
    p.add_argument("--model", default="smollm2", help="a bundled model (smollm2, gemma3-270m) or a checkpoint folder")
    p.add_argument("--corpus", default="self",
                   help="a .txt or .jsonl file; 'self' (text sampled from the model); 'self-raw:PROMPTS' or "
                        "'self-chat:PROMPTS' (the model's own answers to the prompts in a file, raw or through "
                        "the chat template); or a weighted mixture 'SOURCE=W,SOURCE=W'")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="sequences of capability text")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--layers", default=None,
                   help="comma-separated layer indices (default: SmolLM2 4-8, as measured; else 5 middle layers)")
    p.add_argument("--fisher", choices=["empirical", "sampled"], default="empirical",
                   help="gradients of the text's own next tokens, or of tokens sampled from the model")
    p.add_argument("--ekfac", action="store_true", help="also store EK-FAC corrected eigenvalues")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward and backward pass")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled text and windows")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help=DTYPE_HELP)
    p.add_argument("--out", required=True, help="the cache file to write (safetensors)")
    p.set_defaults(func=cmd_build_cache)

    p = sub.add_parser("mix-cache", help="recombine curvature caches of one model into their weighted mixture")
    p.add_argument("caches", nargs="+", help="CACHE=WEIGHT (a weight defaults to 1)")
    p.add_argument("--out", required=True, help="the mixed cache file to write")
    p.set_defaults(func=cmd_mix_cache)

    p = sub.add_parser("edit", help="apply edits from a JSONL file and write a Hugging Face checkpoint")
    p.add_argument("--model", default="smollm2", help="a bundled model (smollm2, gemma3-270m) or a checkpoint folder")
    p.add_argument("--cache", default=None, help="the model's curvature cache (`crispedit build-cache`); needed but "
                                                  "for --method ft")
    p.add_argument("--edits", required=True, help=EDITS_HELP)
    p.add_argument("--layers", default=None, help="only for --method ft without a cache")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help=DTYPE_HELP)
    p.add_argument("--out", required=True, help="folder for the edited Hugging Face checkpoint")
    p.add_argument("--cache-out", default=None, help="with --sequential-chunk: save the folded curvature here")
    add_edit_options(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("eval", help="edit quality (and capability) of a model, as JSON")
    p.add_argument("--model", required=True, help="the (edited) checkpoint folder, or a bundled model")
    p.add_argument("--edits", required=True, help=EDITS_HELP)
    p.add_argument("--base", default=None, help="base model, for locality agreement")
    p.add_argument("--capability", action="store_true", help="also perplexity and multiple-choice accuracy")
    p.add_argument("--no-generate", action="store_true", help="teacher-forced metrics only (fast)")
    p.add_argument("--data", default=None, help="data folder (default $CRISPEDIT_DATA or ../shared/data)")
    p.add_argument("--mc-limit", type=int, default=100, help="--capability: items per multiple-choice task")
    p.add_argument("--ppl-texts", type=int, default=40, help="--capability: WikiText-2 test paragraphs for perplexity")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help=DTYPE_HELP)
    p.set_defaults(func=cmd_eval)

    with contextlib.suppress(SystemExit):  # an installed copy without the checkout's lab/ has no bench command
        lab("bench").add_bench_parser(sub)
    from registry.cli import add_registry_parser

    add_registry_parser(sub)

    p = sub.add_parser("serve", help="run the HTTP API (configuration: CRISPEDIT_* environment variables)")
    p.add_argument("--host", default="127.0.0.1", help="the interface to listen on (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=8000, help="the TCP port")
    p.add_argument("--model", default=None, help="served model(s), as CRISPEDIT_MODELS (default smollm2)")
    p.add_argument("--no-worker", action="store_true", help="API only (workers run as `crispedit worker`)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("config", help="every setting: environment variable, default, current value, meaning")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("worker", help="run an RQ worker that applies edits to one model")
    p.add_argument("--model", default="smollm2", help="the served model (a name in CRISPEDIT_MODELS) it edits")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.set_defaults(func=cmd_worker)

    for command in sub.choices.values():
        command.formatter_class = HelpWithDefaults
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from crispedit.edit import EditError
    from registry import BlobError, RegistryError

    try:
        args.func(args)
    except (ValueError, FileNotFoundError, EditError, RegistryError, BlobError) as err:
        log.error("%s", err)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
