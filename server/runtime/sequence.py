"""Per-request state in the engine: prompt progress, generated tokens, incremental
detokenization, stop checks, and the request's own sampler."""

from __future__ import annotations

import time
from typing import Any

import torch

from server.generate import Job, pick_token


class Sequence:
    def __init__(self, job: Job, slot: int, tokenizer: Any, eos: set[int]) -> None:
        self.job, self.slot, self.tokenizer, self.eos = job, slot, tokenizer, eos
        self.variant = job.variant
        self.prompt = job.prompt_ids
        self.prefilled = 0  # prompt tokens whose KV is in the slot
        self.ids: list[int] = []  # generated tokens (without a final eos)
        self.sent = 0  # characters already emitted
        self.holdback = max((len(s) for s in job.params.stop), default=1) - 1
        self._prefix = self._read = 0  # incremental detokenization offsets
        self.generator: torch.Generator | None = None
        if job.params.temperature > 0:
            seed = job.params.seed
            self.generator = torch.Generator()
            self.generator.manual_seed(seed if seed is not None else torch.seed())

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def length(self) -> int:
        """Positions written to the KV slot so far (after the step that wrote them)."""
        return self.prefilled + len(self.ids)

    @property
    def last_token(self) -> int:
        return self.ids[-1] if self.ids else self.prompt[-1]

    @property
    def done(self) -> bool:
        return self.job.finish_reason is not None

    @property
    def remaining(self) -> int:
        return max(self.job.params.max_tokens - len(self.ids), 0)

    def pick(self, logits: torch.Tensor) -> int:
        """One token from (vocab,) fp32 logits with this request's parameters."""
        return pick_token(logits, self.job.params, self.generator)

    def add(self, token: int) -> None:
        """Take one generated token: detokenize, check stops and limits, emit text."""
        job = self.job
        if job.first_token is None:
            job.first_token = time.perf_counter()
        if token in self.eos and not job.params.ignore_eos:
            job.finish_reason = "stop"
            job.text += self._decode_next(final=True)
        else:
            self.ids.append(token)
            job.completion_tokens += 1
            text = job.text + self._decode_next(final=len(self.ids) >= job.params.max_tokens)
            cut = min((i for s in job.params.stop if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                text, job.finish_reason = text[:cut], "stop"
            elif len(self.ids) >= job.params.max_tokens:
                job.finish_reason = "length"
            job.text = text
        self.flush()

    def _decode_next(self, final: bool = False) -> str:
        """Text the newest tokens add (a window of earlier tokens gives context, so
        multi-token characters and leading spaces come out as a full decode would).
        An incomplete character waits for the next token, unless this is the last."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> None:
        text = self.job.text
        end = len(text) if self.done else len(text) - self.holdback
        if end > self.sent:
            self.job.emit("text", text[self.sent : end])
            self.sent = end

    def finish(self, reason: str) -> None:
        if self.job.finish_reason is None:
            self.job.finish_reason = reason
        self.flush()
