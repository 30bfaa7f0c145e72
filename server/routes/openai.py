"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models,
and vLLM's /tokenize and /detokenize.

`model` names a variant in the store, or the base by its served name. Both
completion routes share one pipeline: resolve the model -> tokenize the prompts ->
sampling parameters per choice (prompts x n) -> submit every choice -> render (a
response, or a stream of chunks).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from deltastore.store import NameError_, check_name
from server.compose import Composition, CompositionError
from server.deps import KeyDep, ReadyDep, StateDep
from server.engine.job import Job, JobError, SamplingParams, TokenLogprob
from server.engine.llm_engine import QueueFull
from server.errors import APIError, body
from server.schemas import (
    MAX_PROMPTS,
    SEED_MAX,
    SEED_MIN,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaSummary,
    DetokenizeRequest,
    DetokenizeResponse,
    Fidelity,
    ModelCard,
    ModelList,
    StreamChunk,
    TokenizeRequest,
    TokenizeResponse,
    TopLogprob,
    Usage,
    _Sampling,
)
from server.state import AppState

router = APIRouter(tags=["openai"], dependencies=[KeyDep])
COMPLETION_DEFAULT = 16  # OpenAI's default for /v1/completions
# A prompt longer than this many characters per allowed token is refused before it
# is tokenized (a token of this tokenizer family is rarely over 16 characters).
CHARS_PER_TOKEN_BOUND = 32


def _check_chars(state: AppState, n_chars: int, param: str) -> None:
    """A prompt too long to hold the allowed tokens, refused before it is tokenized."""
    tokens = state.settings.max_prompt_tokens
    if n_chars > tokens * CHARS_PER_TOKEN_BOUND:
        raise APIError(
            400,
            f"This server's maximum prompt length is {tokens} tokens. However, your request "
            f"has {n_chars} characters, more than {tokens} tokens hold (at most "
            f"{CHARS_PER_TOKEN_BOUND} characters per token). {REDUCE}",
            "context_length_exceeded",
            param,
        )


REDUCE = "Please reduce the length of the input messages."


def _prompt_too_long(state: AppState, engine: Any, n_prompt: int, param: str) -> APIError:
    """vLLM's words for a prompt beyond the context (or beyond --max-prompt-tokens)."""
    limit = max_model_len(state, engine)
    what = (
        f"This model's maximum context length is {limit} tokens"
        if n_prompt >= limit
        else f"This server's maximum prompt length is {state.settings.max_prompt_tokens} tokens"
    )
    return APIError(
        400,
        f"{what}. However, your request has {n_prompt} input tokens. {REDUCE}",
        "context_length_exceeded",
        param,
    )


def resolve_model(state: AppState, name: str) -> str | None:
    """The variant a request names (None: the base), a composition's engine name
    included; 404 when there is none, 400 for a composition that cannot be served."""
    if name == state.base_name:
        return None
    try:
        comp = state.compositions.resolve(name)
    except CompositionError as e:
        raise APIError(e.status, str(e), e.code, "model") from None
    if comp is not None:
        check_members(state, name, comp)
        return comp.key
    try:
        check_name(name)
        known = name not in state.retiring and state.store.exists(name)
    except NameError_:
        known = False
    if not known:
        raise _not_found(state, name)
    return name


def _not_found(state: AppState, name: str, what: str = "model") -> APIError:
    names = [state.base_name, *state.store.names(), *state.compositions.names()]
    shown = ", ".join(names[:20]) + (" …" if len(names) > 20 else "")
    return APIError(
        404, f"{what} {name!r} does not exist; available: {shown}", "model_not_found", "model"
    )


def check_members(state: AppState, name: str, comp: Composition) -> None:
    # the engine checks each member against the base when it loads it; this earlier
    # check needs the base's fingerprint, which a first start takes in the background
    base = state.engine.known_fingerprint() if state.engine is not None else None
    for member, _ in comp.members:
        if member in state.retiring or not state.store.exists(member):
            raise _not_found(state, member, f"composition {name!r}: member")
        try:
            made_for = state.store.meta(member).base_fingerprint
        except (KeyError, ValueError):
            raise _not_found(state, member, f"composition {name!r}: member") from None
        if base is not None and made_for != base:
            raise APIError(
                400,
                f"composition {name!r}: member {member!r} was made for another base "
                f"({made_for}, this server's is {base})",
                "invalid_composition",
                "model",
            )


