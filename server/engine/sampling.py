"""Sampling on the engine's device, batched over a step's rows.

One step's sampling is a `SamplingBatch`: its per-row parameters go to the device with
the step's other inputs (one copy, server/engine/transfer.py), `run` turns the step's
logits into one int64 tensor on the device (the tokens, and the log-probabilities the
requests asked for, as fp32 bits), and `read` unpacks that tensor once it is on the
host: that copy is the step's one designed device-to-host transfer.

The order is vLLM's: a constrained row's grammar (structured output, grammar.py) puts
-inf on the tokens it does not allow; `min_tokens` masks the end tokens; repetition,
frequency and presence penalties change the logits; then temperature, top_k, min_p and
top_p shape the distribution sampled from. A temperature below GREEDY_BELOW is greedy
(argmax after the penalties). Log-probabilities are those of the raw logits, before any
processing (vLLM's default, "raw_logprobs"): they score what the model says; for a
constrained row, those of its logits after the grammar's mask, as vLLM reports them (its
bitmask is applied to the logits before its sampler reads them): the distribution over
the tokens the row could take, which its tokens were drawn from.

A step with constrained rows sends their bitmask with its other inputs: the (C, W)
int32 words travel as (C, W / 2) int64 words in the step's one host-to-device copy
(transfer.py), so the step still moves one copy each way; a step without constrained
rows sends and computes nothing for them.

Random draws: each row draws one uniform number u from its choice's seed and its step
(a counter-based hash, computed on the host, so a seed gives the same tokens on every
device and in every batch), and takes the token where u falls in the cumulative
distribution (inverse transform). A request without a seed gets a random one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch

from server.engine.grammar import Matcher, fill_bitmask
from server.engine.job import SamplingParams, TokenLogprob
from server.engine.transfer import Packer

# Below this a temperature is greedy (as vLLM): dividing logits by it would overflow.
GREEDY_BELOW = 1e-5
LOGPROB_FLOOR = -9999.0  # vLLM's value for a logprob of -inf
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def _mix32(h: int) -> int:
    """A 32-bit integer hash (lowbias32): every output bit depends on every input bit."""
    h ^= h >> 16
    h = (h * 0x7FEB352D) & _M32
    h ^= h >> 15
    h = (h * 0x846CA68B) & _M32
    h ^= h >> 16
    return h


def uniform(seed: int, step: int) -> float:
    """A number in [0, 1) for (seed, step), exact in fp32 (24 bits)."""
    s = seed & _M64
    h = _mix32((s & _M32) ^ _mix32(((s >> 32) ^ _mix32(step & _M32)) & _M32))
    return (h >> 8) / float(1 << 24)


@dataclass(frozen=True)
class ChoiceSampling:
    """What one choice's sampling needs for its whole life (built at admission)."""

    params: SamplingParams
    seed: int
    ends: tuple[int, ...]  # masked until min_tokens: stop ids, and the end tokens unless ignored
    prompt: frozenset[int]  # the prompt's tokens (repetition penalty only)

    @classmethod
    def of(cls, params: SamplingParams, prompt_ids: list[int], eos: set[int]) -> ChoiceSampling:
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        if not -(1 << 63) <= seed < 1 << 64:
            raise ValueError(f"seed {seed} does not fit in 64 bits")
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else eos)
        prompt = frozenset(prompt_ids) if params.repetition_penalty != 1.0 else frozenset()
        return cls(params, seed, tuple(sorted(ends)), prompt)

    @property
    def greedy(self) -> bool:
        return self.params.temperature < GREEDY_BELOW

    def draw(self, generated: int) -> float:
        """The uniform number of the step that samples token `generated` (from 0)."""
        return uniform(self.seed, generated)


@dataclass(frozen=True)
class Row:
    """A step's row that samples: its logit row, its choice, its tokens so far."""

    logit_row: int
    choice: ChoiceSampling
    generated: list[int]
    grammar: Matcher | None = None  # structured output: the choice's place in its grammar


