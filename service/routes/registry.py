"""Registry routes: versions, aliases, rollback, diff, export."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, HTTPException, Query

from registry import Conflict, NotFound, RegistryError
from service.auth import Admin, Reader
from service.deps import StateDep, split_model
from service.schemas import AliasPut, RollbackPost

router = APIRouter(prefix="/v1/registry/{model}", tags=["registry"])


def guarded(fn, *args):
    try:
        return fn(*args)
    except NotFound as err:
        raise HTTPException(404, str(err)) from err
    except Conflict as err:
        raise HTTPException(409, str(err)) from err
    except RegistryError as err:
        raise HTTPException(400, str(err)) from err


def public(version) -> dict:
    d = asdict(version)
    d["tensors"] = sorted(d["tensors"])
    d["curvature"] = {"parent": d["curvature"].get("parent"), "layers": sorted(d["curvature"].get("layers", {}))}
    return d


@router.get("/versions")
def versions(model: str, state: StateDep, _: Reader) -> dict:
    server, _ = split_model(state, model)
    return {"data": [public(v) for v in guarded(state.registry.versions, server.name)],
            "aliases": state.registry.aliases(server.name)}


@router.get("/versions/{version}")
def version(model: str, version: str, state: StateDep, _: Reader) -> dict:
    server, _ = split_model(state, model)
    return public(guarded(state.registry.get, server.name, version))


@router.put("/aliases/{alias}")
def put_alias(model: str, alias: str, body: AliasPut, state: StateDep, who: Admin) -> dict:
    server, _ = split_model(state, model)
    target = guarded(state.registry.set_alias, server.name, alias, body.version)
    state.audit.record(who, "set_alias", model=server.name, alias=alias, version=target)
    state.announce(server.name)
    return {"alias": alias, "version": target}


@router.post("/rollback")
def rollback(model: str, body: RollbackPost, state: StateDep, who: Admin) -> dict:
    server, _ = split_model(state, model)
    target = guarded(state.registry.rollback, server.name, body.to)
    state.audit.record(who, "rollback", model=server.name, to=target)
    state.announce(server.name)
    return {"rolled_back_to": target, "aliases": state.registry.aliases(server.name)}


@router.get("/diff")
def diff(model: str, state: StateDep, _: Reader, from_: str = Query("v0", alias="from"), to: str = "latest") -> dict:
    server, _ = split_model(state, model)
    return {"from": from_, "to": to, "tensors": guarded(state.registry.diff, server.name, from_, to)}


@router.post("/versions/{version}/export")
def export(model: str, version: str, state: StateDep, who: Admin) -> dict:
    """Write the version as a Hugging Face checkpoint folder under the data directory (admins only)."""
    from registry import export_version

    server, _ = split_model(state, model)
    vid = guarded(state.registry.get, server.name, version).id
    out = state.settings.data_dir / "exports" / server.name / vid
    path = guarded(export_version, state.registry, server.name, vid, out)
    state.audit.record(who, "export", model=server.name, version=vid)
    return {"model": server.name, "version": vid, "path": str(path)}
