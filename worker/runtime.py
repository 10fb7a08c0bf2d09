"""What a worker process loads once and keeps: the model, its registry entry and its curvature cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from core.settings import Settings, get_settings
from crispedit.anchor import Anchors, load_anchors, load_text_anchors
from crispedit.arch import default_layers
from crispedit.cache import CurvatureCache, build_cache
from crispedit.corpus import sample_from_model
from crispedit.models import load_model, model_fingerprint
from registry import HotSwapModel, Registry

log = logging.getLogger("crispedit.worker")


@dataclass
class ModelRuntime:
    name: str
    model: object
    tokenizer: object
    registry: Registry
    holder: HotSwapModel
    capability: CurvatureCache
    guard_texts: list[str]
    settings: Settings
    anchors: Anchors | None = None  # the base model's predictions on CRISPEDIT_ANCHORS, recorded once
    text_anchors: Anchors | None = None  # ... and on windows of CRISPEDIT_TEXT_ANCHORS
    # (version, its curvature state) of this worker's last commit: the next edit on top of it folds nothing more
    last_state: tuple[str, CurvatureCache] | None = None


def curvature_path(settings: Settings, name: str) -> Path:
    return settings.registry_root / "curvature" / f"{name}.safetensors"


def guard_texts(model, tok) -> list[str]:
    """Held-out text for the capability guard, sampled from the base model itself (no dataset needed)."""
    return [tok.decode(ids, skip_special_tokens=True)
            for ids in sample_from_model(model, tok, 8, 64, seed=12345, progress=False)]


def load_runtime(name: str, settings: Settings | None = None) -> ModelRuntime:
    settings = settings or get_settings()
    base = settings.model_bases()[name]
    model, tok = load_model(base, device=settings.device, dtype=settings.dtype)
    registry = Registry(settings.registry_root)
    registry.create_model(name, base, model_fingerprint(model))
    path = curvature_path(settings, name)
    layers = default_layers(model)
    capability = CurvatureCache.load(path, model=model) if path.exists() else None
    if capability is not None and capability.layers != layers:  # the editable layers changed with an upgrade
        log.info("%s: the curvature cache covers layers %s, but layers %s are edited now; rebuilding it", name,
                 list(capability.layers), list(layers))
        capability = None
    if capability is None:
        log.info("%s: building its curvature cache from %s (%d × %d tokens)", name, settings.corpus,
                 settings.cache_samples, settings.cache_seq_len)
        capability = build_cache(model, tok, layers, settings.corpus, settings.cache_samples, settings.cache_seq_len)
        capability.save(path)
    capability = capability.to(next(model.parameters()).device)  # folded and decomposed there for every edit
    guard = guard_texts(model, tok)
    anchors = load_anchors(model, tok, settings.anchors) if settings.anchors else None
    text = load_text_anchors(model, tok, source) if (source := settings.text_anchor_source()) else None
    log.info("%s: loaded %s with its curvature cache (%d tokens)%s%s", name, base, capability.num_tokens,
             f", {len(anchors)} anchors" if anchors else "", f", {len(text)} text anchor windows" if text else "")
    return ModelRuntime(name, model, tok, registry, HotSwapModel(model, registry, name), capability, guard, settings,
                        anchors, text)


@cache
def runtime(name: str) -> ModelRuntime:
    """The process-wide runtime of ``name``: loaded on first use, never reloaded per job."""
    return load_runtime(name)
