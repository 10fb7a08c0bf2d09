"""The service end to end: real HTTP (uvicorn), real Redis, a real RQ worker process, the official openai client."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from conftest import EDIT, FAST, FIXTURES, api, free_port, save_tiny_checkpoint, wait_done, wait_ready

from crispedit.arch import Recipe

RATE_LIMIT = 30


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_db):
    tmp = tmp_path_factory.mktemp("service")
    save_tiny_checkpoint(tmp / "tiny")
    db = redis_db
    env = {**os.environ, "CRISPEDIT_REGISTRY_ROOT": str(tmp / "registry"), "CRISPEDIT_MODELS": f"tiny={tmp / 'tiny'}",
           "CRISPEDIT_REDIS_URL": f"redis://127.0.0.1:6379/{db}", "CRISPEDIT_KEY_PREFIX": f"t{uuid.uuid4().hex[:8]}",
           "CRISPEDIT_CORPUS": str(FIXTURES / "corpus.txt"), "CRISPEDIT_CACHE_SAMPLES": "4",
           "CRISPEDIT_ANCHORS": str(FIXTURES / "anchors.jsonl"),  # text anchors: by default, the corpus file
           "CRISPEDIT_CACHE_SEQ_LEN": "32", "CRISPEDIT_MIN_RELIABILITY": "0.5", "CRISPEDIT_KL_BUDGET": "10",
           # a random tiny model's answers are near ties, and its neighbours share most tokens with the edits
           "CRISPEDIT_MIN_NEIGHBOURS_UNCHANGED": "0", "CRISPEDIT_NEIGHBOUR_WEIGHT": "0.1",
           "CRISPEDIT_LEASE_SECONDS": "2",
           "CRISPEDIT_API_KEYS": "admin-key:admin,editor-key:editor,reader-key:reader,limited-key:editor,"
                                 "other-key:editor",
           "CRISPEDIT_EDIT_POSTS_PER_MINUTE": str(RATE_LIMIT)}
    port = free_port()
    logs = tmp / "api.log"
    command = [sys.executable, "-m", "cli.main", "serve", "--no-worker", "--port", str(port)]
    api = subprocess.Popen(command, env=env, stdout=open(logs, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, path="/healthz")  # no worker runs yet
    except BaseException:
        api.kill()
        print(logs.read_text()[-2000:])
        raise

    def start_worker():
        return subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--model", "tiny"], env=env,
                                stdout=open(tmp / "worker.log", "a"), stderr=subprocess.STDOUT)

    yield {"url": url, "env": env, "start_worker": start_worker, "tmp": tmp, "db": db}
    api.terminate()
    api.wait(timeout=30)


def applied(service, client: httpx.Client, job_id: str) -> dict:
    """Start a worker, wait for the edit to end, stop the worker: the edit's final record."""
    worker = service["start_worker"]()
    try:
        return wait_done(client, job_id)
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def wait_logged(path: Path, text: str, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while text not in path.read_text():
        assert time.time() < deadline, f"{path.name} never said {text!r}"
        time.sleep(0.1)


def test_edit_query_rollback_through_the_service(service):
    from openai import OpenAI

    editor, admin, reader = api(service, "editor"), api(service, "admin"), api(service, "reader")
    # three edit requests queued before any worker runs: one worker wake-up applies them as one batch
    posted = [editor.post("/v1/edits", json={"model": "tiny", "edits": [e], "hyperparameters": FAST})
              for e in (EDIT, {"prompt": "Hamlet was written by", "target": "Madrid"},
                        {"prompt": "The chemical symbol for gold is", "target": "Ag"})]
    assert all(r.status_code == 202 for r in posted), [r.text for r in posted]
    ids = [r.json()["id"] for r in posted]
    assert posted[0].json()["status_url"].endswith(f"/v1/edits/{ids[0]}")
    worker = service["start_worker"]()
    jobs = [wait_done(reader, i) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs
    assert {j["version"] for j in jobs} == {"v1"} and sorted(jobs[0]["batch"]) == sorted(ids)
    assert jobs[0]["metrics"]["reliability"] >= 0.5
    wait_logged(service["tmp"] / "api.log", "tiny@latest → v1: preloaded")  # the worker's notification


    events = reader.get(f"/v1/edits/{ids[0]}/events").text
    kinds = [line.split(": ", 1)[1] for line in events.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "queued" and "epoch" in kinds and "evaluation" in kinds and kinds[-1] == "succeeded"
    # queued while the first worker built the curvature cache: its progress reached the edit
    built = [json.loads(line[6:]) for line in events.splitlines()
             if line.startswith("data: ") and '"preparing"' in line and '"K-FAC"' in line]
    assert built and built[-1]["done"] == built[-1]["total"] > 0

    client = OpenAI(base_url=f"{service['url']}/v1", api_key="reader-key")
    ids_listed = {m.id for m in client.models.list()}
    assert {"tiny", "tiny@v0", "tiny@v1", "tiny@latest"} <= ids_listed
    v0 = reader.post("/v1/score", json={"model": "tiny@v0", **EDIT}).json()
    v1 = reader.post("/v1/score", json={"model": "tiny@v1", **EDIT}).json()
    assert v1["logprob"] > v0["logprob"] + 1.0 and v1["model"] == "tiny@v1"
    out = client.completions.create(model="tiny@v1", prompt=EDIT["prompt"], max_tokens=3, temperature=0)
    assert out.model == "tiny@v1" and out.usage.completion_tokens >= 1
    chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    chunks = list(client.chat.completions.create(**chat, stream=True))
    whole = client.chat.completions.create(**chat).choices[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason  # "length" when cut at max_tokens
    assert chunks[0].model == "tiny@v1"  # plain name: production if set, else latest

    assert admin.put("/v1/registry/tiny/aliases/production", json={"version": "v1"}).json()["version"] == "v1"
    rolled = admin.post("/v1/registry/tiny/rollback", json={"to": "v0"}).json()
    assert rolled["aliases"] == {"latest": "v0", "production": "v0"}
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=0).model == "tiny@v0"
    versions = reader.get("/v1/registry/tiny/versions").json()
    assert [v["id"] for v in versions["data"]] == ["v0", "v1"]  # history kept
    assert versions["data"][1]["hyperparameters"]["anchor_weight"] == 1.0  # the server's anchors were used
    assert versions["data"][1]["hyperparameters"]["text_anchor_weight"] == Recipe().text_anchor_weight  # its text
    assert versions["data"][1]["hyperparameters"]["augment"] == ["paraphrase", "prefix", "qa"]  # 'auto' with anchors
    assert versions["data"][1]["hyperparameters"]["method"] == "crispedit"  # the paper's, by default
    assert versions["data"][1]["hyperparameters"]["neighbour_weight"] == 0.1  # the server's protection
    assert versions["data"][1]["hyperparameters"]["subject_key"] is False  # as the request asked
    report = reader.get("/v1/registry/tiny/versions/v1").json()["metrics"]["neighbours"]  # what else changed
    assert report == jobs[0]["metrics"]["neighbours"] and report["checked"] >= 1
    assert [e["prompt"] for e in report["edits"]] == [EDIT["prompt"], "Hamlet was written by",
                                                      "The chemical symbol for gold is"]
    assert all({"prompt", "kind", "before", "after", "unchanged"} <= set(n) for e in report["edits"]
               for n in e["neighbours"])
    assert reader.get("/v1/registry/tiny/diff", params={"from": "v0", "to": "v1"}).json()["tensors"]

    # the guard rejects an edit over budget: nothing committed, production untouched
    rejected = editor.post("/v1/edits", json={"model": "tiny", "edits": [EDIT], "hyperparameters": FAST,
                                              "guard": {"kl_budget": 1e-12}}).json()
    job = wait_done(reader, rejected["id"])
    assert job["status"] == "rejected" and "KL" in job["error"] and job["version"] is None
    assert reader.get("/v1/registry/tiny/versions").json()["aliases"] == {"latest": "v0", "production": "v0"}

    # ... and an edit that changes the answers of its neighbours (here its locality prompt), figures in hand
    wrecking = {"method": "ft", "lr": 0.3, "max_epochs": 10, "neighbour_weight": 0}
    changing = editor.post("/v1/edits", json={
        "model": "tiny", "edits": [{**EDIT, "locality_prompt": "Water boils at"}], "hyperparameters": wrecking,
        "guard": {"min_neighbours_unchanged": 1.0, "min_reliability": 0}}).json()
    job = wait_done(reader, changing["id"])
    assert job["status"] == "rejected" and "changed its neighbours" in job["error"], job
    report = job["metrics"]["neighbours"]
    assert report["changed"] >= 1 and job["metrics"]["neighbours_unchanged"] < 1.0
    assert any(n["prompt"] == "Water boils at" for n in report["edits"][0]["neighbours"])
    assert [v["id"] for v in reader.get("/v1/registry/tiny/versions").json()["data"]] == ["v0", "v1"]
    worker.terminate()
    worker.wait(timeout=30)
    assert "committed as v1" in (service["tmp"] / "worker.log").read_text()  # the worker says what it did
    audit = [json.loads(line) for line in (service["tmp"] / "audit.log").read_text().splitlines()]
    assert [a["action"] for a in audit].count("post_edit") == 5 and "rollback" in [a["action"] for a in audit]
    text = (service["tmp"] / "audit.log").read_text() + (service["tmp"] / "api.log").read_text()
    assert "editor-key" not in text and "admin-key" not in text  # keys never reach a log


def test_bad_input_gets_a_clear_4xx(service):
    c = api(service, "admin")
    r = c.post("/v1/edits", json={"model": "tiny", "edits": [{"prompt": "The sky is", "target": "  "}]})
    assert r.status_code == 422 and "edits.0.target" in r.json()["detail"]
    r = c.post("/v1/edits", json={"model": "nope", "edits": [EDIT]})
    assert r.status_code == 404 and "available: ['tiny']" in r.json()["detail"]
    r = c.post("/v1/edits", json={"model": "tiny", "edits": [EDIT], "hyperparameters": {"lr": -1}})
    assert r.status_code == 422 and "lr" in r.json()["detail"]
    r = c.post("/v1/edits", json={"model": "tiny", "edits": [EDIT], "hyperparameters": {"method": "rome"}})
    assert r.status_code == 422 and "method" in r.json()["detail"]
    r = c.post("/v1/edits", json={"model": "tiny", "edits": [EDIT], "hyperparameters": {"capability_budget": -0.1}})
    assert r.status_code == 422 and "capability_budget" in r.json()["detail"]
    r = c.post("/v1/edits", json={"model": "tiny", "edits": [EDIT], "guard": {"kl_base_budget": 0}})
    assert r.status_code == 422 and "kl_base_budget" in r.json()["detail"]
    r = c.post("/v1/completions", json={"model": "tiny@v99", "prompt": "x"})
    assert r.status_code == 404 and "v99" in r.json()["detail"]
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 10**6})
    assert r.status_code == 400 and "limit" in r.json()["detail"]
    r = c.put("/v1/registry/tiny/aliases/..%2Fescape", json={"version": "v0"})
    assert r.status_code in (400, 404)
    r = c.post("/v1/edits", content=b"{" + b" " * 2_000_000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunked():  # no Content-Length: the limit must hold as the body arrives
        yield b"{"
        for _ in range(64):
            yield b" " * 65536

    r = c.post("/v1/edits", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    anonymous = httpx.Client(base_url=service["url"], timeout=60)  # without a key, refused before any byte is read
    r = anonymous.post("/v1/edits", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 401
    assert c.get("/v1/edits/edit-nope").status_code == 404
    spec = c.get("/openapi.json").json()
    assert spec["info"]["title"] == "CrispEdit Service"
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"  # Swagger's Authorize button
    assert spec["paths"]["/v1/edits"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "crispedit_http_requests_total" in c.get("/metrics").text
    # prompts: an empty one starts a new document (as OpenAI's does); one longer than the context is a 400
    empty = c.post("/v1/completions", json={"model": "tiny", "prompt": [""], "max_tokens": 2, "temperature": 0})
    assert empty.status_code == 200 and len(empty.json()["choices"]) == 1
    # found by the fuzzer: a vanishing temperature is greedy (not inf logits), a seed torch cannot take is a 422
    tiny_t = c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 1e-300})
    assert tiny_t.status_code == 200
    huge_seed = c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "seed": 10**30})
    assert huge_seed.status_code == 422 and "seed" in huge_seed.json()["detail"]
    for route, body in (("/v1/completions", {"prompt": "x " * 200, "max_tokens": 2}),
                        ("/v1/completions", {"prompt": "x " * 200, "max_tokens": 2, "stream": True}),
                        ("/v1/score", {"prompt": "x " * 200, "target": "y"})):
        r = c.post(route, json={"model": "tiny", **body})
        assert r.status_code == 400 and "context of 128" in r.json()["detail"], (route, r.text)


def test_edit_posts_are_rate_limited_per_key(service):
    limited = api(service, "limited")
    body = {"model": "tiny", "edits": [EDIT], "base_version": "v404"}  # counted, then 404: no job is queued
    for _ in range(2):
        minute = int(time.time() // 60)
        codes = [limited.post("/v1/edits", json=body).status_code for _ in range(RATE_LIMIT)]
        refused = limited.post("/v1/edits", json=body)
        if int(time.time() // 60) == minute:
            break
        time.sleep(61 - time.time() % 60)  # the window turned during the burst: redo it in a fresh one
    assert codes == [404] * RATE_LIMIT
    assert refused.status_code == 429 and "per minute" in refused.json()["detail"]
    assert 0 < int(refused.headers["retry-after"]) <= 60
    assert api(service, "editor").post("/v1/edits", json=body).status_code == 404  # other keys are unaffected


def test_idempotency_key_and_cancel(service):
    c = api(service, "editor")
    body = {"model": "tiny", "edits": [EDIT], "hyperparameters": FAST}
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = c.post("/v1/edits", json=body, headers=key).json()
    second = c.post("/v1/edits", json=body, headers=key).json()
    assert first["id"] == second["id"]
    # the key is bound to its request: another edit under it is refused, not answered with the first job
    other = c.post("/v1/edits", json={**body, "edits": [{"prompt": "The sky is", "target": "green"}]}, headers=key)
    assert other.status_code == 422 and first["id"] in other.json()["detail"]
    # ... and to its API key: the same Idempotency-Key from another key is another request
    theirs = api(service, "other").post("/v1/edits", json=body, headers=key)
    assert theirs.status_code == 202 and theirs.json()["id"] != first["id"]
    # a queued edit is cancelled by its poster or an admin, not by another editor
    refused = api(service, "other").delete(f"/v1/edits/{first['id']}")
    assert refused.status_code == 403 and "another key" in refused.json()["detail"]
    assert api(service, "admin").delete(f"/v1/edits/{theirs.json()['id']}").status_code == 200
    cancelled = c.delete(f"/v1/edits/{first['id']}")  # no worker runs in this test: still queued
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = c.delete(f"/v1/edits/{first['id']}")
    assert again.status_code == 409 and "only queued" in again.json()["detail"]
    assert c.get(f"/v1/edits/{first['id']}").json()["status"] == "cancelled"


ROUTES = [  # (method, path, body, lowest role that may call it)
    ("GET", "/v1/models", None, "reader"),
    ("GET", "/v1/models/tiny@v0", None, "reader"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}, "reader"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": 1}, "reader"),
    ("POST", "/v1/score", {"model": "tiny", "prompt": "x", "target": "y"}, "reader"),
    ("GET", "/v1/registry/tiny/versions", None, "reader"),
    ("GET", "/v1/registry/tiny/versions/v0", None, "reader"),
    ("GET", "/v1/registry/tiny/diff", None, "reader"),
    ("GET", "/v1/edits/edit-none", None, "reader"),
    ("GET", "/v1/edits?model=tiny", None, "reader"),
    ("POST", "/v1/edits", {"model": "tiny", "edits": [EDIT], "base_version": "v404"}, "editor"),
    ("DELETE", "/v1/edits/edit-none", None, "editor"),
    ("PUT", "/v1/registry/tiny/aliases/staging", {"version": "v0"}, "admin"),
    ("POST", "/v1/registry/tiny/rollback", {"to": "v404"}, "admin"),
    ("POST", "/v1/registry/tiny/versions/v404/export", None, "admin"),
]


@pytest.mark.parametrize(("method", "path", "body", "needed"), ROUTES)
def test_auth_matrix(service, method, path, body, needed):
    order = ["reader", "editor", "admin"]
    anonymous = httpx.request(method, service["url"] + path, json=body)
    assert anonymous.status_code == 401 and "Authorization: Bearer" in anonymous.json()["detail"]
    wrong = httpx.request(method, service["url"] + path, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["detail"]
    for role in order:
        r = api(service, role).request(method, path, json=body)
        if order.index(role) < order.index(needed):
            assert r.status_code == 403 and f"needs the {needed} role" in r.json()["detail"], (role, r.text)
        else:
            assert r.status_code not in (401, 403), (role, r.text)


def test_only_an_admin_may_post_an_edit_that_promotes_its_version(service):
    """promote moves production, as PUT .../aliases/production does: an editor's key may not do it this way."""
    body = {"model": "tiny", "edits": [EDIT], "base_version": "v404", "promote": True}
    refused = api(service, "editor").post("/v1/edits", json=body)
    assert refused.status_code == 403 and "needs the admin role" in refused.json()["detail"], refused.text
    assert api(service, "admin").post("/v1/edits", json=body).status_code == 404  # past the role, to the base


def test_worker_killed_mid_edit_is_finished_once_by_the_next_worker(service):
    import signal

    c = api(service, "editor")
    slow = {"lr": 1e-6, "max_epochs": 150}  # never reaches the early stop: runs all its epochs
    job = c.post("/v1/edits", json={"model": "tiny", "edits": [EDIT], "hyperparameters": slow,
                                    "guard": {"min_reliability": 0.0}}).json()
    worker = service["start_worker"]()
    deadline = time.time() + 120
    while (c.get(f"/v1/edits/{job['id']}").json().get("progress") or {}).get("epoch", 0) < 3:
        assert time.time() < deadline, "the edit never started"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert c.get(f"/v1/edits/{job['id']}").json()["status"] == "running"
    replacement = service["start_worker"]()  # finds the dead worker's edit and finishes it
    try:
        done = wait_done(c, job["id"])
    finally:
        replacement.terminate()
        replacement.wait(timeout=30)
    assert done["status"] == "succeeded", done
    versions = c.get("/v1/registry/tiny/versions").json()["data"]
    assert sum(job["id"] in v["hyperparameters"].get("jobs", []) for v in versions) == 1  # applied exactly once


def test_two_live_workers_apply_each_edit_exactly_once(service):
    from concurrent.futures import ThreadPoolExecutor

    c = api(service, "editor")
    head = c.get("/v1/registry/tiny/versions").json()["aliases"]["latest"]
    workers = [service["start_worker"]() for _ in range(2)]

    def post(i: int) -> str:
        edit = {"prompt": f"The code name of project {i} is", "target": f"Falcon{i}"}
        return c.post("/v1/edits", json={"model": "tiny", "edits": [edit], "hyperparameters": FAST}).json()["id"]

    try:
        with ThreadPoolExecutor(6) as pool:
            ids = list(pool.map(post, range(6)))
        jobs = [wait_done(c, i) for i in ids]
    finally:
        for w in workers:
            w.terminate()
            w.wait(timeout=30)
    assert all(j["status"] in ("succeeded", "rejected") for j in jobs), jobs
    versions = c.get("/v1/registry/tiny/versions").json()["data"]
    for job in jobs:  # the lease: whichever worker holds it edits; the other never redoes its edits
        holding = [v["id"] for v in versions if job["id"] in v["hyperparameters"].get("jobs", [])]
        assert holding == ([job["version"]] if job["status"] == "succeeded" else []), (job, holding)
    new = [v for v in versions if int(v["id"][1:]) > int(head[1:])]
    assert [v["parent"] for v in new] == [head] + [v["id"] for v in new[:-1]]  # one chain on top of the head


def test_dropped_streams_leave_the_service_answering(service):
    """More streams than generation slots, each dropped after its first event: every slot must come back."""
    url = service["url"]
    headers = {"Authorization": "Bearer reader-key"}
    for _ in range(6):
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client, client.stream(
                "POST", "/v1/completions", json={"model": "tiny@v0", "prompt": "The capital of France is",
                                                 "max_tokens": 100, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    started = time.perf_counter()
    r = api(service, "reader").post("/v1/completions", json={"model": "tiny@v0", "prompt": "x", "max_tokens": 4},
                                    timeout=10)
    assert r.status_code == 200 and time.perf_counter() - started < 10


def test_hostile_values_get_a_4xx_never_a_5xx(service):
    """NaN, Infinity, lone surrogates (which JSON can carry and no encoder can write back) and oversized text."""
    client = api(service, "editor")

    def post(path: str, text: str) -> httpx.Response:
        return client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})

    edit = '{"model": "tiny", "edits": [{"prompt": "The sky is", "target": "green"%s}]%s}'
    cases = [
        ("/v1/completions", '{"model": "tiny", "prompt": "x", "temperature": NaN}', "temperature"),
        ("/v1/completions", '{"model": "tiny", "prompt": "x", "top_p": Infinity}', "top_p"),
        ("/v1/completions", '{"model": "tiny", "prompt": "x\\ud800"}', "Unicode"),
        ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
         "Unicode"),
        ("/v1/edits", edit % ("", ', "hyperparameters": {"lr": NaN}'), "lr"),
        ("/v1/edits", edit % ("", ', "hyperparameters": {"energy": -Infinity}'), "energy"),
        ("/v1/edits", edit % (', "locality_prompt": "%s"' % ("a" * 3000), ""), "locality_prompt"),
        ("/v1/edits", edit % (', "rephrases": ["%s"]' % ("a" * 3000), ""), "rephrases"),
        ("/v1/edits", edit % (', "\\ud800": 1', ""), "Unicode"),
    ]
    for path, text, named in cases:
        r = post(path, text)
        assert r.status_code == 422, (text[:80], r.status_code, r.text[:300])
        assert named in r.json()["detail"], r.json()


def test_headers_and_methods_of_the_clients_choosing_do_not_leak_into_replies_or_metrics(service):
    c = api(service, "editor")
    key = {"Idempotency-Key": uuid.uuid4().hex, "Host": "evil.example"}
    posted = c.post("/v1/edits", json={"model": "tiny", "edits": [EDIT], "hyperparameters": FAST}, headers=key)
    assert posted.status_code == 202 and posted.json()["status_url"] == f"/v1/edits/{posted.json()['id']}"
    assert api(service, "admin").delete(posted.json()["status_url"]).status_code == 200  # no worker in this test
    for method in ("FOO1", "FOO2", "BREW"):
        assert c.request(method, "/v1/models").status_code in (401, 404, 405)
    metrics = c.get("/metrics").text
    assert "FOO1" not in metrics and "BREW" not in metrics and 'method="other"' in metrics


def test_the_key_is_checked_before_the_body_is_parsed(service):
    anonymous = httpx.Client(base_url=service["url"], timeout=30)
    for path in ("/v1/edits", "/v1/completions"):
        r = anonymous.post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        r = anonymous.post(path, content=b"{not json", headers={"content-type": "application/json",
                                                                  "Authorization": "Bearer guessed-key"})
        assert r.status_code == 401 and r.json()["detail"] == "invalid API key"
    r = api(service, "editor").post("/v1/edits", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_openai_clients_see_errors_models_roles_parts_and_usage(service):
    import openai

    client = openai.OpenAI(base_url=f"{service['url']}/v1", api_key="reader-key")
    assert client.models.retrieve("tiny@v0").id == "tiny@v0"
    with pytest.raises(openai.NotFoundError, match="v404"):
        client.models.retrieve("tiny@v404")
    with pytest.raises(openai.BadRequestError, match="unsupported parameter frequency_penalty"):  # not ignored
        client.completions.create(model="tiny@v0", prompt="x", max_tokens=2, frequency_penalty=0.5)
    harmless = client.completions.create(model="tiny@v0", prompt="x", max_tokens=2, user="me", presence_penalty=0)
    assert harmless.choices[0].text is not None
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):  # the SDK shows our message
        client.completions.create(model="tiny@v0", prompt="x", max_tokens=2, temperature=5)
    parts = [{"type": "text", "text": "Be brief. "}, {"type": "text", "text": "Say hi."}]
    as_parts = client.chat.completions.create(model="tiny@v0", max_tokens=4, temperature=0, messages=[
        {"role": "developer", "content": "You answer."}, {"role": "user", "content": parts}])
    as_text = client.chat.completions.create(model="tiny@v0", max_tokens=4, temperature=0, messages=[
        {"role": "system", "content": "You answer."}, {"role": "user", "content": "Be brief. Say hi."}])
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    chunks = list(client.completions.create(model="tiny@v0", prompt="The capital of France is", max_tokens=5,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5 == chunks[-1].usage.total_tokens - \
        chunks[-1].usage.prompt_tokens
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_ready_only_while_a_worker_can_take_the_edits(service):
    import signal

    url = service["url"]
    deadline = time.time() + 15  # a worker of an earlier test killed with SIGKILL beats no more within seconds
    while (r := httpx.get(f"{url}/readyz")).status_code == 200:
        assert time.time() < deadline, "ready with no worker running"
        time.sleep(0.2)
    assert r.status_code == 503 and "no live worker takes edits for tiny" in r.json()["reason"]
    worker = service["start_worker"]()
    try:
        deadline = time.time() + 120
        while (r := httpx.get(f"{url}/readyz")).status_code != 200:
            assert time.time() < deadline, r.json()
            time.sleep(0.2)
        assert r.json()["workers"] == {"tiny": 1}
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        killed = time.time()
        while httpx.get(f"{url}/readyz").status_code == 200:
            assert time.time() - killed < 15, "still ready 15 s after its only worker died"
            time.sleep(0.2)
    finally:
        worker.kill()


def test_logprobs_echo_token_prompts_and_stops_as_lm_eval_uses_them(service):
    """lm-eval's local-completions scores a choice with echo, logprobs 1 and token-id prompts, batched."""
    import openai

    client = openai.OpenAI(base_url=f"{service['url']}/v1", api_key="reader-key")
    reader = api(service, "reader")
    scored = reader.post("/v1/score", json={"model": "tiny@v0", "prompt": "The capital of France is",
                                            "target": "Paris"}).json()
    ids = reader.post("/v1/completions", json={"model": "tiny@v0", "prompt": "The capital of France is Paris",
                                               "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    echoed = ids["choices"][0]["logprobs"]
    assert ids["choices"][0]["text"] == "The capital of France is Paris" and echoed["token_logprobs"][0] is None
    n = len(scored["token_logprobs"])
    assert echoed["token_logprobs"][-n:] == pytest.approx(scored["token_logprobs"], abs=1e-4)
    assert "".join(echoed["tokens"]) == "The capital of France is Paris"

    tok = [[5, 6, 7, 8], [9, 10, 11]]  # two token-id prompts in one request, as lm-eval batches them
    out = client.completions.create(model="tiny@v0", prompt=tok, max_tokens=1, temperature=0, echo=True, logprobs=1)
    assert [c.index for c in out.choices] == [0, 1]
    for choice, prompt in zip(out.choices, tok, strict=True):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(prompt) + 1 and lp.token_logprobs[0] is None
        assert all(len(top) == 1 for top in lp.top_logprobs[1:])
        assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-5)  # greedy

    free = client.completions.create(model="tiny@v0", prompt="The capital of France is", max_tokens=20, temperature=0)
    stop = free.choices[0].text[3:5]
    cut = client.completions.create(model="tiny@v0", prompt="The capital of France is", max_tokens=20,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == free.choices[0].text[: free.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < free.usage.completion_tokens
    r = reader.post("/v1/completions", json={"model": "tiny@v0", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


def test_a_models_edits_are_listed_newest_first_and_filtered(service):
    c = api(service, "editor")
    posted = [c.post("/v1/edits", json={"model": "tiny", "edits": [{"prompt": f"Fact {k} is", "target": "x"}],
                                        "hyperparameters": FAST}).json()["id"] for k in range(3)]
    assert c.delete(f"/v1/edits/{posted[1]}").status_code == 200  # no worker here: they stay queued
    listed = [j["id"] for j in c.get("/v1/edits", params={"model": "tiny", "limit": 500}).json()["data"]]
    assert listed[:3] == posted[::-1]
    cancelled = c.get("/v1/edits", params={"model": "tiny", "status": "cancelled", "limit": 500}).json()["data"]
    assert posted[1] in [j["id"] for j in cancelled] and {j["status"] for j in cancelled} == {"cancelled"}
    assert c.get("/v1/edits", params={"model": "tiny", "status": "lost"}).status_code == 422
    assert c.get("/v1/edits", params={"model": "nope"}).status_code == 404
    for job in (posted[0], posted[2]):
        c.delete(f"/v1/edits/{job}")


def test_n_choices_each_sampled_with_its_own_seed(service):
    import openai

    client = openai.OpenAI(base_url=f"{service['url']}/v1", api_key="reader-key")
    ask = dict(model="tiny@v0", prompt="The capital of France is", max_tokens=8, temperature=1.0, seed=7)
    three = client.completions.create(**ask, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2] and len({c.text for c in three.choices}) > 1
    assert three.choices[1].text == client.completions.create(**{**ask, "seed": 8}).choices[0].text
    chat = client.chat.completions.create(model="tiny@v0", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, n=2)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same twice


def test_chat_logprobs_of_a_greedy_answer(service):
    import openai

    client = openai.OpenAI(base_url=f"{service['url']}/v1", api_key="reader-key")
    out = client.chat.completions.create(model="tiny@v0", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs), abs=1e-5) for t in content)
    assert "".join(t.token for t in content).startswith(out.choices[0].message.content)


def lm_eval_run(model: str, model_args: str, task_dir: Path, out: Path, env: dict | None = None) -> list[dict]:
    """lm-evaluation-harness on the task of ``task_dir``; its per-document records (``--log_samples``)."""
    command = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
               "--tasks", "facts_mc", "--include_path", str(task_dir), "--output_path", str(out),
               "--log_samples", "--batch_size", "4", "--device", "cpu"]
    done = subprocess.run(command, env={**os.environ, "HF_DATASETS_OFFLINE": "1", **(env or {})},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (samples,) = out.rglob("samples_facts_mc_*.jsonl")
    return sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])


def test_lm_eval_scores_a_served_version_as_it_scores_the_export(service, tmp_path):
    """lm-eval's `local-completions` against the service (token-id prompts, echo, logprobs) and its `hf` model on
    the same version's export: the same choice and the same log-likelihoods on each item of our own task."""
    pytest.importorskip("lm_eval")
    admin = api(service, "admin")
    version = admin.get("/v1/registry/tiny/versions").json()["data"][-1]["id"]
    export = admin.post(f"/v1/registry/tiny/versions/{version}/export")
    assert export.status_code == 200, export.text
    folder = export.json()["path"]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "facts_mc.yaml").write_text(
        "task: facts_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {FIXTURES / 'lm_eval' / 'facts_mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: choices\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    served = lm_eval_run("local-completions",
                         f"model=tiny@{version},base_url={service['url']}/v1/completions,tokenizer={folder},"
                         "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1",
                         tasks, tmp_path / "served", env={"OPENAI_API_KEY": "reader-key"})
    local = lm_eval_run("hf", f"pretrained={folder},dtype=float32", tasks, tmp_path / "hf")
    assert len(served) == len(local) == 20
    for a, b in zip(served, local, strict=True):
        assert a["acc"] == b["acc"], (a["doc"], a["filtered_resps"], b["filtered_resps"])
        ours, theirs = ([float(r[0]) for r in s["filtered_resps"]] for s in (a, b))
        assert ours == pytest.approx(theirs, abs=1e-3)
    accuracy = sum(s["acc"] for s in served) / len(served)
    assert accuracy == sum(s["acc"] for s in local) / len(local)


def test_prometheus_metrics_cover_requests_tokens_and_the_workers_edits(service):
    from prometheus_client.parser import text_string_to_metric_families

    reader, editor = api(service, "reader"), api(service, "editor")

    def families() -> dict:
        text = reader.get("/metrics").text
        return {f.name: f for f in text_string_to_metric_families(text)}

    def value(family, **labels) -> float:
        return sum(s.value for s in family.samples if s.name == family.name + "_total"
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    before = families()
    done_before = value(before["crispedit_edits"], model="tiny", status="succeeded")
    out = reader.post("/v1/completions", json={"model": "tiny@v0", "prompt": "The capital of", "max_tokens": 3,
                                               "temperature": 0}).json()
    job = editor.post("/v1/edits", json={"model": "tiny", "edits": [EDIT], "hyperparameters": FAST}).json()
    assert applied(service, reader, job["id"])["status"] == "succeeded"
    after = families()
    assert value(after["crispedit_edits"], model="tiny", status="succeeded") == done_before + 1
    generated = value(after["crispedit_tokens_generated"], model="tiny")
    assert generated - value(before["crispedit_tokens_generated"], model="tiny") >= out["usage"]["completion_tokens"]
    for name in ("crispedit_edit_seconds", "crispedit_edit_queue_seconds", "crispedit_http_request_seconds"):
        assert after[name].type == "histogram" and after[name].documentation, name
    buckets = [s.value for s in after["crispedit_edit_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] >= 1  # cumulative, and this edit counted
    routes = {s.labels["route"] for s in after["crispedit_http_request_seconds"].samples if "route" in s.labels}
    assert "/v1/completions" in routes and "/v1/edits/{job_id}" in routes
    assert {"crispedit_pending_edits", "crispedit_model_versions", "crispedit_live_workers"} <= set(after)


def test_rq_jobs_carry_the_edit_ids(service):
    from redis import Redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    editor = api(service, "editor")
    job = editor.post("/v1/edits", json={"model": "tiny", "edits": [EDIT], "hyperparameters": FAST}).json()
    rq_job = Job.fetch(job["id"], connection=Redis(db=service["db"]), serializer=JSONSerializer)
    assert rq_job.func_name == "worker.tasks.process_pending" and job["id"] in rq_job.description
    assert applied(service, editor, job["id"])["status"] == "succeeded"
    deadline = time.time() + 30  # the edit may have been applied by an earlier wake-up; this one then finds none
    while rq_job.get_status(refresh=True) != "finished":
        assert time.time() < deadline, rq_job.get_status()
        time.sleep(0.1)


def test_a_queued_edit_shows_the_progress_of_the_worker_preparing_its_model(service):
    from redis import Redis

    from core.jobs import preparing_key

    c = api(service, "editor")
    job = c.post("/v1/edits", json={"model": "tiny", "edits": [EDIT], "hyperparameters": FAST}).json()
    assert c.get(f"/v1/edits/{job['id']}").json()["progress"] is None
    state = {"phase": "K-FAC", "done": 512, "total": 8160}  # as a loading worker writes it (worker/preparing.py)
    Redis(db=service["db"]).set(preparing_key(service["env"]["CRISPEDIT_KEY_PREFIX"], "tiny"), json.dumps(state), ex=30)
    try:
        assert c.get(f"/v1/edits/{job['id']}").json()["progress"] == state
        ready = httpx.get(f"{service['url']}/readyz").json()  # no worker runs in this test
        assert ready["status"] == "not ready" and ready["preparing"] == {"tiny": state}
    finally:
        Redis(db=service["db"]).delete(preparing_key(service["env"]["CRISPEDIT_KEY_PREFIX"], "tiny"))
        c.delete(f"/v1/edits/{job['id']}")


def test_an_export_carries_its_model_card_and_provenance_and_downloads_as_a_tar(service, tmp_path):
    import io
    import tarfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    admin, reader = api(service, "admin"), api(service, "reader")
    versions = admin.get("/v1/registry/tiny/versions").json()["data"]
    edited = next(v for v in reversed(versions) if v["edits"])  # the newest version with edits of its own
    assert reader.get(f"/v1/registry/tiny/versions/{edited['id']}/download").status_code == 403
    r = admin.get(f"/v1/registry/tiny/versions/{edited['id']}/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert f'filename="tiny-{edited["id"]}.tar"' in r.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / edited["id"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "- crispedit" in card
    assert f"## {edited['id']} (from {edited['parent']})" in card
    assert repr(edited["edits"][0]["prompt"]) in card and repr(edited["edits"][0]["target"]) in card
    provenance = json.loads((folder / "crispedit.json").read_text())
    assert provenance["version"] == edited["id"] and provenance["lineage"][-1]["id"] == "v0"
    assert provenance["lineage"][0]["metrics"]["reliability"] == edited["metrics"]["reliability"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "local_files_only" not in config
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok(EDIT["prompt"], return_tensors="pt")["input_ids"]
    score = reader.post("/v1/completions", json={"model": f"tiny@{edited['id']}", "prompt": EDIT["prompt"],
                                                 "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    served = score["choices"][0]["logprobs"]["token_logprobs"][1:]
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    assert logp.gather(1, ids[0, 1:, None])[:, 0].tolist() == pytest.approx(served, abs=1e-4)


def test_a_pruned_version_answers_410_and_names_the_versions_kept(service):
    """Retention (run last: it prunes the versions the tests above made): records stay, weights go, 410 says so."""
    from safetensors.torch import load_file

    from registry import Registry

    admin, reader = api(service, "admin"), api(service, "reader")
    reg = Registry(service["tmp"] / "registry")
    name = "model.layers.1.mlp.down_proj.weight"
    base = load_file(service["tmp"] / "tiny" / "model.safetensors")[name]
    for k in range(1, 4):  # three versions of our own on top of the head
        reg.commit("tiny", reg.resolve("tiny", "latest"), {name: base + 0.01 * k}, originals={name: base})
    pruned = reg.prune("tiny", keep_last=2)
    assert pruned, "the versions the tests above made"
    gone = reader.get(f"/v1/registry/tiny/versions/{pruned[-1]}")
    kept = [v.id for v in reg.versions("tiny") if not v.pruned]
    assert gone.status_code == 410 and gone.json()["kept"] == kept and "was pruned" in gone.json()["detail"]
    asked = reader.post("/v1/completions", json={"model": f"tiny@{pruned[-1]}", "prompt": "The", "max_tokens": 1})
    assert asked.status_code == 410 and asked.json()["error"]["type"] == "version_pruned"
    assert admin.put("/v1/registry/tiny/aliases/old", json={"version": pruned[-1]}).status_code == 410
    assert admin.post("/v1/registry/tiny/rollback", json={"to": pruned[-1]}).status_code == 410
    listed = {v["id"]: v["pruned"] for v in reader.get("/v1/registry/tiny/versions").json()["data"]}
    assert listed[pruned[-1]]["policy"] == {"keep_last": 2, "keep_every": 0} and not listed[kept[-1]]
    latest = reader.post("/v1/completions", json={"model": "tiny@latest", "prompt": "The", "max_tokens": 1})
    assert latest.status_code == 200
