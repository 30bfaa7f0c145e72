"""OpenAI-style errors: every failure answers
{"error": {"message", "type", "code", "param"}}, with `param` naming the request
field the message is about (null when it is about no one field)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error response. `retry_after` (seconds) goes out as the Retry-After header:
    a client that honours it (the OpenAI SDK does) waits that long before retrying."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after


def body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, object]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """A validation error's location as the message names it: `messages.0.role`."""
    return ".".join(str(x) for x in loc if x != "body")


def json_position(doc: str | bytes, pos: int) -> tuple[int, int]:
    """(line, column) of character `pos` in `doc`, both from 1 (as `json` counts)."""
    text = doc.decode("utf-8", "replace") if isinstance(doc, bytes) else doc
    line = text.count("\n", 0, pos) + 1
    return line, pos - text.rfind("\n", 0, pos)


def validation_body(e: RequestValidationError) -> dict[str, object]:
    """A 400 for a body that does not parse or validate: invalid JSON says where
    ("invalid JSON at line L column C: what"); a field error names the field, in the
    message and as `param` (the first one when several are wrong)."""
    errors = list(e.errors())
    first = errors[0] if errors else None
    if first is not None and first.get("type") == "json_invalid":
        pos = int(first["loc"][-1]) if isinstance(first["loc"][-1], int) else 0
        line, col = json_position(getattr(e, "body", "") or "", pos)
        reason = (first.get("ctx") or {}).get("error", "not JSON")
        return body(400, f"invalid JSON at line {line} column {col}: {reason}", "invalid_json")
    parts = []
    for err in errors:
        path = field_path(err["loc"])
        parts.append(f"{path}: {err['msg']}" if path else str(err["msg"]))
    param = field_path(first["loc"]) if first is not None else ""
    return body(400, "; ".join(parts) or "invalid request", "invalid_request", param or None)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
        if e.retry_after is not None:
            headers["Retry-After"] = str(e.retry_after)
        message = e.message
        rid = getattr(request.state, "request_id", None)
        if e.status >= 500 and rid:
            message = f"{message} (request id {rid})"
        return JSONResponse(body(e.status, message, e.code, e.param), e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_body(e), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(body(e.status_code, str(e.detail)), e.status_code)
