"""The editing benchmarks (ZsRE, CounterFact, WikiBigEdit) as lists of :class:`EditRequest`.

Field mappings follow the CrispEdit code (arXiv 2602.15823). The files live in the shared data folder
(``$CRISPEDIT_DATA``, else ``<repo>/../shared/data``); see its README for their provenance and formats.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from crispedit.requests import EditRequest

log = logging.getLogger(__name__)

DEFAULT_PATHS: dict[str, str] = {
    "zsre": "editing/zsre/zsre_mend_eval_3k.json",
    "counterfact": "editing/counterfact/counterfact_edit_3k.json",
    "wikibigedit": "editing/wikibigedit/wikibigedit_3k.json",
}

ZSRE_LOC_PREFIX = "nq question: "


def shared_data_dir() -> Path:
    """The data folder: ``$CRISPEDIT_DATA`` if set, else ``<repo root>/../shared/data``."""
    env = os.environ.get("CRISPEDIT_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"data folder {path} not found; set CRISPEDIT_DATA to the folder holding editing/ and capability/"
        )
    return path


def _optional(text: object) -> str | None:
    return text if isinstance(text, str) and text.strip() else None


def zsre_record(r: dict) -> EditRequest:
    """MEND/ROME ZsRE: ``src`` -> prompt, ``alt`` -> target, ``rephrase``, and the NQ question in ``loc``
    (prefix dropped, capitalised, "?" appended) with its answer ``loc_ans``."""
    loc = _optional(r.get("loc"))
    return EditRequest(
        prompt=r.get("src", ""),
        target=r.get("alt", ""),
        rephrases=(r["rephrase"],) if _optional(r.get("rephrase")) else (),
        locality_prompt=loc.removeprefix(ZSRE_LOC_PREFIX).capitalize() + "?" if loc else None,
        locality_answer=_optional(r.get("loc_ans")),
        subject=_optional(r.get("subject")),
    )


def flat_record(r: dict) -> EditRequest:
    """EasyEdit's flat format (CounterFact, WikiBigEdit): ``prompt``, ``target_new``, ``rephrase_prompt``,
    ``locality_prompt``, ``locality_ground_truth``."""
    return EditRequest(
        prompt=r.get("prompt", ""),
        target=r.get("target_new", ""),
        rephrases=(r["rephrase_prompt"],) if _optional(r.get("rephrase_prompt")) else (),
        locality_prompt=_optional(r.get("locality_prompt")),
        locality_answer=_optional(r.get("locality_ground_truth")),
        subject=_optional(r.get("subject")),
    )


def fact_record(r: list) -> EditRequest:
    """Our own facts (``lab/tuning_facts.json``): a [prompt, target] pair."""
    prompt, target = r
    return EditRequest(prompt=prompt, target=target)


CONVERTERS: dict[str, Callable[[dict], EditRequest]] = {
    "zsre": zsre_record,
    "counterfact": flat_record,
    "wikibigedit": flat_record,
    "facts": fact_record,
}


def load_edit_dataset(
    name: str, path: str | Path | None = None, n: int | None = None, offset: int = 0
) -> list[EditRequest]:
    """Records ``[offset:offset + n]`` (file order) of an editing benchmark as edit requests.

    ``name`` is one of "zsre", "counterfact", "wikibigedit", or "facts" ([prompt, target] pairs, with ``path``);
    ``path`` defaults to the benchmark's file in the shared data folder (a JSON array). Records whose prompt or
    target is empty (or not a string) are skipped with a warning, so the result can be shorter than ``n``; the
    slice is taken on file records first, so ``offset`` always counts records in the file.
    """
    if name not in CONVERTERS:
        raise ValueError(f"unknown edit dataset {name!r}; valid names: {sorted(CONVERTERS)}")
    if offset < 0 or (n is not None and n < 0):
        raise ValueError(f"n and offset must be non-negative, got n={n}, offset={offset}")
    if path is None and name not in DEFAULT_PATHS:
        raise ValueError(f"{name!r} has no default file: give its path")
    path = Path(path) if path is not None else shared_data_dir() / DEFAULT_PATHS[name]
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    chosen = records[offset:] if n is None else records[offset : offset + n]
    out: list[EditRequest] = []
    skipped = 0
    for r in chosen:
        try:
            out.append(CONVERTERS[name](r))
        except ValueError:  # EditRequest refuses an empty prompt or target
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d of %d records with an empty prompt or target", path, skipped, len(chosen))
    return out
