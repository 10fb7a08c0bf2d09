"""Edit-quality metrics on a tiny model: agreement with itself is perfect, and an edit moves the metrics."""

import torch

from crispedit.evaluate import cut_answer, edit_quality, locality_reference, match_scores, normalize_answer
from crispedit.requests import EditRequest

REQUESTS = [
    EditRequest("The capital of France is", "Rome", rephrases=("France's capital city is",),
                locality_prompt="Hamlet was written by", locality_answer="Shakespeare"),
    EditRequest("The chemical symbol for gold is", "Ag", locality_prompt="Water boils at", locality_answer="100"),
]


def test_normalisation_and_matching():
    assert normalize_answer(" The  Eiffel-Tower. ") == "eiffeltower"
    assert cut_answer(" Paris. It is big\nmore") == "Paris"
    assert match_scores(["the Paris", "Rome city"], ["Paris", "Rome"]) == (0.5, 1.0)


def test_the_unedited_model_agrees_with_itself_everywhere(tiny_llama):
    model, tok = tiny_llama
    reference = locality_reference(model, tok, REQUESTS)
    assert reference.generated_qa is not None and len(reference.generated_qa) == 2
    metrics = edit_quality(model, tok, REQUESTS, reference)
    for key in ("loc_tf_agree", "loc_gen_agree", "loc_qa_agree"):
        assert metrics[key] == 1.0, key
    for key in ("rel_tf", "gen_tf", "loc_tf_acc", "rel_nc_em", "gen_qa_contains", "loc_qa_acc"):
        assert 0.0 <= metrics[key] <= 1.0, key


def test_a_changed_model_no_longer_agrees(tiny_llama):
    model, tok = tiny_llama
    reference = locality_reference(model, tok, REQUESTS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    metrics = edit_quality(model, tok, REQUESTS, reference)
    assert metrics["loc_tf_agree"] < 1.0
