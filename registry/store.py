"""The model registry: immutable numbered versions, movable aliases, compare-and-set commits.

Layout under one root (a local folder, or a volume shared by several machines)::

    blobs/<sha[:2]>/<sha>.safetensors         one tensor each, or a low-rank change to one, content-addressed
    models/<model>/model.json                 base checkpoint, fingerprint, base values of edited tensors
    models/<model>/versions/v<N>.json         immutable manifests; v0 is the base
    models/<model>/aliases/<alias>.json       {"version": "v3"}: latest, production, any user name
    models/<model>/.lock                      flock: one writer at a time per model

A manifest maps every tensor that differs from the base to a blob, so any version is "base + its map". A
small edit's blob holds only its low-rank change from the parent version's blob (``registry.delta``).
Commits write blobs, then the manifest, then move ``latest``, all under the model's lock and only if
``latest`` still equals the caller's parent: two writers can never interleave or lose a version, and a
crash at any point leaves no alias pointing at a missing version.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from registry.blobs import BlobStore, write_atomic
from registry.delta import low_rank_change

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION = re.compile(r"^v(0|[1-9][0-9]{0,8})$")
MAX_CHAIN = 32  # changes read to rebuild one tensor at most: then it is stored whole again


class RegistryError(RuntimeError):
    """Base class: a registry operation was refused; the message says why."""


class NotFound(RegistryError):
    pass


class Conflict(RegistryError):
    """The head moved since the caller read it: rebase onto the new head and try again."""


class Gone(RegistryError):
    """The version was pruned by the retention policy: its record remains, its weights do not."""

    def __init__(self, message: str, kept: list[str]) -> None:
        super().__init__(message)
        self.kept = kept


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name) or VERSION.match(name) and kind == "alias":
        raise RegistryError(
            f"invalid {kind} name {name!r}: use 1-64 letters, digits, '_', '-', '.', starting with a letter or digit"
            + (" (and not of the form v<N>, which names versions)" if kind == "alias" else "")
        )
    return name


@dataclass(frozen=True)
class Version:
    """One immutable model version."""

    id: str
    model: str
    parent: str | None
    created_at: float
    author: str = ""
    message: str = ""
    method: str = ""
    hyperparameters: dict = field(default_factory=dict)
    edits: list = field(default_factory=list)
    tensors: dict[str, str] = field(default_factory=dict)  # tensor name → blob digest, all that differ from v0
    metrics: dict = field(default_factory=dict)
    curvature: dict = field(default_factory=dict)  # {"parent": version or None, "layers": {module: {...}}}
    job_id: str | None = None
    # set when the retention policy dropped this version's weights: {"at": time, "policy": {...}}. Its record and
    # its curvature contribution stay, since the curvature state of every later version folds it in
    pruned: dict = field(default_factory=dict)

    @property
    def number(self) -> int:
        return int(self.id[1:])


class Registry:
    """Verb-first operations over the store; every mutation takes the model's lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.blobs = BlobStore(self.root)

    # ---------------------------------------------------------------- paths and locking
    def model_dir(self, model: str) -> Path:
        return self.root / "models" / check_name("model", model)

    @contextlib.contextmanager
    def locked(self, model: str):
        path = self.model_dir(model) / ".lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_json(self, path: Path, what: str) -> dict:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as err:
            raise NotFound(f"{what} not found") from err

    # ---------------------------------------------------------------- models
    def create_model(self, model: str, base: str, fingerprint: str, author: str = "") -> Version:
        """Register ``model`` with its base checkpoint; its ``v0`` is the base and ``latest`` points at it."""
        with self.locked(model):
            info = self.model_dir(model) / "model.json"
            if info.exists():
                existing = json.loads(info.read_text())
                if existing["fingerprint"] != fingerprint:
                    raise Conflict(f"model {model!r} exists with another base ({existing['base']})")
                return self.get(model, "v0")
            v0 = Version(id="v0", model=model, parent=None, created_at=time.time(), author=author, message="base")
            self._write_version(v0)
            self._write_alias(model, "latest", "v0")
            # written last: a model exists once model.json does, so a crash before it leaves nothing half-made
            write_atomic(info, json.dumps({"name": model, "base": base, "fingerprint": fingerprint,
                                           "base_tensors": {}}, indent=2).encode())
            return v0

    def models(self) -> list[str]:
        d = self.root / "models"
        return sorted(p.name for p in d.iterdir() if (p / "model.json").exists()) if d.exists() else []

    def model_info(self, model: str) -> dict:
        return self._read_json(self.model_dir(model) / "model.json", f"model {model!r}")

    def base_tensor(self, model: str, name: str) -> torch.Tensor:
        digest = self.model_info(model)["base_tensors"].get(name)
        if digest is None:
            raise NotFound(f"no base value of {name} stored for {model!r}")
        return self.blobs.get(digest)

    # ---------------------------------------------------------------- versions and aliases
    def _write_version(self, version: Version) -> None:
        path = self.model_dir(version.model) / "versions" / f"{version.id}.json"
        write_atomic(path, json.dumps(asdict(version), indent=2).encode())

    def _write_alias(self, model: str, alias: str, version: str) -> None:
        path = self.model_dir(model) / "aliases" / f"{alias}.json"
        write_atomic(path, json.dumps({"version": version, "updated_at": time.time()}).encode())

    def resolve(self, model: str, ref: str) -> str:
        """A version id for ``ref``: ``v<N>`` as is, else an alias name."""
        if isinstance(ref, str) and VERSION.match(ref):
            return ref
        check_name("alias", ref)
        return self._read_json(self.model_dir(model) / "aliases" / f"{ref}.json", f"alias {ref!r} of {model!r}")[
            "version"]

    def get(self, model: str, ref: str = "latest") -> Version:
        vid = self.resolve(model, ref)
        data = self._read_json(self.model_dir(model) / "versions" / f"{vid}.json", f"version {vid} of {model!r}")
        return Version(**data)

    def live(self, model: str, ref: str) -> Version:
        """The version ``ref`` names, if its weights are still kept; :class:`Gone` if it was pruned."""
        version = self.get(model, ref)
        if version.pruned:
            kept = [v.id for v in self.versions(model) if not v.pruned]
            policy = version.pruned.get("policy", {})
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(version.pruned.get("at", 0)))
            raise Gone(f"{model} {version.id} was pruned at {when} UTC by the retention policy (keep every aliased "
                       f"version, the last {policy.get('keep_last')} and every {policy.get('keep_every') or '-'}th); "
                       f"its record remains but its weights do not. Kept: {', '.join(kept)}", kept)
        return version

    def versions(self, model: str) -> list[Version]:
        d = self.model_dir(model) / "versions"
        if not d.exists():
            raise NotFound(f"model {model!r} not found")
        ids = sorted((p.stem for p in d.glob("v*.json") if VERSION.match(p.stem)), key=lambda v: int(v[1:]))
        return [self.get(model, v) for v in ids]

    def aliases(self, model: str) -> dict[str, str]:
        d = self.model_dir(model) / "aliases"
        return {p.stem: json.loads(p.read_text())["version"] for p in sorted(d.glob("*.json"))} if d.exists() else {}

    def set_alias(self, model: str, alias: str, ref: str, expected: str | None = None) -> str:
        """Point ``alias`` at a version; with ``expected``, only if it still points where the caller saw it."""
        check_name("alias", alias)
        with self.locked(model):
            version = self.live(model, ref).id
            if expected is not None and self.aliases(model).get(alias) != expected:
                raise Conflict(f"alias {alias!r} moved (now {self.aliases(model).get(alias)}, expected {expected})")
            self._write_alias(model, alias, version)
            return version

    def find_job(self, model: str, job_id: str) -> Version | None:
        """The version a job already committed, so a retried job never applies its edit twice."""
        return next((v for v in self.versions(model) if v.job_id == job_id), None)

    # ---------------------------------------------------------------- commits
    def commit(
        self,
        model: str,
        parent: str,
        tensors: dict[str, torch.Tensor],
        originals: dict[str, torch.Tensor] | None = None,
        curvature: dict[str, dict[str, torch.Tensor | int]] | None = None,
        curvature_parent: str | None = "parent",
        **fields,
    ) -> Version:
        """Commit a new version on top of ``parent`` if ``latest`` still is ``parent`` (else :class:`Conflict`).

        ``tensors`` are the new values of the tensors this edit changed; ``originals`` their values in the
        parent (the base values of tensors edited for the first time are stored once, for swaps and diffs).
        ``curvature`` holds this edit's own curvature contribution per module (tensors are stored as blobs).
        """
        with self.locked(model):
            head = self.resolve(model, "latest")
            if head != parent:
                raise Conflict(f"{model}: head is {head}, not {parent}; rebase the edit onto {head}")
            parent_version = self.get(model, parent)
            info = self.model_info(model)
            for name in tensors:
                if name not in parent_version.tensors and name not in info["base_tensors"]:
                    if originals is None or name not in originals:
                        raise RegistryError(f"the base value of {name} is needed the first time it is edited")
                    info["base_tensors"][name] = self.blobs.put(originals[name])
            mapping = dict(parent_version.tensors)
            for name, t in tensors.items():
                mapping[name] = self._put_weight(parent_version.tensors.get(name) or info["base_tensors"][name], t)
            layers = {
                module: {k: (self.blobs.put(v) if isinstance(v, torch.Tensor) else v) for k, v in parts.items()}
                for module, parts in (curvature or {}).items()
            }
            number = max(v.number for v in self.versions(model)) + 1
            version = Version(
                id=f"v{number}", model=model, parent=parent, created_at=time.time(), tensors=mapping,
                curvature={"parent": parent if curvature_parent == "parent" else curvature_parent, "layers": layers},
                **fields,
            )
            write_atomic(self.model_dir(model) / "model.json", json.dumps(info, indent=2).encode())
            self._write_version(version)
            self._write_alias(model, "latest", version.id)
            return version

    def _put_weight(self, parent: str, tensor: torch.Tensor) -> str:
        """A blob for ``tensor``: its change from the ``parent`` blob's tensor where that change is of low rank
        (``registry.delta``) and the chain of changes is short, else the whole tensor."""
        depth = self.blobs.depth(parent)
        if depth < MAX_CHAIN:
            factors = low_rank_change(self.blobs.get(parent), tensor.detach().cpu())
            if factors is not None:
                return self.blobs.put_change(parent, depth + 1, *factors)
        return self.blobs.put(tensor)

    def rollback(self, model: str, to: str, aliases: tuple[str, ...] = ("latest", "production")) -> str:
        """Move ``latest`` (the edit head) and ``production`` back to ``to``; history stays as it is."""
        with self.locked(model):
            version = self.live(model, to).id
            current = self.aliases(model)
            for alias in aliases:
                if alias == "latest" or alias in current:
                    self._write_alias(model, alias, version)
            return version

    def revert(self, model: str, to: str, author: str = "", message: str = "") -> Version:
        """A new version on top of the head whose tensors (and curvature state) equal those of ``to``."""
        target = self.live(model, to)
        head = self.get(model, "latest")
        with self.locked(model):
            if self.resolve(model, "latest") != head.id:
                raise Conflict(f"{model}: head moved during revert; try again")
            version = Version(
                id=f"v{max(v.number for v in self.versions(model)) + 1}", model=model, parent=head.id,
                created_at=time.time(), author=author, message=message or f"revert to {target.id}",
                method="revert", tensors=dict(target.tensors), curvature={"parent": target.id, "layers": {}},
            )
            self._write_version(version)
            self._write_alias(model, "latest", version.id)
            return version

    def prune(self, model: str, keep_last: int, keep_every: int = 0) -> list[str]:
        """Drop the weights of every version but v0, the aliased ones, the last ``keep_last`` and each
        ``keep_every``-th (v0, vN, v2N, …; 0: none); returns the versions pruned now. Their blobs are freed by
        :func:`registry.integrity.gc` once nothing else references them."""
        if keep_last < 1 or keep_every < 0:
            raise RegistryError(f"keep_last must be at least 1 and keep_every non-negative, got {keep_last}, "
                                f"{keep_every}")
        with self.locked(model):
            versions = self.versions(model)
            aliased = set(self.aliases(model).values())
            recent = {v.id for v in versions[-keep_last:]}
            pruned = []
            for v in versions:
                every = keep_every > 0 and v.number % keep_every == 0
                if v.pruned or v.number == 0 or v.id in aliased or v.id in recent or every:
                    continue
                policy = {"keep_last": keep_last, "keep_every": keep_every}
                self._write_version(replace(v, tensors={}, pruned={"at": time.time(), "policy": policy}))
                pruned.append(v.id)
            return pruned

    # ---------------------------------------------------------------- reading back
    def tensors(self, model: str, ref: str) -> dict[str, torch.Tensor]:
        """Every tensor of a version that differs from the base, verified against its hash."""
        return {name: self.blobs.get(d) for name, d in self.live(model, ref).tensors.items()}

    def lineage(self, model: str, ref: str = "latest") -> list[Version]:
        """The version and its ancestors, newest first."""
        out, version = [], self.get(model, ref)
        while True:
            out.append(version)
            if version.parent is None:
                return out
            version = self.get(model, version.parent)

    def curvature_walk(self, model: str, ref: str) -> Iterator[Version]:
        """``ref`` and the versions whose curvature shapes its state, newest first (follows reverts)."""
        version = self.get(model, ref)
        while version is not None:
            yield version
            parent = version.curvature.get("parent")
            version = self.get(model, parent) if parent else None

    def edits_in_force(self, model: str, ref: str, limit: int) -> list[dict]:
        """The newest ``limit`` edits whose change is in ``ref``'s weights, oldest first: ``ref``'s own and those
        of the versions its curvature walks through (after a revert, those of the version it went back to)."""
        found: list[dict] = []
        for version in self.curvature_walk(model, ref):
            if len(found) >= limit:
                break
            found = list(version.edits) + found
        return found[-limit:] if limit > 0 else []

    def curvature_chain(self, model: str, ref: str) -> list[dict]:
        """The curvature contributions that shape ``ref``'s state, oldest first."""
        return [v.curvature["layers"] for v in self.curvature_walk(model, ref) if v.curvature.get("layers")][::-1]

    def diff(self, model: str, a: str, b: str) -> dict[str, float]:
        """Tensors that differ between two versions, with ‖T_b − T_a‖ / ‖T_a‖."""
        va, vb = self.live(model, a), self.live(model, b)
        out = {}
        for name in sorted(set(va.tensors) | set(vb.tensors)):
            da, db = va.tensors.get(name), vb.tensors.get(name)
            if da == db:
                continue
            ta = self.blobs.get(da) if da else self.base_tensor(model, name)
            tb = self.blobs.get(db) if db else self.base_tensor(model, name)
            out[name] = float((tb.float() - ta.float()).norm() / ta.float().norm())
        return out
