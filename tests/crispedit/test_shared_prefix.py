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