def store_names(state: AppState, variant: str) -> list[str]:
    """The delta files a variant is read from: itself, or a composition's members."""
    try:
        comp = state.compositions.resolve(variant)
    except CompositionError:
        comp = None
    return [variant] if comp is None else [m for m, _ in comp.members]


async def _door(state: AppState, variant: str | None, model: str, request: Request) -> None:
    """Right before a request is queued: it waits while its variant (a composition's
    members) is being replaced, and gets 404 if it was deleted since it was resolved."""
    if variant is None:
        return
    names = store_names(state, variant)
    if any(n in state.replacing for n in names):
        if state.at_door >= state.settings.queue_limit:  # they count as queued
            raise APIError(429, f"server busy: {variant!r} is being replaced", "queue_full")
        state.at_door += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 600
            while any(n in state.replacing for n in names) and loop.time() < deadline:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected", "cancelled")
                await asyncio.sleep(0.02)
        finally:
            state.at_door -= 1
    if any(n in state.retiring or not state.store.exists(n) for n in names):
        resolve_model(state, model)  # raises the 404, with the names available


def _check_options(req: _Sampling) -> None:
    bad = req.unsupported()
    if bad:
        raise APIError(
            400, f"unsupported option(s): {', '.join(bad)}", "unsupported_option", bad[0]
        )


def max_model_len(state: AppState, engine: Any) -> int:
    """The longest prompt plus completion a request may ask for."""
    s = state.settings
    return int(min(engine.max_positions, s.max_prompt_tokens + s.max_new_tokens))


def _vocab(engine: Any) -> int:
    return int(engine.model.get_input_embeddings().weight.shape[0])


def _check_ids(ids: list[int], vocab: int, what: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            400, f"{what}: token id {bad} is outside the vocabulary [0, {vocab})", what, what
        )


def _max_tokens(
    state: AppState,
    engine: Any,
    n_prompt: int,
    wanted: int | None,
    default: int,
    prompt_param: str = "prompt",
    tokens_param: str = "max_tokens",
) -> int:
    """The completion budget of one prompt: `wanted`, or the default within the context.
    A prompt, or a prompt and completion, beyond the context is a 400
    `context_length_exceeded` in vLLM's words, naming the field to shorten."""
    s = state.settings
    if wanted is not None and wanted > s.max_new_tokens:
        raise APIError(
            400,
            f"{tokens_param} {wanted} exceeds this server's {s.max_new_tokens}",
            "max_tokens",
            tokens_param,
        )
    limit = max_model_len(state, engine)
    if n_prompt > s.max_prompt_tokens or n_prompt + int(wanted != 0) > limit:
        raise _prompt_too_long(state, engine, n_prompt, prompt_param)
    budget = wanted if wanted is not None else min(default, s.max_new_tokens, limit - n_prompt)
    if n_prompt + budget > limit:
        raise APIError(
            400,
            f"'max_tokens' or 'max_completion_tokens' is too large: {budget}. This model's "
            f"maximum context length is {limit} tokens and your request has {n_prompt} input "
            f"tokens ({budget} > {limit} - {n_prompt}).",
            "context_length_exceeded",
            tokens_param,
        )
    return budget


