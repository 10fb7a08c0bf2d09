"""What the CounterFact tuning scripts share: the model, the cache and the tuning edits, and the report.

The scripts beside this file (``cf_drift.py``, ``cf_generality.py``, ``drift_suspects.py``) edit CounterFact
records from 2000 on, which no benchmark tests, and print and save one JSON report.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from crispedit.arch import module_name
from crispedit.cache import CurvatureCache
from crispedit.models import load_model
from crispedit.requests import EditRequest
from lab.bench import DATASET_FILES
from lab.edit_sets import load_edit_dataset, shared_data_dir


def tuning_setup(cache_path: str, n: int, offset: int, layers: str = "") -> tuple[Path, nn.Module, object,
                                                                                  CurvatureCache, list[EditRequest]]:
    """(data folder, SmolLM2, its tokenizer, the curvature cache checked against it, ``n`` CounterFact edits).

    ``layers`` ("2,3,4"): edit only these of the cache's layers.
    """
    data = shared_data_dir()
    model, tok = load_model("smollm2")
    cache = CurvatureCache.load(cache_path, model=model)
    if layers:
        chosen = tuple(int(x) for x in layers.split(","))
        cache = cache.subset(chosen, [module_name(model, i) for i in chosen])
    requests = load_edit_dataset("counterfact", data / DATASET_FILES["counterfact"], n=n, offset=offset)
    return data, model, tok, cache, requests


def emit(report: dict, out: str | None) -> None:
    """Print the report, and write it to ``out`` when given."""
    print(json.dumps(report, indent=2))
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
