"""Fake CUDA on a machine without a GPU: run engine code on device "cuda" under
`FakeTensorMode` (tensors with shapes, dtypes and devices but no data, so every op
checks its devices and raises on a mix, and an op whose output shape depends on data
raises), and count what crosses between host and device.

A CPU-only torch cannot move a tensor to "cuda", fake or not, nor index one from Python
(both take a CUDA device guard before any fake kernel runs). `Transfers` stands in for
the copy (a fake tensor of the same shape on the device), spells indexing as the aten
ops it means (select, slice, unsqueeze, index, index_put_), and counts:

    h2d    host -> device copies (.to / .cuda / copy_ into a device tensor)
    d2h    device -> host copies (.to / .cpu / copy_ into a host tensor)
    reads  host reads of a device value (.item, .tolist, bool(), int(), float(),
           .numpy): each one a synchronization on a real GPU

A step's designed traffic is one copy in (its packed inputs) and one copy out (its
sampled tokens), and no reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

CUDA = torch.device("cuda")
_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
}


def _on_device(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cuda"


def _basic(t: torch.Tensor, key: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """t[key] without its tensor indices (ints, slices, None, ...), and the tensor
    indices per dimension of the result (None where a dimension is taken whole)."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        used = sum(1 for k in key if k is not None and k is not Ellipsis)
        key = key[:i] + (slice(None),) * (t.dim() - used) + key[i + 1 :]
    aten = torch.ops.aten
    out, dim, indices = t, 0, []
    for k in key:
        if k is None:
            out = aten.unsqueeze.default(out, dim)
            indices.append(None)
            dim += 1
        elif isinstance(k, bool):
            raise TypeError("boolean indexing has a data-dependent shape")
        elif isinstance(k, int):
            out = aten.select.int(out, dim, k)
        elif isinstance(k, slice):
            step = 1 if k.step is None else k.step
            out = aten.slice.Tensor(out, dim, k.start, k.stop, step)
            indices.append(None)
            dim += 1
        elif isinstance(k, torch.Tensor):
            if k.dtype == torch.bool:
                raise TypeError("boolean-mask indexing has a data-dependent shape")
            if k.device.type != out.device.type and k.dim() > 0:
                raise RuntimeError(f"index on {k.device}, tensor on {out.device}")
            indices.append(k)
            dim += 1
        else:
            raise TypeError(f"index {k!r}")
    while indices and indices[-1] is None:
        indices.pop()
    return out, indices


def _getitem(t: torch.Tensor, key: Any) -> torch.Tensor:
    out, indices = _basic(t, key)
    return torch.ops.aten.index.Tensor(out, indices) if indices else out


def _setitem(t: torch.Tensor, key: Any, value: Any) -> None:
    view, indices = _basic(t, key)
    if not isinstance(value, torch.Tensor):
        value = torch.ops.aten.scalar_tensor.default(value, dtype=t.dtype, device=t.device)
    if indices:
        torch.ops.aten.index_put_.default(view, indices, value)
    else:
        torch.ops.aten.copy_.default(view, value.expand_as(view))


class HostRead(RuntimeError):
    pass


class Transfers(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.h2d = self.d2h = 0
        self.reads: list[str] = []

    def reset(self) -> None:
        self.h2d = self.d2h = 0
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and _on_device(args[0]):
            return _getitem(args[0], args[1])
        if func is torch.Tensor.__setitem__ and _on_device(args[0]):
            return _setitem(args[0], args[1], args[2])
        if func in _READS and args and _on_device(args[0]):
            self.reads.append(func.__name__)  # a fake tensor has no value to give
            raise HostRead(f"{func.__name__} reads a device value on the host (a sync)")
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            src = args[0]
            if func is torch.Tensor.cuda:
                device, dtype = CUDA, None
            elif func is torch.Tensor.cpu:
                device, dtype = torch.device("cpu"), None
            else:
                device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            target = device.type if device is not None else src.device.type
            if target == "cuda" and src.device.type != "cuda":
                self.h2d += 1
                return torch.empty(src.shape, dtype=dtype or src.dtype, device=CUDA)
            if target == "cpu" and src.device.type == "cuda":
                self.d2h += 1
        elif func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            if _on_device(dst) and not _on_device(src) and src.dim() > 0:
                self.h2d += 1
                return dst
            if not _on_device(dst) and _on_device(src):
                self.d2h += 1
            if _on_device(dst):  # the method takes a device guard; the op does not
                return torch.ops.aten.copy_.default(dst, src, kwargs.get("non_blocking", False))
        return func(*args, **kwargs)


@contextmanager
def fake_cuda() -> Iterator[Transfers]:
    """FakeTensorMode with real host tensors allowed in (converted as they come) and
    the transfers counted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available" from autocast and the like
        with FakeTensorMode(allow_non_fake_inputs=True), Transfers() as t:
            yield t
