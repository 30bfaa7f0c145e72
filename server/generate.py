"""Batched generation for requests of one variant: left-padded prefill, then one
token per step for every row, with each request's own sampling, stop strings and
token limit. Text streams out as it is decoded; a cancelled request stops at the
next step."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)


# Below this a temperature is greedy (as vLLM): dividing logits by it would overflow.
GREEDY_BELOW = 1e-5


def pick_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from (vocab,) logits: greedy at temperature 0, else top-p sampling."""
    if p.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    # shifted so the largest logit is 0: a small temperature cannot overflow to inf
    probs = torch.softmax((logits - logits.max()) / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > p.top_p  # always keeps the top token
        sorted_p[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True)
class JobError:
    """Why a request failed, in words safe to show its client (never exception text:
    that goes to the log, under the request id)."""

    message: str
    status: int = 500
    code: str = "generation_failed"


INTERNAL = JobError("generation failed on an internal error")
UNAVAILABLE = JobError(
    "the server cannot verify its resident weights and refuses to serve", 503, "weights_unavailable"
)


@dataclass(eq=False)
class Job:
    """One request, as the worker sees it. `emit` is thread-safe (it hands events to
    the request's event loop): ("text", str) while generating, then ("done", Job),
    or ("error", JobError)."""

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


class _Row:
    def __init__(self, job: Job, tokenizer: Any, eos: set[int], device: torch.device) -> None:
        self.job, self.tokenizer, self.eos = job, tokenizer, eos
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.holdback = max((len(s) for s in job.params.stop), default=1) - 1
        self.generator = None
        if job.params.temperature > 0:
            self.generator = torch.Generator(device)
            seed = job.params.seed
            self.generator.manual_seed(seed if seed is not None else torch.seed())

    @property
    def done(self) -> bool:
        return self.job.finish_reason is not None

    def pick(self, logits: torch.Tensor) -> int:
        return pick_token(logits, self.job.params, self.generator)

    def add(self, token: int) -> None:
        job = self.job
        if job.first_token is None:
            job.first_token = time.perf_counter()
        if job.cancelled.is_set():
            job.finish_reason = "cancelled"
            return
        if token in self.eos and not job.params.ignore_eos:
            job.finish_reason = "stop"
        else:
            self.ids.append(token)
            job.completion_tokens += 1
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            cut = min((i for s in job.params.stop if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                text, job.finish_reason = text[:cut], "stop"
            elif len(self.ids) >= job.params.max_tokens:
                job.finish_reason = "length"
            job.text = text
        self._flush()

    def _flush(self) -> None:
        text = self.job.text
        end = len(text) if self.done else len(text) - self.holdback
        if not self.done and text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        if end > self.sent:
            self.job.emit("text", text[self.sent : end])
            self.sent = end


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, jobs: list[Job], device: torch.device) -> None:
    """Run `jobs` (one variant) to completion; each finishes on its own."""
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    rows = [_Row(j, tokenizer, eos, device) for j in jobs]
    width = max(len(j.prompt_ids) for j in jobs)
    ids = torch.full((len(jobs), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(jobs), width), dtype=torch.int64)
    for i, j in enumerate(jobs):  # left padding: every row's last token is at -1
        ids[i, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
        mask[i, width - len(j.prompt_ids) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
    for _ in range(max(j.params.max_tokens for j in jobs)):
        logits = out.logits[:, -1, :].float()
        step = torch.full((len(jobs), 1), pad, dtype=torch.int64)
        for i, row in enumerate(rows):
            if not row.done:
                try:  # a row that fails ends alone, never its neighbours
                    token = row.pick(logits[i])
                    row.add(token)
                except Exception:
                    log.exception("request %s failed while sampling", row.job.request_id)
                    row.job.finish_reason = "error"
                    row.job.emit("error", INTERNAL)
                    continue
                step[i, 0] = token
        if all(r.done for r in rows):
            break
        mask = torch.cat([mask, torch.ones((len(jobs), 1), dtype=mask.dtype, device=device)], 1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=step.to(device),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=out.past_key_values,
        )


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, list | tuple) else {int(ids)}
