"""Sparse delta products for mixed-variant steps.

A variant's delta is laid out once per matrix of the model as CSR by output row
(`VariantLayout`): rowptr int32 (out+1,), cols uint16 (k,), vals fp32 (k,) already
multiplied by the tensor's 1/q. Its 1-D deltas (norm weights, biases) stay dense.

One step serves rows of several variants. The step's tokens are packed so that each
variant's tokens are contiguous; a `Segments` table says, per matrix, which token
range gets which variant's delta with which sign (-1 takes a merged variant back
out). Then every pruned linear layer computes

    y = x @ W.T                         (the resident weights, one GEMM for all rows)
    y[t] += sign * x[t] @ delta_v.T     (spmm_add_, one call for all segments)

The product runs in a small C kernel (delta_kernels.c, compiled once with the
system's C compiler and cached under ~/.cache/deltaserve/kernels). Where no
compiler is available, the same maths runs as torch ops per segment: correct,
slower (call overhead per segment and matrix).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch

from deltastore.format import Delta
from deltastore.paths import cache_dir

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("delta_kernels.c")
MAX_COLS = 1 << 16  # cols are uint16


class KernelChoice(StrEnum):
    AUTO = "auto"  # the C kernel when it builds, else torch
    C = "c"  # the C kernel or an error
    TORCH = "torch"  # torch ops only


class KernelUnavailable(RuntimeError):
    pass


_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def _build(path: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc)")
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cc, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-o", str(tmp), str(SOURCE)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", b"") or b""
        raise KernelUnavailable(f"{' '.join(cmd)} failed: {e} {err.decode()[-500:]}") from e
    os.replace(tmp, path)


def load_kernels() -> ctypes.CDLL:
    """The compiled kernels (built on first use, cached by source and machine)."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise KernelUnavailable(_lib_error)
        key = hashlib.sha256(SOURCE.read_bytes() + platform.machine().encode())
        key.update(Path("/proc/cpuinfo").read_bytes() if Path("/proc/cpuinfo").exists() else b"")
        path = cache_dir() / "kernels" / f"delta_kernels-{key.hexdigest()[:16]}.so"
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                _build(path)
            lib = ctypes.CDLL(str(path))
        except (KernelUnavailable, OSError) as e:
            _lib_error = str(e)
            raise KernelUnavailable(_lib_error) from e
        p, i64, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p
        for name in ("spmm_add_f32", "spmm_add_bf16"):
            getattr(lib, name).argtypes = [p, i64, p, i64, i64, i64, i64, p, f, i64, i64, i64]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("rowgather_add_f32", "rowgather_add_bf16"):
            getattr(lib, name).argtypes = [p, i64, p, p, f, i64]
            getattr(lib, name).restype = None
        _lib = lib
        return lib


def use_kernels(choice: KernelChoice, device: torch.device) -> bool:
    """Whether to run the C kernel (CPU only); raises if `c` was asked for and fails."""
    if choice is KernelChoice.TORCH or device.type != "cpu":
        return False
    try:
        load_kernels()
        return True
    except KernelUnavailable as e:
        if choice is KernelChoice.C:
            raise
        log.warning("sparse delta kernel unavailable, using torch ops: %s", e)
        return False


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class CSR:
    """One matrix's delta, by output row: y[r] += scale * sum_e vals[e] * x[cols[e]]."""

    rowptr: torch.Tensor  # (out+1,) int32
    cols: torch.Tensor  # (k,) uint16
    vals: torch.Tensor  # (k,) bf16 (as stored in the file) or fp32
    scale: float  # 1/q
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.rowptr.nbytes + self.cols.nbytes + self.vals.nbytes

    @property
    def count(self) -> int:
        return int(self.vals.numel())

    @classmethod
    def from_positions(
        cls, positions: torch.Tensor, values: torch.Tensor, scale: float, shape: tuple[int, int]
    ) -> CSR:
        out, inp = shape
        if inp > MAX_COLS:
            raise ValueError(f"matrix of {inp} columns: the delta layout holds at most {MAX_COLS}")
        if values.dtype not in (torch.bfloat16, torch.float32):
            values = values.to(torch.float32)
        rows = torch.div(positions, inp, rounding_mode="floor")
        counts = torch.bincount(rows, minlength=out)
        rowptr = torch.zeros(out + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=rowptr[1:])
        cols = (positions - rows * inp).to(torch.int32).to(torch.uint16)
        return cls(rowptr.to(torch.int32), cols, values.contiguous(), float(scale), shape)

    def record(self) -> list[int]:
        """rowptr, cols, vals addresses and the value-dtype flag (a kernel record's middle)."""
        f32 = int(self.vals.dtype == torch.float32)
        return [self.rowptr.data_ptr(), self.cols.data_ptr(), self.vals.data_ptr(), f32]

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k,) int64 rows and cols, for the torch path."""
        counts = (self.rowptr[1:] - self.rowptr[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(self.shape[0]), counts)
        return rows, self.cols.to(torch.int32).to(torch.int64)

    def scaled(self) -> torch.Tensor:
        """(k,) fp32 values times 1/q: the same product as apply's `bind`."""
        return self.vals.to(torch.float32) * self.scale


