"""A job whose Redis record vanishes (deleted by hand, or evicted) neither stops the worker nor loses an edit."""

from conftest import tiny_worker

from core.jobs import JobStore
from worker.tasks import process_pending_leased

OPEN_GUARD = {"kl_budget": 1e9, "min_reliability": 0.0, "min_neighbours_unchanged": 0.0}
HYPER = {"lr": 0.03, "max_epochs": 3, "energy": 0.5}


class VanishingStore(JobStore):
    """Deletes a job's record when its first epoch is reported, as an operator's stray DEL would."""

    doomed: str | None = None

    def event(self, job_id: str, event: dict) -> None:
        if job_id == self.doomed and event.get("event") == "epoch":
            self.redis.delete(self.key("edit", job_id))
        super().event(job_id, event)


def post(store: JobStore, prompt: str, target: str) -> str:
    record, _ = store.create("tiny", {"model": "tiny", "edits": [{"prompt": prompt, "target": target}],
                                      "hyperparameters": HYPER, "guard": OPEN_GUARD})
    return record["id"]


def test_a_job_whose_record_vanishes_is_dropped_or_committed_and_the_worker_goes_on(tmp_path, redis_db):
    rt, store = tiny_worker(tmp_path, redis_db, "gone", VanishingStore)

    # gone before a worker took it: its edits are unknown, so it is dropped, and the next job is applied
    lost = post(store, "The capital of France is", "Rome")
    store.redis.delete(store.key("edit", lost))
    kept = post(store, "The capital of Japan is", "Seoul")
    assert process_pending_leased(rt, store) == {"processed": [kept]}
    assert store.get(kept)["status"] == "succeeded"
    assert store.processing("tiny") == []

    # gone while it is edited: the edit is still committed, and its version names the job
    store.doomed = post(store, "Hamlet was written by", "Madrid")
    process_pending_leased(rt, store)
    assert store.get(store.doomed) is None and store.processing("tiny") == []
    latest = rt.registry.get("tiny", "latest")
    assert latest.hyperparameters["jobs"] == [store.doomed]
    assert [e["prompt"] for e in latest.edits] == ["Hamlet was written by"]
