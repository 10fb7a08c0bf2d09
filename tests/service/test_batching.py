"""Batched generation: concurrent completions of one version share forward passes and each gets what it would
have got alone (its own length, stop sequences and cancellation)."""

import threading

import pytest
import torch
from conftest import save_tiny_checkpoint

from registry import Registry
from service.serving import ModelServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batching")
    return ModelServer("tiny", str(save_tiny_checkpoint(tmp / "tiny")), Registry(tmp / "reg"), device="cpu",
                       slots=1, batch=16)


def alone(server, prompt: str, max_tokens: int, version: str = "v0") -> list[int]:
    """Greedy generation of one prompt by itself, as the server ran every request before batching."""
    inputs = server._inputs(prompt)
    with server.holder.use(version) as model, torch.no_grad():
        out = model.generate(**inputs, **server._gen_kwargs(max_tokens, 0.0, 1.0, None))
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_concurrent_completions_share_a_batch_and_each_gets_its_own_answer(server):
    batches = []
    run = server._run_batch
    server.batcher.run = lambda jobs: (batches.append(len(jobs)), run(jobs))
    asks = [("The capital of France is", 12, None), ("Water", 3, None), ("Hamlet was written by a", 8, None),
            ("The chemical symbol for gold is", 1, None), ("abc", 10, ["e"]), ("Q: Who wrote Hamlet? A:", 6, None)]
    results: dict[int, object] = {}
    cancel = threading.Event()
    server.slots.acquire()  # every slot busy: the requests wait together, as under load
    threads = [threading.Thread(target=lambda i=i, a=a: results.__setitem__(i, server.generate("v0", a[0], a[1],
               temperature=0.0, stop=a[2]))) for i, a in enumerate(asks)]
    left = threading.Thread(target=lambda: results.__setitem__("left", server.generate(
        "v0", "a client that leaves", 50, temperature=0.0, cancel=cancel)))
    for t in [*threads, left]:
        t.start()
    while len(server.batcher.pending) < len(asks) + 1:
        threading.Event().wait(0.01)
    cancel.set()  # it leaves before its turn: withdrawn, never generated
    left.join(timeout=5)
    server.slots.release()
    for t in threads:
        t.join(timeout=60)
    assert batches == [len(asks)]  # one forward pass per step for all six
    assert results["left"].completion_tokens == 0
    for i, (prompt, max_tokens, stop) in enumerate(asks):
        expected = alone(server, prompt, max_tokens)
        got = results[i]
        if stop is None:
            assert got.new_ids == expected, (prompt, got.new_ids, expected)
            assert got.finish_reason == ("length" if len(expected) == max_tokens else "stop")
        else:
            text = server.tokenizer.decode(expected, skip_special_tokens=True)
            assert got.text == text.split(stop[0])[0] and (got.finish_reason == "stop") == (stop[0] in text)
    server.batcher.run = run


def test_a_seeded_sample_runs_alone_and_repeats(server):
    first = server.generate("v0", "The capital of France is", 8, temperature=1.0, seed=7)
    again = server.generate("v0", "The capital of France is", 8, temperature=1.0, seed=7)
    assert first.new_ids == again.new_ids


def test_one_batch_serves_several_versions_each_with_its_own_edited_layers(server):
    """v1 and v2 change different layers; rows of each get their own weights, every other layer is shared."""
    reg, params = server.registry, dict(server.model.named_parameters())
    g = torch.Generator().manual_seed(0)
    for layer in (1, 2):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        base = params[name].detach().clone()
        reg.commit("tiny", reg.resolve("tiny", "latest"), {name: base + 0.5 * torch.randn(base.shape, generator=g)},
                   originals={name: base})
    asks = [(v, p) for v in ("v0", "v1", "v2", "v1") for p in ("The capital of France is", "Water boils at")]
    expected = [alone(server, p, 10, v) for v, p in asks]
    assert len({tuple(e) for e in expected}) > 2  # the versions answer differently
    batches = []
    run = server._run_batch
    server.batcher.run = lambda jobs: (batches.append(sorted({j.version for j in jobs})), run(jobs))
    results: dict[int, object] = {}
    server.slots.acquire()
    threads = [threading.Thread(target=lambda i=i, a=a: results.__setitem__(i, server.generate(
        a[0], a[1], 10, temperature=0.0))) for i, a in enumerate(asks)]
    for t in threads:
        t.start()
    while len(server.batcher.pending) < len(asks):
        threading.Event().wait(0.01)
    server.slots.release()
    for t in threads:
        t.join(timeout=60)
    server.batcher.run = run
    assert batches == [["v0", "v1", "v2"]]
    assert [results[i].new_ids for i in range(len(asks))] == expected
    assert alone(server, "Water boils at", 10, "v0") == expected[1]  # no hook is left behind
    # two names of one version in one batch: both rows get its weights (here "latest" is v2)
    x = server._inputs("Water boils at")["input_ids"].repeat(3, 1)
    with torch.no_grad():
        with server.holder.use_rows({"v0": [0], "v2": [1], "latest": [2]}) as model:
            logits = model(input_ids=x).logits
        with server.holder.use("v2") as model:
            solo = model(input_ids=x[:1]).logits
    torch.testing.assert_close(logits[1:], solo.expand(2, -1, -1), atol=1e-5, rtol=1e-5)


def test_a_version_that_cannot_load_fails_its_own_rows_only(server):
    from registry import BlobError

    reg, params = server.registry, dict(server.model.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    damaged = reg.commit("tiny", reg.resolve("tiny", "latest"), {name: params[name].detach() + 1.0},
                         originals={name: params[name].detach()})
    reg.blobs.path(damaged.tensors[name]).write_bytes(b"not a tensor")  # a disk fault after the commit
    expected = alone(server, "Water boils at", 6, "v2")
    results: dict[str, object] = {}

    def ask(version: str) -> None:
        try:
            results[version] = server.generate(version, "Water boils at", 6, temperature=0.0)
        except BlobError as err:
            results[version] = err

    server.slots.acquire()
    threads = [threading.Thread(target=ask, args=(v,)) for v in (damaged.id, "v2")]
    for t in threads:
        t.start()
    while len(server.batcher.pending) < 2:
        threading.Event().wait(0.01)
    server.slots.release()
    for t in threads:
        t.join(timeout=60)
    assert isinstance(results[damaged.id], BlobError) and results["v2"].new_ids == expected


def test_a_seeded_sample_with_a_stop_sequence_stops_generating_there(server):
    full = server.generate("v0", "The capital of France is", 12, temperature=1.0, seed=7)
    pieces = [server.tokenizer.decode([t]) for t in full.new_ids]
    k, stop = next((k, p) for k, p in enumerate(pieces) if k >= 2 and p.strip().isalnum())  # a piece it writes
    with server.holder.use("v0") as model:
        passes = []
        hook = model.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        cut = server.generate("v0", "The capital of France is", 12, temperature=1.0, seed=7, stop=[stop])
    finally:
        hook.remove()
    assert cut.new_ids == full.new_ids[: len(cut.new_ids)] and len(passes) == len(cut.new_ids) <= k + 1
    assert stop not in cut.text and cut.finish_reason == "stop"
