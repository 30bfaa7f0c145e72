"""Host -> device: a step's inputs travel in one copy.

A step's inputs are small and many (token ids, positions, KV slots, the delta work
items, the sampling parameters of every row). They are collected on the host as int64
fields (fp32 fields travel as their bits), concatenated, and moved to the engine's
device with one `to(device)`; each field is then a view of that one tensor (fp32 ones
are re-viewed on the device). On the CPU the copy is no copy at all. On a GPU it is an
asynchronous host-to-device copy from pageable memory (staged by the driver; it does
not wait for the device), so the step's one designed synchronization stays the sampled
tokens coming back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Packer:
    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []
        self._fields: list[tuple[str, int, int, tuple[int, ...], bool]] = []
        self._size = 0

    def _add(self, name: str, t: torch.Tensor, shape: tuple[int, ...], f32: bool) -> None:
        n = int(t.numel())
        self._parts.append(t)
        self._fields.append((name, self._size, n, shape, f32))
        self._size += n

    def ints(
        self, name: str, values: Sequence[int] | torch.Tensor, shape: tuple[int, ...] = (-1,)
    ) -> None:
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int64)
        self._add(name, t.to(torch.int64).reshape(-1), shape, False)

    def floats(self, name: str, values: Sequence[float]) -> None:
        bits = torch.tensor(values, dtype=torch.float32).view(torch.int32).to(torch.int64)
        self._add(name, bits, (-1,), True)

    def send(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every field as a tensor on `device` (one copy)."""
        if not self._parts:
            return {}
        flat = torch.cat(self._parts).to(device, non_blocking=True)
        out = {}
        for name, start, n, shape, f32 in self._fields:
            view = flat[start : start + n]
            if f32:
                view = view.to(torch.int32).view(torch.float32)
            out[name] = view.view(shape)
        return out
