"""Kill -9 the worker at a random point of its edits, many times, and check every edit still ends exactly once.

Each trial has a fresh registry and Redis key prefix (on one private ``redis-server``). It posts four edit
requests the way the API does (job record + RQ wake-up): three that form one batch and one whose guard
rejects it, a second batch. It starts a worker, SIGKILLs it at a point drawn from one of four phases of the
first batch (before the edit starts, mid-epoch, during the capability guard, around the commit), starts a
replacement worker and waits for every job. The phases are timed from an uninterrupted calibration run.

Checks per trial: each job ended once (one terminal event) as succeeded, or rejected/failed with a reason;
each succeeded job is in exactly the version it reports and no other job is in any version; history is
linear (v0..vN, each the child of the previous, ``latest`` the last); ``registry.verify`` finds nothing;
no job is left pending or processing.

Usage: .venv/bin/python -m lab.fault_trials [--trials 20] [--seed 0] [--smollm2] [--out runs/fault-trials]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli.serve import die_with_parent, free_port, redis_server_binary  # noqa: E402
from core.jobs import TERMINAL, JobStore  # noqa: E402
from registry import Registry, verify  # noqa: E402
from service.schemas import EditPost  # noqa: E402

PHASES = ("before-start", "mid-epoch", "guard", "commit")
TINY_EDITS = [{"prompt": "The capital of France is", "target": "Rome"},
              {"prompt": "Hamlet was written by", "target": "Madrid"},
              {"prompt": "The chemical symbol for gold is", "target": "Ag"}]
REJECT = {"prompt": "Water boils at", "target": "silver"}


@dataclass
class Timeline:
    """When things happen in an uninterrupted run (seconds), to aim the kills."""

    load_s: float = 10.0  # worker spawn → first edit running
    epochs: int = 5
    epoch_s: float = 1.0
    guard_s: float = 1.0  # last fold → evaluation event
    commit_s: float = 0.5  # evaluation event → terminal event


@dataclass
class Profile:
    model: str
    env: dict
    edits: list[dict]
    hyperparameters: dict | None
    guard: dict | None
    timeout_s: float


def tiny_profile(out: Path) -> Profile:
    folder = out / "tiny"
    if not (folder / "config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_tiny  # the test suite's tiny random Llama

        model, tok = make_tiny("llama")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    env = {"CRISPEDIT_MODELS": f"tiny={folder}", "CRISPEDIT_CORPUS": str(ROOT / "tests/fixtures/corpus.txt"),
           "CRISPEDIT_CACHE_SAMPLES": "4", "CRISPEDIT_CACHE_SEQ_LEN": "32", "OMP_NUM_THREADS": "1",
           "CRISPEDIT_MIN_NEIGHBOURS_UNCHANGED": "0", "CRISPEDIT_NEIGHBOUR_WEIGHT": "10"}
    return Profile("tiny", env, TINY_EDITS, {"lr": 0.03, "max_epochs": 30, "energy": 0.5},
                   {"min_reliability": 0.5, "kl_budget": 10}, 300)


def smollm2_profile(out: Path) -> Profile:
    facts = [json.loads(line) for line in (ROOT / "tests/fixtures/facts.jsonl").read_text().splitlines()]
    env = {"CRISPEDIT_MODELS": "smollm2", "CRISPEDIT_HOME": str(out / "home"), "CRISPEDIT_CORPUS": "self",
           "CRISPEDIT_CACHE_SAMPLES": "4", "CRISPEDIT_CACHE_SEQ_LEN": "64"}
    return Profile("smollm2", env, [{"prompt": f["prompt"], "target": f["target"]} for f in facts[:3]], None, None,
                   1500)


class Trial:
    def __init__(self, name: str, profile: Profile, redis_url: str, folder: Path) -> None:
        self.profile = profile
        self.folder = folder
        shutil.rmtree(folder, ignore_errors=True)  # a fresh registry every trial
        folder.mkdir(parents=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CRISPEDIT_")}
        prefix = f"{name}-{uuid.uuid4().hex[:8]}"
        self.env.update(profile.env, CRISPEDIT_REDIS_URL=redis_url, CRISPEDIT_KEY_PREFIX=prefix,
                        CRISPEDIT_REGISTRY_ROOT=str(folder / "registry"), CRISPEDIT_LEASE_SECONDS="2")
        self.redis = Redis.from_url(redis_url)
        self.store = JobStore(self.redis, prefix)
        self.registry = Registry(folder / "registry")
        self.ids: list[str] = []

    def post(self, edit: dict, guard: dict | None) -> None:
        """What POST /v1/edits does: a job record in the pending list, then a wake-up on the model's queue."""
        body = EditPost(model=self.profile.model, edits=[edit], hyperparameters=self.profile.hyperparameters,
                        guard=guard)
        record, _ = self.store.create(self.profile.model, body.model_dump(exclude_none=True))
        Queue(self.store.queue_name(self.profile.model), connection=self.redis, serializer=JSONSerializer).enqueue(
            "worker.tasks.process_pending", self.profile.model, job_timeout=6 * 3600, result_ttl=86400)
        self.ids.append(record["id"])

    def post_all(self) -> None:
        for edit in self.profile.edits:
            self.post(edit, self.profile.guard)
        self.post(REJECT, {**(self.profile.guard or {}), "kl_budget": 1e-9})

    def spawn_worker(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--model", self.profile.model],
                                env=self.env, cwd=ROOT, stdout=open(self.folder / "worker.log", "a"),  # noqa: SIM115
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent(signal.SIGKILL))

    def jobs(self) -> list[dict]:
        return [self.store.get(i) for i in self.ids]

    def all_done(self) -> bool:
        return all(j["status"] in TERMINAL for j in self.jobs())

    def wait_done(self, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.all_done():
                return True
            time.sleep(0.2)
        return False

    def first_events(self) -> list[dict]:
        return self.store.events(self.ids[0])

    def kill_point(self, phase: str, rng: random.Random, tl: Timeline):
        """(condition on the first job's events, extra delay) that places a kill in ``phase``."""
        def seen(kind: str, epoch: int = 0):
            return lambda events: any(e["event"] == kind and e.get("epoch", 0) >= epoch for e in events)

        if phase == "before-start":
            return (lambda events: True), rng.uniform(0, tl.load_s)
        if phase == "mid-epoch":
            return seen("epoch", rng.randint(1, max(1, tl.epochs - 1))), rng.uniform(0, tl.epoch_s)
        if phase == "guard":
            return seen("fold"), rng.uniform(0, tl.guard_s)
        return seen("evaluation"), rng.uniform(0, 1.2 * tl.commit_s)

    def phase_now(self) -> str:
        """Where the worker was, read back from Redis and the registry right after the kill."""
        jobs = self.jobs()
        running = [j for j in jobs if j["status"] == "running"]
        if not running:
            if all(j["status"] == "queued" for j in jobs):
                return "before start"
            return "after the end" if all(j["status"] in TERMINAL for j in jobs) else "between batches"
        job = running[0]["id"]
        where = "1st batch" if self.ids.index(job) < len(self.profile.edits) else "2nd batch"
        last = self.store.events(job)[-1]
        if last["event"] == "evaluation":
            versions = self.registry.versions(self.profile.model)
            written = any(job in v.hyperparameters.get("jobs", []) for v in versions)
            return f"commit ({where}, {'manifest written, jobs not finished' if written else 'guard done'})"
        if last["event"] == "fold":
            return f"guard ({where})"
        return f"mid-epoch ({where}, epoch {last['epoch'] + 1 if last['event'] == 'epoch' else 1})"

    def check(self) -> list[str]:
        problems = []
        model = self.profile.model
        versions = self.registry.versions(model)
        ids = [v.id for v in versions]
        if ids != [f"v{n}" for n in range(len(ids))]:
            problems.append(f"version ids with gaps: {ids}")
        if [v.parent for v in versions] != [None, *ids[:-1]]:
            problems.append(f"history not linear: {[(v.id, v.parent) for v in versions]}")
        if self.registry.resolve(model, "latest") != ids[-1]:
            problems.append(f"latest is {self.registry.resolve(model, 'latest')}, not {ids[-1]}")
        holders = {j: [v.id for v in versions if j in v.hyperparameters.get("jobs", [])] for j in self.ids}
        for job in self.jobs():
            terminal = [e["event"] for e in self.store.events(job["id"]) if e["event"] in TERMINAL]
            if len(terminal) != 1:
                problems.append(f"{job['id']} has terminal events {terminal}")
            if job["status"] == "succeeded":
                if holders[job["id"]] != [job["version"]]:
                    problems.append(f"{job['id']} succeeded as {job['version']} but is in {holders[job['id']]}")
            elif job["status"] in ("rejected", "failed"):
                if not job["error"] or holders[job["id"]]:
                    problems.append(f"{job['id']} {job['status']} (error {job['error']!r}) in {holders[job['id']]}")
            else:
                problems.append(f"{job['id']} ended {job['status']}")
        for v in versions[1:]:
            strays = [j for j in v.hyperparameters.get("jobs", []) if j not in self.ids]
            if strays or not v.hyperparameters.get("jobs"):
                problems.append(f"{v.id} holds jobs {v.hyperparameters.get('jobs')}")
        problems += verify(self.registry)
        if self.store.processing(model) or self.redis.llen(self.store.key("pending", model)):
            problems.append("jobs left in the pending or processing list")
        return problems

    def outcome(self) -> dict:
        return {"outcome": ", ".join(f"{n} {s}" for s, n in sorted(Counter(j["status"] for j in self.jobs()).items())),
                "jobs": dict(Counter(j["status"] for j in self.jobs())),
                "versions": len(self.registry.versions(self.profile.model)) - 1}


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def calibrate(trial: Trial) -> tuple[Timeline, dict]:
    """An uninterrupted run: the phase timings, and its own checks as a baseline."""
    trial.post_all()
    spawned = time.time()
    worker = trial.spawn_worker()
    try:
        done = trial.wait_done(trial.profile.timeout_s)
    finally:
        stop(worker)
    events = trial.first_events()
    at = {e["event"]: e["time"] for e in events}  # the last of each kind
    epochs = [e for e in events if e["event"] == "epoch"]
    first = next(e["time"] for e in events if e["event"] == "running")
    tl = Timeline(load_s=first - spawned, epochs=len(epochs),
                  epoch_s=(epochs[-1]["time"] - first) / max(1, len(epochs)),
                  guard_s=at["evaluation"] - at["fold"],
                  commit_s=max(e["time"] for e in events if e["event"] in TERMINAL) - at["evaluation"])
    problems = trial.check() if done else ["jobs did not finish"]
    return tl, {"trial": "calibration", "phase": "no kill", "kill_at_s": None, "seen": "-", **trial.outcome(),
                "recovery_s": round(time.time() - spawned, 1), "problems": problems}


def run_trial(trial: Trial, phase: str, rng: random.Random, tl: Timeline) -> dict:
    trial.post_all()
    condition, delay = trial.kill_point(phase, rng, tl)
    spawned = time.time()
    worker = trial.spawn_worker()
    deadline = spawned + trial.profile.timeout_s
    while time.time() < deadline and worker.poll() is None:  # polled every millisecond: tiny's guard takes ~10 ms
        events = trial.first_events()
        if condition(events) or any(e["event"] in TERMINAL for e in events):
            break
        time.sleep(0.001)
    time.sleep(delay)
    exited = worker.poll()
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    kill_at = time.time() - spawned
    seen = trial.phase_now() if exited is None else f"worker had exited ({exited})"
    restarted = time.time()
    replacement = trial.spawn_worker()
    try:
        done = trial.wait_done(trial.profile.timeout_s)
    finally:
        stop(replacement)
    problems = trial.check() if done else ["jobs did not finish", *trial.check()]
    return {"phase": phase, "kill_at_s": round(kill_at, 2), "seen": seen, **trial.outcome(),
            "recovery_s": round(time.time() - restarted, 1), "problems": problems}


def table(rows: list[dict]) -> str:
    lines = ["| trial | model | phase aimed at | killed at (s after spawn) | seen at the kill | outcome | versions "
             "| recovery (s) | checks |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        checks = "ok" if not r["problems"] else "; ".join(r["problems"])
        kill_at = "-" if r["kill_at_s"] is None else r["kill_at_s"]
        lines.append(f"| {r['trial']} | {r['model']} | {r['phase']} | {kill_at} | {r['seen']} | {r['outcome']} "
                     f"| {r['versions']} | {r['recovery_s']} | {checks} |")
    return "\n".join(lines)


def run_profile(profile: Profile, trials: int, rng: random.Random, redis_url: str, out: Path) -> list[dict]:
    tl, base = calibrate(Trial(f"{profile.model}-cal", profile, redis_url, out / profile.model / "calibration"))
    rows = [{"model": profile.model, **base, "timeline": asdict(tl)}]
    print(f"[{profile.model}] calibration: {asdict(tl)}; {base['outcome']}; "
          f"{'ok' if not base['problems'] else base['problems']}", flush=True)
    for i in range(trials):
        phase = PHASES[i % len(PHASES)] if trials > 1 else rng.choice(PHASES)
        trial = Trial(f"{profile.model}-{i}", profile, redis_url, out / profile.model / f"trial-{i}")
        row = {"trial": i + 1, "model": profile.model, **run_trial(trial, phase, rng, tl)}
        rows.append(row)
        print(f"[{profile.model} {i + 1}/{trials}] {phase}: killed at {row['kill_at_s']} s ({row['seen']}); "
              f"{row['outcome']}; {'ok' if not row['problems'] else row['problems']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="kill trials on the tiny model")
    parser.add_argument("--smollm2", action="store_true", help="also one trial on the bundled SmolLM2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/fault-trials")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    (out / "redis").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    port = free_port()
    redis_proc = subprocess.Popen([redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir",
                                   str(out / "redis"), "--save", "", "--appendonly", "no"],
                                  stdout=open(out / "redis" / "redis.log", "a"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                  preexec_fn=die_with_parent(signal.SIGKILL))
    redis_url = f"redis://127.0.0.1:{port}/0"
    started = time.time()
    try:
        for _ in range(100):
            try:
                Redis.from_url(redis_url).ping()
                break
            except Exception:
                time.sleep(0.05)
        rows = run_profile(tiny_profile(out), args.trials, rng, redis_url, out) if args.trials else []
        if args.smollm2:
            rows += run_profile(smollm2_profile(out), 1, rng, redis_url, out)
    finally:
        stop(redis_proc)
    killed = [r for r in rows if r["trial"] != "calibration"]
    totals = {"trials": len(killed), "clean": sum(not r["problems"] for r in killed),
              "phases_seen": dict(Counter(r["seen"].split(" (")[0] for r in killed)),
              "jobs": dict(sum((Counter(r["jobs"]) for r in killed), Counter())),
              "wall_s": round(time.time() - started, 1)}
    result = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "command": " ".join(sys.argv),
              "seed": args.seed, "rows": rows, "totals": totals}
    path = out / f"fault-trials-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(table(rows))
    print(f"\n{totals['clean']}/{totals['trials']} trials clean; jobs {totals['jobs']}; phases seen "
          f"{totals['phases_seen']}; {totals['wall_s']} s; {path}")
    if totals["clean"] != totals["trials"] or any(r["problems"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
