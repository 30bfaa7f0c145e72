"""Engine v2's sparse delta products (server/engine/sparse.py): the C kernel and the
torch ops both equal a dense reference, over overlapping signed segments of mixed
variants; the layout refuses what it cannot serve.

Tolerances follow from the rounding model, not from a measured error. The reference
runs in float64; an output element gets

    mag = |y0| + sum over the segments covering it of |x| @ |delta|.T

(the sum of the magnitudes of every term that reaches it), and may differ by

    fp32 sums:  n_ops * u32 * mag        n_ops = in_features + segments + 3
                (one rounding per multiply-add of the dot product, per segment
                add, and for the 1/q scale stored in fp32; u32 = 2**-24)
    bf16 y:     + 2 * cover * u_bf16 * mag
                (each covering segment's add rounds y to bf16 once in the kernel,
                twice in the torch path: the product, then the sum; u_bf16 = 2**-8)

An element no segment reaches (cover 0) has tolerance 0: it must keep its bits.
"""

from __future__ import annotations

import math

import pytest
import torch

from deltastore.format import Delta, DeltaMeta, TensorDelta
from server.engine.sparse import (
    CSR,
    MAX_COLS,
    KernelUnavailable,
    Segment,
    StepDeltas,
    VariantLayout,
    layout_variant,
    load_kernels,
)

U_F32 = 2.0**-24  # unit roundoff of float32
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8-bit significand)
Q = 0.7
N_TOKENS = 20
HIDDEN = 29
SHAPES = {
    "embed": (50, HIDDEN),
    "w": (37, HIDDEN),
    "wide": (600, 40),  # >= 512 output rows: the kernel splits rows across threads
    "other": (13, HIDDEN),
}
SLOTS = list(SHAPES)  # the runner's matrix slots, in order


def _tensor(
    name: str, shape: tuple[int, ...], density: float, dtype: torch.dtype, scale: float, seed: int
) -> TensorDelta:
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    k = max(int(numel * density), 1)
    positions = torch.randperm(numel, generator=g)[:k].sort().values
    values = (torch.randn(k, generator=g) * 0.5).to(dtype)
    return TensorDelta(name, shape, positions, values, scale)


def _delta(*tensors: TensorDelta) -> Delta:
    meta = DeltaMeta(base_fingerprint="test", method="darex-q", rate=0.5)
    return Delta(meta, {t.name: t for t in tensors})


@pytest.fixture(scope="module")
def deltas() -> dict[str, Delta]:
    """a: bf16 values with a 1/q scale; b: fp32 values (1/q too); c: leaves the
    embedding, w and wide alone (touches `other` only)."""
    a = [
        _tensor(n, s, 0.3, torch.bfloat16, 1 / Q, seed=i) for i, (n, s) in enumerate(SHAPES.items())
    ]
    a.append(_tensor("norm", (HIDDEN,), 1.0, torch.float32, 1.0, seed=9))
    b = [
        _tensor(n, s, 0.2, torch.float32, 1 / Q, seed=10 + i)
        for i, (n, s) in enumerate(SHAPES.items())
        if n != "other"
    ]
    c = [_tensor("other", SHAPES["other"], 0.5, torch.bfloat16, 1 / Q, seed=20)]
    return {"a": _delta(*a), "b": _delta(*b), "c": _delta(*c)}


@pytest.fixture(scope="module")
def layouts(deltas) -> dict[str, VariantLayout]:
    return {n: layout_variant(n, d, SLOTS) for n, d in deltas.items()}


def _segments(layouts: dict[str, VariantLayout]) -> list[Segment]:
    """1-, 3- and 11-token segments; a +b and -a overlap, a +a and -b overlap; c's
    segment reaches no matrix under test; tokens 18 and 19 get nothing."""
    a, b, c = layouts["a"], layouts["b"], layouts["c"]
    return [
        Segment(0, 1, a, 1.0),
        Segment(1, 4, b, 1.0),
        Segment(2, 3, a, -1.0),  # one token inside b's three, taken back out
        Segment(4, 15, a, 1.0),
        Segment(4, 15, b, -1.0),  # eleven tokens: a block of 8 and a tail of 3
        Segment(15, 18, c, 1.0),
    ]


@pytest.fixture(params=[True, False], ids=["kernel", "torch"])
def kernels(request) -> bool:
    if request.param:
        try:
            load_kernels()
        except KernelUnavailable as e:
            pytest.skip(f"C kernel unavailable: {e}")
    return bool(request.param)


def _dense(deltas: dict[str, Delta], variant: str, name: str) -> torch.Tensor | None:
    """The rescaled delta in float64 (values times the exact 1/q)."""
    t = deltas[variant].tensors.get(name)
    if t is None:
        return None
    out = torch.zeros(t.numel, dtype=torch.float64)
    out[t.positions] = t.values.to(torch.float64) * t.scale
    return out.view(t.shape)


def _tolerance(
    mag: torch.Tensor, cover: torch.Tensor, dtype: torch.dtype, n_ops: int
) -> torch.Tensor:
    rounds = 2 * cover if dtype == torch.bfloat16 else torch.zeros_like(cover)
    tol = mag * (n_ops * U_F32 + rounds[:, None] * U_BF16)
    return torch.where(cover[:, None] > 0, tol, torch.zeros_like(tol))


def _check_close(
    got: torch.Tensor,
    want: torch.Tensor,
    tol: torch.Tensor,
    contributions: list[torch.Tensor],
) -> None:
    err = (got.to(torch.float64) - want).abs()
    worst = float((err - tol).max())
    assert bool((err <= tol).all()), f"error exceeds the rounding bound by {worst:.3g}"
    # the bound is tight enough that losing any one segment's product would show
    for i, part in enumerate(contributions):
        assert bool(((got.to(torch.float64) - (want - part)).abs() > tol).any()), (
            f"tolerance too loose to notice segment {i} missing"
        )


