"""Drift over a model's life: every version records its KL against v0 beside its KL against its parent, and a
lifetime budget on it rejects an edit as the per-edit budget does."""

import argparse

from conftest import FAST, tiny_worker

from crispedit.capability import mean_kl
from registry.cli import cmd
from worker.tasks import process_pending_leased

OPEN_GUARD = {"kl_budget": 1e9, "min_reliability": 0.0, "min_neighbours_unchanged": 0.0}
ROME = {"prompt": "The capital of France is", "target": "Rome"}
MADRID = {"prompt": "Hamlet was written by", "target": "Madrid"}


def post(store, edit: dict, guard: dict) -> str:
    record, _ = store.create("tiny", {"model": "tiny", "edits": [edit], "hyperparameters": FAST, "guard": guard})
    return record["id"]


def weights_of(rt, version: str, names) -> dict:
    rt.holder.switch_to(version)
    params = dict(rt.model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def test_each_version_records_its_drift_from_v0_as_measured_directly(tmp_path, redis_db, capsys):
    rt, store = tiny_worker(tmp_path, redis_db, "drift")
    for edit in (ROME, MADRID):
        post(store, edit, OPEN_GUARD)
        process_pending_leased(rt, store)
    v1, v2 = rt.registry.get("tiny", "v1"), rt.registry.get("tiny", "v2")
    assert v1.metrics["kl_base"] == v1.metrics["kl"]  # its parent is v0
    names = sorted(set(v1.tensors) | set(v2.tensors))
    base = {n: rt.registry.base_tensor("tiny", n) for n in names}
    first, second = weights_of(rt, "v1", names), weights_of(rt, "v2", names)
    assert v2.metrics["kl"] == mean_kl(rt.model, rt.tokenizer, rt.guard_texts, first, second)
    direct = mean_kl(rt.model, rt.tokenizer, rt.guard_texts, base, second)
    assert abs(v2.metrics["kl_base"] - direct) <= 1e-6 * direct
    assert v2.metrics["kl_base"] != v2.metrics["kl"]
    cmd(argparse.Namespace(root=rt.registry.root, action="log", model="tiny"))  # `crispedit registry log`
    assert f"KL from v0 {v2.metrics['kl_base']:.4f}" in capsys.readouterr().out.splitlines()[0]


def test_an_edit_past_the_lifetime_budget_is_rejected_and_the_versions_stay(tmp_path, redis_db):
    """Under a budget the first edit fits, the second passes its own KL budget but not the one against v0."""
    rt, store = tiny_worker(tmp_path, redis_db, "drift-budget")
    post(store, ROME, OPEN_GUARD)
    process_pending_leased(rt, store)
    drift = rt.registry.get("tiny", "v1").metrics["kl_base"]
    job = post(store, MADRID, {**OPEN_GUARD, "kl_base_budget": drift})
    process_pending_leased(rt, store)
    record = store.get(job)
    assert record["status"] == "rejected", record
    assert "v0" in record["error"] and record["metrics"]["kl_base"] > drift, record
    assert [v.id for v in rt.registry.versions("tiny")] == ["v0", "v1"]
    assert rt.registry.resolve("tiny", "latest") == "v1"
