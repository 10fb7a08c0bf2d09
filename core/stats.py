"""Edit outcomes and durations, counted in Redis: every worker adds to the same counts, and any API process
exposes them (``service/metrics.py``), so the figures cover the whole deployment and survive restarts.

Durations are Prometheus histograms kept as cumulative bucket counts in a Redis hash per model and measure.
"""

from __future__ import annotations

from redis import Redis
from redis.client import Pipeline

# seconds: a CPU edit takes 10 s to minutes, a GPU batch of thousands up to an hour; queue waits span the same
BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
MEASURES = ("edit_seconds", "queue_seconds")


def stats_key(prefix: str, model: str, name: str) -> str:
    return f"{prefix}:stats:{model}:{name}"


def observe(pipe: Pipeline, key: str, value: float) -> None:
    """Add ``value`` to the histogram at ``key``: each bucket whose bound holds it, +Inf, the sum."""
    for bound in BUCKETS:
        if value <= bound:
            pipe.hincrby(key, repr(bound), 1)
    pipe.hincrby(key, "+Inf", 1)
    pipe.hincrbyfloat(key, "sum", value)


def record_outcome(pipe: Pipeline, prefix: str, model: str, record: dict, now: float) -> None:
    """Count a finished edit by status; with the time it started, its queue wait and its run time."""
    pipe.hincrby(stats_key(prefix, model, "outcomes"), record["status"], 1)
    started = record.get("started_at")
    if started is not None:
        observe(pipe, stats_key(prefix, model, "queue_seconds"), max(0.0, started - record["created_at"]))
        observe(pipe, stats_key(prefix, model, "edit_seconds"), max(0.0, now - started))


def read_stats(redis: Redis, prefix: str, model: str) -> dict:
    """{"outcomes": {status: n}, measure: {"buckets": [(bound, n)…, ("+Inf", n)], "sum": s}}."""
    out: dict = {"outcomes": {k.decode(): int(v) for k, v in
                              redis.hgetall(stats_key(prefix, model, "outcomes")).items()}}
    for name in MEASURES:
        raw = {k.decode(): v for k, v in redis.hgetall(stats_key(prefix, model, name)).items()}
        buckets = [(repr(b), int(raw.get(repr(b), 0))) for b in BUCKETS] + [("+Inf", int(raw.get("+Inf", 0)))]
        out[name] = {"buckets": buckets, "sum": float(raw.get("sum", 0.0))}
    return out
