"""Edit requests and how they are tokenised for the edit loss (arXiv 2602.15823, L_edit of Eq. 1, Alg. 1).

Like the paper's code: the target gets a leading space, sequences are right padded with an existing
token (eos), and the loss covers the target tokens only (prompt and padding are labelled -100).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` should be completed by ``target``. The rest is for evaluation."""

    prompt: str
    target: str
    rephrases: tuple[str, ...] = field(default_factory=tuple)
    locality_prompt: str | None = None
    locality_answer: str | None = None
    subject: str | None = None  # what the prompt is about; paraphrase augmentation keeps it
    chat_target: str | None = None  # the answer in the chat form, if not the bare target (neighbours.in_kind)

    def __post_init__(self) -> None:
        for name in ("prompt", "target"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"edit request field {name!r} must be a non-empty string, got {value!r}")
        object.__setattr__(self, "rephrases", tuple(r for r in self.rephrases if r and r.strip()))

    @property
    def spaced_target(self) -> str:
        """The target as it follows the prompt: with a leading space, unless the prompt ends in whitespace
        (a chat-template prompt ends with a newline, after which the answer starts directly)."""
        if self.target.startswith(" ") or self.prompt[-1:].isspace():
            return self.target
        return " " + self.target

    def in_chat_form(self, tokenizer) -> EditRequest:
        """The same fact asked through the tokenizer's chat template (user turn = prompt, answer = target)."""
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": self.prompt}], tokenize=False,
                                               add_generation_prompt=True)
        return EditRequest(prompt=prompt, target=(self.chat_target or self.target).strip(), subject=self.subject)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rephrases"] = list(self.rephrases)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EditRequest:
        unknown = set(d) - {"prompt", "target", "rephrases", "locality_prompt", "locality_answer", "subject",
                            "chat_target"}
        if unknown:
            raise ValueError(f"unknown edit request fields {sorted(unknown)}")
        rephrases = d.get("rephrases") or ()
        if isinstance(rephrases, str):
            rephrases = (rephrases,)
        return cls(
            prompt=d.get("prompt", ""),
            target=d.get("target", ""),
            rephrases=tuple(rephrases),
            locality_prompt=d.get("locality_prompt"),
            locality_answer=d.get("locality_answer"),
            subject=d.get("subject"),
            chat_target=d.get("chat_target"),
        )


def read_edits_jsonl(path: str | Path) -> list[EditRequest]:
    """EDITS.jsonl: ``{"prompt", "target", "rephrases"?, "locality_prompt"?, "locality_answer"?, "subject"?}`` lines."""
    out: list[EditRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(EditRequest.from_dict(json.loads(line)))
            except (ValueError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}:{lineno}: {err}") from err
    if not out:
        raise ValueError(f"{path} holds no edit requests")
    return out



def tokenize_edit_batch(tokenizer, requests: Sequence[EditRequest], device: torch.device | str = "cpu") -> dict:
    """``prompt + " target"``, right padded; labels are the target tokens, everything else -100.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each (batch, max_len).
    """
    texts = [r.prompt + r.spaced_target for r in requests]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = IGNORE
    for i, r in enumerate(requests):
        prompt_len = len(tokenizer(r.prompt)["input_ids"])
        labels[i, :prompt_len] = IGNORE
    if (labels != IGNORE).sum(dim=1).eq(0).any():
        raise ValueError("an edit target produced no tokens after its prompt; check the target text")
    return {k: v.to(device) for k, v in {**enc, "labels": labels}.items()}


def target_nll(model, packed: dict) -> torch.Tensor:
    """Mean cross-entropy over the target tokens: the edit loss L_edit of Eq. 1, on a batch that
    ``crispedit.packing.pack`` laid out as one sequence (the padded batch's loss and gradient, without its pads).

    Logits are taken only at the positions that predict a target token: the vocabulary projection of every
    other position (the question, a chat template's system prompt) is a fifth of the pass, forward and backward,
    and no term of the loss."""
    dtype = next(model.parameters()).dtype
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                   attention_mask=packed["attention_mask"].to(dtype), logits_to_keep=packed["predicts"]).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # a bf16 model's loss in fp32
    return F.cross_entropy(logits, packed["targets"])


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, T) bool: the positions whose next token is a target token (label ≠ IGNORE)."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE
    return predicts
