"""Per-choice state in the engines: prompt progress, generated tokens, incremental
detokenization, stop checks, log-probabilities, and the choice's own sampler."""

from __future__ import annotations

import time
from typing import Any

import torch

from server.engine.job import Job
from server.engine.sampling import Sampler, prompt_logprobs, token_logprob


class Sequence:
    def __init__(self, job: Job, slot: int, tokenizer: Any, eos: set[int]) -> None:
        self.job, self.slot, self.tokenizer, self.eos = job, slot, tokenizer, eos
        self.variant = job.variant
        self.prompt = job.prompt_ids
        self.prefilled = 0  # prompt tokens whose KV is in the slot
        self.ids: list[int] = []  # generated tokens (without a final end token)
        self.sent = 0  # characters already emitted
        self.holdback = max((len(s) for s in job.params.stop), default=1) - 1
        self._prefix = self._read = 0  # incremental detokenization offsets
        self._searched = 0  # characters of text already searched for stop strings
        self.sampler = Sampler(job.params, job.prompt_ids, eos)
        self.stop_ids = set(job.params.stop_token_ids)
        if job.params.prompt_logprobs is not None and not job.prompt_logprobs:
            job.prompt_logprobs.append(None)  # the first token has no context

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def samples(self) -> bool:
        """Whether the step that ends the prompt samples a token (not with max_tokens 0)."""
        return self.job.params.max_tokens > 0

    @property
    def scores_prompt(self) -> bool:
        return self.job.params.prompt_logprobs is not None

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

    def score_prompt(self, logits: torch.Tensor, position: int) -> None:
        """Logits (T, vocab) at prompt positions position.. -> the logprobs of the prompt
        tokens that follow them."""
        next_ids = self.prompt[position + 1 : position + 1 + logits.shape[0]]
        k = self.job.params.prompt_logprobs or 0
        self.job.prompt_logprobs.extend(prompt_logprobs(logits[: len(next_ids)], next_ids, k))

    def prompt_done(self) -> None:
        """The prompt is in the KV cache: with max_tokens 0 the choice ends here."""
        if not self.samples and not self.prefilling:
            self.finish("length")

    def sample(self, logits: torch.Tensor) -> None:
        """Choose the next token from raw (vocab,) fp32 logits and take it."""
        token = self.sampler.pick(logits, len(self.ids))
        k = self.job.params.logprobs
        entry = token_logprob(logits, token, k) if k is not None else None
        self.add(token, entry)

    def add(self, token: int, entry: Any = None) -> None:
        """Take one generated token: detokenize, check stops and limits, emit text."""
        job = self.job
        if job.first_token is None:
            job.first_token = time.perf_counter()
        if (token in self.eos and not job.params.ignore_eos) or token in self.stop_ids:
            job.finish_reason = "stop"
            if entry is not None:  # as vLLM: the end token is scored, not in the text
                job.logprobs.append(entry)
            job.text += self._decode_next(final=True)
        else:
            self.ids.append(token)
            self.sampler.observe(token)
            if entry is not None:
                job.logprobs.append(entry)
            job.completion_tokens += 1
            text = job.text + self._decode_next(final=len(self.ids) >= job.params.max_tokens)
            cut = -1
            if len(self.ids) > job.params.min_tokens:  # as vLLM: no stop before min_tokens
                cut = min(
                    (i for s in job.params.stop if (i := text.find(s, self._checked(s))) >= 0),
                    default=-1,
                )
            self._searched = len(text)
            if cut >= 0:
                text, job.finish_reason = text[:cut], "stop"
            elif len(self.ids) >= job.params.max_tokens:
                job.finish_reason = "length"
            job.text = text
        self.flush()

    def _checked(self, stop: str) -> int:
        """Where to search for `stop`: new text, and the end of the old text it may
        start in."""
        return max(self._searched - len(stop) + 1, 0)

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
            if self.job.params.logprobs is not None:  # the entries this text carries
                self.job.emit("logprobs", len(self.job.logprobs))
            self.job.emit("text", text[self.sent : end])
            self.sent = end

    def finish(self, reason: str) -> None:
        if self.job.finish_reason is None:
            self.job.finish_reason = reason
        self.flush()
