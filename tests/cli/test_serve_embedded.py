"""`crispedit serve` with no Redis URL: embedded Redis + API + worker from one command, stopped together."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
from conftest import FIXTURES, save_tiny_checkpoint, wait_ready


def test_one_command_serve(tmp_path):
    save_tiny_checkpoint(tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "CRISPEDIT_REDIS_URL"}
    env.update({"CRISPEDIT_REGISTRY_ROOT": str(tmp_path / "data" / "registry"), "CRISPEDIT_API_KEYS": "k:editor",
                "CRISPEDIT_CORPUS": str(FIXTURES / "corpus.txt"), "CRISPEDIT_CACHE_SAMPLES": "4",
                "CRISPEDIT_CACHE_SEQ_LEN": "32", "CRISPEDIT_MIN_RELIABILITY": "0", "CRISPEDIT_KL_BUDGET": "10",
                "CRISPEDIT_MIN_NEIGHBOURS_UNCHANGED": "0", "CRISPEDIT_NEIGHBOUR_WEIGHT": "10"})
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port),
                             "--model", f"tiny={tmp_path / 'tiny'}"], env=env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer k"}, timeout=30)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        job = client.post("/v1/edits", json={"model": "tiny", "edits": [{"prompt": "Gold is", "target": "Ag"}],
                                             "hyperparameters": {"lr": 0.03, "max_epochs": 5}}).json()
        for _ in range(600):
            status = client.get(f"/v1/edits/{job['id']}").json()
            if status["status"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        assert status["status"] == "succeeded" and status["version"] == "v1", status
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("redis-server" in " ".join(c.cmdline()) for c in children)

        # the worker and the embedded Redis killed: serve starts both again, and edits go on
        killed = {c.pid for c in children if "redis-server" in " ".join(c.cmdline()) or "worker" in c.cmdline()}
        assert len(killed) == 2
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        r = client.post("/v1/edits", json={"model": "tiny", "edits": [{"prompt": "Iron is", "target": "Cu"}]})
        assert r.status_code in (202, 503) and (r.status_code == 202 or r.headers["retry-after"]), r.text
        deadline = time.time() + 30
        while True:
            alive = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.pid not in killed]
            kinds = {"redis" if "redis-server" in " ".join(c.cmdline()) else "worker" for c in alive
                     if "redis-server" in " ".join(c.cmdline()) or "worker" in c.cmdline()}
            if kinds == {"redis", "worker"}:
                break
            assert time.time() < deadline, f"not restarted after 30 s: {kinds}"
            time.sleep(0.2)
        restarted_after = 30 - (deadline - time.time())
        for _ in range(100):  # Redis answers again
            r = client.post("/v1/edits", json={"model": "tiny", "edits": [{"prompt": "Lead is", "target": "Sn"}],
                                               "hyperparameters": {"lr": 0.03, "max_epochs": 5}})
            if r.status_code == 202:
                break
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            time.sleep(0.2)
        job = r.json()
        for _ in range(600):
            status = client.get(f"/v1/edits/{job['id']}").json()
            if status["status"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        assert status["status"] == "succeeded", status
        print(f"worker and Redis running again {restarted_after:.1f} s after SIGKILL")
        children = psutil.Process(proc.pid).children(recursive=True)
    finally:
        proc.send_signal(signal.SIGTERM)  # what docker, systemd and Popen.terminate send
        stopping = time.time()
        proc.wait(timeout=60)
        stopped_in = time.time() - stopping
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]  # all stopped
    assert stopped_in < 10, f"SIGTERM took {stopped_in:.1f} s"
    assert (tmp_path / "data" / "redis" / "appendonlydir").exists() or list((tmp_path / "data" / "redis").glob("*.aof"))
