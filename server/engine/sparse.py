"""Deltas laid out for mixed-variant steps, and one step's delta work.

A variant's delta is laid out once (`layout_variant`) on the engine's device: its
matrices as CSR by output row in one int32 buffer (kernels/layout.py), its 1-D deltas
(norm weights, biases) as one dense fp32 vector over the runner's vector slots.

One step serves rows of several variants. The step's tokens are packed so that each
variant's tokens are contiguous; its `Segment`s say which token range gets which
variant's delta with which sign (-1 takes a merged variant back out). `StepDeltas`
turns them into disjoint work items {t0, t1, a, b} (tokens [t0, t1) get +a and -b),
and every pruned linear layer computes

    y = x @ W.T                           (the resident weights, one GEMM for all rows)
    y[t] += x[t] @ (delta_a - delta_b).T  (the op deltaserve::spmm_add_, one call for
                                           all items: kernels/__init__.py)
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass

import torch

from deltastore.format import Delta
from server.engine import kernels
from server.engine.kernels import CSR, MAX_COLS, fuse_rows
from server.engine.kernels.layout import pack, unpack
from server.engine.transfer import Packer

__all__ = [
    "CSR",
    "MAX_COLS",
    "Segment",
    "StepDeltas",
    "VariantLayout",
    "layout_variant",
    "use_native",
]
log = logging.getLogger(__name__)

ITEM_TOKENS = 64  # longest item: a long prompt chunk is split so its work spreads out


def use_native(choice: str, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Whether steps on `device` (weights of `dtype`) run the native sparse kernel
    (`--delta-kernel`): auto takes it when it works here (else the torch reference,
    with a warning), native insists (raises KernelUnavailable), torch never takes it."""
    if choice not in ("auto", "native", "torch"):
        raise ValueError(f"delta kernel {choice!r}: choose auto, native or torch")
    if choice == "torch":
        return False
    why = kernels.native_available(device, dtype)
    if why is None:
        return True
    if choice == "native":
        raise kernels.KernelUnavailable(f"no native sparse kernel on {device}: {why}")
    log.warning("no native sparse kernel on %s, using the torch reference: %s", device, why)
    return False


def address(t: torch.Tensor) -> int:
    """Where t's data starts, as the native kernels read it (0 for a fake tensor, which
    has no data: FakeTensorMode traces the step without running the kernels)."""
    from torch._subclasses.fake_tensor import is_fake

    return 0 if is_fake(t) else int(t.data_ptr())


@dataclass(frozen=True)
class Matrix:
    """Where a matrix of a variant's delta sits in its buffer, and its size."""

    slot: int
    shape: tuple[int, int]
    entries: int


@dataclass(eq=False)
class VariantLayout:
    """A variant's delta laid out for mixed steps, on the engine's device.

    data: the int32 buffer of its matrices (kernels/layout.py);
    vectors: (V,) fp32 over the runner's vector slots (zeros where the delta leaves a
    vector alone), None when it changes no 1-D tensor."""

    name: str
    data: torch.Tensor
    vectors: torch.Tensor | None
    matrices: dict[str, Matrix]

    @functools.cached_property
    def address(self) -> int:
        return address(self.data)

    @property
    def nbytes(self) -> int:
        vec = self.vectors.nbytes if self.vectors is not None else 0
        return int(self.data.nbytes) + int(vec)

    @functools.cached_property
    def count(self) -> int:
        return sum(m.entries for m in self.matrices.values())

    def to(self, device: torch.device) -> VariantLayout:
        """This layout on `device` (laid out on the host, used on the device)."""
        vec = self.vectors.to(device) if self.vectors is not None else None
        return VariantLayout(self.name, self.data.to(device), vec, self.matrices)

    def csr(self, name: str) -> CSR:
        """Matrix `name` as a host CSR (tests and reports)."""
        m = self.matrices[name]
        csr = unpack(self.data, m.slot, m.shape[1])
        assert csr is not None
        return csr

    def describe(self) -> dict[str, object]:
        return {
            "matrices": len(self.matrices),
            "kept_entries": self.count,
            "bytes": self.nbytes,
            "device": str(self.data.device),
            "format": "csr by output row: int32 rowptr, uint16 cols, bf16 values, 1/q per matrix",
        }


