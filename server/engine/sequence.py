"""Per-choice state in the engines: prompt progress, generated tokens, incremental
detokenization, stop checks, log-probabilities, and what the choice's sampling needs
(its grammar's place too, for structured output: a choice whose grammar is complete
ends with finish_reason "stop")."""

from __future__ import annotations

import time
from typing import Any

from server.engine.job import Job, TokenLogprob
from server.engine.sampling import ChoiceSampling


def end_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a choice: the generation config's, else the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, list | tuple) else {int(ids)}


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
        self.sampling = ChoiceSampling.of(job.params, job.prompt_ids, eos)
        self.stop_ids = set(job.params.stop_token_ids)
        grammar = job.params.grammar
        self.grammar = grammar.matcher() if grammar is not None else None
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
    def prompt_logprobs_k(self) -> int:
        return self.job.params.prompt_logprobs or 0

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

    def add_prompt_logprobs(self, entries: list[TokenLogprob]) -> None:
        """The logprobs of the prompt tokens scored by a step (in prompt order)."""
        self.job.prompt_logprobs.extend(entries)

    def prompt_done(self) -> None:
        """The prompt is in the KV cache: with max_tokens 0 the choice ends here."""
        if not self.samples and not self.prefilling:
            self.finish("length")

    def add(self, token: int, entry: Any = None) -> None:
        """Take one generated token: detokenize, check stops and limits, emit text."""
        job = self.job
        if job.first_token is None:
            job.first_token = time.perf_counter()
        ends = (token in self.eos and not job.params.ignore_eos) or token in self.stop_ids
        if self.grammar is not None and not ends:
            self.grammar.advance(token)  # raises for a token the mask should have refused
        if ends:
            job.finish_reason = "stop"
            if entry is not None:  # as vLLM: the end token is scored, not in the text
                job.logprobs.append(entry)
            job.text += self._decode_next(final=True)
        else:
            self.ids.append(token)
            if entry is not None:
                job.logprobs.append(entry)
            job.completion_tokens += 1
            complete = self.grammar is not None and self.grammar.complete
            last = complete or len(self.ids) >= job.params.max_tokens
            text = job.text + self._decode_next(final=last)
            cut = -1
            if len(self.ids) > job.params.min_tokens:  # as vLLM: no stop before min_tokens
                cut = min(
                    (i for s in job.params.stop if (i := text.find(s, self._checked(s))) >= 0),
                    default=-1,
                )
            self._searched = len(text)
            if cut >= 0:
                text, job.finish_reason = text[:cut], "stop"
            elif complete:  # nothing but an end token could follow
                job.finish_reason = "stop"
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
