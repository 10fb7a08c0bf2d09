"""The worker's warm shutdown: a SIGTERM whose StopRequested is lost still stops the loop after the job."""

import pytest
import redis
from rq.exceptions import StopRequested

from worker.main import EditWorker


def test_shutdown_request_sets_the_stop_flag_even_when_idle(redis_db):
    worker = EditWorker(["crispedit-test-shutdown"], connection=redis.Redis(db=redis_db))
    assert worker._stop_requested is False
    with pytest.raises(StopRequested):  # idle: RQ breaks out of the blocking dequeue by raising
        worker._shutdown()
    # if that exception is swallowed (a signal landing inside a log write), the loop still sees the flag
    assert worker._stop_requested is True
