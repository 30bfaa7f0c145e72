"""One step's forward (server/engine/model_runner.py) against transformers on the same
weights: a prompt chunk, then decode rows of other sequences beside a second chunk;
logits within fp32 rounding of LlamaForCausalLM's, with and without a tied head."""

from __future__ import annotations

import pytest
import torch

from deltastore.testing import make_model, tiny_tokenizer
from server.engine.job import Job, SamplingParams
from server.engine.sequence import Sequence
from tests.server.engine.stepping import forward, nan_runner


def _hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_equal_transformers(tied):
    model = make_model(3, tie_word_embeddings=tied)
    want = {
        n: _hf_logits(model, p) for n, p in {"a": list(range(5, 19)), "b": [40, 41, 42]}.items()
    }
    cfg = model.config
    runner, how = nan_runner(model)
    tok = tiny_tokenizer()

    def seq(prompt: list[int], slot: int) -> Sequence:
        job = Job(None, prompt, SamplingParams(4, temperature=0.0), lambda k, p: None)
        return Sequence(job, slot, tok, {256})

    a, b = seq(list(range(5, 18)), 0), seq([40, 41, 42], 1)
    # step 1: a's prompt in two chunks, the first alone
    first = forward(runner, how, [], [(a, 9)])
    assert first.shape == (0, cfg.vocab_size)  # a mid-prompt chunk samples nothing
    a.prefilled = 9
    # step 2: the rest of a's prompt beside all of b's
    logits = forward(runner, how, [], [(a, 4), (b, 3)])
    torch.testing.assert_close(logits[0], want["a"][12], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], want["b"][2], atol=1e-4, rtol=1e-4)
    a.prefilled, b.prefilled = 13, 3
    # step 3: decode rows of both (a's next token as transformers would see it)
    a.ids.append(18)
    b.ids.append(43)
    logits = forward(runner, how, [a, b], [])
    torch.testing.assert_close(
        logits[0], _hf_logits(model, list(range(5, 19)))[13], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        logits[1], _hf_logits(model, [40, 41, 42, 43])[3], atol=1e-4, rtol=1e-4
    )
