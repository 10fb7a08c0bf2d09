"""CrispEdit (arXiv 2602.15823): edit a language model along the low-curvature directions of its capability loss.

The public API, in the order you use it::

    model, tok = load_model("smollm2")
    cache = build_cache(model, tok, layers, corpus="self", n_samples=40)
    result = edit(model, tok, [EditRequest("The capital of X is", "Y")], cache, EditConfig())
    metrics = edit_quality(model, tok, requests)
"""

from crispedit.cache import CurvatureCache, build_cache
from crispedit.edit import EditConfig, EditError, EditResult, edit
from crispedit.evaluate import edit_quality
from crispedit.models import load_model
from crispedit.requests import EditRequest, read_edits_jsonl

__all__ = [
    "CurvatureCache",
    "EditConfig",
    "EditError",
    "EditRequest",
    "EditResult",
    "build_cache",
    "edit",
    "edit_quality",
    "load_model",
    "read_edits_jsonl",
]
