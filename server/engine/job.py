"""A request as the engine sees it: its sampling parameters, its events, its result.

The HTTP layer resolves a request's `model` once into a `Target` (server/routes/),
the engine (llm_engine.py) runs `Job`s and reports through `Job.emit`, and the HTTP
layer renders them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.engine.grammar import Grammar

from deltastore.merge import MergeMethod

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


Versions = tuple[Any, ...]  # file stamps (inode, size, mtime); None for a file that is gone


@dataclass(frozen=True)
class Target:
    """What a request's `model` names, resolved once on the HTTP side: the engine's key
    for it, a composition's members and merge (none: one delta file of the store), the
    response's `system_fingerprint`, and the versions of the files it was resolved
    against (a delta file's stamp; a composition's recipe stamp, None for an
    expression, then its members'). Without versions the engine reads the stamps
    itself when it admits the request."""

    key: str
    members: tuple[tuple[str, float], ...] = ()
    method: MergeMethod = MergeMethod.SUM
    density: float | None = None
    seed: int = 0
    fingerprint: str | None = None
    versions: Versions = ()

    @property
    def composed(self) -> bool:
        return bool(self.members)

    @property
    def files(self) -> tuple[str, ...]:
        """The delta files it is read from: itself, or its members."""
        return tuple(m for m, _ in self.members) if self.members else (self.key,)


@dataclass(frozen=True)
class Piece:
    """A token's own text and bytes (as logprobs show it)."""

    text: str
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw logits, with the `top` most
    likely tokens at its position (id, logprob), best first. `pieces`: the texts of
    the token, then of each alternative (the worker's detokenizer labels the entries
    it hands over)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    pieces: tuple[Piece, ...] = ()

    def texts(self) -> dict[int, Piece]:
        """Token id -> its piece, for the token and its alternatives (empty: unlabelled)."""
        ids = (self.token, *(t for t, _ in self.top))
        return dict(zip(ids, self.pieces, strict=True)) if self.pieces else {}


class Event(StrEnum):
    """What a job emits (see `Job`)."""

    TEXT = "text"  # payload: the text added
    LOGPROBS = "logprobs"  # payload: how many logprob entries the next text carries
    DONE = "done"  # payload: the Job
    ERROR = "error"  # payload: a JobError


class Finish(StrEnum):
    """Why a choice ended (`finish_reason`; CANCELLED and ERROR are never rendered as
    one: the request is answered 499 or with its error)."""

    STOP = "stop"  # an end token, a stop token or a stop string
    LENGTH = "length"  # max_tokens
    CANCELLED = "cancelled"  # the client went away, or the server stopped
    ERROR = "error"


@dataclass(frozen=True)
class JobError:
    """Why a request failed, in words safe to show its client (never exception text:
    that goes to the log, under the request id)."""

    message: str
    status: int = 500
    code: str = "generation_failed"
    retry_after: int | None = None  # seconds, for the Retry-After header


INTERNAL = JobError("generation failed on an internal error")
NO_ROOM = JobError(
    "the variant's delta does not fit in the server's layout budget beside the variants "
    "pinned there; retry later, or ask the operator to raise --mixed-cache-bytes",
    503,
    "layout_cache_full",
    retry_after=5,  # pinned layouts are released as their requests finish
)
UNAVAILABLE = JobError(
    "the server cannot verify its resident weights and refuses to serve", 503, "weights_unavailable"
)


@dataclass(eq=False)
class Job:
    """One choice of one request, as the worker sees it. `emit` is thread-safe (it
    hands events to the request's event loop): (TEXT, str) while generating, each
    preceded by (LOGPROBS, n) when logprobs are asked for (the text carries the
    entries up to n), then (DONE, Job), or (ERROR, JobError). `logprobs` grows
    with the generated tokens; `prompt_logprobs` is complete before the first text."""

    variant: str | None  # the target's key; None: the base
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event, Any], None]
    request_id: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    text: str = ""
    completion_tokens: int = 0
    finish_reason: Finish | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    target: Target | None = None  # resolved by the HTTP side; else a delta file named `variant`

    def __post_init__(self) -> None:
        if self.target is None and self.variant is not None:
            self.target = Target(self.variant)
        if self.target is not None and self.target.key != self.variant:
            raise ValueError(f"job for {self.variant!r} carries the target {self.target.key!r}")
