"""An edit batch as one packed sequence: no padding, and a beginning that rows share is read once.

A right-padded batch spends a forward and backward pass on every pad: an edit trained in its plain form ("The capital
of France is Rome", a dozen tokens) beside its chat form (forty, most of them SmolLM2's default system prompt) is
padded to forty. Packed, each row's tokens follow one another in a single sequence, and rows that begin alike (the
chat template's system prompt) keep that beginning once. A mask lets every token attend to its own row's earlier
tokens only (the shared beginning included), and positions count within each row, so each token's hidden state,
and so the loss and its gradient, are those of the padded batch (a tree of rows, as in tree attention).
"""

from __future__ import annotations

import torch

from crispedit.requests import IGNORE

MIN_SHARED = 8  # a shorter shared beginning (a common first word) saves less than a group costs to find


def pack(batch: dict, key: torch.Tensor | None = None) -> dict:
    """A right-padded batch (``tokenize_edit_batch``) as one sequence. Returns

    - ``input_ids``, ``position_ids`` (1, L); ``attention_mask`` (1, 1, L, L), 0 where a token may attend, else the
      dtype's minimum, added to the attention scores (in float32: ``target_nll`` casts it to the model's dtype);
    - ``predicts`` (1, L) bool: the positions whose next token in their row is a target token, and ``targets``,
      those tokens in the same order, with ``owners``, the row each is from;
    - ``key``: the subject key's mask (batch, T) laid out the same way (1, L), or None.

    Rows whose first ``MIN_SHARED`` tokens (and key values) agree share their common beginning, up to the first
    position that predicts a target in any of them.
    """
    ids, real, labels = batch["input_ids"].cpu(), batch["attention_mask"].cpu(), batch["labels"].cpu()
    rows, nexts, firsts = [], [], []  # each row's tokens, the label each position predicts, its first target
    for i in range(ids.shape[0]):
        n = int(real[i].sum())
        rows.append(ids[i, :n].tolist())
        nexts.append(labels[i, 1:n].tolist())
        firsts.append(next((t for t, label in enumerate(nexts[i]) if label != IGNORE), n))
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        head = tuple(row[:MIN_SHARED]) + (tuple(key[i, :MIN_SHARED].tolist()) if key is not None else ())
        groups.setdefault(head if firsts[i] >= MIN_SHARED else ("alone", i), []).append(i)

    tokens: list[int] = []
    positions: list[int] = []
    block: list[int] = []  # each packed token's block: its row i, or len(rows) + g for group g's shared beginning
    sees: list[int] = []  # the other block a token may attend to: its row's shared beginning (-1: a beginning's own)
    where: list[list[int]] = [[] for _ in rows]  # packed index of each row's tokens
    for g, members in enumerate(groups.values()):
        shared = shared_length([rows[i] for i in members], [firsts[i] for i in members],
                               None if key is None else key[members])
        start = len(tokens)
        tokens += rows[members[0]][:shared]
        positions += range(shared)
        block += [len(rows) + g] * shared
        sees += [-1] * shared
        for i in members:
            own = len(rows[i]) - shared
            where[i] = list(range(start, start + shared)) + list(range(len(tokens), len(tokens) + own))
            tokens += rows[i][shared:]
            positions += range(shared, len(rows[i]))
            block += [i] * own
            sees += [len(rows) + g] * own  # no token is in that block when nothing is shared

    length = len(tokens)
    query_block, query_sees = torch.tensor(block)[:, None], torch.tensor(sees)[:, None]
    key_block = torch.tensor(block)[None, :]
    allowed = ((key_block == query_block) | (key_block == query_sees)) & torch.ones(length, length).tril().bool()
    mask = torch.zeros(1, 1, length, length)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)

    predicts = torch.zeros(1, length, dtype=torch.bool)
    target_at: dict[int, tuple[int, int]] = {}  # packed position → (the target it predicts, its row)
    packed_key = None if key is None else torch.zeros(1, length)
    for i, row in enumerate(rows):
        target_at.update({where[i][t]: (label, i) for t, label in enumerate(nexts[i]) if label != IGNORE})
        if packed_key is not None:
            packed_key[0, where[i]] = key[i, : len(row)].to(packed_key.dtype)
    predicts[0, list(target_at)] = True
    device = batch["input_ids"].device
    return {
        "input_ids": torch.tensor([tokens], device=device),
        "position_ids": torch.tensor([positions], device=device),
        "attention_mask": mask.to(device),
        "predicts": predicts.to(device),
        "targets": torch.tensor([target_at[p][0] for p in sorted(target_at)], device=device),
        "owners": torch.tensor([target_at[p][1] for p in sorted(target_at)], device=device),
        "key": None if packed_key is None else packed_key.to(device),
    }


def shared_length(rows: list[list[int]], firsts: list[int], key: torch.Tensor | None) -> int:
    """How many leading tokens the rows can share: their common beginning, stopping before the first position
    that predicts a target (a row's own loss starts there) and where their key values differ; 0 for one row."""
    if len(rows) < 2:
        return 0
    n = 0
    limit = min(firsts)
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        if key is not None and not bool((key[:, n] == key[0, n]).all()):
            break
        n += 1
    return n if n >= MIN_SHARED else 0
