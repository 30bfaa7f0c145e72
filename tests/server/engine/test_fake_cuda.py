"""Engine v2's step on device "cuda", traced without a GPU (tests/server/engine/fake_cuda.py),
for a Llama (tied and untied head) and the families whose forward differs most (Gemma 2's
soft-capped attention and sandwich norms, Gemma 3's per-head norms and two ropes, Phi-3's
fused checkpoint tensors, Qwen2's biases): a prompt chunk, decode rows of nine variants
and the base, one variant merged in place beside them, the embedding and head deltas,
vector deltas, and sampling with every processor, logprobs and prompt scoring, rows held
to a grammar (structured output) among them. Every tensor of the step is on the device
(a mix raises), no op depends on data for its shape (that raises too), and the step
moves one copy in and one copy out, with no other host read of a device value: the
constrained rows' token bitmask travels in the step's one copy in."""

from __future__ import annotations

import math

import pytest
import torch

from deltastore.apply import FlatWeights, apply_delta_, bind, revert_delta_
from deltastore.format import Delta, DeltaMeta, TensorDelta
from deltastore.testing import family_model
from server.engine.batch import Packing, pack
from server.engine.grammar import GrammarKind, Grammars
from server.engine.job import Job, SamplingParams
from server.engine.kv_cache import KVCache
from server.engine.model_runner import ModelRunner
from server.engine.sequence import Sequence
from server.engine.sparse import VariantLayout, layout_variant
from tests.conftest import make_model, tiny_tokenizer
from tests.server.engine.fake_cuda import CUDA, fake_cuda

N_VARIANTS = 9


