"""The sparse delta ops of mixed-variant steps: one `torch.library` op per job, one
implementation per device, so the engine calls the op and never asks where it runs.

    deltaserve::spmm_add_(y, x, layouts, bases, items, slot)
        y (N, out) += for each item {t0, t1, a, b}: x[t0:t1] @ (Δ_a - Δ_b).T of matrix slot
    deltaserve::rowgather_add_(h, ids, layouts, bases, items, slot)
        h (N, hidden) += for each item and token t in it: row ids[t] of (Δ_a - Δ_b)

`layouts` are the step's variants (one int32 buffer each, layout.py), `bases` (V,) int64
their addresses (what the native kernels read), `items` (W, 4) int64 the work: tokens
[t0, t1) get +variant a and -variant b (indices into layouts; -1: none). Every tensor
lives on y's device.

    CPU    cpu.py: delta_kernels.c, built once with the system's C compiler
    CUDA   gpu.py: Triton kernels (imported on first use)
    other  reference.py: vectorized torch (also the reference in tests)
    fake   shapes only, and a check that every argument is on y's device
           (FakeTensorMode, torch.compile)

The CPU and CUDA kernels need their toolchain; `native_available(device)` says whether
it works here, and the engine falls back to the reference (`--delta-kernel torch`)
when it does not.

Beside them, a decode step's own CPU kernels (`decode_kernels`): on a CPU with
AVX512-BF16 and bf16 weights, a product of a few rows runs by delta_kernels.c's
linear_bf16 (one read of each weight for all the rows, as memory-bound as a decode
step is) instead of torch's GEMM, and the decode rows' attention by
decode_attention_bf16 (each row's own KV positions read in place) instead of SDPA
over a gathered batch (`--decode-kernels torch` turns both off).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor

from server.engine.kernels import cpu, reference
from server.engine.kernels.cpu import KernelUnavailable, load_kernels
from server.engine.kernels.layout import CSR, MAX_COLS, fuse_rows

__all__ = [
    "CSR",
    "MAX_COLS",
    "KernelUnavailable",
    "decode_kernels",
    "fuse_rows",
    "load_kernels",
    "native_available",
    "reference",
    "resolve",
    "rowgather_add_",
    "spmm_add_",
]

log = logging.getLogger(__name__)

_SIG = "Tensor[] layouts, Tensor bases, Tensor items, int slot) -> ()"
_lib = torch.library.Library("deltaserve", "DEF")
_lib.define(f"spmm_add_(Tensor(a!) y, Tensor x, {_SIG}")
_lib.define(f"rowgather_add_(Tensor(a!) h, Tensor ids, {_SIG}")


def _cuda_spmm(*args: Any) -> None:
    from server.engine.kernels import gpu

    gpu.spmm_add_(*args)


def _cuda_rowgather(*args: Any) -> None:
    from server.engine.kernels import gpu

    gpu.rowgather_add_(*args)


# The reference is registered under the alias of every backend; CPU and CUDA override it.
_lib.impl("spmm_add_", reference.spmm_add_, "CompositeExplicitAutograd")
_lib.impl("rowgather_add_", reference.rowgather_add_, "CompositeExplicitAutograd")
_lib.impl("spmm_add_", cpu.spmm_add_, "CPU")
_lib.impl("rowgather_add_", cpu.rowgather_add_, "CPU")
_lib.impl("spmm_add_", _cuda_spmm, "CUDA")
_lib.impl("rowgather_add_", _cuda_rowgather, "CUDA")


def _same_device(out: torch.Tensor, *tensors: torch.Tensor | list[torch.Tensor]) -> None:
    for t in tensors:
        for u in t if isinstance(t, list) else [t]:
            if u.device != out.device:
                raise RuntimeError(
                    f"deltaserve sparse op: a tensor on {u.device}, the output on {out.device}"
                )


@torch.library.register_fake("deltaserve::spmm_add_")
def _spmm_fake(y, x, layouts, bases, items, slot):
    _same_device(y, x, layouts, bases, items)
    if x.shape[0] != y.shape[0] or items.dim() != 2 or items.shape[1] != 4:
        raise ValueError(f"spmm_add_: x {tuple(x.shape)}, y {tuple(y.shape)}, items {items.shape}")


@torch.library.register_fake("deltaserve::rowgather_add_")
def _rowgather_fake(h, ids, layouts, bases, items, slot):
    _same_device(h, ids, layouts, bases, items)
    if ids.shape[0] != h.shape[0] or items.dim() != 2 or items.shape[1] != 4:
        raise ValueError(f"rowgather_add_: ids {ids.shape}, h {h.shape}, items {items.shape}")


spmm_add_ = torch.ops.deltaserve.spmm_add_
rowgather_add_ = torch.ops.deltaserve.rowgather_add_

Op = Callable[..., None]


def _torch_only(x: torch.Tensor) -> bool:
    """The step is being traced (fake tensors, torch.compile): the registered ops and
    torch's own, never a kernel called by address."""
    return isinstance(x, FakeTensor) or torch.compiler.is_compiling()


