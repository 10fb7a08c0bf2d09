"""Coalesced requests: grouped only where one version honours each, and judged by their own edits (a rejected
batch is applied again in halves)."""

from conftest import FAST, tiny_worker

from crispedit.evaluate import edit_quality
from crispedit.requests import EditRequest
from worker.tasks import process_pending_leased

ROME = {"prompt": "The capital of France is", "target": "Rome"}
BERLIN = {"prompt": "The capital of France is", "target": "Berlin"}  # the same question: no one weight holds both


OPEN_GUARD = {"kl_budget": 1e9, "min_reliability": 0.0, "min_neighbours_unchanged": 0.0}


def post(store, edit: dict, guard: dict, **fields) -> str:
    record, _ = store.create("tiny", {"model": "tiny", "edits": [edit], "hyperparameters": FAST, "guard": guard,
                                      **fields})
    return record["id"]


def test_contradicting_jobs_coalesced_are_split_and_each_commits_on_its_own(tmp_path, redis_db):
    """Together the two answers cannot both be reliable, so the batch fails the reliability floor; apart, each
    lands, the second on top of the first, and the latest version answers as the later job asked."""
    rt, store = tiny_worker(tmp_path, redis_db, "split")
    guard = {"kl_budget": 1e9, "min_reliability": 0.9, "min_neighbours_unchanged": 0.0}
    ids = [post(store, ROME, guard), post(store, BERLIN, guard)]
    assert process_pending_leased(rt, store) == {"processed": ids}
    jobs = [store.get(i) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
    assert [j["batch"] for j in jobs] == [[ids[0]], [ids[1]]]  # each ended in a batch of its own
    first, second = (rt.registry.get("tiny", j["version"]) for j in jobs)
    assert second.parent == first.id and first.hyperparameters["jobs"] == [ids[0]]
    for job_id in ids:  # each job heard why its batch was applied again
        split = [e for e in store.events(job_id) if e["event"] == "split"]
        assert len(split) == 1 and "reliability" in split[0]["reason"] and split[0]["batch_size"] == 1
    rt.holder.switch_to(second.id)
    assert edit_quality(rt.model, rt.tokenizer, [EditRequest.from_dict(BERLIN)], generated=False)["rel_tf"] == 1.0


def test_a_job_its_own_batch_rejects_is_rejected_with_its_own_figures(tmp_path, redis_db):
    """A guard no edit can pass: the batch of three is halved down to single jobs, each rejected alone, and
    nothing is committed."""
    rt, store = tiny_worker(tmp_path, redis_db, "split-all")
    guard = {"kl_budget": 0.0, "min_reliability": 0.0, "min_neighbours_unchanged": 0.0}
    ids = [post(store, {"prompt": p, "target": t}, guard)
           for p, t in (("The capital of France is", "Rome"), ("Hamlet was written by", "Madrid"),
                        ("The chemical symbol for gold is", "Ag"))]
    process_pending_leased(rt, store)
    jobs = [store.get(i) for i in ids]
    assert [j["status"] for j in jobs] == ["rejected"] * 3 and all("KL" in j["error"] for j in jobs), jobs
    assert [j["batch"] for j in jobs] == [[i] for i in ids]
    assert [v.id for v in rt.registry.versions("tiny")] == ["v0"]
    assert store.processing("tiny") == []


def test_a_request_that_asks_to_promote_is_not_coalesced_with_one_that_does_not(tmp_path, redis_db):
    """Production moves to the version of the request that asked for it, and no version is promoted for the other."""
    rt, store = tiny_worker(tmp_path, redis_db, "promote")
    plain = post(store, ROME, OPEN_GUARD)
    promoted = post(store, {"prompt": "The capital of Japan is", "target": "Seoul"}, OPEN_GUARD, promote=True)
    process_pending_leased(rt, store)
    jobs = {i: store.get(i) for i in (plain, promoted)}
    assert all(j["status"] == "succeeded" for j in jobs.values()), jobs
    assert jobs[plain]["batch"] == [plain] and jobs[promoted]["batch"] == [promoted]
    assert rt.registry.aliases("tiny")["production"] == jobs[promoted]["version"] != jobs[plain]["version"]


def test_each_coalesced_job_reports_its_own_edits_figures_beside_the_batchs(tmp_path, redis_db):
    """Two jobs, one edit and two, in one version: each job's ``request`` figures are its own edits' reliability
    and neighbours, as measured on that version."""
    rt, store = tiny_worker(tmp_path, redis_db, "own-figures")
    one = post(store, ROME, OPEN_GUARD)
    pair = [{"prompt": "Hamlet was written by", "target": "Madrid"}, {"prompt": "Water boils at", "target": "Ag"}]
    record, _ = store.create("tiny", {"model": "tiny", "edits": pair, "hyperparameters": FAST, "guard": OPEN_GUARD})
    two = record["id"]
    process_pending_leased(rt, store)
    jobs = [store.get(i) for i in (one, two)]
    assert jobs[0]["batch"] == jobs[1]["batch"] == [one, two] and jobs[0]["version"] == jobs[1]["version"], jobs
    rt.holder.switch_to(jobs[0]["version"])
    report = jobs[0]["metrics"]["neighbours"]["edits"]
    for job, edits, own in ((jobs[0], [ROME], report[:1]), (jobs[1], pair, report[1:])):
        figures = job["metrics"]["request"]
        rel = edit_quality(rt.model, rt.tokenizer, [EditRequest.from_dict(e) for e in edits], generated=False)
        kept = [n["unchanged"] for e in own for n in e["neighbours"]]
        assert figures["edits"] == len(edits) and abs(figures["reliability"] - rel["rel_tf"]) < 1e-9, figures
        assert figures["neighbours_checked"] == len(kept) > 0
        assert figures["neighbours_unchanged"] == sum(kept) / len(kept)
    assert [e["prompt"] for e in report] == [ROME["prompt"]] + [e["prompt"] for e in pair]
