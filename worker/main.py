"""``crispedit worker --model NAME``: load the model and its curvature cache once, then consume its queue."""

from __future__ import annotations

import logging

import torch
from redis import Redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from core.heartbeat import Heartbeat
from core.jobs import JobStore
from core.settings import get_settings
from crispedit.progress import listening
from worker.preparing import Announcer
from worker.runtime import runtime

log = logging.getLogger("crispedit.worker")


class EditWorker(SimpleWorker):
    """RQ's SimpleWorker (jobs run in this process, next to the loaded model, no fork per job), whose warm
    shutdown cannot be lost. RQ raises StopRequested from the SIGTERM handler when the worker looks idle; a
    signal landing inside a log write has that exception swallowed by logging, and a job dequeued in the
    same instant then kept the worker running. Setting the flag first makes the loop stop after that job."""

    def _shutdown(self) -> None:
        self._stop_requested = True
        super()._shutdown()

    def subscribe(self) -> None:
        """RQ's command channel, read by a thread that waits at most 1 s per read instead of RQ's 60. A warm
        shutdown unsubscribes on the same connection; workers were seen to stop there for over 30 s after every
        job was done, most likely waiting out that read."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=1.0, daemon=True,
                                                       exception_handler=self._pubsub_exception_handler)


def run_worker(model: str, burst: bool = False) -> None:
    settings = get_settings()
    if model not in settings.model_bases():
        raise ValueError(f"model {model!r} is not configured; CRISPEDIT_MODELS is {settings.models!r}")
    torch.set_num_threads(settings.threads("worker"))
    redis = Redis.from_url(settings.redis_url)
    store = JobStore(redis, settings.key_prefix)
    announce = Announcer(store, model)
    with listening(announce):
        runtime(model)  # load now, not inside the first job: jobs never reload the model
    announce.done()
    queue = Queue(store.queue_name(model), connection=redis, serializer=JSONSerializer)
    if store.processing(model) or redis.llen(store.key("pending", model)):
        # edits left by a worker that died, or posted while none ran: wake ourselves up for them
        queue.enqueue("worker.tasks.process_pending", model, job_timeout=6 * 3600,
                      description=f"resume the pending edits of {model} (found at worker start)")
    worker = EditWorker([queue], connection=redis, serializer=JSONSerializer)
    log.info("worker for %s listening on %s (%d torch threads)", model, queue.name, torch.get_num_threads())
    heartbeat = Heartbeat(redis, settings.key_prefix, model)  # the API's /readyz counts these
    try:
        worker.work(burst=burst, logging_level="INFO")
    finally:
        heartbeat.stop()
