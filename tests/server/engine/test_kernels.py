"""Engine v2's sparse delta ops (server/engine/kernels/, server/engine/sparse.py): the
CPU kernel, the Triton kernels (run by Triton's interpreter on the CPU:
TRITON_INTERPRET=1, no GPU needed) and the torch reference all equal a dense reference,
over overlapping signed segments of mixed variants; the layout refuses what it cannot
serve; the work items never overlap.

Tolerances follow from the rounding model, not from a measured error. The reference
runs in float64; an output element gets

    mag = |y0| + sum over the segments covering it of |x| @ |delta|.T

(the sum of the magnitudes of every term that reaches it), and may differ by

    fp32 sums:  n_ops * u32 * mag        n_ops = in_features + segments + 3
                (one rounding per multiply-add of the dot product, per segment
                add, and for the 1/q scale stored in fp32; u32 = 2**-24)
    bf16 y:     + 2 * cover * u_bf16 * mag
                (y is rounded to bf16 at most once per covering segment's add, and
                the value it adds at most once more; u_bf16 = 2**-8)

An element no segment reaches (cover 0) has tolerance 0: it must keep its bits.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Callable

import pytest
import torch

from deltastore.format import Delta, DeltaMeta, TensorDelta
from server.engine import kernels
from server.engine.kernels import MAX_COLS, KernelUnavailable, cpu, load_kernels, reference
from server.engine.kernels.layout import CSR
from server.engine.sparse import (
    ITEM_TOKENS,
    Segment,
    StepDeltas,
    VariantLayout,
    layout_variant,
    plan_items,
)

U_F32 = 2.0**-24  # unit roundoff of float32
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8-bit significand)
Q = 0.7
N_TOKENS = 20
HIDDEN = 29
SHAPES = {
    "embed": (50, HIDDEN),
    "w": (37, HIDDEN),
    "wide": (600, 40),  # >= 512 output rows: the C kernel splits rows across threads
    "other": (13, HIDDEN),
}
SLOTS = list(SHAPES)  # the runner's matrix slots, in order
VECTORS = {"norm": (0, HIDDEN)}  # the runner's vector slots

Op = Callable[..., None]


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


def make_deltas() -> dict[str, Delta]:
    """a: bf16 values with a 1/q scale; b: fp32 values (1/q too); c: leaves the
    embedding, w and wide alone (touches `other` only); e: very sparse (most rows
    empty)."""
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
    e = [
        _tensor(n, s, 0.004, torch.bfloat16, 1 / Q, seed=30 + i)
        for i, (n, s) in enumerate(SHAPES.items())
    ]
    return {"a": _delta(*a), "b": _delta(*b), "c": _delta(*c), "e": _delta(*e)}


def make_layouts(deltas: dict[str, Delta]) -> dict[str, VariantLayout]:
    return {n: layout_variant(n, d, SLOTS, vector_slots=VECTORS) for n, d in deltas.items()}


@pytest.fixture(scope="module")
def deltas() -> dict[str, Delta]:
    return make_deltas()


@pytest.fixture(scope="module")
def layouts(deltas) -> dict[str, VariantLayout]:
    return make_layouts(deltas)


def _segments(layouts: dict[str, VariantLayout]) -> list[Segment]:
    """1-, 3- and 11-token segments; a +b and -a overlap, a +a and -b overlap; c's
    segment reaches no matrix under test; e's adds little; tokens 18 and 19 get
    nothing."""
    a, b, c, e = layouts["a"], layouts["b"], layouts["c"], layouts["e"]
    return [
        Segment(0, 1, a, 1.0),
        Segment(1, 4, b, 1.0),
        Segment(2, 3, a, -1.0),  # one token inside b's three, taken back out
        Segment(4, 15, a, 1.0),
        Segment(4, 15, b, -1.0),  # eleven tokens: a block of 8 and a tail of 3
        Segment(15, 16, c, 1.0),
        Segment(16, 18, e, 1.0),
    ]


@pytest.fixture(scope="module")
def triton_interpreted() -> object:
    """server.engine.kernels.gpu with its kernels under Triton's interpreter (the CPU):
    tests/conftest.py chooses that mode on machines without a GPU."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton compiles for the GPU here: the cuda tests run the kernels")
    import server.engine.kernels.gpu as gpu

    return gpu


