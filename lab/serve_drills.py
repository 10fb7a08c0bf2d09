"""Fault drills against a real `crispedit serve` (its embedded Redis, its supervised worker), with figures.

- ``kill``: with edits in flight, SIGKILL the worker (``--kills N``) and, as many times, the embedded Redis. Per
  trial: seconds until ``/readyz`` answers 200 again and until every edit in flight has ended, and whether each
  ended exactly once (succeeded, in exactly the version it reports). While Redis is down, an edit post must get
  503 with Retry-After. Tiny random Llama, edits of 150 epochs, so that a kill lands mid-edit.
- ``hostile``: bodies with NaN, ±Infinity, numbers past float range, lone surrogates, huge strings and deep
  nesting, sent raw to every POST route: the statuses, and none may be 5xx.
- ``sigterm``: seconds from SIGTERM of `serve` until it and every process it started are gone.
- ``streams`` (``--streams``, on the bundled SmolLM2): 16 streamed completions of 256 tokens, each read up to its
  first chunk; then 8 are no longer read but held open and 8 are dropped. A short completion is timed every
  second while the stalled ones stay open (20 s), then after they are closed (10 s).

Usage: .venv/bin/python -m lab.serve_drills [--kills 20] [--streams] [--out runs/serve-drills]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil

from cli.serve import free_port
from lab.fault_trials import ROOT, TINY_EDITS, tiny_profile

KEYS = {"admin": "drill-admin-key", "editor": "drill-editor-key", "reader": "drill-reader-key"}
# edits that run all their epochs (too small a step to reach the early stop), so that a kill lands mid-edit
SLOW = {"lr": 1e-6, "max_epochs": 150, "energy": 0.5, "subject_key": False}


class Serve:
    """`crispedit serve` in its own folder and process group, reached over HTTP."""

    def __init__(self, folder: Path, env: dict, worker: bool = True) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRISPEDIT_")} | env | {
            "CRISPEDIT_REGISTRY_ROOT": str(folder / "data" / "registry"), "CRISPEDIT_LEASE_SECONDS": "2",
            "CRISPEDIT_API_KEYS": ",".join(f"{k}:{r}" for r, k in KEYS.items()),
            "CRISPEDIT_EDIT_POSTS_PER_MINUTE": "0"}
        command = [sys.executable, "-m", "cli.main", "serve", "--port", str(self.port)] + ([] if worker else
                                                                                          ["--no-worker"])
        self.proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=open(folder / "serve.log", "a"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def client(self, role: str = "editor") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEYS[role]}"}, timeout=60)

    def ready(self, path: str = "/readyz") -> bool:
        try:
            return httpx.get(self.url + path, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float, path: str = "/readyz") -> float:
        started = time.time()
        while not self.ready(path):
            if time.time() - started > timeout or self.proc.poll() is not None:
                raise RuntimeError(f"serve not ready after {time.time() - started:.0f} s; see {self.folder}/serve.log")
            time.sleep(0.1)
        return time.time() - started

    def child(self, marker: str) -> psutil.Process:
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and marker in " ".join(p.cmdline()):
                    return p
            except psutil.Error:  # gone (or a zombie) between the listing and the look
                continue
        raise LookupError(f"no {marker!r} process under serve")


def post_edits(c: httpx.Client, n: int) -> list[str]:
    ids = []
    for edit in TINY_EDITS[:n]:
        r = c.post("/v1/edits", json={"model": "tiny", "edits": [edit], "hyperparameters": SLOW,
                                      "guard": {"min_reliability": 0.0, "kl_budget": 10}})
        r.raise_for_status()
        ids.append(r.json()["id"])
    return ids


def wait_jobs(c: httpx.Client, ids: list[str], timeout: float) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        try:
            jobs = [c.get(f"/v1/edits/{i}").json() for i in ids]
            if all(j["status"] in {"succeeded", "rejected", "failed", "cancelled"} for j in jobs):
                return jobs
        except (httpx.HTTPError, KeyError, ValueError):
            pass  # Redis still coming back
        if time.time() > deadline:
            return jobs
        time.sleep(0.2)


def exactly_once(c: httpx.Client, jobs: list[dict]) -> list[str]:
    """Problems: a job not succeeded, with other than one terminal event, or not in exactly its version."""
    versions = c.get("/v1/registry/tiny/versions").json()["data"]
    problems = []
    for job in jobs:
        if job["status"] != "succeeded":
            problems.append(f"{job['id']}: {job['status']} ({job.get('error')})")
            continue
        events = [line for line in c.get(f"/v1/edits/{job['id']}/events").text.splitlines()
                  if line.startswith("event: ")]
        ends = [e for e in events if e.split(": ", 1)[1] in {"succeeded", "rejected", "failed", "cancelled"}]
        holding = [v["id"] for v in versions if job["id"] in v["hyperparameters"].get("jobs", [])]
        if len(ends) != 1 or holding != [job["version"]]:
            problems.append(f"{job['id']}: {len(ends)} terminal events, in versions {holding}, "
                            f"reports {job['version']}")
    return problems


def kill_trial(serve: Serve, target: str, rng: random.Random) -> dict:
    c = serve.client()
    ids = post_edits(c, 3)
    deadline = time.time() + 60
    while c.get(f"/v1/edits/{ids[0]}").json()["status"] == "queued" and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.0))  # somewhere in the edit, the guard or the commit
    victim = serve.child("cli.main worker" if target == "worker" else "redis-server")
    running = [j["status"] for j in (c.get(f"/v1/edits/{i}").json() for i in ids)].count("running")
    victim.send_signal(signal.SIGKILL)
    killed = time.time()
    row: dict = {"target": target, "running_at_kill": running}
    if target == "redis":
        row["readyz_while_down"] = httpx.get(serve.url + "/readyz").status_code
        r = c.post("/v1/edits", json={"model": "tiny", "edits": [TINY_EDITS[0]]})
        row["post_while_down"] = [r.status_code, r.headers.get("retry-after")]
    else:  # the supervisor starts another worker
        while time.time() - killed < 60:
            try:
                serve.child("cli.main worker")
                break
            except LookupError:
                time.sleep(0.05)
        row["worker_back_s"] = round(time.time() - killed, 2)
    while not serve.ready() and time.time() - killed < 120:
        time.sleep(0.05)
    row["ready_after_s"] = round(time.time() - killed, 2)
    jobs = wait_jobs(c, ids, 180)
    row["all_ended_after_s"] = round(time.time() - killed, 2)  # the service has healed: every edit in flight done
    row["problems"] = exactly_once(c, jobs)
    return row


HOSTILE = [b'{"model": "tiny@v0", "prompt": "hi", "temperature": NaN}',
           b'{"model": "tiny@v0", "prompt": "hi", "top_p": Infinity}',
           b'{"model": "tiny@v0", "prompt": "hi", "temperature": -Infinity}',
           b'{"model": "tiny@v0", "prompt": "hi", "max_tokens": 1e999}',
           b'{"model": "tiny@v0", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
           b'{"model": "tiny@v0", "prompt": "\\ud800 lone"}',
           b'{"model": "tiny@v0", "prompt": "' + b"x" * 900_000 + b'"}',
           b'{"model": "tiny@v0", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
           b'{"model": "tiny@v0", "messages": [{"role": "user", "content": "\\udfff"}]}',
           b'{"model": "tiny@v0", "messages": [{"role": "user", "content": NaN}]}',
           b'{"model": "tiny", "edits": [{"prompt": "\\ud800", "target": "x"}]}',
           b'{"model": "tiny", "edits": [{"prompt": "a", "target": "b"}], "hyperparameters": {"lr": NaN}}',
           b'{"model": "tiny", "edits": [{"prompt": "a", "target": "b"}], "hyperparameters": {"lr": 1e999}}',
           b'{"model": "tiny", "edits": [{"prompt": "a", "target": "b", "rephrases": ["' + b"y" * 900_000 + b'"]}]}',
           b'{"model": "tiny@v0", "prompt": "a", "target": "\\ud800"}',
           b'{"model": "tiny@v0", "prompt": "a", "target": Infinity}']
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/score", "/v1/edits")


def hostile(serve: Serve) -> dict:
    """Every hostile body to every POST route, as the editor: the statuses seen."""
    statuses: dict[str, int] = {}
    with serve.client() as c:
        for body in HOSTILE:
            for route in ROUTES:
                r = c.post(route, content=body, headers={"Content-Type": "application/json"})
                statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
                if r.status_code == 202:  # an edit that got through: never run it
                    c.delete(f"/v1/edits/{r.json()['id']}")
    return {"requests": sum(statuses.values()), "statuses": statuses,
            "5xx": sum(n for s, n in statuses.items() if s.startswith("5"))}


def sigterm(serve: Serve) -> float:
    family = [psutil.Process(serve.proc.pid), *psutil.Process(serve.proc.pid).children(recursive=True)]
    started = time.time()
    serve.proc.send_signal(signal.SIGTERM)
    gone, alive = psutil.wait_procs(family, timeout=30)
    if alive:
        for p in alive:
            p.kill()
        return float("inf")
    return round(time.time() - started, 2)


def streams(out: Path) -> dict:
    """16 streams on SmolLM2: half stalled (open, unread), half dropped; short queries timed meanwhile."""
    serve = Serve(out / "streams", {"CRISPEDIT_MODELS": "smollm2"}, worker=False)
    serve.wait_ready(600, path="/healthz")
    body = json.dumps({"model": "smollm2@v0", "prompt": "Write a long story about a dragon.", "stream": True,
                       "max_tokens": 256, "temperature": 1.0}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEYS['reader']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    socks = []
    for _ in range(16):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: an unread stream stalls soon
        s.connect(("127.0.0.1", serve.port))
        s.sendall(request)
        socks.append(s)
    for s in socks:  # each read up to its first chunk
        s.settimeout(120)
        seen = b""
        while b"data: " not in seen:
            seen += s.recv(4096)
    stalled, dropped = socks[:8], socks[8:]
    for s in dropped:
        s.close()

    def timed(window: float) -> list[float]:
        out_s = []
        end = time.time() + window
        with serve.client("reader") as c:
            while time.time() < end:
                started = time.time()
                c.post("/v1/completions", json={"model": "smollm2@v0", "prompt": "The capital of France is",
                                                "max_tokens": 8, "temperature": 0}).raise_for_status()
                out_s.append(time.time() - started)
                time.sleep(max(0.0, 1.0 - (time.time() - started)))
        return out_s

    held = timed(20)
    for s in stalled:
        s.close()
    after = timed(10)
    result = {"while_stalled_held_open": {"n": len(held), "max_s": round(max(held), 2),
                                          "median_s": round(statistics.median(held), 2)},
              "after_closing": {"n": len(after), "max_s": round(max(after), 2),
                                "median_s": round(statistics.median(after), 2)},
              "sigterm_s": sigterm(serve)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILL trials per target (worker, Redis)")
    parser.add_argument("--streams", action="store_true", help="also the stream drill on SmolLM2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/serve-drills")
    args = parser.parse_args()
    out = Path(args.out) / uuid.uuid4().hex[:6]
    rng = random.Random(args.seed)
    profile = tiny_profile(out)
    serve = Serve(out / "tiny-serve", profile.env | {"CRISPEDIT_MIN_NEIGHBOURS_UNCHANGED": "0"})
    report: dict = {"first_ready_s": round(serve.wait_ready(600), 1)}
    try:
        report["hostile"] = hostile(serve)
        print(json.dumps(report["hostile"]), flush=True)
        rows = []
        for target in ("worker", "redis"):
            for _ in range(args.kills):
                rows.append(kill_trial(serve, target, rng))
                print(json.dumps(rows[-1]), flush=True)
        report["kills"] = rows
        for target in ("worker", "redis"):
            mine = [r for r in rows if r["target"] == target]
            if mine:
                report[f"{target}_summary"] = {
                    "trials": len(mine), "clean": sum(not r["problems"] for r in mine),
                    "killed_while_running": sum(r["running_at_kill"] > 0 for r in mine),
                    "ready_after_s_max": max(r["ready_after_s"] for r in mine),
                    "all_ended_after_s_median": statistics.median(r["all_ended_after_s"] for r in mine),
                    "all_ended_after_s_max": max(r["all_ended_after_s"] for r in mine)}
        down = [r for r in rows if r["target"] == "redis"]
        report["redis_down"] = {"posts": [r["post_while_down"] for r in down],
                                "readyz": [r["readyz_while_down"] for r in down]}
    finally:
        report["sigterm_s"] = sigterm(serve)
    if args.streams:
        report["streams"] = streams(out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "kills"}, indent=1))
    print(f"report: {out / 'report.json'}")


if __name__ == "__main__":
    main()
