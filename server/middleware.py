"""The outermost layer of every HTTP request (pure ASGI, so streams pass untouched).

- A request id: the client's `X-Request-Id` when it is a sane token, else a new one;
  sent back as `X-Request-Id` and put in every 5xx body, and logged with any failure,
  so an error a user reports is found in the log without the body ever carrying
  internal exception text.
- A body limit (`max_request_bytes`): a request body is read up to the limit before
  the app parses it, so an oversized body is a 413 whatever its framing (the delta
  upload streams to disk under its own limit and is exempt).
- A last guard: an exception no handler turned into a response is logged and
  answered with a 500 in the OpenAI error shape.
- The request counter by route and status (Prometheus).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from server.errors import body

log = logging.getLogger(__name__)
_RID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
UPLOAD = ("POST", "/admin/deltas")  # streams to disk under max_upload_bytes


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return bytes(v).decode("latin-1")
    return None


async def _json(send: Any, status: int, payload: dict[str, Any]) -> None:
    raw = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(raw)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class Guard:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given and _RID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        started = False

        async def send_(message: dict[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            receive_ = await self._limit_body(scope, receive, send_)
            if receive_ is not None:
                await self.app(scope, receive_, send_)
        except Exception:
            log.exception("request %s (%s %s) failed", rid, scope["method"], scope["path"])
            if not started:  # else a stream was cut: the client sees it end early
                msg = f"internal server error (request id {rid})"
                await _json(send_, 500, body(500, msg, "internal_error"))
        finally:
            self._count(scope, status)

    async def _limit_body(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        """A receive that replays the body read here; None when a 413 was sent."""
        if (scope["method"], scope["path"].rstrip("/")) == UPLOAD:
            return receive
        limit = self._limit(scope)
        declared = _header(scope, b"content-length")
        too_large = body(413, f"request body exceeds {limit} bytes", "too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _json(send, 413, too_large)
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _json(send, 413, too_large)
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def receive_() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return dict(await receive())  # after the body: disconnect detection

        return receive_

    @staticmethod
    def _state(scope: dict[str, Any]) -> Any:
        app = scope.get("app")
        return getattr(getattr(app, "state", None), "deltaserve", None)

    def _limit(self, scope: dict[str, Any]) -> int:
        state = self._state(scope)
        return int(state.settings.max_request_bytes) if state is not None else 1 << 20

    def _count(self, scope: dict[str, Any], status: int) -> None:
        state = self._state(scope)
        if state is not None:
            endpoint = getattr(scope.get("route"), "path", "other")
            state.metrics.requests.labels(endpoint, str(status)).inc()
