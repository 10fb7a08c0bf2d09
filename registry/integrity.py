"""Store-wide checks: ``verify`` (every manifest, alias and blob sound) and ``gc`` (drop unreferenced blobs)."""

from __future__ import annotations

import json
import time

from registry.blobs import BlobError
from registry.store import Registry, RegistryError


def referenced_digests(registry: Registry) -> set[str]:
    """Every blob a manifest names, and every blob those changes are applied to (raises if one is unreadable:
    its parents are unknown, so nothing may be freed until it is restored)."""
    digests: set[str] = set()
    for model in registry.models():
        digests.update(registry.model_info(model)["base_tensors"].values())
        for version in registry.versions(model):
            digests.update(version.tensors.values())
            for parts in version.curvature.get("layers", {}).values():
                digests.update(v for v in parts.values() if isinstance(v, str))
    todo = list(digests)
    while todo:
        try:
            parent = registry.blobs.parent(todo.pop())
        except BlobError as err:
            raise RegistryError(f"gc stopped: {err}") from err
        if parent is not None and parent not in digests:
            digests.add(parent)
            todo.append(parent)
    return digests


def verify(registry: Registry) -> list[str]:
    """Every problem in the store, as sentences; an empty list means the store is sound."""
    problems: list[str] = []
    seen: dict[str, str | None] = {}  # blobs checked so far: versions share their parents' blobs
    for model in registry.models():
        try:
            versions = {v.id: v for v in registry.versions(model)}
        except (RegistryError, json.JSONDecodeError, TypeError) as err:
            problems.append(f"{model}: unreadable version manifest ({err})")
            continue
        for alias, target in registry.aliases(model).items():
            if target not in versions:
                problems.append(f"{model}: alias {alias!r} points at missing version {target}")
        for v in versions.values():
            if v.parent is not None and v.parent not in versions:
                problems.append(f"{model} {v.id}: parent {v.parent} is missing")
        for name, digest in registry.model_info(model)["base_tensors"].items():
            if (err := registry.blobs.check(digest, seen)) is not None:
                problems.append(f"{model} base value of {name}: {err}")
        for v in versions.values():
            for name, digest in v.tensors.items():
                if (err := registry.blobs.check(digest, seen)) is not None:
                    problems.append(f"{model} {v.id} {name}: {err}")
    return problems


def gc(registry: Registry, grace_seconds: float = 3600.0) -> dict:
    """Remove blobs no manifest references (older than ``grace_seconds``, so an in-flight commit keeps its own)."""
    keep = referenced_digests(registry)
    removed = freed = 0
    now = time.time()
    for digest in list(registry.blobs.digests()):
        path = registry.blobs.path(digest)
        if digest not in keep and now - path.stat().st_mtime > grace_seconds:
            freed += registry.blobs.remove(digest)
            removed += 1
    return {"removed": removed, "bytes_freed": freed, "kept": len(keep)}
