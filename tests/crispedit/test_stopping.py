"""Stop strings compiled once per tokenizer: the same criterion for every generation, and the same answers."""

from transformers import StoppingCriteriaList

from crispedit import stopping
from crispedit.stopping import stop_strings


def test_one_criterion_per_tokenizer_and_strings(tiny_llama):
    _, tok = tiny_llama
    line = stop_strings(tok, ["\n"])
    assert stop_strings(tok, ["\n"]) is line
    assert stop_strings(tok, [".", "\n"]) is not line
    for k in range(stopping.KEPT):  # the least recently used list goes once more are compiled
        stop_strings(tok, [f"<{k}>"])
    assert stop_strings(tok, ["\n"]) is not line


def test_generation_stops_where_stop_strings_stops_it(tiny_llama):
    model, tok = tiny_llama
    ids = tok(["Say a word"], return_tensors="pt")
    common = dict(do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id, temperature=None, top_p=None,
                  top_k=None)
    written = model.generate(**ids, **common)[0, ids["input_ids"].shape[1] :].tolist()
    stops = [next(tok.decode([t]) for t in written[2:] if tok.decode([t]).isalnum())]  # a string it does write
    ours = model.generate(**ids, **common, stopping_criteria=StoppingCriteriaList([stop_strings(tok, stops)]))
    theirs = model.generate(**ids, **common, stop_strings=stops, tokenizer=tok)
    assert ours.shape[1] < ids["input_ids"].shape[1] + 12  # it did stop early
    assert ours.tolist() == theirs.tolist()
