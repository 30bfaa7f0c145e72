"""Server configuration: one pydantic-settings `Settings`, env prefix DELTASERVE_.

`deltaserve serve` builds one flag per field (``--max-batch-size`` for
``max_batch_size``) from these definitions, so `deltaserve serve --help` documents
each; a flag overrides the environment, which overrides the default.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1 << 30


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected setting (a short token) is never echoed
    model_config = SettingsConfigDict(
        env_prefix="DELTASERVE_", extra="forbid", hide_input_in_errors=True
    )

    base: Path | None = Field(
        None, description="base model directory (default: the embedded SmolLM2-135M-Instruct)"
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
        8, ge=1, description="sequences running together (requests of any variants, one step)"
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

    @model_validator(mode="after")
    def _check(self) -> Settings:
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