def _params(
    state: AppState,
    engine: Any,
    req: _Sampling,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
) -> SamplingParams:
    if req.min_tokens > max_tokens:
        raise APIError(
            400,
            f"min_tokens {req.min_tokens} exceeds max_tokens {max_tokens}",
            "min_tokens",
            "min_tokens",
        )
    stop_ids = tuple(req.stop_token_ids or ())
    _check_ids(list(stop_ids), _vocab(engine), "stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=req.stop_list(),
        stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j's seed: the request's seed plus j (wrapped to 64 bits), so a seeded
    request is reproducible choice by choice and its first choice is that of n = 1."""
    if seed is None:
        return None
    return (seed + j - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN


async def fingerprint(state: AppState, variant: str | None) -> str | None:
    """`system_fingerprint`: of the base's weights (their files' fingerprint and the
    dtype they are served in), or of the variant's delta file."""
    if variant is None:
        engine = state.engine
        if engine is None:
            return None
        fp = await run_in_threadpool(lambda: engine.fingerprint)  # waits on a first start
        served = f"{fp}|{engine.dtype}".encode()
        return f"fp_{hashlib.sha256(served).hexdigest()[:16]}"
    comp = state.compositions.resolve(variant)
    try:
        if comp is None:
            info = await run_in_threadpool(state.store.info, variant)  # cached per stamp
            return f"fp_{info.sha256[:16]}"
        h = hashlib.sha256(json.dumps(comp.describe(), sort_keys=True).encode())
        for member, _ in comp.members:  # the members' files, in name order
            h.update((await run_in_threadpool(state.store.info, member)).sha256.encode())
        return f"fp_{h.hexdigest()[:16]}"
    except (KeyError, FileNotFoundError):
        return None


# --------------------------------------------------------------------------- routes


def _card(state: AppState, name: str, engine: Any | None) -> ModelCard | None:
    limit = max_model_len(state, engine) if engine is not None else None
    if name == state.base_name:
        root = str(state.base_dir or "")
        return ModelCard(id=name, created=int(state.started), root=root, max_model_len=limit)
    if name in state.retiring:
        return None
    try:
        comp = state.compositions.resolve(name)
    except CompositionError:
        return None
    try:
        if comp is None:
            created = int(state.store.path(name).stat().st_mtime)
        elif comp.recipe:
            created = int(state.compositions.path(name).stat().st_mtime)
        else:  # an expression: made on demand
            created = int(state.started)
    except (FileNotFoundError, NameError_):
        return None
    return ModelCard(
        id=name,
        created=created,
        root=name,
        parent=state.base_name,
        max_model_len=limit,
        composition=comp.describe() if comp is not None else None,
    )


@router.get("/v1/models")
def models(state: StateDep) -> ModelList:
    """The base, every variant, and every registered composition (with its members)."""
    names = [state.base_name, *state.store.names(), *state.compositions.names()]
    cards = [_card(state, n, state.engine) for n in names]
    return ModelList(data=[c for c in cards if c is not None])


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, state: StateDep) -> ModelCard:
    """One model (the OpenAI client's `models.retrieve`); a variant's card carries its
    delta: method, rate, q, size, checksum and parent; a composition's its members."""
    resolve_model(state, model_id)
    card = _card(state, model_id, state.engine)
    if card is None:
        resolve_model(state, model_id)  # gone since: the 404 with the names available
        raise APIError(404, f"model {model_id!r} does not exist", "model_not_found", "model")
    if model_id != state.base_name and card.composition is None:
        try:
            info = await run_in_threadpool(state.store.info, model_id)
        except (KeyError, FileNotFoundError):
            raise APIError(
                404, f"model {model_id!r} does not exist", "model_not_found", "model"
            ) from None
        m = info.meta
        card.delta = DeltaSummary(
            method=m.method,
            rate=m.rate,
            q=m.q,
            size_bytes=info.size,
            kept_entries=sum(t.count for t in m.tensors.values()),
            sha256=info.sha256,
            parent=state.base_name,
            fidelity=Fidelity.of(m.fidelity),
        )
    return card


async def _chat_ids(state: AppState, messages: list[ChatMessage], generation: bool) -> list[int]:
    if not getattr(state.tokenizer, "chat_template", None):
        raise APIError(400, "the base has no chat template: use /v1/completions", "no_template")
    _check_chars(state, sum(len(m.text()) for m in messages), "messages")
    turns = [{"role": m.role, "content": m.text()} for m in messages]

    def encode(tok: Any) -> list[int]:
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)
        ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
        return ids

    return await state.tokenize(encode)


