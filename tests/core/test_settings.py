import os

import pytest

from core.settings import Settings


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_torch_threads_default_keeps_a_core_for_the_api_and_the_setting_wins(monkeypatch):
    default = Settings()
    assert default.threads("api") == 1
    assert default.threads("worker") == max(1, cores() - 1)
    monkeypatch.setenv("CRISPEDIT_TORCH_THREADS", "3")
    assert Settings().threads("api") == Settings().threads("worker") == 3
    monkeypatch.setenv("CRISPEDIT_TORCH_THREADS", "-1")
    with pytest.raises(ValueError):
        Settings()
