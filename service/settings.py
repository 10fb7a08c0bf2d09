"""Service configuration: every setting is an environment variable ``CRISPEDIT_<NAME>``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from crispedit.models import crispedit_home


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRISPEDIT_", extra="ignore")

    registry_root: Path = Field(default_factory=lambda: crispedit_home() / "registry")  # versions, blobs, caches
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "crispedit"  # every Redis key and queue name starts with this
    models: str = "smollm2"  # served models, "name" or "name=base" (bundled name or checkpoint folder), comma-separated
    corpus: str = "self"  # capability corpus for a missing curvature cache: a file, or "self"
    cache_samples: int = 40
    cache_seq_len: int = 512
    coalesce_max: int = 32  # at most this many queued edits of one model are applied as one batch
    kl_budget: float = 0.05  # capability guard: reject an edit whose KL(base‖edited) on held-out text exceeds this
    min_reliability: float = 0.9  # capability guard: reject an edit whose teacher-forced reliability is lower
    max_new_tokens: int = 256  # upper bound on completion length
    device: str = "auto"
    api_keys: str = ""  # "key:role,..." with role reader | editor | admin; none: an admin key is generated once
    max_body_bytes: int = 1_000_000  # larger request bodies get 413

    @property
    def data_dir(self) -> Path:
        """Beside the registry: the hashed keys file and the audit log."""
        return self.registry_root.parent

    def model_bases(self) -> dict[str, str]:
        out = {}
        for item in filter(None, (x.strip() for x in self.models.split(","))):
            name, _, base = item.partition("=")
            out[name] = base or name
        return out


@lru_cache
def get_settings() -> Settings:
    return Settings()
