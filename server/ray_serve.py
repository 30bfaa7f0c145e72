"""Scale-out on Ray Serve's model multiplexing (DESIGN.md §4): a thin layer over the
same server, not a second one.

- Each replica runs the ordinary deltaserve app (base, engine, scheduler, every
  route) in-process: requests go to the app through ASGI calls (server/asgi.py), so
  the whole OpenAI surface, streaming included, behaves as in one process. No port,
  no token: the ingress is the only door.
- Ray's multiplexer is the one record of which variants a replica holds.
  `Replica.get_variant` (@serve.multiplexed) loads a variant with the admin preload
  action, called directly. When Ray's per-replica LRU drops it, the loaded handle's
  `__del__` evicts it again.
- A request names its variant in the `serve_multiplexed_model_id` header. The
  ingress deployment copies the OpenAI `model` field into it, so Ray routes each
  request to a replica that already holds its variant. Responses stream back chunk
  by chunk (Ray's streaming handles).

    deltaserve serve --ray --replicas 2          # local Ray, or --ray-address auto|ray://…
"""

# No `from __future__ import annotations` here: Ray cloudpickles the ingress class
# into another process with only the globals its code references, where FastAPI
# could no longer resolve string annotations such as "Request".
import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from server import asgi
from server.app import create_app, start, wait_ready
from server.config import Settings
from server.deps import bearer_ok
from server.errors import APIError
from server.errors import body as error_body
from server.routes import admin

MULTIPLEX_HEADER = "serve_multiplexed_model_id"  # Ray's header name, defined once here
REPLICA_HEADER = "x-deltaserve-replica"
LOADS_HEADER = "x-deltaserve-replica-loads"
# what the ingress forwards: (method, path) -> routed by the request's model?
ROUTES = {
    ("POST", "/v1/completions"): True,
    ("POST", "/v1/chat/completions"): True,
    ("POST", "/tokenize"): False,
    ("POST", "/detokenize"): False,
    ("GET", "/v1/models"): False,
    ("GET", "/tokenizer_info"): False,
}
PASSED_HEADERS = ("content-type", "x-request-id")