def layout_variant(
    name: str,
    delta: Delta,
    matrix_slots: list[str],
    fused: dict[str, list[tuple[str, int]]] | None = None,
    vector_slots: dict[str, tuple[int, int]] | None = None,
    device: torch.device | None = None,
) -> VariantLayout:
    """Lay `delta` out for the runner whose pruned matrices are `matrix_slots` (in
    order) and whose per-row vectors are `vector_slots` (name -> (offset, size)), on
    `device`. `fused` maps a slot to the matrices it stacks by rows (name, rows), for a
    runner that computes them in one product. Raises ValueError for a tensor the runner
    does not serve unmerged (its delta could not be applied in a mixed step)."""
    fused = fused or {}
    vector_slots = vector_slots or {}
    device = device or torch.device("cpu")
    member_of = {m: f for f, members in fused.items() for m, _ in members}
    slot_of = {n: i for i, n in enumerate(matrix_slots)}
    csrs: dict[str, CSR] = {}
    vectors: torch.Tensor | None = None
    for t in delta.tensors.values():
        if len(t.shape) == 1 and t.name in vector_slots:
            offset, size = vector_slots[t.name]
            if t.shape[0] != size:
                raise ValueError(f"{name}: {t.name} has {t.shape[0]} entries, the model {size}")
            if vectors is None:
                vectors = torch.zeros(sum(n for _, n in vector_slots.values()))
            # as apply's bind: the values times the scale, at their positions
            vectors[offset + t.positions] = t.values.to(torch.float32) * t.scale
        elif len(t.shape) == 2 and (t.name in slot_of or t.name in member_of):
            shape = (t.shape[0], t.shape[1])
            csrs[t.name] = CSR.from_positions(t.positions, t.values, t.scale, shape)
        else:
            raise ValueError(
                f"{name}: tensor {t.name} {t.shape} is not one the mixed-step runner serves"
            )
    for f, members in fused.items():
        parts = [csrs.pop(m, None) for m, _ in members]
        inp = next((p.shape[1] for p in parts if p is not None), 0)
        csr = fuse_rows(parts, [n for _, n in members], inp)
        if csr is not None:
            csrs[f] = csr
    matrices = {n: Matrix(slot_of[n], m.shape, m.count) for n, m in csrs.items()}
    data = pack({slot_of[n]: m for n, m in csrs.items()}, len(matrix_slots))
    return VariantLayout(name, data, vectors, matrices).to(device)


# --------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class Segment:
    """Tokens [start, end) of the step get `sign` times `layout`'s delta."""

    start: int
    end: int
    layout: VariantLayout
    sign: float


def plan_items(
    segments: list[Segment],
) -> tuple[list[VariantLayout], list[tuple[int, int, int, int]]]:
    """The step's variants and its disjoint work items {t0, t1, a, b} (indices into the
    variants, -1: none), at most ITEM_TOKENS tokens each. Where segments overlap, their
    tokens get one item with both terms: at most one added and one taken out per token
    (what a step makes: a variant's rows, less the merged one)."""
    variants: list[VariantLayout] = []
    index: dict[int, int] = {}
    for s in segments:
        if id(s.layout) not in index:
            index[id(s.layout)] = len(variants)
            variants.append(s.layout)
    cuts = sorted({s.start for s in segments} | {s.end for s in segments})
    items: list[tuple[int, int, int, int]] = []
    for lo, hi in itertools.pairwise(cuts):
        live = [s for s in segments if s.start <= lo and hi <= s.end]
        plus = [index[id(s.layout)] for s in live if s.sign > 0]
        minus = [index[id(s.layout)] for s in live if s.sign < 0]
        if len(plus) > 1 or len(minus) > 1:
            raise ValueError(
                f"tokens [{lo}, {hi}) get {len(plus)} deltas added, {len(minus)} taken out"
            )
        if not live:
            continue
        a, b = (plus or [-1])[0], (minus or [-1])[0]
        if items and items[-1][1] == lo and items[-1][2:] == (a, b):
            lo = items.pop()[0]  # the same terms go on: one item
        for t0 in range(lo, hi, ITEM_TOKENS):
            items.append((t0, min(t0 + ITEM_TOKENS, hi), a, b))
    return variants, items


class StepDeltas:
    """The delta work of one step over one packing of tokens (or sampling rows):
    the variants' buffers, their addresses (V,) and the items (W, 4), on the device."""

    def __init__(
        self,
        variants: list[VariantLayout],
        bases: torch.Tensor,
        items: torch.Tensor,
        native: bool = True,
    ) -> None:
        self.layouts = [v.data for v in variants]
        self.bases, self.items = bases, items
        if native:
            self._spmm, self._rowgather = kernels.resolve(items)
        else:
            ref = kernels.reference
            self._spmm, self._rowgather = ref.spmm_add_, ref.rowgather_add_

    @staticmethod
    def pack(p: Packer, key: str, segments: list[Segment]) -> list[VariantLayout]:
        """Put the items and addresses of `segments` in `p` under `key`."""
        variants, items = plan_items(segments)
        p.ints(f"{key}.bases", [v.address for v in variants])
        p.ints(f"{key}.items", [x for item in items for x in item], (-1, 4))
        return variants

    @classmethod
    def build(
        cls, segments: list[Segment], device: torch.device, native: bool = True
    ) -> StepDeltas:
        """On its own (one copy to `device`): tests, calibration, benchmarks."""
        p = Packer()
        variants = cls.pack(p, "d", segments)
        f = p.send(device)
        return cls(variants, f["d.bases"], f["d.items"], native)

    def __bool__(self) -> bool:
        return bool(self.items.shape[0])

    def spmm_add_(self, y: torch.Tensor, x: torch.Tensor, slot: int) -> None:
        """y (N, out) += the step's delta products of matrix `slot` over x (N, in)."""
        if self.items.shape[0]:
            self._spmm(y, x, self.layouts, self.bases, self.items, slot)

    def rowgather_add_(self, h: torch.Tensor, ids: torch.Tensor, slot: int) -> None:
        """h (N, hidden) += row ids[t] of the embedding delta in `slot`, per item."""
        if self.items.shape[0]:
            self._rowgather(h, ids, self.layouts, self.bases, self.items, slot)
