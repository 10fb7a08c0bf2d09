"""The curvature cache: per-layer K-FAC factors of the capability loss, built once, reused by every edit.

Stored as one safetensors file (tensors ``<module>.A``, ``<module>.S``, optional ``<module>.ekfac``)
with JSON metadata: the base model's fingerprint, layers, sample and token counts, corpus fingerprint
and Fisher mode. A cache built for another model or other layers is refused with a clear error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crispedit import clock
from crispedit.arch import editable_modules
from crispedit.corpus import batches_of, capability_windows, fingerprint_windows
from crispedit.kfac import KFACFactors, ekfac_eigenvalues, kfac_factors, merge_factors, mix_factors
from crispedit.models import model_fingerprint
from crispedit.progress import Bar


@dataclass(frozen=True)
class CurvatureCache:
    """K-FAC factors for each editable module, plus where they came from."""

    factors: dict[str, KFACFactors]
    layers: tuple[int, ...]
    model_fingerprint: str
    meta: dict = field(default_factory=dict)  # corpus, corpus_fingerprint, samples, seq_len, fisher, ...
    ekfac: dict[str, torch.Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return next(iter(self.factors.values())).num_tokens

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, f in self.factors.items():
            tensors[f"{name}.A"] = f.A.contiguous().cpu()
            tensors[f"{name}.S"] = f.S.contiguous().cpu()
        for name, values in (self.ekfac or {}).items():
            tensors[f"{name}.ekfac"] = values.contiguous().cpu()
        meta = {
            "layers": list(self.layers),
            "model_fingerprint": self.model_fingerprint,
            "num_tokens": {name: f.num_tokens for name, f in self.factors.items()},
            **self.meta,
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"crispedit": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(
        cls, path: str | Path, model=None, layers: tuple[int, ...] | None = None, device: str | None = None
    ) -> CurvatureCache:
        """Load a cache; with ``model``/``layers`` given, refuse one built for another model or other layers."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no curvature cache at {path}: build one with `crispedit build-cache`")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("crispedit", "{}"))
        if "model_fingerprint" not in meta:
            raise ValueError(f"{path} is not a CrispEdit curvature cache (no metadata)")
        if model is not None and meta["model_fingerprint"] != model_fingerprint(model):
            raise ValueError(
                f"curvature cache {path} was built for another model (fingerprint {meta['model_fingerprint']}, "
                f"this model is {model_fingerprint(model)}, {meta.get('model', '?')} vs {model.name_or_path}); "
                "rebuild it for this model"
            )
        if layers is not None and tuple(layers) != tuple(meta["layers"]):
            raise ValueError(
                f"curvature cache {path} covers layers {meta['layers']}, but layers {list(layers)} were asked for; "
                "rebuild it with --layers " + ",".join(map(str, layers))
            )
        tensors = load_file(str(path), device=device or "cpu")
        counts = meta.pop("num_tokens")
        factors = {
            name: KFACFactors(A=tensors[f"{name}.A"], S=tensors[f"{name}.S"], num_tokens=int(n))
            for name, n in counts.items()
        }
        ekfac = {name: tensors[f"{name}.ekfac"] for name in counts if f"{name}.ekfac" in tensors} or None
        return cls(
            factors=factors, layers=tuple(meta.pop("layers")), model_fingerprint=meta.pop("model_fingerprint"),
            meta=meta, ekfac=ekfac,
        )

    def folded(self, edit_factors: dict[str, KFACFactors]) -> CurvatureCache:
        """Alg. 2 line 6: the token-weighted average of these factors with an edit batch's factors.

        EK-FAC corrections belong to the old eigenbasis, so they are dropped from the folded cache.
        """
        factors = {name: merge_factors([f, edit_factors[name].to(f.A.device)]) for name, f in self.factors.items()}
        folds = int(self.meta.get("edit_folds", 0)) + 1
        return replace(self, factors=factors, ekfac=None, meta={**self.meta, "edit_folds": folds})

    def to(self, device: torch.device | str) -> CurvatureCache:
        """The same cache with its factors on ``device`` (a GPU worker folds and decomposes them there)."""
        ekfac = {n: v.to(device) for n, v in self.ekfac.items()} if self.ekfac else None
        return replace(self, factors={n: f.to(device) for n, f in self.factors.items()}, ekfac=ekfac)

    def subset(self, layers: tuple[int, ...], names: list[str]) -> CurvatureCache:
        """The factors of some of the cache's layers (``names``: their module names, in the same order)."""
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise ValueError(f"the curvature cache covers layers {list(self.layers)}, not {missing}")
        ekfac = {n: self.ekfac[n] for n in names if n in self.ekfac} if self.ekfac else None
        return replace(self, factors={n: self.factors[n] for n in names}, layers=tuple(layers), ekfac=ekfac or None)

    @classmethod
    def mixed(cls, caches: list[CurvatureCache], weights: list[float]) -> CurvatureCache:
        """Recombine caches of the same model and layers into the cache of their weighted mixture."""
        first = caches[0]
        for c in caches[1:]:
            if (c.model_fingerprint, c.layers) != (first.model_fingerprint, first.layers):
                raise ValueError("only caches of the same model and layers can be mixed")
        factors = {name: mix_factors([c.factors[name] for c in caches], weights) for name in first.factors}
        parts = [{"corpus": c.meta.get("corpus"), "weight": w, "tokens": c.num_tokens,
                  "corpus_fingerprint": c.meta.get("corpus_fingerprint")} for c, w in zip(caches, weights, strict=True)]
        meta = {**first.meta, "corpus": ",".join(f"{p['corpus']}={p['weight']:g}" for p in parts), "parts": parts,
                "corpus_fingerprint": "+".join(str(p["corpus_fingerprint"]) for p in parts),
                "seconds": round(sum(float(c.meta.get("seconds", 0)) for c in caches), 2)}
        return cls(factors=factors, layers=first.layers, model_fingerprint=first.model_fingerprint, meta=meta)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """``"SOURCE[=WEIGHT],SOURCE[=WEIGHT],..."`` → [(source, weight)]; a missing weight is 1."""
    parts = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            raise ValueError(f"empty source in corpus mixture {spec!r}")
        source, sep, weight = item.rpartition("=")
        if not sep:
            parts.append((item, 1.0))
            continue
        try:
            parts.append((source, float(weight)))
        except ValueError as err:
            raise ValueError(f"corpus mixture weight {weight!r} in {item!r} is not a number") from err
    return parts


