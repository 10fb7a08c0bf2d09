"""A per-key limit on edit posts: a one-minute window counted in Redis, so every API replica shares it."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, HTTPException

from service.auth import Editor
from service.deps import StateDep


def limit_edit_posts(who: Editor, state: StateDep) -> dict:
    """Admit an edit post unless this key already made ``edit_posts_per_minute`` of them this minute (429)."""
    limit = state.settings.edit_posts_per_minute
    if limit <= 0:
        return who
    now = time.time()
    key = f"{state.settings.key_prefix}:rate:edit_posts:{who['key_id']}:{int(now // 60)}"
    with state.redis.pipeline() as pipe:
        count, _ = pipe.incr(key).expire(key, 120).execute()
    if count > limit:
        retry = 60 - int(now) % 60
        raise HTTPException(429, f"this key may post {limit} edit requests per minute; retry in {retry} s, or put "
                                 "several edits in one request", headers={"Retry-After": str(retry)})
    return who


EditorWithinLimit = Annotated[dict, Depends(limit_edit_posts)]
