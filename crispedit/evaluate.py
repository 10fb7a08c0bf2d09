"""Edit quality: reliability, generality and locality, teacher-forced and generated, as the paper reports them.

- Teacher-forced (paper Table 3, MEMIT/ROME style): mean over target tokens of argmax == target token,
  given ``prompt + " " + target``.
- Generated (the WILD protocol, with exact match in place of the LLM judge): greedy decoding, at most 40
  new tokens, cut at the first "." or newline; normalised exact match and containment of the target.
  Each with no context (the question as is) and with the QA template ``QA_TEMPLATE``.
- Locality: agreement with the base model (teacher-forced tokens, and generated answers with no context
  and with the QA template) on unrelated prompts, and accuracy against their ground-truth answers.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import StoppingCriteriaList

from crispedit.requests import EditRequest, target_positions, tokenize_edit_batch
from crispedit.stopping import stop_strings

QA_TEMPLATE = "Please answer the question:\n\nQ: {q}\nA:"
MAX_NEW_TOKENS = 40


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@torch.no_grad()
def teacher_forced_predictions(
    model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> list[tuple[list[int], list[int]]]:
    """For each (prompt, target): (argmax token at each target position, the target tokens)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = zip(prompts[i : i + batch_size], targets[i : i + batch_size], strict=True)
        reqs = [EditRequest(p, t) for p, t in chunk]
        batch = tokenize_edit_batch(tokenizer, reqs, device)
        predicts = target_positions(batch["labels"])  # logits only where a target token is predicted
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=predicts).logits
        sizes = predicts.sum(1).tolist()
        predicted = logits.argmax(-1).split(sizes)
        labels = batch["labels"][:, 1:][predicts[:, :-1]].split(sizes)
        out += [(p.tolist(), t.tolist()) for p, t in zip(predicted, labels, strict=True)]
    return out


def token_accuracy(pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
    return [sum(p == t for p, t in zip(pred, tgt, strict=True)) / len(tgt) for pred, tgt in pairs]


def cut_answer(text: str) -> str:
    """The continuation up to (not including) the first "." or newline, as the WILD protocol stops."""
    return re.split(r"[.\n]", text, maxsplit=1)[0].strip()


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 32) -> list[str]:
    """Greedy answers, at most 40 new tokens, stopping at "." or newline (left padding for generation)."""
    device = next(model.parameters()).device
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True, padding_side="left")
        enc = {k: v.to(device) for k, v in enc.items()}
        generated = model.generate(
            **enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([stop_strings(tokenizer, [".", "\n"])]), temperature=None,
            top_p=None, top_k=None,
        )
        continuations = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.extend(cut_answer(c) for c in continuations)
    return answers


def match_scores(answers: Sequence[str], targets: Sequence[str]) -> tuple[float, float]:
    """(exact match, containment) rates after normalisation."""
    pairs = [(normalize_answer(a), normalize_answer(t)) for a, t in zip(answers, targets, strict=True)]
    exact = sum(a == t for a, t in pairs) / len(pairs)
    contains = sum(bool(t) and t in a for a, t in pairs) / len(pairs)
    return exact, contains


@dataclass
class LocalityReference:
    """The base model's behaviour on the locality prompts, to measure what an edit changed."""

    teacher_forced: list[list[int]]
    generated: list[str]
    generated_qa: list[str] | None = None  # answers with the QA template


def locality_items(requests: Sequence[EditRequest]) -> list[EditRequest]:
    return [r for r in requests if r.locality_prompt and r.locality_answer]


def locality_reference(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], generated: bool = True
) -> LocalityReference:
    """Record the (base) model's locality predictions before an edit (teacher-forced only without ``generated``)."""
    items = locality_items(requests)
    prompts = [r.locality_prompt for r in items]
    tf = [pred for pred, _ in teacher_forced_predictions(model, tokenizer, prompts, [r.locality_answer for r in items])]
    if not generated:
        return LocalityReference(tf, [])
    return LocalityReference(tf, generate_answers(model, tokenizer, prompts),
                             generate_answers(model, tokenizer, [QA_TEMPLATE.format(q=p) for p in prompts]))


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def edit_accuracy(model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> list[float]:
    """Each edit's reliability: the teacher-forced token accuracy of its target after its prompt."""
    return token_accuracy(teacher_forced_predictions(model, tokenizer, [r.prompt for r in requests],
                                                     [r.target for r in requests]))


def edit_quality(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    reference: LocalityReference | None = None,
    generated: bool = True,
) -> dict[str, float | None]:
    """Reliability, generality and locality metrics for ``requests`` on the model as it is now."""
    prompts = [r.prompt for r in requests]
    targets = [r.target for r in requests]
    rephrased = [(q, r.target) for r in requests for q in r.rephrases]
    metrics: dict[str, float | None] = {
        "rel_tf": mean(edit_accuracy(model, tokenizer, requests)),
        "gen_tf": None,
    }
    if rephrased:
        pairs = teacher_forced_predictions(model, tokenizer, [q for q, _ in rephrased], [t for _, t in rephrased])
        metrics["gen_tf"] = mean(token_accuracy(pairs))
    items = locality_items(requests)
    if items:
        tf = teacher_forced_predictions(
            model, tokenizer, [r.locality_prompt for r in items], [r.locality_answer for r in items]
        )
        metrics["loc_tf_acc"] = mean(token_accuracy(tf))
        if reference is not None:
            metrics["loc_tf_agree"] = mean(token_accuracy(
                [(pred, base) for (pred, _), base in zip(tf, reference.teacher_forced, strict=True)]
            ))
    if not generated:
        return metrics
    for context, wrap in (("nc", lambda q: q), ("qa", lambda q: QA_TEMPLATE.format(q=q))):
        answers = generate_answers(model, tokenizer, [wrap(p) for p in prompts])
        metrics[f"rel_{context}_em"], metrics[f"rel_{context}_contains"] = match_scores(answers, targets)
        if rephrased:
            answers = generate_answers(model, tokenizer, [wrap(q) for q, _ in rephrased])
            metrics[f"gen_{context}_em"], metrics[f"gen_{context}_contains"] = match_scores(
                answers, [t for _, t in rephrased]
            )
    if items:
        answers = generate_answers(model, tokenizer, [r.locality_prompt for r in items])
        metrics["loc_gen_acc"] = match_scores(answers, [r.locality_answer for r in items])[1]
        if reference is not None:
            metrics["loc_gen_agree"] = match_scores(answers, reference.generated)[0]
        answers = generate_answers(model, tokenizer, [QA_TEMPLATE.format(q=r.locality_prompt) for r in items])
        metrics["loc_qa_acc"] = match_scores(answers, [r.locality_answer for r in items])[1]
        if reference is not None and reference.generated_qa is not None:
            metrics["loc_qa_agree"] = match_scores(answers, reference.generated_qa)[0]
    return metrics
