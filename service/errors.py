"""Error replies in one shape: FastAPI's ``{"detail"}``, and beside it OpenAI's ``{"error": {"message", "type",
"param", "code"}}``, which the OpenAI SDKs, LangChain and LiteLLM read (without it they show only the status)."""

from __future__ import annotations

import json

from fastapi.responses import Response

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


def error_body(status: int, detail: object, param: str | None = None, kind: str | None = None, **extra) -> dict:
    message = detail if isinstance(detail, str) else json.dumps(detail)
    kind = kind or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"detail": detail, **extra, "error": {"message": message, "type": kind, "param": param, "code": None}}


def error_response(status: int, detail: object, headers: dict | None = None, param: str | None = None,
                   kind: str | None = None, **extra) -> Response:
    """The reply as ASCII JSON: a name or value a client sent (a lone surrogate) cannot break its encoding."""
    body = json.dumps(error_body(status, detail, param, kind, **extra), ensure_ascii=True)
    return Response(body, status_code=status, media_type="application/json", headers=headers)