def build_cache(
    model,
    tokenizer,
    layers: tuple[int, ...],
    corpus: str,
    n_samples: int,
    seq_len: int = 512,
    fisher: str = "empirical",
    batch_size: int = 4,
    ekfac: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> CurvatureCache:
    """One streaming pass over the capability corpus for all layers (fp32, token-averaged), with a progress bar.

    ``corpus`` may be a weighted mixture, ``"SOURCE=W,SOURCE=W"`` (see ``parse_mixture``): each part is
    built with ``n_samples`` sequences and the parts are mixed by weight (EK-FAC is per single corpus).
    """
    parts = parse_mixture(corpus)
    if len(parts) > 1:
        if ekfac:
            raise ValueError("EK-FAC correction is supported for a single corpus, not a mixture")
        caches = [build_cache(model, tokenizer, layers, source, n_samples, seq_len, fisher, batch_size, seed=seed,
                              progress=progress) for source, _ in parts]
        return CurvatureCache.mixed(caches, [w for _, w in parts])
    corpus = parts[0][0]
    modules = editable_modules(model, layers)
    windows = capability_windows(model, tokenizer, corpus, n_samples, seq_len, seed=seed)
    device = next(model.parameters()).device
    started = clock.now(device)
    with Bar(total=sum(len(w) - 1 for w in windows), unit="tok", desc="K-FAC", disable=not progress) as bar:
        factors = kfac_factors(model, modules, batches_of(windows, batch_size), fisher, seed, on_batch=bar.update)
    corrected = None
    if ekfac:
        from crispedit.eigen import eigh_psd

        bases = {name: (eigh_psd(f.S)[1], eigh_psd(f.A)[1]) for name, f in factors.items()}
        batches = Bar(batches_of(windows, batch_size), total=-(-len(windows) // batch_size), unit="batch",
                       desc="EK-FAC eigenvalues", disable=not progress)  # a second pass over the corpus
        corrected = ekfac_eigenvalues(model, modules, batches, bases, fisher, seed)
    return CurvatureCache(
        factors={name: KFACFactors(f.A.cpu(), f.S.cpu(), f.num_tokens) for name, f in factors.items()},
        layers=tuple(layers),
        model_fingerprint=model_fingerprint(model),
        meta={
            "model": str(getattr(model, "name_or_path", "")),
            "corpus": corpus,
            "corpus_fingerprint": fingerprint_windows(windows),
            "samples": n_samples,
            "seq_len": seq_len,
            "fisher": fisher,
            "seconds": round(clock.now(device) - started, 2),
        },
        ekfac=None if corrected is None else {k: v.cpu() for k, v in corrected.items()},
    )