@dataclass(eq=False)
class VariantLayout:
    """A variant's delta laid out for mixed steps: CSR per matrix, dense vectors.

    matrices: name -> CSR for every 2-D tensor the delta touches.
    vectors:  name -> (n,) fp32 dense delta of a 1-D tensor (norm weight, bias).
    records: (M, 4) int64 {rowptr, cols, vals, vals_are_f32} per matrix slot of the
    runner (zeros where the delta leaves that matrix alone); scales: (M,) fp32 1/q.
    A step's tables copy rows of these, so building a step costs a few torch ops
    whatever the number of matrices.
    """

    name: str
    matrices: dict[str, CSR]
    vectors: dict[str, torch.Tensor]
    records: torch.Tensor
    scales: torch.Tensor
    _stacks: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def vector_stack(self, names: list[str], size: int) -> torch.Tensor:
        """(K, size) fp32: the deltas of the 1-D tensors `names` of that size (zero rows
        for the ones this variant leaves alone); cached per list of names."""
        key = tuple(names)
        stack = self._stacks.get(key)
        if stack is None:
            stack = torch.zeros((len(names), size))
            for i, n in enumerate(names):
                v = self.vectors.get(n)
                if v is not None and v.shape == (size,):
                    stack[i] = v
            self._stacks[key] = stack
        return stack

    @property
    def nbytes(self) -> int:
        n = sum(m.nbytes for m in self.matrices.values())
        return n + sum(v.nbytes for v in self.vectors.values()) + self.records.nbytes

    @functools.cached_property
    def count(self) -> int:
        return sum(m.count for m in self.matrices.values())

    def describe(self) -> dict[str, object]:
        return {
            "matrices": len(self.matrices),
            "vectors": len(self.vectors),
            "kept_entries": self.count,
            "bytes": self.nbytes,
            "format": "csr by output row: int32 rowptr, uint16 cols, bf16 values, 1/q per matrix",
        }


def fuse_rows(parts: list[CSR | None], rows: list[int], inp: int) -> CSR | None:
    """One CSR for matrices stacked by rows (q/k/v, gate/up): parts[i] covers `rows[i]`
    rows, None where the delta leaves that member alone. Values stay bf16 when every
    part has bf16 values and one scale; otherwise they become fp32 times their scale."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    same = all(p.vals.dtype == torch.bfloat16 for p in present) and (
        len({p.scale for p in present}) == 1
    )
    rowptrs, cols, vals = [torch.zeros(1, dtype=torch.int64)], [], []
    nnz = 0
    for part, n in zip(parts, rows, strict=True):
        if part is None:
            rowptrs.append(torch.full((n,), nnz, dtype=torch.int64))
            continue
        rowptrs.append(part.rowptr[1:].to(torch.int64) + nnz)
        cols.append(part.cols)
        vals.append(part.vals if same else part.scaled())
        nnz += part.count
    return CSR(
        torch.cat(rowptrs).to(torch.int32),
        torch.cat(cols),
        torch.cat(vals).contiguous(),
        present[0].scale if same else 1.0,
        (sum(rows), inp),
    )


def layout_variant(
    name: str,
    delta: Delta,
    matrix_slots: list[str],
    fused: dict[str, list[tuple[str, int]]] | None = None,
) -> VariantLayout:
    """Lay `delta` out for the runner whose pruned matrices are `matrix_slots` (in
    order). `fused` maps a slot to the matrices it stacks by rows (name, rows), for a
    runner that computes them in one product. Raises ValueError for a 2-D tensor the
    runner does not treat as a matrix (its delta could not be served unmerged)."""
    fused = fused or {}
    member_of = {m: f for f, members in fused.items() for m, _ in members}
    slot_of = {n: i for i, n in enumerate(matrix_slots)}
    matrices: dict[str, CSR] = {}
    vectors: dict[str, torch.Tensor] = {}
    for t in delta.tensors.values():
        if len(t.shape) == 1:
            dense = torch.zeros(t.shape[0], dtype=torch.float32)
            dense[t.positions] = t.values.to(torch.float32) * t.scale  # as apply's bind
            vectors[t.name] = dense
        elif len(t.shape) == 2 and (t.name in slot_of or t.name in member_of):
            shape = (t.shape[0], t.shape[1])
            matrices[t.name] = CSR.from_positions(t.positions, t.values, t.scale, shape)
        else:
            raise ValueError(
                f"{name}: tensor {t.name} {t.shape} is not a matrix the mixed-step runner knows"
            )
    for f, members in fused.items():
        parts = [matrices.pop(m, None) for m, _ in members]
        inp = next((p.shape[1] for p in parts if p is not None), 0)
        csr = fuse_rows(parts, [n for _, n in members], inp)
        if csr is not None:
            matrices[f] = csr
    records = torch.zeros((len(matrix_slots), 4), dtype=torch.int64)
    scales = torch.zeros(len(matrix_slots), dtype=torch.float32)
    for n, m in matrices.items():
        records[slot_of[n]] = torch.tensor(m.record())
        scales[slot_of[n]] = m.scale
    return VariantLayout(name, matrices, vectors, records, scales)


# --------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class Segment:
    """Tokens [start, end) of the step get `sign` times `layout`'s delta."""

    start: int
    end: int
    layout: VariantLayout
    sign: float


