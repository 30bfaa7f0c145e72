"""The sparse delta ops in plain torch: any device without a native kernel, and the
reference the native kernels are tested against.

Vectorized: every entry of every variant of the call is expanded at once (index
arithmetic with repeat_interleave), each (token, entry) product is one element, and
one `index_put_` with accumulation adds them, in fp32, to the output; no Python loop
over tokens, items or variants. The sizes come from the data, so on a GPU this costs
host syncs: it is correct everywhere and fast nowhere, which is what a reference is for.
"""

from __future__ import annotations

import torch

from server.engine.kernels.layout import COLS, ENTRIES, F32, HEADER, KIND, ROWPTR, ROWS, SCALE, VALS


class _Entries:
    """Every entry of matrix `slot` in every variant of a call, in (variant, row) order.

    var, row, col (K,) int64, val (K,) fp32 times the variant's 1/q; per variant
    (V,): present, count, first (index of its first entry), and for its rowptr the
    offset in the concatenated buffer."""

    def __init__(self, layouts: list[torch.Tensor], slot: int) -> None:
        dev = layouts[0].device
        sizes = torch.tensor([int(b.numel()) for b in layouts], dtype=torch.int64, device=dev)
        starts = torch.cumsum(sizes, 0) - sizes
        self.buf = buf = torch.cat(layouts)  # (sum of sizes,) int32
        heads = buf[(starts + HEADER * slot)[:, None] + torch.arange(HEADER, device=dev)]
        heads = heads.to(torch.int64)  # (V, HEADER)
        self.present = heads[:, ROWPTR] != 0
        self.count = torch.where(self.present, heads[:, ENTRIES], 0)
        self.first = torch.cumsum(self.count, 0) - self.count
        rows = torch.where(self.present, heads[:, ROWS], 0)
        self.rowptr_at = starts + heads[:, ROWPTR]  # (V,) int32 index of each rowptr
        scale = heads[:, SCALE].to(torch.int32).view(torch.float32)

        v_ids = torch.arange(len(layouts), device=dev)
        self.var = var = torch.repeat_interleave(v_ids, self.count)  # (K,)
        local = torch.arange(var.numel(), device=dev) - self.first[var]
        # rows: each variant's rowptr diffs, repeated by row (a variant's last rowptr
        # element starts no row)
        rp_len = torch.where(self.present, rows + 1, 0)
        rp_var = torch.repeat_interleave(v_ids, rp_len)
        rp_row = (
            torch.arange(rp_var.numel(), device=dev) - (torch.cumsum(rp_len, 0) - rp_len)[rp_var]
        )
        rp = buf[self.rowptr_at[rp_var] + rp_row].to(torch.int64)
        starts_row = rp_row < rows[rp_var]
        nxt = torch.cat([rp[1:], rp[-1:]]) if rp.numel() else rp
        per_row = torch.where(starts_row, nxt - rp, 0)
        self.row = torch.repeat_interleave(rp_row, per_row)
        as16 = buf.view(torch.int16)
        col_at = 2 * starts[var] + heads[var, COLS] + local
        self.col = as16[col_at].to(torch.int64) & 0xFFFF
        f32 = heads[var, KIND] == F32
        last32, last16 = buf.numel() - 1, 2 * buf.numel() - 1
        v32 = buf.view(torch.float32)[(starts[var] + heads[var, VALS] + local).clamp(max=last32)]
        at16 = (2 * starts[var] + heads[var, VALS] + local).clamp(max=last16)
        v16 = buf.view(torch.bfloat16)[at16].to(torch.float32)
        self.val = torch.where(f32, v32, v16) * scale[var]


def _terms(items: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Items (W, 4) {t0, t1, a, b} -> the terms that add something: t0, t1, variant,
    sign (T,) each (+ for a, - for b)."""
    t0 = items[:, 0].repeat_interleave(2)
    t1 = items[:, 1].repeat_interleave(2)
    var = items[:, 2:4].reshape(-1)
    sign = torch.tensor([1.0, -1.0], device=items.device).repeat(items.shape[0])
    keep = var >= 0
    keep &= present[var.clamp(min=0)]
    return t0[keep], t1[keep], var[keep], sign[keep]


def _expand(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For groups of `counts` elements: the group of each element and its index in it."""
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    index = (
        torch.arange(group.numel(), device=counts.device)
        - (torch.cumsum(counts, 0) - counts)[group]
    )
    return group, index


def _add_(y: torch.Tensor, acc: torch.Tensor, touched: torch.Tensor) -> None:
    """y += acc in y's dtype, on the touched tokens only (others keep every bit)."""
    y.copy_(torch.where(touched[:, None], (y.to(torch.float32) + acc).to(y.dtype), y))


def spmm_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    layouts: list[torch.Tensor],
    bases: torch.Tensor,
    items: torch.Tensor,
    slot: int,
) -> None:
    """y (N, out) += for each item, x[t0:t1] @ (Δ_a - Δ_b).T of matrix `slot`."""
    del bases  # addresses are for the native kernels
    if not layouts or not items.numel():
        return
    e = _Entries(layouts, slot)
    t0, t1, var, sign = _terms(items, e.present)
    ntok, nent = t1 - t0, e.count[var]
    term, j = _expand(ntok * nent)
    token = t0[term] + torch.div(j, nent[term], rounding_mode="floor")
    entry = e.first[var[term]] + j % nent[term]
    contrib = x[token, e.col[entry]].to(torch.float32) * e.val[entry] * sign[term]
    acc = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    acc.index_put_((token, e.row[entry]), contrib, accumulate=True)
    touched = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    covered, k = _expand(ntok)
    touched[t0[covered] + k] = True
    _add_(y, acc, touched)


def rowgather_add_(
    h: torch.Tensor,
    ids: torch.Tensor,
    layouts: list[torch.Tensor],
    bases: torch.Tensor,
    items: torch.Tensor,
    slot: int,
) -> None:
    """h (N, hidden) += for each item and token t in it, row ids[t] of (Δ_a - Δ_b)."""
    del bases
    if not layouts or not items.numel():
        return
    e = _Entries(layouts, slot)
    t0, t1, var, sign = _terms(items, e.present)
    pair, k = _expand(t1 - t0)  # (token, term) pairs
    token = t0[pair] + k
    at = e.rowptr_at[var[pair]] + ids[token]
    lo = e.buf[at].to(torch.int64)
    hi = e.buf[at + 1].to(torch.int64)
    which, j = _expand(hi - lo)
    entry = e.first[var[pair[which]]] + lo[which] + j
    acc = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    acc.index_put_((token[which], e.col[entry]), e.val[entry] * sign[pair[which]], accumulate=True)
    touched = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
    touched[token] = True
    _add_(h, acc, touched)
