"""Neighbours of an edit: prompts whose answers the edit must leave alone, derived from the edit itself.

An edit should change its fact and nothing next to it. What sits next to a fact, written by the base
model from the edit's prompt alone (no dataset, nothing from the user):

- ``subject``: the same question about other subjects. The model continues a few-shot list that starts
  with the edit's subject ("France," → " Germany, Italy, Spain"), and each sibling replaces the subject
  in the prompt ("What is the capital of Germany?").
- ``relation``: other questions about the same subject, written few-shot by the model ("What language
  is spoken in France?"). A candidate that shares most of the prompt's other words is left out: it may
  be a rewording of the edited question, whose answer must change.
- ``locality``: the request's own ``locality_prompt``.

Each neighbour is asked as the service is asked (through the chat template when the edit trains that
form) and as raw text, and the parent model's greedy first line is its reference answer. The edit keeps
the edited layers' outputs on those texts (:class:`KeptOutputs`, β · R(W) added to the edit loss), and
:func:`neighbour_report` compares the answers with the new version's greedy answers afterwards.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import StoppingCriteriaList

from crispedit.augment import completions
from crispedit.corpus import batches_of
from crispedit.evaluate import cut_answer
from crispedit.layer_inputs import read_inputs
from crispedit.packing import pack
from crispedit.requests import IGNORE, EditRequest
from crispedit.shared_prefix import generate_rows
from crispedit.stopping import stop_strings

SIBLING_SHOTS = (
    "Paris, London, Berlin, Madrid, Vienna, Rome\n"
    "Apple, Microsoft, Google, Amazon, Intel, IBM\n"
    "Albert Einstein, Isaac Newton, Niels Bohr, Marie Curie, Max Planck\n"
    "Jupiter, Saturn, Mars, Venus, Mercury, Neptune\n"
    "copper, iron, silver, zinc, tin, lead\n"
    "{subject},"
)
QUESTION_SHOTS = (
    "Questions about Albert Einstein:\n- Where was Albert Einstein born?\n"
    "Questions about Tokyo:\n- Which country is Tokyo in?\n"
    "Questions about the violin:\n- How many strings does the violin have?\n"
    "Questions about Toyota:\n- What does Toyota make?\n"
    "Questions about {subject}:\n-"
)
SENTENCE_SHOTS = (
    "Facts about Albert Einstein:\n- Albert Einstein was born in\n"
    "Facts about Tokyo:\n- Tokyo is the capital of\n"
    "Facts about the violin:\n- The violin is played with\n"
    "Facts about Toyota:\n- Toyota is a company that makes\n"
    "Facts about {subject}:\n-"
)
CONNECTORS = {"and", "of", "the", "de", "von", "van", "la", "le", "del", "da", "for", "in", "on"}
STOPWORDS = CONNECTORS | {"a", "an", "is", "was", "are", "were", "what", "which", "who", "whom", "where", "when",
                          "how", "does", "did", "do", "by", "to", "at", "with", "from", "as", "that", "this",
                          "it", "its", "his", "her", "their", "name"}
SIMILAR = 0.5  # a relation candidate sharing this share of the prompt's other words may be a rewording
SPARE_ITEMS = 3  # a sibling list is read to n + this many items: some repeat the subject or each other
ANSWER_TOKENS = 24  # a reference answer is the parent's greedy first line, at most this many tokens
NEIGHBOUR_GUARD = 0.1  # the guard rejects an edit keeping fewer of its neighbours' answers (the paper recipe: 0-0.03)


@dataclass(frozen=True)
class Neighbour:
    """A prompt next to edit ``edit`` (an index into the requests), of kind subject | relation | locality."""

    prompt: str
    kind: str
    edit: int


def words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


def infer_subject(request: EditRequest) -> str | None:
    """The request's subject, else the longest run of capitalised words after the prompt's first word (joined
    by connectors such as "and", "of"), else the prompt's last word. None when the prompt has no such word."""
    if request.subject and request.subject in request.prompt:
        return request.subject
    tokens = re.findall(r"[\w'-]+", request.prompt)
    runs, run = [], []
    for i, token in enumerate(tokens):
        capitalised = i > 0 and token[:1].isupper()
        joins = bool(run) and token.lower() in CONNECTORS and i + 1 < len(tokens) and tokens[i + 1][:1].isupper()
        if capitalised or joins:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs.append(run)
    best = max(runs, key=len)
    if best:
        span = re.search(r"\W+".join(map(re.escape, best)), request.prompt)
        return span.group(0) if span else None
    last = [t for t in tokens[1:] if t.lower() not in STOPWORDS]
    return last[-1] if last else None


