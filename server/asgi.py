"""Call an ASGI app in-process, with the response streamed back as it is sent.

Each Ray replica serves its requests through the ordinary app this way (every route,
check and error the single-process server has), without a port of its own. httpx's
ASGITransport would do, but it buffers a streamed body to its end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any


async def call(
    app: Any, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Yield the app's `http.response.start` message, then its `http.response.body`
    messages. Closing the iterator early is a client disconnect (the app sees it)."""
    sent = False
    gone = asyncio.Event()
    out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await out.put(message)

    path_only, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path_only,
        "raw_path": path_only.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    task = asyncio.create_task(app(scope, receive, send))
    try:
        while True:
            get = asyncio.ensure_future(out.get())
            await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():  # the app returned without sending more
                get.cancel()
                if out.empty():
                    task.result()  # its exception, if any
                    return
                message = out.get_nowait()
            else:
                message = get.result()
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body"):
                return
    finally:
        gone.set()  # a request still running sees its client leave
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(task), 30)
