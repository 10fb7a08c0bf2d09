"""After a keyed edit: keep what the edit writes at its keys, and move the neighbours' outputs least.

Under the subject key (``crispedit.subject_key``) the edit loss reaches each edited weight W (d_out × d_in)
only through the layer's inputs at the prompts' last subject tokens, K = [k_1 … k_m] (each trained sequence,
raw and chat form). So what the edit needs of its change ΔW is ΔW K. Every other input a meets ΔW a as well,
and on the inputs of the neighbours (``crispedit.neighbours``) that is what changes their answers. Of all the
changes that act on the keys as ΔW does, the one that moves the neighbours' outputs least is ROME's
least-squares update with the neighbours' second moment as its metric (and generic text's, below):

    ΔW* = argmin_{ΔW'} tr(ΔW' M ΔW'ᵀ)  s.t.  ΔW' K = ΔW K      =  ΔW K (Kᵀ M⁻¹ K)⁺ Kᵀ M⁻¹,
    M = Â_N + λ Â_C + εI,   Â = A · d_in / tr(A),   A_N = mean_t a_t a_tᵀ over the neighbours' tokens.

It does in closed form what the epochs after the fact is learnt do under the neighbours' penalty (pull the
change off the neighbours while the edit holds), so a protected edit stops earlier (``EditConfig.early_stop``).

Reworded, or after other text, the question gives the subject's token another input k' = k + δ. The trained ΔW
carries part of the edit there, and a ΔW* held to K alone drops it. So the key variants (``EditConfig.key_variants``:
each prompt after context prefixes the model writes, or reworded by it, ``crispedit.augment``) join K as one column
per edit and form, their mean k̄ (ROME's key, averaged over contexts): ΔW* k̄ = ΔW k̄ too, and K grows with the
edits, not with the variants.

Edits made before this change (an earlier chunk of the same edit, Alg. 2, or an earlier version's edits) are held
where their own solve put them: their keys K_s join K with target 0, ΔW* K_s = 0 (MEMIT's constraint on the edits
it keeps): a later change adds nothing to any edited layer's output at their keys, as read when it is solved.
Without it, 40 ZsRE train edits in chunks of 10 ended at a reliability of 0.76; with it, 0.99, as in one batch.

A_C is the capability cache's input factor (generic text's keys, with earlier versions' edit statistics folded in),
MEMIT's metric C = E[k kᵀ]. With the neighbours' factor alone, directions that no neighbour uses cost only ε, and
the solve can move them far, which generic text reads. How far is the relative change of the layer's output on
generic text, ρ(ΔW)² = tr(ΔW A_C ΔWᵀ) / tr(W A_C Wᵀ). Each solve is held to ρ ≤ ``CAPABILITY_BUDGET`` (or a
request's ``EditConfig.capability_budget``), a trust region on generic text: the least λ of ``LAMBDAS`` whose change
fits (ρ falls as λ grows), the neighbours' metric alone (λ = 0) when it fits already. On SmolLM2 at λ = 0, France →
Rome moves generic text by ρ 0.02–0.04 per layer and keeps its neighbours (1.00 / 0.80 of those given and held out,
against 0.33 / 0.60 at λ = 1); ten ZsRE edits in one job move it by 0.10–0.23, and held near λ = 1 (ρ 0.04), four
such jobs in sequence drift by KL 0.0095 and perplexity +1.6 % instead of 0.113 and +14.5 %, with more neighbours
kept (0.28 / 0.25 against 0.13 / 0.13).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from crispedit.layer_inputs import read_inputs
from crispedit.neighbours import KeptOutputs
from crispedit.requests import EditRequest, tokenize_edit_batch
from crispedit.subject_key import subject_key_mask

RIDGE = 1e-3  # ε, against Â_N's mean eigenvalue 1: directions no neighbour uses stay affordable, not free
# Kᵀ M⁻¹ K is inverted on its eigenvalues above this share of the largest: a key that repeats others (more keys
# than inputs, or the same token twice) adds no constraint instead of an ill-conditioned one
KEY_RTOL = 1e-10
# earlier edits' keys pin at most this share of a layer's inputs (ΔW* k = 0 on each), so a new edit keeps room to
# act: on SmolLM2's down_proj (d_in 1536), the newest 192 edits in both forms
SETTLED_SHARE = 0.25
# ρ, the most a solve may change an edited layer's output on generic text (RMS, relative): a single fact's change fits
# at λ = 0, a job of ten ZsRE edits is held near λ = 1 (0.05 let four such jobs drift by 40 % more KL)
CAPABILITY_BUDGET = 0.04
# the λ of Â_C tried, least first; jobs of 20 ZsRE or CounterFact edits reach the last at ρ up to 0.049, of 100 at
# ρ 0.09–0.14. A larger λ would not meet the budget there: the change must still act on the keys as ΔW does, and
# at λ = 1000 a job of 100 ZsRE edits kept ρ within 1 % of λ = 10's (0.099–0.135), so its keys set that floor
LAMBDAS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def settled_room(modules: dict[str, nn.Module], fan_in_fan_out: bool) -> int:
    """How many earlier key columns the solve pins: ``SETTLED_SHARE`` of the smallest input size."""
    d_in = min(m.weight.shape[0 if fan_in_fan_out else 1] for m in modules.values())
    return int(SETTLED_SHARE * d_in)


@torch.no_grad()
def key_inputs(model: nn.Module, tokenizer, sequences: Sequence[EditRequest], modules: dict[str, nn.Module],
               batch_size: int = 16, groups: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """K of each module (d_in × m): its inputs at each sequence's key token (every token where the subject is
    unknown), as ``tokenize_edit_batch`` lays the sequences out; with ``groups`` (a group index per sequence,
    0 … g−1), the mean key of each group instead (d_in × g)."""
    device = next(model.parameters()).device
    found: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    owners: list[torch.Tensor] = []
    for i in range(0, len(sequences), batch_size):
        part = list(sequences[i : i + batch_size])
        batch = tokenize_edit_batch(tokenizer, part, device)
        key = subject_key_mask(tokenizer, part, batch["input_ids"].shape[1]).to(device).bool()
        mask = key & batch["attention_mask"].bool()
        owners.append(mask.nonzero()[:, 0].cpu() + i)
        read_inputs(model, modules, lambda name, a, mask=mask: found[name].append(a[mask].double()),
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    keys = {name: torch.cat(parts).T for name, parts in found.items()}
    if groups is None:
        return keys
    owner_group = torch.as_tensor(groups)[torch.cat(owners)].to(device)
    count = torch.bincount(owner_group, minlength=len(set(groups)))
    sums = {name: torch.zeros(K.shape[0], len(count), dtype=K.dtype, device=device).index_add_(1, owner_group, K)
            for name, K in keys.items()}
    return {name: total / count for name, total in sums.items()}


def unit_mean(A: torch.Tensor) -> torch.Tensor:
    """Â = A · d / tr(A), in float64: mean eigenvalue 1."""
    return A.double() * (A.shape[0] / float(A.trace()))


def least_change_factors(delta: torch.Tensor, K: torch.Tensor, A_N: torch.Tensor, settled: torch.Tensor | None = None,
                         A_C: torch.Tensor | None = None, lam: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``least_change`` as the product T Z of its two factors, T = ΔW K (Kᵀ M⁻¹ K)⁺ (d_out × m) and Z = Kᵀ M⁻¹
    (m × d_in): with few keys, the change's energy is read from them at m·d_in² instead of d_out·d_in²."""
    d = A_N.shape[0]
    M = unit_mean(A_N) + RIDGE * torch.eye(d, dtype=torch.float64, device=A_N.device)
    if A_C is not None and lam:
        M += lam * unit_mean(A_C.to(M.device))
    MiK = torch.cholesky_solve(K, torch.linalg.cholesky(M))  # M is positive definite: Â_N, Â_C ⪰ 0 and ε > 0
    G = K.T @ MiK
    target = delta.double() @ K
    if settled is not None:
        target[:, settled.to(target.device)] = 0
    return target @ torch.linalg.pinv(G, rtol=KEY_RTOL, hermitian=True), MiK.T


