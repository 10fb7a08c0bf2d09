"""Export a version as a standard Hugging Face checkpoint folder (config, tokenizer, safetensors), with a model
card (``README.md``) and the version's provenance (``crispedit.json``): base model, license, and every version
from the base to this one with its edits, metrics, method and hyperparameters."""

from __future__ import annotations

import json
import os
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from registry.store import Registry, Version

# tokenizer_config.json keys that describe how this process loaded the tokenizer, not the tokenizer
LOADING_KEYS = ("is_local", "local_files_only")


def export_version(registry: Registry, model_name: str, ref: str, out: str | Path) -> Path:
    """Base checkpoint + the version's tensors, saved so ``AutoModelForCausalLM.from_pretrained(out)`` loads it."""
    from crispedit.models import ORIGIN, load_model, model_fingerprint

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
    portable_tokenizer_config(out, getattr(model.config, "max_position_embeddings", None))
    origin, license_id = ORIGIN.get(info["base"], (info["base"], None))
    lineage = registry.lineage(model_name, ref)
    provenance = {"model": model_name, "version": lineage[0].id, "base": info["base"], "base_model": origin,
                  "license": license_id, "base_fingerprint": info["fingerprint"], "exported_at": time.time(),
                  "lineage": [asdict(v) for v in lineage]}
    (out / "crispedit.json").write_text(json.dumps(provenance, indent=1, default=str))
    (out / "README.md").write_text(model_card(model_name, origin, license_id, lineage))
    return out


def exported(folder: Path) -> bool:
    """Whether ``folder`` holds a whole export (the model card is written last)."""
    return (folder / "README.md").exists()


def archive(folder: Path) -> Path:
    """``folder`` as an uncompressed tar beside it (safetensors barely compress), written aside and renamed, so a
    reader never sees part of one."""
    target = folder.with_name(folder.name + ".tar")
    if not target.exists():
        part = target.with_name(f"{target.name}.{os.getpid()}.part")
        with tarfile.open(part, "w") as tar:
            tar.add(folder, arcname=folder.name)
        os.replace(part, target)
    return target


def portable_tokenizer_config(folder: Path, max_length: int | None) -> None:
    """A tokenizer config that other tools read alike: the generic fast-tokenizer class rather than this
    transformers' backend name, no flags of how it was loaded here, and the model's real context length."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in LOADING_KEYS:
        config.pop(key, None)
    if (folder / "tokenizer.json").exists():
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if max_length:
        config["model_max_length"] = max_length
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def model_card(model_name: str, origin: str, license_id: str | None, lineage: list[Version]) -> str:
    """README.md: what the weights are (the base with edits), and each version's edits and figures."""
    edited = [v for v in reversed(lineage) if v.parent is not None]
    head = ["---", f"base_model: {origin}", *([f"license: {license_id}"] if license_id else []),
            "tags:", "- crispedit", "- model-editing", "---", "",
            f"# {model_name} {lineage[0].id}: {origin} with {sum(len(v.edits) for v in edited)} edit(s)", "",
            f"Edited with CrispEdit (arXiv 2602.15823) by the CrispEdit service: version {lineage[0].id} of "
            f"`{model_name}`, whose lineage from the base is {' → '.join(v.id for v in reversed(lineage))}. "
            "Every edit is listed below with its version; `crispedit.json` holds the same record in full.", ""]
    body = []
    for v in edited:
        metrics = v.metrics or {}
        figures = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("reliability", "kl", "neighbours_unchanged")
                            if isinstance(metrics.get(k), int | float))
        body += [f"## {v.id} (from {v.parent})", "",
                 f"{v.message or 'no message'} (by {v.author or 'unknown'}, "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(v.created_at))}); method `{v.method}`"
                 + (f"; {figures}" if figures else "") + ".", ""]
        body += [f"- {e.get('prompt', '')!r} → {e.get('target', '')!r}" for e in v.edits[:50]]
        if len(v.edits) > 50:
            body.append(f"- … and {len(v.edits) - 50} more (see crispedit.json)")
        shown = {k: x for k, x in v.hyperparameters.items() if k != "jobs"}
        body += ["", f"Hyperparameters: `{json.dumps(shown, default=str)}`", ""]
    return "\n".join(head + body) + "\n"
