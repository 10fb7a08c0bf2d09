"""The edit loss L_edit (Eq. 1): logits only where a target token is predicted, the same loss and gradient."""

import torch
import torch.nn.functional as F

from crispedit.requests import EditRequest, target_nll, target_positions, tokenize_edit_batch

FACTS = [EditRequest("The capital of France is", "Rome"), EditRequest("Water boils at a temperature of", "50 degrees"),
         EditRequest("The Eiffel Tower stands in the city of", "Berlin, Germany")]


def test_target_nll_equals_the_full_vocabulary_loss_in_float64(tiny):
    model, tok = tiny
    model = model.double()
    batch = tokenize_edit_batch(tok, FACTS, torch.device("cpu"))
    weight = next(p for p in model.parameters() if p.ndim == 2)
    weight.requires_grad_(True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # every position
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    (full_grad,) = torch.autograd.grad(full, weight)
    ours = target_nll(model, batch)
    (our_grad,) = torch.autograd.grad(ours, weight)
    torch.testing.assert_close(ours, full, rtol=1e-12, atol=0)
    torch.testing.assert_close(our_grad, full_grad, rtol=1e-10, atol=1e-14)
    targets = sum(len(tok(" " + r.target.strip())["input_ids"]) for r in FACTS)
    assert int(target_positions(batch["labels"]).sum()) == targets  # the vocabulary projection sees these alone
