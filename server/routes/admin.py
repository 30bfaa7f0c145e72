"""Admin: upload and manage deltas, inspect the cache. Behind a Bearer token.

An upload streams to a temporary file under a size limit, is validated (format,
checksum, positions, values, base fingerprint, tensor names and shapes), and only
then committed with an atomic rename: a failed upload stores nothing.

Actions on one name are linearizable: each holds the name's lock from its first
check to its last effect, so an upload, replace, delete or preload of the same name
never interleave. A replace holds new requests for the name at the door and lets
the requests already running on the old version finish before the new file is
committed; a delete drains them too. File I/O and hashing run off the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from starlette.concurrency import run_in_threadpool

from deltastore import faults
from deltastore.apply import BaseMismatchError
from deltastore.format import DeltaFormatError
from deltastore.merge import MergeMethod
from deltastore.sources import SourceError, open_model
from deltastore.store import InvalidName, check_name
from server.adapters import Forbidden, NotFound, confine, make_upload
from server.compose import CompositionError
from server.deps import AdminDep, ReadyDep, StateDep
from server.engine.cache import ByteLRU, CacheFull, EntryInfo
from server.engine.core import Engine, InUse, WeightsUnavailable
from server.engine.threads import serial
from server.errors import APIError
from server.routes.resolve import check_members, store_names
from server.schemas import CacheInfo, CompositionRequest, DeltaInfo, Fidelity, TierInfo
from server.state import AppState

router = APIRouter(prefix="/admin", tags=["admin"])
DRAIN_TIMEOUT_S = 600.0


def _name(state: AppState, name: str, must_exist: bool = True) -> str:
    try:
        check_name(name)
    except InvalidName as e:
        raise APIError(400, str(e), "invalid_name", "name") from e
    if must_exist and (name in state.retiring or not state.store.exists(name)):
        raise APIError(404, f"no delta named {name!r}", "not_found")
    return name


def _info(state: AppState, name: str) -> DeltaInfo:
    try:
        stored = state.store.info(name)
    except KeyError:
        raise APIError(404, f"no delta named {name!r}", "not_found") from None
    m, engine = stored.meta, state.engine
    return DeltaInfo(
        name=name,
        size_bytes=stored.size,
        sha256=stored.sha256,
        kept_entries=sum(t.count for t in m.tensors.values()),
        method=m.method,
        rate=m.rate,
        q=m.q,
        tensors=len(m.tensors),
        created=m.created,
        source=m.source,
        tier=engine.tier_of(name) if engine else "disk",
        pinned=bool(engine and engine.host.is_pinned(name)),
        fidelity=Fidelity.of(m.fidelity),
    )


async def _on_worker(ready: Any, fn: Any) -> Any:
    _, scheduler = ready
    try:
        return await asyncio.wrap_future(scheduler.control(fn))
    except InUse as e:
        raise APIError(409, str(e), "in_use") from e
    except CacheFull as e:
        raise APIError(409, f"no room in the cache: {e}", "cache_full") from e
    except WeightsUnavailable as e:
        raise APIError(
            503, "the resident weights could not be verified", "weights_unavailable"
        ) from e


async def _drain(state: AppState, ready: Any, name: str) -> None:
    """Wait until no request for `name` (or a composition of it) is queued or running
    (409 after a while)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_TIMEOUT_S

    def busy() -> bool:  # requests for it, or for a composition it is a member of
        if ready[1].in_flight(name):
            return True
        keys = ready[1].variants_in_flight() - {name}
        return any(name in store_names(state, key) for key in keys)

    while busy():
        if loop.time() > deadline:
            raise APIError(409, f"{name!r} still has requests in flight", "in_use")
        await asyncio.sleep(0.02)


async def _info_async(state: AppState, name: str) -> DeltaInfo:
    return await run_in_threadpool(_info, state, name)  # sha256 of the file: off the loop


def check_new_name(state: AppState, name: str, replace: bool) -> None:
    """A name an upload may take: valid, not the base or a composition, and free
    unless `replace` (409 otherwise)."""
    _name(state, name, must_exist=False)
    if name == state.base_name:
        raise APIError(409, f"{name!r} is the base", "exists", "name")
    if not replace and name not in state.retiring and state.store.exists(name):  # early out
        raise APIError(
            409, f"a delta named {name!r} exists (replace=true overwrites)", "exists", "name"
        )
    if state.compositions.stamp(name) is not None:
        raise APIError(409, f"{name!r} is a registered composition", "exists", "name")


