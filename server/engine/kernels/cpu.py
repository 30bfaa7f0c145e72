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
