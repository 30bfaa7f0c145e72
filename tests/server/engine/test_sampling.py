"""The batched sampler (server/engine/sampling.py): processors in vLLM's order, extreme
values stay finite, rows never see each other's parameters, a seed gives the same
tokens alone or in a batch, and draws follow the distribution."""

from __future__ import annotations

import math

import torch

from server.engine.job import SamplingParams
from server.engine.sampling import (
    ChoiceSampling,
    Row,
    SamplingBatch,
    ScoreRows,
    sample_on_host,
    uniform,
)

V = 64


def _logits(seed: int = 0, n: int = V) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def _pick(params: SamplingParams, logits: torch.Tensor, generated: list[int], prompt=(), eos=()):
    """One row sampled alone: (token, logprob entry)."""
    choice = ChoiceSampling.of(params, list(prompt), set(eos))
    batch = SamplingBatch([Row(0, choice, generated)], [], logits.shape[-1])
    return sample_on_host(batch, logits[None])[0][0]


def test_extreme_penalties_never_make_nan():
    for rp in (5e-324, 1e-300, 100.0):
        for fp in (-2.0, 2.0):
            for t in (0.0, 1e-6, 1.0, 2.0):
                p = SamplingParams(
                    8,
                    temperature=t,
                    repetition_penalty=rp,
                    frequency_penalty=fp,
                    presence_penalty=-fp,
                    seed=3,
                    top_k=5,
                    min_p=0.5,
                    top_p=0.3,
                )
                generated: list[int] = []
                for step in range(4):
                    token, _ = _pick(p, _logits(step), generated, prompt=[1, 2, 3], eos=[0])
                    assert 0 <= token < V
                    generated.append(token)


def test_min_tokens_masks_end_and_stop_tokens_only_until_reached():
    x = torch.full((10,), -5.0)
    x[7], x[4] = 10.0, 9.0  # 7 is an end token, 4 a stop token id
    p = SamplingParams(8, temperature=0.0, min_tokens=2, stop_token_ids=(4,))
    assert _pick(p, x, [], eos=[7])[0] not in (4, 7)
    assert _pick(p, x, [1], eos=[7])[0] not in (4, 7)
    assert _pick(p, x, [1, 2], eos=[7])[0] == 7
    ignored = SamplingParams(8, temperature=0.0, min_tokens=2, ignore_eos=True)
    assert _pick(ignored, x, [], eos=[7])[0] == 7  # ignore_eos: an ordinary token


def test_one_candidate_left_is_greedy_and_logprobs_are_raw():
    x = _logits(1)
    for opts in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-9}):
        token, _ = _pick(SamplingParams(8, temperature=1.7, seed=5, **opts), x, [])
        assert token == int(x.argmax()), opts
    token, entry = _pick(SamplingParams(8, temperature=1.7, seed=5, logprobs=2), x, [])
    lp = torch.log_softmax(x, -1)
    assert entry is not None and entry.token == token
    assert math.isclose(entry.logprob, float(lp[token]), rel_tol=1e-6)
    assert entry.top[0][0] == int(lp.argmax()) and math.isclose(entry.top[0][1], float(lp.max()))
    assert len(entry.top) == 2
    batch = SamplingBatch([], [ScoreRows(0, [5, 6], 0)], V)
    _, scored = sample_on_host(batch, torch.stack([x, _logits(2)]))
    rows = scored[0]
    assert [r.token for r in rows] == [5, 6] and rows[1].top == ()
    assert math.isclose(rows[1].logprob, float(torch.log_softmax(_logits(2), -1)[6]), rel_tol=1e-6)


def test_rows_keep_their_own_parameters_in_a_batch():
    """Each row of a mixed batch gets what it would get alone: greedy beside random,
    different top_k / penalties / logprobs / min_tokens per row, score rows after."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, V, generator=g) * 2
    params = [
        SamplingParams(8, temperature=0.0),
        SamplingParams(8, temperature=0.9, seed=11, top_k=4, logprobs=3),
        SamplingParams(8, temperature=1.3, seed=12, top_p=0.5, repetition_penalty=1.3),
        SamplingParams(8, temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5),
        SamplingParams(8, temperature=0.7, seed=13, min_p=0.2, min_tokens=5),
    ]
    generated = [[1, 2], [], [3, 3, 9], [int(logits[3].argmax())] * 2, [4]]
    choices = [ChoiceSampling.of(p, [5, 6], {0}) for p in params]
    rows = [Row(i, c, g_) for i, (c, g_) in enumerate(zip(choices, generated, strict=True))]
    scores = [ScoreRows(5, [7], 2)]
    together, scored = sample_on_host(SamplingBatch(rows, scores, V), logits)
    for i, r in enumerate(rows):
        alone = sample_on_host(
            SamplingBatch([Row(0, r.choice, r.generated)], [], V), logits[i : i + 1]
        )
        assert together[i] == alone[0][0], i
    assert together[0][0] == int(logits[0].argmax()) and together[0][1] is None
    assert together[1][1] is not None and len(together[1][1].top) == 3
    assert together[3][0] != int(logits[3].argmax())  # its frequency penalty moved it off
    assert together[4][0] != 0  # the end token is masked before min_tokens
    assert scored[0][0].token == 7 and len(scored[0][0].top) == 2


def test_draws_follow_the_distribution_and_seeds_repeat():
    """Over many steps of one seeded row, each token is drawn about as often as its
    probability says (top-k applied); a seed repeats its tokens exactly."""
    x = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -8.0])
    p = SamplingParams(8, temperature=1.0, seed=99, top_k=4)
    probs = torch.softmax(torch.where(torch.arange(6) < 4, x, float("-inf")), -1)
    n = 4000
    choice = ChoiceSampling.of(p, [], set())
    rows = [Row(i, choice, [0] * i) for i in range(n)]  # step i of the same choice
    sampled, _ = sample_on_host(SamplingBatch(rows, [], 6), x.expand(n, 6).contiguous())
    counts = torch.bincount(torch.tensor([t for t, _ in sampled]), minlength=6).double() / n
    assert counts[4] == 0 and counts[5] == 0  # outside the top 4
    assert torch.allclose(counts, probs.double(), atol=0.03), (counts, probs)
    again, _ = sample_on_host(SamplingBatch(rows[:50], [], 6), x.expand(50, 6).contiguous())
    assert again == sampled[:50]
    other = ChoiceSampling.of(SamplingParams(8, temperature=1.0, seed=100, top_k=4), [], set())
    rows2 = [Row(i, other, [0] * i) for i in range(50)]
    assert sample_on_host(SamplingBatch(rows2, [], 6), x.expand(50, 6).contiguous())[0] != again


def test_uniform_is_in_range_and_spread():
    us = [uniform(s, k) for s in (0, 1, -1, 2**63 - 1) for k in range(500)]
    assert all(0.0 <= u < 1.0 for u in us)
    assert abs(sum(us) / len(us) - 0.5) < 0.03
    assert len(set(us)) > 0.99 * len(us)
