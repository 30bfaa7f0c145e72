"""Torch's intra-op threads belong to the step.

torch's CPU ops (and the sparse C kernel) run their parallel regions on the OpenMP
runtime torch ships. Each thread that starts a parallel region gets a team of its own,
and the team's threads live as long as that thread. When a helper thread (the loader,
a background digest) runs torch ops with the default team size, the process keeps
more OpenMP threads than cores, and libgomp then stops spinning between regions: every
parallel op of the step waits for its team to be woken from sleep. On 2 cores that made
a 16-variant mixed step ~35% slower (BENCHMARKS.md, "The CPU path after the GPU work").

So a helper thread calls `serial_torch()` first: its torch ops run on it alone, and
the step's team is the only one.

The step also shares the GIL with the HTTP side's event loop. It lets go of it in
every torch op (hundreds a step) and must take it back after each; with Python's
default switch interval (5 ms) a thread that holds it runs on for up to 5 ms before it
is asked to let go. py-spy put 18% of a 16-variant step in taking the GIL back after
a GEMM or a sparse call. `GIL_SWITCH_S` (0.5 ms) shortens that wait: 60 against 68
ms a step on average over five alternated pairs of runs of one load, though the
engine_v2 benchmark's A/B could not tell the two apart (BENCHMARKS.md, "The CPU path
after the GPU work").
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
T = TypeVar("T")

GIL_SWITCH_S = 0.0005  # sys.setswitchinterval while a server runs (Python's default: 5 ms)


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """libgomp's omp_set_num_threads (it sets the calling thread's team size only), from
    the OpenMP runtime this process loaded with torch; None when there is none."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], None
        return fn
    return None


def serial_torch() -> bool:
    """Run this thread's torch CPU ops on this thread alone (call it first thing in a
    helper thread). True when done; False where torch has no OpenMP runtime to tell."""
    torch.get_num_threads()  # torch sets each thread's team size on first use: now, not after
    fn = _omp_set_num_threads()
    if fn is None:
        return False
    fn(1)  # oneDNN's and MKL's GEMMs take their thread count from it too
    return True


def serial(fn: Callable[P, T]) -> Callable[P, T]:
    """`fn` run with serial_torch() first: for work handed to a pool's threads (an
    upload's compression on the HTTP side's thread pool)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        serial_torch()
        return fn(*args, **kwargs)

    return run


def prefer_the_step() -> None:
    """Ask a thread that holds the GIL to let go after GIL_SWITCH_S, so the step loop
    takes it back sooner after each torch op (process-wide: called when a server
    starts)."""
    sys.setswitchinterval(GIL_SWITCH_S)
