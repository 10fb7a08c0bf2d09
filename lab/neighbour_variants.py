"""Variants of neighbour protection on facts of our own: the runs behind docs/neighbours.md ("Held out").

Each variant edits the same facts on the same curvature cache (chat form, batch 4, one chunk) and is measured:
- protected: the service's report, the share of the derived neighbours the edit was given that keep their
  greedy chat answer (first line);
- held out: another draw of derived neighbours (seed 11, 6 per kind) minus every protected prompt, plus the
  questions of ``--probes``, asked in chat, the same measure;
- loc: locality prompts of ZsRE's *train* file (records 500 on), asked raw, the same measure;
- ΔPPL: perplexity change on 40 WikiText-2 *validation* paragraphs (the benchmarks' test text stays unseen);
- Rel TF on the raw prompts, chat answers that contain the target, edit seconds and optimizer steps.

Variants (``--variants``, comma-separated NAME:VALUE):
  beta:B       the KeptOutputs penalty at β = B (beta:0 is the paper's recipe, beta:300 the default)
  bare:B       β = B, the chat form trained on the bare target instead of the target in the model's phrasing
  nullspace:E  β 0; every Adam step projected off the neighbours' inputs (the eigen-directions of their
               per-token normalised second moment that hold E of its energy)
  ngd:S        β 0; normalised projected gradient descent with momentum 0.9 instead of Adam (relative step S)
  scale:S      β 300, then the edit shrunk to W₀ + S·ΔW
  stop:T       β 300 with early stop T instead of 0.01
  solve:B      β 0, then per layer ΔW ← ΔW (C_E + εI)(C_E + B·C_N + εI)⁻¹ (C_E: the edit texts' inputs, C_N the
               neighbours', each scaled to mean eigenvalue 1; ε = 1e-3)
  common:B     β 300, the penalty also over the questions of ``--common`` (both forms, the parent's answers),
               weighted B against the neighbours
  subject:B    β B with ROME's subject key: the edit loss reaches the weights only through the subject's last token
  epochs:N     the subject key at β 300, at most N epochs
  lr:X         the subject key at β 300, learning rate X
  yield:B      the subject key at β B, the penalty yielding while the edit is stuck (crispedit.edit.YIELD_*);
               every other variant but until runs with it off
  until:T      the default recipe (subject key, β 300 yielding) with early stop T instead of 0.01
  solved:B     the subject key at β B yielding, early stop --solved-stop (0.1), then the keyed solve
               (crispedit.keyed_solve) on the trained prompts' keys alone
  keys:B       solved:B with the key variants (paraphrase, prefix) kept at the solve: the default recipe at
               B = 30; keysp:B with paraphrases only, keysx:B with prefixes only
  ridge:E      keys:30 with the solve's ridge ε = E instead of crispedit.keyed_solve.RIDGE
  ridgex:E     keysx:30 (the default) with the solve's ridge ε = E
  capx:L       keysx:30 (the default) with a fixed λ = L of the capability cache's Â_C in the solve's metric
  budget:B     keysx:30 (the default) with the solve's budget ρ ≤ B on generic text's output change
  lrx:M        keysx:30 (the default) with M × the default learning rate
  prefix:B     β B, the penalty also over each edit's own prompt up to the end of its subject (both forms), so the
               edit acts only where the whole question has been read

With ``--dataset zsre|counterfact --n N`` the facts are N tuning records (ZsRE's train file; CounterFact from
record 2000 on) instead, and Gen TF on their rephrases is printed too. ``--chunks 0,10`` runs every variant as one
batch (0) and in sequential chunks of 10 edits (Alg. 2: each chunk trained, solved and folded in turn).

Usage: .venv/bin/python -m lab.neighbour_variants CACHE [--facts lab/tuning_facts.json]
       [--variants beta:0,beta:300] [--per-kind 3,6] [--probes FILE.json] [--common FILE.txt] [--verbose]
   (CACHE: e.g. `crispedit build-cache --corpus self --samples 32 --seq-len 256 --out CACHE`, the worker's default)
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from crispedit.arch import arch_spec, editable_modules
from crispedit.cache import CurvatureCache
from crispedit.capability import heldout_texts, perplexity
from crispedit.corpus import batches_of
from crispedit.edit import EditConfig, edit
from crispedit.evaluate import edit_quality
from crispedit.models import load_model
from crispedit.neighbours import (
    KeptOutputs,
    Neighbour,
    asked,
    derive_neighbours,
    first_line,
    greedy_answers,
    infer_subject,
    neighbour_report,
    protect,
)
from crispedit.optim import ProjectedAdam
from crispedit.requests import EditRequest
from lab.edit_sets import load_edit_dataset, shared_data_dir

FACTS = Path(__file__).with_name("tuning_facts.json")
edit_module = importlib.import_module("crispedit.edit")  # the module: the package exports a function `edit`
keyed_solve_module = importlib.import_module("crispedit.keyed_solve")
KEY_VARIANTS = {"keys": ("paraphrase", "prefix"), "keysp": ("paraphrase",), "keysx": ("prefix",)}


@torch.no_grad()
def second_moments(model, modules, rows, normalise: bool) -> dict[str, torch.Tensor]:
    """Σ a aᵀ of each module's input over every token of ``rows`` (each a scaled to unit norm if ``normalise``)."""
    sums: dict[str, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []

    def hook(name):
        def grab(module, inputs, output):
            a = inputs[0][mask_now[0]].double()
            a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalise else a
            sums[name] = a.T @ a + sums.get(name, 0)
        return grab

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    for batch in batches_of([list(r) for r in rows], 16):
        mask_now[:] = [batch["attention_mask"].bool()]
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    return sums


class OffNeighbours:
    """CrispEdit's projector, then the step's rows taken off the top-energy directions U of the neighbours."""

    def __init__(self, projector, U: torch.Tensor) -> None:
        self.projector, self.U = projector, U
        self.kept_fraction = getattr(projector, "kept_fraction", 1.0)

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        R = self.projector(Q) if self.projector is not None else Q
        return R - (R @ self.U) @ self.U.T


def top_energy(A: torch.Tensor, energy: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(A)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    k = int((torch.cumsum(values, 0) / values.sum() < energy).sum()) + 1
    return vectors[:, :k].float()


class NormalisedGD(ProjectedAdam):
    """Projected gradient descent with momentum 0.9, each step ``relative`` × ‖W‖ long (lr/2e-3 scales it)."""

    relative = 0.003

    @torch.no_grad()
    def step(self, closure=None):
        self.project_gradients()
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                state = self.state.setdefault(p, {})
                state["m"] = p.grad.clone() if "m" not in state else 0.9 * state["m"] + p.grad
                size = self.param_groups[0]["lr"] / 2e-3 * self.relative * p.norm()
                p.sub_(size * state["m"] / state["m"].norm().clamp_min(1e-20))


class StepProjectedAdam(ProjectedAdam):
    """Adam whose step, not only its gradient, is projected: the weights move only inside the kept subspace."""

    @torch.no_grad()
    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        before = [p.detach().clone() for p in params]
        super().step()
        for p, old, projector in zip(params, before, self.projectors, strict=True):
            if projector is not None:
                p.copy_(old + projector(p - old))


def localise(model, tok, modules, protection, original: dict, edited: dict, beta: float) -> None:
    """ΔW ← ΔW (C_E + εI)(C_E + β C_N + εI)⁻¹ on each layer, in place (see the module docstring)."""
    texts = [x.prompt + x.spaced_target for r in protection.requests for x in (r, r.in_chat_form(tok))]
    C_E = second_moments(model, modules, [tok(t)["input_ids"] for t in texts], normalise=False)
    params = dict(model.named_parameters())
    for name in modules:
        weight = f"{name}.weight"
        delta = (edited[weight] - original[weight]).double()
        d = delta.shape[1]
        ce = C_E[name] / C_E[name].trace() * d
        cn = protection.kept.A[name].double()
        cn = cn / cn.trace() * d
        eye = 1e-3 * torch.eye(d, dtype=torch.float64)
        M = torch.linalg.solve((ce + beta * cn + eye).T, (ce + eye).T).T
        params[weight].copy_((original[weight].double() + delta @ M).float())


def with_common(kept: KeptOutputs, common: KeptOutputs, weight: float) -> KeptOutputs:
    """One penalty over both sets: A = A_n / tr(W₀A_nW₀ᵀ) + weight · A_c / tr(W₀A_cW₀ᵀ)."""
    A = {n: kept.A[n] / kept.scale[n] + weight * common.A[n] / common.scale[n] for n in kept.F}
    merged = KeptOutputs(A, kept.W0, False, factored=False)  # W0 is already (out, in)
    merged.fan_in_fan_out, merged.scale = kept.fan_in_fan_out, dict.fromkeys(A, 1.0)
    return merged


def with_prefixes(model, tok, modules, fan_in_fan_out, protection, requests) -> KeptOutputs:
    """The neighbours' rows and each edit's prompt cut after its subject (chat and raw), in one KeptOutputs."""
    rows = [tok(t)["input_ids"] + a for t, a in zip(protection.texts, protection.answers, strict=True)]
    for r in requests:
        subject = infer_subject(r)
        for form in (True, False):
            text = asked(tok, r.prompt, form)
            end = text.rfind(subject) + len(subject) if subject and subject in text else -1
            if end > 0:
                rows.append(tok(text[:end])["input_ids"])
    return KeptOutputs.record(model, modules, rows, fan_in_fan_out)


KEYED = ("subject", "epochs", "lr", "yield", "until", "solved")  # variants editing through the subject key


def unchanged(before: list[str], after: list[str]) -> float:
    return sum(b == a for b, a in zip(before, after, strict=True)) / max(1, len(before))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--facts", default=str(FACTS))
    parser.add_argument("--variants", default="beta:0,beta:300")
    parser.add_argument("--per-kind", default="3")
    parser.add_argument("--held-seed", type=int, default=11, help="the held-out draw's seed (-1: none, --probes alone)")
    parser.add_argument("--protect-seed", type=int, default=0, help="the protected draw's seed")
    parser.add_argument("--probes", help="a JSON list of more held-out questions")
    parser.add_argument("--common", help="a text file of common questions, one a line (variant common:B)")
    parser.add_argument("--loc", type=int, default=40, help="ZsRE train locality prompts measured")
    parser.add_argument("--solved-stop", type=float, default=0.1, help="variant solved's early stop")
    parser.add_argument("--dataset", help="zsre or counterfact: tuning records instead of --facts")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--verbose", action="store_true", help="print each held-out neighbour that changed")
    parser.add_argument("--max-epochs", type=int, default=25, help="every variant's epoch limit but epochs:N's")
    parser.add_argument("--chunks", default="0", help="sequential chunk sizes to run every variant with (0: one batch)")
    args = parser.parse_args()
    model, tok = load_model("smollm2")
    cache = CurvatureCache.load(args.cache, model=model)
    if args.dataset == "zsre":
        requests = load_edit_dataset("zsre", shared_data_dir() / "editing/zsre/zsre_mend_train_1k.json", n=args.n)
    elif args.dataset:
        requests = load_edit_dataset(args.dataset, n=args.n, offset=2000)
    else:
        requests = [EditRequest(p, t) for p, t in json.loads(Path(args.facts).read_text())]
    modules = editable_modules(model, cache.layers)
    fan_in_fan_out = arch_spec(model).fan_in_fan_out
    started = time.perf_counter()
    protections = {k: protect(model, tok, requests, True, modules, fan_in_fan_out, per_kind=k,
                              seed=args.protect_seed)
                   for k in map(int, args.per_kind.split(","))}
    print(f"protect: {time.perf_counter() - started:.1f} s", flush=True)
    protected = {nb.prompt for p in protections.values() for nb in p.neighbours}
    held = [nb for nb in derive_neighbours(model, tok, requests, 6, seed=args.held_seed) if nb.prompt not in protected
            ] if args.held_seed >= 0 else []
    held += [Neighbour(q, "probe", 0) for q in json.loads(Path(args.probes).read_text())] if args.probes else []
    held_texts = [asked(tok, nb.prompt, True) for nb in held]
    loc_file = shared_data_dir() / "editing/zsre/zsre_mend_train_1k.json"
    loc_texts = [r.locality_prompt for r in load_edit_dataset("zsre", loc_file, n=args.loc, offset=500)
                 if r.locality_prompt]

    def answers(texts: list[str]) -> list[str]:
        return [first_line(tok, a) for a in greedy_answers(model, tok, texts)]

    held_before, loc_before = answers(held_texts), answers(loc_texts)
    paragraphs = heldout_texts(shared_data_dir() / "capability/wikitext2/wiki.valid.tokens.txt", 40)
    base_ppl = perplexity(model, tok, paragraphs)
    common = None
    if args.common:
        questions = [q.strip() for q in Path(args.common).read_text().splitlines() if q.strip()]
        skip = {nb.prompt.lower() for nb in held} | {r.prompt.lower() for r in requests}
        texts = [asked(tok, q, form) for q in questions if q.lower() not in skip for form in (True, False)]
        rows = [tok(t)["input_ids"] + a for t, a in zip(texts, greedy_answers(model, tok, texts), strict=True)]
        common = KeptOutputs.record(model, modules, rows, fan_in_fan_out)
    make_projectors = edit_module.make_projectors
    yield_loss, early_stop = edit_module.YIELD_LOSS, edit_module.EARLY_STOP
    ridge, lambdas = keyed_solve_module.RIDGE, keyed_solve_module.LAMBDAS
    for per_kind, protection in protections.items():
        for chunk, variant in itertools.product(map(int, args.chunks.split(",")), args.variants.split(",")):
            name, value = variant.split(":")
            keyed_solve_module.RIDGE = float(value) if name in ("ridge", "ridgex") else ridge
            keyed_solve_module.LAMBDAS = (float(value),) if name == "capx" else lambdas
            budget = float(value) if name == "budget" else keyed_solve_module.CAPABILITY_BUDGET
            lr = float(value) * edit_module.default_lr([m.weight for m in modules.values()]) if name == "lrx" else None
            name, value = {"ridge": ("keys", "30"), "ridgex": ("keysx", "30"), "lrx": ("keysx", "30"),
                            "capx": ("keysx", "30"), "budget": ("keysx", "30")}.get(
                name, (name, value))
            key_variants = KEY_VARIANTS.get(name, ())
            name = "solved" if key_variants else name
            value = float(value)
            beta = (value if name in ("beta", "bare", "common", "subject", "yield", "solved")
                    else 300.0 if name in ("scale", "stop", "epochs", "lr", "until") else 0.0)
            if name == "common":
                beta, kept = 300.0, with_common(protection.kept, common, value)
            elif name == "prefix":
                beta, kept = value, with_prefixes(model, tok, modules, fan_in_fan_out, protection, requests)
            else:
                kept = protection.kept
            config = EditConfig(chat_form=True, batch_size=4, sequential_chunk=chunk or len(requests),
                                neighbour_weight=beta, subject_key=name in KEYED,
                                max_epochs=int(value) if name == "epochs" else args.max_epochs,
                                lr=value if name == "lr" else lr, keyed_solve=name == "solved",
                                early_stop=args.solved_stop if name == "solved" else None,
                                key_variants=key_variants, capability_budget=budget)
            if name == "nullspace":
                rows = [tok(t)["input_ids"] + a for t, a in zip(protection.texts, protection.answers, strict=True)]
                bases = {n: top_energy(A, value) for n, A in second_moments(model, modules, rows, True).items()}
                edit_module.make_projectors = lambda *a, bases=bases: [
                    OffNeighbours(p, bases[n]) for n, p in zip(a[2], make_projectors(*a), strict=True)]
            edit_module.ProjectedAdam = {"ngd": NormalisedGD, "nullspace": StepProjectedAdam}.get(name, ProjectedAdam)
            edit_module.EARLY_STOP = value if name in ("stop", "until") else early_stop
            NormalisedGD.relative = value
            started = time.perf_counter()
            trained = requests if name == "bare" else protection.requests
            edit_module.YIELD_LOSS = yield_loss if name in ("yield", "until", "solved") else float("inf")
            if name in KEYED:
                trained = [replace(r, subject=infer_subject(r)) for r in trained]
            result = edit(model, tok, trained, cache, config, kept=kept)
            seconds = time.perf_counter() - started
            edit_module.make_projectors, edit_module.ProjectedAdam = make_projectors, ProjectedAdam
            if name == "scale":  # W₀ + s·ΔW
                with torch.no_grad():
                    params = dict(model.named_parameters())
                    for n, tensor in result.original.items():
                        params[n].copy_(torch.lerp(tensor, params[n], value))
            if name == "solve":
                edited = {n: p.detach().clone() for n, p in model.named_parameters() if n in result.original}
                with torch.no_grad():
                    localise(model, tok, modules, protection, result.original, edited, value)
            quality = edit_quality(model, tok, requests, generated=False)
            rel, gen = quality["rel_tf"], quality["gen_tf"]
            ppl = 100 * (perplexity(model, tok, paragraphs) / base_ppl - 1)
            report = neighbour_report(model, tok, requests, protection)
            held_after, loc_after = answers(held_texts), answers(loc_texts)
            chat = answers([asked(tok, r.prompt, True) for r in requests])
            heads = ([" ".join(a.split()[:5]) for a in held_before], [" ".join(a.split()[:5]) for a in held_after])
            hits = sum(r.target.lower() in a.lower() for r, a in zip(requests, chat, strict=True))
            print(f"per kind {per_kind} {variant}" + (f" chunks of {chunk}" if chunk else "") +
                  f": protected {report['unchanged']:.2f}, held out "
                  f"{unchanged(held_before, held_after):.2f} ({len(held)}; first 5 words {unchanged(*heads):.2f}), "
                  f"loc {unchanged(loc_before, loc_after):.2f} ({len(loc_texts)}), ΔPPL {ppl:+.2f} %, "
                  f"Rel TF {rel:.2f}, "
                  + (f"Gen TF {gen:.3f}, " if gen is not None else "") +
                  f"chat answers with the target {hits}/{len(requests)}, edit "
                  f"{seconds:.1f} s ({result.steps} steps, {len(result.epoch_losses)} epochs, final loss "
                  f"{result.epoch_losses[-1]:.3f})", flush=True)
            print("   epoch losses", " ".join(f"{x:.3f}" for x in result.epoch_losses), flush=True)
            if args.verbose:
                for nb, b, a in zip(held, held_before, held_after, strict=True):
                    if b != a:
                        print(f"   CHANGED {nb.prompt} | {b[:60]} → {a[:60]}")
            with torch.no_grad():
                params = dict(model.named_parameters())
                for n, tensor in result.original.items():
                    params[n].copy_(tensor)


if __name__ == "__main__":
    main()