def written_around(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], subjects: Sequence[str], n: int
) -> tuple[list[list[str]], list[list[str]]]:
    """Up to ``n`` siblings of each subject (things of the same kind, :func:`distinct_items`) and ``n`` other prompts
    about it (:func:`kept_prompts`): the model's greedy list after the subject (two sampled lists more where that
    names fewer than ``n``), and ``2n`` sampled prompts about it.

    The greedy lists and the sampled prompts are written in one generation: a generation runs as long as its
    longest row, so the lists' decoding steps come nearly free beside the prompts'. A list is read to its
    ``n + SPARE_ITEMS``-th item and a prompt to the length it may have: decoding on would cost a step each for text
    nobody reads."""
    lists = [SIBLING_SHOTS.format(subject=s) for s in subjects]
    asks_question = [r.prompt.rstrip().endswith("?") for r in requests]
    asks = [(QUESTION_SHOTS if q else SENTENCE_SHOTS).format(subject=s) for q, s in zip(asks_question, subjects,
                                                                                         strict=True)]

    def listed(text: str) -> bool:
        return text.count(",") >= n + SPARE_ITEMS

    def items(replies: Sequence[str]) -> list[str]:  # a list that ``listed`` cut ends in a comma or a part-item
        lines = [r.split("\n")[0] for r in replies]
        return [line.rsplit(",", 1)[0] if listed(line) else line for line in lines]

    per = 1 + 2 * n  # each subject's rows: its list, then its prompts
    written = completions(model, tokenizer, [t for pair in zip(lists, asks, strict=True) for t in pair],
                          [32, 24] * len(lists), copies=[1, 2 * n] * len(lists), greedy=[True, False] * len(lists),
                          enough=[f for r in requests for f in (listed, too_long(r))], batch_size=16 * per)
    found = [distinct_items(s, items([written[per * k]])) for k, s in enumerate(subjects)]
    short = [i for i, kinds in enumerate(found) if len(kinds) < n]
    if short:
        more = completions(model, tokenizer, [lists[i] for i in short], 32, enough=[listed] * len(short),
                           batch_size=32, copies=2)
        for k, i in enumerate(short):
            found[i] = distinct_items(subjects[i], [", ".join(found[i]), *items(more[2 * k : 2 * k + 2])])
    prompts = [kept_prompts(r, s, q, [x.split("\n")[0] for x in written[per * k + 1 : per * (k + 1)]], n)
               for k, (r, s, q) in enumerate(zip(requests, subjects, asks_question, strict=True))]
    return [kinds[:n] for kinds in found], prompts


def too_long(request: EditRequest) -> Callable[[str], bool]:
    """Whether a drafted prompt about the request's subject has grown past what :func:`kept_prompts` keeps."""
    return lambda text: len(text.split()) > longest_prompt(request)


def distinct_items(subject: str, lines: Sequence[str]) -> list[str]:
    """The comma-separated items of ``lines``, once each, of one to six words, other than the subject."""
    seen: dict[str, str] = {}
    own = subject.lower()
    for item in (x.strip(" .") for text in lines for x in text.split(",")):
        key = item.lower()
        if 1 <= len(item.split()) <= 6 and key not in seen and own not in key and key not in own:
            seen[key] = item
    return list(seen.values())


def similar(candidate: str, prompt: str, subject: str) -> bool:
    """Whether ``candidate`` shares at least ``SIMILAR`` of the prompt's words other than the subject's."""
    skip = STOPWORDS | set(words(subject))
    theirs, ours = set(words(candidate)) - skip, set(words(prompt)) - skip
    return bool(ours) and len(theirs & ours) / len(ours) >= SIMILAR


def longest_prompt(request: EditRequest) -> int:
    """Words a derived prompt about the request's subject may have: about twice the request's prompt."""
    return 2 * len(request.prompt.split()) + 4


