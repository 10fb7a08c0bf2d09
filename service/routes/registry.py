"""Registry routes: versions, aliases, rollback, diff, export."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse

from registry import Conflict, Gone, NotFound, RegistryError, archive, export_version, exported
from service.auth import Admin, Reader
from service.deps import StateDep, split_model
from service.schemas import AliasPut, RollbackPost

router = APIRouter(prefix="/v1/registry/{model}", tags=["registry"])
EXPORT_SECONDS = 1800  # an export of an 8B model writes 16 GB


def guarded(fn, *args):
    try:
        return fn(*args)
    except Gone:
        raise  # 410, with what was kept (the app's handler)
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
    return public(guarded(state.registry.live, server.name, version))


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


def export_folder(state, model: str, version: str, tar: bool = False) -> tuple[str, str, Path]:
    """(model, version id, folder or, with ``tar``, its archive): the version exported under the data directory,
    once. A Redis lock keeps two API processes, or two requests, from writing the same files at once."""
    server, _ = split_model(state, model)
    vid = guarded(state.registry.get, server.name, version).id
    folder = state.settings.data_dir / "exports" / server.name / vid
    with state.redis.lock(state.jobs.key("export", server.name, vid), timeout=EXPORT_SECONDS,
                          blocking_timeout=EXPORT_SECONDS):
        if not exported(folder):
            guarded(export_version, state.registry, server.name, vid, folder)
        return server.name, vid, archive(folder) if tar else folder


@router.post("/versions/{version}/export")
def export(model: str, version: str, state: StateDep, who: Admin) -> dict:
    """Write the version as a Hugging Face checkpoint folder under the data directory, with a model card and its
    provenance (admins only)."""
    name, vid, folder = export_folder(state, model, version)
    state.audit.record(who, "export", model=name, version=vid)
    return {"model": name, "version": vid, "path": str(folder), "download_url": f"/v1/registry/{name}/versions/"
            f"{vid}/download"}


@router.get("/versions/{version}/download", response_class=FileResponse)
def download(model: str, version: str, state: StateDep, who: Admin) -> FileResponse:
    """The exported version (exported now if need be) as a tar archive of its checkpoint folder (admins only)."""
    name, vid, tar = export_folder(state, model, version, tar=True)
    state.audit.record(who, "download", model=name, version=vid)
    return FileResponse(tar, media_type="application/x-tar", filename=f"{name}-{vid}.tar")
