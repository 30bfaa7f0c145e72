"""What a request's `model` names, looked up once.

`resolve` turns a name into a `Target` (server/engine/job.py): None for the base, else
the engine's key, a composition's members and merge, the response's
`system_fingerprint`, and the versions of the files it was resolved against. The Job
carries it to the engine, which compares those versions with its caches' on
admission instead of reading the files every step. `door` is the last check before a
request is queued: it waits while a file it reads is being replaced, and refuses a
name deleted since.

Names: the base's served name, a delta of the store, or a composition ("a+b", or a
recipe registered with POST /admin/compositions: server/compose.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from deltastore.store import InvalidName, check_name
from server.compose import Composition, CompositionError
from server.engine.job import Target
from server.errors import APIError
from server.state import AppState

DOOR_WAIT_S = 600.0  # the longest a request waits at the door for a replace


def resolve_model(state: AppState, name: str) -> str | None:
    """The variant a request names (None: the base), a composition's engine name
    included; 404 when there is none, 400 for a composition that cannot be served."""
    if name == state.base_name:
        return None
    comp = composition(state, name)
    if comp is not None:
        check_members(state, name, comp)
        return comp.key
    if not known(state, name):
        raise not_found(state, name)
    return name


async def resolve(state: AppState, name: str) -> Target | None:
    """The one lookup of a request's `model` (None: the base); the same 404 and 400
    as `resolve_model`."""
    if name == state.base_name:
        return None
    comp = composition(state, name)
    if comp is None:
        stamp = stamp_of(state, name)
        if stamp is None:
            raise not_found(state, name)
        return Target(name, fingerprint=await fingerprint(state, name), versions=(stamp,))
    check_members(state, name, comp)
    recipe = state.compositions.stamp(comp.recipe) if comp.recipe else None
    versions = (recipe, *(state.store.stamp(m) for m, _ in comp.members))
    return Target(
        comp.key,
        comp.members,
        comp.method,
        comp.density,
        comp.seed,
        await fingerprint(state, name, comp),
        versions,
    )


def composition(state: AppState, name: str) -> Composition | None:
    """The composition `name` is (None: not one); 400 for one that cannot be read."""
    try:
        return state.compositions.resolve(name)
    except CompositionError as e:
        raise APIError(e.status, str(e), e.code, "model") from None


def known(state: AppState, name: str) -> bool:
    """A delta of the store that is not being deleted."""
    try:
        check_name(name)
        return name not in state.retiring and state.store.exists(name)
    except InvalidName:
        return False


def stamp_of(state: AppState, name: str) -> tuple[int, int, int] | None:
    """The stamp of a delta of the store that is not being deleted (None: no such)."""
    try:
        return None if name in state.retiring else state.store.stamp(name)
    except InvalidName:
        return None


def not_found(state: AppState, name: str, what: str = "model") -> APIError:
    names = [state.base_name, *state.store.names(), *state.compositions.names()]
    shown = ", ".join(names[:20]) + (" …" if len(names) > 20 else "")
    return APIError(
        404, f"{what} {name!r} does not exist; available: {shown}", "model_not_found", "model"
    )


def check_members(state: AppState, name: str, comp: Composition) -> None:
    # the engine checks each member against the base when it loads it; this earlier
    # check needs the base's fingerprint, which a first start takes in the background
    base = state.engine.known_fingerprint() if state.engine is not None else None
    for member, _ in comp.members:
        if member in state.retiring or not state.store.exists(member):
            raise not_found(state, member, f"composition {name!r}: member")
        try:
            made_for = state.store.meta(member).base_fingerprint
        except (KeyError, ValueError):
            raise not_found(state, member, f"composition {name!r}: member") from None
        if base is not None and made_for != base:
            raise APIError(
                400,
                f"composition {name!r}: member {member!r} was made for another base "
                f"({made_for}, this server's is {base})",
                "invalid_composition",
                "model",
            )


def store_names(state: AppState, variant: str) -> list[str]:
    """The delta files a variant is read from: itself, or a composition's members."""
    try:
        comp = state.compositions.resolve(variant)
    except CompositionError:
        comp = None
    return [variant] if comp is None else [m for m, _ in comp.members]


def base_fingerprint(state: AppState) -> str | None:
    """`system_fingerprint` of the base: of its files' fingerprint and the dtype they are
    served in (None while a first start still takes the fingerprint: never waited for
    on the event loop)."""
    engine = state.engine
    fp = engine.known_fingerprint() if engine is not None else None
    if engine is None or fp is None:
        return None
    return f"fp_{hashlib.sha256(f'{fp}|{engine.dtype}'.encode()).hexdigest()[:16]}"


async def fingerprint(state: AppState, name: str, comp: Composition | None = None) -> str | None:
    """`system_fingerprint` of a variant: of its delta file, or of a composition's
    recipe and its members' files (checksums cached per file stamp)."""
    try:
        if comp is None:
            info = await run_in_threadpool(state.store.info, name)
            return f"fp_{info.sha256[:16]}"
        h = hashlib.sha256(json.dumps(comp.describe(), sort_keys=True).encode())
        for member, _ in comp.members:  # the members' files, in name order
            h.update((await run_in_threadpool(state.store.info, member)).sha256.encode())
        return f"fp_{h.hexdigest()[:16]}"
    except (KeyError, FileNotFoundError):
        return None


async def door(
    state: AppState, target: Target | None, model: str, request: Request
) -> Target | None:
    """Right before a request is queued: it waits while a file it reads is being
    replaced (and is then resolved again, for the new file), and gets 404 if one was
    deleted since it was resolved. Nothing is awaited after the last check, so the
    caller queues the request before an admin action can look."""
    if target is None:
        return None
    if any(n in state.replacing for n in target.files):
        if state.at_door >= state.settings.queue_limit:  # they count as queued
            raise APIError(
                429, f"server busy: {target.key!r} is being replaced", "queue_full", retry_after=1
            )
        state.at_door += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DOOR_WAIT_S
            while any(n in state.replacing for n in target.files) and loop.time() < deadline:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected", "cancelled")
                await asyncio.sleep(0.02)
        finally:
            state.at_door -= 1
        target = await resolve(state, model)
        if target is None:
            return None
    if any(n in state.retiring or not state.store.exists(n) for n in target.files):
        resolve_model(state, model)  # raises the 404, with the names available
    return target
