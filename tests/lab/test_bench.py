"""`crispedit bench`'s row on a tiny checkpoint and a data folder of its own: paired capability changes."""

import argparse
import json

import pytest
import torch
from conftest import save_tiny_checkpoint

from crispedit.cache import build_cache
from crispedit.requests import EditRequest
from lab.bench import (
    CACHE_REPS,
    DATASET_FILES,
    HELDOUT_TEXT,
    TRAIN_CORPUS,
    Bench,
    a_command,
    add_bench_parser,
    suite_sequential,
    suite_speed,
)
from lab.multiple_choice import MC_TASKS

FACTS = [EditRequest("The capital of France is", "Rome"), EditRequest("Hamlet was written by", "Madrid")]
MC_RECORDS = {
    "arc_easy": {"query": "Which is a planet?", "choices": ["Mars", "Moon"], "gold": 0},
    "arc_challenge": {"query": "Which is hot?", "choices": ["ice", "fire", "snow"], "gold": 1},
    "hellaswag": {"ctx": "A man opens the door. He", "endings": ["walks in.", "is a door."], "label": 0},
    "piqa": {"query": "Question: How to dry hands?\n", "choices": ["towel", "water"], "gold": 0},
    "boolq": {"query": "Passage: Water is wet.\nQuestion: is water wet?", "choices": ["no", "yes"], "gold": 1},
    "mmlu": {"subject": "astronomy", "question": "Closest star?", "choices": ["Sun", "Vega", "Sirius", "Rigel"],
             "answer": 0},
}


