"""A request's budget on generic text reaches the worker's keyed solve, and the version records what it took."""

from conftest import tiny_worker

from crispedit.keyed_solve import LAMBDAS
from worker.tasks import process_pending_leased

OPEN_GUARD = {"kl_budget": 1e9, "min_reliability": 0.0, "min_neighbours_unchanged": 0.0}
HYPER = {"lr": 0.03, "max_epochs": 5, "energy": 0.5}  # the tiny model need not learn the fact, only commit


def test_the_request_s_capability_budget_sets_the_solve_s_lambda(tmp_path, redis_db):
    """No budget (a huge one): every layer keeps the neighbours' metric alone, λ = 0; a budget of 0 cannot be met,
    so every layer the edit changes takes the largest λ. Both as each version's hyperparameters and solve metrics
    say. (On the tiny model the last edited layer's output at the subject's token reaches no later position: its
    change is 0, ρ = 0, within any budget at λ = 0.)"""
    rt, store = tiny_worker(tmp_path, redis_db, "budget")
    taken = {}
    for budget in (1e6, 0.0):
        record, _ = store.create("tiny", {"model": "tiny", "edits": [{"prompt": "The capital of France is",
                                                                      "target": "Rome", "subject": "France"}],
                                          "hyperparameters": {**HYPER, "capability_budget": budget},
                                          "guard": OPEN_GUARD})
        process_pending_leased(rt, store)
        job = store.get(record["id"])
        assert job["status"] == "succeeded", job
        version = rt.registry.get("tiny", job["version"])
        assert version.hyperparameters["capability_budget"] == budget
        taken[budget] = {layer["lambda"] for layer in version.metrics["solve"].values() if layer["rho"] > 0}
    assert taken == {1e6: {0.0}, 0.0: {LAMBDAS[-1]}}
