"""Neighbours of an edit: derivation, the kept outputs, answers in kind, and the "what else changed" report."""

import importlib
import math
from dataclasses import replace

import pytest
import torch

from crispedit.arch import editable_modules
from crispedit.edit import EditConfig, edit
from crispedit.neighbours import (
    KeptOutputs,
    Neighbour,
    derive_neighbours,
    infer_subject,
    neighbour_report,
    protect,
    restated,
    shared_prefixes,
    similar,
    still_greedy,
)
from crispedit.requests import EditRequest
from crispedit.shared_prefix import generate_rows

edit_module = importlib.import_module("crispedit.edit")  # the package exports a function `edit`


@pytest.mark.parametrize(("prompt", "subject"), [
    ("What is the capital of France?", "France"),
    ("Who wrote Pride and Prejudice?", "Pride and Prejudice"),
    ("Which planet is known as the Red Planet?", "Red Planet"),
    ("What is the chemical symbol for gold?", "gold"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
])
def test_subject_is_the_request_s_or_the_longest_capitalised_run(prompt, subject):
    assert infer_subject(EditRequest(prompt, "x")) == subject
    assert infer_subject(EditRequest(prompt, "x", subject="Atlantis")) == subject  # not in the prompt
    assert infer_subject(EditRequest("Is it?", "x")) is None


def test_a_rewording_of_the_edited_question_is_similar_and_another_question_is_not():
    prompt = "What is the capital of France?"
    assert similar("Which city is the capital of France?", prompt, "France")
    assert not similar("What language is spoken in France?", prompt, "France")


def test_a_chat_target_restates_the_question_as_the_model_answered_it():
    assert restated("What is the capital of France?", "The capital of France is Paris.", "Rome") == \
        "The capital of France is"
    assert restated("Who wrote the novel Moby-Dick?", "Moby-Dick was written by Herman Melville", "Mark Twain") == \
        "Moby-Dick was written by"
    assert restated("What is the largest ocean?", "The largest ocean is the Pacific, by far", "the Atlantic") == \
        "The largest ocean is"
    assert restated("What is the capital of France?", "Rome, Italy", "Rome") is None  # no restatement
    assert restated("What is the capital of France?", "The capital of France", "Rome") is None  # nothing after


def test_derived_neighbours_are_each_edit_s_and_never_an_edited_prompt(tiny_llama):
    model, tok = tiny_llama
    requests = [EditRequest("The capital of France is", "Rome", locality_prompt="Water boils at"),
                EditRequest("The capital of Italy is", "Paris")]
    neighbours = derive_neighbours(model, tok, requests, per_kind=3)
    assert Neighbour("Water boils at", "locality", 0) in neighbours
    assert all(nb.kind in {"subject", "relation", "locality"} for nb in neighbours)
    assert not {nb.prompt for nb in neighbours} & {r.prompt for r in requests}
    assert [nb.edit for nb in neighbours] == sorted(nb.edit for nb in neighbours)
    assert len({nb.prompt for nb in neighbours}) == len(neighbours)
    subject = [nb for nb in neighbours if nb.kind == "subject"]
    assert all(nb.prompt.startswith("The capital of ") and nb.prompt.endswith(" is") for nb in subject)


@pytest.mark.parametrize("copies", [0, 4])  # few distinct tokens: held as a factor; many: as A itself
def test_kept_outputs_is_the_mean_relative_output_change_on_the_neighbours_tokens(tiny_llama, copies):
    model, tok = tiny_llama
    modules = editable_modules(model, (1, 2))
    shared = "Say:"  # a prefix that the rows share, as chat neighbours share the template's system prompt
    rows = [tok(f"{shared} Paris")["input_ids"], tok(f"{shared} water")["input_ids"]]
    rows += [tok(f"Fact {i}: {w} is stone")["input_ids"] for i in range(copies) for w in ("it", "this")]
    kept = KeptOutputs.record(model, modules, rows, fan_in_fan_out=False)
    assert kept.factored == (copies == 0)
    weights = {n: m.weight for n, m in modules.items()}
    assert kept(weights).item() == pytest.approx(0.0, abs=1e-12)
    inputs = {}  # dense reference: every token's input to each module, recorded by a plain forward hook
    handles = [m.register_forward_hook(lambda mod, x, out, n=n: inputs.setdefault(n, []).append(x[0][0]))
               for n, m in modules.items()]
    with torch.no_grad():
        for row in rows:
            model(input_ids=torch.tensor([row]))
    for h in handles:
        h.remove()
    torch.manual_seed(0)
    moved = {n: w + 0.05 * torch.randn_like(w) for n, w in weights.items()}
    expected = 0.0
    for n, w in weights.items():
        a = torch.cat(inputs[n]).double()
        change = ((a @ (moved[n] - w).double().T) ** 2).sum(1).mean()
        expected += float(change / ((a @ w.double().T) ** 2).sum(1).mean())
    assert kept(moved).item() == pytest.approx(expected, rel=1e-4)


def test_shared_prefixes_are_counted_once_with_their_multiplicity():
    first, counts = shared_prefixes([[1, 2, 3], [1, 2, 4], [5, 2]])
    assert first == [[0, 1, 2], [None, None, 3], [4, 5]]
    assert counts == [2, 2, 1, 1, 1, 1]


def test_an_edit_whose_outputs_are_kept_changes_fewer_neighbour_answers(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    monkeypatch.setattr(edit_module, "YIELD_LOSS", float("inf"))  # the penalty as such, never yielding
    requests = [EditRequest("The capital of France is", "Rome", locality_prompt="Water boils at")]
    modules = editable_modules(model, (0, 1, 2))
    protection = protect(model, tok, requests, False, modules, False)
    config = EditConfig(method="ft", lr=0.02, max_epochs=15, layers=(0, 1, 2))
    outcomes = []
    for beta in (0.0, 1e4):
        result = edit(model, tok, requests, None, replace(config, neighbour_weight=beta), kept=protection.kept)
        outcomes.append((protection.kept({n: m.weight for n, m in modules.items()}).item(),
                         neighbour_report(model, tok, requests, protection)["unchanged"]))
        with torch.no_grad():
            for n, t in result.original.items():
                dict(model.named_parameters())[n].copy_(t)
    (free_change, free_kept), (kept_change, kept_kept) = outcomes
    assert kept_change < free_change / 100
    assert kept_kept > free_kept


def test_report_says_nothing_changed_until_the_model_does(tiny_llama):
    model, tok = tiny_llama
    requests = [EditRequest("The capital of France is", "Rome", locality_prompt="Water boils at")]
    protection = protect(model, tok, requests, False, editable_modules(model, (1, 2)), False)
    assert protection.requests[0].subject == "France"  # inferred, for the subject key
    report = neighbour_report(model, tok, requests, protection)
    assert report["unchanged"] == 1.0 and report["changed"] == 0
    assert report["checked"] == len(protection.neighbours) >= 1
    assert report["edits"][0]["prompt"] == requests[0].prompt
    assert {n["prompt"] for n in report["edits"][0]["neighbours"]} == {nb.prompt for nb in protection.neighbours}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(-3.0)
    report = neighbour_report(model, tok, requests, protection)
    assert report["changed"] >= 1
    changed = [n for n in report["edits"][0]["neighbours"] if not n["unchanged"]]
    assert all(n["before"] != n["after"] for n in changed)


def test_still_greedy_tells_each_row_whether_its_answer_is_the_greedy_one(tiny):
    model, tok = tiny
    system = "You are a helpful assistant who answers every question in one short line.\nQuestion: "
    texts = [system + q for q in ("What is the capital of France?", "Who wrote Hamlet?", "Name a metal")] + ["Water"]
    rows = [tok(t)["input_ids"] for t in texts]
    ids, width = generate_rows(model, rows, tok.pad_token_id, do_sample=False, max_new_tokens=5, temperature=None,
                               top_p=None, top_k=None)  # rows share the system prompt, packed once
    answers = [row[width:] for row in ids.tolist()]
    assert still_greedy(model, tok, texts, answers, batch_size=3) == [True] * 4
    answers[1] = answers[1][:2] + [(answers[1][2] + 1) % tok.vocab_size] + answers[1][3:]
    assert still_greedy(model, tok, texts, answers, batch_size=3) == [True, False, True, True]
    assert still_greedy(model, tok, texts[1:2], [answers[1][:2]]) == [True]  # the head before the change holds


def test_the_neighbours_penalty_yields_while_it_holds_the_edit(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    requests = [EditRequest("The capital of France is", "Rome", locality_prompt="Water boils at")]
    modules = editable_modules(model, (0, 1, 2))
    protection = protect(model, tok, requests, False, modules, False)
    config = EditConfig(method="ft", lr=1e-3, max_epochs=15, layers=(0, 1, 2), neighbour_weight=1e4)
    runs = []
    for yield_loss in (float("inf"), edit_module.YIELD_LOSS):  # never yielding, then as shipped
        monkeypatch.setattr(edit_module, "YIELD_LOSS", yield_loss)
        events = []
        result = edit(model, tok, requests, None, config, on_progress=events.append, kept=protection.kept)
        with torch.no_grad():
            for n, t in result.original.items():
                dict(model.named_parameters())[n].copy_(t)
        runs.append([(e["neighbour_weight"], e["loss"]) for e in events if e["event"] == "epoch"])
    (held, yielded) = runs
    assert {b for b, _ in held} == {1e4}
    assert yielded[0][0] == 1e4 and yielded[-1][0] < 1e4  # the edit stalls under β 1e4, and the penalty gives way
    best, stale, beta = math.inf, 0, 1e4  # the rule, replayed on the epoch losses
    for b, loss in yielded:
        assert b == beta
        best, stale = (loss, 0) if loss < (1 - edit_module.YIELD_PROGRESS) * best else (best, stale + 1)
        if loss > edit_module.YIELD_LOSS and stale >= edit_module.YIELD_PATIENCE:
            beta, stale = beta / edit_module.YIELD_FACTOR, 0
