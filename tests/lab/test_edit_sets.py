"""Editing benchmark loaders on small inline fixtures (plus one check on the shared files when present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crispedit.requests import EditRequest
from lab.edit_sets import DEFAULT_PATHS, load_edit_dataset, shared_data_dir

ZSRE = [
    {
        "subject": "Charity Creek",
        "src": "Which river system contains Charity Creek?",
        "pred": "Parramatta River",
        "rephrase": "What river system is Charity Creek in?",
        "alt": "Chichester River",
        "answers": ["Parramatta River"],
        "loc": "nq question: how many series of diary of a wimpy kid are there",
        "loc_ans": "12",
        "cond": "",
    },
    {"src": "Who founded Acme?", "alt": "", "rephrase": "x", "loc": "nq question: q", "loc_ans": "a"},
    {"src": "Capital of Spain?", "alt": "Madrid", "rephrase": "", "loc": "nq question: who", "loc_ans": "b"},
]

COUNTERFACT = [
    {
        "case_id": i,
        "prompt": f"Reedy Glacier {i} is in",
        "target_new": "Asia",
        "subject": "Reedy Glacier",
        "ground_truth": "Antarctica",
        "rephrase_prompt": f"Reedy Glacier {i} is located in the continent",
        "locality_prompt": "Mount Erebus, in",
        "locality_ground_truth": "Antarctica",
    }
    for i in range(5)
]

WIKIBIGEDIT = [
    {
        "prompt": "In which county is Crailing Parish Church located?",
        "target_new": "Roxburghshire",
        "subject": "Crailing Parish Church",
        "rephrase_prompt": "Where can Crailing Parish Church be found?",
        "locality_prompt": "In which historic county is Carriden Parish Church located?",
        "locality_ground_truth": "West Lothian",
    },
    {"prompt": "", "target_new": "Nowhere", "rephrase_prompt": "", "locality_prompt": ""},
]


def write_json(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_zsre_mapping_and_skips_empty_target(tmp_path, caplog):
    reqs = load_edit_dataset("zsre", write_json(tmp_path / "z.json", ZSRE))
    assert len(reqs) == 2 and "skipped 1" in caplog.text
    assert reqs[0] == EditRequest(
        prompt="Which river system contains Charity Creek?",
        target="Chichester River",
        rephrases=("What river system is Charity Creek in?",),
        locality_prompt="How many series of diary of a wimpy kid are there?",
        locality_answer="12",
        subject="Charity Creek",  # kept for paraphrase augmentation
    )
    assert reqs[1].rephrases == () and reqs[1].locality_prompt == "Who?"


def test_counterfact_mapping_and_slicing(tmp_path):
    path = write_json(tmp_path / "cf.json", COUNTERFACT)
    reqs = load_edit_dataset("counterfact", path, n=2, offset=1)
    assert [r.prompt for r in reqs] == ["Reedy Glacier 1 is in", "Reedy Glacier 2 is in"]
    r = reqs[0]
    assert r.target == "Asia" and r.rephrases == ("Reedy Glacier 1 is located in the continent",)
    assert (r.locality_prompt, r.locality_answer) == ("Mount Erebus, in", "Antarctica")
    assert len(load_edit_dataset("counterfact", path)) == 5
    assert len(load_edit_dataset("counterfact", path, offset=3)) == 2
    assert load_edit_dataset("counterfact", path, n=0) == []


def test_wikibigedit_mapping_skips_empty_prompt(tmp_path):
    reqs = load_edit_dataset("wikibigedit", write_json(tmp_path / "w.json", WIKIBIGEDIT))
    assert len(reqs) == 1
    assert reqs[0].target == "Roxburghshire" and reqs[0].locality_answer == "West Lothian"
    assert reqs[0].subject == "Crailing Parish Church"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="counterfact.*wikibigedit.*zsre"):
        load_edit_dataset("mquake")


def test_default_path_and_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CRISPEDIT_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    write_json(tmp_path / DEFAULT_PATHS["counterfact"], COUNTERFACT)
    assert len(load_edit_dataset("counterfact", n=3)) == 3
    monkeypatch.setenv("CRISPEDIT_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="CRISPEDIT_DATA"):
        shared_data_dir()


def test_real_shared_files_when_present(monkeypatch):
    monkeypatch.delenv("CRISPEDIT_DATA", raising=False)
    try:
        root = shared_data_dir()
    except FileNotFoundError:
        pytest.skip("shared data folder not present")
    for name, rel in DEFAULT_PATHS.items():
        if not (root / rel).exists():
            pytest.skip(f"{rel} not present")
        reqs = load_edit_dataset(name, n=50)
        assert len(reqs) == 50 and all(r.locality_prompt and r.locality_answer for r in reqs)
    assert load_edit_dataset("zsre", n=1)[0].target == "Chichester River"


def test_our_own_facts_are_pairs_from_a_given_file(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([["What is the capital of Japan?", "Seoul"], ["Who wrote Hamlet?", ""]]))
    assert load_edit_dataset("facts", path) == [EditRequest("What is the capital of Japan?", "Seoul")]
    with pytest.raises(ValueError, match="give its path"):
        load_edit_dataset("facts")
    facts = load_edit_dataset("facts", Path(__file__).parents[2] / "lab" / "tuning_facts.json")
    assert len(facts) == 8 and all(f.prompt.endswith("?") and f.target for f in facts)
