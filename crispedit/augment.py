"""Edit-time augmentation: more wordings of each edit prompt, written by the base model itself.

- ``paraphrase``: the model rewrites each prompt, prompted with a few examples (few-shot completion).
  A rewrite is kept when it is non-empty, differs from the prompt, has the prompt's form (a question
  stays a question), is at most about twice as long, and keeps the subject (the request's ``subject``,
  else every capitalised word of the prompt after its first word).
- ``prefix``: ROME's context templates. Short texts sampled from the model are put before the prompt
  ("{prefix}. {prompt}"), so the edit also holds after unrelated context.
- ``qa``: the prompt and each kept paraphrase inside fixed question-answer framings (``QA_FORMS``), so the
  edit also holds when asked as a question. The evaluation's QA template is deliberately not one of them.

The evaluation rephrases are never used: every variant comes from the base model and the prompt alone.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from crispedit.requests import EditRequest
from crispedit.shared_prefix import generate_rows
from crispedit.stopping import stop_strings

AUGMENTATIONS = ("paraphrase", "prefix", "qa")

# Few-shot completion, not a chat instruction: asked in chat, a 135M model answers the question instead.
QUESTION_SHOTS = (
    "Rewrite each question in other words.\n"
    "Question: What is the capital city of France?\nRewritten: Which city is the capital of France?\n"
    "Question: Who wrote the novel Dracula?\nRewritten: Who is the author of the novel Dracula?\n"
    "Question: In which year was the Eiffel Tower completed?\nRewritten: When was the Eiffel Tower finished?\n"
    "Question: {prompt}\nRewritten:"
)
SENTENCE_SHOTS = (
    "Rewrite the start of each sentence in other words, and leave it unfinished.\n"
    "Sentence: The mother tongue of Jean Reno is\nRewritten: Jean Reno's native language is\n"
    "Sentence: Toyota Corolla is produced by\nRewritten: The Toyota Corolla is a car made by\n"
    "Sentence: Angela Merkel holds the position of\nRewritten: Angela Merkel serves as\n"
    "Sentence: {prompt}\nRewritten:"
)
QA_FORMS = ("Question: {q}\nAnswer:", "Answer the question.\n{q}\nAnswer:", "{q}\nThe answer is")
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You", "It", "In", "When")  # as ROME's context templates


def subject_words(request: EditRequest) -> list[str]:
    """What a paraphrase must keep: the request's subject, else the prompt's capitalised words (not the first)."""
    if request.subject:
        return [request.subject]
    return [w.strip("?,.'\"") for w in request.prompt.split()[1:] if w[:1].isupper()]


def keep_paraphrase(request: EditRequest, text: str) -> str | None:
    """The cleaned rewrite if it passes the filter, else None: non-empty, not the prompt, a question for a
    question, at most twice as long, and keeping the subject."""
    text = text.strip().splitlines()[0].strip() if text.strip() else ""
    text = re.sub(r"^(new question|question|sentence|rewritten)\s*:\s*", "", text, flags=re.IGNORECASE).strip('" ')
    is_question = request.prompt.rstrip().endswith("?")
    if not is_question:
        text = text.rstrip(" .")  # a sentence start stays unfinished, so the target can follow it
    if not text or text.lower() == request.prompt.strip().lower():
        return None
    if (is_question and not text.endswith("?")) or len(text.split()) > 2 * len(request.prompt.split()) + 3:
        return None
    if not all(w.lower() in text.lower() for w in subject_words(request)):
        return None
    return text


class Enough(StoppingCriteria):
    """Ends a row once its predicate holds for the text the row has written so far, or once it has written its
    ``limits`` new tokens (rows with neither run on)."""

    def __init__(self, tokenizer, prompt_length: int, done: Sequence[Callable[[str], bool] | None],
                 limits: Sequence[int] | None = None) -> None:
        self.tokenizer, self.prompt_length, self.done, self.limits = tokenizer, prompt_length, done, limits

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        written = input_ids.shape[1] - self.prompt_length
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        limits = self.limits or [None] * len(texts)
        return torch.tensor([bool(f and f(t)) or (k is not None and written >= k)
                             for f, t, k in zip(self.done, texts, limits, strict=True)], device=input_ids.device)


@torch.no_grad()
def completions(
    model: nn.Module, tokenizer, texts: Sequence[str], max_new_tokens: int | Sequence[int] = 32, sampled: bool = True,
    enough: Sequence[Callable[[str], bool] | None] | None = None, temperature: float = 0.8, batch_size: int = 64,
    copies: int | Sequence[int] = 1, greedy: Sequence[bool] | None = None,
) -> list[str]:
    """``copies`` completions of each text (text-major), up to the first newline and at most ``max_new_tokens``
    (each a number, or one per text): sampled (``temperature``, top-p 0.95) or greedy, and in a sampled generation
    the texts flagged ``greedy`` greedily; a text's ``enough`` predicate, where given, also ends its rows once it
    holds for what they have written. ``batch_size`` rows a generation (at least one text).

    The rows' common beginning (the few-shot examples) is read once, and each text once for all its copies
    (``crispedit.shared_prefix``): it costs more to read for every row than the few sampled tokens do to write."""
    options = {"do_sample": True, "temperature": temperature, "top_p": 0.95, "top_k": 0} if sampled else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    counts = [copies] * len(texts) if isinstance(copies, int) else list(copies)
    limits = [max_new_tokens] * len(texts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    enough = list(enough) if enough is not None else [None] * len(texts)
    line_end = stop_strings(tokenizer, ["\n"])
    out: list[str] = []
    start = 0
    while start < len(texts):
        end = start + 1
        while end < len(texts) and sum(counts[start : end + 1]) <= batch_size:
            end += 1
        part = range(start, end)
        rows = [tokenizer(texts[i])["input_ids"] for i in part]
        stops = [enough[i] for i in part for _ in range(counts[i])]
        row_limits = [limits[i] for i in part for _ in range(counts[i])]
        uneven = len(set(row_limits)) > 1

        def stopping(width: int, stops=stops, row_limits=row_limits, uneven=uneven) -> StoppingCriteriaList:
            ends = [Enough(tokenizer, width, stops, row_limits if uneven else None)] if any(stops) or uneven else []
            return StoppingCriteriaList([line_end, *ends])

        ids, width = generate_rows(model, rows, tokenizer.pad_token_id, [counts[i] for i in part], stopping,
                                   greedy=[greedy[i] for i in part] if sampled and greedy else None,
                                   max_new_tokens=max(row_limits), **options)
        out += tokenizer.batch_decode([row[width : width + k] for row, k in zip(ids, row_limits, strict=True)],
                                      skip_special_tokens=True)
        start = end
    return out


def sample_completions(
    model: nn.Module, tokenizer, texts: Sequence[str], n: int, max_new_tokens: int = 32, batch_size: int = 16,
    temperature: float | None = 0.8,
) -> list[list[str]]:
    """``n`` completions of each text, up to its first newline: sampled, or greedy with ``temperature=None``;
    ``batch_size`` texts (× n rows) a generation."""
    flat = completions(model, tokenizer, texts, max_new_tokens, sampled=temperature is not None,
                       temperature=temperature or 1.0, batch_size=batch_size * n, copies=n)
    return [flat[j : j + n] for j in range(0, len(flat), n)]


def paraphrases(model: nn.Module, tokenizer, requests: Sequence[EditRequest], n: int = 4) -> list[list[str]]:
    """Up to ``n`` distinct filtered rewrites of each request's prompt, by the model itself (few-shot)."""
    texts = [(QUESTION_SHOTS if r.prompt.rstrip().endswith("?") else SENTENCE_SHOTS).format(prompt=r.prompt.strip())
             for r in requests]
    out = []
    for request, replies in zip(requests, sample_completions(model, tokenizer, texts, n), strict=True):
        kept = [keep_paraphrase(request, reply) for reply in replies]
        out.append(list(dict.fromkeys(k for k in kept if k)))
    return out


