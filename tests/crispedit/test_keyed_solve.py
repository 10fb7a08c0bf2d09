"""The keyed solve: the edit's change kept on its keys, and the smallest on the neighbours' inputs."""

import contextlib
from dataclasses import replace

import pytest
import torch
from conftest import small_cache

from crispedit.arch import editable_modules
from crispedit.edit import EditConfig, edit
from crispedit.keyed_solve import (
    LAMBDAS,
    RIDGE,
    bounded_change,
    factored_energy,
    key_inputs,
    least_change,
    off_neighbours,
    output_change,
)
from crispedit.neighbours import protect
from crispedit.requests import EditRequest, tokenize_edit_batch
from crispedit.subject_key import subject_key_mask


def metric(A: torch.Tensor, A_C: torch.Tensor | None = None, lam: float = 1.0) -> torch.Tensor:
    """M = Â + λ Â_C + εI, each factor scaled to mean eigenvalue 1, as least_change builds it."""
    d = A.shape[0]
    M = A * (d / A.trace()) + RIDGE * torch.eye(d, dtype=A.dtype)
    return M if A_C is None else M + lam * A_C * (d / A_C.trace())


def objective(delta: torch.Tensor, A: torch.Tensor, A_C: torch.Tensor | None = None) -> float:
    """tr(Δ M Δᵀ), at λ = 1."""
    return float((delta @ metric(A, A_C) * delta).sum())


def test_least_change_keeps_the_keys_and_is_the_minimum_in_float64():
    torch.manual_seed(0)
    d_out, d_in, m = 5, 8, 3
    delta = torch.randn(d_out, d_in, dtype=torch.float64)
    K = torch.randn(d_in, m, dtype=torch.float64)
    F = torch.randn(4, d_in, dtype=torch.float64)
    A = F.T @ F  # rank 4 of 8: the neighbours use half of the input space
    best = least_change(delta, K, A)
    torch.testing.assert_close(best @ K, delta @ K)  # the constraint ΔW* K = ΔW K
    # the optimum's stationarity: ΔW* M lies in the span of Kᵀ's rows (a Lagrange multiplier Λ with ΔW* M = Λ Kᵀ)
    M = A * (d_in / A.trace()) + RIDGE * torch.eye(d_in, dtype=torch.float64)
    residual = best @ M - (best @ M) @ K @ torch.linalg.pinv(K)
    assert residual.abs().max() < 1e-8
    # any other change that acts on the keys alike costs more
    null = torch.eye(d_in, dtype=torch.float64) - K @ torch.linalg.pinv(K)  # moves nothing at the keys
    for _ in range(5):
        other = best + torch.randn(d_out, d_in, dtype=torch.float64) @ null
        torch.testing.assert_close(other @ K, delta @ K)
        assert objective(other, A) > objective(best, A)
    assert objective(best, A) <= objective(delta, A)


def test_least_change_with_the_capability_factor_is_the_minimum_in_its_metric_in_float64():
    """With generic text's Â_C in M, the change is the least in that metric, and moves generic text less."""
    torch.manual_seed(2)
    d_out, d_in, m = 5, 8, 3
    delta = torch.randn(d_out, d_in, dtype=torch.float64)
    K = torch.randn(d_in, m, dtype=torch.float64)
    F, F_C = torch.randn(3, d_in, dtype=torch.float64), torch.randn(16, d_in, dtype=torch.float64)
    A, A_C = F.T @ F, F_C.T @ F_C
    best = least_change(delta, K, A, A_C=A_C, lam=1.0)
    torch.testing.assert_close(best @ K, delta @ K)
    null = torch.eye(d_in, dtype=torch.float64) - K @ torch.linalg.pinv(K)
    for _ in range(5):
        assert objective(best + torch.randn(d_out, d_in, dtype=torch.float64) @ null, A, A_C) > objective(best, A, A_C)
    without = least_change(delta, K, A)
    assert float((best @ A_C * best).sum()) < float((without @ A_C * without).sum())


def test_factored_energy_is_the_change_s_energy_in_float64():
    """tr(T Z A Zᵀ Tᵀ) by either order of products: fewer keys than outputs, and more."""
    torch.manual_seed(4)
    F = torch.randn(20, 12, dtype=torch.float64)
    A = F.T @ F
    for d_out, m in ((6, 3), (3, 6)):
        T, Z = torch.randn(d_out, m, dtype=torch.float64), torch.randn(m, 12, dtype=torch.float64)
        change = T @ Z
        assert factored_energy(T, Z, A) == pytest.approx(float((change @ A @ change.T).trace()), rel=1e-12)


