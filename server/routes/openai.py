"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

`model` names a variant in the store, or the base by its directory name.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.deps import KeyDep, ReadyDep, StateDep
from server.errors import APIError, body
from server.generate import Job, JobError, SamplingParams
from server.scheduler import QueueFull
from server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    _Sampling,
)
from server.state import AppState
from server.store import NameError_, check_name

router = APIRouter(tags=["openai"], dependencies=[KeyDep])
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# A prompt longer than this many characters per allowed token is refused before it
# is tokenized (a token of this tokenizer family is rarely over 16 characters).
CHARS_PER_TOKEN_BOUND = 32


def _check_chars(state: AppState, n_chars: int) -> None:
    limit = state.settings.max_prompt_tokens * CHARS_PER_TOKEN_BOUND
    if n_chars > limit:
        raise APIError(
            413,
            f"prompt of {n_chars} characters exceeds {limit} "
            f"(at most {state.settings.max_prompt_tokens} tokens)",
            "prompt_too_long",
        )


def resolve_model(state: AppState, name: str) -> str | None:
    """The variant a request names (None: the base); 404 when there is none."""
    if name == state.base_name:
        return None
    try:
        check_name(name)
        known = name not in state.retiring and state.store.exists(name)
    except NameError_:
        known = False
    if not known:
        names = [state.base_name, *state.store.names()]
        shown = ", ".join(names[:20]) + (" …" if len(names) > 20 else "")
        raise APIError(404, f"model {name!r} does not exist; available: {shown}", "model_not_found")
    return name


async def _door(state: AppState, variant: str | None, model: str, request: Request) -> None:
    """Right before a request is queued: it waits while its variant is being replaced,
    and gets 404 if it was deleted since it was resolved."""
    if variant is None:
        return
    if variant in state.replacing:
        if state.at_door >= state.settings.queue_limit:  # they count as queued
            raise APIError(429, f"server busy: {variant!r} is being replaced", "queue_full")
        state.at_door += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 600
            while variant in state.replacing and loop.time() < deadline:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected", "cancelled")
                await asyncio.sleep(0.02)
        finally:
            state.at_door -= 1
    if variant in state.retiring or not state.store.exists(variant):
        resolve_model(state, model)  # raises the 404, with the names available


def _check_options(req: _Sampling) -> None:
    bad = req.unsupported()
    if bad:
        raise APIError(400, f"unsupported option(s): {', '.join(bad)}", "unsupported_option")


def _params(
    state: AppState,
    req: _Sampling,
    n_prompt: int,
    max_tokens: int | None,
    default: int,
    max_positions: int,
) -> SamplingParams:
    limit = state.settings.max_new_tokens
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens {max_tokens} exceeds this server's {limit}", "max_tokens")
    if n_prompt > state.settings.max_prompt_tokens:
        raise APIError(
            413,
            f"prompt of {n_prompt} tokens exceeds {state.settings.max_prompt_tokens}",
            "prompt_too_long",
        )
    room = max_positions - n_prompt
    if room < 1:
        raise APIError(413, f"prompt of {n_prompt} tokens fills the context", "prompt_too_long")
    wanted = max_tokens if max_tokens is not None else min(default, limit)
    return SamplingParams(
        max_tokens=min(wanted, room),
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stop_list(),
        ignore_eos=req.ignore_eos,
    )


@router.get("/v1/models")
def models(state: StateDep) -> ModelList:
    base_created = int(state.started)
    cards = [ModelCard(id=state.base_name, created=base_created, root=str(state.base_dir or ""))]
    for name in state.store.names():
        if name in state.retiring:
            continue
        try:
            created = int(state.store.path(name).stat().st_mtime)
        except FileNotFoundError:
            continue
        cards.append(ModelCard(id=name, created=created, root=name, parent=state.base_name))
    return ModelList(data=cards)


@router.post("/v1/completions", response_model=None)
async def completions(
    req: CompletionRequest, request: Request, state: StateDep, ready: ReadyDep
) -> CompletionResponse | StreamingResponse:
    engine, _ = ready
    _check_options(req)
    variant = resolve_model(state, req.model)
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise APIError(400, "one prompt per request (got a list of several)", "n_prompts")
        prompt = req.prompt[0]
    else:
        prompt = req.prompt
    _check_chars(state, len(prompt))
    ids = await state.tokenize(lambda tok: tok(prompt)["input_ids"])
    if not ids:
        raise APIError(400, "empty prompt", "empty_prompt")
    params = _params(
        state, req, len(ids), req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, engine.max_positions
    )
    return await _serve(state, ready, request, req, variant, ids, params, chat=False)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    req: ChatCompletionRequest, request: Request, state: StateDep, ready: ReadyDep
) -> ChatCompletionResponse | StreamingResponse:
    engine, _ = ready
    _check_options(req)
    variant = resolve_model(state, req.model)
    if not getattr(state.tokenizer, "chat_template", None):
        raise APIError(400, "the base has no chat template: use /v1/completions", "no_template")
    _check_chars(state, sum(len(m.content) for m in req.messages))
    messages = [m.model_dump() for m in req.messages]

    def encode(tok: Any) -> list[int]:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
        return ids

    ids = await state.tokenize(encode)
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = _params(
        state, req, len(ids), max_tokens, state.settings.max_new_tokens, engine.max_positions
    )
    return await _serve(state, ready, request, req, variant, ids, params, chat=True)


