"""Sequential edits through the worker: a later version's keyed solve leaves the earlier versions' edits alone."""

from conftest import tiny_worker

from crispedit.arch import editable_modules
from crispedit.keyed_solve import key_inputs
from crispedit.requests import EditRequest
from worker.tasks import process_pending_leased

OPEN_GUARD = {"kl_budget": 1e9, "min_reliability": 0.0, "min_neighbours_unchanged": 0.0}
HYPER = {"lr": 0.03, "max_epochs": 5, "energy": 0.5}  # the tiny model need not learn the fact, only commit


def test_a_later_version_leaves_the_earlier_edits_keys_alone(tmp_path, redis_db):
    rt, store = tiny_worker(tmp_path, redis_db, "settled")
    versions = []
    for prompt, target, subject in (("The capital of France is", "Rome", "France"),
                                    ("The capital of Japan is", "Seoul", "Japan")):
        record, _ = store.create("tiny", {"model": "tiny", "edits": [{"prompt": prompt, "target": target,
                                                                      "subject": subject}],
                                          "hyperparameters": HYPER, "guard": OPEN_GUARD})
        process_pending_leased(rt, store)
        job = store.get(record["id"])
        assert job["status"] == "succeeded", job
        versions.append(job["version"])
    first, second = (rt.registry.get("tiny", v) for v in versions)
    assert second.hyperparameters["keyed_solve"] and second.parent == first.id
    modules = editable_modules(rt.model, rt.capability.layers)
    name = next(iter(modules))  # the first edited layer: no edited weight reaches its inputs
    rt.holder.switch_to(first.id)
    keys = key_inputs(rt.model, rt.tokenizer, [EditRequest.from_dict(e) for e in first.edits], modules)[name]
    weight = f"{name}.weight"
    change = (rt.registry.tensors("tiny", second.id)[weight] - rt.registry.tensors("tiny", first.id)[weight]).double()
    assert change.abs().max() > 1e-4  # the second edit changed this layer
    assert (change @ keys).abs().max() < 1e-5  # but not at the first edit's keys
