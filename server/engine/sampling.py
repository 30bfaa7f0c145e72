"""One choice's sampler: logits processors, the token choice, log-probabilities.

The order is vLLM's: `min_tokens` masks the end tokens; repetition, frequency and
presence penalties change the raw logits; then temperature, min_p, top_k and top_p
shape the distribution sampled from. A temperature below GREEDY_BELOW is greedy
(argmax after the penalties). Log-probabilities are those of the raw logits, before
any processing (vLLM's default, "raw_logprobs"): they score what the model says.
"""

from __future__ import annotations

import torch

from server.engine.job import SamplingParams, TokenLogprob

# Below this a temperature is greedy (as vLLM): dividing logits by it would overflow.
GREEDY_BELOW = 1e-5


class Sampler:
    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos: set[int]) -> None:
        self.params = params
        self.counts: dict[int, int] = {}  # generated tokens (penalties)
        self.prompt = set(prompt_ids) if params.repetition_penalty != 1.0 else set()
        self.ends = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else eos))
        self.generator: torch.Generator | None = None
        if params.temperature >= GREEDY_BELOW:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def observe(self, token: int) -> None:
        """A token was generated (the penalties count it)."""
        self.counts[token] = self.counts.get(token, 0) + 1

    def process(self, logits: torch.Tensor, generated: int) -> torch.Tensor:
        """Raw (vocab,) fp32 logits -> penalized logits (a copy when changed)."""
        p = self.params
        x = logits
        if generated < p.min_tokens and self.ends:
            x = x.clone()
            ends = torch.tensor(self.ends, dtype=torch.int64)
            x[ends[ends < x.numel()]] = float("-inf")
        if p.repetition_penalty != 1.0 and (self.prompt or self.counts):
            x = x.clone() if x is logits else x
            seen = torch.tensor(sorted(self.prompt | self.counts.keys()), dtype=torch.int64)
            v = x[seen]
            x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and self.counts:
            x = x.clone() if x is logits else x
            ids = torch.tensor(list(self.counts), dtype=torch.int64)
            n = torch.tensor(list(self.counts.values()), dtype=x.dtype)
            x[ids] -= p.frequency_penalty * n + p.presence_penalty
        if x is not logits:  # an extreme penalty (1e-300) must not make inf or nan
            top = torch.finfo(x.dtype).max
            x = torch.nan_to_num(x, nan=float("-inf"), posinf=top, neginf=float("-inf"))
        return x

    def pick(self, logits: torch.Tensor, generated: int) -> int:
        """One token from raw (vocab,) fp32 logits, `generated` tokens into the choice."""
        p = self.params
        x = self.process(logits, generated)
        if self.generator is None:
            return int(x.argmax())
        # shifted so the largest logit is 0: a small temperature cannot overflow to inf
        x = (x - x.max()) / p.temperature
        if p.top_k > 0 and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p > p.top_p * sorted_p.sum()  # keeps the top
            sorted_p[outside] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s log-probability under raw (vocab,) logits, with the k most likely."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        values, ids = torch.topk(lp, min(k, lp.numel()))
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(lp[token]), top)


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], k: int) -> list[TokenLogprob]:
    """Rows (T, vocab) of logits at T prompt positions -> the logprob of the token that
    follows each position (`next_ids`, T of them), with the k most likely."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(next_ids, dtype=torch.int64)
    chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
    if k > 0:
        values, top_ids = torch.topk(lp, min(k, lp.shape[1]), dim=-1)
        tops = [
            tuple(zip(i, v, strict=True))
            for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)
        ]
    else:
        tops = [()] * len(next_ids)
    return [TokenLogprob(t, c, top) for t, c, top in zip(next_ids, chosen, tops, strict=True)]
