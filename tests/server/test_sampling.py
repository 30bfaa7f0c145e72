"""The sampler on its own: processors in vLLM's order, extreme values stay finite."""

from __future__ import annotations

import torch

from server.engine.job import SamplingParams
from server.engine.sampling import Sampler, prompt_logprobs, token_logprob


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 3


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
                s = Sampler(p, [1, 2, 3], {0})
                for step in range(4):
                    token = s.pick(_logits(step), step)
                    assert 0 <= token < 64
                    s.observe(token)


def test_min_tokens_masks_end_and_stop_tokens_only_until_reached():
    x = torch.full((10,), -5.0)
    x[7], x[4] = 10.0, 9.0  # 7 is an end token, 4 a stop token id
    s = Sampler(SamplingParams(8, temperature=0.0, min_tokens=2, stop_token_ids=(4,)), [1], {7})
    assert s.pick(x, 0) not in (4, 7) and s.pick(x, 1) not in (4, 7)
    assert s.pick(x, 2) == 7
    ignored = Sampler(SamplingParams(8, temperature=0.0, min_tokens=2, ignore_eos=True), [1], {7})
    assert ignored.pick(x, 0) == 7  # ignore_eos: the end token is an ordinary token


def test_one_candidate_left_is_greedy_and_logprobs_are_raw():
    x = _logits(1)
    for opts in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-9}):
        s = Sampler(SamplingParams(8, temperature=1.7, seed=5, **opts), [], set())
        assert s.pick(x, 0) == int(x.argmax()), opts
    entry = token_logprob(x, 3, 2)
    lp = torch.log_softmax(x, -1)
    assert entry.logprob == float(lp[3]) and entry.top[0] == (int(lp.argmax()), float(lp.max()))
    rows = prompt_logprobs(torch.stack([x, _logits(2)]), [5, 6], 0)
    assert [r.token for r in rows] == [5, 6] and rows[1].logprob == float(
        torch.log_softmax(_logits(2), -1)[6]
    )