SAMPLED_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → {(n, length): prefixes}


def context_prefixes(model: nn.Module, tokenizer, n: int = 12, length: int = 10) -> list[str]:
    """ROME's context templates: texts of ``length`` tokens sampled from the model after a common first
    word (following an end token, as at the start of a document), cut to their first line; ≥ 3 words.

    Sampled once per model object: they stand for any text before a question, not for one edit, so a worker
    that edits one loaded model again and again does not pay for them each time."""
    kept = SAMPLED_PREFIXES.setdefault(model, {})
    if (n, length) not in kept:
        kept[(n, length)] = sample_prefixes(model, tokenizer, n, length)
    return list(kept[(n, length)])


@torch.no_grad()
def sample_prefixes(model: nn.Module, tokenizer, n: int, length: int) -> list[str]:
    device = next(model.parameters()).device
    starts = [(tokenizer.eos_token or "") + PREFIX_STARTS[i % len(PREFIX_STARTS)] for i in range(n)]
    enc = tokenizer(starts, return_tensors="pt", padding=True, padding_side="left").to(device)
    out = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=length, min_new_tokens=length,
                         pad_token_id=tokenizer.pad_token_id)
    texts = [x.strip().split("\n")[0].strip(" .") for x in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return [t for t in texts if len(t.split()) >= 3]


def check_augmentations(kinds: Sequence[str]) -> None:
    unknown = set(kinds) - set(AUGMENTATIONS)
    if unknown:
        raise ValueError(f"unknown augmentation {sorted(unknown)}; choose from {list(AUGMENTATIONS)} or 'auto'")


def resolve_augment(spec: str, with_anchors: bool) -> tuple[str, ...]:
    """A comma list of AUGMENTATIONS, or ``auto``: all of them when question anchors keep locality (the recipe
    that kept locality and generality on ZsRE train), none without anchors (alone it costs capability)."""
    if spec.strip() == "auto":
        return AUGMENTATIONS if with_anchors else ()
    kinds = tuple(a.strip() for a in spec.split(",") if a.strip())
    check_augmentations(kinds)
    return kinds


def augmented_prompts(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], kinds: Sequence[str], seed: int = 0
) -> list[list[EditRequest]]:
    """For each request, its augmented variants (same target, other prompt wordings), in ``kinds`` order."""
    check_augmentations(kinds)
    variants: list[list[str]] = [[] for _ in requests]
    wordings: list[list[str]] = [[r.prompt] for r in requests]  # what the QA framings wrap
    with torch.random.fork_rng(devices=[]):  # seeded sampling, without touching the caller's random state
        torch.manual_seed(seed)
        if "paraphrase" in kinds:
            for mine, own, rewrites in zip(variants, wordings, paraphrases(model, tokenizer, requests), strict=True):
                mine.extend(rewrites)
                own.extend(rewrites)
        if "prefix" in kinds:
            prefixes = context_prefixes(model, tokenizer)
            for mine, r in zip(variants, requests, strict=True):
                mine.extend(f"{p}. {r.prompt}" for p in prefixes)
    if "qa" in kinds:
        for mine, own in zip(variants, wordings, strict=True):
            mine.extend(form.format(q=w) for w in own for form in QA_FORMS)
    return [[EditRequest(prompt=v, target=r.target, subject=r.subject) for v in vs]
            for r, vs in zip(requests, variants, strict=True)]
