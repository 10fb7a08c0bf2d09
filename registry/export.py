"""Export a version as a standard Hugging Face checkpoint folder (config, tokenizer, safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from registry.store import Registry


def export_version(registry: Registry, model_name: str, ref: str, out: str | Path) -> Path:
    """Base checkpoint + the version's tensors, saved so ``AutoModelForCausalLM.from_pretrained(out)`` loads it."""
    from crispedit.models import load_model, model_fingerprint

    info = registry.model_info(model_name)
    model, tok = load_model(info["base"], device="cpu")
    if model_fingerprint(model) != info["fingerprint"]:
        raise RuntimeError(f"the base checkpoint {info['base']} no longer matches the registered fingerprint")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in registry.tensors(model_name, ref).items():
            params[name].copy_(tensor)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
