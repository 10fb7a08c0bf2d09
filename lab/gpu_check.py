"""The GPU check: the engine at real 1B and 8B Llama shapes, on random weights (speed does not depend on them).

Needs only this repository and the machine's own PyTorch and transformers: no model files, no downloads. The
model is built from a config on the device; the tokenizer is a small byte-level BPE trained in memory on the
synthetic edits, whose ids all lie inside the model's vocabulary. For each shape it measures, with synchronised
timers, and writes after every phase (so a run cut short keeps what it measured):

- ``cache``: the K-FAC pass over SAMPLES × SEQ_LEN random tokens for the 5 edited layers, the projectors'
  eigendecompositions on the GPU (fp32, and fp64 beside it on the smaller shapes), and one projection of every
  layer's gradient (a step's share of the work);
- ``ft_vs_crispedit``: one epoch of EDITS synthetic edits at batch 32, FT against CrispEdit: the median step,
  and the wall time of 25 epochs extrapolated from it (CrispEdit's includes its one projector build);
- ``coalescing``: 32 edits posted together as one job against single-edit jobs, each job as a worker runs it
  (projectors of the current state, the edit, its statistics folded in); SINGLES single jobs are timed and
  the mean is multiplied by 32;
- the peak GPU memory of each phase.

Usage: python -m lab.gpu_check [--shapes 1b,8b] [--out runs/gpu_check] (``--shapes tiny`` runs on a CPU in
seconds; scripts/gpu_check.sh runs the whole check in one go).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from crispedit import clock
from crispedit.arch import default_layers, editable_modules
from crispedit.cache import CurvatureCache
from crispedit.corpus import batches_of
from crispedit.edit import EditConfig, edit, make_projectors
from crispedit.kfac import kfac_factors
from crispedit.models import model_fingerprint
from crispedit.requests import EditRequest

# Llama 3.2 1B and Llama 3.1 8B, as their configs give them; "tiny" checks the script itself on a CPU
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}
SYLLABLES = ("ka", "lo", "mi", "ren", "tus", "vo", "bel", "dra", "fin", "gor", "hal", "jen", "ko", "lum", "nar",
             "pe", "qui", "ros", "sa", "tel", "ur", "ve", "wix", "yo", "zen")
RELATIONS = ["capital", "author", "founder", "composer", "mother tongue", "home city", "employer", "religion"]


def word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def synthetic_edits(n: int, seed: int = 0) -> list[EditRequest]:
    """ZsRE-like edits of made-up subjects: a prompt of ~10 tokens, a target of 1-3 words."""
    rng = random.Random(seed)
    return [EditRequest(f"The {rng.choice(RELATIONS)} of {word(rng)} {word(rng)} is",
                        " ".join(word(rng) for _ in range(rng.randint(1, 3)))) for _ in range(n)]


def tokenizer_for(edits: list[EditRequest]):
    """A byte-level BPE of 2,000 tokens trained on the edits' own text, in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([e.prompt + " " + e.target for e in edits], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", bos_token="<|end|>",
                                   pad_token="<|end|>")


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A Llama of the shape's config, initialised on ``device`` directly in ``dtype`` (an 8B never sits in fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    model.name_or_path = f"random-llama-{shape}"
    return model


def peak_memory_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def restore(model, result) -> None:
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in result.original.items():
            params[name].copy_(tensor)


def build_cache(model, samples: int, seq_len: int, device: torch.device) -> tuple[CurvatureCache, dict]:
    layers = default_layers(model)
    modules = editable_modules(model, layers)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=g).tolist()
    reset_peak(device)
    started = clock.now(device)
    factors = kfac_factors(model, modules, batches_of(windows, 4))
    seconds = clock.now(device) - started
    cache = CurvatureCache(factors=factors, layers=tuple(layers), model_fingerprint=model_fingerprint(model))
    return cache, {"layers": list(layers), "tokens": cache.num_tokens, "kfac_s": round(seconds, 2),
                   "peak_gb": peak_memory_gb(device)}


def projectors_timed(cache: CurvatureCache, device: torch.device, precision: torch.dtype) -> tuple[float, float]:
    """(seconds to build the projectors, milliseconds of one projection of every layer's gradient: a step's share)."""
    import crispedit.eigen

    saved, crispedit.eigen.EIGH_PRECISION = crispedit.eigen.EIGH_PRECISION, precision
    try:
        started = clock.now(device)
        projectors = make_projectors(cache, EditConfig(energy=0.8), list(cache.factors), False, device)
        built = clock.now(device) - started
    finally:
        crispedit.eigen.EIGH_PRECISION = saved
    grads = [torch.randn(len(f.S), len(f.A), device=device) for f in cache.factors.values()]
    times = []
    for _ in range(5):
        started = clock.now(device)
        for projector, grad in zip(projectors, grads, strict=True):
            projector(grad)
        times.append(clock.now(device) - started)
    return round(built, 2), round(1000 * statistics.median(times), 1)


