"""Capability metrics on the tiny random models, checked against direct computations."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from crispedit.capability import heldout_texts, mean_kl, perplexity, perplexity_change, swapped_weights, text_nlls
from lab.multiple_choice import (
    MC_TASKS,
    capability_report,
    mc_drop,
    multiple_choice_accuracy,
    score_continuations,
    select_records,
)

TEXTS = [
    "The capital of France is Paris.",
    "Water boils at one hundred degrees Celsius at sea level, said the teacher.",
    "Q: Who wrote Hamlet? A: Shakespeare.",
]

ARC = [
    {"query": "Question: What is the capital of France?", "choices": ["Paris", "Rome", "Madrid"], "gold": 0},
    {"query": "Question: Who wrote Hamlet?", "choices": ["William Shakespeare", "Au"], "gold": 1},
    {"query": "Question: Symbol for gold?", "choices": ["Ag", "Au", "silver", "Celsius"], "gold": 1},
]

WEIGHT = "model.layers.1.mlp.down_proj.weight"


def sequence_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from a single unpadded forward."""
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_perplexity_matches_hf_loss(tiny):
    model, tok = tiny
    ids = tok(TEXTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert perplexity(model, tok, TEXTS[1:2]) == pytest.approx(math.exp(loss), rel=1e-5)


def test_text_nlls_are_each_texts_summed_loss(tiny_llama):
    model, tok = tiny_llama
    terms = text_nlls(model, tok, TEXTS, batch_size=2)
    with torch.no_grad():
        for text, (nll, count) in zip(TEXTS, terms, strict=True):
            ids = tok(text, return_tensors="pt")["input_ids"]
            assert count == ids.shape[1] - 1
            assert nll == pytest.approx(model(input_ids=ids, labels=ids).loss.item() * count, rel=1e-5)


def test_perplexity_change_is_the_ratio_with_a_paired_standard_error(tiny_llama):
    model, tok = tiny_llama
    base = text_nlls(model, tok, TEXTS)
    edited_weight = dict(model.named_parameters())[WEIGHT].detach() * 1.5
    with swapped_weights(model, {WEIGHT: edited_weight}):
        edited = text_nlls(model, tok, TEXTS)
        ppl_edited = perplexity(model, tok, TEXTS)
    change, se = perplexity_change(base, edited)
    assert change == pytest.approx(100 * (ppl_edited / perplexity(model, tok, TEXTS) - 1), rel=1e-6)
    # by hand: D = Σd / ΣN, SE(D) = sqrt(n var(d)) / ΣN, SE = 100 exp(D) SE(D)
    d = [e - b for (b, _), (e, _) in zip(base, edited, strict=True)]
    count, mean = sum(c for _, c in base), sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    assert se == pytest.approx(100 * math.exp(sum(d) / count) * math.sqrt(len(d) * var) / count, rel=1e-6)
    assert perplexity_change(base, base) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same texts"):
        perplexity_change(base, edited[:2])


def test_perplexity_does_not_depend_on_padding(tiny_llama):
    model, tok = tiny_llama
    one = perplexity(model, tok, TEXTS, batch_size=1)
    assert perplexity(model, tok, TEXTS, batch_size=3) == pytest.approx(one, rel=1e-5)
    assert perplexity(model, tok, TEXTS, max_length=8) != pytest.approx(one, rel=1e-3)


def test_swapped_weights_restores_exactly(tiny_llama):
    model, _ = tiny_llama
    param = dict(model.named_parameters())[WEIGHT]
    before = param.detach().clone()
    new = torch.randn_like(before)
    with swapped_weights(model, {WEIGHT: new}):
        assert torch.equal(param, new)
    assert torch.equal(param, before)
    with pytest.raises(RuntimeError, match="boom"), swapped_weights(model, {WEIGHT: new}):
        raise RuntimeError("boom")
    assert torch.equal(param, before)
    with pytest.raises(KeyError), swapped_weights(model, {"no.such.weight": new}):
        pass


def test_mean_kl_zero_positive_and_by_hand(tiny):
    model, tok = tiny
    name = next(n for n, p in model.named_parameters() if p.ndim == 2 and ".1." in n)
    base = {name: dict(model.named_parameters())[name].detach().clone()}
    edited = {name: base[name] + 10 * torch.randn_like(base[name])}
    assert mean_kl(model, tok, TEXTS, base, base, batch_size=2) == pytest.approx(0.0, abs=1e-6)
    kl = mean_kl(model, tok, TEXTS[:1], base, edited)
    assert kl > 0
    assert torch.equal(dict(model.named_parameters())[name], base[name])  # model left as it was

    other = copy.deepcopy(model)
    with torch.no_grad():
        dict(other.named_parameters())[name].copy_(edited[name])
        ids = tok(TEXTS[0], return_tensors="pt")["input_ids"]
        p = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        q = torch.log_softmax(other(input_ids=ids).logits[0, :-1], -1)
    by_hand = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl == pytest.approx(by_hand, rel=1e-4)
    assert mean_kl(model, tok, TEXTS, base, edited, batch_size=3) == pytest.approx(
        mean_kl(model, tok, TEXTS, base, edited, batch_size=1), rel=1e-3
    )


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


def test_heldout_texts(tmp_path):
    lines = [" = Title = ", "", " short line ", " = = Section = = "]
    lines += [f" para {i} " + "x" * 50 for i in range(10)]
    path = tmp_path / "wiki.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    picked = heldout_texts(path, 4, min_chars=40, seed=1)
    assert len(picked) == 4 and all(t.startswith("para ") for t in picked)
    assert picked == heldout_texts(path, 4, min_chars=40, seed=1)
    assert heldout_texts(path, 10, min_chars=40) == [f"para {i} " + "x" * 50 for i in range(10)]
    with pytest.raises(ValueError):
        heldout_texts(path, 11, min_chars=40)