def least_change(delta: torch.Tensor, K: torch.Tensor, A_N: torch.Tensor, settled: torch.Tensor | None = None,
                 A_C: torch.Tensor | None = None, lam: float = 0.0) -> torch.Tensor:
    """ΔW K (Kᵀ M⁻¹ K)⁺ Kᵀ M⁻¹ with M = Â_N + λ Â_C + εI, in float64; ``delta`` is (d_out × d_in). With ``settled``
    (a boolean per column of K), those columns' target is 0 instead of ΔW k: the change leaves them as they were."""
    T, Z = least_change_factors(delta, K, A_N, settled, A_C, lam)
    return T @ Z


def energy(M: torch.Tensor, A: torch.Tensor) -> float:
    """tr(M A Mᵀ): the mean squared output of M over the inputs whose second moment is A."""
    return float(((M @ A) * M).sum())


def relative(moved: float, output: float) -> float:
    """ρ = √(moved / output); a layer silent on generic text: any change is all of its output."""
    if output <= 0:
        return 0.0 if moved <= 0 else math.inf
    return math.sqrt(moved / output)


def factored_energy(T: torch.Tensor, Z: torch.Tensor, A: torch.Tensor) -> float:
    """tr(T Z A Zᵀ Tᵀ), the energy of the change T Z, by the cheaper order of products."""
    if T.shape[1] >= T.shape[0]:
        return energy(T @ Z, A)
    return float(((T @ (Z @ A @ Z.T)) * T).sum())


