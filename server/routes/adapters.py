"""vLLM's runtime adapter API, so tools written for vLLM work unchanged:

    POST /v1/load_lora_adapter    {"lora_name": NAME, "lora_path": PATH, "load_inplace": false}
    POST /v1/unload_lora_adapter  {"lora_name": NAME}

with vLLM's status codes and bodies: 200 and the text "Success: LoRA adapter 'NAME'
added successfully." (removed, for unload); 400 `InvalidUserInput` for a missing
field or a name already loaded (unless `load_inplace`); 404 `NotFoundError` for an
adapter that is not there; 400 `BadRequestError` for one that cannot be loaded; the
error body is vLLM's `{"error": {"message", "type", "param", "code": STATUS}}`.

Where deltaserve differs, on purpose: both routes are behind the admin token (vLLM
guards them only with an environment flag and calls them unsafe), and `lora_path`
must lie within `--adapter-roots` (403, saying nothing of the filesystem). A PEFT
LoRA adapter, a full fine-tune or a delta file is compressed with recommend's
defaults and served as a variant: `model: NAME` in requests, listed in /v1/models.
Unload deletes the variant once its running requests finish.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from deltastore.store import InvalidName, check_name
from server.deps import AdminDep, ReadyDep, StateDep
from server.errors import APIError
from server.routes.admin import by_reference, check_new_name, commit_upload, confined, remove
from server.state import AppState

router = APIRouter(tags=["adapters"])


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = ""
    lora_int_id: int | None = None  # vLLM's; names are what deltaserve goes by


def vllm_error(status: int, message: str, kind: str) -> JSONResponse:
    """vLLM's ErrorResponse: the status code as `code`, its error class as `type`."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status)


def _as_vllm(e: APIError) -> JSONResponse:
    kind = {400: "BadRequestError", 403: "PermissionDeniedError", 404: "NotFoundError"}
    return vllm_error(e.status, e.message, kind.get(e.status, "BadRequestError"))


def _loaded(state: AppState, name: str) -> bool:
    return name not in state.retiring and state.store.exists(name)


@router.post("/v1/load_lora_adapter", response_model=None)
async def load_lora_adapter(
    req: Annotated[LoadLoRAAdapterRequest, Body()],
    state: StateDep,
    ready: ReadyDep,
    _: AdminDep,
) -> Response:
    name, ref = req.lora_name, req.lora_path
    if not name or not ref:
        return vllm_error(
            400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
        )
    try:
        check_name(name)
    except InvalidName as e:
        return vllm_error(400, str(e), "InvalidUserInput")
    if _loaded(state, name) and not req.load_inplace:
        return vllm_error(
            400,
            f"The lora adapter '{name}' has already been loaded. If you want to load the "
            "adapter in place, set 'load_inplace' to True.",
            "InvalidUserInput",
        )
    try:
        check_new_name(state, name, replace=True)
        path = await confined(state, ref, None)
        upload = await by_reference(state, name, path, ref)
        try:
            await commit_upload(state, ready, name, upload, replace=True)
        finally:
            upload.unlink(missing_ok=True)
    except APIError as e:
        return _as_vllm(e)
    return Response(f"Success: LoRA adapter '{name}' added successfully.", 200)


@router.post("/v1/unload_lora_adapter", response_model=None)
async def unload_lora_adapter(
    req: Annotated[UnloadLoRAAdapterRequest, Body()],
    state: StateDep,
    ready: ReadyDep,
    _: AdminDep,
) -> Response:
    name = req.lora_name
    if not name:
        return vllm_error(
            400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput"
        )
    try:
        check_name(name)
        known = _loaded(state, name)
    except InvalidName:
        known = False
    if not known:
        return vllm_error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
    try:
        await remove(state, ready, name)
    except APIError as e:
        if e.status == 404:  # removed meanwhile
            return vllm_error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        return _as_vllm(e)
    return Response(f"Success: LoRA adapter '{name}' removed successfully.", 200)
