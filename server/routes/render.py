"""What the worker sends back, rendered: each request's choices as submitted jobs
and the one queue of their events (`Pending`), the texts of echoed prompts and of
logprobs, and the response bodies: a whole response, or a stream of chunks (each with
the same head) ending in [DONE]. Model cards for /v1/models too.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from fastapi import Request

from deltastore.store import InvalidName
from server.compose import CompositionError
from server.engine.job import (
    Event,
    Finish,
    Job,
    JobError,
    Piece,
    SamplingParams,
    Target,
    TokenLogprob,
)
from server.errors import APIError, body
from server.routes import plan
from server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    ModelCard,
    SamplingFields,
    StreamChunk,
    TopLogprob,
    Usage,
)
from server.state import AppState


def card(state: AppState, name: str, engine: Any | None) -> ModelCard | None:
    """The card /v1/models shows for `name` (None: nothing to serve under it now)."""
    limit = plan.max_model_len(state, engine) if engine is not None else None
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
    except (FileNotFoundError, InvalidName):
        return None
    return ModelCard(
        id=name,
        created=created,
        root=name,
        parent=state.base_name,
        max_model_len=limit,
        composition=comp.describe() if comp is not None else None,
    )


@dataclass(frozen=True)
class Render:
    """How the choices of a request are rendered."""

    chat: bool
    echo: bool  # completions: the prompt's text (and logprobs) before the completion
    logprobs: int | None  # alternatives per token; None: no logprobs
    prompts: tuple[str | None, ...] = ()  # each prompt as sent (echo)


class Pending:
    """The submitted choices of one request (prompts x n, in choice order) and the one
    queue their events arrive on, tagged with the choice index (from the worker)."""

    def __init__(
        self, target: Target | None, plans: list[tuple[list[int], SamplingParams]], n: int, rid: str
    ) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, Event, Any]] = asyncio.Queue()
        self.jobs: list[Job] = []
        for ids, params in plans:
            for j in range(n):
                seeded = replace(params, seed=plan.choice_seed(params.seed, j))
                emit = self._emitter(loop, len(self.jobs))
                key = target.key if target is not None else None
                self.jobs.append(Job(key, ids, seeded, emit, rid, target=target))

    def _emitter(self, loop: asyncio.AbstractEventLoop, index: int) -> Any:
        def emit(kind: Event, payload: Any) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, payload))

        return emit

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()


def observe(state: AppState, job: Job) -> None:
    m = state.metrics
    m.prompt_tokens.inc(len(job.prompt_ids))
    m.generated_tokens.inc(job.completion_tokens)
    if job.first_token is not None:
        m.ttft_seconds.observe(job.first_token - job.enqueued)
    if job.finished is not None:
        m.e2e_seconds.observe(job.finished - job.enqueued)


def usage(jobs: list[Job], n: int) -> Usage:
    prompt = sum(len(j.prompt_ids) for j in jobs[::n])  # each prompt once, whatever n
    done = sum(j.completion_tokens for j in jobs)
    return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)


async def respond(
    state: AppState, jobs: list[Job], head: Head, req: SamplingFields, how: Render, texts: Texts
) -> ChatCompletionResponse | CompletionResponse:
    """The whole response of finished choices (499 if the client went away)."""
    for job in jobs:
        observe(state, job)
    if any(job.finish_reason == Finish.CANCELLED for job in jobs):
        raise APIError(499, "client disconnected", "cancelled")
    total = usage(jobs, req.n)
    if how.chat:
        chat_choices = []
        for i, job in enumerate(jobs):
            chat_lp = None
            if how.logprobs is not None:
                chat_lp = ChatLogprobs(content=await texts.chat(job.logprobs))
            message = AssistantMessage(content=job.text)
            chat_choices.append(
                ChatChoice(
                    index=i, message=message, finish_reason=job.finish_reason, logprobs=chat_lp
                )
            )
        return ChatCompletionResponse(**head.fields(), usage=total, choices=chat_choices)
    choices = []
    for i, job in enumerate(jobs):
        text, lp = job.text, None
        if how.echo:
            text = await texts.echo(how, i // req.n, job) + text
        if how.logprobs is not None:
            lp = await texts.completion(entries(job, how.echo), 0)
        choices.append(
            CompletionChoice(index=i, text=text, finish_reason=job.finish_reason, logprobs=lp)
        )
    return CompletionResponse(**head.fields(), usage=total, choices=choices)


def entries(job: Job, echo: bool, generated: bool = True) -> list[tuple[int, TokenLogprob | None]]:
    """(token, logprob entry) of a choice: the echoed prompt's (the first without one)
    when `echo`, then the generated tokens' unless not `generated`."""
    out: list[tuple[int, TokenLogprob | None]] = []
    if echo:
        out = list(zip(job.prompt_ids, job.prompt_logprobs, strict=False))
    if generated:
        out.extend((e.token, e) for e in job.logprobs)
    return out