def kept_prompts(request: EditRequest, subject: str, question: bool, drafts: Sequence[str], n: int) -> list[str]:
    """Up to ``n`` of the drafted prompts about ``subject``, in the request's form (question or sentence start):
    naming the subject, not the request's target, not the request's prompt or a rewording of it, not too long."""
    kept: dict[str, None] = {}
    for text in (x.strip().rstrip(" .") if not question else x.strip() for x in drafts):
        if (subject.lower() in text.lower() and (text.endswith("?") if question else not text.endswith("?"))
                and text.lower() != request.prompt.strip().lower() and not similar(text, request.prompt, subject)
                and request.target.lower() not in text.lower() and len(text.split()) <= longest_prompt(request)):
            kept[text] = None
    return list(kept)[:n]


def derive_neighbours(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], per_kind: int = 3, seed: int = 0
) -> list[Neighbour]:
    """Each edit's neighbours: ``per_kind`` of each derived kind, and its locality prompt when it has one.

    A neighbour that is another edit's prompt in the same batch is left out (that answer is meant to change),
    and one that two edits share is listed once, under the first.
    """
    edited = {r.prompt.strip().lower() for r in requests}
    subjects = [infer_subject(r) for r in requests]
    known = [i for i, s in enumerate(subjects) if s]
    with torch.random.fork_rng(devices=[]):  # seeded sampling, without touching the caller's random state
        torch.manual_seed(seed)
        lists, prompts = written_around(model, tokenizer, [requests[i] for i in known], [subjects[i] for i in known],
                                        per_kind)
        siblings, related = dict(zip(known, lists, strict=True)), dict(zip(known, prompts, strict=True))
    out: list[Neighbour] = []
    seen = set(edited)
    for i, r in enumerate(requests):
        found = [Neighbour(r.prompt.replace(subjects[i], s, 1), "subject", i) for s in siblings.get(i, [])]
        found += [Neighbour(q, "relation", i) for q in related.get(i, [])]
        if r.locality_prompt:
            found.append(Neighbour(r.locality_prompt, "locality", i))
        for nb in found:
            if nb.prompt.strip().lower() not in seen:
                seen.add(nb.prompt.strip().lower())
                out.append(nb)
    random.Random(seed).shuffle(out)  # anchor draws then mix edits and kinds
    return sorted(out, key=lambda nb: nb.edit)


def asked(tokenizer, prompt: str, chat: bool) -> str:
    """The prompt as a query: through the chat template (a user turn, ready for the answer) or as raw text."""
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


