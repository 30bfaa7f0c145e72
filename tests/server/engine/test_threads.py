"""Helper threads run torch on themselves alone; the step's OpenMP team is the only one
(server/engine/threads.py)."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from server.engine.loader import Loader
from server.engine.threads import GIL_SWITCH_S, serial, serial_torch

needs_threads = pytest.mark.skipif(
    torch.get_num_threads() < 2, reason="torch runs one thread here: nothing to tell apart"
)


def _in_thread(fn):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@needs_threads
def test_serial_torch_sets_the_calling_thread_alone():
    before = torch.get_num_threads()

    def helper() -> tuple[bool, int, torch.Tensor]:
        done = serial_torch()
        a = torch.arange(64.0).reshape(8, 8)
        return done, torch.get_num_threads(), a @ a  # ops still run, on this thread

    done, n, product = _in_thread(helper)
    assert done, "no OpenMP runtime found beside torch"
    assert n == 1
    a = torch.arange(64.0).reshape(8, 8)
    torch.testing.assert_close(product, a @ a)
    assert torch.get_num_threads() == before, "the caller's threads changed"
    assert _in_thread(torch.get_num_threads) == before, "a new thread's default changed"


@needs_threads
def test_serial_wraps_work_for_a_pool():
    assert _in_thread(serial(torch.get_num_threads)) == 1


@needs_threads
def test_the_loader_thread_runs_torch_serially():
    seen: list[int] = []
    done = threading.Event()

    def load(name: str) -> tuple[int]:
        seen.append(torch.get_num_threads())
        done.set()
        return (1,)

    loader = Loader(load)
    loader.start()
    try:
        loader.want("v0")
        assert done.wait(10)
        deadline = time.monotonic() + 10
        while not loader.take() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        loader.stop()
    assert seen == [1]
    assert torch.get_num_threads() > 1


def test_a_running_server_asks_for_the_gil_back_sooner(live):
    """The step loop takes the GIL back after each torch op; a server shortens the
    switch interval from Python's 5 ms (engine/threads.py)."""
    assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_S)
    assert live.client.get("/ready").status_code == 200
