"""Versioned, hot-swappable model registry for edited models (MLflow-style versions and aliases)."""

from registry.blobs import BlobError, BlobStore
from registry.export import archive, export_version, exported
from registry.hotswap import HotSwapModel
from registry.integrity import gc, verify
from registry.store import Conflict, Gone, NotFound, Registry, RegistryError, Version

__all__ = ["BlobError", "BlobStore", "Conflict", "Gone", "HotSwapModel", "NotFound", "Registry", "RegistryError",
           "Version", "archive", "export_version", "exported", "gc", "verify"]
