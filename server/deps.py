"""Dependencies shared by the routers (Annotated aliases)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from server.config import secret_digest
from server.engine.core import Engine
from server.engine.llm_engine import EngineAPI
from server.errors import APIError
from server.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.deltaserve
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_ready(state: StateDep) -> tuple[Engine, EngineAPI]:
    if state.engine is None or state.scheduler is None:
        reason = (
            "loading the base model failed (the server log says why)"
            if state.load_error
            else "loading the base model"
        )
        raise APIError(503, f"not ready: {reason}", "not_ready", retry_after=5)
    if state.engine.broken is not None:
        raise APIError(
            503, "not ready: the resident weights could not be verified", "weights_unavailable"
        )
    return state.engine, state.scheduler


ReadyDep = Annotated[tuple[Engine, EngineAPI], Depends(get_ready)]


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


def bearer_ok(authorization: str | None, digests: list[bytes]) -> bool:
    """A Bearer credential whose sha256 is one of `digests`. Digests of equal length
    are compared with every key (no early exit), so the time says nothing about a
    key, its length or which one matched."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    h = secret_digest(given.strip())
    return sum(hmac.compare_digest(h, d) for d in digests) > 0


def require_api_key(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """Inference and /metrics: open unless API keys are set (DELTASERVE_API_KEYS); then
    a key, or the admin token, is required."""
    digests = state.key_digests
    if digests and not bearer_ok(authorization, digests):
        raise APIError(401, "missing or wrong API key (Authorization: Bearer …)", "invalid_api_key")


KeyDep = Depends(require_api_key)
