"""The RQ job: apply every pending edit of one model as one CrispEdit batch, guard it, commit a version."""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import replace

import torch
from rq import get_current_job

from core.jobs import JobStore
from core.notify import announce_aliases
from crispedit.arch import arch_spec, editable_modules
from crispedit.capability import mean_kls
from crispedit.edit import EditError, edit
from crispedit.evaluate import edit_accuracy, mean
from crispedit.keyed_solve import settled_room
from crispedit.neighbours import neighbour_report, protect
from crispedit.recipe import recommended_config
from crispedit.requests import EditRequest
from registry import Conflict, gc
from registry.curvature import contribution, version_cache
from worker.lease import ModelLease
from worker.runtime import ModelRuntime, runtime

log = logging.getLogger("crispedit.worker")
# blobs younger than this survive a retention gc: another model's commit may be writing them on a shared volume
PRUNE_GC_GRACE = 300.0


def job_store(rt: ModelRuntime) -> JobStore:
    return JobStore(get_current_job().connection, rt.settings.key_prefix)


def group_key(record: dict) -> str:
    """Requests coalesce only when the version they share can honour each: the same base, hyperparameters, guard
    and promote flag (else one request's promote would move production, or not, for all of them)."""
    p = record["payload"]
    return json.dumps([p.get("base_version"), p.get("hyperparameters") or {}, p.get("guard") or {},
                       bool(p.get("promote"))], sort_keys=True)


def process_pending(model_name: str) -> dict:
    """Entry point of the wake-up job posted with every edit request: waits for the model's lease."""
    rt = runtime(model_name)
    store = job_store(rt)
    with ModelLease(store.redis, store.key("lease", model_name), rt.settings.lease_seconds):
        return process_pending_leased(rt, store)


def process_pending_leased(rt: ModelRuntime, store: JobStore) -> dict:
    model_name = rt.name
    leftovers = store.processing(model_name)  # taken by a worker that died: finish or redo them, never twice
    ids = leftovers + store.take_pending(model_name, max(0, rt.settings.coalesce_max - len(leftovers)))
    committed = {j: v for v in rt.registry.versions(model_name) for j in v.hyperparameters.get("jobs", [])}
    records = []
    for job_id in ids:
        record = store.get(job_id)
        done = committed.get(job_id)
        if record is None and done is None:  # its record was deleted or evicted: no edits left to apply
            log.warning("%s: job %s has no record (deleted or evicted); dropped", model_name, job_id)
            store.finish(model_name, job_id, status="failed")
        elif done is not None:  # committed before a crash: report it, do not apply it again
            if rt.registry.resolve(model_name, "latest") == done.parent:  # killed before `latest` moved
                rt.registry.set_alias(model_name, "latest", done.id, expected=done.parent)
            store.finish(model_name, job_id, status="succeeded", version=done.id, metrics=done.metrics)
        elif record["status"] != "cancelled":
            records.append(record)
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    for batch in groups.values():
        apply_batch(rt, store, batch)
    return {"processed": [r["id"] for r in records]}


def authors(batch: list[dict]) -> str:
    """Who posted the edits of a coalesced batch (the API records the posting key's role and id)."""
    return ", ".join(sorted({r["payload"].get("author", "") for r in batch} - {""}))


