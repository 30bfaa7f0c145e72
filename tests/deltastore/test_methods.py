import math

import pytest
import torch

from deltastore.format import TensorDelta
from deltastore.methods import (
    Method,
    default_q,
    mix_sample_rate,
    parse_method,
    select,
    select_mix,
    tensor_generator,
)

RANDOM = [Method.DARE, Method.DAREX_Q]
ALL = list(Method)


def _delta(shape=(64, 96), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1e-3


def _sparsify(method, delta, rate, seed=0, norms=None, q=None):
    pos = select(method, delta, rate, tensor_generator(seed, "w"), norms)
    q = q if q is not None else default_q(method, rate)
    return TensorDelta("w", tuple(delta.shape), pos, delta.reshape(-1)[pos], 1.0 / q)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("rate", [0.5, 0.9, 0.99])
def test_kept_fraction_is_one_minus_p(method, rate):
    delta = _delta((256, 512))
    norms = torch.rand(512) + 0.5
    pos = select(method, delta, rate, tensor_generator(0, "w"), norms)
    kept = pos.numel() / delta.numel()
    # 5 sigma of the binomial fraction; structural draws once per column (512 draws)
    draws = 512 if method is Method.STRUCTURAL else delta.numel()
    assert abs(kept - (1 - rate)) <= 5 * (rate * (1 - rate) / draws) ** 0.5 + 1 / delta.numel()
    assert torch.all(pos[1:] > pos[:-1]), "positions must be strictly increasing"
    assert pos.dtype == torch.int64 and (pos.numel() == 0 or int(pos.max()) < delta.numel())


def test_dare_is_unbiased_over_seeds():
    delta = _delta((16, 16))
    mean = torch.stack([_sparsify(Method.DARE, delta, 0.9, seed=s).to_dense() for s in range(3000)])
    mean = mean.mean(0)
    # each entry is delta/(1-p) w.p. (1-p): std of the mean ~ |delta| * 3 / sqrt(3000)
    assert torch.allclose(mean, delta, atol=float(delta.abs().max()) * 0.2)
    assert (mean - delta).abs().mean() < 0.05 * delta.abs().mean()


def test_dare_rescale_is_exactly_one_over_one_minus_p():
    delta = _delta()
    td = _sparsify(Method.DARE, delta, 0.9)
    dense = td.to_dense().reshape(-1)
    kept = dense[td.positions]
    assert torch.allclose(kept, delta.reshape(-1)[td.positions] / (1 - 0.9))


@pytest.mark.parametrize("method", ALL)
def test_rate_zero_is_identity(method):
    delta = _delta()
    td = _sparsify(method, delta, 0.0, q=1.0)
    assert td.count == delta.numel()
    assert torch.equal(td.to_dense(), delta)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("rate", [0.999, 0.9999, 1 - 1e-9])
def test_no_nan_as_p_goes_to_one(method, rate):
    delta = _delta((8, 8))
    td = _sparsify(method, delta, rate)
    assert torch.isfinite(td.to_dense()).all()
    assert td.scale > 0 and torch.isfinite(torch.tensor(td.scale))


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5])
def test_bad_rate_raises(rate):
    with pytest.raises(ValueError, match="rate"):
        select(Method.DARE, _delta(), rate, tensor_generator(0, "w"))


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="darex-q"):
        parse_method("ties")


def test_seed_reproducible_and_order_independent():
    delta = _delta()
    a = select(Method.DARE, delta, 0.9, tensor_generator(7, "layer.0"))
    tensor_generator(7, "layer.1")  # another tensor drawn in between changes nothing
    b = select(Method.DARE, delta, 0.9, tensor_generator(7, "layer.0"))
    c = select(Method.DARE, delta, 0.9, tensor_generator(8, "layer.0"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_magnitude_keeps_the_largest():
    delta = _delta()
    pos = select(Method.MAGNITUDE, delta, 0.9, tensor_generator(0, "w"))
    flat = delta.reshape(-1).abs()
    dropped = torch.ones_like(flat, dtype=torch.bool)
    dropped[pos] = False
    assert flat[pos].min() >= flat[dropped].max()


def test_wanda_ranks_by_input_norm_per_row():
    delta = torch.ones(4, 10) * 1e-3
    norms = torch.arange(10, dtype=torch.float32)  # column 9 matters most
    pos = select(Method.WANDA, delta, 0.8, tensor_generator(0, "w"), norms)
    rows, cols = pos // 10, pos % 10
    assert torch.equal(rows.bincount(minlength=4), torch.full((4,), 2))
    assert set(cols.tolist()) == {8, 9}


def test_structural_drops_whole_columns():
    delta = _delta((32, 200))
    pos = select(Method.STRUCTURAL, delta, 0.7, tensor_generator(0, "w"))
    cols = pos % 200
    per_col = cols.bincount(minlength=200)
    assert set(per_col.unique().tolist()) <= {0, 32}
    assert 0 < int((per_col > 0).sum()) < 200


def test_mix_keeps_the_top_entries_unscaled_and_samples_the_rest():
    delta = _delta((128, 256))
    rate, top = 0.95, 0.4
    pos, is_top = select_mix(delta, rate, tensor_generator(0, "w"), top)
    flat = delta.reshape(-1)
    n_top = round(top * (1 - rate) * flat.numel())
    assert int(is_top.sum()) == n_top and is_top.shape == pos.shape
    assert torch.all(pos[1:] > pos[:-1])
    top_pos = pos[is_top]
    others = torch.ones_like(flat, dtype=torch.bool)
    others[top_pos] = False
    assert flat[top_pos].abs().min() >= flat[others].abs().max()  # the largest ones
    # the rest is a Bernoulli sample at the rate that fills the budget
    r = mix_sample_rate(rate, top)
    n_rest = flat.numel() - n_top
    got = int((~is_top).sum()) / n_rest
    assert abs(got - r) <= 5 * (r * (1 - r) / n_rest) ** 0.5
    assert math.isclose(n_top + r * n_rest, (1 - rate) * flat.numel(), rel_tol=1e-3)
    assert default_q(Method.MIX, rate, top) == r


def test_mix_with_its_default_q_is_unbiased_over_seeds():
    delta = _delta((32, 48))
    rate, top = 0.9, 0.5
    q = mix_sample_rate(rate, top)
    flat = delta.reshape(-1)
    total = torch.zeros_like(flat)
    n = 3000
    for seed in range(n):
        pos, is_top = select_mix(delta, rate, tensor_generator(seed, "w"), top)
        total[pos] += torch.where(is_top, flat[pos], flat[pos] / q)
    err = (total / n - flat).abs().mean() / flat.abs().mean()
    assert err < 0.1  # a 1/q rescale on the top entries too would be ~(1/q - 1) off


@pytest.mark.parametrize("top", [0.0, 1.0, -0.1])
def test_mix_top_share_is_checked(top):
    with pytest.raises(ValueError, match="top share"):
        select_mix(_delta(), 0.9, tensor_generator(0, "w"), top)
