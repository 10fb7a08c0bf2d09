"""API keys with roles (reader < editor < admin), stored hashed; an audit log of who changed what.

Keys come from ``CRISPEDIT_API_KEYS="key:role,..."`` or the keys file (``<data dir>/api-keys.json``, hashes
only). With neither, the first start generates an admin key, stores its hash and prints the key once.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import error_response

log = logging.getLogger("crispedit.auth")

ROLES = ("reader", "editor", "admin")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def id_secret(path: Path) -> bytes:
    """The installation's secret for key ids, made once beside the registry (so every replica shares it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    for _ in range(50):  # another process may be writing it this instant
        if text := path.read_text().strip():
            return bytes.fromhex(text)
        time.sleep(0.02)
    raise RuntimeError(f"{path} is empty: delete it and restart")


class KeyRing:
    """sha256(key) → role; never holds a key in clear after construction. A key's public id (authors, audit) is
    an HMAC of it under the installation's secret: unlike a plain hash, it cannot be checked against guesses."""

    def __init__(self, spec: str, keys_file: Path, secret_file: Path | None = None) -> None:
        self.secret = id_secret(secret_file or keys_file.with_name("key-id-secret"))
        self.roles: dict[str, str] = {}
        for item in filter(None, (x.strip() for x in spec.split(","))):
            key, _, role = item.rpartition(":")
            if role not in ROLES or not key:
                raise ValueError(f"CRISPEDIT_API_KEYS entries are key:role with role in {ROLES}; got role {role!r}")
            self.roles[key_hash(key)] = role
        if keys_file.exists():
            self.roles.update(json.loads(keys_file.read_text()))
        if not self.roles:
            key = "ce-" + secrets.token_urlsafe(24)
            self.roles[key_hash(key)] = "admin"
            keys_file.parent.mkdir(parents=True, exist_ok=True)
            keys_file.write_text(json.dumps(self.roles))
            keys_file.chmod(0o600)
            print(f"\n  No API keys configured: generated an admin key (shown once, stored hashed in {keys_file}):"
                  f"\n    {key}\n", flush=True)

    def role_of(self, key: str) -> str | None:
        return self.roles.get(key_hash(key))

    def key_id(self, key: str) -> str:
        return hmac.new(self.secret, key.encode(), hashlib.sha256).hexdigest()[:12]


class AuditLog:
    """JSON lines: time, key id (a hash prefix, never the key), action, details."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, principal: dict, action: str, **details) -> None:
        line = {"time": time.time(), "key_id": principal["key_id"], "role": principal["role"], "action": action,
                **details}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        log.info("audit: %s by key %s: %s", action, principal["key_id"], details)


def bearer_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def unknown_key(request: Request) -> Response | None:
    """401 for a request to /v1 without a valid key, checked before its body is read or parsed (the route's
    dependency checks the role afterwards); None when the key is known or the path needs none."""
    if not request.url.path.startswith("/v1/") or request.method == "OPTIONS":
        return None
    key = bearer_key(request)
    if key is None:
        detail = "missing API key: send 'Authorization: Bearer <key>'"
    elif request.app.state.crispedit.keys.role_of(key) is None:
        detail = "invalid API key"
    else:
        return None
    return error_response(401, detail, headers={"WWW-Authenticate": "Bearer"})


# the scheme, as OpenAPI states it (Swagger's Authorize button); the check below answers for it
BEARER = HTTPBearer(auto_error=False, description="an API key with its role: reader, editor or admin")


def require(role: str):
    """A dependency that admits keys with at least ``role``; 401 without a valid key, 403 below the role."""
    needed = ROLES.index(role)

    def check(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> dict:
        key = credentials.credentials.strip() if credentials else None
        if not key:
            raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})
        have = request.app.state.crispedit.keys.role_of(key)
        if have is None:
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        if ROLES.index(have) < needed:
            raise HTTPException(403, f"this route needs the {role} role; this key has the {have} role")
        return {"role": have, "key_id": request.app.state.crispedit.keys.key_id(key)}

    return check


Reader = Annotated[dict, Depends(require("reader"))]
Editor = Annotated[dict, Depends(require("editor"))]
Admin = Annotated[dict, Depends(require("admin"))]