@pytest.fixture
def bench_args(tmp_path):
    data = tmp_path / "data"
    text = data / HELDOUT_TEXT
    text.parent.mkdir(parents=True)
    words = ["rivers", "towns", "people", "hills", "roads", "boats", "bridges", "fields", "markets", "songs"]
    text.write_text("\n".join(" ".join(words[(i * k) % 10] for k in range(60)) for i in range(1, 7)),
                    encoding="utf-8")
    for task, record in MC_RECORDS.items():
        path = data / MC_TASKS[task][0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    model = save_tiny_checkpoint(tmp_path / "tiny")
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    return parser.parse_args(["bench", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"),
                              "--layers", "1", "--ppl-texts", "4", "--mc-limit", "2", "--epochs", "5",
                              "--lr", "0.05", "--device", "cpu"])


def bench_with_cache(args, tmp_path):
    """A Bench, a small cache for its layers and a copy of its weights before any edit."""
    b = Bench(args)
    before = {n: p.clone() for n, p in b.model.named_parameters()}
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The river runs through the town and the people cross it every day. " * 40)
    cache = build_cache(b.model, b.tok, b.layers, str(corpus), n_samples=4, seq_len=16, progress=False)
    return b, cache, before


def test_row_reports_paired_changes_and_restores_the_model(bench_args, tmp_path):
    b, cache, before = bench_with_cache(bench_args, tmp_path)
    row = b.run(FACTS, cache, b.config(), generated=False)
    assert "ppl_terms" not in row and "mc_correct" not in row
    base = b.base_capability()
    assert row["ppl_change_pct"] == pytest.approx(100 * (row["perplexity"] / base["perplexity"] - 1), rel=1e-6)
    assert row["ppl_change_se"] > 0 and row["kl"] > 0
    assert row["mc_drop_points"] == pytest.approx(100 * (base["mc_mean"] - row["mc_mean"]))
    assert row["mc_drop_se"] >= 0
    assert all(torch.equal(p, before[n]) for n, p in b.model.named_parameters())
    # a later run in the same folder reads the base model's figures instead of scoring them again
    saved = list((tmp_path / "out").glob("base-*.json"))
    assert len(saved) == 1
    again = Bench(bench_args)
    again.capability = lambda *a, **k: pytest.fail("base figures scored again")
    assert again.base_capability() == base


def write_zsre_and_corpus(data) -> None:
    """Four ZsRE test records and a capability text file in the bench's data folder."""
    records = [{"src": f"Where does river {i} flow?", "alt": "north", "rephrase": "", "loc": "nq question: q",
                "loc_ans": "a"} for i in range(4)]
    (data / DATASET_FILES["zsre"]).parent.mkdir(parents=True)
    (data / DATASET_FILES["zsre"]).write_text(json.dumps(records), encoding="utf-8")
    (data / TRAIN_CORPUS).write_text("The river runs through the town and the people cross it. " * 200,
                                     encoding="utf-8")


def test_speed_suite_times_the_projection_inside_the_step(bench_args, tmp_path):
    write_zsre_and_corpus(tmp_path / "data")
    bench_args.samples, bench_args.seq_len, bench_args.reps, bench_args.batch_size = 4, 16, 3, 4
    b = Bench(bench_args)
    before = {n: p.clone() for n, p in b.model.named_parameters()}
    suite_speed(b)
    report = json.loads((tmp_path / "out" / "speed.json").read_text())
    row, times = report["row"], report["times"]
    assert len(times["crispedit_step_s"]) == len(times["projection_s"]) == 3
    assert all(0 < p < c for p, c in zip(times["projection_s"], times["crispedit_step_s"], strict=True))
    assert row["step_ratio_within"] > 1 and len(times["kfac_s_per_token"]) == CACHE_REPS
    assert all(torch.equal(p, before[n]) for n, p in b.model.named_parameters())
    bench_args.steps_only = True  # the steps alone: no cache-build passes timed
    suite_speed(Bench(bench_args))
    report = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert "cache_ratio" not in report["row"] and report["times"]["kfac_s_per_token"] == []
    assert len(report["times"]["crispedit_step_s"]) == 3


def test_one_edit_measured_at_several_scales(bench_args, tmp_path):
    """run_scaled measures W₀ + s·ΔW of one edit for each s: its full row is run's, a half edit drifts less."""
    b, cache, before = bench_with_cache(bench_args, tmp_path)
    full, half = b.run_scaled(FACTS, cache, b.config(), (1.0, 0.5), generated=False)
    assert (full["edit_scale"], half["edit_scale"]) == (1.0, 0.5)
    assert 0 < half["kl"] < full["kl"]
    alone = b.run(FACTS, cache, b.config(), generated=False)
    assert alone["kl"] == pytest.approx(full["kl"], rel=1e-4)
    assert all(torch.equal(p, before[n]) for n, p in b.model.named_parameters())


def test_edit_scale_flag_takes_a_list_and_refuses_shares_outside_0_1():
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    assert parser.parse_args(["bench", "--edit-scale", "1,0.8"]).edit_scale == (1.0, 0.8)
    for bad in ("0", "1.5", "1,x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "--edit-scale", bad])


def test_recorded_command_runs_as_written():
    """The command saved with a suite's results parses back to the same options (flags, lists)."""
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--subject-key", "--edit-scale", "1,0.8", "--layers", "4,5"])
    again = parser.parse_args(a_command(args).split()[1:])
    assert {k: v for k, v in vars(again).items() if k != "func"} == {k: v for k, v in vars(args).items()
                                                                     if k != "func"}


def test_sequential_suite_rows_per_text_beta_then_ft(bench_args, tmp_path):
    """Two rounds of two edits: a crispedit row per text β, sequential ft after them, MC on the test split, the
    base weights back; a sequential edit measured scaled is refused."""
    write_zsre_and_corpus(tmp_path / "data")
    a = bench_args
    a.split, a.rounds, a.chunk, a.seq_samples, a.seq_len, a.batch_size = "test", 2, 2, 4, 16, 2
    a.text_anchor_weights, a.text_anchors, a.text_anchor_len = "0,1", 4, 16
    b = Bench(a)
    before = {n: p.clone() for n, p in b.model.named_parameters()}
    suite_sequential(b)
    report = json.loads((tmp_path / "out" / "sequential.json").read_text())
    rows = report["rows"]
    assert [(r["method"], r["text_beta"]) for r in rows] == [("crispedit", 0.0), ("crispedit", 1.0), ("ft", 0.0)]
    assert all(r["edits"] == 4 and "mc_drop_points" in r and r["kl"] > 0 for r in rows)
    assert all(torch.equal(p, before[n]) for n, p in b.model.named_parameters())
    config = b.config(sequential_chunk=2)
    with pytest.raises(ValueError, match="measured unscaled"):
        b.run_scaled(b.requests("zsre")[:4], None, config, (1.0, 0.5))
