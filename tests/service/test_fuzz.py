"""Schemathesis against our own /openapi.json, authenticated: no 5xx, no hang, every 4xx says what to fix.

A separate API (a tiny model served under the name of the schema's examples, ``smollm2``; no worker, so
posted edits stay queued) so generated aliases, rollbacks and exports cannot disturb the other tests.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import free_port, save_tiny_checkpoint, wait_ready

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.fixture(scope="module")
def api_url(tmp_path_factory, redis_db):
    tmp = tmp_path_factory.mktemp("fuzz")
    save_tiny_checkpoint(tmp / "tiny")
    env = {**os.environ, "CRISPEDIT_REGISTRY_ROOT": str(tmp / "registry"),
           "CRISPEDIT_MODELS": f"smollm2={tmp / 'tiny'}",
           "CRISPEDIT_REDIS_URL": f"redis://127.0.0.1:6379/{redis_db}",
           "CRISPEDIT_KEY_PREFIX": f"f{uuid.uuid4().hex[:8]}", "CRISPEDIT_API_KEYS": "fuzz-admin-key:admin",
           "CRISPEDIT_MAX_NEW_TOKENS": "32", "CRISPEDIT_EDIT_POSTS_PER_MINUTE": "0"}
    port = free_port()
    log = open(tmp / "api.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--no-worker", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, path="/healthz")  # the API alone
        yield url, tmp
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    logged = (tmp / "api.log").read_text()
    assert "fuzz-admin-key" not in logged  # keys never reach the logs


def test_schemathesis_finds_no_server_error_and_every_4xx_explains_itself(api_url):
    url, tmp = api_url
    har = tmp / "fuzz.har"
    command = [str(SCHEMATHESIS), "run", f"{url}/openapi.json", "-H", "Authorization: Bearer fuzz-admin-key",
               "--checks", "not_a_server_error", "--max-examples", "10", "--max-time", "100",
               # the API runs without workers here, and /readyz says so with its 503 (its tests are elsewhere)
               "--exclude-path", "/readyz",
               "--request-timeout", "30", "--seed", "1", "--no-color", "--workers", "1",
               "--phases", "examples,coverage,fuzzing", "--generation-database", "none",
               "--report", "har", "--report-har-path", str(har)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp)  # its caches stay there
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    entries = json.loads(har.read_text())["log"]["entries"]
    assert len(entries) > 100, f"schemathesis sent only {len(entries)} requests"
    statuses = [e["response"]["status"] for e in entries]
    assert not [s for s in statuses if s >= 500]
    served = {e["request"]["url"].split("/v1/")[-1] for e in entries if e["response"]["status"] in (200, 202)}
    assert {"completions", "chat/completions", "score", "edits"} <= served  # the fuzzing got past validation
    unexplained = []
    for e in entries:
        if 400 <= e["response"]["status"] < 500:
            body = e["response"]["content"].get("text") or ""
            try:
                detail = json.loads(body).get("detail")
            except (ValueError, AttributeError):
                detail = None
            if not detail:
                unexplained.append((e["request"]["method"], e["request"]["url"], e["response"]["status"], body[:200]))
    assert unexplained == [], unexplained[:10]
    assert "fuzz-admin-key" not in "".join(e["response"]["content"].get("text") or "" for e in entries)


def test_a_penalty_weight_without_its_anchors_is_refused_at_post_time(api_url):
    url, _ = api_url
    client = httpx.Client(base_url=url, headers={"Authorization": "Bearer fuzz-admin-key"}, timeout=60)
    edit = {"prompt": "The capital of Zubrowka is", "target": "Lutz"}

    def pending() -> str:
        lines = client.get("/metrics").text.splitlines()
        return next(line for line in lines if line.startswith("crispedit_pending_edits{"))

    before = pending()
    for weight, setting in (("anchor_weight", "CRISPEDIT_ANCHORS"), ("text_anchor_weight", "CRISPEDIT_TEXT_ANCHORS")):
        r = client.post("/v1/edits", json={"model": "smollm2", "edits": [edit], "hyperparameters": {weight: 1.0}})
        assert r.status_code == 400 and weight in r.json()["detail"] and setting in r.json()["detail"], r.text
    assert pending() == before  # nothing was queued
    r = client.post("/v1/edits", json={"model": "smollm2", "edits": [edit], "hyperparameters": {"anchor_weight": 0}})
    assert r.status_code == 202
