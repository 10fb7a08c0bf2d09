"""Registry routes: versions, aliases, rollback, diff, export."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, HTTPException, Query

from registry import Conflict, NotFound, RegistryError
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
def versions(model: str, state: StateDep) -> dict:
    server, _ = split_model(state, model)
    return {"data": [public(v) for v in guarded(state.registry.versions, server.name)],
            "aliases": state.registry.aliases(server.name)}


@router.get("/versions/{version}")
def version(model: str, version: str, state: StateDep) -> dict:
    server, _ = split_model(state, model)
    return public(guarded(state.registry.get, server.name, version))


@router.put("/aliases/{alias}")
def put_alias(model: str, alias: str, body: AliasPut, state: StateDep) -> dict:
    server, _ = split_model(state, model)
    return {"alias": alias, "version": guarded(state.registry.set_alias, server.name, alias, body.version)}


@router.post("/rollback")
def rollback(model: str, body: RollbackPost, state: StateDep) -> dict:
    server, _ = split_model(state, model)
    target = guarded(state.registry.rollback, server.name, body.to)
    return {"rolled_back_to": target, "aliases": state.registry.aliases(server.name)}


@router.get("/diff")
def diff(model: str, state: StateDep, from_: str = Query("v0", alias="from"), to: str = "latest") -> dict:
    server, _ = split_model(state, model)
    return {"from": from_, "to": to, "tensors": guarded(state.registry.diff, server.name, from_, to)}