async def _prompt_ids(
    state: AppState, engine: Any, prompt: Any
) -> tuple[list[list[int]], list[str | None]]:
    """A completion request's prompts as token ids (text, ids, or a list of either),
    and each prompt's text as sent (None: given as ids)."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt: an empty list", "empty_prompt", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(
            400, f"prompt: at most {MAX_PROMPTS} prompts per request", "too_many_prompts", "prompt"
        )
    texts = [p for p in prompts if isinstance(p, str)]
    _check_chars(state, max((len(t) for t in texts), default=0), "prompt")
    encoded = iter(
        await state.tokenize(lambda tok: [tok(t)["input_ids"] for t in texts]) if texts else []
    )
    out = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
    vocab = _vocab(engine)
    for ids in out:
        if not ids:
            raise APIError(400, "prompt: an empty prompt", "empty_prompt", "prompt")
        _check_ids(ids, vocab, "prompt")
    return out, [p if isinstance(p, str) else None for p in prompts]


@router.post("/v1/completions", response_model=None)
async def completions(
    req: CompletionRequest, request: Request, state: StateDep, ready: ReadyDep
) -> CompletionResponse | StreamingResponse:
    engine, _ = ready
    _check_options(req)
    variant = resolve_model(state, req.model)
    if req.max_tokens == 0 and not req.echo:
        raise APIError(
            400, "max_tokens 0 needs echo (it scores the prompt)", "max_tokens", "max_tokens"
        )
    prompts, texts = await _prompt_ids(state, engine, req.prompt)
    lp = req.logprobs
    plans = []
    for ids in prompts:
        budget = _max_tokens(state, engine, len(ids), req.max_tokens, COMPLETION_DEFAULT)
        plans.append((ids, _params(state, engine, req, budget, lp, lp if req.echo else None)))
    render = _Render(False, req.echo, lp, tuple(texts))
    return await _serve(state, ready, request, req, variant, plans, render)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    req: ChatCompletionRequest, request: Request, state: StateDep, ready: ReadyDep
) -> ChatCompletionResponse | StreamingResponse:
    engine, _ = ready
    _check_options(req)
    variant = resolve_model(state, req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "top_logprobs")
    wanted = req.max_completion_tokens or req.max_tokens
    which = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if wanted == 0:
        raise APIError(400, "max_tokens must be at least 1", "max_tokens", "max_tokens")
    ids = await _chat_ids(state, req.messages, generation=True)
    budget = _max_tokens(
        state, engine, len(ids), wanted, state.settings.max_new_tokens, "messages", which
    )
    lp = (req.top_logprobs or 0) if req.logprobs else None
    plans = [(ids, _params(state, engine, req, budget, lp, None))]
    return await _serve(state, ready, request, req, variant, plans, _Render(True, False, lp))


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, state: StateDep, ready: ReadyDep) -> TokenizeResponse:
    """vLLM's /tokenize: a prompt, or messages through the chat template."""
    engine, _ = ready
    if req.model is not None:
        resolve_model(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt or messages", "invalid_request", "prompt")
    if req.messages is not None:
        ids = await _chat_ids(state, req.messages, req.add_generation_prompt)
    else:
        text = req.prompt or ""
        _check_chars(state, len(text), "prompt")
        special = req.add_special_tokens
        ids = await state.tokenize(lambda tok: tok(text, add_special_tokens=special)["input_ids"])
    strs = await state.token_texts(ids) if req.return_token_strs else None
    limit = max_model_len(state, engine)
    return TokenizeResponse(count=len(ids), max_model_len=limit, tokens=ids, token_strs=strs)


@router.post("/detokenize")
async def detokenize(
    req: DetokenizeRequest, state: StateDep, ready: ReadyDep
) -> DetokenizeResponse:
    engine, _ = ready
    if req.model is not None:
        resolve_model(state, req.model)
    _check_ids(req.tokens, _vocab(engine), "tokens")
    text = await state.tokenize(lambda tok: tok.decode(req.tokens))
    return DetokenizeResponse(prompt=text)


@router.get("/tokenizer_info")
def tokenizer_info(state: StateDep, ready: ReadyDep) -> dict[str, Any]:
    """vLLM's /tokenizer_info: what a client needs to tokenize through /tokenize
    (lm-evaluation-harness's remote tokenizer reads it)."""
    engine, _ = ready
    tok = state.tokenizer
    return {
        "tokenizer_class": type(tok).__name__,
        "eos_token": tok.eos_token,
        "bos_token": tok.bos_token,
        "pad_token": tok.pad_token,
        "chat_template": getattr(tok, "chat_template", None),
        "model_max_length": max_model_len(state, engine),
    }


# --------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class _Render:
    """How the choices of a request are rendered."""

    chat: bool
    echo: bool  # completions: the prompt's text (and logprobs) before the completion
    logprobs: int | None  # alternatives per token; None: no logprobs
    prompts: tuple[str | None, ...] = ()  # each prompt as sent (echo)


class _Pending:
    """The submitted choices of one request (prompts x n, in choice order) and the one
    queue their events arrive on, tagged with the choice index (from the worker)."""

    def __init__(
        self, variant: str | None, plans: list[tuple[list[int], SamplingParams]], n: int, rid: str
    ) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        self.jobs: list[Job] = []
        for ids, params in plans:
            for j in range(n):
                seeded = replace(params, seed=_choice_seed(params.seed, j))
                self.jobs.append(
                    Job(variant, ids, seeded, self._emitter(loop, len(self.jobs)), rid)
                )

    def _emitter(self, loop: asyncio.AbstractEventLoop, index: int) -> Any:
        def emit(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, payload))

        return emit

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()