@torch.no_grad()
def greedy_answers(
    model: nn.Module, tokenizer, texts: Sequence[str], max_new_tokens: int = ANSWER_TOKENS, batch_size: int = 32
) -> list[list[int]]:
    """Each text's greedy continuation as token ids, through its first newline or end-of-turn token (the texts'
    common beginning, a chat template's system prompt, read once: ``crispedit.shared_prefix``)."""
    stops = {tokenizer.eos_token_id, *tokenizer.encode("\n", add_special_tokens=False)[-1:]} - {None}
    line_end = StoppingCriteriaList([stop_strings(tokenizer, ["\n"])])
    out: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        rows = [tokenizer(t)["input_ids"] for t in texts[i : i + batch_size]]
        ids, width = generate_rows(model, rows, tokenizer.pad_token_id, stopping=lambda width: line_end,
                                   do_sample=False, max_new_tokens=max_new_tokens, temperature=None, top_p=None,
                                   top_k=None)
        for row in ids[:, width:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
    return out


def first_line(tokenizer, ids: Sequence[int]) -> str:
    """The answer as compared: up to its first "." or newline, as generated answers are cut in evaluation."""
    return cut_answer(tokenizer.decode(ids, skip_special_tokens=True).strip())


@dataclass
class Protection:
    """What an edit keeps: its neighbours, the forms they are asked in, the parent model's answers to them,
    the edited layers' inputs on those tokens, and the requests with their answers in kind."""

    requests: list[EditRequest]  # the edits, each with its chat target in the parent's phrasing where found
    neighbours: list[Neighbour]
    texts: list[str]  # each neighbour in each form: neighbours × forms, form-major within a neighbour
    forms: tuple[bool, ...]  # chat (True) / raw (False), in the order of each neighbour's texts
    answers: list[list[int]]  # the parent's greedy answer to each text
    kept: KeptOutputs | None

    @property
    def reported(self) -> list[int]:
        """Indices into texts of the form the report shows: the first form (chat when used)."""
        return list(range(0, len(self.texts), len(self.forms)))


def protect(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], chat: bool, modules: dict[str, nn.Module],
    fan_in_fan_out: bool, per_kind: int = 3, seed: int = 0,
) -> Protection:
    """Derive the neighbours of ``requests``, record the (parent) model's answers to them and the inputs of the
    edited ``modules`` over every token of each neighbour and its answer; with ``chat``, also phrase each
    request's chat target as the parent answers (:func:`answers_in_kind`). Each returned request carries its
    subject (:func:`infer_subject` where the request names none), for the subject key (``crispedit.subject_key``)."""
    requests = [replace(r, subject=infer_subject(r)) for r in requests]
    neighbours = derive_neighbours(model, tokenizer, requests, per_kind, seed)
    forms = (True, False) if chat else (False,)
    texts = [asked(tokenizer, nb.prompt, form) for nb in neighbours for form in forms]
    # one generation per form: a batch runs until its longest answer ends, and raw questions mostly end at once;
    # the edits' own chat answers (for their targets in kind) join the chat batch
    own = [asked(tokenizer, r.prompt, True) for r in requests] if chat else []
    answers: list[list[int]] = [[] for _ in texts]
    for k, form in enumerate(forms):
        extra = own if form else []
        replies = greedy_answers(model, tokenizer, texts[k :: len(forms)] + extra)
        answers[k :: len(forms)] = replies[: len(replies) - len(extra)]
        if extra:
            requests = answers_in_kind(requests, [first_line(tokenizer, a) for a in replies[-len(extra) :]])
    rows = [tokenizer(t)["input_ids"] + list(a) for t, a in zip(texts, answers, strict=True)]
    kept = KeptOutputs.record(model, modules, rows, fan_in_fan_out) if rows else None
    return Protection(requests, neighbours, texts, forms, answers, kept)


def through_first_line(tokenizer, ids: Sequence[int]) -> list[int]:
    """The shortest head of an answer whose text reaches the end of its first line ("." or newline), else all."""
    for k in range(1, len(ids) + 1):
        if re.search(r"[.\n]", tokenizer.decode(ids[:k], skip_special_tokens=True)):
            return list(ids[:k])
    return list(ids)


@torch.no_grad()
def still_greedy(model: nn.Module, tokenizer, texts: Sequence[str], answers: Sequence[Sequence[int]],
                 batch_size: int = 16) -> list[bool]:
    """Whether each answer is still the model's greedy continuation of its text: every answer token the argmax
    of the logits before it. One teacher-forced pass instead of a generation; where it holds, greedy decoding
    would write the same tokens again. The rows run packed (``crispedit.packing``): a chat template's system
    prompt, which every row begins with, is read once."""
    weight = next(model.parameters())
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    rows = [p + list(a) for p, a in zip(prompts, answers, strict=True)]
    out: list[bool] = []
    for i, batch in enumerate(batches_of(rows, batch_size)):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        for j, p in enumerate(prompts[i * batch_size : (i + 1) * batch_size]):
            labels[j, : len(p)] = IGNORE
        packed = pack({**batch, "labels": labels})
        packed = {k: v.to(weight.device) for k, v in packed.items() if v is not None}
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       attention_mask=packed["attention_mask"].to(weight.dtype),
                       logits_to_keep=packed["predicts"]).logits
        wrong = torch.zeros(len(labels), dtype=torch.long, device=logits.device)
        wrong.index_add_(0, packed["owners"], (logits.argmax(-1) != packed["targets"]).long())
        out += (wrong == 0).tolist()
    return out