def test_bounded_change_takes_the_least_lambda_within_the_budget_in_float64():
    """ρ² = tr(ΔW A_C ΔWᵀ) / tr(W A_C Wᵀ) falls as λ grows; the solve takes the least λ of LAMBDAS with ρ within
    the budget, λ = 0 when that fits, and the largest when none does. Checked against every λ in turn."""
    torch.manual_seed(3)
    d_out, d_in, m = 6, 12, 3
    delta, W = torch.randn(d_out, d_in, dtype=torch.float64), torch.randn(d_out, d_in, dtype=torch.float64)
    K = torch.randn(d_in, m, dtype=torch.float64)
    F, F_C = torch.randn(4, d_in, dtype=torch.float64), torch.randn(30, d_in, dtype=torch.float64)
    A, A_C = F.T @ F, F_C.T @ F_C
    rhos = []
    for lam in LAMBDAS:
        change = least_change(delta, K, A, A_C=A_C, lam=lam)
        reference = ((change @ A_C @ change.T).trace() / (W @ A_C @ W.T).trace()).sqrt()
        assert output_change(change, W, A_C) == pytest.approx(float(reference), rel=1e-12)
        rhos.append(float(reference))
    assert all(later < earlier for earlier, later in zip(rhos, rhos[1:], strict=False))
    cases = [(rhos[0] * (1 + 1e-9), 0.0), ((rhos[3] + rhos[4]) / 2, LAMBDAS[4]), (rhos[-1] / 2, LAMBDAS[-1])]
    for budget, lam in cases:
        change, chosen, rho = bounded_change(delta, K, A, None, A_C, W, budget)
        assert chosen == lam
        torch.testing.assert_close(change, least_change(delta, K, A, A_C=A_C, lam=lam))
        assert rho == pytest.approx(rhos[LAMBDAS.index(lam)])


def test_least_change_leaves_settled_keys_as_they_were_in_float64():
    """Earlier chunks' keys are settled: the change acts on them as 0, on the others as ΔW, the least it can."""
    torch.manual_seed(1)
    d_out, d_in = 5, 8
    delta = torch.randn(d_out, d_in, dtype=torch.float64)
    K = torch.randn(d_in, 4, dtype=torch.float64)
    F = torch.randn(4, d_in, dtype=torch.float64)
    A = F.T @ F
    settled = torch.tensor([True, False, True, False])
    best = least_change(delta, K, A, settled)
    torch.testing.assert_close(best @ K[:, settled], torch.zeros(d_out, 2, dtype=torch.float64))
    torch.testing.assert_close(best @ K[:, ~settled], delta @ K[:, ~settled])
    null = torch.eye(d_in, dtype=torch.float64) - K @ torch.linalg.pinv(K)
    for _ in range(5):
        assert objective(best + torch.randn(d_out, d_in, dtype=torch.float64) @ null, A) > objective(best, A)


def test_key_inputs_are_each_sequence_s_subject_token(tiny_llama):
    model, tok = tiny_llama
    modules = editable_modules(model, (1,))
    requests = [EditRequest("The capital of France is", "Rome", subject="France"),
                EditRequest("Water boils at", "fifty")]  # no subject: every token is a key
    keys = key_inputs(model, tok, requests, modules)
    (name,) = modules
    batch = tokenize_edit_batch(tok, requests)
    mask = subject_key_mask(tok, requests, batch["input_ids"].shape[1]).bool() & batch["attention_mask"].bool()
    seen = []
    handle = modules[name].register_forward_hook(lambda mod, x, out: seen.append(x[0]))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    torch.testing.assert_close(keys[name], seen[0][mask].double().T)
    assert keys[name].shape[1] == 1 + int(batch["attention_mask"][1].sum())


def test_grouped_key_inputs_are_each_group_s_mean_key(tiny_llama):
    model, tok = tiny_llama
    modules = editable_modules(model, (1,))
    (name,) = modules
    variants = [EditRequest("The capital of France is", "Rome", subject="France"),
                EditRequest("Well. The capital of France is", "Rome", subject="France"),
                EditRequest("Water boils at", "fifty")]  # every token a key: the group's mean over all of them
    each = key_inputs(model, tok, variants, modules)[name]
    grouped = key_inputs(model, tok, variants, modules, groups=[0, 0, 1])[name]
    assert grouped.shape == (each.shape[0], 2)
    torch.testing.assert_close(grouped[:, 0], each[:, :2].mean(1))
    torch.testing.assert_close(grouped[:, 1], each[:, 2:].mean(1))


@contextlib.contextmanager
def perturbed(modules):
    """The modules' weights moved by a small random change while inside: yields (start, now)."""
    start = {n: m.weight.detach().clone() for n, m in modules.items()}
    torch.manual_seed(0)
    now = {n: w + 0.02 * torch.randn_like(w) for n, w in start.items()}
    with torch.no_grad():
        for n, m in modules.items():
            m.weight.copy_(now[n])
    try:
        yield start, now
    finally:
        with torch.no_grad():
            for n, m in modules.items():
                m.weight.copy_(start[n])


