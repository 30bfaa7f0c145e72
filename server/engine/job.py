"""A request as the engine sees it: its sampling parameters, its events, its result.

The engine (llm_engine.py) runs `Job`s and reports through `Job.emit`; the HTTP layer
renders them (server/routes/openai.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.engine.grammar import Grammar

MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default max_logprobs and OpenAI's chat


@dataclass(frozen=True)
class SamplingParams:
    """One choice's parameters (the HTTP layer checks their bounds)."""

    max_tokens: int  # 0 only with prompt_logprobs: score the prompt, generate nothing
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    min_tokens: int = 0  # end tokens and stop strings are held off until this many
    logprobs: int | None = None  # per generated token: its logprob and this many alternatives
    prompt_logprobs: int | None = None  # the same per prompt token (the first has none)
    grammar: Grammar | None = None  # structured output: the only tokens the choice may take


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw logits, with the `top` most
    likely tokens at its position (id, logprob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class JobError:
    """Why a request failed, in words safe to show its client (never exception text:
    that goes to the log, under the request id)."""

    message: str
    status: int = 500
    code: str = "generation_failed"


INTERNAL = JobError("generation failed on an internal error")
NO_ROOM = JobError(
    "the variant's delta does not fit in the server's layout budget beside the variants "
    "pinned there; retry later, or ask the operator to raise --mixed-cache-bytes",
    503,
    "layout_cache_full",
)
UNAVAILABLE = JobError(
    "the server cannot verify its resident weights and refuses to serve", 503, "weights_unavailable"
)


@dataclass(eq=False)
class Job:
    """One choice of one request, as the worker sees it. `emit` is thread-safe (it
    hands events to the request's event loop): ("text", str) while generating, each
    preceded by ("logprobs", n) when logprobs are asked for (the text carries the
    entries up to n), then ("done", Job), or ("error", JobError). `logprobs` grows
    with the generated tokens; `prompt_logprobs` is complete before the first text."""

    variant: str | None
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[str, Any], None]
    request_id: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