def random_delta(model: torch.nn.Module, seed: int, density: float = 0.05) -> Delta:
    """A delta over every parameter of `model` (matrices, norms, the embedding)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in model.named_parameters():
        k = max(int(p.numel() * density), 1)
        pos = torch.randperm(p.numel(), generator=g)[:k].sort().values
        vals = (torch.randn(k, generator=g) * 0.02).to(torch.bfloat16)
        tensors[name] = TensorDelta(name, tuple(p.shape), pos, vals, 1 / 0.3)
    return Delta(DeltaMeta(base_fingerprint="tiny", method="darex-q", rate=0.95), tensors)


def _sequence(
    variant: str | None, slot: int, params: SamplingParams, prompt: list[int]
) -> Sequence:
    job = Job(variant, prompt, params, emit=lambda kind, payload: None)
    return Sequence(job, slot, tiny_tokenizer(), {256})


def _json_grammar(model: torch.nn.Module):
    table = Grammars(tiny_tokenizer(), int(model.config.vocab_size), {256})
    return table.get(GrammarKind.JSON_OBJECT, "")


MODELS = {
    "llama-tied-head": lambda: make_model(0, tie_word_embeddings=True),
    "llama-own-head": lambda: make_model(0, tie_word_embeddings=False),
    **{f: lambda f=f: family_model(f) for f in ("gemma2", "gemma3", "phi3", "qwen2")},
}


@pytest.mark.parametrize("kind", MODELS)
def test_a_mixed_step_runs_on_the_device_with_one_copy_each_way(kind):
    model = MODELS[kind]().to(torch.bfloat16)
    names = [f"v{i}" for i in range(N_VARIANTS)]
    deltas = {n: random_delta(model, seed=i) for i, n in enumerate(names)}
    params = [
        SamplingParams(8, temperature=0.0),
        SamplingParams(8, temperature=0.8, seed=1, top_k=5, logprobs=2),
        SamplingParams(8, temperature=1.2, seed=2, top_p=0.7, min_p=0.05),
        SamplingParams(8, temperature=0.5, repetition_penalty=1.2, frequency_penalty=0.3),
        SamplingParams(8, temperature=0.0, presence_penalty=0.5, min_tokens=4),
        SamplingParams(8, temperature=0.9, seed=4, logprobs=2, grammar=_json_grammar(model)),
    ]
    FlatWeights.from_module(model)  # adjacent weights, as the engine lays them out
    host_runner = ModelRunner(
        model, KVCache(2, 2, 8, 8, 1 << 20, 1, torch.bfloat16, torch.device("cpu"))
    )
    host_layouts = {  # laid out on the host (real data), moved to the device below
        n: layout_variant(
            n, d, host_runner.matrix_names, host_runner.fused, host_runner.vector_slots
        )
        for n, d in deltas.items()
    }
    with fake_cuda() as moved:
        model = model.to(CUDA)
        model.tie_weights()  # fake tensors come back as new parameters, one per module
        weights = FlatWeights.from_module(model, "tiny")
        cfg = model.config
        kv = KVCache(
            2,
            cfg.num_key_value_heads,
            8,
            64,
            1 << 24,
            16,
            torch.bfloat16,
            CUDA,
        )
        runner = ModelRunner(model, kv)
        if kind == "phi3":  # fused in the checkpoint: a delta names the fused tensor
            assert "model.layers.0.self_attn.qkv_proj.weight" in runner.matrix_names
        else:  # separate weights stacked (Qwen2's biased q/k/v stay three products)
            assert runner.fused, "q/k/v and gate/up run as one product each"
        assert runner.matrix_names == host_runner.matrix_names
        layouts: dict[str, VariantLayout] = {n: lay.to(CUDA) for n, lay in host_layouts.items()}
        assert all(lay.data.device.type == "cuda" for lay in layouts.values())
        assert all(
            lay.vectors is not None and lay.vectors.device.type == "cuda"
            for lay in layouts.values()
        )
        bound = bind(deltas["v0"], weights)  # the merged variant: applied in place on the device

        moved.reset()
        undo = apply_delta_(weights, bound)
        assert (moved.h2d, moved.d2h, moved.reads) == (0, 0, []), "a swap stays on the device"

        # decode rows of nine variants and the base; a prompt chunk that scores its prompt
        decode = []
        for i, variant in enumerate([None, *names]):
            s = _sequence(variant, i, params[i % len(params)], [1, 2, 3, 4 + i])
            s.prefilled = len(s.prompt)
            s.ids.extend([5, 6 + i % 3])
            decode.append(s)
        echo = SamplingParams(4, temperature=0.0, logprobs=1, prompt_logprobs=2)
        chunked = _sequence("v3", len(decode), echo, list(range(10, 30)))
        how = Packing(layouts.__getitem__, cfg.vocab_size, runner.vector_size, CUDA)

        moved.reset()
        kv.clean_for_decode([(s.slot, s.length) for s in decode])
        batch = pack(decode, [(chunked, 20)], "v0", how)
        logits = runner.forward(batch.step)
        assert batch.step.sampling is not None
        out = batch.sampling.run(logits, batch.step.sampling)
        host = out.cpu()
        assert batch.sampling.constrained, "rows held to a grammar are in the step"
        assert moved.h2d == 1, f"{moved.h2d} copies to the device in one step"
        assert moved.d2h == 1, f"{moved.d2h} copies back in one step"
        assert moved.reads == [], f"host reads of device values: {moved.reads}"

        revert_delta_(weights, undo)
        assert moved.reads == []

    rows = len(decode) + 1 + 19  # decode rows, the prompt's last token, 19 scored positions
    assert logits.shape == (rows, cfg.vocab_size) and logits.device.type == "cuda"
    sampled = len(decode) + 1
    k = max(p.logprobs or 0 for p in params)  # 2; the echo row asks for 1
    want = sampled + (sampled + 2 * sampled * k) + (19 + 2 * 19 * 2)
    assert out.device.type == "cuda" and host.device.type == "cpu" and host.shape == (want,)
    groups = {g.variant for g in batch.groups}
    assert groups == {None, *names}
    assert batch.step.deltas.items.shape[0] >= N_VARIANTS  # every unmerged group has work
    assert math.prod(batch.step.vectors.shape) > 0 if batch.step.vectors is not None else False
