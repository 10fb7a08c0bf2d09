"""The lab's multiple-choice scorer: lm-eval's log-likelihood rule, checked against direct computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lab.multiple_choice import (
    MC_TASKS,
    capability_report,
    mc_drop,
    multiple_choice_accuracy,
    score_continuations,
    select_records,
)

ARC = [
    {"query": "Question: What is the capital of France?", "choices": ["Paris", "Rome", "Madrid"], "gold": 0},
    {"query": "Question: Who wrote Hamlet?", "choices": ["William Shakespeare", "Au"], "gold": 1},
    {"query": "Question: Symbol for gold?", "choices": ["Ag", "Au", "silver", "Celsius"], "gold": 1},
]

def sequence_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from a single unpadded forward."""
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))



def test_continuation_scores_match_direct_computation(tiny):
    model, tok = tiny
    pairs = [(r["query"] + "\nAnswer:", " " + c) for r in ARC for c in r["choices"]]
    pairs += [("Q: Who wrote Hamlet?\nA. Paris\nB. Shakespeare\nAnswer:", " " + c) for c in "ABCD"]  # shared input
    scores = score_continuations(model, tok, pairs, batch_size=4)
    with torch.no_grad():
        direct = [sequence_logprob(model, tok, ctx, cont) for ctx, cont in pairs]
    assert scores == pytest.approx(direct, abs=1e-4)


def test_multiple_choice_picks_highest_loglikelihood(tiny_llama):
    model, tok = tiny_llama
    res = multiple_choice_accuracy(model, tok, "arc_easy", records=ARC, batch_size=5)
    with torch.no_grad():
        hits = 0
        for r in ARC:
            lls = [sequence_logprob(model, tok, r["query"] + "\nAnswer:", " " + c) for c in r["choices"]]
            hits += max(range(len(lls)), key=lls.__getitem__) == r["gold"]
    assert res["n"] == 3 and res["acc"] == hits / 3 and sum(res["correct"]) == hits
    assert 0 <= res["acc"] <= 1 and 0 <= res["acc_norm"] <= 1
    assert multiple_choice_accuracy(model, tok, "arc_easy", records=ARC, limit=2)["n"] == 2


def test_bad_task_lists_valid_names(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="arc_challenge.*arc_easy.*boolq.*hellaswag.*mmlu.*piqa"):
        multiple_choice_accuracy(model, tok, "lambada", records=ARC)


def test_task_prompts():
    assert MC_TASKS["piqa"][1]({"query": "Question: How?\n", "choices": ["a", "b"], "gold": 1}) == (
        "Question: How?\nAnswer:", ["a", "b"], 1
    )
    assert MC_TASKS["hellaswag"][1]({"ctx": "A man. he", "endings": ["x", "y"], "label": 0}) == (
        "A man. he", ["x", "y"], 0
    )
    ctx, choices, gold = MC_TASKS["mmlu"][1](
        {"subject": "abstract_algebra", "question": " 2+2? ", "choices": ["1", "4", "2", "6"], "answer": 1}
    )
    assert ctx == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "2+2?\nA. 1\nB. 4\nC. 2\nD. 6\nAnswer:"
    )
    assert (choices, gold) == (["A", "B", "C", "D"], 1)


def test_mmlu_selection_spreads_over_subjects():
    records = [{"subject": s, "i": i} for s in "abc" for i in range(4)]
    picked = select_records("mmlu", records, 5)
    assert [(r["subject"], r["i"]) for r in picked] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0)]
    assert select_records("boolq", records, 5) == records[:5]
    assert select_records("mmlu", records, None) == records


def test_capability_report_reads_task_files(tiny_gpt2, tmp_path):
    model, tok = tiny_gpt2
    boolq = [{"query": "Passage: Water boils.\nQuestion: does it?", "choices": ["no", "yes"], "gold": 1}]
    for task, recs in (("arc_easy", ARC), ("boolq", boolq * 2)):
        path = tmp_path / MC_TASKS[task][0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    report = capability_report(model, tok, data_dir=tmp_path, tasks=("arc_easy", "boolq"))
    assert set(report) == {"arc_easy", "boolq", "mc_mean"}
    assert report["boolq"] in (0.0, 1.0)
    assert report["mc_mean"] == pytest.approx((report["arc_easy"] + report["boolq"]) / 2)
    items = capability_report(model, tok, data_dir=tmp_path, tasks=("arc_easy", "boolq"), items=True)
    assert [len(items["mc_correct"][t]) for t in ("arc_easy", "boolq")] == [3, 2]
    assert sum(items["mc_correct"]["arc_easy"]) / 3 == report["arc_easy"]


def test_mc_drop_is_the_mean_drop_with_a_paired_standard_error():
    base = {"a": [True, True, False, True], "b": [True, False]}
    edited = {"a": [True, False, False, False], "b": [True, True]}
    drop, se = mc_drop(base, edited)
    # task a: differences 0,1,0,1 (accuracy 0.75 -> 0.25); task b: 0,-1 (0.5 -> 1.0)
    assert drop == pytest.approx(100 * ((0.75 - 0.25) + (0.5 - 1.0)) / 2)
    var_a, var_b = (4 * 0.5 * 0.5) / 3 / 4, (2 * 0.25) / 1 / 2  # unbiased variance of d over n, per task
    assert se == pytest.approx(100 * math.sqrt(var_a + var_b) / 2)
    assert mc_drop(base, base) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same items"):
        mc_drop(base, {"a": [True], "b": [True, False]})
    with pytest.raises(ValueError, match="tasks differ"):
        mc_drop(base, {"a": base["a"]})
