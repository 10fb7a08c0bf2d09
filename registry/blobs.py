"""Content-addressed tensor blobs: one safetensors file per tensor, named by the sha256 of its bytes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes


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
        data = save_bytes({"tensor": tensor.detach().contiguous().cpu()})
        digest = hashlib.sha256(data).hexdigest()
        try:  # already stored: touch it, so gc's grace period also covers a blob that is being reused
            os.utime(self.path(digest))
        except FileNotFoundError:
            write_atomic(self.path(digest), data)
        return digest

    def get(self, digest: str) -> torch.Tensor:
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise BlobError(f"blob {digest} is missing from {self.dir}; run `crispedit registry verify`") from err
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobError(f"blob {digest} is corrupt (its bytes do not match its hash); restore it from a backup")
        return load_bytes(data)["tensor"]

    def check(self, digest: str) -> str | None:
        """None if the blob is present and intact, else what is wrong with it."""
        try:
            self.get(digest)
        except BlobError as err:
            return str(err)
        return None

    def digests(self) -> Iterator[str]:
        if self.dir.exists():
            for path in self.dir.glob("*/*.safetensors"):
                yield path.name.removesuffix(".safetensors")

    def remove(self, digest: str) -> int:
        path = self.path(digest)
        size = path.stat().st_size
        path.unlink()
        return size
