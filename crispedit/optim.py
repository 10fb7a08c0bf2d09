"""Projected Adam, as the official CrispEdit code runs Algorithm 1 (arXiv 2602.15823, Eq. 6).

Each step replaces a weight's gradient Q by its projection P_γ Q (Eq. 6), then takes a standard Adam
step. When the projector changes (a new sequential chunk, or a curvature recompute), the first moment
is projected onto the new subspace; the second moment and step count are kept, as in the paper's code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# a LayerProjector (Eq. 6): maps a weight-shaped tensor to its projection
Projector = Callable[[torch.Tensor], torch.Tensor]


class ProjectedAdam(torch.optim.Adam):
    """Adam over ``params`` whose gradients are first projected by ``projectors`` (same order; None = plain).

    A weight stored in less than fp32 (a bf16 model) is stepped through an fp32 master copy, as mixed-precision
    training does: a step is about 1 % of a weight, close to bf16's resolution (2⁻⁸), so rounding each step into
    the weight would lose much of it.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        projectors: list[Projector | None],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if len(params) != len(projectors):
            raise ValueError("one projector (or None) per parameter")
        self.weights = list(params)
        masters = [p if p.dtype == torch.float32 else p.detach().float() for p in self.weights]
        super().__init__(masters, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        self.projectors = list(projectors)

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(the model's weight, the tensor Adam steps): the same tensor unless the weight is below fp32."""
        return list(zip(self.weights, self.param_groups[0]["params"], strict=True))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for weight, master in self.pairs():
            if weight is not master:
                weight.grad = None

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Replace each gradient Q by P_γ Q (Eq. 6), in place."""
        for (weight, p), projector in zip(self.pairs(), self.projectors, strict=True):
            if weight is not p:
                p.grad = None if weight.grad is None else weight.grad.float()
            if projector is not None and p.grad is not None:
                p.grad.copy_(projector(p.grad))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """Project the gradients (Eq. 6), then take Adam's step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.project_gradients()
        super().step()
        for weight, master in self.pairs():
            if weight is not master:
                weight.copy_(master)
        return loss

    @torch.no_grad()
    def set_projectors(self, projectors: list[Projector | None]) -> None:
        """Swap in new projectors and project each first moment m ← P_γ m onto the new subspace."""
        params = self.param_groups[0]["params"]
        for p, projector in zip(params, projectors, strict=True):
            state = self.state.get(p, {})
            if projector is not None and "exp_avg" in state:
                state["exp_avg"].copy_(projector(state["exp_avg"]))
        self.projectors = list(projectors)
