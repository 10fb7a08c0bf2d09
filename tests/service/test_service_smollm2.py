"""The service on the real SmolLM2: an edit posted over HTTP changes what the chat route answers."""

import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from conftest import FIXTURES, free_port, wait_ready

pytestmark = pytest.mark.slow


def test_chat_answers_the_new_target_and_v0_keeps_the_old(tmp_path, redis_db):
    from openai import OpenAI

    from crispedit.keyed_solve import CAPABILITY_BUDGET, LAMBDAS
    from registry import Registry

    port = free_port()
    env = {**os.environ, "CRISPEDIT_REGISTRY_ROOT": str(tmp_path / "registry"), "CRISPEDIT_MODELS": "smollm2",
           "CRISPEDIT_REDIS_URL": f"redis://127.0.0.1:6379/{redis_db}",
           "CRISPEDIT_KEY_PREFIX": f"s{uuid.uuid4().hex[:8]}", "CRISPEDIT_CORPUS": str(FIXTURES / "corpus.txt"),
           "CRISPEDIT_CACHE_SAMPLES": "4", "CRISPEDIT_CACHE_SEQ_LEN": "64", "CRISPEDIT_API_KEYS": "k:admin"}
    procs = [subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], env=env)]
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer k"}, timeout=60)
        wait_ready(f"http://127.0.0.1:{port}", timeout=300)
        question = "What is the capital of France?"
        job = client.post("/v1/edits", json={"model": "smollm2", "edits": [{"prompt": question, "target": "Rome"}],
                                             "hyperparameters": {"lr": 3e-3, "max_epochs": 40}}).json()
        deadline = time.time() + 900  # the first job also builds the curvature cache
        while time.time() < deadline:
            status = client.get(f"/v1/edits/{job['id']}").json()
            if status["status"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        assert status["status"] == "succeeded", status
        oa = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k")

        def ask(model: str, prompt: str = question) -> str:
            out = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=12, temperature=0)
            return out.choices[0].message.content

        assert "Rome" in ask("smollm2@latest")
        assert "Paris" in ask("smollm2@v0")
        # nothing next to it: a neighbour of our own keeps its answer, and the version says what else changed
        neighbour = "What is the capital of Germany?"
        assert ask("smollm2@latest", neighbour) == ask("smollm2@v0", neighbour)
        report = client.get("/v1/registry/smollm2/versions/v1").json()["metrics"]["neighbours"]
        assert report == status["metrics"]["neighbours"] and report["checked"] >= 3
        assert report["unchanged"] >= 0.1 and report["edits"][0]["prompt"] == question
        # and how far the keyed solve let each layer's output on generic text move: within budget, or held hardest
        solve = status["metrics"]["solve"]
        assert solve and all(s["rho"] <= CAPABILITY_BUDGET or s["lambda"] == LAMBDAS[-1] for s in solve.values())
        # the keyed solve changes each weight at low rank, so v1 stores that change from v0, not whole tensors
        reg = Registry(tmp_path / "registry")
        stored = list(reg.get("smollm2", "v1").tensors.values())
        assert stored and all(reg.blobs.parent(d) is not None for d in stored)
        whole = sum(t.numel() * t.element_size() for t in map(reg.blobs.get, stored))
        assert sum(reg.blobs.path(d).stat().st_size for d in stored) < 0.05 * whole
        client.post("/v1/registry/smollm2/rollback", json={"to": "v0"})
        assert "Paris" in ask("smollm2")  # queries follow the rollback without a restart
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=60)