class StepDeltas:
    """The delta work of one step over one packing of tokens.

    tables: (M, S, 8) int64 kernel records {start, end, rowptr, cols, vals, f32, 0, 0}
    per matrix slot and segment; scales: (M, S) fp32 sign * 1/q.
    """

    def __init__(self, segments: list[Segment], n_slots: int, kernels: bool) -> None:
        self.segments = segments
        self.kernels = kernels
        self.multi_token = any(g.end - g.start > 1 for g in segments)
        self.single_token = any(g.end - g.start == 1 for g in segments)
        s = len(segments)
        self.tables = torch.zeros((n_slots, s, 8), dtype=torch.int64)
        self.scales = torch.zeros((n_slots, s), dtype=torch.float32)
        if s and kernels:
            self.tables[:, :, 0] = torch.tensor([g.start for g in segments])
            self.tables[:, :, 1] = torch.tensor([g.end for g in segments])
            self.tables[:, :, 2:6] = torch.stack([g.layout.records for g in segments], 1)
            signs = torch.tensor([g.sign for g in segments], dtype=torch.float32)
            self.scales = torch.stack([g.layout.scales for g in segments], 1) * signs

    def __bool__(self) -> bool:
        return bool(self.segments)

    def spmm_add_(self, y: torch.Tensor, x: torch.Tensor, slot: int, name: str) -> None:
        """y (N, out) += the step's delta products of matrix `name` over x (N, in)."""
        if not self.segments:
            return
        if self.kernels:
            _kernel_spmm(
                y, x, self.tables[slot], self.scales[slot], self.single_token, self.multi_token
            )
            return
        for g in self.segments:
            csr = g.layout.matrices.get(name)
            if csr is not None:
                rows, cols = csr.rows_cols()
                part = x[g.start : g.end].float().index_select(1, cols) * (csr.scaled() * g.sign)
                acc = torch.zeros((g.end - g.start, y.shape[1]), dtype=torch.float32)
                acc.index_add_(1, rows, part)
                y[g.start : g.end] += acc.to(y.dtype)

    def rowgather_add_(self, h: torch.Tensor, ids: torch.Tensor, slot: int, name: str) -> None:
        """h (N, hidden) += row ids[t] of the embedding delta `name`, per segment."""
        if not self.segments:
            return
        if self.kernels:
            _kernel_rowgather(h, ids, self.tables[slot], self.scales[slot])
            return
        for g in self.segments:
            csr = g.layout.matrices.get(name)
            if csr is None:
                continue
            for t in range(g.start, g.end):
                r = int(ids[t])
                e0, e1 = int(csr.rowptr[r]), int(csr.rowptr[r + 1])
                cols = csr.cols[e0:e1].to(torch.int32).to(torch.int64)
                vals = csr.vals[e0:e1].to(torch.float32) * (csr.scale * g.sign)
                h[t].index_add_(0, cols, vals.to(h.dtype))


def _check(t: torch.Tensor) -> None:
    if t.device.type != "cpu" or t.stride(-1) != 1 or t.dim() != 2:
        raise ValueError(f"kernel needs a 2-D CPU tensor with unit stride, got {t.shape}")
    if t.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"kernel supports float32 and bfloat16, got {t.dtype}")


def _kernel_spmm(
    y: torch.Tensor,
    x: torch.Tensor,
    table: torch.Tensor,
    scales: torch.Tensor,
    single: bool,
    multi: bool,
) -> None:
    """y (N, out) += the products over x (N, in); both fp32 or both bf16, rows with unit
    stride (what F.linear takes and returns). The kernel converts x itself."""
    if x.dtype != y.dtype or x.stride(-1) != 1 or y.stride(-1) != 1:
        _check(x)
        _check(y)
        raise TypeError(f"x is {x.dtype}, y is {y.dtype}: the kernel needs one dtype")
    lib = load_kernels()
    fn = lib.spmm_add_f32 if y.dtype == torch.float32 else lib.spmm_add_bf16
    n, inp = x.shape
    rc = fn(
        y.data_ptr(),
        y.stride(0),
        x.data_ptr(),
        x.stride(0),
        n,
        inp,
        y.shape[1],
        table.data_ptr(),
        scales.data_ptr(),
        len(table),
        int(single),
        int(multi),
    )
    if rc != 0:
        raise MemoryError(f"sparse delta kernel could not allocate buffers for {n}x{inp}")


def _kernel_rowgather(
    h: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, scales: torch.Tensor
) -> None:
    _check(h)
    if ids.dtype != torch.int64 or not ids.is_contiguous():
        raise TypeError("ids must be contiguous int64")
    lib = load_kernels()
    fn = lib.rowgather_add_f32 if h.dtype == torch.float32 else lib.rowgather_add_bf16
    fn(h.data_ptr(), h.stride(0), ids.data_ptr(), table.data_ptr(), scales.data_ptr(), len(table))
