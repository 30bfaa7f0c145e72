"""A variant's delta as the sparse ops read it: one int32 buffer on the engine's device.

Why one buffer per variant: a step names its variants by address (one int64 each, the
`bases` of a call), so a call costs the same whatever the number of matrices, and the
kernels (C on CPU, Triton on CUDA) find every matrix through the buffer's header. The
torch reference reads the same buffer through dtype views.

    header   HEADER int32 per matrix slot of the runner, in slot order:
             {rowptr offset (int32 units; 0: the variant leaves this matrix alone),
              cols offset (uint16 units), vals offset (units of the value dtype),
              value kind (BF16 | F32), 1/q (fp32 bits), rows, entries, 0}
    matrices per matrix the variant touches, CSR by output row:
             rowptr int32 (rows + 1,)   entry range of each row, from 0
             cols   uint16 (k,)         input column of each entry (< 65536)
             vals   bf16 or fp32 (k,)   the file's values; y += 1/q * vals @ x

Why this shape on a GPU: a program of the Triton kernel takes a block of output rows,
whose entries are one contiguous range of cols and vals (CSR order), so its loads of
them are coalesced; 16-bit columns and bf16 values make an entry 4 bytes, the same
bytes the roofline counts (DESIGN.md §2); a row block with no entries costs two loads
of rowptr. Each region starts on a 4-byte boundary.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

HEADER = 8  # int32 fields per matrix slot
ROWPTR, COLS, VALS, KIND, SCALE, ROWS, ENTRIES = range(7)  # header fields
BF16, F32 = 0, 1  # value kinds
MAX_COLS = 1 << 16  # cols are uint16


@dataclass(frozen=True)
class CSR:
    """One matrix's delta, by output row: y[r] += scale * sum_e vals[e] * x[cols[e]]."""

    rowptr: torch.Tensor  # (out+1,) int32
    cols: torch.Tensor  # (k,) uint16
    vals: torch.Tensor  # (k,) bf16 (as stored in the file) or fp32
    scale: float  # 1/q
    shape: tuple[int, int]

    @property
    def count(self) -> int:
        return int(self.vals.numel())

    @classmethod
    def from_positions(
        cls, positions: torch.Tensor, values: torch.Tensor, scale: float, shape: tuple[int, int]
    ) -> CSR:
        """From flat positions (ascending) and values of a (out, in) matrix."""
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

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k,) int64 rows and cols."""
        counts = (self.rowptr[1:] - self.rowptr[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(self.shape[0]), counts)
        return rows, self.cols.to(torch.int32).to(torch.int64)

    def scaled(self) -> torch.Tensor:
        """(k,) fp32 values times 1/q: the same product as apply's `bind`."""
        return self.vals.to(torch.float32) * self.scale


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


def _even(n: int) -> int:
    return n + (n & 1)


def _scale_bits(scale: float) -> int:
    return int(struct.unpack("<i", struct.pack("<f", scale))[0])


def pack(matrices: dict[int, CSR], n_slots: int) -> torch.Tensor:
    """The int32 host buffer of a variant whose matrix in slot i is matrices[i]."""
    total = HEADER * n_slots
    places = {}
    for slot, m in sorted(matrices.items()):
        k = m.count
        rp = total
        co = rp + m.shape[0] + 1
        vo = co + _even(k) // 2
        end = vo + (k if m.vals.dtype == torch.float32 else _even(k) // 2)
        places[slot] = (rp, co, vo)
        total = end
    buf = torch.zeros(total, dtype=torch.int32)
    as16 = buf.view(torch.int16)
    for slot, m in matrices.items():
        rp, co, vo = places[slot]
        k = m.count
        f32 = m.vals.dtype == torch.float32
        buf[rp : rp + m.shape[0] + 1] = m.rowptr
        as16[2 * co : 2 * co + k] = m.cols.view(torch.int16)
        if f32:
            buf.view(torch.float32)[vo : vo + k] = m.vals
        else:
            buf.view(torch.bfloat16)[2 * vo : 2 * vo + k] = m.vals
        head = [rp, 2 * co, vo if f32 else 2 * vo, F32 if f32 else BF16]
        head += [_scale_bits(m.scale), m.shape[0], k, 0]
        buf[HEADER * slot : HEADER * (slot + 1)] = torch.tensor(head, dtype=torch.int32)
    return buf


def unpack(buf: torch.Tensor, slot: int, inp: int) -> CSR | None:
    """The CSR of matrix `slot` in a packed buffer (a copy on the host), None if absent."""
    buf = buf.cpu()
    head = buf[HEADER * slot : HEADER * (slot + 1)].tolist()
    rp, co, vo, kind, bits, rows, k = head[:7]
    if rp == 0:
        return None
    cols = buf.view(torch.int16)[co : co + k].view(torch.uint16).clone()
    if kind == F32:
        vals = buf.view(torch.float32)[vo : vo + k].clone()
    else:
        vals = buf.view(torch.bfloat16)[vo : vo + k].clone()
    scale = struct.unpack("<f", struct.pack("<i", bits))[0]
    return CSR(buf[rp : rp + rows + 1].clone(), cols, vals, scale, (rows, inp))
