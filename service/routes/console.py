"""The web console: one static page that drives the public API with the user's own key."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["console"])


@router.get("/console", response_class=HTMLResponse, include_in_schema=False)
def console() -> HTMLResponse:
    return HTMLResponse((files("service") / "console" / "index.html").read_text(encoding="utf-8"))
