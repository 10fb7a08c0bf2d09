"""The product's edit: a checkpoint's recipe (``crispedit.arch.RECIPES``) filled in around what a caller gives.

``EditConfig()`` is the paper's recipe. The worker and ``crispedit edit`` both edit with
:func:`recommended_config`, so an option left out means the same in the service and on the command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from crispedit.arch import recipe
from crispedit.augment import resolve_augment
from crispedit.edit import EditConfig


def recommended_config(
    model: nn.Module, tokenizer, given: Mapping[str, Any] | None = None, *, protect: bool = True,
    anchors: bool = False, text_anchors: bool = False, augment: str = "auto",
) -> EditConfig:
    """The options in ``given`` (None: not given), the others from the model's recipe:

    - ``chat_form`` when the tokenizer has a chat template, so chat queries see the edit;
    - ``batch_size`` for the model's device, ``energy`` γ and ``lr`` (None: ``edit`` scales it to the weights);
    - with ``protect``, the neighbours' β, the subject key and the keyed solve with its key variants, earlier
      stop and more epochs (else none);
    - the anchors' and text anchors' β where the caller has them (``anchors``, ``text_anchors``), else 0;
    - ``augment`` resolved against the anchors (``crispedit.augment.resolve_augment``).
    """
    r = recipe(model)
    defaults = {
        "chat_form": bool(getattr(tokenizer, "chat_template", None)),
        "batch_size": r.batch_size_gpu if next(model.parameters()).is_cuda else r.batch_size_cpu,
        "energy": r.energy,
        "lr": r.lr,
        "neighbour_weight": r.neighbour_weight if protect else 0.0,
        "subject_key": protect,
        "keyed_solve": protect,
        "key_variants": r.key_variants if protect else (),
        "anchor_weight": r.anchor_weight if anchors else 0.0,
        "text_anchor_weight": r.text_anchor_weight if text_anchors else 0.0,
        "augment": resolve_augment(augment, with_anchors=anchors),
    }
    given = {k: v for k, v in (given or {}).items() if v is not None}
    chosen = defaults | given
    if not chosen["subject_key"] and "keyed_solve" not in given:
        chosen["keyed_solve"] = False  # the solve keeps the change at the key's inputs: none without the key
    if not chosen["keyed_solve"] and "key_variants" not in given:
        chosen["key_variants"] = ()
    if chosen["keyed_solve"] and chosen.get("early_stop") is None:
        chosen["early_stop"] = r.protected_early_stop
    if chosen["keyed_solve"] and chosen.get("max_epochs") is None:
        chosen["max_epochs"] = r.protected_max_epochs
    return EditConfig(**chosen)
