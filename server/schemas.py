"""HTTP bodies (pydantic at the boundary), in OpenAI's shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Known OpenAI options this server does not implement, with the value that means
# "not used": anything else is a 400 that names the option.
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "top_logprobs": None,
    "suffix": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
    "functions": None,
}
IGNORED = {"user", "stream_options"}  # accepted: metadata, or handled below

# Bounds on what one request may carry, checked before it is tokenized or queued.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit generator seed (as vLLM)
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_MESSAGES = 256


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)

    def unsupported(self) -> list[str]:
        """Options given that this server would otherwise silently ignore."""
        out = []
        for key, value in (self.model_extra or {}).items():
            if key in IGNORED:
                continue
            if key in UNSUPPORTED_DEFAULTS and value == UNSUPPORTED_DEFAULTS[key]:
                continue
            out.append(key)
        return sorted(out)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deltaserve"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class DeltaInfo(BaseModel):
    name: str
    size_bytes: int
    sha256: str
    kept_entries: int
    method: str
    rate: float
    q: float | None
    tensors: int
    created: str
    source: str
    tier: str
    pinned: bool


class TierInfo(BaseModel):
    tier: str
    budget_bytes: int
    used_bytes: int
    hits: int
    misses: int
    evictions: int
    entries: list[dict[str, Any]]


class CacheInfo(BaseModel):
    active: str | None
    mode: str
    tiers: list[TierInfo]