class Texts:
    """Texts of a request's tokens: an echoed prompt's, and the logprobs' (labelled on
    the worker)."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def echo(self, render: Render, prompt: int, job: Job) -> str:
        """The echoed prompt: its text as sent, or the decoded ids it was sent as."""
        sent = render.prompts[prompt] if prompt < len(render.prompts) else None
        if sent is not None:
            return sent
        ids = job.prompt_ids
        return await self.state.tokenize(lambda tok: tok.decode(ids, skip_special_tokens=True))

    async def pieces(self, entries: list[tuple[int, TokenLogprob | None]]) -> dict[int, Piece]:
        """The texts of the tokens and alternatives of `entries`: as the worker labelled
        them, the rest (an echoed prompt's first token) from the same cache."""
        out: dict[int, Piece] = {}
        for _, e in entries:
            if e is not None:
                out.update(e.texts())
        missing = list(
            dict.fromkeys(
                t
                for token, e in entries
                for t in (token, *(a for a, _ in (e.top if e else ())))
                if t not in out
            )
        )
        if missing:
            out.update(zip(missing, await self.state.token_pieces(missing), strict=True))
        return out

    async def completion(
        self, entries: list[tuple[int, TokenLogprob | None]], offset: int
    ) -> CompletionLogprobs:
        strs = {t: p.text for t, p in (await self.pieces(entries)).items()}
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
        pieces = await self.pieces([(e.token, e) for e in entries])

        def one(token: int, logprob: float) -> TopLogprob:
            p = pieces[token]
            return TopLogprob(token=p.text, logprob=logprob, bytes=list(p.bytes))

        out = []
        for e in entries:
            first = one(e.token, e.logprob)
            tops = [one(t, lp) for t, lp in e.top]
            out.append(ChatTokenLogprob(**first.model_dump(), top_logprobs=tops))
        return out


async def wait(pending: Pending, request: Request) -> list[Job]:
    """Every finished choice; a client that disconnects first frees their slots. The
    first choice that fails fails the request (and cancels the others)."""

    async def done() -> list[Job]:
        left = len(pending.jobs)
        while left:
            _, kind, payload = await pending.events.get()
            if kind == Event.DONE:
                left -= 1
            elif kind == Event.ERROR:
                pending.cancel()
                error: JobError = payload
                raise APIError(error.status, error.message, error.code, None, error.retry_after)
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
class Head:
    """What a response and every chunk of a stream repeat."""

    id: str
    created: int
    model: str
    fingerprint: str | None
    chat: bool

    def fields(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    @functools.cached_property
    def _text_prefix(self) -> str:
        """`data: {...,"choices":[` of every chunk of this stream."""
        empty = self.chunk([])
        assert empty.endswith('"choices":[]}\n\n'), empty
        return empty[: -len("]}\n\n")]

    def text_chunk(self, index: int, text: str) -> str:
        """The chunk of a choice's text with no logprobs and no finish reason (most of a
        stream): the bytes `chunk` makes, written without building the models (it runs
        once per token per stream on the event loop, beside the step for the GIL)."""
        if self.chat:
            choice: dict[str, Any] = {"index": index, "delta": {"content": text}}
        else:
            choice = {"index": index, "text": text}
        choice["finish_reason"] = None
        choice["logprobs"] = None
        data = json.dumps(choice, ensure_ascii=False, separators=(",", ":"))
        return f"{self._text_prefix}{data}]}}\n\n"

    def chunk(
        self, choices: list[CompletionChoice | ChatStreamChoice], usage: Usage | None = None
    ) -> str:
        obj: Literal["chat.completion.chunk", "text_completion"] = (
            "chat.completion.chunk" if self.chat else "text_completion"
        )
        return StreamChunk(**self.fields(), object=obj, choices=choices, usage=usage).sse()


async def stream(
    state: AppState,
    pending: Pending,
    head: Head,
    req: SamplingFields,
    render: Render,
    texts: Texts,
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
        finish: Finish | None,
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
            lp = await texts.completion(entries(job, True, generated=False), 0)
            offset[i] = sum(len(t) for t in lp.tokens)
        return head.chunk([choice(i, text, None, lp)])

    try:
        if render.chat:  # the role first, as OpenAI
            yield head.chunk([choice(i, None, None, None, first=True) for i in range(len(jobs))])
        started = [not render.echo] * len(jobs)
        left = len(jobs)
        while left:
            i, kind, payload = await pending.events.get()
            if not started[i] and kind in (Event.TEXT, Event.DONE):
                started[i] = True
                yield await echo(i)
            if kind == Event.LOGPROBS:
                ready[i] = payload
            elif kind == Event.TEXT:
                if render.logprobs is None and payload:
                    yield head.text_chunk(i, payload)
                else:
                    yield head.chunk([choice(i, payload, None, await logprobs(i, ready[i]))])
            elif kind == Event.ERROR:
                pending.cancel()
                status, message, code = payload.status, payload.message, payload.code
                message = f"{message} (request id {jobs[i].request_id})"
                yield f"data: {json.dumps(body(status, message, code))}\n\n"
                break
            elif kind == Event.DONE:
                left -= 1
                observe(state, jobs[i])
                rest = await logprobs(i, len(jobs[i].logprobs))
                yield head.chunk([choice(i, None, jobs[i].finish_reason, rest)])
        else:
            if req.include_usage:
                yield head.chunk([], usage(jobs, req.n))
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream: free the slots
            pending.cancel()
