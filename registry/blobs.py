"""Content-addressed tensor blobs: one safetensors file per tensor, named by the sha256 of its bytes.

A blob holds a whole tensor, or a change: another blob's tensor (its ``parent``, named in the file's metadata)
plus U V (``registry.delta``). Reading a change reads and checks its parents too, down to a whole tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from registry.delta import rebuild


class BlobError(RuntimeError):
    """A blob is missing or its bytes do not match its hash: the store cannot give a trustworthy tensor."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write aside, fsync, rename: readers see the old file or the whole new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class BlobStore:
    """``<root>/blobs/<sha[:2]>/<sha>.safetensors``; every read re-hashes the bytes."""

    def __init__(self, root: str | Path) -> None:
        self.dir = Path(root) / "blobs"

    def path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def put(self, tensor: torch.Tensor) -> str:
        return self._write(save_bytes({"tensor": tensor.detach().contiguous().cpu()}))

    def _write(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        try:  # already stored: touch it, so gc's grace period also covers a blob that is being reused
            os.utime(self.path(digest))
        except FileNotFoundError:
            write_atomic(self.path(digest), data)
        return digest

    def put_change(self, parent: str, depth: int, U: torch.Tensor, V: torch.Tensor) -> str:
        """A blob for the tensor ``parent``'s + U V, ``depth`` changes down to a whole tensor (the parent's + 1)."""
        return self._write(save_bytes({"U": U.detach().contiguous().cpu(), "V": V.detach().contiguous().cpu()},
                                      metadata={"parent": parent, "depth": str(depth)}))

    def missing(self, digest: str) -> BlobError:
        return BlobError(f"blob {digest} is missing from {self.dir}; run `crispedit registry verify`")

    def _read(self, digest: str) -> bytes:
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError as err:
            raise self.missing(digest) from err
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobError(f"blob {digest} is corrupt (its bytes do not match its hash); restore it from a backup")
        return data

    def _load(self, digest: str) -> tuple[torch.Tensor | None, str | None, dict[str, torch.Tensor]]:
        """(the whole tensor, None, {}) or (None, the parent's digest, {"U": …, "V": …}), its bytes checked."""
        data = self._read(digest)
        try:
            tensors, meta = load_bytes(data), metadata(data)
        except Exception as err:  # the bytes match their hash, yet safetensors cannot read them
            raise BlobError(f"blob {digest} is not a safetensors file") from err
        if "tensor" in tensors:
            return tensors["tensor"], None, {}
        if meta.get("parent") is None or set(tensors) != {"U", "V"}:
            raise BlobError(f"blob {digest} holds neither a tensor nor a change to one")
        return None, meta["parent"], tensors

    def get(self, digest: str) -> torch.Tensor:
        whole, parent, factors = self._load(digest)
        if whole is not None:
            return whole
        # hashes name contents, so a chain of parents cannot loop back on itself
        return rebuild(self.get(parent), factors["U"], factors["V"])

    def _metadata(self, digest: str) -> dict[str, str]:
        try:
            with open(self.path(digest), "rb") as f:
                head = f.read(8)
                head += f.read(struct.unpack("<Q", head)[0])
            return metadata(head)
        except FileNotFoundError as err:
            raise self.missing(digest) from err
        except (struct.error, ValueError) as err:
            raise BlobError(f"blob {digest} has an unreadable header; restore it from a backup") from err

    def parent(self, digest: str) -> str | None:
        """The blob a change is applied to (None for a whole tensor); reads the file's header only."""
        return self._metadata(digest).get("parent")

    def depth(self, digest: str) -> int:
        """How many changes lie between this blob and a whole tensor (0 for a whole tensor)."""
        return int(self._metadata(digest).get("depth", 0))

    def check(self, digest: str, seen: dict[str, str | None] | None = None) -> str | None:
        """None if the blob, and every blob a change is built on, is present and intact, else what is wrong.
        ``seen`` remembers the blobs already checked, so a store-wide check reads each blob once."""
        seen = {} if seen is None else seen
        if digest not in seen:
            try:
                _, parent, _ = self._load(digest)
                seen[digest] = self.check(parent, seen) if parent else None
            except BlobError as err:
                seen[digest] = str(err)
        return seen[digest]

    def digests(self) -> Iterator[str]:
        if self.dir.exists():
            for path in self.dir.glob("*/*.safetensors"):
                yield path.name.removesuffix(".safetensors")

    def remove(self, digest: str) -> int:
        path = self.path(digest)
        size = path.stat().st_size
        path.unlink()
        return size


def metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (its header: a little-endian u64 size, then JSON)."""
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size]).get("__metadata__", {})
