"""Dependencies shared by the routers (Annotated aliases)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from server.engine import Engine
from server.errors import APIError
from server.scheduler import SchedulerAPI
from server.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.deltaserve
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_ready(state: StateDep) -> tuple[Engine, SchedulerAPI]:
    if state.engine is None or state.scheduler is None:
        reason = state.load_error or "loading the base model"
        raise APIError(503, f"not ready: {reason}", "not_ready")
    return state.engine, state.scheduler


ReadyDep = Annotated[tuple[Engine, SchedulerAPI], Depends(get_ready)]


def require_admin(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> None:
    token = state.settings.admin_token
    if token is None:
        raise APIError(
            403,
            "the admin API is off: start the server with DELTASERVE_ADMIN_TOKEN set",
            "admin_disabled",
        )
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.encode(), token.get_secret_value().encode()
    ):
        raise APIError(
            401, "missing or wrong admin token (Authorization: Bearer …)", "unauthorized"
        )


AdminDep = Annotated[None, Depends(require_admin)]