@router.post("/deltas", status_code=status.HTTP_201_CREATED)
async def upload(
    request: Request,
    state: StateDep,
    ready: ReadyDep,
    _: AdminDep,
    name: Annotated[str, Query(description="variant name")],
    replace: Annotated[bool, Query(description="overwrite an existing variant")] = False,
    source: Annotated[
        str | None,
        Query(
            description="instead of a body: a fine-tune, LoRA adapter or delta file to "
            "compress (a path within --adapter-roots, or a Hub id org/name)"
        ),
    ] = None,
    revision: Annotated[str | None, Query(description="the source's Hub revision")] = None,
) -> DeltaInfo:
    check_new_name(state, name, replace)
    limit = state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"upload of {declared} bytes exceeds {limit}", "too_large")
    if source is not None:
        if declared not in (None, "0"):
            raise APIError(400, "source: give a source or a body, not both", "invalid", "source")
        path = await confined(state, source, revision)
        upload = await by_reference(state, name, path, source)
    else:
        if revision is not None:
            raise APIError(400, "revision applies to a source", "invalid", "revision")
        upload = state.store.new_upload()
    try:
        if source is None:
            await _receive(request, upload, limit)
        faults.point("upload.received")
        return await commit_upload(state, ready, name, upload, replace)
    finally:
        await run_in_threadpool(upload.unlink, missing_ok=True)


async def confined(state: AppState, ref: str, revision: str | None) -> Path:
    """`ref` within --adapter-roots (403 outside, saying nothing more; 404 if absent)."""
    try:
        return await run_in_threadpool(confine, ref, state.settings.adapter_roots, revision)
    except Forbidden as e:
        raise APIError(403, str(e), "forbidden", "source") from e
    except NotFound as e:
        raise APIError(404, str(e), "not_found", "source") from e
    except SourceError as e:
        raise APIError(400, str(e), "invalid_source", "source") from e


async def by_reference(state: AppState, name: str, path: Path, ref: str) -> Path:
    """The reference compressed (recommend's defaults) into a new upload file, off the
    event loop, one at a time (400 with the reason when it cannot be)."""
    assert state.base_dir is not None  # ready
    base = open_model(state.base_dir)
    async with state.import_lock():
        try:
            return await run_in_threadpool(serial(make_upload), state.store, base, path, ref)
        except ValueError as e:  # SourceError, DeltaFormatError, BaseMismatchError
            raise APIError(400, f"cannot serve {ref!r} as {name!r}: {e}", "invalid_source") from e


async def commit_upload(
    state: AppState, ready: Any, name: str, upload: Path, replace: bool
) -> DeltaInfo:
    """Validate an upload file against the base and commit it under `name`: a
    replace waits for the old version's requests, holding new ones at the door."""
    try:
        await _on_worker(ready, lambda e: e.check_upload(upload))
    except (DeltaFormatError, BaseMismatchError) as e:
        reason = str(e).replace(f"{upload}: ", "").replace(str(upload), "upload")
        raise APIError(400, f"invalid delta {name!r}: {reason}", "invalid_delta") from e
    async with state.name_lock(name):
        if state.compositions.stamp(name) is not None:  # registered since the check
            raise APIError(409, f"{name!r} is a registered composition", "exists", "name")
        exists = state.store.exists(name)
        if exists and not replace:
            raise APIError(
                409, f"a delta named {name!r} exists (replace=true overwrites)", "exists", "name"
            )
        if exists:  # new requests wait at the door; the old version's finish first
            state.replacing.add(name)
        try:
            if exists:
                await _drain(state, ready, name)
            try:  # a file put in the store directory by hand since the check
                await run_in_threadpool(state.store.commit, name, upload, replace)
            except FileExistsError as e:
                raise APIError(409, str(e), "exists") from e
            if exists:  # the old weights (and merges of them) are not served again once released
                await _on_worker(ready, lambda e: e.invalidate(name))
        finally:
            state.replacing.discard(name)
    return await _info_async(state, name)