def resolve(like: torch.Tensor) -> tuple[Op, Op]:
    """(spmm_add_, rowgather_add_) for a step whose tensors are like `like`: the
    registered ops when they are traced (fake tensors, torch.compile), else the kernels
    registered for the device, called directly. A step makes ~120 sparse calls, and the
    dispatcher's boxed call of a Python kernel (the tensor list converted each way, the
    overload matched each call) cost more than the CPU kernel itself at decode: ~20% of
    a 16-variant step, measured with py-spy (BENCHMARKS.md). The choice is made once
    per step, from the op table above, so it cannot disagree with the dispatcher."""
    if _torch_only(like):
        return spmm_add_, rowgather_add_
    if like.device.type == "cpu":
        return cpu.spmm_add_, cpu.rowgather_add_
    if like.device.type == "cuda":
        return _cuda_spmm, _cuda_rowgather
    return spmm_add_, rowgather_add_


CPU_DTYPES = (torch.float32, torch.bfloat16)  # what the C kernel computes in


def native_available(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None if the native kernel for `device` (and weights of `dtype`) works here, else
    why not."""
    if device.type == "cpu" and dtype is not None and dtype not in CPU_DTYPES:
        return f"the CPU kernel computes in float32 and bfloat16, not {dtype}"
    try:
        if device.type == "cpu":
            load_kernels()
        elif device.type == "cuda":
            import triton  # noqa: F401
        else:
            return f"no native kernel for {device.type} (the torch reference serves it)"
    except (KernelUnavailable, ImportError) as e:
        return str(e)
    return None


Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# out, q, k cache, v cache, decode_idx, decode_slots, decode_lens, window, scale
Attend = Callable[..., None]
# products of up to this many rows (decode steps, short prompt chunks) by the CPU
# kernel: over the SmolLM2 step's weights streamed from memory it took 0.63x torch's
# GEMM's time at 8 rows, 0.71x at 16, and was even with it at 32 and slower at 64
# (BENCHMARKS.md, "A decode step's own kernels")
DENSE_KERNEL_ROWS = 32
ATTEND_MAX_HEAD_DIM, ATTEND_MAX_GROUP = 256, 16  # what decode_attention_bf16 takes


def decode_kernels(
    choice: str, device: torch.device, dtype: torch.dtype
) -> tuple[Linear, Attend | None]:
    """(linear, attend) for a step (`--decode-kernels`). With auto, on a CPU whose
    kernel build has the AVX512-BF16 path and for bf16 weights: `linear` sends products
    of up to DENSE_KERNEL_ROWS rows to the dense kernel (F.linear for the rest), and
    `attend` runs the decode rows' attention in place of SDPA. Elsewhere (and with
    torch): F.linear and None."""
    if choice not in ("auto", "torch"):
        raise ValueError(f"decode kernels {choice!r}: choose auto or torch")
    if choice == "torch" or device.type != "cpu" or dtype != torch.bfloat16:
        return torch.nn.functional.linear, None
    if not cpu.linear_available():
        log.info("decode steps by torch's ops: this CPU's kernel build has no AVX512-BF16 path")
        return torch.nn.functional.linear, None

    def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if (
            x.dim() != 2
            or x.shape[0] > DENSE_KERNEL_ROWS
            or x.dtype != torch.bfloat16
            or w.dtype != torch.bfloat16
            or x.stride(1) != 1
            or w.stride(1) != 1
            or (bias is not None and (bias.dtype != torch.bfloat16 or bias.stride(0) != 1))
            or _torch_only(x)
        ):
            return torch.nn.functional.linear(x, w, bias)
        return cpu.linear(x, w, bias)

    return linear, cpu.decode_attention_
