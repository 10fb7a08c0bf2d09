"""Reading the edited layers' inputs: the same tensors as a whole forward pass, without the layers above."""

import torch

from crispedit.arch import editable_modules
from crispedit.layer_inputs import read_inputs


def test_read_inputs_matches_a_full_pass_and_stops_at_the_last_module(tiny):
    model, tok = tiny
    modules = editable_modules(model, (0, 1))
    batch = tok(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    full: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: full.__setitem__(n, i[0])) for n, m in modules.items()]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    above = editable_modules(model, (2,))
    calls = []
    marker = next(iter(above.values())).register_forward_hook(lambda *_: calls.append(1))
    read: dict[str, torch.Tensor] = {}
    read_inputs(model, modules, read.__setitem__, **batch)
    marker.remove()
    assert set(read) == set(modules)
    for name in modules:
        torch.testing.assert_close(read[name], full[name], rtol=0, atol=0)
    assert calls == []  # layer 2 was never run
    read_inputs(model, editable_modules(model, (2,)), read.__setitem__, **batch)  # the last layer: to the end
    assert len(read) == 3