@dataclass(frozen=True)
class ScoreRows:
    """Logit rows [logit_row, logit_row + len(targets)) that score the prompt tokens
    `targets` (echo), with `k` alternatives each."""

    logit_row: int
    targets: list[int]
    k: int


def _bits(v: torch.Tensor) -> torch.Tensor:
    """fp32 values as int64 (their bits), to travel with the token ids."""
    return v.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)


def _floats(a: np.ndarray) -> list[float]:
    out: list[float] = a.astype(np.int32).view(np.float32).tolist()
    return out


class SamplingBatch:
    """The sampling of one step: rows that sample a token, rows that score a prompt."""

    def __init__(self, rows: list[Row], scores: list[ScoreRows], vocab: int) -> None:
        self.rows, self.scores, self.vocab = rows, scores, vocab
        ps = [r.choice.params for r in rows]
        self.random = any(not r.choice.greedy for r in rows)
        self.top_k = min(max((p.top_k for p in ps if 0 < p.top_k < vocab), default=0), vocab)
        self.top_p = any(p.top_p < 1.0 for p in ps)
        self.min_p = any(p.min_p > 0.0 for p in ps)
        self.repetition = any(p.repetition_penalty != 1.0 for p in ps)
        self.counted = any(p.frequency_penalty or p.presence_penalty for p in ps)
        self.constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
        self.masked = [
            (i, t)
            for i, r in enumerate(rows)
            if len(r.generated) < r.choice.params.min_tokens
            for t in r.choice.ends
            if t < vocab
        ]
        wants = [p.logprobs for p in ps if p.logprobs is not None]
        self.logprobs_k: int | None = min(max(wants), vocab) if wants else None
        self.score_k = min(max((s.k for s in scores), default=0), vocab)
        # the rows in logit order with nothing left out: the logits serve as they are
        self.identity = [r.logit_row for r in rows] == list(range(len(rows)))

    # ------------------------------------------------------------------ host -> device

    def pack(self, p: Packer) -> None:
        rows = self.rows
        p.ints("s.rows", [r.logit_row for r in rows])
        if self.constrained:
            words = fill_bitmask([r.grammar for r in rows if r.grammar is not None])  # (C, W)
            p.ints("s.constrained", self.constrained)
            p.ints("s.allowed", torch.from_numpy(words).view(torch.int64), (len(words), -1))
        if self.masked:
            p.ints("s.mask", [x for pair in self.masked for x in pair], (-1, 2))
        if self.repetition:
            seen = [
                (i, t)
                for i, r in enumerate(rows)
                if r.choice.params.repetition_penalty != 1.0
                for t in sorted(r.choice.prompt | set(r.generated))
            ]
            p.ints("s.seen", [x for pair in seen for x in pair], (-1, 2))
            p.floats("s.rep", [r.choice.params.repetition_penalty for r in rows])
        if self.counted:
            made = [
                (i, t)
                for i, r in enumerate(rows)
                if r.choice.params.frequency_penalty or r.choice.params.presence_penalty
                for t in r.generated
            ]
            p.ints("s.made", [x for pair in made for x in pair], (-1, 2))
            p.floats("s.freq", [r.choice.params.frequency_penalty for r in rows])
            p.floats("s.pres", [r.choice.params.presence_penalty for r in rows])
        if self.random:
            p.ints("s.greedy", [int(r.choice.greedy) for r in rows])
            temps = [1.0 if r.choice.greedy else r.choice.params.temperature for r in rows]
            p.floats("s.temperature", temps)
            p.floats("s.u", [r.choice.draw(len(r.generated)) for r in rows])
            if self.top_k:
                ks = [r.choice.params.top_k for r in rows]
                p.ints("s.top_k", [k if 0 < k < self.vocab else 0 for k in ks])
            if self.min_p:
                p.floats("s.min_p", [r.choice.params.min_p for r in rows])
            if self.top_p:
                p.floats("s.top_p", [r.choice.params.top_p for r in rows])
        if self.scores:
            p.ints(
                "s.score_rows",
                [s.logit_row + j for s in self.scores for j in range(len(s.targets))],
            )
            p.ints("s.targets", [t for s in self.scores for t in s.targets])

    # ------------------------------------------------------------------ on the device

    def run(self, logits: torch.Tensor, f: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (R, vocab) fp32 on the device -> one int64 tensor on the device:
        tokens (S,), then if logprobs: chosen (S,), top ids (S, k), top values (S, k),
        then if scores: chosen (Q,), top ids (Q, k), top values (Q, k)."""
        parts: list[torch.Tensor] = []
        if self.rows:
            whole = self.identity and logits.shape[0] == len(self.rows)
            raw = logits if whole else logits.index_select(0, f["s.rows"])
            if self.constrained:
                raw = _allow(raw, f["s.constrained"], f["s.allowed"])
            x = self._process(raw, f)
            token = x.argmax(-1)
            if self.random:
                token = torch.where(f["s.greedy"] != 0, token, self._draw(x, f))
            parts.append(token)
            if self.logprobs_k is not None:
                parts += _logprobs(raw, token, self.logprobs_k)
        if self.scores:
            scored = logits.index_select(0, f["s.score_rows"])
            parts += _logprobs(scored, f["s.targets"], self.score_k)
        if not parts:
            return torch.zeros(0, dtype=torch.int64, device=logits.device)
        return torch.cat(parts)

    def _process(self, raw: torch.Tensor, f: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw logits -> penalized logits (a copy when anything changes them)."""
        if not (self.masked or self.repetition or self.counted):
            return raw
        x = raw.clone()
        if self.masked:
            m = f["s.mask"]
            x.index_put_((m[:, 0], m[:, 1]), x.new_full((), float("-inf")))
        if self.repetition:
            s = f["s.seen"]
            seen = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
            seen.index_put_((s[:, 0], s[:, 1]), seen.new_ones(()))
            rp = f["s.rep"][:, None]
            x = torch.where(seen, torch.where(x > 0, x / rp, x * rp), x)
        if self.counted:
            m = f["s.made"]
            counts = torch.zeros_like(x)
            counts.index_put_((m[:, 0], m[:, 1]), torch.ones_like(m[:, 0], dtype=x.dtype), True)
            x = x - f["s.freq"][:, None] * counts - f["s.pres"][:, None] * (counts > 0)
        # an extreme penalty (1e-300) must not make inf or nan
        top = torch.finfo(x.dtype).max
        return torch.nan_to_num(x, nan=float("-inf"), posinf=top, neginf=float("-inf"))

    def _draw(self, x: torch.Tensor, f: dict[str, torch.Tensor]) -> torch.Tensor:
        """One token per row from softmax(x / temperature), shaped by top_k, min_p and
        top_p, at each row's uniform number (inverse transform)."""
        # shifted so the largest logit is 0: a small temperature cannot overflow to inf
        z = (x - x.max(-1, keepdim=True).values) / f["s.temperature"][:, None]
        if self.top_k:
            k = f["s.top_k"]
            kth = torch.topk(z, self.top_k).values.gather(1, (k.clamp(1, self.top_k) - 1)[:, None])
            kth = torch.where(k[:, None] > 0, kth, float("-inf"))
            z = z.masked_fill(z < kth, float("-inf"))
        probs = torch.softmax(z, dim=-1)
        if self.min_p:
            floor = f["s.min_p"][:, None] * probs.max(-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        if self.top_p:
            top_p = f["s.top_p"][:, None]
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # keeps the top token: its preceding mass is 0
            outside = (sorted_p.cumsum(-1) - sorted_p > top_p * sorted_p.sum(-1, keepdim=True)) & (
                top_p < 1.0
            )
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p.masked_fill(outside, 0.0))
        cdf = probs.cumsum(-1)
        target = f["s.u"][:, None] * cdf[:, -1:]
        token = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(self.vocab - 1)
        # rounding can land on a token of no mass at the end: take the likeliest instead
        ok = probs.gather(1, token[:, None])[:, 0] > 0
        return torch.where(ok, token, probs.argmax(-1))

    # ------------------------------------------------------------------ on the host

    def read(
        self, out: torch.Tensor
    ) -> tuple[list[tuple[int, TokenLogprob | None]], list[list[TokenLogprob]]]:
        """The host copy of `run`'s tensor -> per sampling row (token, its logprob entry
        or None), and per ScoreRows its entries."""
        a = out.numpy()
        s, at = len(self.rows), 0
        tokens = a[:s].tolist()
        at = s
        sampled: list[tuple[int, TokenLogprob | None]] = [(t, None) for t in tokens]
        if self.rows and self.logprobs_k is not None:
            entries, at = _entries(a, at, tokens, self.logprobs_k)
            for i, r in enumerate(self.rows):
                k = r.choice.params.logprobs
                if k is not None:
                    e = entries[i]
                    sampled[i] = (tokens[i], TokenLogprob(e.token, e.logprob, e.top[:k]))
        scored: list[list[TokenLogprob]] = []
        if self.scores:
            targets = [t for sc in self.scores for t in sc.targets]
            entries, at = _entries(a, at, targets, self.score_k)
            i = 0
            for sc in self.scores:
                n = len(sc.targets)
                scored.append(
                    [TokenLogprob(e.token, e.logprob, e.top[: sc.k]) for e in entries[i : i + n]]
                )
                i += n
        return sampled, scored


def _allow(x: torch.Tensor, rows: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x (S, V) with -inf on the tokens the constrained `rows` (C,) do not allow (a copy):
    `packed` (C, W / 2) int64 is their (C, W) int32 bitmask, bit t % 32 of word t // 32."""
    words = packed.view(torch.int32)  # (C, W)
    shifts = torch.arange(32, dtype=torch.int32, device=x.device)
    bits = (words[:, :, None] >> shifts) & 1  # (C, W, 32)
    refused = bits.reshape(words.shape[0], -1)[:, : x.shape[1]] == 0  # (C, V)
    picked = x.index_select(0, rows).masked_fill(refused, float("-inf"))
    return x.index_copy(0, rows, picked)


def _logprobs(raw: torch.Tensor, chosen: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The raw log-probability of `chosen` per row, and the k most likely (ids, values).
    A token a grammar forbids (-inf) reports LOGPROB_FLOOR, as vLLM (JSON has no -inf)."""
    lp = torch.log_softmax(raw.to(torch.float32), dim=-1).clamp_min(LOGPROB_FLOOR)
    parts = [_bits(lp.gather(1, chosen[:, None])[:, 0])]
    if k > 0:
        values, ids = torch.topk(lp, k, dim=-1)
        parts += [ids.flatten(), _bits(values.flatten())]
    return parts


def _entries(a: np.ndarray, at: int, tokens: list[int], k: int) -> tuple[list[TokenLogprob], int]:
    """Unpack what `_logprobs` packed for len(tokens) rows, from offset `at`."""
    n = len(tokens)
    chosen = _floats(a[at : at + n])
    at += n
    tops: list[tuple[tuple[int, float], ...]] = [()] * n
    if k > 0:
        ids = a[at : at + n * k].reshape(n, k).tolist()
        vals = np.asarray(_floats(a[at + n * k : at + 2 * n * k])).reshape(n, k).tolist()
        at += 2 * n * k
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids, vals, strict=True)]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops, strict=True)], at


def sample_on_host(
    batch: SamplingBatch, logits: torch.Tensor
) -> tuple[list[tuple[int, TokenLogprob | None]], list[list[TokenLogprob]]]:
    """Pack, run and read one batch over `logits` (wherever they live): one copy each way."""
    p = Packer()
    batch.pack(p)
    return batch.read(batch.run(logits, p.send(logits.device)).cpu())
