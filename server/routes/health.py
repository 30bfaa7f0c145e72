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
    """Ready once the base serves (503 until then, saying what is loading); the demo
    variants, when they are still being made, are listed as such."""
    out: dict[str, object] = {
        "status": "ready",
        "base": state.base_name,
        "variants": len(state.store.names()),
        "seconds_to_ready": round((state.ready_at or 0) - state.started, 3),
    }
    if state.demos is not None:
        out["demos"] = state.demos
    if state.lora_modules is not None:
        out["lora_modules"] = state.lora_modules
    return out


@router.get("/metrics", dependencies=[KeyDep])
def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
