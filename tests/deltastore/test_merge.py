"""Merging sparse deltas: sum, ties, dare-merge; exact, order-free, one base only."""

from __future__ import annotations

import pytest
import torch

from deltastore.format import Delta, DeltaMeta, TensorDelta
from deltastore.merge import MergeError, MergeMethod, merge


def _delta(entries: dict[int, float], base: str = "b0", scale: float = 1.0) -> Delta:
    pos = torch.tensor(sorted(entries), dtype=torch.int64)
    val = torch.tensor([entries[p] for p in sorted(entries)], dtype=torch.float32)
    t = TensorDelta("w", (4, 4), pos, val, scale)
    norm = TensorDelta.from_dense("n", torch.full((4,), 0.5))
    meta = DeltaMeta(base_fingerprint=base, method="dare", rate=0.5)
    return Delta(meta, {"w": t, "n": norm})


def _dense(d: Delta, name: str = "w") -> torch.Tensor:
    return d.tensors[name].to_dense()


def test_sum_is_task_arithmetic_and_exact_where_positions_overlap():
    a, b = _delta({0: 1.0, 3: 2.0}, scale=2.0), _delta({3: -1.0, 7: 0.5})
    m = merge([("a", a, 0.7), ("b", b, 0.3)])
    exact = (0.7 * _dense(a) + 0.3 * _dense(b)).to(torch.bfloat16).float()
    assert torch.equal(_dense(m), exact)  # computed in fp32, stored as a file stores it
    assert m.tensors["w"].positions.tolist() == [0, 3, 7]  # the union
    assert torch.allclose(_dense(m, "n"), torch.full((4,), 0.5))  # dense stays dense
    assert m.meta.method == "merge:sum" and m.meta.policy["merge"]["members"][0]["name"] == "a"


def test_order_never_matters_and_a_zero_weight_leaves_a_member_out():
    a, b, c = _delta({0: 0.1, 5: 0.3}), _delta({5: 0.7, 9: 0.2}), _delta({5: -0.4, 1: 1.0})
    for method in MergeMethod:
        one = merge([("a", a, 1.0), ("b", b, 0.5), ("c", c, 2.0)], method, seed=3)
        two = merge([("c", c, 2.0), ("a", a, 1.0), ("b", b, 0.5)], method, seed=3)
        for name in one.tensors:
            assert torch.equal(one.tensors[name].values, two.tensors[name].values), method
            assert torch.equal(one.tensors[name].positions, two.tensors[name].positions)
    alone = merge([("a", a, 1.0)])
    with_zero = merge([("a", a, 1.0), ("b", b, 0.0)])
    assert torch.equal(_dense(alone), _dense(with_zero))


def test_ties_elects_a_sign_and_averages_the_members_that_agree():
    a, b, c = _delta({0: 1.0, 1: 2.0}), _delta({0: 3.0, 1: -5.0}), _delta({0: -1.0})
    m = merge([("a", a, 1.0), ("b", b, 1.0), ("c", c, 1.0)], MergeMethod.TIES)
    flat = _dense(m).reshape(-1)
    assert flat[0] == pytest.approx(2.0)  # sign +: mean of 1 and 3 (c disagrees)
    assert flat[1] == pytest.approx(-5.0)  # sign -: only b agrees
    trimmed = merge([("a", _delta({0: 1.0, 1: 0.1}), 1.0)], MergeMethod.TIES, density=0.5)
    assert trimmed.tensors["w"].positions.tolist() == [0]  # the larger half kept


def test_dare_merge_redrops_and_rescales_reproducibly():
    big = {i: 1.0 for i in range(16)}
    m = merge([("a", _delta(big), 1.0)], MergeMethod.DARE_MERGE, density=0.5, seed=1)
    kept = m.tensors["w"]
    assert 0 < kept.count < 16 and torch.all(kept.values.float() == 2.0)  # 1/density
    again = merge([("a", _delta(big), 1.0)], MergeMethod.DARE_MERGE, density=0.5, seed=1)
    assert torch.equal(kept.positions, again.tensors["w"].positions)
    other = merge([("a", _delta(big), 1.0)], MergeMethod.DARE_MERGE, density=0.5, seed=2)
    assert not torch.equal(kept.positions, other.tensors["w"].positions)


def test_bad_merges_are_refused():
    with pytest.raises(MergeError, match="different bases"):
        merge([("a", _delta({0: 1.0}), 1.0), ("b", _delta({0: 1.0}, base="other"), 1.0)])
    with pytest.raises(MergeError, match="non-zero"):
        merge([("a", _delta({0: 1.0}), 0.0)])
    with pytest.raises(MergeError, match="density"):
        merge([("a", _delta({0: 1.0}), 1.0)], MergeMethod.TIES, density=0.0)


def test_ties_with_a_negative_weight_flips_that_member():
    a, b = _delta({0: 1.0}), _delta({0: 1.0})
    m = merge([("a", a, 1.0), ("b", b, -2.0)], MergeMethod.TIES)
    assert _dense(m).reshape(-1)[0] == pytest.approx(-1.0)  # b alone agrees: -2*1 / 2
    with pytest.raises(MergeError, match="finite"):
        merge([("a", a, float("inf"))])
    with pytest.raises(MergeError, match="two different deltas"):
        merge([("a", a, 1.0), ("a", b, 1.0)])
