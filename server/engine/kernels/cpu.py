"""The CPU implementation of the sparse delta ops: delta_kernels.c, compiled once with
the system's C compiler and cached by source and machine under
~/.cache/deltaserve/kernels, called through ctypes. Where the compiler targets
AVX-512 the one-token products run vectorized; `portable=True` builds the scalar code
every other machine runs (tests compare the two)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from deltastore.paths import cache_dir

SOURCE = Path(__file__).with_name("delta_kernels.c")


class KernelUnavailable(RuntimeError):
    pass


_libs: dict[bool, ctypes.CDLL] = {}
_lib_errors: dict[bool, str] = {}
_lib_lock = threading.Lock()


def _build(path: Path, portable: bool) -> None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc)")
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cc, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-o", str(tmp), str(SOURCE)]
    if portable:
        cmd.insert(1, "-DDELTA_PORTABLE")
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", b"") or b""
        raise KernelUnavailable(f"{' '.join(cmd)} failed: {e} {err.decode()[-500:]}") from e
    os.replace(tmp, path)


def load_kernels(portable: bool = False) -> ctypes.CDLL:
    """The compiled kernels (built on first use, cached by source and machine)."""
    lib = _libs.get(portable)
    if lib is not None:  # every step asks: no lock once built
        return lib
    with _lib_lock:
        if portable in _libs:
            return _libs[portable]
        if portable in _lib_errors:
            raise KernelUnavailable(_lib_errors[portable])
        key = hashlib.sha256(SOURCE.read_bytes() + platform.machine().encode())
        key.update(Path("/proc/cpuinfo").read_bytes() if Path("/proc/cpuinfo").exists() else b"")
        kind = "-portable" if portable else ""
        path = cache_dir() / "kernels" / f"delta_kernels{kind}-{key.hexdigest()[:16]}.so"
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                _build(path, portable)
            lib = ctypes.CDLL(str(path))
        except (KernelUnavailable, OSError) as e:
            _lib_errors[portable] = str(e)
            raise KernelUnavailable(str(e)) from e
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        for name in ("spmm_add_f32", "spmm_add_bf16"):
            getattr(lib, name).argtypes = [p, i64, p, i64, i64, i64, i64, p, i64, p, i64, i64]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("rowgather_add_f32", "rowgather_add_bf16"):
            getattr(lib, name).argtypes = [p, i64, p, p, i64, p, i64, i64]
            getattr(lib, name).restype = ctypes.c_int
        lib.linear_bf16.argtypes = [p, i64, p, i64, i64, i64, p, i64, i64, p]
        lib.linear_bf16.restype = ctypes.c_int
        lib.linear_bf16_available.argtypes, lib.linear_bf16_available.restype = [], ctypes.c_int
        lib.decode_attention_bf16.argtypes = [p, i64, p, i64, p, p, i64, i64, p, p, p]
        lib.decode_attention_bf16.argtypes += [i64, i64, i64, i64, i64, ctypes.c_float]
        lib.decode_attention_bf16.restype = ctypes.c_int
        _libs[portable] = lib
        return lib


def _rows(t: torch.Tensor, what: str) -> None:
    if t.dim() != 2 or t.stride(-1) != 1:
        raise ValueError(f"{what} must be 2-D with unit stride, got {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"{what} must be float32 or bfloat16, got {t.dtype}")


def _tables(bases: torch.Tensor, items: torch.Tensor) -> None:
    if bases.dtype != torch.int64 or items.dtype != torch.int64:
        raise TypeError("bases and items must be int64")
    if not (bases.is_contiguous() and items.is_contiguous()) or items.shape[-1] != 4:
        raise ValueError(f"items must be contiguous (W, 4), got {tuple(items.shape)}")


def _check(rc: int, what: str) -> None:
    if rc == -1:
        raise MemoryError(f"{what}: the sparse delta kernel could not allocate its buffers")
    if rc != 0:
        raise ValueError(f"{what}: an item names a variant the call was not given")


def spmm_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    layouts: list[torch.Tensor],
    bases: torch.Tensor,
    items: torch.Tensor,
    slot: int,
    portable: bool = False,
) -> None:
    if not items.numel():
        return
    _rows(y, "y")
    _rows(x, "x")
    _tables(bases, items)
    if x.dtype != y.dtype:
        raise TypeError(f"x is {x.dtype}, y is {y.dtype}: the kernel needs one dtype")
    lib = load_kernels(portable)
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
        bases.data_ptr(),
        bases.numel(),
        items.data_ptr(),
        items.shape[0],
        slot,
    )
    _check(rc, "spmm_add_")


def rowgather_add_(
    h: torch.Tensor,
    ids: torch.Tensor,
    layouts: list[torch.Tensor],
    bases: torch.Tensor,
    items: torch.Tensor,
    slot: int,
) -> None:
    if not items.numel():
        return
    _rows(h, "h")
    _tables(bases, items)
    if ids.dtype != torch.int64 or not ids.is_contiguous():
        raise TypeError("ids must be contiguous int64")
    lib = load_kernels()
    fn = lib.rowgather_add_f32 if h.dtype == torch.float32 else lib.rowgather_add_bf16
    rc = fn(
        h.data_ptr(),
        h.stride(0),
        ids.data_ptr(),
        bases.data_ptr(),
        bases.numel(),
        items.data_ptr(),
        items.shape[0],
        slot,
    )
    _check(rc, "rowgather_add_")


def linear_available(portable: bool = False) -> bool:
    """Whether `linear` runs its own kernel here (a build that targets AVX512-BF16)."""
    try:
        return bool(load_kernels(portable).linear_bf16_available())
    except KernelUnavailable:
        return False


def linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, portable: bool = False
) -> torch.Tensor:
    """x (M, K) @ w (N, K).T (+ bias) in bf16 with fp32 sums, as F.linear computes it,
    by the kernel's dense path (delta_kernels.c, linear_bf16: one read of w for every row
    of x). Raises KernelUnavailable where that path is not built (linear_available)."""
    _rows(x, "x")
    _rows(w, "w")
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        raise TypeError(f"linear takes bf16 x and w, got {x.dtype} and {w.dtype}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} columns, w has {w.shape[1]}")
    if bias is not None and (
        bias.dtype != torch.bfloat16 or bias.shape != (w.shape[0],) or not bias.is_contiguous()
    ):
        raise ValueError(f"bias must be contiguous bf16 ({w.shape[0]},)")
    m, k = x.shape
    y = torch.empty((m, w.shape[0]), dtype=torch.bfloat16, device=x.device)
    rc = load_kernels(portable).linear_bf16(
        y.data_ptr(),
        y.stride(0),
        x.data_ptr(),
        x.stride(0),
        m,
        k,
        w.data_ptr(),
        w.stride(0),
        w.shape[0],
        bias.data_ptr() if bias is not None else None,
    )
    if rc == -3:
        raise KernelUnavailable("the dense bf16 path is not built for this machine")
    return y


def decode_attention_(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    window: int | None,
    scale: float,
    portable: bool = False,
) -> None:
    """out[idx[b]] (H*D) <- attention of q[idx[b]] (H, D) over the KV slot slots[b]'s
    positions [0, lens[b]) (the last `window` with a window), in place, by the kernel
    (delta_kernels.c, decode_attention_bf16). k, v: one layer's cache (slots, Hkv,
    max_len, D); q (N, H, D) with contiguous heads; all bf16; idx, slots, lens int64,
    each slot one of the cache's and each length at most max_len (the engine's own
    StepInput: the kernel reads them unchecked)."""
    hkv, d = k.shape[1], k.shape[3]
    if q.dim() != 3 or q.stride(2) != 1 or q.stride(1) != d or q.shape[2] != d:
        raise ValueError(f"q must be (N, H, {d}) with contiguous heads, got {tuple(q.shape)}")
    if q.shape[1] % hkv:
        raise ValueError(f"{q.shape[1]} query heads do not share {hkv} kv heads evenly")
    if out.shape != (q.shape[0], q.shape[1] * d) or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {(q.shape[0], q.shape[1] * d)}")
    if not (k.is_contiguous() and v.is_contiguous() and v.shape == k.shape):
        raise ValueError("k and v must be contiguous caches of one shape")
    if any(t.dtype != torch.bfloat16 for t in (out, q, k, v)):
        raise TypeError("decode attention takes bf16 q, caches and output")
    if any(t.dtype != torch.int64 or not t.is_contiguous() for t in (idx, slots, lens)):
        raise TypeError("idx, slots and lens must be contiguous int64")
    b = idx.numel()
    if slots.numel() != b or lens.numel() != b:
        raise ValueError("idx, slots and lens need one entry per decode row")
    rc = load_kernels(portable).decode_attention_bf16(
        out.data_ptr(),
        out.stride(0),
        q.data_ptr(),
        q.stride(0),
        k.data_ptr(),
        v.data_ptr(),
        k.stride(0),
        k.stride(1),
        idx.data_ptr(),
        slots.data_ptr(),
        lens.data_ptr(),
        b,
        hkv,
        q.shape[1] // hkv,
        d,
        window or 0,
        scale,
    )
    if rc == -3:
        raise KernelUnavailable("the bf16 decode attention is not built for this machine")
    if rc == -2:
        raise ValueError("decode attention takes head_dim <= 256 and <= 16 query heads per kv head")
    if rc == -1:
        raise MemoryError("decode attention could not allocate its buffers")
