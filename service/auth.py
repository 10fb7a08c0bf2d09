"""API keys with roles (reader < editor < admin), stored hashed; an audit log of who changed what.

Keys come from ``CRISPEDIT_API_KEYS="key:role,..."`` or the keys file (``<data dir>/api-keys.json``, hashes
only). With neither, the first start generates an admin key, stores its hash and prints the key once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse

log = logging.getLogger("crispedit.auth")

ROLES = ("reader", "editor", "admin")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """sha256(key) → role; never holds a key in clear after construction."""

    def __init__(self, spec: str, keys_file: Path) -> None:
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


def unknown_key(request: Request) -> JSONResponse | None:
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
    return JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def require(role: str):
    """A dependency that admits keys with at least ``role``; 401 without a valid key, 403 below the role."""
    needed = ROLES.index(role)

    def check(request: Request) -> dict:
        key = bearer_key(request)
        if key is None:
            raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})
        have = request.app.state.crispedit.keys.role_of(key)
        if have is None:
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        if ROLES.index(have) < needed:
            raise HTTPException(403, f"this route needs the {role} role; this key has the {have} role")
        return {"role": have, "key_id": key_hash(key)[:12]}

    return check


Reader = Annotated[dict, Depends(require("reader"))]
Editor = Annotated[dict, Depends(require("editor"))]
Admin = Annotated[dict, Depends(require("admin"))]