def apply_batch(rt: ModelRuntime, store: JobStore, batch: list[dict]) -> None:
    name = rt.name
    ids = [r["id"] for r in batch]
    payload = batch[0]["payload"]
    for job_id in ids:
        store.update(job_id, status="running", batch=ids, started_at=time.time())
        store.event(job_id, {"event": "running", "batch_size": len(ids)})
    try:
        requests = [EditRequest.from_dict(e) for r in batch for e in r["payload"]["edits"]]
        s = rt.settings  # the server's overrides of the model's recipe, then the request's
        server = {"batch_size": s.edit_batch_size or None,
                  "neighbour_weight": s.neighbour_weight if s.protect_neighbours else None,
                  "anchor_weight": s.anchor_weight if rt.anchors is not None else None,
                  "text_anchor_weight": s.text_anchor_weight if rt.text_anchors is not None else None}
        hyper = {k: v for k, v in (payload.get("hyperparameters") or {}).items() if v is not None}
        config = recommended_config(rt.model, rt.tokenizer, {"sequential_chunk": len(requests), **server, **hyper},
                                    protect=s.protect_neighbours, anchors=rt.anchors is not None,
                                    text_anchors=rt.text_anchors is not None, augment=s.augment)
        for attempt in range(2):  # once more if the head moved under us (e.g. a rollback)
            parent = rt.registry.resolve(name, payload.get("base_version") or "latest")
            try:
                outcome = edit_and_guard(rt, store, ids, requests, config, parent, payload.get("guard") or {})
                if outcome["status"] == "rejected":
                    if len(batch) > 1:
                        split(rt, store, batch, outcome["reason"])
                        return
                    for job_id, own in zip(ids, per_request(batch, outcome), strict=True):
                        store.finish(name, job_id, status="rejected", metrics={**outcome["metrics"], "request": own},
                                     error=outcome["reason"])
                    return
                version = rt.registry.commit(
                    name, parent, outcome["result"].changed, originals=outcome["result"].original,
                    curvature=contribution(outcome["result"]), author=authors(batch),
                    message=payload.get("message") or f"{len(requests)} edit(s)", method=config.method,
                    hyperparameters={**config.__dict__, "lr": outcome["result"].lr,
                                     "energy": outcome["result"].energy, "jobs": ids,
                                     "layers": list(rt.capability.layers)},
                    edits=[r.to_dict() for r in outcome["requests"]], metrics=outcome["metrics"], job_id=ids[0],
                )
                if outcome["result"].cache is not None:
                    rt.last_state = (version.id, outcome["result"].cache)
                break
            except Conflict:
                if attempt or payload.get("base_version"):
                    raise
        if payload.get("promote"):
            rt.registry.set_alias(name, "production", version.id)
        announce_aliases(store.redis, rt.settings.key_prefix, rt.registry, name)
        for job_id, own in zip(ids, per_request(batch, outcome), strict=True):
            store.finish(name, job_id, status="succeeded", version=version.id,
                         metrics={**outcome["metrics"], "request": own})
        log.info("%s: %d edit(s) from %d request(s) committed as %s", name, len(requests), len(ids), version.id)
        if rt.settings.keep_last:
            retain(rt)
    except (EditError, ValueError, TypeError, Conflict) as err:
        for job_id in ids:
            store.finish(name, job_id, status="failed", error=str(err))
    except Exception as err:
        log.error("%s: batch %s failed: %s", name, ids, traceback.format_exc())
        for job_id in ids:
            store.finish(name, job_id, status="failed", error=f"internal error: {err}")


def per_request(batch: list[dict], outcome: dict) -> list[dict]:
    """Each request's own figures in a coalesced batch: the reliability of its edits and the share of their
    neighbours unchanged (the batch's figures are the version's)."""
    report = (outcome["metrics"].get("neighbours") or {}).get("edits")
    out, start = [], 0
    for record in batch:
        n = len(record["payload"]["edits"])
        kept = [nb["unchanged"] for e in (report or [])[start : start + n] for nb in e["neighbours"]]
        out.append({"edits": n, "reliability": mean(outcome["accuracy"][start : start + n]),
                    "neighbours_unchanged": mean(kept) if kept else None, "neighbours_checked": len(kept)})
        start += n
    return out


def split(rt: ModelRuntime, store: JobStore, batch: list[dict], reason: str) -> None:
    """A coalesced batch that the guard rejected, applied again as two halves, each on the version before it.

    Coalescing is the worker's choice, not the requests': a request is rejected only when a batch it cannot be
    parted from (its own, in the end) fails the guard, never for the edits it happened to be queued beside. One
    failing request among n costs about 2n edits' work more (halves of n/2, n/4, …, each tried), and the others
    commit as their halves pass. Requests pinned to a ``base_version`` fail in the second half once the first has
    committed (the head has moved off their base), as they would have posted one after the other.
    """
    half = len(batch) // 2
    log.info("%s: a batch of %d request(s) was rejected (%s); applying it again in halves", rt.name, len(batch),
             reason)
    for part in (batch[:half], batch[half:]):
        for r in part:
            store.event(r["id"], {"event": "split", "reason": reason, "batch_size": len(part)})
        apply_batch(rt, store, part)


def retain(rt: ModelRuntime) -> None:
    """The retention policy: prune the weights of versions it does not keep, then free their blobs. Run once the
    jobs are finished: a failure here leaves the next commit to prune, and never fails an edit already committed."""
    try:
        pruned = rt.registry.prune(rt.name, rt.settings.keep_last, rt.settings.keep_every)
        freed = gc(rt.registry, grace_seconds=PRUNE_GC_GRACE) if pruned else None
    except Exception:
        log.error("%s: retention failed; the next commit tries again: %s", rt.name, traceback.format_exc())
        return
    if pruned:
        log.info("%s: retention pruned %s; %d unreferenced blob(s) freed (%.1f MB)", rt.name, ", ".join(pruned),
                 freed["removed"], freed["bytes_freed"] / 1e6)