@pytest.fixture(params=["cpu-kernel", "cpu-kernel-portable", "triton", "reference"])
def impl(request) -> tuple[Op, Op]:
    """(spmm_add_, rowgather_add_) of one implementation, called on CPU tensors.
    cpu-kernel-portable: the C kernel without its AVX-512 path, as a machine without
    AVX-512 runs it (here the same as cpu-kernel where the compiler has none)."""
    if request.param.startswith("cpu-kernel"):
        portable = request.param.endswith("portable")
        try:
            load_kernels(portable)
        except KernelUnavailable as e:
            pytest.skip(f"C kernel unavailable: {e}")
        if portable:
            return functools.partial(cpu.spmm_add_, portable=True), kernels.rowgather_add_
        return kernels.spmm_add_, kernels.rowgather_add_  # the op dispatches to cpu.py
    if request.param == "triton":
        gpu = request.getfixturevalue("triton_interpreted")
        return gpu.spmm_add_, gpu.rowgather_add_  # type: ignore[attr-defined]
    return reference.spmm_add_, reference.rowgather_add_


def _call(op: Op, out: torch.Tensor, arg: torch.Tensor, segments: list[Segment], slot: int) -> None:
    step = StepDeltas.build(segments, torch.device("cpu"))
    op(out, arg, step.layouts, step.bases, step.items, slot)


def _dense(delta: Delta | None, name: str) -> torch.Tensor | None:
    """The rescaled delta in float64 (values times the exact 1/q)."""
    t = delta.tensors.get(name) if delta is not None else None
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


