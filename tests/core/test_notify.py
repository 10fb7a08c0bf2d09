"""API processes follow alias moves: a Redis pub/sub notification preloads the new version; polling catches the rest."""

import time
import uuid

import pytest
import torch
from conftest import save_tiny_checkpoint
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from core.notify import AliasFollower, announce_aliases
from registry import Registry
from service.serving import ModelServer

NAME = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def served(tmp_path):
    reg = Registry(tmp_path / "registry")
    server = ModelServer("tiny", str(save_tiny_checkpoint(tmp_path / "tiny")), reg, device="cpu")
    return reg, server


def commit(reg: Registry, server: ModelServer, scale: float) -> str:
    weight = dict(server.model.named_parameters())[NAME].detach()
    return reg.commit("tiny", reg.resolve("tiny", "latest"), {NAME: weight * scale}, originals={NAME: weight}).id


def wait_cached(server: ModelServer, version: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while version not in server.holder.cached_versions:
        assert time.monotonic() < deadline, f"{version} not preloaded: {server.holder.cached_versions}"
        time.sleep(0.02)


def test_a_notification_preloads_the_new_version_before_any_query(served, redis_db):
    reg, server = served
    redis, prefix = Redis(db=redis_db), f"t{uuid.uuid4().hex[:8]}"
    follower = AliasFollower(redis, prefix, {"tiny": server}, poll_seconds=60)  # no poll within the test
    follower.start()
    try:
        deadline = time.monotonic() + 10
        while redis.pubsub_numsub(f"{prefix}:aliases")[0][1] == 0:  # subscribed
            assert time.monotonic() < deadline
            time.sleep(0.02)
        v1 = commit(reg, server, 1.5)
        assert v1 not in server.holder.cached_versions
        announce_aliases(redis, prefix, reg, "tiny")
        wait_cached(server, v1, timeout=5)
        reg.set_alias("tiny", "production", "v0")
        v2 = commit(reg, server, 2.0)
        announce_aliases(redis, prefix, reg, "tiny")
        wait_cached(server, v2, timeout=5)
        with server.holder.use(v2) as model:  # the preloaded tensors are v2's
            assert torch.equal(dict(model.named_parameters())[NAME], reg.blobs.get(reg.get("tiny", v2).tensors[NAME]))
    finally:
        follower.stop()
        follower.join(timeout=5)
        assert not follower.is_alive()


def test_without_redis_the_follower_polls_the_registry(served):
    reg, server = served
    # no retries: redis-py 8 retries a refused connection 3 times with jittered backoff (about 4 s in all),
    # which delayed each poll past the wait below now and then
    unreachable = Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    follower = AliasFollower(unreachable, "t", {"tiny": server}, poll_seconds=0.2)
    follower.start()
    try:
        v1 = commit(reg, server, 1.5)  # no notification: only a poll can find it
        wait_cached(server, v1, timeout=5)
    finally:
        follower.stop()
        follower.join(timeout=5)
        assert not follower.is_alive()
