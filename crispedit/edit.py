"""Batch and sequential CrispEdit (arXiv 2602.15823, Algorithms 1 and 2), with FT and null-space baselines.

Algorithm 1: epochs over shuffled minibatches of edits; each step projects the edit-loss gradient onto
the γ-approximate null space of the capability curvature (Eq. 6) and takes an Adam step. A minibatch
whose loss is already below the early stop (``EARLY_STOP``, the paper's, unless ``config.early_stop``) is
skipped; editing stops when an epoch's mean loss is. With ``keyed_solve``, each chunk's change is then
replaced by the one that acts on its keys (and its ``key_variants``' mean keys) alike and moves the neighbours
least (``crispedit.keyed_solve``).
Algorithm 2: edits arrive in chunks; after each chunk, the K-FAC factors of its prompt+target text are
folded into the cache (token-weighted), so later chunks also protect earlier edits.
With ``augment``, each epoch also trains every edit on one of its model-written variants (other
wordings, unrelated context before it; ``crispedit.augment``), drawn at random.

The model is edited in place. On any error it is restored exactly, so a failed edit leaves it untouched.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from crispedit import clock
from crispedit.anchor import Anchors, anchor_kl
from crispedit.arch import arch_spec, default_energy, default_layers, editable_modules, weight_name
from crispedit.augment import augmented_prompts, check_augmentations
from crispedit.cache import CurvatureCache
from crispedit.keyed_solve import CAPABILITY_BUDGET, off_neighbours, settled_room
from crispedit.kfac import KFACFactors, factors_from_features, merge_factors, token_features
from crispedit.neighbours import KeptOutputs
from crispedit.optim import ProjectedAdam
from crispedit.packing import pack
from crispedit.projector import METHODS, LayerProjector, build_projector, tensor_bytes
from crispedit.requests import EditRequest, target_nll, tokenize_edit_batch
from crispedit.subject_key import subject_key_mask, weight_gradient_at

log = logging.getLogger(__name__)

EARLY_STOP = 1e-2  # skip a batch / stop an epoch below this mean target NLL (paper Table 2)
ANCHOR_BATCH = 16  # anchor questions drawn per step
STATS_BATCH = 8  # sequences per batch of the K-FAC pass over an edit's own text when folding (Alg. 2)
ProgressFn = Callable[[dict], None]
# the neighbours' penalty yields (β / YIELD_FACTOR) once the edit loss, above YIELD_LOSS, has gone YIELD_PATIENCE
# epochs without falling YIELD_PROGRESS below its best: on 20 ZsRE edits under the subject key, β 300 held the loss
# at 1.3-1.5 for 25-50 epochs. Patience 1 yields on minibatch noise too; 3 left those 20 edits unlearnt (Rel TF 0.81)
YIELD_LOSS, YIELD_PROGRESS, YIELD_FACTOR, YIELD_PATIENCE = 0.1, 0.05, 2.0, 2
UNCONSTRAINED = 0.99  # a projector keeping more of the directions than this barely constrains its layer


@contextlib.contextmanager
def epoch_bar(config: EditConfig, n_requests: int, desc: str = "edit") -> Iterator[ProgressFn]:
    """A progress bar over the epochs of :func:`edit`, as its ``on_progress`` (early stops end it short)."""
    from tqdm.auto import tqdm

    chunks = math.ceil(n_requests / (config.sequential_chunk or n_requests))
    with tqdm(total=chunks * config.max_epochs, desc=desc, unit="epoch") as bar:

        def report(event: dict) -> None:
            if event["event"] == "epoch":
                bar.update(1)
                bar.set_postfix(chunk=event["chunk"], loss=f"{event['loss']:.4f}")

        yield report


class EditError(RuntimeError):
    """The edit could not be applied (bad input, divergence); the model was left untouched."""


@dataclass(frozen=True)
class EditConfig:
    """Hyperparameters of one edit. The defaults are the paper's recipe; ``crispedit.recipe.recommended_config``
    gives a model's recommended one (the service's and the command line's)."""

    method: str = "crispedit"  # crispedit | nullspace | ft
    energy: float | None = None  # γ: fraction of curvature energy protected; None: arch.default_energy (0.8)
    lr: float | None = None  # None: default_lr of the edited weights (2e-3 on SmolLM2, 1.7e-4 on Gemma 3 270M)
    batch_size: int = 32
    max_epochs: int = 25
    sequential_chunk: int | None = None  # Alg. 2 chunk size; None = one batch edit (Alg. 1)
    chat_form: bool = False  # also train each edit through the chat template, so chat queries see it
    augment: tuple[str, ...] = ()  # model-written variants to train on too: "paraphrase", "prefix", "qa"
    layers: tuple[int, ...] | None = None  # used only without a cache (ft); a cache fixes its own layers
    anchor_weight: float = 0.0  # β of the KL penalty on anchor prompts (crispedit.anchor); 0 = off
    text_anchor_weight: float = 0.0  # β of the same penalty on capability text windows (text_anchors); 0 = off
    # β of the penalty that keeps the edited layers' outputs on the neighbours' tokens (neighbours.KeptOutputs)
    neighbour_weight: float = 0.0
    # the edit loss's weight gradient only through each prompt's last subject token (ROME's key; subject_key.py)
    subject_key: bool = False
    # after each chunk, its change made the smallest on the neighbours that acts on its keys as it does
    # (crispedit.keyed_solve); needs the subject key and the neighbours' kept outputs
    keyed_solve: bool = False
    # ρ: the most the keyed solve may change an edited layer's output on generic text (RMS, relative to the
    # output); it adds generic text's keys to the solve's metric only as far as this needs (keyed_solve.py)
    capability_budget: float = CAPABILITY_BUDGET
    # model-written variants of each prompt ("paraphrase", "prefix": crispedit.augment) on which the keyed solve
    # keeps the change as trained too, so it still holds where the question is worded or preceded otherwise
    key_variants: tuple[str, ...] = ()
    early_stop: float | None = None  # None: EARLY_STOP (the paper's); a batch or epoch below it is done
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.energy is not None and not 0.0 <= self.energy <= 1.0:
            raise ValueError(f"energy γ must be in [0, 1], got {self.energy}")
        for name in ("anchor_weight", "text_anchor_weight", "neighbour_weight", "capability_budget"):
            if not getattr(self, name) >= 0:  # NaN too
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("batch_size", "max_epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.sequential_chunk is not None and self.sequential_chunk <= 0:
            raise ValueError("sequential_chunk must be a positive number of edits")
        if self.keyed_solve and not self.subject_key:
            raise ValueError("keyed_solve keeps the change at the subject key's inputs: it needs subject_key")
        if self.early_stop is not None and not self.early_stop > 0:
            raise ValueError(f"early_stop must be positive, got {self.early_stop}")
        for name in ("augment", "key_variants"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            check_augmentations(getattr(self, name))
        if self.key_variants and not self.keyed_solve:
            raise ValueError("key_variants are keys of the keyed solve: they need keyed_solve")

    @property
    def text_anchor_batch(self) -> int:
        """Text windows drawn per step: 4 per 32 edits, in proportion to the edits of a step."""
        return max(1, self.batch_size // 8)


@dataclass
class EditResult:
    """What changed: new values of the edited weights (and their originals), losses and timings."""

    changed: dict[str, torch.Tensor]
    original: dict[str, torch.Tensor]
    epoch_losses: list[float]
    steps: int
    seconds: float
    step_seconds: list[float] = field(default_factory=list)
    layers: tuple[int, ...] = ()
    kept_fraction: dict[str, float] = field(default_factory=dict)
    cache: CurvatureCache | None = None  # the cache with this edit's statistics folded in (sequential mode)
    # this edit's own statistics per module (sequential mode): its per-token (a, g) while they are smaller than the
    # factors, and always the factors (A, S) they average to
    features: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    own_factors: dict[str, KFACFactors] | None = None
    lr: float | None = None  # the learning rate used (config.lr, or default_lr when that was None)
    energy: float | None = None  # the γ used (config.energy, or arch.default_energy when that was None)
    # the keyed solve per module: the λ of generic text's factor it took and the change ρ on generic text's outputs
    # (crispedit.keyed_solve.bounded_change), the largest ρ of any chunk
    solve: dict[str, dict[str, float]] = field(default_factory=dict)

    def relative_change(self) -> dict[str, float]:
        return {n: float((self.changed[n] - self.original[n]).norm() / self.original[n].norm()) for n in self.changed}


def edit_features(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], modules: dict[str, nn.Module], batch_size: int = 8
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token K-FAC features of the edits' own text (Alg. 2 line 5): next-token loss over prompt+target.

    The prompt is not masked: the paper (App. E, Table 6) found masking it much worse.
    """
    texts = [r.prompt + r.spaced_target for r in requests]
    batches = [
        tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, padding_side="right")
        for i in range(0, len(texts), batch_size)
    ]
    return token_features(model, modules, batches, fisher="empirical")


class OwnCurvature:
    """An edit's own K-FAC statistics over its chunks (Alg. 2 line 5), in memory that does not grow with them.

    The factors are a running token-weighted mean, O(d²) whatever the number of chunks. The per-token features
    (a, g) are kept too while they take less memory than the factors (a few hundred tokens, one request's edit),
    since a registry version then stores them more cheaply; past that they are dropped.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.factors: dict[str, KFACFactors] = {}
        self.parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = {n: [] for n in modules}

    def add(
        self, features: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device
    ) -> dict[str, KFACFactors]:
        """Take in one chunk's per-token features; returns that chunk's factors, computed on ``device``."""
        chunk = {n: factors_from_features(a.to(device), g.to(device)) for n, (a, g) in features.items()}
        self.factors = {n: merge_factors([self.factors[n], f]) if n in self.factors else f for n, f in chunk.items()}
        if self.parts is not None:
            for n, ag in features.items():
                self.parts[n].append(ag)
            if sum(tensor_bytes(a, g) for p in self.parts.values() for a, g in p) > sum(
                    tensor_bytes(f.A, f.S) for f in self.factors.values()):
                self.parts = None
        return chunk

    def features(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        if not self.parts or not self.factors:
            return None
        return {n: (torch.cat([a for a, _ in p]), torch.cat([g for _, g in p])) for n, p in self.parts.items()}


def make_projectors(
    cache: CurvatureCache | None, config: EditConfig, names: list[str], fan_in_fan_out: bool, device
) -> list[LayerProjector | None]:
    if config.method == "ft":
        return [None] * len(names)
    if cache is None:
        raise EditError(f"method {config.method!r} needs a curvature cache; build one with `crispedit build-cache`")
    ekfac = cache.ekfac or {}
    return [build_projector(cache.factors[n], config.energy, config.method, fan_in_fan_out, ekfac.get(n), device)
            for n in names]


def warn_unconstrained(names: list[str], projectors: list[LayerProjector | None], gamma: float) -> None:
    """Log each layer whose projector removes almost nothing. When one direction (a massive activation in
    the layer input) holds γ of the curvature energy, protecting it meets the threshold, and the layer then
    edits like fine-tuning (on SmolLM2 layer 11 that cost +44 % perplexity)."""
    for name, projector in zip(names, projectors, strict=True):
        if projector is not None and projector.kept_fraction > UNCONSTRAINED:
            log.warning("%s: at γ=%s the projector keeps %.2f%% of the directions, so this layer is nearly "
                        "unconstrained (one curvature direction holds the energy); edit other layers or raise γ",
                        name, gamma, 100 * projector.kept_fraction)


@contextlib.contextmanager
def trainable(params: list[nn.Parameter]):
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def check_requests(requests: Sequence[EditRequest], tokenizer) -> None:
    if not requests:
        raise EditError("no edit requests given")
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise EditError(f"edit {i} is a {type(r).__name__}, expected EditRequest")
    tokenize_edit_batch(tokenizer, list(requests)[:1])


# SmolLM2-135M's tuned learning rate and the RMS of its edited down_proj weights (layers 4-8). The paper's
# 5e-4 does not converge within 25 epochs there.
REFERENCE_LR, REFERENCE_RMS = 2e-3, 0.1863


def default_lr(weights: Sequence[torch.Tensor]) -> float:
    """REFERENCE_LR scaled by the weights' RMS against SmolLM2's, to two significant digits.

    Adam moves every weight by about lr per step whatever its size, so the same lr is a 12× larger relative
    step on Gemma 3 270M, whose down_proj weights are 12× smaller; there 2e-3 wrecks the model. Scaling keeps
    the step a fixed fraction (≈ 1.1 %) of the weights.
    """
    squares = sum(float(torch.linalg.vector_norm(w.detach(), dtype=torch.float32)) ** 2 for w in weights)
    rms = math.sqrt(squares / sum(w.numel() for w in weights))  # one weight at a time: no copy of all of them
    return float(f"{REFERENCE_LR * rms / REFERENCE_RMS:.2g}")


def run_epochs(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    optimizer: ProjectedAdam,
    config: EditConfig,
    on_progress: ProgressFn | None = None,
    chunk: int = 0,
    variants: Sequence[Sequence[EditRequest]] = (),
    anchors: Anchors | None = None,
    text_anchors: Anchors | None = None,
    keyed: tuple[dict[str, nn.Module], bool] | None = None,
    kept: Callable[[], torch.Tensor] | None = None,
) -> tuple[list[float], list[float]]:
    """Algorithm 1's loop, each epoch over ``requests`` plus one random pick from each pool of ``variants``.

    With ``anchors`` (``text_anchors``), each step adds β · KL(base ‖ edited) on a random draw of them
    (``crispedit.anchor``), β = ``config.anchor_weight`` (``config.text_anchor_weight``).
    With ``keyed`` = (edited modules, fan_in_fan_out), their weights learn the edit loss only through each
    prompt's last subject token (``crispedit.subject_key``). With ``kept``, each step adds
    ``config.neighbour_weight`` times its value (the neighbours' kept outputs, ``crispedit.neighbours``).

    Returns (epoch mean losses, seconds per optimizer step).
    """
    device = next(model.parameters()).device
    rng = random.Random(config.seed + chunk)
    draw = torch.Generator().manual_seed(config.seed + chunk)
    epoch_losses: list[float] = []
    step_seconds: list[float] = []
    first_loss: float | None = None
    early_stop = config.early_stop or EARLY_STOP
    beta = config.neighbour_weight  # yields while the edit is stuck against it (YIELD_*)
    best, stale = math.inf, 0  # the lowest epoch loss, and the epochs since one fell YIELD_PROGRESS below it
    for epoch in range(config.max_epochs):
        order = list(requests) + [rng.choice(pool) for pool in variants if pool]
        rng.shuffle(order)
        losses = []
        for i in range(0, len(order), config.batch_size):
            started = clock.now(device)
            rows = order[i : i + config.batch_size]
            batch = tokenize_edit_batch(tokenizer, rows, device)
            mask = subject_key_mask(tokenizer, rows, batch["input_ids"].shape[1]) if keyed is not None else None
            batch = pack(batch, mask)
            key = contextlib.nullcontext() if keyed is None else weight_gradient_at(keyed[0], batch["key"], keyed[1])
            with key:
                loss = target_nll(model, batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise EditError(f"edit loss became {value} at epoch {epoch + 1}; lower the learning rate")
            first_loss = value if first_loss is None else first_loss
            if value > max(50.0, 10 * first_loss):
                raise EditError(f"edit loss exploded ({first_loss:.3g} → {value:.3g}); lower the learning rate")
            losses.append(value)
            if value < early_stop:
                continue
            penalty = None  # β · KL(base ‖ edited) over this step's anchors
            for held, weight, size in ((anchors, config.anchor_weight, ANCHOR_BATCH),
                                       (text_anchors, config.text_anchor_weight, config.text_anchor_batch)):
                if held is not None and weight > 0:
                    rows = torch.randperm(len(held), generator=draw)[:size].to(device)
                    term = weight * anchor_kl(model, held, rows)
                    penalty = term if penalty is None else penalty + term
            if kept is not None and beta > 0:
                term = beta * kept()
                penalty = term if penalty is None else penalty + term
            optimizer.zero_grad(set_to_none=True)
            (loss if penalty is None else loss + penalty).backward()
            optimizer.step()
            step_seconds.append(clock.now(device) - started)
        epoch_losses.append(sum(losses) / len(losses))
        if on_progress is not None:
            on_progress({"event": "epoch", "chunk": chunk, "epoch": epoch + 1, "loss": epoch_losses[-1],
                         **({"neighbour_weight": beta} if kept is not None else {})})
        if epoch_losses[-1] < early_stop:
            break
        if epoch_losses[-1] < (1 - YIELD_PROGRESS) * best:
            best, stale = epoch_losses[-1], 0
        else:
            stale += 1
        if kept is not None and beta > 0 and epoch_losses[-1] > YIELD_LOSS and stale >= YIELD_PATIENCE:
            beta, stale = beta / YIELD_FACTOR, 0
    return epoch_losses, step_seconds


def edit(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    cache: CurvatureCache | None,
    config: EditConfig | None = None,
    on_progress: ProgressFn | None = None,
    anchors: Anchors | None = None,
    text_anchors: Anchors | None = None,
    kept: KeptOutputs | None = None,
    settled: Sequence[EditRequest] = (),
) -> EditResult:
    """Apply ``requests`` to ``model`` in place (Alg. 1, or Alg. 2 with ``config.sequential_chunk``).

    ``anchors`` (from :func:`crispedit.anchor.base_anchors` on the unedited model) are used when
    ``config.anchor_weight`` > 0, ``text_anchors`` (:func:`crispedit.anchor.text_anchors`) when
    ``config.text_anchor_weight`` > 0, ``kept`` (:class:`crispedit.neighbours.KeptOutputs`) when
    ``config.neighbour_weight`` > 0. ``settled`` are edits already in the model's weights (earlier versions',
    oldest first, with their subjects): the keyed solve leaves the newest of them as they were
    (``crispedit.keyed_solve.settled_room``), as it does with this edit's earlier chunks.
    """
    config = config or EditConfig()
    check_requests(requests, tokenizer)
    if config.anchor_weight > 0 and not anchors:
        raise EditError("anchor_weight > 0 needs anchors: pass crispedit.anchor.base_anchors(model, tok, pairs)")
    if config.text_anchor_weight > 0 and not text_anchors:
        raise EditError("text_anchor_weight > 0 needs text anchors: pass crispedit.anchor.text_anchors(model, windows)")
    if config.neighbour_weight > 0 and kept is None:
        raise EditError("neighbour_weight > 0 needs the neighbours' kept outputs: pass crispedit.neighbours.protect()")
    if config.chat_form and not getattr(tokenizer, "chat_template", None):
        raise EditError("chat_form needs a tokenizer with a chat template; this model has none")

    def with_chat_form(chunk: Sequence[EditRequest]) -> list[EditRequest]:
        # each edit is also trained in the chat template, within the same chunk as its plain form
        return [x for r in chunk for x in (r, r.in_chat_form(tokenizer))] if config.chat_form else list(chunk)

    variants = augmented_prompts(model, tokenizer, requests, config.augment, config.seed) if config.augment else []
    if on_progress and config.augment:
        on_progress({"event": "augment", "variants": sum(len(v) for v in variants)})
    layers = cache.layers if cache is not None else (config.layers or default_layers(model))
    modules = editable_modules(model, layers)
    fan_in_fan_out = arch_spec(model).fan_in_fan_out
    names = list(modules)
    params = [modules[n].weight for n in names]
    original = {weight_name(n): p.detach().clone() for n, p in zip(names, params, strict=True)}
    device = params[0].device
    if config.energy is None:
        config = replace(config, energy=default_energy(model))
    if config.lr is None:
        config = replace(config, lr=default_lr(params))
        log.info("learning rate %.2g (default_lr: the edited weights' RMS against SmolLM2's)", config.lr)
    started = clock.now(device)
    cache = cache.to(device) if cache is not None else None  # folds and eigendecompositions on the model's device
    try:
        projectors = make_projectors(cache, config, names, fan_in_fan_out, device)
        warn_unconstrained(names, projectors, config.energy)
        optimizer = ProjectedAdam(params, projectors, lr=config.lr)
        state = cache  # Alg. 2: the capability factors with every finished chunk's folded in, one at a time
        own = OwnCurvature(modules)  # this edit's own statistics, all its chunks together

        chunk_size = config.sequential_chunk or len(requests)
        solve = config.keyed_solve and kept is not None  # nothing to keep: the edit as trained
        room = settled_room(modules, fan_in_fan_out) // (2 if config.chat_form else 1)
        asked_now = {r.prompt for r in requests}
        settled = [r for r in settled if r.prompt not in asked_now]  # a fact edited again: the new edit replaces it
        keyed_so_far = with_chat_form(settled[-room:]) if solve and settled and room else []
        if keyed_so_far:
            log.info("the solve leaves %d earlier edit(s) as they were", len(keyed_so_far) // (1 + config.chat_form))
        capability = {n: cache.factors[n].A for n in names} if cache is not None else None
        worded: list[list[EditRequest]] = []  # the key variants of each edit of every chunk so far
        key_pools = (augmented_prompts(model, tokenizer, requests, config.key_variants, config.seed)
                     if solve and config.key_variants else [[] for _ in requests])
        epoch_losses: list[float] = []
        step_seconds: list[float] = []
        solve_bounds: dict[str, dict[str, float]] = {}
        for k, start in enumerate(range(0, len(requests), chunk_size)):
            chunk = with_chat_form(requests[start : start + chunk_size])
            pools = variants[start : start + chunk_size]
            keyed = (modules, fan_in_fan_out) if config.subject_key else None
            outputs = (lambda: kept(dict(zip(names, params, strict=True)))) if kept is not None else None
            before = [master.detach().clone() for _, master in optimizer.pairs()] if solve else None
            with trainable(params):
                losses, seconds = run_epochs(model, tokenizer, chunk, optimizer, config, on_progress, k, pools,
                                             anchors, text_anchors, keyed, outputs)
            if solve:  # this chunk's change, kept on its keys, 0 on earlier chunks', the smallest on the neighbours
                held = (len(keyed_so_far), len(worded))  # the settled edits' and earlier chunks' keys
                keyed_so_far += chunk
                for pool in key_pools[start : start + chunk_size]:  # one group per edit and form
                    worded += [pool, [v.in_chat_form(tokenizer) for v in pool]] if config.chat_form else [pool]
                pairs = optimizer.pairs()
                began = dict(zip(names, before, strict=True))
                now = {n: master for n, (_, master) in zip(names, pairs, strict=True)}
                bounds: dict[str, tuple[float, float]] = {}
                solved = off_neighbours(model, tokenizer, keyed_so_far, modules, kept, began, now, fan_in_fan_out,
                                        worded, held, capability, bounds, config.capability_budget)
                for n, (lam, rho) in bounds.items():
                    if rho >= solve_bounds.get(n, {}).get("rho", -1.0):
                        solve_bounds[n] = {"lambda": lam, "rho": rho}
                if bounds:
                    log.info("keyed solve: generic text's output change ρ per layer %s (λ %s)",
                             " ".join(f"{rho:.3f}" for _, rho in bounds.values()),
                             " ".join(f"{lam:g}" for lam, _ in bounds.values()))
                with torch.no_grad():
                    for n, (weight, master) in zip(names, pairs, strict=True):
                        master.copy_(solved[n])
                        if weight is not master:
                            weight.copy_(master)
            epoch_losses += losses
            step_seconds += seconds
            if config.sequential_chunk and cache is not None:
                chunk_factors = own.add(edit_features(model, tokenizer, chunk, modules, STATS_BATCH), device)
                state = state.folded(chunk_factors)  # O(1) per chunk: the merge is a running token-weighted mean
                if start + chunk_size < len(requests):  # later chunks are projected to protect this one
                    optimizer.set_projectors(make_projectors(state, config, names, fan_in_fan_out, device))
                if on_progress:
                    on_progress({"event": "fold", "chunk": k, "tokens": state.num_tokens})
        for p in params:
            if not torch.isfinite(p).all():
                raise EditError("an edited weight became non-finite; lower the learning rate")
    except BaseException:
        with torch.no_grad():
            for n, p in zip(names, params, strict=True):
                p.copy_(original[weight_name(n)])
        raise
    changed = {weight_name(n): p.detach().clone() for n, p in zip(names, params, strict=True)}
    changed = {n: t for n, t in changed.items() if not torch.equal(t, original[n])}
    return EditResult(
        changed=changed,
        original={n: original[n] for n in changed},
        epoch_losses=epoch_losses,
        steps=len(step_seconds),
        seconds=clock.now(device) - started,
        step_seconds=step_seconds,
        layers=tuple(layers),
        kept_fraction={n: p.kept_fraction for n, p in zip(names, projectors, strict=True) if p is not None},
        cache=state if config.sequential_chunk else None,
        lr=config.lr,
        energy=config.energy,
        features=own.features(),
        own_factors=own.factors or None,
        solve=solve_bounds,
    )
