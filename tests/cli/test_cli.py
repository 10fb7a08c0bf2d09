"""The ``crispedit`` command line contract, on a tiny model saved as a local checkpoint folder."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, make_tiny


def crispedit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    model, tok = make_tiny("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_build_cache_edit_eval(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from crispedit.arch import Recipe

    cache = tmp_path / "cache.safetensors"
    run = crispedit("build-cache", "--model", str(tiny_dir), "--corpus", str(FIXTURES / "corpus.txt"),
                    "--samples", "4", "--seq-len", "32", "--layers", "1,2", "--out", str(cache))
    assert run.returncode == 0, run.stderr
    assert cache.exists() and "curvature cache for layers [1, 2]" in run.stderr

    out = tmp_path / "edited"
    run = crispedit("edit", "--model", str(tiny_dir), "--cache", str(cache), "--edits", str(FIXTURES / "facts.jsonl"),
                    "--lr", "0.03", "--epochs", "5", "--out", str(out))
    assert run.returncode == 0, run.stderr
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    edited = AutoModelForCausalLM.from_pretrained(out)
    base_params = dict(base.named_parameters())
    changed = {n for n, p in edited.named_parameters() if not torch.equal(p, base_params[n])}
    assert changed == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    report = json.loads((out / "crispedit_edit.json").read_text())
    assert report["edits"] == 3 and report["config"]["method"] == "crispedit"
    # the defaults: text anchors from the cache's own text file (β 10); no augmentation without --anchors
    assert report["config"]["text_anchor_weight"] == Recipe().text_anchor_weight and report["config"]["augment"] == []
    run = crispedit("edit", "--model", str(tiny_dir), "--cache", str(cache), "--edits", str(FIXTURES / "facts.jsonl"),
                    "--epochs", "1", "--text-anchors", "none", "--augment", "", "--energy", "0.9",
                    "--out", str(tmp_path / "paper"))
    assert run.returncode == 0, run.stderr
    config = json.loads((tmp_path / "paper" / "crispedit_edit.json").read_text())["config"]
    assert config["text_anchor_weight"] == 0 and config["energy"] == 0.9

    run = crispedit("eval", "--model", str(out), "--base", str(tiny_dir), "--edits", str(FIXTURES / "facts.jsonl"),
                    "--no-generate")
    assert run.returncode == 0, run.stderr
    metrics = json.loads(run.stdout)
    assert 0.0 <= metrics["rel_tf"] <= 1.0 and "loc_tf_agree" in metrics


def test_clear_errors(tiny_dir, tmp_path):
    other_dir = tmp_path / "other"
    other, tok = make_tiny("llama", seed=5)
    other.save_pretrained(other_dir)
    tok.save_pretrained(other_dir)
    cache = tmp_path / "c.safetensors"
    assert crispedit("build-cache", "--model", str(other_dir), "--corpus", str(FIXTURES / "corpus.txt"),
                     "--samples", "2", "--seq-len", "16", "--layers", "1", "--out", str(cache)).returncode == 0
    edits = str(FIXTURES / "facts.jsonl")
    run = crispedit("edit", "--model", str(tiny_dir), "--cache", str(cache), "--edits", edits,
                    "--out", str(tmp_path / "x"))
    assert run.returncode == 2 and "built for another model" in run.stderr
    run = crispedit("edit", "--model", str(tiny_dir), "--edits", edits, "--out", str(tmp_path / "x"))
    assert run.returncode != 0 and "needs --cache" in run.stderr
    run = crispedit("build-cache", "--model", "nosuchmodel", "--out", str(cache))
    assert run.returncode == 2 and "unknown model" in run.stderr
    run = crispedit("build-cache", "--model", str(tiny_dir), "--layers", "1,99", "--corpus",
                    str(FIXTURES / "corpus.txt"), "--out", str(cache))
    assert run.returncode == 2 and "has layers 0..2" in run.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "The sky is", "target": ""}\n')
    run = crispedit("edit", "--model", str(tiny_dir), "--method", "ft", "--edits", str(bad),
                    "--out", str(tmp_path / "y"))
    assert run.returncode == 2 and "bad.jsonl:1" in run.stderr and "target" in run.stderr
    assert not (tmp_path / "y").exists()
    run = crispedit("edit", "--model", str(tiny_dir), "--method", "ft", "--edits", edits, "--epochs", "0",
                    "--out", str(tmp_path / "z"))
    assert run.returncode == 2 and "max_epochs must be positive" in run.stderr
    assert not (tmp_path / "z").exists()


def test_mixed_corpus_mix_cache_and_augmented_edit(tiny_dir, tmp_path):
    from crispedit.arch import Recipe
    from crispedit.cache import CurvatureCache

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who wrote Hamlet?\nWhat is the capital of Spain?\n")
    corpus = str(FIXTURES / "corpus.txt")
    mixed, text, raw = (tmp_path / f"{n}.safetensors" for n in ("mixed", "text", "raw"))
    common = ("--model", str(tiny_dir), "--samples", "2", "--seq-len", "16", "--layers", "1,2")
    assert crispedit("build-cache", *common, "--corpus", f"{corpus}=3,self-raw:{prompts}=1",
                     "--out", str(mixed)).returncode == 0
    for source, out in ((corpus, text), (f"self-raw:{prompts}", raw)):
        assert crispedit("build-cache", *common, "--corpus", source, "--out", str(out)).returncode == 0
    recombined = tmp_path / "recombined.safetensors"
    run = crispedit("mix-cache", f"{text}=3", f"{raw}=1", "--out", str(recombined))
    assert run.returncode == 0, run.stderr
    a, b = CurvatureCache.load(mixed), CurvatureCache.load(recombined)
    assert [p["weight"] for p in a.meta["parts"]] == [3.0, 1.0]
    for name in a.factors:  # building the mixture at once equals mixing the parts' caches afterwards
        torch.testing.assert_close(a.factors[name].A, b.factors[name].A)
        torch.testing.assert_close(a.factors[name].S, b.factors[name].S)

    out, anchors, bad = tmp_path / "edited", tmp_path / "anchors.jsonl", tmp_path / "bad.jsonl"
    anchors.write_text('{"prompt": "Who wrote Hamlet?", "answer": "Shakespeare"}\n')
    bad.write_text('{"prompt": "Who wrote Hamlet?"}\n')
    run = crispedit("edit", "--model", str(tiny_dir), "--cache", str(mixed), "--edits", str(FIXTURES / "facts.jsonl"),
                    "--lr", "0.03", "--epochs", "3", "--augment", "prefix", "--anchors", str(anchors),
                    "--text-anchors", corpus, "--subject-key", "--seed", "3", "--out", str(out))
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "crispedit_edit.json").read_text())
    assert report["config"]["augment"] == ["prefix"] and report["config"]["subject_key"] is True
    assert report["config"]["seed"] == 3
    assert report["config"]["anchor_weight"] == 1.0  # the tuned β, since --anchors was given
    assert report["config"]["text_anchor_weight"] == Recipe().text_anchor_weight  # likewise for --text-anchors
    assert [int(n.split(".")[2]) for n in report["changed"]] == report["layers"]
    run = crispedit("edit", "--model", str(tiny_dir), "--cache", str(mixed), "--edits", str(FIXTURES / "facts.jsonl"),
                    "--augment", "backtranslate", "--out", str(tmp_path / "z"))
    assert run.returncode != 0 and "unknown augmentation" in run.stderr
    run = crispedit("edit", "--model", str(tiny_dir), "--cache", str(mixed), "--edits", str(FIXTURES / "facts.jsonl"),
                    "--anchors", str(bad), "--anchor-weight", "1", "--out", str(tmp_path / "w"))
    assert run.returncode != 0 and "bad.jsonl:1: expected" in run.stderr
    run = crispedit("edit", "--model", str(tiny_dir), "--cache", str(mixed), "--edits", str(FIXTURES / "facts.jsonl"),
                    "--text-anchor-weight", "1", "--out", str(tmp_path / "v"))
    assert run.returncode != 0 and "--text-anchor-weight needs --text-anchors" in run.stderr


def test_the_subject_key_is_on_with_the_neighbours_and_can_be_turned_off():
    from cli.main import build_parser, edit_config

    model, tok = make_tiny("llama")
    parse = build_parser().parse_args
    base = ["edit", "--edits", "x.jsonl", "--out", "o"]
    assert edit_config(parse(base), model, tok).subject_key is True
    assert edit_config(parse([*base, "--no-neighbours"]), model, tok).subject_key is False
    assert edit_config(parse([*base, "--no-subject-key"]), model, tok).subject_key is False


def test_the_keyed_solve_and_its_earlier_stop_come_with_the_key_and_can_be_turned_off():
    from cli.main import build_parser, edit_config

    model, tok = make_tiny("llama")
    parse = build_parser().parse_args
    base = ["edit", "--edits", "x.jsonl", "--out", "o"]
    on = edit_config(parse(base), model, tok)
    assert on.keyed_solve is True and on.early_stop == 0.1 and on.key_variants == ("prefix",)
    assert on.max_epochs == 40 and edit_config(parse([*base, "--epochs", "30"]), model, tok).max_epochs == 30
    for off in (["--no-neighbours"], ["--no-subject-key"], ["--no-keyed-solve"]):
        config = edit_config(parse([*base, *off]), model, tok)
        assert config.keyed_solve is False and config.early_stop is None and config.key_variants == (), off
        assert config.max_epochs == 25, off
    with pytest.raises(ValueError, match="subject_key"):
        edit_config(parse([*base, "--no-subject-key", "--keyed-solve"]), model, tok)


def test_an_option_left_out_takes_the_models_recipe_as_the_worker_does():
    """The command line and the worker resolve defaults in one place: recommended_config."""
    from cli.main import build_parser, edit_config
    from crispedit.recipe import recommended_config

    model, tok = make_tiny("llama")
    args = build_parser().parse_args(["edit", "--edits", "x.jsonl", "--out", "o", "--augment", "auto"])
    assert edit_config(args, model, tok) == recommended_config(model, tok)
    config = edit_config(build_parser().parse_args(["edit", "--edits", "x", "--out", "o", "--batch-size", "7"]),
                         model, tok)
    assert config.batch_size == 7 and recommended_config(model, tok).batch_size == 4  # a CPU's


def test_version_and_the_registry_root_from_the_setting(monkeypatch, tmp_path):
    from cli.main import build_parser

    run = crispedit("--version")
    assert run.returncode == 0 and run.stdout.startswith("crispedit 0.")
    monkeypatch.setenv("CRISPEDIT_REGISTRY_ROOT", str(tmp_path / "reg"))
    args = build_parser().parse_args(["registry", "log", "--model", "tiny"])
    assert args.root == str(tmp_path / "reg")  # what the service reads, so no --root is needed


def test_every_flag_has_help_with_its_default():
    import argparse

    from cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"build-cache", "edit", "eval", "registry", "serve", "config", "worker"} <= set(commands)
    for name, command in commands.items():
        text = command.format_help()
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            shown = action.default is not None and action.default is not False and action.option_strings
            if shown:  # its help line, through to the next option, names the default
                flag = action.option_strings[0]
                entry = text[text.index(f"  {flag}"):].split("\n  -")[0]
                assert "default" in entry, f"{name} {flag}: {entry}"
