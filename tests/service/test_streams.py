"""A streamed generation holds its slot only while someone reads it: closed, stalled or cut short, it lets go."""

import pytest
from conftest import save_tiny_checkpoint

from registry import Registry
from service import serving
from service.serving import ModelServer


@pytest.fixture
def server(tmp_path):
    return ModelServer("tiny", str(save_tiny_checkpoint(tmp_path / "tiny")), Registry(tmp_path / "reg"), device="cpu",
                       slots=1)


def slot_free_within(server: ModelServer, seconds: float) -> bool:
    if server.slots.acquire(timeout=seconds):
        server.slots.release()
        return True
    return False


def test_a_stream_read_to_the_end_gives_the_text_and_its_slot_back(server):
    stream = server.open_stream("v0", "The capital of France is", 12, temperature=0.0)
    pieces = []
    while (piece := stream.next_piece()) is not None:
        pieces.append(piece)
    assert "".join(pieces) == server.generate("v0", "The capital of France is", 12, temperature=0.0).text
    assert stream.finish_reason in ("stop", "length") and slot_free_within(server, 5)


def test_a_stream_closed_early_stops_generating_and_gives_its_slot_back(server):
    stream = server.open_stream("v0", "The capital of France is", 100, temperature=1.0, seed=0)
    assert stream.next_piece() is not None
    stream.close()
    assert slot_free_within(server, 5)
    assert stream.done.wait(5) and len(stream.streamer.ids) < 100


def test_a_stalled_reader_loses_its_generation(server, monkeypatch):
    monkeypatch.setattr(serving, "QUEUED_PIECES", 2)
    stream = server.open_stream("v0", "The capital of France is", 100, temperature=1.0, seed=0, stall_seconds=0.2)
    assert slot_free_within(server, 5)  # nobody read: the full queue timed out and the generation ended
    assert stream.done.is_set() and stream.cancelled.event.is_set() and len(stream.streamer.ids) < 100


def test_a_stop_sequence_ends_the_generation_not_only_the_text(server):
    full = server.generate("v0", "The capital of France is", 40, temperature=0.0).text
    stop = full[5:7]
    stream = server.open_stream("v0", "The capital of France is", 40, temperature=0.0, stop=[stop])
    text = ""
    while (piece := stream.next_piece()) is not None:
        text += piece
    assert text == full[: full.index(stop)] and stream.finish_reason == "stop"
    assert stream.done.wait(5) and len(stream.streamer.ids) < 40


def test_a_damaged_version_fails_before_the_stream_starts_and_holds_no_slot(server):
    """A corrupt blob is found while an error can still be a status code, not after the stream's first event."""
    from registry import BlobError

    name = "model.layers.1.mlp.down_proj.weight"
    weight = dict(server.model.named_parameters())[name].detach()
    version = server.registry.commit("tiny", "v0", {name: weight * 1.5}, originals={name: weight})
    path = server.registry.blobs.path(version.tensors[name])
    path.write_bytes(path.read_bytes()[:-8] + b"damaged!")
    with pytest.raises(BlobError, match="corrupt"):
        server.open_stream(version.id, "The capital of France is", 8)
    assert slot_free_within(server, 0.1)
