"""Edit through the subject: the edit loss reaches the edited weights only through the subject's last token.

ROME and MEMIT (Meng et al. 2022) locate a fact's recall in the early-middle MLPs at the subject's last
token, and write the new fact there as ΔW = (v* − W k*) k*ᵀ C⁻¹, keyed on that token's MLP input k*. A plain
gradient step instead sums over every position: ∇W = Σ_t g_t a_tᵀ, so the edit is also written on the
relation tokens ("was employed in") that every sentence of that shape shares. With the subject key the
weight gradient keeps the subject's term only,

    ∇W = Σ_t m_t g_t a_tᵀ,   m_t = 1 at the last token of the prompt's subject, else 0,

while the forward pass and the gradient to the layer input are unchanged. The projector then acts on this
gradient as on any other (Eq. 6). A request without a subject, or whose prompt does not contain it, keeps
every position (m_t = 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from crispedit.requests import EditRequest


def subject_span(prompt: str, subject: str | None) -> tuple[int, int] | None:
    """Character span of the subject's last occurrence in ``prompt`` (case-insensitive), or None."""
    if not subject or not subject.strip():
        return None
    start = prompt.lower().rfind(subject.strip().lower())
    return None if start < 0 else (start, start + len(subject.strip()))


def subject_key_mask(tokenizer, requests: Sequence[EditRequest], seq_len: int) -> torch.Tensor:
    """(batch, seq_len) mask: 1 at the token holding each prompt's last subject character, as
    ``tokenize_edit_batch`` lays the text out (``prompt + spaced_target``, right padded); a row whose
    subject is unknown or absent from its prompt is all ones."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the subject key needs a fast tokenizer (character offsets of each token)")
    mask = torch.zeros(len(requests), seq_len)
    for row, r in enumerate(requests):
        span = subject_span(r.prompt, r.subject)
        if span is None:
            mask[row] = 1.0
            continue
        offsets = tokenizer(r.prompt + r.spaced_target, return_offsets_mapping=True)["offset_mapping"]
        last = span[1] - 1
        hits = [t for t, (s, e) in enumerate(offsets) if s <= last < e]
        if not hits or hits[0] >= seq_len:
            mask[row] = 1.0
        else:
            mask[row, hits[0]] = 1.0
    return mask


class KeyedLinear(torch.autograd.Function):
    """y = x Wᵀ, whose weight gradient counts only the tokens where ``mask`` is 1: ∇W = Σ_t m_t g_t x_tᵀ."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, mask)
        return x @ weight.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad @ weight
        kept = (grad * mask.unsqueeze(-1)).reshape(-1, grad.shape[-1])
        grad_weight = kept.T @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_weight, None


@contextlib.contextmanager
def weight_gradient_at(
    modules: dict[str, nn.Module], mask: torch.Tensor, fan_in_fan_out: bool
) -> Iterator[None]:
    """While open, each module's output is recomputed by ``KeyedLinear``, so its weight learns only from
    the tokens in ``mask`` (batch, seq); the output's value and the gradient to its input are unchanged."""

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        weight = module.weight.T if fan_in_fan_out else module.weight  # (d_out, d_in)
        out = KeyedLinear.apply(x, weight, mask.to(device=x.device, dtype=x.dtype))
        bias = getattr(module, "bias", None)
        return out if bias is None else out + bias

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