def edit_and_guard(rt: ModelRuntime, store: JobStore, ids, requests, config, parent: str, guard: dict) -> dict:
    """Edit on top of ``parent``, measure drift and reliability, then put the parent's weights back."""
    rt.holder.switch_to(parent)
    state = version_cache(rt.registry, rt.name, parent, rt.capability, rt.last_state)
    # the neighbours of these edits and the parent's answers to them: kept while editing, reported after
    protection, settled = None, []
    modules, fan_in_fan_out = editable_modules(rt.model, state.layers), arch_spec(rt.model).fan_in_fan_out
    if rt.settings.protect_neighbours:
        protection = protect(rt.model, rt.tokenizer, requests, config.chat_form, modules, fan_in_fan_out,
                             seed=config.seed)
        requests = protection.requests
        for job_id in ids:
            store.event(job_id, {"event": "neighbours", "derived": len(protection.neighbours)})
        if config.keyed_solve:  # the edits already in the parent's weights, which the solve leaves as they were
            earlier = rt.registry.edits_in_force(rt.name, parent, settled_room(modules, fan_in_fan_out))
            settled = [r for r in map(EditRequest.from_dict, earlier) if r.subject]

    def progress(event: dict) -> None:
        if event["event"] == "epoch":
            event = {**event, "max_epochs": config.max_epochs}
        for job_id in ids:
            store.event(job_id, event)
            if event["event"] == "epoch":
                store.update(job_id, progress={"epoch": event["epoch"], "loss": event["loss"],
                                               "max_epochs": config.max_epochs})

    kept = protection.kept if protection else None
    if kept is None:  # no neighbour could be derived, or protection is off: nothing to keep, the paper's stop
        config = replace(config, neighbour_weight=0.0, keyed_solve=False, key_variants=(), early_stop=None)
    result = edit(rt.model, rt.tokenizer, requests, state, config, on_progress=progress, anchors=rt.anchors,
                  text_anchors=rt.text_anchors, kept=kept, settled=settled)
    try:
        accuracy = edit_accuracy(rt.model, rt.tokenizer, requests)
        kl, kl_base = drift(rt, result.original, result.changed)
        report = neighbour_report(rt.model, rt.tokenizer, requests, protection) if protection else None
    finally:
        with torch.no_grad():
            params = dict(rt.model.named_parameters())
            for n, t in result.original.items():
                params[n].copy_(t)
    reliability = mean(accuracy)
    metrics = {"reliability": reliability, "kl": kl, "kl_base": kl_base, "epochs": len(result.epoch_losses),
               "final_loss": result.epoch_losses[-1], "seconds": round(result.seconds, 2),
               "neighbours_unchanged": report["unchanged"] if report else None}
    for job_id in ids:
        store.event(job_id, {"event": "evaluation", **metrics})
    metrics["neighbours"] = report
    # per edited layer: the keyed solve's λ and its change ρ of generic text's outputs (crispedit.keyed_solve)
    metrics["solve"] = result.solve or None
    kl_budget = float(guard.get("kl_budget", rt.settings.kl_budget))
    min_rel = float(guard.get("min_reliability", rt.settings.min_reliability))
    min_unchanged = float(guard.get("min_neighbours_unchanged", rt.settings.min_neighbours_unchanged))
    life_budget = guard.get("kl_base_budget", rt.settings.kl_base_budget)

    def rejected(reason: str) -> dict:
        return {"status": "rejected", "metrics": metrics, "accuracy": accuracy, "reason": reason}

    if kl > kl_budget:
        return rejected(f"capability drift KL {kl:.4f} exceeds the budget {kl_budget}")
    if life_budget is not None and kl_base > float(life_budget):
        return rejected(f"drift from the base model (v0) KL {kl_base:.4f} exceeds the budget {life_budget}")
    if reliability < min_rel:
        return rejected(f"the edit did not take: reliability {reliability:.2f} < {min_rel}")
    if report and report["unchanged"] is not None and report["unchanged"] < min_unchanged:
        changed = [n for e in report["edits"] for n in e["neighbours"] if not n["unchanged"]]
        return rejected(f"the edit changed its neighbours: {report['unchanged']:.2f} of {report['checked']} "
                        f"unchanged < {min_unchanged} (e.g. {changed[0]['prompt']!r}: {changed[0]['before']!r} → "
                        f"{changed[0]['after']!r})")
    return {"status": "ok", "metrics": metrics, "accuracy": accuracy, "result": result, "requests": requests}


def drift(rt: ModelRuntime, parent: dict[str, torch.Tensor], edited: dict[str, torch.Tensor]) -> tuple[float, float]:
    """KL of the model as it is now (``edited`` in place) against its parent, and against v0, on the guard's text.

    Each version's KL against its parent passes the guard, but their drift adds up over a model's life; against v0
    it is measured in the same pass (one edited forward for both)."""
    if not rt.holder.differing:  # the parent holds v0's weights
        kl = mean_kls(rt.model, rt.tokenizer, rt.guard_texts, [parent], edited)[0]
        return kl, kl
    params = dict(rt.model.named_parameters())
    earlier = [n for n in rt.holder.differing if n not in edited]  # the parent's own changes, left in place
    now = {**edited, **{n: params[n].detach().clone() for n in earlier}}
    before = {**parent, **{n: now[n] for n in earlier}}
    kl, kl_base = mean_kls(rt.model, rt.tokenizer, rt.guard_texts, [before, rt.holder.base_tensors(now)], now)
    return kl, kl_base
