"""Which part of a CounterFact edit carries its perplexity drift? (issue 2, BENCHMARKS.md §17)

BENCHMARKS.md §16 found that K-FAC's quadratic model sees a third to a fifth of the KL that a CrispEdit
edit costs on held-out text. This script edits the tuning records (CounterFact 2000 on, never tested) with
the paper recipe, then measures the held-out KL(base ‖ edited) and the teacher-forced reliability and
generality of the edit with one suspect part removed at a time:

- ``minus mean direction``: ΔW's component along the mean layer input ā, the part of the change that is
  the same shift at every position;
- ``minus top-k A directions``: ΔW's components along the k leading eigenvectors of the cache's A, the
  input directions that every token uses most (``bottom-k``: the k least used);
- ``edit off at positions < p``: the edited layers use their base weights at the first p positions (the
  first token is the attention sink, whose change reaches every later position);
- ``re-solved on its own inputs``: ΔW C_e (C_e + λ' A)⁻¹, which keeps ΔW's action on the edits' own inputs
  and shrinks it where capability inputs are large (MEMIT's trade, applied after the edit);
- ``scaled s``: s · ΔW, to see how generality depends on the edit's size.

Usage: .venv/bin/python -m lab.drift_suspects CACHE.safetensors [--n 50] [--texts 40] [--out FILE.json]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cf_tuning import emit, tuning_setup
from torch import nn

from crispedit.capability import _encode, _pad_right, heldout_texts, mean_kl, swapped_weights
from crispedit.edit import EditConfig, edit, edit_features
from crispedit.eigen import eigh_psd
from crispedit.evaluate import edit_quality
from lab.bench import HELDOUT_TEXT


@torch.no_grad()
def layer_inputs(model, tok, texts: list[str], modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every real token's input to each named module, at the model's current weights."""
    found: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    keep = torch.ones(0, dtype=torch.bool)
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: found[n].append(i[0].flatten(0, 1)[keep]))
             for n, m in modules.items()]
    try:
        seqs = _encode(tok, texts, 256)
        for i in range(0, len(seqs), 8):
            ids, mask = _pad_right(seqs[i : i + 8], 0)
            keep = mask.flatten().bool()
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(found[n]).float() for n in modules}


def measure(model, tok, requests, texts, original, new, positions_base: Callable[[int], torch.Tensor] | None = None):
    """Held-out KL and teacher-forced Rel/Gen of the model with ``new`` weights; with ``positions_base``, the
    edited modules keep their base weights at the positions it marks."""
    hooks = []
    if positions_base is not None:
        for n in new:
            def base_at(m, i, o, n=n):
                at = positions_base(o.shape[1]).to(o.device)[None, :, None]
                return torch.where(at, F.linear(i[0], original[n]), o)
            hooks.append(model.get_submodule(n.removesuffix(".weight")).register_forward_hook(base_at))
    try:
        kl = mean_kl(model, tok, texts, original, new)
        with swapped_weights(model, new):
            quality = edit_quality(model, tok, requests, generated=False)
    finally:
        for h in hooks:
            h.remove()
    return {"kl": kl, "rel_tf": quality["rel_tf"], "gen_tf": quality["gen_tf"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--offset", type=int, default=2000)
    parser.add_argument("--texts", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    data, model, tok, cache, requests = tuning_setup(args.cache, args.n, args.offset)
    texts = heldout_texts(data / HELDOUT_TEXT, args.texts)
    result = edit(model, tok, requests, cache, EditConfig())
    original, names = result.original, list(result.changed)
    dw = {n: (result.changed[n] - original[n]).float() for n in names}
    modules = {n.removesuffix(".weight"): model.get_submodule(n.removesuffix(".weight")) for n in names}
    with swapped_weights(model, original):
        inputs = {m + ".weight": a for m, a in layer_inputs(model, tok, texts, modules).items()}
        own = {m + ".weight": a.float() for m, (a, _) in edit_features(model, tok, requests, modules).items()}
    mean_in = {n: inputs[n].mean(0) for n in names}
    # share of the edit's output change E‖ΔW a‖² that is the common shift ‖ΔW ā‖²
    shift_share = {n: float((dw[n] @ mean_in[n]).norm() ** 2 / (inputs[n] @ dw[n].T).pow(2).sum(1).mean())
                   for n in names}

    def edited(part: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: original[n] + part(n) for n in names}

    def without(n: str, U: torch.Tensor) -> torch.Tensor:
        return dw[n] - (dw[n] @ U) @ U.T

    rows = {"full edit": measure(model, tok, requests, texts, original, result.changed)}
    rows["minus mean direction"] = measure(model, tok, requests, texts, original, edited(
        lambda n: without(n, (mean_in[n] / mean_in[n].norm())[:, None])))
    eigvecs = {n: eigh_psd(cache.factors[n.removesuffix(".weight")].A) for n in names}
    for k in (1, 8, 64):
        top = {n: U[:, lam.argsort(descending=True)[:k]] for n, (lam, U) in eigvecs.items()}
        rows[f"minus top-{k} A directions"] = measure(model, tok, requests, texts, original,
                                                      edited(lambda n, top=top: without(n, top[n])))
    # per layer, the share of ‖ΔW‖² and of the output change tr(ΔW A ΔWᵀ) = E‖ΔW a‖² in A's 1024 least-used directions
    tail_share = {}
    for n, (lam, U) in eigvecs.items():
        low = lam.argsort()[:1024]
        proj = dw[n] @ U
        tail_share[n] = {"weight": float(proj[:, low].pow(2).sum() / proj.pow(2).sum()),
                         "output": float((proj[:, low].pow(2) * lam[low]).sum() / (proj.pow(2) * lam).sum())}
    for k in (512, 1024):
        low = {n: U[:, lam.argsort()[:k]] for n, (lam, U) in eigvecs.items()}
        rows[f"minus bottom-{k} A directions"] = measure(model, tok, requests, texts, original,
                                                         edited(lambda n, low=low: without(n, low[n])))
    for p in (1, 4):
        rows[f"edit off at positions < {p}"] = measure(model, tok, requests, texts, original, result.changed,
                                                       positions_base=lambda L, p=p: torch.arange(L) < p)
    rows["edit only at position 0"] = measure(model, tok, requests, texts, original, result.changed,
                                              positions_base=lambda L: torch.arange(L) > 0)
    # MEMIT's trade on each layer: keep ΔW's action on the edits' own inputs (their covariance C_e, over
    # prompt + target tokens), minimise it on capability inputs (A): ΔW' = ΔW C_e (C_e + λ' A)⁻¹,
    # with λ' = λ tr C_e / tr A
    own_cov = {n: own[n].T @ own[n] / len(own[n]) for n in names}
    for lam in (0.1, 1.0):
        def resolved(n: str, lam: float = lam) -> torch.Tensor:
            A = cache.factors[n.removesuffix(".weight")].A
            C = own_cov[n]
            keep = torch.linalg.solve((C + lam * C.trace() / A.trace() * A).double(), C.double()).float()
            return dw[n] @ keep.T
        rows[f"re-solved on its own inputs, λ {lam}"] = measure(model, tok, requests, texts, original,
                                                                edited(resolved))
    for s in (0.5, 0.75):
        rows[f"scaled {s}"] = measure(model, tok, requests, texts, original, edited(lambda n, s=s: s * dw[n]))
    report = {"cache": args.cache, "edits": len(requests), "texts": len(texts), "final_loss": result.epoch_losses[-1],
              "shift_share": shift_share, "tail_share": tail_share, "rows": rows}
    emit(report, args.out)


if __name__ == "__main__":
    main()