def test_off_neighbours_keeps_the_key_outputs_and_moves_the_neighbours_less(tiny_llama):
    model, tok = tiny_llama
    modules = editable_modules(model, (1, 2))
    requests = [EditRequest("The capital of France is", "Rome", subject="France",
                            locality_prompt="Water boils at")]
    protection = protect(model, tok, requests, False, modules, False)
    variants = [[EditRequest("Well, the capital of France is", "Rome", subject="France"),
                 EditRequest("France's capital is", "Rome", subject="France")]]
    with perturbed(modules) as (start, now):
        keys = key_inputs(model, tok, protection.requests, modules)
        mean_keys = key_inputs(model, tok, variants[0], modules, groups=[0, 0])
        solved = off_neighbours(model, tok, protection.requests, modules, protection.kept, start, now, False)
        worded = off_neighbours(model, tok, protection.requests, modules, protection.kept, start, now, False, variants)
    for n in modules:
        delta = (now[n] - start[n]).double()
        for result, K in ((solved[n], keys[n]), (worded[n], torch.cat([keys[n], mean_keys[n]], dim=1))):
            torch.testing.assert_close((result - start[n]).double() @ K, delta @ K, atol=1e-5, rtol=1e-4)
        assert ((solved[n] - start[n]).double() @ mean_keys[n] - delta @ mean_keys[n]).abs().max() > 1e-4
    assert protection.kept(solved) < protection.kept(now) / 10
    assert protection.kept(solved) <= protection.kept(worded) < protection.kept(now)


def test_off_neighbours_leaves_an_earlier_chunk_s_keys_alone(tiny_llama):
    model, tok = tiny_llama
    modules = editable_modules(model, (1, 2))
    earlier = EditRequest("The capital of Japan is", "Seoul", subject="Japan")
    requests = [EditRequest("The capital of France is", "Rome", subject="France")]
    protection = protect(model, tok, [earlier, *requests], False, modules, False)
    with perturbed(modules) as (start, now):
        old, new = (key_inputs(model, tok, [r], modules) for r in (earlier, *requests))
        solved = off_neighbours(model, tok, [earlier, *requests], modules, protection.kept, start, now, False,
                                settled=(1, 0))
    for n in modules:
        change = (solved[n] - start[n]).double()
        assert (change @ old[n]).abs().max() < 1e-5 < ((now[n] - start[n]).double() @ old[n]).abs().max()
        torch.testing.assert_close(change @ new[n], (now[n] - start[n]).double() @ new[n], atol=1e-5, rtol=1e-4)


def protected_france(model, tok, corpus_file):
    """The curvature cache, the edited modules and the protection of France → Rome, as the edit tests use them."""
    cache = small_cache(model, tok, corpus_file)
    modules = editable_modules(model, cache.layers)
    requests = [EditRequest("The capital of France is", "Rome", subject="France", locality_prompt="Water boils at")]
    return cache, modules, protect(model, tok, requests, False, modules, False)


def test_edit_with_the_solve_acts_on_its_keys_as_the_plain_edit_does(tiny_llama, corpus_file):
    """Through ``edit``: the solve runs after the epochs, so the edit with it trains exactly as without it, then
    differs only by ΔW* − ΔW, which the keys (inputs at the subject's token, on the trained model) do not see.
    With no budget on generic text, the solve's metric is the neighbours' alone, and moves them least."""
    model, tok = tiny_llama
    cache, modules, protection = protected_france(model, tok, corpus_file)
    params = dict(model.named_parameters())
    results = {}
    for solve in (False, True):  # in sequential mode, as the worker edits
        config = EditConfig(lr=3e-2, max_epochs=5, energy=0.5, subject_key=True, neighbour_weight=1.0,
                            keyed_solve=solve, sequential_chunk=1, capability_budget=float("inf"))
        results[solve] = edit(model, tok, protection.requests, cache, config, kept=protection.kept)
        if not solve:
            keys = key_inputs(model, tok, protection.requests, modules)  # the trained model's, before any solve
        with torch.no_grad():
            for n, t in results[solve].original.items():
                params[n].copy_(t)
    assert results[False].epoch_losses == pytest.approx(results[True].epoch_losses)
    original = results[False].original
    # the last layer's output at the subject's token reaches no later position: only earlier layers change
    edited = [n for n in modules if f"{n}.weight" in results[False].changed]
    assert edited and set(results[True].changed) == {f"{n}.weight" for n in edited}
    plain = {n: results[False].changed[f"{n}.weight"] for n in edited}
    solved = {n: results[True].changed[f"{n}.weight"] for n in edited}
    for n in edited:
        w0 = original[f"{n}.weight"].double()
        torch.testing.assert_close((solved[n] - w0) @ keys[n], (plain[n] - w0) @ keys[n], atol=1e-5, rtol=1e-4)
    assert protection.kept(solved) < protection.kept(plain) / 2