def output_change(change: torch.Tensor, weight: torch.Tensor, A_C: torch.Tensor) -> float:
    """ρ = √(tr(ΔW A_C ΔWᵀ) / tr(W A_C Wᵀ)): the change's RMS on generic text's outputs, relative to the layer's."""
    A = A_C.double().to(change.device)
    return relative(energy(change, A), energy(weight.double().to(change.device), A))


def bounded_change(delta: torch.Tensor, K: torch.Tensor, A_N: torch.Tensor, settled: torch.Tensor | None,
                   A_C: torch.Tensor, weight: torch.Tensor,
                   budget: float = CAPABILITY_BUDGET) -> tuple[torch.Tensor, float, float]:
    """``least_change`` at the least λ of ``LAMBDAS`` with ρ ≤ ``budget`` (the largest if none fits), by
    bisection on ``LAMBDAS`` (ρ falls as λ grows); returns (ΔW*, λ, ρ)."""
    A = A_C.double().to(delta.device)
    output = energy(weight.double().to(delta.device), A)  # tr(W A_C Wᵀ), once for every λ tried
    tried: dict[int, tuple[torch.Tensor, float]] = {}

    def at(i: int) -> tuple[torch.Tensor, float]:
        if i not in tried:
            T, Z = least_change_factors(delta, K, A_N, settled, A_C, LAMBDAS[i])
            tried[i] = T @ Z, relative(factored_energy(T, Z, A), output)
        return tried[i]

    low, high = 0, len(LAMBDAS) - 1  # the answer lies in [low, high]
    if at(0)[1] > budget:  # the least λ first: a single fact's change mostly fits there
        low = min(1, high)
    while low < high:
        middle = (low + high) // 2
        if at(middle)[1] <= budget:
            high = middle
        else:
            low = middle + 1
    change, rho = at(low)
    return change, LAMBDAS[low], rho


@torch.no_grad()
def off_neighbours(model: nn.Module, tokenizer, sequences: Sequence[EditRequest], modules: dict[str, nn.Module],
                   kept: KeptOutputs, start: dict[str, torch.Tensor], now: dict[str, torch.Tensor],
                   fan_in_fan_out: bool, variants: Sequence[Sequence[EditRequest]] = (),
                   settled: tuple[int, int] = (0, 0), capability: dict[str, torch.Tensor] | None = None,
                   bounds: dict[str, tuple[float, float]] | None = None,
                   budget: float = CAPABILITY_BUDGET) -> dict[str, torch.Tensor]:
    """Each module's weight with its change ``now − start`` replaced by ΔW*, keyed on ``sequences`` (the edit's
    trained sequences, as the model now answers them) and on each group of ``variants`` (other wordings of one
    edit in one form), by its mean key; tensors in the modules' layout and ``now``'s dtype.

    ``settled`` = (s, g): the first s sequences and g groups are edits made before (earlier versions', earlier
    chunks' of this edit), solved already. The change acts on their keys as 0 (ΔW* k = 0, MEMIT's constraint on
    edits made before), so it leaves them where their own solve put them, whatever this chunk's epochs did to them.

    With ``capability`` (each module's capability factor A_C), each change is held to ρ ≤ ``budget``
    (``bounded_change``), and ``bounds`` is filled with each module's (λ, ρ).
    """
    def columns(part: Sequence[EditRequest], groups: Sequence[Sequence[EditRequest]]) -> list[dict[str, torch.Tensor]]:
        found = [key_inputs(model, tokenizer, part, modules)] if part else []
        groups = [g for g in groups if g]
        if groups:
            owners = [i for i, g in enumerate(groups) for _ in g]
            found.append(key_inputs(model, tokenizer, [v for g in groups for v in g], modules, groups=owners))
        return found

    old = columns(sequences[: settled[0]], variants[: settled[1]])
    new = columns(sequences[settled[0] :], variants[settled[1] :])
    out = {}
    for name in modules:  # one layer's A_N at a time: d_in² each
        K = torch.cat([k[name] for k in old + new], dim=1)
        n_old = sum(k[name].shape[1] for k in old)
        fixed = torch.arange(K.shape[1], device=K.device) < n_old if n_old else None
        as_out_in = (lambda t: t.T) if fan_in_fan_out else (lambda t: t)
        delta = as_out_in(now[name]) - as_out_in(start[name])
        A_N = kept.second_moment(name).to(delta.device)
        weight = as_out_in(start[name])
        if capability and name in capability:
            change, lam, rho = bounded_change(delta, K, A_N, fixed, capability[name], weight, budget)
            if bounds is not None:
                bounds[name] = lam, rho
        else:
            change = least_change(delta, K, A_N, fixed)
        out[name] = as_out_in(weight.double() + change).to(now[name].dtype)
    return out
