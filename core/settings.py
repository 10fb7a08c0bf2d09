"""Service configuration in one place: every setting is an environment variable ``CRISPEDIT_<NAME>``.

``crispedit config`` prints them all with their defaults, current values and meanings.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from crispedit.anchor import text_anchor_source
from crispedit.augment import resolve_augment
from crispedit.models import crispedit_home
from crispedit.neighbours import NEIGHBOUR_GUARD


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRISPEDIT_", extra="ignore")

    registry_root: Path = Field(default_factory=lambda: crispedit_home() / "registry",
                                description="versions, blobs, aliases and curvature caches (share it between machines)")
    redis_url: str = Field("redis://127.0.0.1:6379/0",
                           description="Redis for queues and job records; `crispedit serve` embeds one when unset")
    key_prefix: str = Field("crispedit", description="prefix of every Redis key and queue name")
    models: str = Field("smollm2", description="served models: 'name' or 'name=base' (bundled name or checkpoint "
                                               "folder), comma-separated")
    corpus: str = Field("self", description="capability corpus for a missing curvature cache: a .txt/.jsonl file, "
                                            "'self' (text sampled from the model), 'self-raw:PROMPTS' / "
                                            "'self-chat:PROMPTS' (the model's answers to a file of prompts), "
                                            "or a weighted mixture 'SOURCE=W,SOURCE=W'")
    augment: str = Field("auto", description="edits also train on other wordings: 'paraphrase', 'prefix' "
                                             "(both written by the base model), 'qa' (framed as a question), "
                                             "comma-separated, '' (none) or 'auto' (all three when anchors are "
                                             "configured, none without); a "
                                             "request's hyperparameters.augment overrides it")
    protect_neighbours: bool = Field(True, description="derive each edit's neighbours (the same question about "
                                     "other subjects, other questions about the same subject, its locality_prompt), "
                                     "keep the edited layers' outputs on them (weight CRISPEDIT_NEIGHBOUR_WEIGHT), "
                                     "write each edit through its subject's last token (subject key), "
                                     "phrase chat targets as the model answers, and report which answers changed")
    neighbour_weight: float | None = Field(None, ge=0, description="β of the penalty on the edited layers' "
                                           "output change over the neighbours' tokens; unset: the model's recipe "
                                           "(crispedit/arch.py, 30); a request's hyperparameters.neighbour_weight "
                                           "overrides it; 0: not kept, still reported")
    anchors: str = Field("", description="ANCHORS.jsonl of {\"prompt\", \"answer\"} pairs (unrelated questions) whose "
                                         "base-model predictions every edit keeps, by a KL penalty; '' = none")
    anchor_weight: float | None = Field(None, ge=0, description="β of that penalty when anchors are configured; "
                                        "unset: the model's recipe (1); a request's hyperparameters.anchor_weight "
                                        "overrides it; 0 = off")
    text_anchors: str = Field("cache", description="capability text ('self' or a .txt/.jsonl file) whose base-"
                                                   "model next-token predictions every edit keeps, by a KL penalty "
                                                   "at each position of 256 windows of 128 tokens; 'cache': "
                                                   "CRISPEDIT_CORPUS when that is a text file; '' = none")
    text_anchor_weight: float | None = Field(None, ge=0, description="β of that penalty when text anchors are "
                                             "configured; unset: the model's recipe (10); a request's "
                                             "hyperparameters.text_anchor_weight overrides it")
    cache_samples: int = Field(32, description="curvature cache: number of sequences (the paper uses more; this "
                                                 "default builds in about a minute on a laptop CPU)")
    cache_seq_len: int = Field(256, description="curvature cache: tokens per sequence")
    keep_last: int = Field(0, ge=0, description="retention: after each commit, keep the weights of the last N "
                           "versions, of every aliased one and of v0 (and every CRISPEDIT_KEEP_EVERY-th); older "
                           "versions keep their record but answer 410 Gone; 0: keep every version")
    keep_every: int = Field(0, ge=0, description="retention: also keep every N-th version (v0, vN, v2N, ...); 0: none")
    coalesce_max: int = Field(32, description="at most this many queued edit requests of a model form one batch")
    edit_batch_size: int = Field(0, ge=0, description="edits per optimizer step of a (coalesced) batch; 0 = the "
                                                      "model's recipe: 4 on a CPU (faster there, same quality), "
                                                      "32 on a GPU (the paper's)")
    lease_seconds: float = Field(15.0, gt=0, description="a worker editing a model renews its lease on it; one "
                                                         "killed is replaced by another after at most this long")
    kl_budget: float = Field(0.05, description="capability guard: reject an edit whose KL(base‖edited) on held-out "
                                               "text exceeds this")
    kl_base_budget: float | None = Field(None, gt=0, description="capability guard over a model's life: reject an "
                                         "edit whose KL(v0‖edited) on the same text exceeds this; unset: no limit "
                                         "(every version records its drift from v0 as metrics.kl_base)")
    min_reliability: float = Field(0.9, description="capability guard: reject an edit whose teacher-forced "
                                                    "reliability is lower")
    min_neighbours_unchanged: float = Field(NEIGHBOUR_GUARD, ge=0, le=1, description="capability guard: reject an "
                                            "edit that changes the answers of more of its neighbours than this "
                                            "share allows (a request's guard.min_neighbours_unchanged overrides it)")
    max_new_tokens: int = Field(256, description="upper bound on max_tokens of a completion")
    generation_slots: int = Field(4, ge=1, description="per model: at most this many generations run at once in the "
                                                       "API process; the rest wait their turn")
    generation_batch: int = Field(16, ge=1, description="per model: concurrent completions with the same "
                                  "sampling settings share each forward pass, whatever version each asks for, up to "
                                  "this many (1: each alone)")
    alias_poll_seconds: float = Field(5.0, gt=0, description="API processes preload newly aliased versions when "
                                      "notified over Redis pub/sub, and poll the registry this often as fallback")
    device: str = Field("auto", description="auto (CUDA when present), cpu or cuda[:N]")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="the weights' precision in the API and "
                                                  "the workers (bfloat16 halves a GPU's memory; an edit's statistics "
                                                  "and steps stay fp32)")
    torch_threads: int = Field(0, ge=0, description="torch's threads per process; 0: 1 in the API (one generation "
                                                    "gains nothing from more, and concurrent ones run on their own "
                                                    "threads) and one less than the machine's cores in a worker, so "
                                                    "that editing and answering never contend for a core")
    api_keys: str = Field("", description="'key:role,...' with role reader | editor | admin; none configured: an "
                                          "admin key is generated at first start and printed once")
    edit_posts_per_minute: int = Field(60, description="per API key; more edit posts in a minute get 429 (0: no limit)")
    max_body_bytes: int = Field(1_000_000, description="larger request bodies get 413")

    @field_validator("augment")
    @classmethod
    def known_augmentations(cls, v: str) -> str:
        resolve_augment(v, with_anchors=True)  # raises on an unknown name, at start-up rather than per job
        return v

    @property
    def data_dir(self) -> Path:
        """Beside the registry: the hashed keys file, the audit log and the embedded Redis."""
        return self.registry_root.parent

    def threads(self, role: str) -> int:
        """torch's thread count for a process of ``role`` ("api" or "worker"): the setting, or its default.
        Contending threads stall both sides: on 2 cores, 2 threads per process made a generation 3.9× slower
        while an edit ran beside it, and the edit 3.4× slower, than 1 each (``lab/threads.py``)."""
        if self.torch_threads:
            return self.torch_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
        return 1 if role == "api" else max(1, cores - 1)

    def text_anchor_source(self) -> str | None:
        """Where the workers' text anchors come from (None: no text anchors)."""
        return text_anchor_source(self.text_anchors, self.corpus)

    def model_bases(self) -> dict[str, str]:
        out = {}
        for item in filter(None, (x.strip() for x in self.models.split(","))):
            name, _, base = item.partition("=")
            out[name] = base or name
        return out

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(environment variable, default, meaning) for every setting."""
        rows = []
        for name, field in cls.model_fields.items():
            default = field.default_factory() if field.default_factory else field.default
            rows.append((f"CRISPEDIT_{name.upper()}", str(default), field.description or ""))
        return rows


@lru_cache
def get_settings() -> Settings:
    return Settings()