def ft_vs_crispedit(model, tok, cache: CurvatureCache, edits: list[EditRequest], device, build_s: float) -> dict:
    out = {"edits": len(edits), "batch": 32}
    for method in ("ft", "crispedit"):
        reset_peak(device)
        result = edit(model, tok, edits, cache if method == "crispedit" else None,
                      EditConfig(method=method, batch_size=32, max_epochs=1, energy=0.8,
                                 layers=cache.layers))
        restore(model, result)
        step = statistics.median(result.step_seconds)
        out[method] = {"steps": result.steps, "median_step_s": round(step, 4), "epoch_s": round(sum(
            result.step_seconds), 2), "peak_gb": peak_memory_gb(device)}
    ft, crisp = out["ft"]["epoch_s"], out["crispedit"]["epoch_s"]
    out["step_ratio"] = round(out["crispedit"]["median_step_s"] / out["ft"]["median_step_s"], 3)
    out["wall_ratio_25_epochs"] = round((build_s + 25 * crisp) / (25 * ft), 3)
    return out


def coalescing(model, tok, cache: CurvatureCache, device, singles: int, epochs: int) -> dict:
    """One job of 32 edits against single-edit jobs, each on top of the last (as the worker runs them)."""
    edits = synthetic_edits(32, seed=1)

    def job(state: CurvatureCache, requests: list[EditRequest]):
        config = EditConfig(batch_size=32, max_epochs=epochs, energy=0.8, sequential_chunk=len(requests))
        result = edit(model, tok, requests, state, config)
        restore(model, result)
        return result

    reset_peak(device)
    together = job(cache, edits)
    state, seconds = cache, []
    for request in edits[:singles]:
        result = job(state, [request])
        state, seconds = result.cache, seconds + [result.seconds]
    single = statistics.mean(seconds)
    return {"edits": 32, "epochs": epochs, "coalesced_s": round(together.seconds, 2),
            "single_job_s": [round(s, 2) for s in seconds], "one_by_one_s": round(32 * single, 2),
            "speedup": round(32 * single / together.seconds, 2), "peak_gb": peak_memory_gb(device),
            "note": f"{singles} single jobs timed; one by one = 32 × their mean"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,8b", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--samples", type=int, default=64, help="cache build: sequences (of --seq-len tokens)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--edits", type=int, default=3000, help="FT against CrispEdit: synthetic edits, one epoch")
    parser.add_argument("--singles", type=int, default=4, help="coalescing: single-edit jobs timed")
    parser.add_argument("--epochs", type=int, default=5, help="coalescing: epochs of each job")
    parser.add_argument("--coalesce-on", default="1b,tiny", help="the shapes on which coalescing is measured")
    parser.add_argument("--out", default="runs/gpu_check")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                    "torch": torch.__version__, "dtype": args.dtype, "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save(shape: str, phase: str, value) -> None:
        report.setdefault(shape, {})[phase] = value
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        print(f"{shape} {phase}: {json.dumps(value)}", flush=True)

    import transformers

    report["transformers"] = transformers.__version__
    edits = synthetic_edits(args.edits)
    tok = tokenizer_for(edits + synthetic_edits(32, seed=1))
    for shape in args.shapes.split(","):
        started = clock.now(device)
        model = random_model(shape, device, dtype)
        save(shape, "model", {"parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                       "init_s": round(clock.now(device) - started, 2), "weights_gb": peak_memory_gb(device)})
        cache, built = build_cache(model, args.samples, args.seq_len, device)
        built["eigh_fp32_s"], built["projection_ms"] = projectors_timed(cache, device, torch.float32)
        if shape != "8b":  # fp64 beside it, where it fits the time
            built["eigh_fp64_s"], _ = projectors_timed(cache, device, torch.float64)
        save(shape, "cache", built)
        save(shape, "ft_vs_crispedit", ft_vs_crispedit(model, tok, cache, edits, device, built["eigh_fp32_s"]))
        if shape in args.coalesce_on.split(","):
            save(shape, "coalescing", coalescing(model, tok, cache, device, args.singles, args.epochs))
        del model, cache
        reset_peak(device)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
