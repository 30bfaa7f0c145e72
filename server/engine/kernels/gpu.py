"""The CUDA implementation of the sparse delta ops: Triton kernels (the SGMV/SBMM idea
of Punica and DeltaZip, for unstructured CSR deltas).

spmm_add_: one launch per product per step, grid (row blocks, items). A program takes
BLOCK_R output rows of the matrix and one item (a token range with up to two variant
terms, +a and -b). For each token of the item it walks the rows' entries in tiles of
(BLOCK_R, BLOCK_E) (CSR order: a row block's entries are one contiguous range, so tile
loads of cols and vals are coalesced), gathers x at the columns (x's row sits in L1/L2),
multiplies in fp32 and reduces across the tile's columns, sums the item's two terms in
registers and updates y once per token: y = round(y + acc). Items never overlap in
tokens (the step packer splits them so), so no two programs write one element. A row
block without entries costs two loads of rowptr per term and writes nothing (its y
keeps every bit).

rowgather_add_: grid (items,): for each token, the entries of row ids[t] are added into
h[t] at their columns; the two terms run one after the other with a barrier between.

Work per byte: an entry is 4 bytes (uint16 column, bf16 value) and 2 flops per token,
so a decode step is bound by reading the entries, as the dense GEMM is bound by reading
the weights (BENCHMARKS.md, "GPU roofline").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.engine.kernels.layout import HEADER

BLOCK_R = 16  # output rows per program
BLOCK_E = 64  # entries per row per tile
BLOCK_G = 128  # entries per tile of the row gather


@triton.jit
def _spmm_kernel(
    y_ptr,
    x_ptr,
    bases_ptr,
    items_ptr,
    ldy,
    ldx,
    out,
    slot,
    HEADER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid_r = tl.program_id(0)
    w = tl.program_id(1)
    t0 = tl.load(items_ptr + 4 * w)
    t1 = tl.load(items_ptr + 4 * w + 1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < out
    lanes = tl.arange(0, BLOCK_E)
    for t in range(t0, t1):
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        touched = tl.zeros([BLOCK_R], dtype=tl.int32)
        for term in tl.static_range(2):
            v = tl.load(items_ptr + 4 * w + 2 + term)
            if v >= 0:
                buf = tl.load(bases_ptr + v).to(tl.pointer_type(tl.int32))
                hdr = buf + slot * HEADER
                rp_off = tl.load(hdr)
                if rp_off != 0:
                    scale = tl.load(hdr + 4).to(tl.float32, bitcast=True) * (1.0 - 2.0 * term)
                    kind = tl.load(hdr + 3)
                    cols_p = buf.to(tl.pointer_type(tl.int16)) + tl.load(hdr + 1)
                    f32_p = buf.to(tl.pointer_type(tl.float32)) + tl.load(hdr + 2)
                    b16_p = buf.to(tl.pointer_type(tl.bfloat16)) + tl.load(hdr + 2)
                    lo = tl.load(buf + rp_off + rows, mask=rmask, other=0)
                    hi = tl.load(buf + rp_off + rows + 1, mask=rmask, other=0)
                    n = hi - lo
                    touched = touched | (n > 0).to(tl.int32)
                    longest = tl.max(n, axis=0)
                    part = tl.zeros([BLOCK_R], dtype=tl.float32)
                    for k in range(0, longest, BLOCK_E):
                        e = lo[:, None] + k + lanes[None, :]
                        m = (k + lanes[None, :]) < n[:, None]
                        c = tl.load(cols_p + e, mask=m, other=0).to(tl.int32) & 0xFFFF
                        if kind == 1:
                            vals = tl.load(f32_p + e, mask=m, other=0.0)
                        else:
                            vals = tl.load(b16_p + e, mask=m, other=0.0).to(tl.float32)
                        xv = tl.load(x_ptr + t * ldx + c, mask=m, other=0.0).to(tl.float32)
                        part += tl.sum(vals * xv, axis=1)
                    acc += scale * part
        keep = rmask & (touched != 0)
        yp = y_ptr + t * ldy + rows
        cur = tl.load(yp, mask=keep, other=0.0).to(tl.float32)
        tl.store(yp, (cur + acc).to(y_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _rowgather_kernel(
    h_ptr,
    ids_ptr,
    bases_ptr,
    items_ptr,
    ldh,
    slot,
    HEADER: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    w = tl.program_id(0)
    t0 = tl.load(items_ptr + 4 * w)
    t1 = tl.load(items_ptr + 4 * w + 1)
    lanes = tl.arange(0, BLOCK_G)
    for t in range(t0, t1):
        row = tl.load(ids_ptr + t)
        for term in tl.static_range(2):
            v = tl.load(items_ptr + 4 * w + 2 + term)
            if v >= 0:
                buf = tl.load(bases_ptr + v).to(tl.pointer_type(tl.int32))
                hdr = buf + slot * HEADER
                rp_off = tl.load(hdr)
                if rp_off != 0:
                    scale = tl.load(hdr + 4).to(tl.float32, bitcast=True) * (1.0 - 2.0 * term)
                    kind = tl.load(hdr + 3)
                    cols_p = buf.to(tl.pointer_type(tl.int16)) + tl.load(hdr + 1)
                    f32_p = buf.to(tl.pointer_type(tl.float32)) + tl.load(hdr + 2)
                    b16_p = buf.to(tl.pointer_type(tl.bfloat16)) + tl.load(hdr + 2)
                    lo = tl.load(buf + rp_off + row)
                    hi = tl.load(buf + rp_off + row + 1)
                    for k in range(lo, hi, BLOCK_G):
                        e = k + lanes
                        m = e < hi
                        c = tl.load(cols_p + e, mask=m, other=0).to(tl.int32) & 0xFFFF
                        if kind == 1:
                            vals = tl.load(f32_p + e, mask=m, other=0.0)
                        else:
                            vals = tl.load(b16_p + e, mask=m, other=0.0).to(tl.float32)
                        hp = h_ptr + t * ldh + c
                        cur = tl.load(hp, mask=m, other=0.0).to(tl.float32)
                        tl.store(hp, (cur + scale * vals).to(h_ptr.dtype.element_ty), mask=m)
            tl.debug_barrier()  # the second term reads what the first wrote


def spmm_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    layouts: list[torch.Tensor],
    bases: torch.Tensor,
    items: torch.Tensor,
    slot: int,
) -> None:
    n_items = items.shape[0]
    if not n_items:
        return
    out = y.shape[1]
    grid = (triton.cdiv(out, BLOCK_R), n_items)
    _spmm_kernel[grid](
        y,
        x,
        bases,
        items,
        y.stride(0),
        x.stride(0),
        out,
        slot,
        HEADER=HEADER,
        BLOCK_R=BLOCK_R,
        BLOCK_E=BLOCK_E,
    )


def rowgather_add_(
    h: torch.Tensor,
    ids: torch.Tensor,
    layouts: list[torch.Tensor],
    bases: torch.Tensor,
    items: torch.Tensor,
    slot: int,
) -> None:
    n_items = items.shape[0]
    if not n_items:
        return
    _rowgather_kernel[(n_items,)](
        h, ids, bases, items, h.stride(0), slot, HEADER=HEADER, BLOCK_G=BLOCK_G
    )