class _Loaded:
    """What Ray's multiplexer holds for a loaded variant; unloading evicts it."""

    def __init__(self, name: str, evict: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.name, self._evict, self._loop, self._gone = name, evict, loop, False

    def __del__(self) -> None:  # Ray calls this (in an executor) when its LRU unloads
        if self._gone:
            return
        self._gone = True
        with contextlib.suppress(RuntimeError):  # the replica's loop may be closed
            asyncio.run_coroutine_threadsafe(self._evict(self.name), self._loop)


class VariantUnavailable(Exception):
    def __init__(self, status: int, payload: Any) -> None:
        super().__init__(payload)
        self.status, self.payload = status, payload


def build_app(
    settings: Settings, replicas: int, max_variants: int, route_by_model: bool = True
) -> Application:
    """The Ray Serve application: an ingress and `replicas` deltaserve replicas, each
    holding at most `max_variants` variants (Ray's multiplexing LRU)."""
    if replicas < 1 or max_variants < 1:
        raise ValueError(
            f"replicas and max variants per replica must be >= 1 ({replicas}, {max_variants})"
        )
    # Replicas are reached only through the ingress, which checks API keys itself
    # (against their digests): no secrets travel to them.
    settings_json = settings.model_copy(
        update={
            "admin_token": None,
            "admin_token_file": None,
            "api_keys": None,
            "api_keys_file": None,
        }
    ).model_dump_json()
    digests = settings.key_digests()

    # requests in flight per replica: its engine batches them (Ray's default is 5)
    ongoing = settings.queue_limit + settings.max_batch_size

    @serve.deployment(
        num_replicas=replicas, max_ongoing_requests=ongoing, ray_actor_options={"num_cpus": 0}
    )
    class Replica:
        def __init__(self, settings_json: str) -> None:
            s = Settings.model_validate_json(settings_json).model_copy(update={"demo": False})
            self.state, self._worker = start(s)
            self.app = create_app(s, self.state)
            wait_ready(self.state)
            self.base_name = self.state.base_name
            self.loads = 0

        def _ready(self) -> Any:
            return self.state.engine, self.state.scheduler

        async def _evict(self, name: str) -> None:
            with contextlib.suppress(APIError):  # pinned, or in use: the caches decide
                await admin.evict(name, self.state, self._ready(), None)

        @serve.multiplexed(max_num_models_per_replica=max_variants)
        async def get_variant(self, name: str) -> _Loaded:
            try:
                await admin.preload(name, self.state, self._ready(), None)
            except APIError as e:
                raise VariantUnavailable(e.status, error_body(e.status, e.message, e.code)) from e
            self.loads += 1
            return _Loaded(name, self._evict, asyncio.get_running_loop())

        async def call(
            self, method: str, path: str, body: bytes, headers: dict[str, str]
        ) -> AsyncIterator[Any]:
            """The app's answer: first {"status", "headers"}, then body bytes as sent."""
            name = serve.get_multiplexed_model_id()
            if name and name != self.base_name and not self._composition(name):
                try:
                    await self.get_variant(name)
                except VariantUnavailable as e:
                    yield {
                        "status": e.status,
                        "headers": {"content-type": "application/json"} | self._headers(),
                    }
                    yield json.dumps(e.payload).encode()
                    return
            async for message in asgi.call(self.app, method, path, body, headers):
                if message["type"] == "http.response.start":
                    passed = {
                        k.decode(): v.decode()
                        for k, v in message.get("headers", [])
                        if k.decode().lower() in PASSED_HEADERS
                    }
                    yield {"status": message["status"], "headers": passed | self._headers()}
                elif message.get("body"):
                    yield message["body"]

        def _composition(self, name: str) -> bool:
            """Compositions are merged per request by the engine, not preloaded."""
            try:
                return self.state.compositions.resolve(name) is not None
            except ValueError:
                return True  # the app answers the 400

        def _headers(self) -> dict[str, str]:
            return {REPLICA_HEADER: str(os.getpid()), LOADS_HEADER: str(self.loads)}

    api = FastAPI(title="deltaserve (Ray Serve)")

    def _denied(request: Request) -> JSONResponse | None:
        if not digests or bearer_ok(request.headers.get("authorization"), digests):
            return None
        msg = "missing or wrong API key (Authorization: Bearer …)"
        return JSONResponse(error_body(401, msg, "invalid_api_key"), 401)

    @serve.deployment(max_ongoing_requests=ongoing * replicas, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Ingress:
        def __init__(self, replica: DeploymentHandle) -> None:
            self.replica = replica

        async def _forward(self, request: Request, path: str) -> Any:
            denied = _denied(request)
            if denied is not None:
                return denied
            method = request.method
            body = await request.body()
            handle = self.replica
            model = request.headers.get(MULTIPLEX_HEADER)
            if ROUTES.get((method, path)) and route_by_model:
                if not model:
                    with contextlib.suppress(ValueError, AttributeError):
                        model = str(json.loads(body or b"{}").get("model") or "")
                if model:
                    handle = handle.options(multiplexed_model_id=model)
            headers = {k: v for k, v in request.headers.items() if k.lower() in PASSED_HEADERS}
            gen: DeploymentResponseGenerator[Any] = handle.options(stream=True).call.remote(
                method, path, body, headers
            )  # type: ignore[assignment]
            try:
                start = await gen.__anext__()
            except BaseException as e:
                gen.cancel()
                if not isinstance(e, Exception):
                    raise  # cancelled: the client left
                msg = f"the replica failed to answer ({type(e).__name__})"
                return JSONResponse(error_body(502, msg, "replica_failed"), 502)

            async def rest() -> AsyncIterator[bytes]:
                try:
                    async for chunk in gen:
                        yield chunk
                finally:
                    gen.cancel()  # the client left: the replica's request sees it

            return StreamingResponse(rest(), status_code=start["status"], headers=start["headers"])

        @api.post("/v1/completions")
        async def completions(self, request: Request) -> Any:
            return await self._forward(request, "/v1/completions")

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> Any:
            return await self._forward(request, "/v1/chat/completions")

        @api.post("/tokenize")
        async def tokenize(self, request: Request) -> Any:
            return await self._forward(request, "/tokenize")

        @api.post("/detokenize")
        async def detokenize(self, request: Request) -> Any:
            return await self._forward(request, "/detokenize")

        @api.get("/v1/models")
        async def list_models(self, request: Request) -> Any:
            return await self._forward(request, "/v1/models")

        @api.get("/tokenizer_info")
        async def tokenizer_info(self, request: Request) -> Any:
            return await self._forward(request, "/tokenizer_info")

        @api.get("/v1/models/{model_id:path}")
        async def model(self, model_id: str, request: Request) -> Any:
            return await self._forward(request, f"/v1/models/{model_id}")

        @api.get("/health")
        async def health(self) -> dict[str, str]:
            return {"status": "ok"}

    # @serve.deployment makes the classes Deployments, which mypy cannot see
    replica = Replica.bind(settings_json)  # type: ignore[attr-defined]
    return Ingress.bind(replica)  # type: ignore[attr-defined]
