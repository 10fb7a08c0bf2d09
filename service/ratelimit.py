"""A per-key limit on edit posts: ``limits``' moving window, counted in Redis, so every API replica shares it
(a moving window, unlike fixed minutes, admits no burst of twice the limit across a minute's boundary)."""

from __future__ import annotations

import math
import time
from typing import Annotated

from fastapi import Depends, HTTPException
from limits import RateLimitItemPerMinute

from service.auth import Editor
from service.deps import StateDep


def limit_edit_posts(who: Editor, state: StateDep) -> dict:
    """Admit an edit post unless this key made ``edit_posts_per_minute`` of them in the last minute (429)."""
    limit = state.settings.edit_posts_per_minute
    if limit <= 0:
        return who
    item = RateLimitItemPerMinute(limit)
    if not state.edit_limiter.hit(item, "edit_posts", who["key_id"]):
        reset, _ = state.edit_limiter.get_window_stats(item, "edit_posts", who["key_id"])
        retry = max(1, math.ceil(reset - time.time()))
        raise HTTPException(429, f"this key may post {limit} edit requests per minute; retry in {retry} s, or put "
                                 "several edits in one request", headers={"Retry-After": str(retry)})
    return who


EditorWithinLimit = Annotated[dict, Depends(limit_edit_posts)]
