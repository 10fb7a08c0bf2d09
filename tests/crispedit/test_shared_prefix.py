"""Generation with the common prefix read once: each row writes what it writes alone."""

import torch

from crispedit.shared_prefix import common_prefix, generate_rows

SYSTEM = "You are a helpful assistant. Answer in one line.\nQuestion: "
QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "Name a metal used in coins and wires today"]


def test_common_prefix_leaves_each_row_a_token():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix([[7, 8, 9], [7, 8, 9]]) == 2
    assert common_prefix([[1, 2], [3, 4]]) == 0


def test_rows_write_what_they_write_alone(tiny):
    model, tok = tiny
    rows = [tok(SYSTEM + q)["input_ids"] for q in QUESTIONS]
    assert common_prefix(rows) >= len(tok(SYSTEM)["input_ids"]) - 1
    ids, width = generate_rows(model, rows, tok.pad_token_id, do_sample=False, max_new_tokens=6, temperature=None,
                               top_p=None, top_k=None)
    assert width == max(len(r) for r in rows)
    for row, written in zip(rows, ids[:, width:].tolist(), strict=True):
        alone = model.generate(input_ids=torch.tensor([row]), do_sample=False, max_new_tokens=6,
                               pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
        assert written == alone[0, len(row) :].tolist()


def test_each_row_its_own_copies_and_greedy_rows_beside_sampled_ones(tiny):
    model, tok = tiny
    rows = [tok(SYSTEM + q)["input_ids"] for q in QUESTIONS]
    greedy_options = dict(do_sample=False, max_new_tokens=6, temperature=None, top_p=None, top_k=None)
    alone, width = generate_rows(model, rows, tok.pad_token_id, **greedy_options)
    ids, same_width = generate_rows(model, rows, tok.pad_token_id, copies=[1, 3, 2], **greedy_options)
    assert same_width == width and ids.shape[0] == 6
    assert ids[:, width:].tolist() == alone[[0, 1, 1, 1, 2, 2], width:].tolist()
    torch.manual_seed(0)
    mixed, _ = generate_rows(model, rows, tok.pad_token_id, copies=[4, 1, 4], greedy=[False, True, False],
                             do_sample=True, max_new_tokens=6, temperature=1.5, top_p=0.95, top_k=0)
    assert mixed[4, width:].tolist() == alone[1, width:].tolist()  # the greedy row, amid sampled ones
    assert len({tuple(r) for r in mixed[:4, width:].tolist()}) > 1  # the others are draws
