"""HTTP bodies (pydantic at the boundary), in OpenAI's shapes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from server.engine.job import MAX_LOGPROBS

# Known OpenAI options this server does not implement, with the value that means
# "not used": anything else is a 400 that names the option.
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "best_of": 1,
    "suffix": None,
    "logit_bias": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "parallel_tool_calls": None,
}
IGNORED = {"user"}  # accepted: metadata

# Bounds on what one request may carry, checked before it is tokenized or queued.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit generator seed (as vLLM)
MAX_STOPS = 16  # OpenAI allows 4; lm-eval sends a task's stops plus the end token
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 256
MAX_N = 128  # choices per prompt (as OpenAI's chat); all choices also fit the queue
MAX_PROMPTS = 256  # prompts in one completion request
MAX_GUIDE_CHARS = 16_384  # a guided_regex
MAX_CHOICES = 1024  # guided_choice's strings


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`: the schema the output is held to."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the output always follows the schema, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text (no constraint), any JSON object, or JSON
    that validates against a schema (server/structured.py)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1: all")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says
    min_tokens: int = Field(0, ge=0)
    # structured output (server/structured.py): OpenAI's shape, or one of vLLM's
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # a JSON schema (or its text)
    guided_regex: str | None = Field(None, max_length=MAX_GUIDE_CHARS)
    guided_choice: list[str] | None = Field(None, max_length=MAX_CHOICES)

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
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    # text, token ids, or a list of either (one choice per prompt and n)
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    text: str = ""

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"only text content parts are supported (got {v!r})")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: one entry per token (echoed prompt tokens first,
    the first of them with null logprobs)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """A chat stream's increment: the role in a choice's first chunk, then its text;
    fields not set are left out (`{}` in a choice's last chunk), as OpenAI sends."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class StreamChunk(BaseModel):
    """One event of a stream (completions: `text_completion` choices carrying text;
    chat: `chat.completion.chunk` choices carrying a delta). `usage` is only in the
    last chunk, and only when `stream_options.include_usage` asks for it."""

    id: str
    object: Literal["text_completion", "chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice | ChatStreamChoice]
    usage: Usage | None = None

    def sse(self) -> str:
        """The server-sent event: `data: JSON` and a blank line."""
        data = self.model_dump_json(exclude={"usage"} if self.usage is None else None)
        return f"data: {data}\n\n"


class Fidelity(BaseModel):
    """The fidelity estimate a delta file records (deltastore.fidelity.Estimate): the
    share of its fine-tune's gain over the base the variant keeps, estimated without
    labels when it was compressed from its greedy continuations of the calibration
    text (`kept`: None when the fine-tune changed too little of that text to tell)."""

    kept: float | None = None
    variant: float | None = None  # share of the continuations the variant reproduces
    base: float | None = None  # ... the base
    finetune: float | None = None  # ... the fine-tune (1 up to rounding)
    continuations: int = 0
    tokens: float | None = None  # share of the continuations' tokens the variant reproduces
    shift: float | None = None  # mean KL(fine-tune || base) where it differs most, nats

    @classmethod
    def of(cls, recorded: dict[str, Any] | None) -> Fidelity | None:
        """From a file's metadata; None for files made without an estimate (or before
        estimates were recorded)."""
        if recorded is None:
            return None
        return cls.model_validate({k: v for k, v in recorded.items() if k in cls.model_fields})


class DeltaSummary(BaseModel):
    """A variant's delta, as `GET /v1/models/{id}` shows it."""

    method: str
    rate: float
    q: float | None
    size_bytes: int
    kept_entries: int
    sha256: str
    parent: str
    fidelity: Fidelity | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deltaserve"
    root: str
    parent: str | None = None
    max_model_len: int | None = None
    delta: DeltaSummary | None = None
    composition: dict[str, Any] | None = None  # members, weights, merge method


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages through the chat template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


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
    fidelity: Fidelity | None = None


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


class CompositionRequest(BaseModel):
    """POST /admin/compositions: a recipe served under `name`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    members: list[str] = Field(min_length=1, max_length=64)
    weights: list[Annotated[float, Field(allow_inf_nan=False)]] | None = None
    method: Literal["sum", "ties", "dare-merge"] = "sum"
    density: float | None = Field(None, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, le=2**63 - 1)