async def _receive(request: Request, upload: Any, limit: int) -> None:
    """Stream the body to `upload` (writes off the event loop, in 1 MiB pieces)."""
    size, pending = 0, bytearray()
    with upload.open("wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"upload exceeds {limit} bytes", "too_large")
            pending += chunk
            if len(pending) >= 1 << 20:
                await run_in_threadpool(f.write, bytes(pending))
                pending.clear()
        await run_in_threadpool(f.write, bytes(pending))
    if size == 0:
        raise APIError(400, "empty body: send the delta file as the request body", "empty")


@router.get("/deltas")
def list_deltas(state: StateDep, _: AdminDep) -> list[DeltaInfo]:
    out = []
    for n in state.store.names():
        if n in state.retiring:
            continue
        try:
            out.append(_info(state, n))
        except (APIError, FileNotFoundError):
            continue  # deleted while listing
    return out


@router.get("/deltas/{name}")
def get_delta(name: str, state: StateDep, _: AdminDep) -> DeltaInfo:
    return _info(state, _name(state, name))


@router.delete("/deltas/{name}")
async def delete_delta(name: str, state: StateDep, ready: ReadyDep, _: AdminDep) -> dict[str, str]:
    await remove(state, ready, name)
    return {"deleted": name}


async def remove(state: AppState, ready: Any, name: str) -> None:
    """Delete a variant once its running and queued requests finish (404 if none)."""
    _name(state, name)
    async with state.name_lock(name):
        _name(state, name)  # still there once the lock is ours
        state.retiring.add(name)  # new requests get 404; running and queued ones finish
        try:
            await _drain(state, ready, name)
            await _on_worker(ready, lambda e: e.forget(name))
            await run_in_threadpool(state.store.delete, name)
        finally:
            state.retiring.discard(name)


@router.post("/deltas/{name}/pin")
async def pin(name: str, state: StateDep, ready: ReadyDep, _: AdminDep) -> DeltaInfo:
    async with state.name_lock(name):
        _name(state, name)
        await _on_worker(ready, lambda e: e.pin(name, True))
        return await _info_async(state, name)


@router.post("/deltas/{name}/unpin")
async def unpin(name: str, state: StateDep, ready: ReadyDep, _: AdminDep) -> DeltaInfo:
    async with state.name_lock(name):
        _name(state, name)
        await _on_worker(ready, lambda e: e.pin(name, False))
        return await _info_async(state, name)


@router.post("/deltas/{name}/preload")
async def preload(name: str, state: StateDep, ready: ReadyDep, _: AdminDep) -> DeltaInfo:
    async with state.name_lock(name):
        _name(state, name)
        try:
            await _on_worker(ready, lambda e: e.preload(name))
        except (DeltaFormatError, BaseMismatchError) as e:
            reason = str(e).replace(f"{state.store.path(name)}: ", "")
            raise APIError(400, f"cannot load {name!r}: {reason}", "invalid_delta") from e
        return await _info_async(state, name)


@router.post("/deltas/{name}/evict")
async def evict(name: str, state: StateDep, ready: ReadyDep, _: AdminDep) -> DeltaInfo:
    engine: Engine = ready[0]
    async with state.name_lock(name):
        _name(state, name)
        if engine.host.is_pinned(name):
            raise APIError(409, f"{name!r} is pinned: unpin it first", "pinned")
        await _on_worker(ready, lambda e: e.evict(name))
        return await _info_async(state, name)


# --------------------------------------------------------------------------- compositions


@router.post("/compositions", status_code=status.HTTP_201_CREATED)
async def add_composition(
    req: CompositionRequest,
    state: StateDep,
    ready: ReadyDep,
    _: AdminDep,
    replace: Annotated[bool, Query(description="overwrite an existing recipe")] = False,
) -> dict[str, Any]:
    """Register a recipe: `model: NAME` then serves its members merged by its method."""
    _name(state, req.name, must_exist=False)
    if req.name == state.base_name:
        raise APIError(409, f"{req.name!r} is the base", "exists")
    async with state.name_lock(req.name):
        if state.store.exists(req.name):
            raise APIError(409, f"a delta is named {req.name!r}", "exists")
        try:
            comp = state.compositions.build(
                req.name, req.members, req.weights, MergeMethod(req.method), req.density, req.seed
            )
        except (CompositionError, InvalidName) as e:
            raise APIError(400, str(e), "invalid_composition") from e
        check_members(state, req.name, comp)
        try:
            await run_in_threadpool(state.compositions.register, comp, replace)
        except FileExistsError as e:
            raise APIError(409, str(e), "exists") from e
        if replace:  # a merge of the old recipe is not served again once released
            await _on_worker(ready, lambda e: e.invalidate(req.name))
        return {"name": req.name, **comp.describe()}


@router.get("/compositions")
def list_compositions(state: StateDep, _: AdminDep) -> list[dict[str, Any]]:
    out = []
    for name in state.compositions.names():
        comp = state.compositions.recipe(name)
        if comp is not None:
            out.append({"name": name, **comp.describe()})
    return out


@router.delete("/compositions/{name}")
async def delete_composition(
    name: str, state: StateDep, ready: ReadyDep, _: AdminDep
) -> dict[str, str]:
    _name(state, name, must_exist=False)
    async with state.name_lock(name):
        if state.compositions.stamp(name) is None:
            raise APIError(404, f"no composition named {name!r}", "not_found")
        await run_in_threadpool(state.compositions.unregister, name)
        try:
            await _on_worker(ready, lambda e: e.forget(name))
        except APIError as e:  # in use: running requests keep their merge until done
            if e.code != "in_use":
                raise
    return {"deleted": name}


def _entry(tier: ByteLRU[Any], e: EntryInfo) -> dict[str, Any]:
    """A cache entry; in the mixed tier, with the variant's device layout."""
    out = asdict(e)
    describe = getattr(tier.peek(e.name), "describe", None)
    if describe is not None:
        out["layout"] = describe()
    return out


@router.get("/cache")
def cache(ready: ReadyDep, _: AdminDep) -> CacheInfo:
    engine: Engine = ready[0]
    tiers = [
        TierInfo(
            tier=t.tier,
            budget_bytes=t.budget,
            used_bytes=t.used,
            hits=t.hits,
            misses=t.misses,
            evictions=t.evictions,
            entries=[_entry(t, e) for e in t.list()],
        )
        for t in engine.tiers
    ]
    return CacheInfo(active=engine.active, mode=engine.mode.value, tiers=tiers)
