"""Scale-out on Ray Serve's model multiplexing (DESIGN.md §4): a thin layer over the
same server, not a second one.

- Each replica runs the ordinary deltaserve app (base, engine, scheduler) on a
  loopback port of its own.
- Ray's multiplexer is the one record of which variants a replica holds.
  `Replica.get_variant` (@serve.multiplexed) loads a variant with the replica's own
  admin `preload`. When Ray's per-replica LRU drops it, the loaded handle's
  `__del__` evicts it again.
- A request names its variant in the `serve_multiplexed_model_id` header. The
  ingress deployment copies the OpenAI `model` field into it, so Ray routes each
  request to a replica that already holds its variant.

    deltaserve serve --ray --replicas 2          # local Ray, or --ray-address auto|ray://…
"""

# No `from __future__ import annotations` here: Ray cloudpickles the ingress class
# into another process with only the globals its code references, where FastAPI
# could no longer resolve string annotations such as "Request".
import contextlib
import os
import secrets
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from server.app import ThreadedServer
from server.config import Settings
from server.deps import bearer_ok
from server.errors import body as error_body

MULTIPLEX_HEADER = "serve_multiplexed_model_id"  # Ray's header name, defined once here
REPLICA_HEADER = "x-deltaserve-replica"
LOADS_HEADER = "x-deltaserve-replica-loads"


class _Loaded:
    """What Ray's multiplexer holds for a loaded variant; unloading evicts it."""

    def __init__(self, name: str, url: str, auth: dict[str, str]) -> None:
        self.name, self._url, self._auth, self._gone = name, url, auth, False

    def __del__(self) -> None:  # Ray calls this (in an executor) when its LRU unloads
        if self._gone:
            return
        self._gone = True
        with contextlib.suppress(httpx.HTTPError):  # the replica may be shutting down
            httpx.post(
                f"{self._url}/admin/deltas/{self.name}/evict", headers=self._auth, timeout=60
            )


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
    # Replicas serve only the ingress, on loopback with a token of their own: no
    # secrets travel to them (a dumped SecretStr would be "**********" anyway). The
    # ingress checks API keys itself, against their digests.
    settings_json = settings.model_copy(
        update={
            "admin_token": None,
            "admin_token_file": None,
            "api_keys": None,
            "api_keys_file": None,
        }
    ).model_dump_json()
    digests = settings.key_digests()

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0})
    class Replica:
        def __init__(self, settings_json: str) -> None:
            token = secrets.token_hex(16)
            s = Settings.model_validate_json(settings_json).model_copy(
                update={
                    "host": "127.0.0.1",
                    "port": 0,
                    "admin_token": SecretStr(token),
                    "demo": False,
                }
            )
            self._server = ThreadedServer(s)
            self._server.wait_ready()
            self._auth = {"Authorization": f"Bearer {token}"}
            self._client = httpx.AsyncClient(base_url=self._server.url, timeout=600)
            self.base_name = self._server.state.base_name
            self.loads = 0

        @serve.multiplexed(max_num_models_per_replica=max_variants)
        async def get_variant(self, name: str) -> _Loaded:
            r = await self._client.post(f"/admin/deltas/{name}/preload", headers=self._auth)
            if r.status_code != 200:
                raise VariantUnavailable(r.status_code, r.json())
            self.loads += 1
            return _Loaded(name, self._server.url, self._auth)

        async def forward(self, path: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
            name = serve.get_multiplexed_model_id() or str(body.get("model", ""))
            if name and name != self.base_name:
                try:
                    await self.get_variant(name)
                except VariantUnavailable as e:
                    return e.status, e.payload, self._headers()
            r = await self._client.post(path, json=body)
            return r.status_code, r.json(), self._headers()

        async def models(self) -> Any:
            return (await self._client.get("/v1/models")).json()

        def _headers(self) -> dict[str, str]:
            return {REPLICA_HEADER: str(os.getpid()), LOADS_HEADER: str(self.loads)}

    api = FastAPI(title="deltaserve (Ray Serve)")

    def _denied(request: Request) -> JSONResponse | None:
        if not digests or bearer_ok(request.headers.get("authorization"), digests):
            return None
        msg = "missing or wrong API key (Authorization: Bearer …)"
        return JSONResponse(error_body(401, msg, "invalid_api_key"), 401)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Ingress:
        def __init__(self, replica: DeploymentHandle) -> None:
            self.replica = replica

        async def _forward(self, path: str, request: Request) -> JSONResponse:
            denied = _denied(request)
            if denied is not None:
                return denied
            body = await request.json()
            if body.get("stream"):
                return JSONResponse(
                    error_body(
                        400,
                        "stream is not supported through the Ray ingress yet",
                        "unsupported_option",
                    ),
                    400,
                )
            model = request.headers.get(MULTIPLEX_HEADER) or str(body.get("model", ""))
            handle = self.replica
            if route_by_model and model:
                handle = handle.options(multiplexed_model_id=model)
            status, payload, headers = await handle.forward.remote(path, body)
            return JSONResponse(payload, status_code=status, headers=headers)

        @api.post("/v1/completions")
        async def completions(self, request: Request) -> JSONResponse:
            return await self._forward("/v1/completions", request)

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> JSONResponse:
            return await self._forward("/v1/chat/completions", request)

        @api.get("/v1/models")
        async def list_models(self, request: Request) -> Any:
            return _denied(request) or await self.replica.models.remote()

        @api.get("/health")
        async def health(self) -> dict[str, str]:
            return {"status": "ok"}

    # @serve.deployment makes the classes Deployments, which mypy cannot see
    replica = Replica.bind(settings_json)  # type: ignore[attr-defined]
    return Ingress.bind(replica)  # type: ignore[attr-defined]
