import random

import pytest
import torch

from deltastore.apply import (
    BaseMismatchError,
    FlatWeights,
    apply_delta_,
    bind,
    revert_delta_,
)
from deltastore.format import Delta, DeltaMeta, TensorDelta
from deltastore.methods import Method, select, tensor_generator
from tests.conftest import make_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]  # cuda: skipped without one


def _tensors(seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (64, 48), "b": (300,), "c": (7, 9, 5), "d": (1000, 33)}
    return {n: torch.randn(s, generator=g).to(dtype).to(device) for n, s in shapes.items()}


def _random_delta(weights: dict[str, torch.Tensor], seed: int, rate: float = 0.9) -> Delta:
    tensors = {}
    for name, w in weights.items():
        d = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) * 1e-2
        pos = select(Method.DARE, d, rate, tensor_generator(seed, name))
        tensors[name] = TensorDelta(name, tuple(w.shape), pos, d.reshape(-1)[pos].bfloat16(), 10.0)
    meta = DeltaMeta(base_fingerprint="fp", method="dare", rate=rate)
    return Delta(meta, tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_revert_is_bit_exact_after_100_random_cycles(dtype, device):
    original = _tensors(dtype=dtype, device=device)
    weights = FlatWeights(((n, t.clone()) for n, t in original.items()), fingerprint="fp")
    deltas = [bind(_random_delta(original, s), weights) for s in range(6)]
    rng = random.Random(0)
    stack = []
    for _ in range(100):
        if stack and (rng.random() < 0.5 or len(stack) >= 3):
            revert_delta_(weights, stack.pop())
        else:
            stack.append(apply_delta_(weights, rng.choice(deltas)))
    while stack:
        revert_delta_(weights, stack.pop())
    for name, t in original.items():
        assert torch.equal(weights.tensor(name).view(torch.uint8), t.view(torch.uint8)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_adds_in_fp32_and_rounds_once(dtype):
    original = _tensors(dtype=dtype)
    weights = FlatWeights((n, t.clone()) for n, t in original.items())
    delta = _random_delta(original, 3)
    apply_delta_(weights, bind(delta, weights))
    for name, t in original.items():
        want = (t.to(torch.float32) + delta.tensors[name].to_dense()).to(dtype)
        assert torch.equal(weights.tensor(name), want), name


def test_model_computes_from_the_flat_buffers():
    model = make_model(0)
    x = torch.randint(0, 256, (1, 12))
    before = model(x).logits
    weights = FlatWeights.from_module(model)
    assert torch.equal(model(x).logits, before)
    names = dict(model.named_parameters())
    delta = _random_delta({n: p.detach() for n, p in names.items()}, 1, rate=0.5)
    undo = apply_delta_(weights, bind(delta, weights))
    assert not torch.allclose(model(x).logits, before)
    revert_delta_(weights, undo)
    assert torch.equal(model(x).logits, before)
    # tied weights stay one tensor
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_different_base_is_refused():
    original = _tensors()
    weights = FlatWeights(original.items(), fingerprint="sha256:other")
    with pytest.raises(BaseMismatchError, match="sha256:other"):
        bind(_random_delta(original, 0), weights)


def test_a_fingerprint_given_as_a_function_is_read_when_first_checked():
    original = _tensors()
    calls = []

    def later() -> str:
        calls.append(1)
        return "sha256:other"

    weights = FlatWeights(original.items(), fingerprint=later)
    assert calls == []  # not at construction
    with pytest.raises(BaseMismatchError, match="sha256:other"):
        bind(_random_delta(original, 0), weights)
    assert weights.fingerprint == "sha256:other" and calls == [1]  # once


def test_unknown_tensor_and_shape_mismatch():
    original = _tensors()
    weights = FlatWeights(original.items())
    odd = TensorDelta("zzz", (3,), torch.tensor([0]), torch.ones(1), 1.0)
    with pytest.raises(BaseMismatchError, match="zzz"):
        bind([odd], weights)
    wrong = TensorDelta("a", (48, 64), torch.tensor([0]), torch.ones(1), 1.0)
    with pytest.raises(BaseMismatchError, match="shape"):
        bind([wrong], weights)


def test_revert_out_of_order_is_refused():
    original = _tensors()
    weights = FlatWeights((n, t.clone()) for n, t in original.items())
    first = apply_delta_(weights, bind(_random_delta(original, 0), weights))
    apply_delta_(weights, bind(_random_delta(original, 1), weights))
    with pytest.raises(RuntimeError, match="out of order"):
        revert_delta_(weights, first)


def test_scale_override():
    original = _tensors()
    weights = FlatWeights((n, t.clone()) for n, t in original.items())
    delta = _random_delta(original, 0)
    bound = bind(delta, weights, scales={"a": 2.0})
    apply_delta_(weights, bound)
    td = delta.tensors["a"]
    got = weights.tensor("a").reshape(-1)[td.positions] - original["a"].reshape(-1)[td.positions]
    assert torch.allclose(got, td.values.float() * 2.0, atol=1e-6)
