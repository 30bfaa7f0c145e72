"""Per-choice state in the engine: prompt progress, generated tokens, text (one
incremental detokenizer, detokenizer.py), stop checks, log-probabilities (labelled with
their tokens' texts), and what the choice's sampling needs (its grammar's place too,
for structured output: a choice whose grammar is complete ends with finish_reason
"stop")."""

from __future__ import annotations

import time
from typing import Any

from server.engine.detokenizer import TokenTexts
from server.engine.job import Event, Finish, Job, TokenLogprob
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
    def __init__(
        self, job: Job, slot: int, tokenizer: Any, eos: set[int], texts: TokenTexts | None = None
    ) -> None:
        self.job, self.slot, self.tokenizer, self.eos = job, slot, tokenizer, eos
        self.texts = texts if texts is not None else TokenTexts(tokenizer)  # the engine's
        self.detokenizer = self.texts.detokenizer()
        self.variant = job.variant
        self.prompt = job.prompt_ids
        self.prefilled = 0  # prompt tokens whose KV is in the slot
        self.ids: list[int] = []  # generated tokens (without a final end token)
        self.sent = 0  # characters already emitted
        self.holdback = max((len(s) for s in job.params.stop), default=1) - 1
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
        self.job.prompt_logprobs.extend(self.texts.label(e) for e in entries)

    def prompt_done(self) -> None:
        """The prompt is in the KV cache: with max_tokens 0 the choice ends here."""
        if not self.samples and not self.prefilling:
            self.finish(Finish.LENGTH)

    def add(self, token: int, entry: Any = None) -> None:
        """Take one generated token: detokenize, check stops and limits, emit text."""
        job = self.job
        if job.first_token is None:
            job.first_token = time.perf_counter()
        ends = (token in self.eos and not job.params.ignore_eos) or token in self.stop_ids
        if self.grammar is not None and not ends:
            self.grammar.advance(token)  # raises for a token the mask should have refused
        if ends:
            job.finish_reason = Finish.STOP
            if entry is not None:  # as vLLM: the end token is scored, not in the text
                job.logprobs.append(self.texts.label(entry))
            job.text += self.detokenizer.add(None, final=True)
        else:
            self.ids.append(token)
            if entry is not None:
                job.logprobs.append(self.texts.label(entry))
            job.completion_tokens += 1
            complete = self.grammar is not None and self.grammar.complete
            last = complete or len(self.ids) >= job.params.max_tokens
            text = job.text + self.detokenizer.add(token, last)
            cut = -1
            if len(self.ids) > job.params.min_tokens:  # as vLLM: no stop before min_tokens
                cut = min(
                    (i for s in job.params.stop if (i := text.find(s, self._checked(s))) >= 0),
                    default=-1,
                )
            self._searched = len(text)
            if cut >= 0:
                text, job.finish_reason = text[:cut], Finish.STOP
            elif complete:  # nothing but an end token could follow
                job.finish_reason = Finish.STOP
            elif len(self.ids) >= job.params.max_tokens:
                job.finish_reason = Finish.LENGTH
            job.text = text
        self.flush()

    def _checked(self, stop: str) -> int:
        """Where to search for `stop`: new text, and the end of the old text it may
        start in."""
        return max(self._searched - len(stop) + 1, 0)

    def flush(self) -> None:
        text = self.job.text
        end = len(text) if self.done else len(text) - self.holdback
        if end > self.sent:
            if self.job.params.logprobs is not None:  # the entries this text carries
                self.job.emit(Event.LOGPROBS, len(self.job.logprobs))
            self.job.emit(Event.TEXT, text[self.sent : end])
            self.sent = end

    def finish(self, reason: Finish) -> None:
        if self.job.finish_reason is None:
            self.job.finish_reason = reason
        self.flush()
