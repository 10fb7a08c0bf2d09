"""Edit-time augmentation (issue 8): model-written paraphrases and context prefixes, and training on them."""

import pytest
import torch
from conftest import CORPUS, FACTS, target_logprob

from crispedit.augment import (
    AUGMENTATIONS,
    QA_FORMS,
    augmented_prompts,
    completions,
    context_prefixes,
    keep_paraphrase,
    paraphrases,
    resolve_augment,
    sample_completions,
)
from crispedit.cache import build_cache
from crispedit.edit import EditConfig, edit
from crispedit.evaluate import QA_TEMPLATE
from crispedit.requests import EditRequest


def test_paraphrase_filter_keeps_the_subject_and_the_form():
    q = EditRequest("Who designed the Eiffel Tower?", "Gustave Eiffel", subject="Eiffel Tower")
    assert keep_paraphrase(q, " Who was the architect of the Eiffel Tower?\nQuestion: x") == \
        "Who was the architect of the Eiffel Tower?"
    assert keep_paraphrase(q, "Who designed the Eiffel Tower?") is None  # the prompt itself
    assert keep_paraphrase(q, "Who designed the tower in Paris?") is None  # subject lost
    assert keep_paraphrase(q, "The Eiffel Tower was designed by Gustave Eiffel.") is None  # an answer, not a question
    assert keep_paraphrase(q, "") is None
    s = EditRequest("The mother tongue of Danielle Darrieux is", "English")  # no subject: capitalised words
    assert keep_paraphrase(s, "Danielle Darrieux's native language is.") == "Danielle Darrieux's native language is"
    assert keep_paraphrase(s, "Her native language is") is None
    assert keep_paraphrase(s, "Danielle Darrieux " + "spoke " * 30) is None  # far longer than the prompt


def test_augmented_prompts_keep_the_target_and_end_with_the_prompt(tiny_llama):
    model, tok = tiny_llama
    torch.manual_seed(0)
    assert all(len(p.split()) >= 3 and "\n" not in p for p in context_prefixes(model, tok, n=4))
    variants = augmented_prompts(model, tok, FACTS, ("prefix",))
    assert len(variants) == len(FACTS)
    for request, mine in zip(FACTS, variants, strict=True):
        assert all(v.target == request.target and v.prompt.endswith(". " + request.prompt) for v in mine)
    rewrites = paraphrases(model, tok, FACTS, n=2)  # a random tiny model rarely passes the filter; none is the prompt
    assert len(rewrites) == len(FACTS)
    assert all(r.prompt not in kept for r, kept in zip(FACTS, rewrites, strict=True))
    with pytest.raises(ValueError, match="unknown augmentation"):
        augmented_prompts(model, tok, FACTS, ("backtranslate",))
    with pytest.raises(ValueError, match="unknown augmentation"):
        EditConfig(augment=("backtranslate",))


def test_qa_augmentation_frames_the_prompt_and_each_paraphrase_but_never_like_the_evaluation(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    framed = augmented_prompts(model, tok, FACTS, ("qa",))
    assert [[v.prompt for v in vs] for vs in framed] == [[f.format(q=r.prompt) for f in QA_FORMS] for r in FACTS]
    assert all(v.target == r.target for r, vs in zip(FACTS, framed, strict=True) for v in vs)
    assert QA_TEMPLATE not in QA_FORMS and all("Q: {q}" not in f for f in QA_FORMS)
    # a random tiny model's rewrites rarely pass the filter, so stand in for the model's paraphrases
    rewrites = [[f"In other words, {r.prompt}"] for r in FACTS]
    monkeypatch.setattr("crispedit.augment.paraphrases", lambda model, tok, requests: rewrites)
    both = augmented_prompts(model, tok, FACTS, ("paraphrase", "qa"))
    for r, mine, own in zip(FACTS, both, rewrites, strict=True):
        wordings = [r.prompt, *own]
        assert [v.prompt for v in mine] == own + [f.format(q=w) for w in wordings for f in QA_FORMS]


def test_edit_with_prefix_augmentation_trains_the_prefixed_prompts(tiny_llama, tmp_path):
    model, tok = tiny_llama
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 3))
    cache = build_cache(model, tok, (1, 2), str(corpus), n_samples=6, seq_len=16, progress=False)
    torch.manual_seed(0)
    variants = [v for vs in augmented_prompts(model, tok, FACTS, ("prefix",)) for v in vs]
    assert variants
    before = target_logprob(model, tok, variants)
    events = []
    edit(model, tok, FACTS, cache, EditConfig(lr=3e-2, max_epochs=20, energy=0.5, augment=("prefix",)),
         on_progress=events.append)
    assert events[0]["event"] == "augment" and events[0]["variants"] > 0
    assert target_logprob(model, tok, variants) > before + 1.0


def test_auto_augments_only_with_anchors():
    assert resolve_augment("auto", with_anchors=True) == AUGMENTATIONS  # the recipe of BENCHMARKS.md §12
    assert resolve_augment("auto", with_anchors=False) == ()  # alone it costs capability (§8)
    assert resolve_augment(" qa, prefix", with_anchors=False) == ("qa", "prefix")
    assert resolve_augment("", with_anchors=True) == ()
    with pytest.raises(ValueError, match="unknown augmentation"):
        resolve_augment("paraphrase,backtranslate", with_anchors=True)


def test_a_completion_ends_when_it_has_enough_and_the_others_run_on(tiny_llama):
    model, tok = tiny_llama
    texts = ["The capital of France is", "Water boils at", "The capital of France is"]
    greedy = completions(model, tok, texts, 8, sampled=False)
    assert greedy == [r[0] for r in sample_completions(model, tok, texts, 1, 8, temperature=None)]
    stopped = completions(model, tok, texts, 8, sampled=False, enough=[None, lambda text: len(text) > 0, None])
    assert stopped[0] == greedy[0] and stopped[2] == greedy[2]
    assert len(tok(stopped[1], add_special_tokens=False)["input_ids"]) <= 1 < len(tok(greedy[1])["input_ids"])


def test_copies_read_their_text_once_and_write_what_repeated_texts_write(tiny):
    model, tok = tiny
    texts = ["The capital of France is", "Water", "A list of metals: copper, iron,"]  # lengths differ: left padding
    for sampled in (False, True):
        torch.manual_seed(0)
        repeated = completions(model, tok, [t for t in texts for _ in range(3)], 6, sampled=sampled)
        torch.manual_seed(0)
        shared = completions(model, tok, texts, 6, sampled=sampled, copies=3)
        assert shared == repeated
    torch.manual_seed(0)
    assert len(set(completions(model, tok, texts[:1], 6, copies=8))) > 1  # the copies are draws, not one answer


def test_one_generation_writes_greedy_and_sampled_texts_each_to_its_own_length(tiny_llama):
    model, tok = tiny_llama
    texts = ["A list of metals: copper, iron,", "The capital of France is"]
    alone = completions(model, tok, texts[:1], 9, sampled=False)
    torch.manual_seed(0)
    mixed = completions(model, tok, texts, [9, 4], copies=[1, 5], greedy=[True, False], temperature=1.5)
    assert mixed[0] == alone[0]
    assert completions(model, tok, texts, [9, 4], sampled=False) == alone + completions(model, tok, texts[1:], 4,
                                                                                        sampled=False)
    assert len(set(mixed[1:])) > 1
    split = completions(model, tok, texts, [9, 4], copies=[1, 5], greedy=[True, False], batch_size=2)
    assert len(split) == 6 and split[0] == alone[0]  # a text whose copies exceed the batch still runs, alone