def _expect_spmm(
    deltas: dict[str, Delta], segments: list[Segment], name: str, x: torch.Tensor, y0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The float64 result, the magnitudes, the cover of each token, each segment's part."""
    want = y0.to(torch.float64).clone()
    mag = y0.to(torch.float64).abs()
    cover = torch.zeros(y0.shape[0], dtype=torch.float64)
    contributions = []
    for s in segments:
        d = _dense(deltas.get(s.layout.name), name)
        if d is None:
            continue
        xs = x[s.start : s.end].to(torch.float64)
        part = torch.zeros_like(want)
        part[s.start : s.end] = s.sign * xs @ d.T
        want += part
        if part.any():
            contributions.append(part)
        mag[s.start : s.end] += xs.abs() @ d.abs().T
        cover[s.start : s.end] += 1
    return want, mag, cover, contributions


@pytest.mark.parametrize("name", ["w", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_spmm_add_equals_dense_reference(deltas, layouts, impl, name, dtype):
    g = torch.Generator().manual_seed(1)
    out, inp = SHAPES[name]
    x = torch.randn((N_TOKENS, inp), generator=g).to(dtype)
    y0 = torch.randn((N_TOKENS, out), generator=g).to(dtype)
    segments = _segments(layouts)
    want, mag, cover, contributions = _expect_spmm(deltas, segments, name, x, y0)
    assert int(cover[15:16].sum()) == 0 and int(cover[18:].sum()) == 0  # c's and bare tokens

    y = y0.clone()
    _call(impl[0], y, x, segments, SLOTS.index(name))

    tol = _tolerance(mag, cover, dtype, n_ops=inp + len(segments) + 3)
    _check_close(y, want, tol, contributions)
    assert torch.equal(y[15:16], y0[15:16]) and torch.equal(y[18:], y0[18:])  # every bit kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rowgather_add_equals_dense_reference(deltas, layouts, impl, dtype):
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
        d = _dense(deltas[s.layout.name], "embed")
        if d is None:
            continue
        part = torch.zeros_like(want)
        part[s.start : s.end] = s.sign * d[ids[s.start : s.end]]
        want += part
        if part.any():  # (e's rows are mostly empty)
            contributions.append(part)
        mag[s.start : s.end] += d[ids[s.start : s.end]].abs()
        cover[s.start : s.end] += 1

    h = h0.clone()
    _call(impl[1], h, ids, segments, SLOTS.index("embed"))

    tol = _tolerance(mag, cover, dtype, n_ops=len(segments) + 3)
    _check_close(h, want, tol, contributions)
    assert torch.equal(h[18:], h0[18:]) and torch.equal(h[15:16], h0[15:16])


def test_fused_products_long_segments_and_an_empty_variant(impl):
    """q/k/v stacked by rows with one member left alone (fuse_rows), a segment longer
    than one item (split), one-token segments, and a variant that touches nothing."""
    g = torch.Generator().manual_seed(3)
    members = [("q", 24), ("k", 8), ("v", 8)]
    inp = 16
    parts = {
        n: _tensor(n, (rows, inp), 0.2, torch.bfloat16, 1 / Q, seed=40 + i)
        for i, (n, rows) in enumerate(members)
        if n != "k"
    }
    delta = _delta(*parts.values())
    fused = {"qkv": members}
    lay = layout_variant("f", delta, ["qkv"], fused=fused)
    empty = layout_variant("none", _delta(), ["qkv"], fused=fused)
    assert empty.count == 0 and not empty.matrices
    n = ITEM_TOKENS + 9
    segments = [Segment(0, ITEM_TOKENS + 5, lay, 1.0), Segment(ITEM_TOKENS + 5, n - 2, empty, 1.0)]
    segments += [Segment(n - 2, n - 1, lay, -1.0), Segment(n - 1, n, lay, 1.0)]
    x = torch.randn((n, inp), generator=g).to(torch.bfloat16)
    y0 = torch.randn((n, 40), generator=g).to(torch.bfloat16)
    dense = torch.cat(
        [
            _dense(delta, m) if m in parts else torch.zeros(r, inp, dtype=torch.float64)  # type: ignore[misc]
            for m, r in members
        ]
    )
    want = y0.to(torch.float64).clone()
    mag = y0.to(torch.float64).abs()
    cover = torch.zeros(n, dtype=torch.float64)
    contributions = []
    for s in segments:
        if s.layout is empty:
            continue
        xs = x[s.start : s.end].to(torch.float64)
        part = torch.zeros_like(want)
        part[s.start : s.end] = s.sign * xs @ dense.T
        want += part
        contributions.append(part)
        mag[s.start : s.end] += xs.abs() @ dense.abs().T
        cover[s.start : s.end] += 1
    y = y0.clone()
    _call(impl[0], y, x, segments, 0)
    _check_close(y, want, _tolerance(mag, cover, torch.bfloat16, inp + 4 + 3), contributions)
    assert torch.equal(y[ITEM_TOKENS + 5 : n - 2], y0[ITEM_TOKENS + 5 : n - 2])
    assert torch.equal(y[:, 24:32], y0[:, 24:32])  # k's rows: the delta leaves k alone


def test_no_items_is_the_identity(layouts, impl):
    x, y = torch.randn(4, HIDDEN), torch.randn(4, SHAPES["w"][0])
    before = y.clone()
    step = StepDeltas.build([], torch.device("cpu"))
    assert not step
    impl[0](y, x, step.layouts, step.bases, step.items, SLOTS.index("w"))
    impl[1](y, torch.zeros(4, dtype=torch.int64), step.layouts, step.bases, step.items, 0)
    assert torch.equal(y, before)


def test_items_are_disjoint_and_keep_every_term(layouts):
    segments = _segments(layouts)
    variants, items = plan_items(segments)
    assert [v.name for v in variants] == ["a", "b", "c", "e"]
    spans = [(t0, t1) for t0, t1, _, _ in items]
    assert spans == sorted(spans) and all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    # every token gets exactly the terms of the segments that cover it
    for t in range(N_TOKENS):
        want = sorted((s.layout.name, s.sign) for s in segments if s.start <= t < s.end)
        got = sorted(
            (variants[v].name, sign)
            for t0, t1, a, b in items
            if t0 <= t < t1
            for v, sign in ((a, 1.0), (b, -1.0))
            if v >= 0
        )
        assert got == want, t
    # a long run of one pair is one item per ITEM_TOKENS
    _, long = plan_items([Segment(0, 2 * ITEM_TOKENS + 1, layouts["a"], 1.0)])
    assert [(t0, t1) for t0, t1, _, _ in long] == [
        (0, ITEM_TOKENS),
        (ITEM_TOKENS, 2 * ITEM_TOKENS),
        (2 * ITEM_TOKENS, 2 * ITEM_TOKENS + 1),
    ]
    with pytest.raises(ValueError, match=r"tokens \[2, 3\) get 2 deltas added"):
        plan_items([Segment(0, 4, layouts["a"], 1.0), Segment(2, 3, layouts["b"], 1.0)])


def test_layout_round_trips_positions_and_vectors(deltas, layouts):
    a = layouts["a"]
    assert set(a.matrices) == set(SHAPES)
    for name in a.matrices:
        csr = a.csr(name)
        t = deltas["a"].tensors[name]
        rowptr = csr.rowptr.to(torch.int64)
        assert rowptr[0] == 0 and rowptr[-1] == t.count and bool((rowptr.diff() >= 0).all())
        rows, cols = csr.rows_cols()
        assert torch.equal(rows * t.shape[1] + cols, t.positions)
        assert torch.equal(csr.vals, t.values)  # bf16 kept as stored; 1/q kept apart
        assert csr.scale == pytest.approx(1 / Q)
    assert layouts["b"].csr("w").vals.dtype == torch.float32
    # a 1-D delta becomes dense: its values times its scale where kept, zero elsewhere
    assert a.vectors is not None
    assert torch.equal(a.vectors, deltas["a"].tensors["norm"].to_dense())
    assert layouts["b"].vectors is None  # b changes no vector
    # slots a variant leaves alone are absent (the kernels skip them)
    assert set(layouts["c"].matrices) == {"other"}


def test_layout_refuses_what_the_runner_does_not_serve():
    delta = _delta(
        _tensor("w", SHAPES["w"], 0.1, torch.bfloat16, 1 / Q, seed=0),
        _tensor("mystery.weight", (6, 5), 0.5, torch.bfloat16, 1 / Q, seed=1),
    )
    with pytest.raises(ValueError, match=r"mystery\.weight"):
        layout_variant("v", delta, SLOTS)
    vec = _delta(_tensor("mystery.bias", (7,), 1.0, torch.float32, 1.0, seed=2))
    with pytest.raises(ValueError, match=r"mystery\.bias"):
        layout_variant("v", vec, SLOTS, vector_slots=VECTORS)
    short = _delta(_tensor("norm", (HIDDEN - 1,), 1.0, torch.float32, 1.0, seed=3))
    with pytest.raises(ValueError, match=f"{HIDDEN - 1} entries, the model {HIDDEN}"):
        layout_variant("v", short, SLOTS, vector_slots=VECTORS)


def test_csr_holds_at_most_65536_columns():
    # the widest allowed matrix keeps its last column (the largest uint16)
    last = torch.tensor([MAX_COLS - 1, 2 * MAX_COLS - 1])
    csr = CSR.from_positions(last, torch.ones(2), 1.0, (2, MAX_COLS))
    rows, cols = csr.rows_cols()
    assert rows.tolist() == [0, 1] and cols.tolist() == [MAX_COLS - 1] * 2
    with pytest.raises(ValueError, match=str(MAX_COLS + 1)):
        CSR.from_positions(torch.tensor([0]), torch.ones(1), 1.0, (2, MAX_COLS + 1))


def test_the_op_checks_devices_and_shapes_on_fake_tensors(layouts):
    """The fake implementation (what FakeTensorMode and torch.compile run) refuses an
    argument on another device than the output."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.empty(4, SHAPES["w"][0], device="cuda")
        x = torch.empty(4, HIDDEN, device="cuda")
        items = torch.zeros(1, 4, dtype=torch.int64, device="cuda")
        bases = torch.zeros(1, dtype=torch.int64, device="cuda")
        buf = torch.zeros(8, dtype=torch.int32, device="cuda")
        kernels.spmm_add_(y, x, [buf], bases, items, 0)  # all on cuda: fine
        with pytest.raises(RuntimeError, match="on cpu, the output on cuda"):
            kernels.spmm_add_(y, x, [torch.zeros(8, dtype=torch.int32)], bases, items, 0)
        with pytest.raises(RuntimeError, match="on cpu, the output on cuda"):
            kernels.rowgather_add_(y, torch.zeros(4, dtype=torch.int64), [buf], bases, items, 0)


def test_a_step_calls_the_device_kernel_directly_and_the_op_when_traced():
    """Real CPU tensors go straight to the C kernel (the dispatcher's boxed call of a
    Python kernel costs more than the kernel at decode); fake ones, as FakeTensorMode
    and torch.compile trace them, go through the registered op and its device check."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from server.engine.kernels import cpu

    assert kernels.resolve(torch.zeros(1, 4, dtype=torch.int64)) == (
        cpu.spmm_add_,
        cpu.rowgather_add_,
    )
    with FakeTensorMode():
        traced = kernels.resolve(torch.zeros(1, 4, dtype=torch.int64, device="cuda"))
    assert traced == (kernels.spmm_add_, kernels.rowgather_add_)
