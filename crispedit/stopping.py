"""Stop strings compiled once per tokenizer.

``generate(stop_strings=...)`` builds a ``transformers.StopStringCriteria`` on every call, and building one reads,
sorts and hashes the whole vocabulary: about 0.1 s for SmolLM2's 49k tokens, more than a decoding step. The
criterion keeps nothing between generations, so one per (tokenizer, strings) serves them all.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

from transformers import StopStringCriteria

KEPT = 16  # compiled lists per tokenizer, least recently used dropped: clients may send stop lists of their own

_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer → OrderedDict(strings → criterion)
_lock = threading.Lock()


def stop_strings(tokenizer, strings: Sequence[str]) -> StopStringCriteria:
    """The criterion that ends a row once its text ends in one of ``strings``, built on first use."""
    key = tuple(strings)
    with _lock:
        built = _compiled.setdefault(tokenizer, OrderedDict())
        if key in built:
            built.move_to_end(key)
            return built[key]
    criterion = StopStringCriteria(tokenizer, list(key))
    with _lock:
        built[key] = criterion
        while len(built) > KEPT:
            built.popitem(last=False)
    return criterion