def neighbour_report(model: nn.Module, tokenizer, requests: Sequence[EditRequest], protection: Protection) -> dict:
    """What else changed: each neighbour's parent and new greedy answer (first line), and the share unchanged.

    An answer whose first line is still greedy token by token (:func:`still_greedy`) is unchanged without
    generating it again; only the others are generated."""
    rows = protection.reported
    before = [first_line(tokenizer, protection.answers[j]) for j in rows]
    texts = [protection.texts[j] for j in rows]
    heads = [through_first_line(tokenizer, protection.answers[j]) for j in rows]
    after = list(before)
    moved = [k for k, same in enumerate(still_greedy(model, tokenizer, texts, heads)) if not same]
    for k, ids in zip(moved, greedy_answers(model, tokenizer, [texts[k] for k in moved]), strict=True):
        after[k] = first_line(tokenizer, ids)
    items = [{"edit": nb.edit, "prompt": nb.prompt, "kind": nb.kind, "before": b, "after": a, "unchanged": a == b}
             for nb, b, a in zip(protection.neighbours, before, after, strict=True)]
    per_edit = [{"prompt": r.prompt, "target": r.target,
                 "neighbours": [{k: v for k, v in item.items() if k != "edit"} for item in items if item["edit"] == i]}
                for i, r in enumerate(requests)]
    unchanged = sum(item["unchanged"] for item in items)
    return {"unchanged": unchanged / len(items) if items else None, "checked": len(items),
            "changed": len(items) - unchanged, "form": "chat" if protection.forms[0] else "raw", "edits": per_edit}