def _observe(state: AppState, job: Job) -> None:
    m = state.metrics
    m.prompt_tokens.inc(len(job.prompt_ids))
    m.generated_tokens.inc(job.completion_tokens)
    if job.first_token is not None:
        m.ttft_seconds.observe(job.first_token - job.enqueued)
    if job.finished is not None:
        m.e2e_seconds.observe(job.finished - job.enqueued)


def _usage(jobs: list[Job], n: int) -> Usage:
    prompt = sum(len(j.prompt_ids) for j in jobs[::n])  # each prompt once, whatever n
    done = sum(j.completion_tokens for j in jobs)
    return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)


async def _serve(
    state: AppState,
    ready: Any,
    request: Request,
    req: _Sampling,
    variant: str | None,
    plans: list[tuple[list[int], SamplingParams]],
    render: _Render,
) -> Any:
    _, scheduler = ready
    n_choices = len(plans) * req.n
    if n_choices > state.settings.queue_limit:
        raise APIError(
            400,
            f"{n_choices} choices (prompts x n) exceed what the server queues "
            f"({state.settings.queue_limit})",
            "too_many_choices",
            "n",
        )
    pending = _Pending(variant, plans, req.n, getattr(request.state, "request_id", ""))
    fp = await fingerprint(state, variant)
    texts = _Texts(state)
    await _door(state, variant, req.model, request)
    try:  # no await between the door and the queue: admin actions see this request
        for job in pending.jobs:
            scheduler.submit(job)
    except QueueFull as e:
        pending.cancel()  # the choices already queued are dropped at admission
        raise APIError(429, f"server busy: {e}", "queue_full") from e
    rid = f"{'chatcmpl' if render.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    head = _Head(rid, created, req.model, fp, render.chat)
    if req.stream:
        stream = _stream(state, pending, head, req, render, texts)
        return StreamingResponse(stream, media_type="text/event-stream")
    jobs = await _wait(pending, request)
    for job in jobs:
        _observe(state, job)
    if any(job.finish_reason == "cancelled" for job in jobs):
        raise APIError(499, "client disconnected", "cancelled")
    usage = _usage(jobs, req.n)
    if render.chat:
        chat_choices = []
        for i, job in enumerate(jobs):
            chat_lp = None
            if render.logprobs is not None:
                chat_lp = ChatLogprobs(content=await texts.chat(job.logprobs))
            message = AssistantMessage(content=job.text)
            chat_choices.append(
                ChatChoice(
                    index=i, message=message, finish_reason=job.finish_reason, logprobs=chat_lp
                )
            )
        return ChatCompletionResponse(
            id=rid,
            created=created,
            model=req.model,
            system_fingerprint=fp,
            usage=usage,
            choices=chat_choices,
        )
    choices = []
    for i, job in enumerate(jobs):
        text, lp = job.text, None
        if render.echo:
            text = await texts.echo(render, i // req.n, job) + text
        if render.logprobs is not None:
            entries = _entries(job, render.echo)
            lp = await texts.completion(entries, 0)
        choices.append(
            CompletionChoice(index=i, text=text, finish_reason=job.finish_reason, logprobs=lp)
        )
    return CompletionResponse(
        id=rid,
        created=created,
        model=req.model,
        system_fingerprint=fp,
        usage=usage,
        choices=choices,
    )


def _entries(job: Job, echo: bool, generated: bool = True) -> list[tuple[int, TokenLogprob | None]]:
    """(token, logprob entry) of a choice: the echoed prompt's (the first without one)
    when `echo`, then the generated tokens' unless not `generated`."""
    out: list[tuple[int, TokenLogprob | None]] = []
    if echo:
        out = list(zip(job.prompt_ids, job.prompt_logprobs, strict=False))
    if generated:
        out.extend((e.token, e) for e in job.logprobs)
    return out


class _Texts:
    """Token ids -> text for rendering logprobs (the HTTP side's tokenizer, cached)."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def echo(self, render: _Render, prompt: int, job: Job) -> str:
        """The echoed prompt: its text as sent, or the decoded ids it was sent as."""
        sent = render.prompts[prompt] if prompt < len(render.prompts) else None
        if sent is not None:
            return sent
        ids = job.prompt_ids
        return await self.state.tokenize(lambda tok: tok.decode(ids, skip_special_tokens=True))

    async def completion(
        self, entries: list[tuple[int, TokenLogprob | None]], offset: int
    ) -> CompletionLogprobs:
        ids = {t for t, _ in entries}
        for _, e in entries:
            if e is not None:
                ids.update(t for t, _ in e.top)
        strs = dict(zip(ids, await self.state.token_texts(list(ids)), strict=True))
        out = CompletionLogprobs()
        for token, e in entries:
            out.tokens.append(strs[token])
            out.text_offset.append(offset)
            offset += len(strs[token])
            if e is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(e.logprob)
            top = {strs[token]: e.logprob}  # the chosen token is always there
            for t, lp in e.top:  # best first: a text two tokens share keeps the best
                top.setdefault(strs[t], lp)
            out.top_logprobs.append(top)
        return out

    async def chat(self, entries: list[TokenLogprob]) -> list[ChatTokenLogprob]:
        ids = list({e.token for e in entries} | {t for e in entries for t, _ in e.top})
        strs = dict(zip(ids, await self.state.token_texts(ids), strict=True))
        raw = dict(zip(ids, await self.state.token_bytes(ids), strict=True))

        def one(token: int, logprob: float) -> TopLogprob:
            return TopLogprob(token=strs[token], logprob=logprob, bytes=raw[token])

        out = []
        for e in entries:
            first = one(e.token, e.logprob)
            tops = [one(t, lp) for t, lp in e.top]
            out.append(ChatTokenLogprob(**first.model_dump(), top_logprobs=tops))
        return out


async def _wait(pending: _Pending, request: Request) -> list[Job]:
    """Every finished choice; a client that disconnects first frees their slots. The
    first choice that fails fails the request (and cancels the others)."""

    async def done() -> list[Job]:
        left = len(pending.jobs)
        while left:
            _, kind, payload = await pending.events.get()
            if kind == "done":
                left -= 1
            elif kind == "error":
                pending.cancel()
                error: JobError = payload
                raise APIError(error.status, error.message, error.code)
        return pending.jobs

    async def disconnected() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        pending.cancel()

    waiter, watcher = asyncio.create_task(done()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():  # disconnected: wait for the worker to drop the jobs
            pending.cancel()
        return await waiter
    finally:
        watcher.cancel()


@dataclass(frozen=True)
class _Head:
    """What every chunk of a stream repeats."""

    id: str
    created: int
    model: str
    fingerprint: str | None
    chat: bool

    def chunk(
        self, choices: list[CompletionChoice | ChatStreamChoice], usage: Usage | None = None
    ) -> str:
        obj: Literal["chat.completion.chunk", "text_completion"] = (
            "chat.completion.chunk" if self.chat else "text_completion"
        )
        return StreamChunk(
            id=self.id,
            object=obj,
            created=self.created,
            model=self.model,
            system_fingerprint=self.fingerprint,
            choices=choices,
            usage=usage,
        ).sse()


async def _stream(
    state: AppState,
    pending: _Pending,
    head: _Head,
    req: _Sampling,
    render: _Render,
    texts: _Texts,
) -> AsyncIterator[str]:
    """Chunks of every choice as their text arrives (each tagged with its index), a
    last chunk per choice with its finish reason, then usage when asked, then [DONE].
    Logprobs travel with the text they belong to: each text carries the entries of
    the tokens generated up to it (a token whose text is still held back, for a stop
    string, may come before its text)."""
    jobs = pending.jobs
    sent = [0] * len(jobs)  # logprob entries sent, per choice
    ready = [0] * len(jobs)  # entries the next text carries
    offset = [0] * len(jobs)  # text offset (completions logprobs)
    finished = False

    async def logprobs(i: int, end: int) -> CompletionLogprobs | ChatLogprobs | None:
        if render.logprobs is None:
            return None
        job = jobs[i]
        entries, sent[i] = job.logprobs[sent[i] : end], end
        if render.chat:
            return ChatLogprobs(content=await texts.chat(entries))
        lp = await texts.completion([(e.token, e) for e in entries], offset[i])
        offset[i] += sum(len(t) for t in lp.tokens)
        return lp

    def choice(
        i: int,
        text: str | None,
        finish: str | None,
        lp: CompletionLogprobs | ChatLogprobs | None,
        first: bool = False,
    ) -> CompletionChoice | ChatStreamChoice:
        if render.chat:
            assert not isinstance(lp, CompletionLogprobs)
            delta = ChatDelta(role="assistant", content="") if first else ChatDelta()
            if text:
                delta.content = text
            return ChatStreamChoice(index=i, delta=delta, finish_reason=finish, logprobs=lp)
        assert not isinstance(lp, ChatLogprobs)
        return CompletionChoice(index=i, text=text or "", finish_reason=finish, logprobs=lp)

    async def echo(i: int) -> str:
        """Completions with echo: the prompt's text (and logprobs: complete before the
        choice's first event) in the choice's first chunk."""
        job = jobs[i]
        text = await texts.echo(render, i // req.n, job)
        lp = None
        if render.logprobs is not None:
            lp = await texts.completion(_entries(job, True, generated=False), 0)
            offset[i] = sum(len(t) for t in lp.tokens)
        return head.chunk([choice(i, text, None, lp)])

    try:
        if render.chat:  # the role first, as OpenAI
            yield head.chunk([choice(i, None, None, None, first=True) for i in range(len(jobs))])
        started = [not render.echo] * len(jobs)
        left = len(jobs)
        while left:
            i, kind, payload = await pending.events.get()
            if not started[i] and kind in ("text", "done"):
                started[i] = True
                yield await echo(i)
            if kind == "logprobs":
                ready[i] = payload
            elif kind == "text":
                yield head.chunk([choice(i, payload, None, await logprobs(i, ready[i]))])
            elif kind == "error":
                pending.cancel()
                status, message, code = payload.status, payload.message, payload.code
                message = f"{message} (request id {jobs[i].request_id})"
                yield f"data: {json.dumps(body(status, message, code))}\n\n"
                break
            elif kind == "done":
                left -= 1
                _observe(state, jobs[i])
                rest = await logprobs(i, len(jobs[i].logprobs))
                yield head.chunk([choice(i, None, jobs[i].finish_reason, rest)])
        else:
            if req.include_usage:
                yield head.chunk([], _usage(jobs, req.n))
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream: free the slots
            pending.cancel()
