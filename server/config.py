"""Server configuration: one pydantic-settings `Settings`, env prefix DELTASERVE_.

`deltaserve serve` builds one flag per field (``--max-batch-size`` for
``max_batch_size``) from these definitions, so `deltaserve serve --help` documents
each; a flag overrides the environment, which overrides the default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from deltastore.embedded import MODEL_NAME
from deltastore.hub import is_hub_id
from deltastore.store import InvalidName, check_name

GiB = 1 << 30


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected setting (a short token) is never echoed
    model_config = SettingsConfigDict(
        env_prefix="DELTASERVE_", extra="forbid", hide_input_in_errors=True
    )

    base: Path | None = Field(
        None,
        description="base model: a model directory, or a Hugging Face Hub id org/name (read "
        "through the Hub cache: HF_HOME, HF_HUB_OFFLINE, HF_TOKEN from the environment); "
        "unset: the embedded SmolLM2-135M-Instruct",
    )
    revision: str | None = Field(
        None, description="the base's revision (branch, tag or commit) when --base is a Hub id"
    )
    served_model_name: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="the base's name in requests and /v1/models; unset: the Hub id as "
        "given, else the model directory's name",
    )
    adapter_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="directories POST /v1/load_lora_adapter and an admin upload by reference "
        "may read from (comma-separated in the environment); anything outside them is "
        "refused. A Hub id is allowed when the Hub cache is one of them. None: both are off",
        json_schema_extra={"metavar": "DIR"},
    )
    lora_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="variants to serve from the start, as vLLM's --lora-modules: NAME=PATH "
        "or NAME=org/name (a PEFT LoRA adapter, a full fine-tune or a delta file), compressed "
        "once with recommend's defaults (comma-separated in the environment)",
        json_schema_extra={"metavar": "NAME=PATH"},
    )
    store: Path = Field(Path("deltas"), description="directory of uploaded delta files")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the base lives")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="resident weight dtype (auto: bfloat16 on cuda and on CPUs with native "
        "bf16, else float32)",
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0: any free port)")
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token for /admin, from the environment only (unset: admin is off)",
        json_schema_extra={"secret": True},
    )
    admin_token_file: Path | None = Field(
        None, description="file holding the admin token (instead of DELTASERVE_ADMIN_TOKEN)"
    )
    api_keys: SecretStr | None = Field(
        None,
        description="comma-separated keys that inference and /metrics then require "
        "(Authorization: Bearer KEY), from the environment only (unset: open)",
        json_schema_extra={"secret": True},
    )
    api_keys_file: Path | None = Field(
        None, description="file of API keys, one per line (instead of DELTASERVE_API_KEYS)"
    )
    materialized_cache_bytes: int = Field(
        2 * GiB, ge=0, description="budget for materialized variants on the device (0: off)"
    )
    materialize_after: int = Field(
        2, ge=1, description="uses before a variant is materialized (1: on first use)"
    )
    device_delta_cache_bytes: int = Field(
        GiB, ge=0, description="budget for deltas laid out on the device"
    )
    host_delta_cache_bytes: int = Field(
        GiB, ge=0, description="budget for decoded deltas in host memory"
    )
    max_batch_size: int = Field(
        32,
        ge=1,
        description="sequences running together (requests of any variants, one step; "
        "the KV cache budget may hold fewer)",
    )
    max_step_tokens: int = Field(
        256, ge=16, description="tokens per step (decode rows plus prefill chunks)"
    )
    kv_cache_bytes: int = Field(
        2 * GiB, ge=1, description="budget of the preallocated KV cache (static slots)"
    )
    mixed_cache_bytes: int = Field(
        GiB, ge=0, description="budget for deltas laid out for mixed-variant steps"
    )
    loader_depth: int = Field(
        4, ge=1, description="variant loads asked of the loader thread at a time"
    )
    load_wait_s: float = Field(
        10.0,
        gt=0,
        description="longest a request lets later ones go ahead while its variant loads "
        "(then it is loaded on the step loop)",
    )
    delta_kernel: Literal["auto", "native", "torch"] = Field(
        "auto",
        description="sparse delta products by the device's native kernel (C on CPU, "
        "Triton on CUDA; auto: when it works here, else torch), or the torch reference",
    )
    decode_kernels: Literal["auto", "torch"] = Field(
        "auto",
        description="a decode step's dense products (up to 32 rows) and attention by "
        "deltaserve's own CPU kernels where they are built (bf16 weights, a CPU with "
        "AVX512-BF16; auto), else torch's GEMM and SDPA (torch: always)",
    )
    merge_policy: Literal["auto", "never", "always"] = Field(
        "auto",
        description="merge the dominant variant into the weights per step by the cost "
        "model (auto), never, or always",
    )
    queue_limit: int = Field(64, ge=1, description="queued requests before 429")
    max_composition_members: int = Field(
        4, ge=1, le=64, description="variants one composition ('a+b', a recipe) may merge"
    )
    max_prompt_tokens: int = Field(2048, ge=1, description="longest prompt accepted (413)")
    max_new_tokens: int = Field(512, ge=1, description="largest max_tokens accepted")
    max_upload_bytes: int = Field(GiB, ge=1, description="largest delta upload accepted (413)")
    max_request_bytes: int = Field(
        1 << 20, ge=1024, description="largest request body other than an upload (413)"
    )
    demo: bool = Field(
        True, description="make the two demo variants on first run (embedded base only)"
    )

    @field_validator("adapter_roots", "lora_modules", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        """A comma-separated string (the environment) as a list."""
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.revision is not None and self.base is None:
            raise ValueError("--revision applies to --base (a Hub id)")
        self.lora_module_refs()  # raises on a malformed one
        for root in self.adapter_roots:
            if not root.expanduser().is_dir():
                raise ValueError(f"--adapter-roots: {root} is not a directory")
        if self.device_delta_cache_bytes and not self.host_delta_cache_bytes:
            raise ValueError("a device delta cache needs a host delta cache to feed it")
        if self.admin_token_file is not None:
            if self.admin_token is not None:
                raise ValueError("give the admin token once: DELTASERVE_ADMIN_TOKEN or a file")
            self.admin_token = SecretStr(_read_secret(self.admin_token_file, "admin token"))
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 8:
            raise ValueError("admin token must be at least 8 characters")
        if self.api_keys_file is not None:
            if self.api_keys is not None:
                raise ValueError("give the API keys once: DELTASERVE_API_KEYS or a file")
            keys = _read_secret(self.api_keys_file, "API keys").split()
            self.api_keys = SecretStr(",".join(keys))
        if self.api_keys is not None and any(len(k) < 8 for k in self.keys()):
            raise ValueError("each API key must be at least 8 characters")
        return self

    def served_name(self) -> str:
        """The base's model name: --served-model-name, else a Hub id as given, else the
        model directory's name (vLLM's default)."""
        if self.served_model_name:
            return self.served_model_name
        if self.base is None:
            return MODEL_NAME
        ref = str(self.base)
        if not self.base.expanduser().exists() and is_hub_id(ref):
            return ref
        return self.base.name

    def lora_module_refs(self) -> list[tuple[str, str]]:
        """(name, reference) of each --lora-modules entry: NAME=REF, or vLLM's JSON form
        {"name": ..., "path": ...}."""
        out: dict[str, str] = {}
        for item in self.lora_modules:
            if item.lstrip().startswith("{"):
                try:
                    obj = json.loads(item)
                    name, ref = str(obj["name"]), str(obj["path"])
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"--lora-modules {item!r}: not a name and a path") from e
            else:
                name, sep, ref = item.partition("=")
                if not sep or not ref.strip():
                    raise ValueError(f"--lora-modules {item!r}: expected NAME=PATH")
            try:
                check_name(name.strip())
            except InvalidName as e:
                raise ValueError(f"--lora-modules {item!r}: {e}") from None
            if name.strip() in out:
                raise ValueError(f"--lora-modules: {name.strip()!r} given twice")
            out[name.strip()] = ref.strip()
        return list(out.items())

    def keys(self) -> list[str]:
        """The API keys (empty: inference is open)."""
        if self.api_keys is None:
            return []
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]

    def key_digests(self) -> list[bytes]:
        """sha256 of every credential inference accepts (the API keys and the admin
        token); empty when no API keys are set (inference is open)."""
        keys = self.keys()
        if not keys:
            return []
        if self.admin_token is not None:
            keys.append(self.admin_token.get_secret_value())
        return [secret_digest(k) for k in keys]


def secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read the {what} file {path}: {e.strerror}") from None
    if not text:
        raise ValueError(f"the {what} file {path} is empty")
    return text
