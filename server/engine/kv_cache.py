"""The KV cache: static slots, preallocated once from a byte budget.

Each running sequence owns one slot for its whole life; a slot holds max_len
positions for every layer:

    k[layer], v[layer]: (slots, kv_heads, max_len, head_dim)

No `torch.cat` per step and no cache growth: a step writes its new keys and values
in place (`write_`) and attention reads slices of the slots. Slots are handed out
lowest first, so a light load touches (and, with lazily mapped pages, commits)
only the memory it uses.

The cache is allocated uninitialized. Batched decode attention reads every row's
slot up to the longest row's length and masks the tail; a masked position still
multiplies its value by a zero weight, so it must hold a finite number (NaN·0 is
NaN). `clean_` zeroes each slot's never-written tail before it is first read, in
chunks of CLEAN_CHUNK positions; positions a sequence wrote stay finite after it
leaves, so a slot is cleaned once in its life.
"""

from __future__ import annotations

import heapq

import torch

CLEAN_CHUNK = 128


class KVCache:
    def __init__(
        self,
        n_layers: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        budget_bytes: int,
        max_slots: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        per_slot = 2 * n_layers * kv_heads * max_len * head_dim * dtype.itemsize
        slots = min(max_slots, budget_bytes // per_slot)
        if slots < 1:
            raise ValueError(
                f"KV cache budget {budget_bytes} B holds no sequence of {max_len} positions "
                f"({per_slot} B per slot): raise kv_cache_bytes or lower max_model_len"
            )
        self.n_slots, self.max_len, self.slot_bytes = int(slots), max_len, per_slot
        shape = (self.n_slots, kv_heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._free = list(range(self.n_slots))  # a heap: lowest slot first
        self._clean = [0] * self.n_slots  # positions [0, clean) of the slot hold finite values

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.slot_bytes

    @property
    def used(self) -> int:
        return self.n_slots - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV slot")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def clean_(self, slot: int, written: int, upto: int) -> None:
        """Make positions [0, upto) of `slot` finite in every layer: [0, written) hold
        the occupant's own keys and values; zero what was never written after that."""
        if upto <= self._clean[slot]:
            return
        start = max(self._clean[slot], written)
        end = min(-(-upto // CLEAN_CHUNK) * CLEAN_CHUNK, self.max_len)
        for k, v in zip(self.k, self.v, strict=True):
            k[slot, :, start:end].zero_()
            v[slot, :, start:end].zero_()
        self._clean[slot] = end

    def clean_for_decode(self, rows: list[tuple[int, int]]) -> None:
        """Batched decode attention reads every row's slot up to the longest row: make
        that range finite in each row's slot. `rows`: (slot, length) of each decode row."""
        upto = max((n for _, n in rows), default=0)
        for slot, n in rows:
            self.clean_(slot, n, upto)

    def write_(
        self,
        layer: int,
        slots: torch.Tensor,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Store k, v (N, kv_heads, head_dim) of tokens at (slots[t], positions[t])."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v