# --------------------------------------------------------------------------- serving


class _Pending:
    """A submitted job and the queue its events arrive on (from the worker thread)."""

    def __init__(
        self, variant: str | None, ids: list[int], params: SamplingParams, request_id: str
    ) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

        self.job = Job(variant, ids, params, emit, request_id=request_id)


def _job_error(payload: JobError) -> tuple[int, str, str]:
    """(status, message, code) of a failed job, in words safe for the client."""
    return payload.status, payload.message, payload.code


def _observe(state: AppState, job: Job) -> None:
    m = state.metrics
    m.prompt_tokens.inc(len(job.prompt_ids))
    m.generated_tokens.inc(job.completion_tokens)
    if job.first_token is not None:
        m.ttft_seconds.observe(job.first_token - job.enqueued)
    if job.finished is not None:
        m.e2e_seconds.observe(job.finished - job.enqueued)


def _usage(job: Job) -> Usage:
    n = len(job.prompt_ids)
    return Usage(
        prompt_tokens=n,
        completion_tokens=job.completion_tokens,
        total_tokens=n + job.completion_tokens,
    )


async def _serve(
    state: AppState,
    ready: Any,
    request: Request,
    req: _Sampling,
    variant: str | None,
    ids: list[int],
    params: SamplingParams,
    chat: bool,
) -> Any:
    _, scheduler = ready
    pending = _Pending(variant, ids, params, getattr(request.state, "request_id", ""))
    await _door(state, variant, req.model, request)
    try:  # no await between the door and the queue: admin actions see this request
        scheduler.submit(pending.job)
    except QueueFull as e:
        raise APIError(429, f"server busy: {e}", "queue_full") from e
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if req.stream:
        return StreamingResponse(
            _stream(state, pending, rid, created, req, chat), media_type="text/event-stream"
        )
    job = await _wait(pending, request)
    _observe(state, job)
    if job.finish_reason == "cancelled":
        raise APIError(499, "client disconnected", "cancelled")
    if chat:
        return ChatCompletionResponse(
            id=rid,
            created=created,
            model=req.model,
            usage=_usage(job),
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=job.text), finish_reason=job.finish_reason
                )
            ],
        )
    return CompletionResponse(
        id=rid,
        created=created,
        model=req.model,
        usage=_usage(job),
        choices=[CompletionChoice(text=job.text, finish_reason=job.finish_reason)],
    )


async def _wait(pending: _Pending, request: Request) -> Job:
    """The finished job; a client that disconnects first frees its slot."""

    async def done() -> Job:
        while True:
            kind, payload = await pending.events.get()
            if kind == "done":
                job: Job = payload
                return job
            if kind == "error":
                status, message, code = _job_error(payload)
                raise APIError(status, message, code)

    async def disconnected() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        pending.job.cancelled.set()

    waiter, watcher = asyncio.create_task(done()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():  # disconnected: wait for the worker to drop the job
            pending.job.cancelled.set()
        return await waiter
    finally:
        watcher.cancel()


def _chunk(
    rid: str,
    created: int,
    model: str,
    chat: bool,
    text: str | None,
    finish: str | None,
    first: bool = False,
) -> str:
    if chat:
        delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "finish_reason": finish,
            "logprobs": None,
        }
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(
    state: AppState, pending: _Pending, rid: str, created: int, req: _Sampling, chat: bool
) -> AsyncIterator[str]:
    job = pending.job
    finished = False
    try:
        if chat:
            yield _chunk(rid, created, req.model, chat, None, None, first=True)
        while True:
            kind, payload = await pending.events.get()
            if kind == "text":
                yield _chunk(rid, created, req.model, chat, payload, None)
            elif kind == "error":
                finished = True
                status, message, code = _job_error(payload)
                message = f"{message} (request id {job.request_id})"
                yield f"data: {json.dumps(body(status, message, code))}\n\n"
                break
            elif kind == "done":
                finished = True
                _observe(state, job)
                yield _chunk(rid, created, req.model, chat, None, job.finish_reason)
                if req.include_usage:
                    usage: dict[str, Any] = {
                        "id": rid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created,
                        "model": req.model,
                        "choices": [],
                        "usage": _usage(job).model_dump(),
                    }
                    yield f"data: {json.dumps(usage)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream: free the slot
            job.cancelled.set()
