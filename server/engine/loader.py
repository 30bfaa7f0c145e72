"""Loading variants off the step loop.

With thousands of variants most requests name one that is not laid out yet. Reading
its file, verifying and decoding it, and laying it out for mixed steps (the engine's
`load_plain`) take tens of milliseconds to seconds: done on the worker thread they
stall every running request. The loader does that work on a thread of its own:

- the worker asks for a variant (`want`) when a waiting request needs it, in the
  queue's order, so loads follow the requests that wait (prefetch); a bounded number
  of loads is asked for at a time (`depth`), the rest are asked for again later;
- the loader reads, verifies and lays each out, and leaves the result for the worker,
  which takes what is done at the start of a step (`take`) and puts it in its tiers:
  only the worker touches the engine's state;
- a load that fails is handed over as its error, for the requests that wait on it.

Work per load is numpy and small torch ops on one core (`serial_torch`: the loader's
torch ops never start an OpenMP team of their own, which would slow every step's
parallel ops, engine/threads.py); it competes for the CPU with the steps (on 2 cores
each runs a little slower while a load is under way) but never holds them up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.engine.threads import serial_torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """A finished load: the variant's stamp, decoded delta and layout, or its error."""

    name: str
    result: tuple[Any, ...] | None
    error: BaseException | None
    seconds: float


class Loader:
    def __init__(
        self,
        load: Callable[[str], tuple[Any, ...]],
        depth: int = 4,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError(f"loader depth must be at least 1, got {depth}")
        self._load, self.depth, self._on_done = load, depth, on_done
        self._queue: deque[str] = deque()
        self._busy: str | None = None
        self._done: list[Loaded] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.loads = self.failures = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deltaserve-loader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def pending(self, name: str) -> bool:
        """Asked for and not taken yet (queued, loading, or done)."""
        with self._cond:
            return (
                name in self._queue or name == self._busy or any(d.name == name for d in self._done)
            )

    def want(self, name: str) -> bool:
        """Ask for `name` (no effect if it is pending). False when `depth` loads are
        already asked for: ask again later."""
        with self._cond:
            if name in self._queue or name == self._busy or any(d.name == name for d in self._done):
                return True
            if len(self._queue) + (self._busy is not None) + len(self._done) >= self.depth:
                return False
            self._queue.append(name)
            self._cond.notify_all()
            return True

    def take(self) -> list[Loaded]:
        """The loads finished since the last call (the worker puts them in place)."""
        with self._cond:
            done, self._done = self._done, []
        return done

    def _run(self) -> None:
        serial_torch()  # the step's OpenMP team is the only one (engine/threads.py)
        while True:
            with self._cond:
                while not (self._stop or self._queue):
                    self._cond.wait()
                if self._stop:
                    return
                name = self._busy = self._queue.popleft()
            t0 = time.perf_counter()
            result: tuple[Any, ...] | None = None
            error: BaseException | None = None
            try:
                result = self._load(name)
            except Exception as e:  # handed to the requests that wait for it
                log.warning("loading %s failed: %s", name, e)
                error = e
            with self._cond:
                self._busy = None
                self._done.append(Loaded(name, result, error, time.perf_counter() - t0))
                self.loads += error is None
                self.failures += error is not None
            if self._on_done is not None:
                self._on_done()  # the worker may be waiting for this load
