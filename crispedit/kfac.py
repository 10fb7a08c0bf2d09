"""K-FAC factors of the capability loss (arXiv 2602.15823, Eq. 5): G_l ≈ A_{l-1} ⊗ S_l.

For an editable linear layer s = W a, A = E[a aᵀ] is the uncentered second moment of its inputs and
S = E[g gᵀ] that of g = ∂ℓ/∂s, the gradient of the sequence's summed next-token loss with respect to
the layer output. Both expectations are over tokens (every position whose next token is a real token),
accumulated in fp32, one forward and backward pass per batch for all layers at once.

Two Fisher modes choose the labels of ℓ:
- ``empirical``: the true next tokens, as the official code does;
- ``sampled``: ŷ ~ p_θ(·|x), the true Fisher, which equals the Gauss-Newton Hessian for softmax
  cross-entropy (G_cap of Eq. 2).

``ekfac_eigenvalues`` adds the eigenvalue correction of George et al. 2018 (paper Fig. 3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FISHER_MODES = ("empirical", "sampled")
IGNORE = -100  # cross-entropy label of positions that carry no loss


@dataclass(frozen=True)
class KFACFactors:
    """A (d_in, d_in) = E[a aᵀ] and S (d_out, d_out) = E[g gᵀ], averaged over ``num_tokens`` tokens."""

    A: torch.Tensor
    S: torch.Tensor
    num_tokens: int

    def to(self, device: torch.device | str) -> KFACFactors:
        return KFACFactors(self.A.to(device), self.S.to(device), self.num_tokens)


def merge_factors(parts: Iterable[KFACFactors]) -> KFACFactors:
    """Token-weighted average of factors (paper Alg. 2 line 6): A = Σ_c N_c A_c / Σ_c N_c, same for S."""
    parts = [p for p in parts if p.num_tokens > 0]
    if not parts:
        raise ValueError("nothing to merge: every part has zero tokens")
    total = sum(p.num_tokens for p in parts)
    A = sum(p.A * (p.num_tokens / total) for p in parts)
    S = sum(p.S * (p.num_tokens / total) for p in parts)
    return KFACFactors(A=A, S=S, num_tokens=total)


def mix_factors(parts: list[KFACFactors], weights: list[float]) -> KFACFactors:
    """A weighted mixture of capability sets: A = Σ_p w_p A_p / Σ_p w_p, same for S.

    Each part is already a token average, so this is the K-FAC factor of a corpus in which part p
    contributes the fraction w_p / Σ w of the tokens; ``merge_factors`` is the case w_p = N_p.
    """
    if len(parts) != len(weights) or not parts:
        raise ValueError("a mixture needs one weight per part, and at least one part")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mixture weights must be non-negative and not all zero, got {weights}")
    total = sum(weights)
    A = sum(p.A * (w / total) for p, w in zip(parts, weights, strict=True))
    S = sum(p.S * (w / total) for p, w in zip(parts, weights, strict=True))
    return KFACFactors(A=A, S=S, num_tokens=sum(p.num_tokens for p in parts))


@contextlib.contextmanager
def capture_layer_io(modules: dict[str, nn.Module]) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Forward hooks that keep each module's input ``a`` and output ``s`` of the latest forward pass.

    The output is made to require grad even when every parameter is frozen, so ``torch.autograd.grad``
    can return ∂ℓ/∂s; the backward pass then only runs through the layers above the first hooked one.
    Hooks are removed on exit.
    """
    captured: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}

    def hook(name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not output.requires_grad:
            output.requires_grad_(True)
        captured[name]["a"] = inputs[0].detach()
        captured[name]["s"] = output

    handles = [m.register_forward_hook(lambda mod, i, o, n=name: hook(n, mod, i, o)) for name, m in modules.items()]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def next_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, T-1) bool: positions t whose next token t+1 is a real (non-pad) token."""
    return attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()


def next_token_labels(
    logits: torch.Tensor | None, input_ids: torch.Tensor, fisher: str, generator=None
) -> torch.Tensor:
    """Labels for ℓ: the true next tokens (empirical Fisher) or draws from the model (true Fisher, needs ``logits``)."""
    if fisher == "empirical":
        return input_ids
    if fisher == "sampled":
        probs = torch.softmax(logits.detach().float(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    raise ValueError(f"fisher must be one of {FISHER_MODES}, got {fisher!r}")


def layer_io_per_token(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    fisher: str = "empirical",
    seed: int = 0,
) -> Iterator[tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """For each batch: (#tokens, {name: (a, g)}) with a (tokens, d_in), g (tokens, d_out) in fp32.

    ``g`` is the gradient of the batch's summed next-token loss, so per sequence it equals the paper's
    gradient of the summed sequence loss (sequences do not interact).
    """
    if fisher not in FISHER_MODES:
        raise ValueError(f"fisher must be one of {FISHER_MODES}, got {fisher!r}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    names = list(modules)
    with capture_layer_io(modules) as captured:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            valid = next_token_mask(attention_mask)
            if "loss_mask" in batch:
                valid &= batch["loss_mask"].to(device)[:, 1:].bool()
            n = int(valid.sum())
            if n == 0:
                continue
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            # Labels at every position, ignored where invalid, so the (batch, T, vocab) logits are never
            # copied by indexing: for a 262k vocabulary that copy cost more than the statistics.
            labels = torch.full(input_ids.shape, IGNORE, dtype=torch.long, device=device)
            labels[:, :-1][valid] = next_token_labels(logits.detach()[:, :-1][valid] if fisher == "sampled" else None,
                                                      input_ids[:, 1:][valid], fisher, generator)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
            grads = torch.autograd.grad(loss, [captured[name]["s"] for name in names])
            yield n, {
                name: (captured[name]["a"][:, :-1][valid].float(), grad[:, :-1][valid].float())
                for name, grad in zip(names, grads, strict=True)
            }


def kfac_factors(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    fisher: str = "empirical",
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, KFACFactors]:
    """A = Σ_t a_t a_tᵀ / N and S = Σ_t g_t g_tᵀ / N for every module, streaming over ``batches``."""
    sums: dict[str, list] = {}
    total = 0
    for n, io in layer_io_per_token(model, modules, batches, fisher, seed):
        for name, (a, g) in io.items():
            if name not in sums:
                sums[name] = [a.new_zeros(a.shape[1], a.shape[1]), g.new_zeros(g.shape[1], g.shape[1])]
            sums[name][0].addmm_(a.T, a)
            sums[name][1].addmm_(g.T, g)
        total += n
        if on_batch is not None:
            on_batch(n)
    if total == 0:
        raise ValueError("the corpus produced no tokens to estimate curvature from")
    return {name: KFACFactors(A=A / total, S=S / total, num_tokens=total) for name, (A, S) in sums.items()}


def token_features(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    fisher: str = "empirical",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every token's (a, g) per module, stacked: (N, d_in) and (N, d_out), on the CPU.

    For a few edits this is far smaller than A and S (N ≪ d), and ``factors_from_features`` rebuilds the
    factors exactly, so a version can store its curvature contribution at a cost that grows with tokens.
    """
    parts: dict[str, list] = {name: [[], []] for name in modules}
    for _, io in layer_io_per_token(model, modules, batches, fisher):
        for name, (a, g) in io.items():
            parts[name][0].append(a.cpu())
            parts[name][1].append(g.cpu())
    if not parts or not next(iter(parts.values()))[0]:
        raise ValueError("the edit text produced no tokens to estimate curvature from")
    return {name: (torch.cat(a), torch.cat(g)) for name, (a, g) in parts.items()}


def factors_from_features(a: torch.Tensor, g: torch.Tensor) -> KFACFactors:
    """Eq. 5 from stacked per-token features: A = aᵀa / N, S = gᵀg / N."""
    n = a.shape[0]
    return KFACFactors(A=a.T @ a / n, S=g.T @ g / n, num_tokens=n)


def kfac_quadratic(factors: KFACFactors, delta: torch.Tensor) -> float:
    """½ vec(ΔW)ᵀ (A ⊗ S) vec(ΔW) = ½ tr(ΔWᵀ S ΔW A), for ΔW (d_out, d_in): K-FAC's second-order model
    of the per-token capability loss change of one layer's edit (Eq. 4 with Eq. 5's factors; with the
    sampled, true-Fisher factors, the KL's own second-order term)."""
    delta = delta.to(factors.A.dtype)
    return 0.5 * float(((factors.S @ delta @ factors.A) * delta).sum())


def ekfac_quadratic(factors: KFACFactors, eigenvalues: torch.Tensor, delta: torch.Tensor) -> float:
    """½ Σ_ij λ̃_ij (U_Sᵀ ΔW U_A)²_ij: :func:`kfac_quadratic` with EK-FAC's corrected eigenvalues λ̃
    (d_out, d_in) in K-FAC's eigenbasis (U_S of S, U_A of A) in place of the products λ^S_i λ^A_j."""
    from crispedit.eigen import eigh_psd

    (_, u_out), (_, u_in) = eigh_psd(factors.S), eigh_psd(factors.A)
    coords = u_out.T @ delta.to(u_out.dtype) @ u_in
    return 0.5 * float((eigenvalues.to(coords.dtype) * coords**2).sum())


def ekfac_eigenvalues(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    fisher: str = "empirical",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """EK-FAC: λ̃_ij = E_t[(U_outᵀ g_t a_tᵀ U_in)_ij²] = E_t[(U_outᵀ g_t)_i² (U_inᵀ a_t)_j²], (d_out, d_in).

    ``bases`` maps each module to its (U_out, U_in) K-FAC eigenvectors. Per-token gradients, as K-FAC uses.
    """
    sums: dict[str, torch.Tensor] = {}
    total = 0
    for n, io in layer_io_per_token(model, modules, batches, fisher, seed):
        for name, (a, g) in io.items():
            U_out, U_in = bases[name]
            g2 = (g @ U_out.to(g)) ** 2
            a2 = (a @ U_in.to(a)) ** 2
            sums[name] = sums.get(name, 0) + g2.T @ a2
        total += n
    return {name: s / total for name, s in sums.items()}
