"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models,
and vLLM's /tokenize, /detokenize and /tokenizer_info.

`model` names a variant in the store, a composition, or the base by its served name.
Both completion routes share one pipeline, a module per stage:
    resolve.py  the model, looked up once (a Target)
    plan.py     prompts -> token ids, the completion budget, sampling parameters per
                choice (prompts x n)
    `_serve`    the door, then every choice submitted to the engine (llm_engine.py)
    render.py   the events of the choices -> a response, or a stream of chunks
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.deps import KeyDep, ReadyDep, StateDep
from server.engine.job import SamplingParams, Target
from server.engine.llm_engine import QueueFull
from server.errors import APIError
from server.routes import plan, render
from server.routes.resolve import base_fingerprint, door, resolve, resolve_model
from server.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DeltaSummary,
    DetokenizeRequest,
    DetokenizeResponse,
    Fidelity,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
)
from server.state import AppState
from server.structured import grammar_of

router = APIRouter(tags=["openai"], dependencies=[KeyDep])


@router.get("/v1/models")
def models(state: StateDep) -> ModelList:
    """The base, every variant, and every registered composition (with its members)."""
    names = [state.base_name, *state.store.names(), *state.compositions.names()]
    cards = [render.card(state, n, state.engine) for n in names]
    return ModelList(data=[c for c in cards if c is not None])


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, state: StateDep) -> ModelCard:
    """One model (the OpenAI client's `models.retrieve`); a variant's card carries its
    delta: method, rate, q, size, checksum and parent; a composition's its members."""
    resolve_model(state, model_id)
    card = render.card(state, model_id, state.engine)
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


@router.post("/v1/completions", response_model=None)
async def completions(
    req: CompletionRequest, request: Request, state: StateDep, ready: ReadyDep
) -> CompletionResponse | StreamingResponse:
    engine, _ = ready
    plan.check_options(req)
    target = await resolve(state, req.model)
    if req.max_tokens == 0 and not req.echo:
        raise APIError(
            400, "max_tokens 0 needs echo (it scores the prompt)", "max_tokens", "max_tokens"
        )
    prompts, texts = await plan.prompt_ids(state, engine, req.prompt)
    grammar = await grammar_of(state, engine, req)
    lp = req.logprobs
    plans = []
    for ids in prompts:
        budget = plan.max_tokens(state, engine, len(ids), req.max_tokens, plan.COMPLETION_DEFAULT)
        params = plan.params(state, engine, req, budget, lp, lp if req.echo else None, grammar)
        plans.append((ids, params))
    how = render.Render(False, req.echo, lp, tuple(texts))
    return await _serve(state, ready, request, req, target, plans, how)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    req: ChatCompletionRequest, request: Request, state: StateDep, ready: ReadyDep
) -> ChatCompletionResponse | StreamingResponse:
    engine, _ = ready
    plan.check_options(req)
    target = await resolve(state, req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "top_logprobs")
    wanted = req.max_completion_tokens or req.max_tokens
    which = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if wanted == 0:
        raise APIError(400, "max_tokens must be at least 1", "max_tokens", "max_tokens")
    ids = await plan.chat_ids(state, req.messages, generation=True)
    budget = plan.max_tokens(
        state, engine, len(ids), wanted, state.settings.max_new_tokens, "messages", which
    )
    lp = (req.top_logprobs or 0) if req.logprobs else None
    grammar = await grammar_of(state, engine, req)
    plans = [(ids, plan.params(state, engine, req, budget, lp, None, grammar))]
    return await _serve(state, ready, request, req, target, plans, render.Render(True, False, lp))


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, state: StateDep, ready: ReadyDep) -> TokenizeResponse:
    """vLLM's /tokenize: a prompt, or messages through the chat template."""
    engine, _ = ready
    if req.model is not None:
        resolve_model(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt or messages", "invalid_request", "prompt")
    if req.messages is not None:
        ids = await plan.chat_ids(state, req.messages, req.add_generation_prompt)
    else:
        text = req.prompt or ""
        plan.check_chars(state, len(text), "prompt")
        special = req.add_special_tokens
        ids = await state.tokenize(lambda tok: tok(text, add_special_tokens=special)["input_ids"])
    strs = await state.token_texts(ids) if req.return_token_strs else None
    limit = plan.max_model_len(state, engine)
    return TokenizeResponse(count=len(ids), max_model_len=limit, tokens=ids, token_strs=strs)


@router.post("/detokenize")
async def detokenize(
    req: DetokenizeRequest, state: StateDep, ready: ReadyDep
) -> DetokenizeResponse:
    engine, _ = ready
    if req.model is not None:
        resolve_model(state, req.model)
    plan.check_ids(req.tokens, plan.vocab(engine), "tokens")
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
        "model_max_length": plan.max_model_len(state, engine),
    }


async def _serve(
    state: AppState,
    ready: Any,
    request: Request,
    req: SamplingFields,
    target: Target | None,
    plans: list[tuple[list[int], SamplingParams]],
    how: render.Render,
) -> Any:
    """The door, every choice submitted, then the response or its stream."""
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
    target = await door(state, target, req.model, request)
    pending = render.Pending(target, plans, req.n, getattr(request.state, "request_id", ""))
    try:  # no await between the door and the queue: admin actions see this request
        for job in pending.jobs:
            scheduler.submit(job)
    except QueueFull as e:
        pending.cancel()  # the choices already queued are dropped at admission
        raise APIError(429, f"server busy: {e}", "queue_full", retry_after=1) from e
    fp = target.fingerprint if target is not None else base_fingerprint(state)
    rid = f"{'chatcmpl' if how.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    head = render.Head(rid, int(time.time()), req.model, fp, how.chat)
    texts = render.Texts(state)
    if req.stream:
        stream = render.stream(state, pending, head, req, how, texts)
        return StreamingResponse(stream, media_type="text/event-stream")
    jobs = await render.wait(pending, request)
    return await render.respond(state, jobs, head, req, how, texts)
