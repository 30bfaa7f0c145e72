"""The hot path: scatter-add a delta into resident weights, and revert it bit-exactly.

The resident parameters live in one flat buffer per (device, dtype) (`FlatWeights`);
each parameter is a view into it. A delta bound to those weights (`BoundDelta`) is
then one index vector and one value vector per buffer, so applying a whole delta is
four kernels per buffer, whatever the number of tensors:

    old = flat[index]                    # gather: the undo log
    flat[index] = (old.float() + values).to(dtype)
    ...
    flat[index] = old                    # revert: scatter the originals back

Reverting restores the exact bits that were there; subtracting the delta again would
not (floating point), so it is never done.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from deltastore.format import Delta, DeltaMeta, TensorDelta


class BaseMismatchError(ValueError):
    """A delta made against a different base than the resident one."""


@dataclass(frozen=True)
class Slot:
    group: int
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class FlatWeights:
    """Named tensors re-homed into one contiguous buffer per (device, dtype).

    `from_module` rebinds every parameter of a model to a view of the buffers, so the
    model computes with whatever the buffers hold. Tied parameters appear once.
    """

    def __init__(
        self,
        named: Iterable[tuple[str, torch.Tensor]],
        fingerprint: str | Callable[[], str] | None = None,
    ):
        self._fingerprint = fingerprint
        self.buffers: list[torch.Tensor] = []
        self.slots: dict[str, Slot] = {}
        self._applied: list[int] = []  # ids of applied undo logs, innermost last
        self._ids = itertools.count()
        items = list(named)
        keys = sorted({(str(t.device), t.dtype) for _, t in items}, key=str)
        for group, (device, dtype) in enumerate(keys):
            members = [(n, t) for n, t in items if (str(t.device), t.dtype) == (device, dtype)]
            total = sum(t.numel() for _, t in members)
            flat = torch.empty(total, dtype=dtype, device=device)
            offset = 0
            for name, t in members:
                view = flat[offset : offset + t.numel()].view(t.shape)
                view.copy_(t.detach())
                if isinstance(t, nn.Parameter):
                    t.data = view  # the model now computes from the buffer
                self.slots[name] = Slot(group, offset, tuple(t.shape))
                offset += t.numel()
            self.buffers.append(flat)

    @classmethod
    def from_module(
        cls, module: nn.Module, fingerprint: str | Callable[[], str] | None = None
    ) -> FlatWeights:
        return cls(module.named_parameters(), fingerprint)

    @property
    def fingerprint(self) -> str | None:
        """The base's fingerprint (None: unknown, deltas are not checked against it).
        Given as a function (taken in the background), the first read waits for it."""
        if callable(self._fingerprint):
            self._fingerprint = self._fingerprint()
        return self._fingerprint

    def tensor(self, name: str) -> torch.Tensor:
        slot = self.slots[name]
        return self.buffers[slot.group][slot.offset : slot.offset + slot.numel].view(slot.shape)

    @property
    def applied_depth(self) -> int:
        return len(self._applied)

    @property
    def innermost(self) -> int | None:
        """The token of the undo log applied last (None: nothing applied)."""
        return self._applied[-1] if self._applied else None

    def forget_applied(self) -> None:
        """Drop the record of applied deltas (the weights were restored another way)."""
        self._applied.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


@dataclass(frozen=True)
class BoundGroup:
    group: int
    index: torch.Tensor  # (k,) int64 flat positions in the buffer, on its device
    values: torch.Tensor  # (k,) fp32 rescaled delta values, on the buffer's device


@dataclass(frozen=True)
class BoundDelta:
    """A delta laid out for one `FlatWeights`: the "delta on the device" tier."""

    groups: tuple[BoundGroup, ...]

    @property
    def count(self) -> int:
        return sum(int(g.index.numel()) for g in self.groups)

    @property
    def nbytes(self) -> int:
        return sum(g.index.nbytes + g.values.nbytes for g in self.groups)


@dataclass(frozen=True)
class UndoLog:
    """The original values a delta overwrote, to scatter back on revert."""

    token: int
    groups: tuple[tuple[int, torch.Tensor, torch.Tensor], ...]  # (group, index, old values)

    @property
    def nbytes(self) -> int:
        return sum(old.nbytes for _, _, old in self.groups)


def check_base(delta: Delta | DeltaMeta, weights: FlatWeights) -> None:
    fp = (delta.meta if isinstance(delta, Delta) else delta).base_fingerprint
    if weights.fingerprint is not None and fp != weights.fingerprint:
        raise BaseMismatchError(
            f"delta was made against base {fp}, the resident base is {weights.fingerprint}"
        )


def _slot(name: str, shape: tuple[int, ...], weights: FlatWeights) -> Slot:
    """The resident slot a delta tensor `name` of `shape` lands in; refuses a tensor
    the resident model lacks or holds in another shape."""
    slot = weights.slots.get(name)
    if slot is None:
        raise BaseMismatchError(
            f"delta touches {name!r}, which the resident model does not have "
            f"(it has e.g. {sorted(weights.slots)[:3]})"
        )
    if slot.shape != shape:
        raise BaseMismatchError(f"{name}: delta shape {shape}, resident {slot.shape}")
    return slot


def _slot_for(t: TensorDelta, weights: FlatWeights) -> Slot:
    return _slot(t.name, t.shape, weights)


def check_compatible(delta: Delta, weights: FlatWeights) -> None:
    """Refuse a delta for another base: fingerprint, tensor names and shapes."""
    check_base(delta, weights)
    for t in delta.tensors.values():
        _slot_for(t, weights)


def check_meta(meta: DeltaMeta, weights: FlatWeights) -> None:
    """`check_compatible` from the metadata alone: run it before decoding a payload."""
    check_base(meta, weights)
    for name, tm in meta.tensors.items():
        _slot(name, tuple(tm.shape), weights)


def bind(
    delta: Delta | Iterable[TensorDelta],
    weights: FlatWeights,
    scales: dict[str, float] | None = None,
) -> BoundDelta:
    """Lay a decoded delta out as flat indices/values per buffer of `weights`.

    scales: per-tensor overrides of the stored scale (used by the q search).
    """
    if isinstance(delta, Delta):
        check_base(delta, weights)
        tensors: list[TensorDelta] = list(delta.tensors.values())
    else:
        tensors = list(delta)
    per_group: dict[int, list[tuple[int, TensorDelta]]] = {}
    for t in tensors:
        slot = _slot_for(t, weights)
        per_group.setdefault(slot.group, []).append((slot.offset, t))
    groups = []
    for group, members in sorted(per_group.items()):
        members.sort(key=lambda m: m[0])  # ascending offsets: the index stays sorted
        device = weights.buffers[group].device
        index = torch.cat([t.positions + off for off, t in members])
        values = torch.cat(
            [t.values.to(torch.float32) * (scales or {}).get(t.name, t.scale) for _, t in members]
        )
        groups.append(BoundGroup(group, index.to(device), values.to(device)))
    return BoundDelta(tuple(groups))


# On CPU the gather and the scatter of one chunk touch the same cache lines: chunks
# this size keep them in cache between the two (measured best on 2-core x86; see
# BENCHMARKS.md). On a GPU one chunk: there kernel launches are what cost.
CPU_CHUNK = 1 << 14


def apply_delta_(weights: FlatWeights, delta: BoundDelta) -> UndoLog:
    """Scatter-add `delta` into `weights` in place (fp32 arithmetic, written back in
    the weights' dtype). Returns the undo log that `revert_delta_` needs.

    All or nothing: the undo buffers are allocated before any weight is touched, and
    an exception part-way (a bad index, out of memory) scatters back every original
    value saved so far before it propagates, so the weights are exactly as before."""
    olds = [
        torch.empty(
            int(g.index.numel()), dtype=weights.buffers[g.group].dtype, device=g.index.device
        )
        for g in delta.groups
    ]
    saved_upto: list[int] = []  # per group: originals gathered into its undo buffer
    try:
        for g, old in zip(delta.groups, olds, strict=True):
            flat = weights.buffers[g.group]
            k = int(g.index.numel())
            saved_upto.append(0)
            step = k if flat.device.type == "cuda" else CPU_CHUNK
            for s in range(0, k, step):
                index, saved = g.index[s : s + step], old[s : s + step]
                torch.take(flat, index, out=saved)  # gather
                saved_upto[-1] = s + int(index.numel())
                # out of place: for fp32 weights .to(float32) is `saved` itself
                new = torch.add(saved.to(torch.float32), g.values[s : s + step]).to(flat.dtype)
                flat.index_put_((index,), new)  # scatter
    except BaseException:
        for g, old, upto in reversed(list(zip(delta.groups, olds, saved_upto, strict=False))):
            if upto:  # positions saved but not yet written get their own value back
                weights.buffers[g.group].index_put_((g.index[:upto],), old[:upto])
        raise
    token = next(weights._ids)
    weights._applied.append(token)
    return UndoLog(
        token, tuple((g.group, g.index, old) for g, old in zip(delta.groups, olds, strict=True))
    )


def revert_delta_(weights: FlatWeights, undo: UndoLog) -> None:
    """Put back the exact values `apply_delta_` overwrote. Deltas stack: revert the
    most recently applied one first."""
    if not weights._applied or weights._applied[-1] != undo.token:
        raise RuntimeError(
            "revert out of order: revert the most recently applied delta first "
            f"(applied: {weights._applied}, reverting: {undo.token})"
        )
    for group, index, old in reversed(undo.groups):
        weights.buffers[group].index_put_((index,), old)
    weights._applied.pop()