class KeptOutputs:
    """The edited layers' outputs on the neighbours' tokens, kept: a quadratic penalty on the weight change.

    For each edited weight W (d_out × d_in) with the neighbours' inputs a_t at that layer (every token of each
    neighbour and of the parent's answer to it),

        R(W) = Σ_layers tr(ΔW A ΔWᵀ) / tr(W₀ A W₀ᵀ),   A = mean_t a_t a_tᵀ,   ΔW = W − W₀,

    the mean squared change of the layer's output on those tokens, relative to the output itself. R = 0 exactly
    when ΔW a_t = 0 for every such token: then no edited layer's output moves there, the residual stream is the
    parent's at every position, and the neighbour's greedy answer cannot change. Unlike a KL penalty on the
    answers, it needs no forward pass while editing: one pass over the neighbours records A.

    A is held as a factor F (A = FᵀF) while the neighbours have fewer distinct tokens than the layer has inputs,
    so a step costs d_out·d_in·rows(F) instead of d_out·d_in²: a token whose whole prefix another row shares
    (the chat template's system prompt) has the same input there and enters F once, weighted by √count.
    """

    def __init__(self, factors: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], fan_in_fan_out: bool,
                 factored: bool = True) -> None:
        """``factors[name]``: F (rows × d_in) with A = FᵀF, or with ``factored=False`` A itself (d_in × d_in)."""
        self.fan_in_fan_out, self.factored = fan_in_fan_out, factored
        self.F, self.W0, self.scale = {}, {}, {}
        for name, F in factors.items():
            w0 = self.as_out_in(weights[name]).detach().to(F.dtype)
            self.F[name], self.W0[name] = F, w0.clone()
            self.scale[name] = float(self.energy(w0, F)) or 1.0

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def energy(self, delta: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """tr(Δ A Δᵀ): ‖Δ Fᵀ‖² from the factor, or Σ (Δ A) ⊙ Δ from A itself."""
        return (delta @ F.T).square().sum() if self.factored else ((delta @ F) * delta).sum()

    def second_moment(self, name: str) -> torch.Tensor:
        """A = mean_t a_t a_tᵀ of one module, dense."""
        F = self.F[name]
        return F.T @ F if self.factored else F

    @property
    def A(self) -> dict[str, torch.Tensor]:
        """A of each module, dense."""
        return {n: self.second_moment(n) for n in self.F}

    def __call__(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = []
        for name, weight in weights.items():  # the edited ones: a subset, when edit() ranks layers itself
            delta = self.as_out_in(weight) - self.W0[name]
            terms.append(self.energy(delta, self.F[name]) / self.scale[name])
        return torch.stack(terms).sum()

    @classmethod
    @torch.no_grad()
    def record(cls, model: nn.Module, modules: dict[str, nn.Module], rows: Sequence[Sequence[int]],
               fan_in_fan_out: bool, batch_size: int = 16) -> KeptOutputs:
        """A = mean a aᵀ of each module's input over every token of ``rows``, as a factor when that is smaller."""
        device = next(model.parameters()).device
        rows = [list(r) for r in rows]
        first, counts = shared_prefixes(rows)
        total = sum(counts)
        weights = [[counts[node] ** 0.5 if node is not None else 0.0 for node in row] for row in first]
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        sums: dict[str, torch.Tensor] = {}
        as_factor = len(counts) < min(m.weight.shape[0 if fan_in_fan_out else 1] for m in modules.values())

        def take(name: str, inputs: torch.Tensor, w: torch.Tensor) -> None:
            a = inputs[w > 0].float() * w[w > 0].unsqueeze(1)  # each distinct token once, × √count
            if as_factor:
                parts[name].append(a)
            else:
                sums[name] = a.T @ a if name not in sums else sums[name] + a.T @ a

        for group in similar_lengths(rows, batch_size):
            batch = next(batches_of([rows[i] for i in group], len(group)))
            w = torch.zeros(batch["input_ids"].shape)
            for j, i in enumerate(group):
                w[j, : len(weights[i])] = torch.tensor(weights[i])
            w = w.to(device)
            read_inputs(model, modules, lambda name, a, w=w: take(name, a, w),
                        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        factors = {n: torch.cat(p) / total**0.5 for n, p in parts.items()} if as_factor else \
            {n: a / total for n, a in sums.items()}
        return cls(factors, {n: m.weight for n, m in modules.items()}, fan_in_fan_out, factored=as_factor)


def similar_lengths(rows: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``rows`` in batches of at most ``batch_size``, shortest first, a batch ending before a row twice
    as long as its first: a padded token costs a forward pass like any other (raw questions are a fifth as long
    as chat ones)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(rows)), key=lambda i: len(rows[i])):
        if not groups or len(groups[-1]) == batch_size or len(rows[i]) > 2 * len(rows[groups[-1][0]]):
            groups.append([])
        groups[-1].append(i)
    return groups


def shared_prefixes(rows: Sequence[Sequence[int]]) -> tuple[list[list[int | None]], list[int]]:
    """Each token's prefix node (None where an earlier token had the same prefix), and each node's count.

    Two tokens with the same prefix have the same input at every layer of a causal model, so only the first
    needs recording, weighted by how often the prefix occurs."""
    nodes: dict[tuple[int, int], int] = {}
    counts: list[int] = []
    first: list[list[int | None]] = []
    for row in rows:
        node, marks = -1, []
        for token in row:
            key = (node, token)
            fresh = key not in nodes
            if fresh:
                nodes[key] = len(counts)
                counts.append(0)
            node = nodes[key]
            counts[node] += 1
            marks.append(node if fresh else None)
        first.append(marks)
    return first, counts


def answers_in_kind(requests: Sequence[EditRequest], answers: Sequence[str]) -> list[EditRequest]:
    """Each request with a chat target phrased as the parent answers it in chat (``answers``, first lines): the
    start of that answer, up to where it leaves the question's words, then the target ("The capital of France is
    Paris." → "The capital of France is Rome."). A request whose parent answer does not restate the question
    keeps the bare target.

    Trained on the bare target, an edit teaches every question of that shape to open with an answer
    ("Rome, Italy"), which moves the first token of the neighbours' answers too.
    """
    return [replace(r, chat_target=f"{head} {r.target.strip()}.") if (head := restated(r.prompt, a, r.target)) else r
            for r, a in zip(requests, answers, strict=True)]


def restated(prompt: str, answer: str, target: str) -> str | None:
    """The first clause of the answer up to its last word from the prompt, and the lower-case words after it
    ("was written by"), if that leaves at least three words and something after them; else None. A last word
    that the target starts with ("the") is left to the target."""
    tokens = answer.split(",")[0].split()
    asked_words = set(words(prompt))
    last = max((i for i, t in enumerate(tokens) if words(t) and words(t)[0] in asked_words), default=None)
    if last is None:
        return None
    end = last + 1
    while end < len(tokens) and tokens[end][:1].islower() and tokens[end].isalpha():
        end += 1
    if end < 3 or end >= len(tokens):
        return None
    if words(target)[:1] == words(tokens[end - 1]):
        end -= 1
    return " ".join(tokens[:end])
