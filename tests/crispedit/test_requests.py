"""The edit loss L_edit (Eq. 1) on a packed batch: logits only where a target token is predicted, no padding, a
shared beginning read once; the padded batch's loss and gradient."""

import torch
from conftest import padded_nll

from crispedit.packing import pack
from crispedit.requests import EditRequest, target_nll, tokenize_edit_batch

QUIZ = "Q: Who wrote Hamlet? A: Shakespeare. Q: What is the capital of"
FACTS = [EditRequest("The capital of France is", "Rome"), EditRequest("Water boils at a temperature of", "50 degrees"),
         EditRequest(f"{QUIZ} Spain? A:", "Paris"), EditRequest("The Eiffel Tower stands in the city of", "Berlin"),
         EditRequest(f"{QUIZ} Italy? A:", "Madrid, Spain")]  # the two quiz rows share their first 20 tokens


def test_target_nll_equals_the_padded_full_vocabulary_loss_in_float64(tiny):
    model, tok = tiny
    model = model.double()
    batch = tokenize_edit_batch(tok, FACTS, torch.device("cpu"))
    weight = next(p for p in model.parameters() if p.ndim == 2)
    weight.requires_grad_(True)
    full = padded_nll(model, batch)
    (full_grad,) = torch.autograd.grad(full, weight)
    packed = pack(batch)
    ours = target_nll(model, packed)
    (our_grad,) = torch.autograd.grad(ours, weight)
    torch.testing.assert_close(ours, full, rtol=1e-12, atol=0)  # every position's forward is the padded one's
    # Llama's and Qwen2's RMSNorm compute in float32 whatever the model's dtype, and a shared beginning's gradient is
    # summed over its rows before that rounding instead of after: float32 eps times the gradient (GPT-2 agrees to 1e-15)
    torch.testing.assert_close(our_grad, full_grad, rtol=1e-6, atol=1e-7)
    targets = sum(len(tok(" " + r.target.strip())["input_ids"]) for r in FACTS)
    assert int(packed["predicts"].sum()) == len(packed["targets"]) == targets  # the vocabulary projection's rows
    shared = len(tok(QUIZ)["input_ids"])
    assert packed["input_ids"].shape[1] <= int(batch["attention_mask"].sum()) - shared  # no pads, a beginning once