@pytest.mark.parametrize("name", ["w", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_spmm_add_equals_dense_reference(deltas, layouts, kernels, name, dtype):
    g = torch.Generator().manual_seed(1)
    out, inp = SHAPES[name]
    x = torch.randn((N_TOKENS, inp), generator=g).to(dtype)
    y0 = torch.randn((N_TOKENS, out), generator=g).to(dtype)
    segments = _segments(layouts)
    want = y0.to(torch.float64).clone()
    mag = y0.to(torch.float64).abs()
    cover = torch.zeros(N_TOKENS, dtype=torch.float64)
    contributions = []
    for s in segments:
        d = _dense(deltas, s.layout.name, name)
        if d is None:
            continue
        xs = x[s.start : s.end].to(torch.float64)
        part = torch.zeros_like(want)
        part[s.start : s.end] = s.sign * xs @ d.T
        want += part
        contributions.append(part)
        mag[s.start : s.end] += xs.abs() @ d.abs().T
        cover[s.start : s.end] += 1
    assert int(cover[15:].sum()) == 0  # c's tokens and the bare ones: nothing to add

    y = y0.clone()
    step = StepDeltas(segments, len(SLOTS), kernels=kernels)
    step.spmm_add_(y, x, SLOTS.index(name), name)

    tol = _tolerance(mag, cover, dtype, n_ops=inp + len(segments) + 3)
    _check_close(y, want, tol, contributions)
    assert torch.equal(y[15:], y0[15:])  # untouched tokens keep every bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rowgather_add_equals_dense_reference(deltas, layouts, kernels, dtype):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, SHAPES["embed"][0], (N_TOKENS,), generator=g)
    ids[5] = ids[6]  # a repeated id
    h0 = torch.randn((N_TOKENS, HIDDEN), generator=g).to(dtype)
    segments = _segments(layouts)
    want = h0.to(torch.float64).clone()
    mag = h0.to(torch.float64).abs()
    cover = torch.zeros(N_TOKENS, dtype=torch.float64)
    contributions = []
    for s in segments:
        d = _dense(deltas, s.layout.name, "embed")
        if d is None:
            continue
        part = torch.zeros_like(want)
        part[s.start : s.end] = s.sign * d[ids[s.start : s.end]]
        want += part
        contributions.append(part)
        mag[s.start : s.end] += d[ids[s.start : s.end]].abs()
        cover[s.start : s.end] += 1

    h = h0.clone()
    step = StepDeltas(segments, len(SLOTS), kernels=kernels)
    step.rowgather_add_(h, ids, SLOTS.index("embed"), "embed")

    tol = _tolerance(mag, cover, dtype, n_ops=len(segments) + 3)
    _check_close(h, want, tol, contributions)
    assert torch.equal(h[15:], h0[15:])


def test_no_segments_is_the_identity(layouts, kernels):
    x, y = torch.randn(4, HIDDEN), torch.randn(4, SHAPES["w"][0])
    before = y.clone()
    step = StepDeltas([], len(SLOTS), kernels=kernels)
    assert not step
    step.spmm_add_(y, x, SLOTS.index("w"), "w")
    step.rowgather_add_(y, torch.zeros(4, dtype=torch.int64), SLOTS.index("w"), "w")
    assert torch.equal(y, before)


def test_layout_round_trips_positions_and_vectors(deltas, layouts):
    a = layouts["a"]
    assert set(a.matrices) == set(SHAPES) and set(a.vectors) == {"norm"}
    for name, csr in a.matrices.items():
        t = deltas["a"].tensors[name]
        rowptr = csr.rowptr.to(torch.int64)
        assert rowptr[0] == 0 and rowptr[-1] == t.count and bool((rowptr.diff() >= 0).all())
        rows, cols = csr.rows_cols()
        assert torch.equal(rows * t.shape[1] + cols, t.positions)
        assert torch.equal(csr.vals, t.values)  # bf16 kept as stored; 1/q kept apart
        assert csr.scale == pytest.approx(1 / Q)
    # a 1-D delta becomes dense: its values times its scale where kept, zero elsewhere
    assert torch.equal(a.vectors["norm"], deltas["a"].tensors["norm"].to_dense())
    # slots a variant leaves alone have a null record (the kernel skips them)
    c = layouts["c"]
    assert c.records[SLOTS.index("other")].ne(0).any()
    others = [i for i, n in enumerate(SLOTS) if n != "other"]
    assert bool((c.records[others] == 0).all())


def test_layout_refuses_a_matrix_the_runner_does_not_know():
    delta = _delta(
        _tensor("w", SHAPES["w"], 0.1, torch.bfloat16, 1 / Q, seed=0),
        _tensor("mystery.weight", (6, 5), 0.5, torch.bfloat16, 1 / Q, seed=1),
    )
    with pytest.raises(ValueError, match=r"mystery\.weight"):
        layout_variant("v", delta, SLOTS)


def test_csr_holds_at_most_65536_columns():
    # the widest allowed matrix keeps its last column (the largest uint16)
    last = torch.tensor([MAX_COLS - 1, 2 * MAX_COLS - 1])
    csr = CSR.from_positions(last, torch.ones(2), 1.0, (2, MAX_COLS))
    rows, cols = csr.rows_cols()
    assert rows.tolist() == [0, 1] and cols.tolist() == [MAX_COLS - 1] * 2
    with pytest.raises(ValueError, match=str(MAX_COLS + 1)):
        CSR.from_positions(torch.tensor([0]), torch.ones(1), 1.0, (2, MAX_COLS + 1))
