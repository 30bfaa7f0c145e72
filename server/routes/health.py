"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.deps import KeyDep, ReadyDep, StateDep

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
def ready(state: StateDep, _: ReadyDep) -> dict[str, object]:
    return {
        "status": "ready",
        "base": state.base_name,
        "variants": len(state.store.names()),
        "seconds_to_ready": round((state.ready_at or 0) - state.started, 3),
    }


@router.get("/metrics", dependencies=[KeyDep])
def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
