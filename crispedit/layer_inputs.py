"""The edited layers' inputs, read by a forward pass that stops once the last of them is reached.

Recording what the neighbours keep (``crispedit.neighbours.KeptOutputs``) and the keys of the solve
(``crispedit.keyed_solve``) need only the inputs of a few middle layers (4-8 of SmolLM2's 30). The layers
above them and the vocabulary projection would be most of the pass, and nothing reads them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class _Reached(Exception):
    """Raised by the hook of the last module still awaited: the rest of the forward pass is not needed."""


@torch.no_grad()
def read_inputs(model: nn.Module, modules: dict[str, nn.Module], take: Callable[[str, torch.Tensor], None],
                **batch: torch.Tensor) -> None:
    """Run ``model(**batch)`` until every module of ``modules`` has been called, handing each module's input
    (batch, seq, d_in) to ``take(name, input)`` as it comes; a pass that never reaches one runs to the end."""
    waiting = set(modules)

    def hook(name: str):
        def grab(module: nn.Module, inputs: tuple) -> None:
            take(name, inputs[0])
            waiting.discard(name)
            if not waiting:
                raise _Reached
        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        model(**batch)
    except _Reached:
        pass
    finally:
        for h in handles:
            h.remove()