def test_edit_s_solve_moves_the_capability_text_s_inputs_less(tiny_llama, corpus_file):
    """Through ``edit``, the solve's metric holds the curvature cache's input factor Â_C (MEMIT's metric) when its
    budget on generic text asks it to: under a tight budget the change moves the capability text's inputs less than
    with M = Â_N + εI alone (a budget nothing exceeds)."""
    model, tok = tiny_llama
    cache, modules, protection = protected_france(model, tok, corpus_file)
    params = dict(model.named_parameters())
    results = {}
    for budget in (float("inf"), 0.0):
        config = EditConfig(lr=3e-2, max_epochs=5, energy=0.5, subject_key=True, neighbour_weight=1.0,
                            keyed_solve=True, capability_budget=budget)
        results[budget] = edit(model, tok, protection.requests, cache, config, kept=protection.kept)
        with torch.no_grad():
            for n, t in results[budget].original.items():
                params[n].copy_(t)
    without, with_capability = results.values()
    assert without.epoch_losses == pytest.approx(with_capability.epoch_losses)  # the same training, then the solve

    def on_capability(result) -> float:
        """Σ_layers tr(ΔW A_C ΔWᵀ): the change's energy on the capability text's inputs."""
        energy = 0.0
        for n, t in result.changed.items():
            delta = t.double() - result.original[n].double()
            energy += float((delta @ cache.factors[n.removesuffix(".weight")].A.double() * delta).sum())
        return energy

    assert set(with_capability.changed) == set(without.changed)
    assert on_capability(with_capability) < on_capability(without)
    # the result says which λ each changed layer took: none under no budget, the largest under a budget of 0
    changed = {n.removesuffix(".weight") for n in without.changed}
    assert changed <= set(without.solve) and {without.solve[n]["lambda"] for n in changed} == {0.0}
    assert {with_capability.solve[n]["lambda"] for n in changed} == {LAMBDAS[-1]}


def test_the_solve_needs_the_subject_key():
    with pytest.raises(ValueError, match="subject_key"):
        EditConfig(keyed_solve=True)


@pytest.mark.parametrize("budget", [-0.01, float("nan")])
def test_the_budget_is_a_non_negative_number(budget):
    with pytest.raises(ValueError, match="capability_budget must be non-negative"):
        EditConfig(capability_budget=budget)


def test_a_later_edit_leaves_the_settled_edits_keys_alone(tiny_llama, corpus_file):
    """``settled`` (an earlier version's edits): the later edit's change acts on their keys as 0. Checked on the
    first edited layer, whose inputs no edited weight reaches, so the keys read after the first edit are exact."""
    model, tok = tiny_llama
    cache = small_cache(model, tok, corpus_file)
    modules = editable_modules(model, cache.layers)
    config = EditConfig(lr=3e-2, max_epochs=5, energy=0.5, subject_key=True, neighbour_weight=1.0, keyed_solve=True)
    params = dict(model.named_parameters())
    base = {n: p.detach().clone() for n, p in params.items()}

    def put(weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)

    try:
        first = protect(model, tok, [EditRequest("The capital of France is", "Rome", subject="France",
                                                 locality_prompt="Water boils at")], False, modules, False)
        edit(model, tok, first.requests, cache, config, kept=first.kept)
        after_first = {f"{n}.weight": m.weight.detach().clone() for n, m in modules.items()}
        keys = key_inputs(model, tok, first.requests, modules)
        later = protect(model, tok, [EditRequest("The capital of Japan is", "Seoul", subject="Japan",
                                                 locality_prompt="Ice melts at")], False, modules, False)
        changes = {}
        for settled in ((), first.requests):
            edit(model, tok, later.requests, cache, config, kept=later.kept, settled=settled)
            changes[bool(settled)] = {n: (m.weight.detach() - after_first[f"{n}.weight"]).double()
                                      for n, m in modules.items()}
            put(after_first)
        again = [replace(first.requests[0], target="Paris")]  # the same fact edited again: nothing to hold
        for settled in ((), first.requests):
            edit(model, tok, again, cache, config, kept=first.kept, settled=settled)
            changes["again", bool(settled)] = {n: m.weight.detach().clone() for n, m in modules.items()}
            put(after_first)
    finally:
        put(base)
    n = next(iter(modules))
    assert (changes[True][n] @ keys[n]).abs().max() < 1e-5 < (changes[False][n] @ keys[n]).abs().max()
    assert changes[True][n].abs().max() > 1e-3  # the later edit still changed the layer
    for n in modules:  # the first edit's own key is not held against its replacement
        torch.testing.assert_close(changes["again", True][n], changes["again", False][n])
