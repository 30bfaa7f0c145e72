"""The scheduler: per-variant queues and one worker thread that owns the engine.

Each turn the worker runs pending control jobs (admin actions), then picks a
variant: the active one keeps the model while it has queued requests and either
nobody else waits or its time slice has not run out; otherwise the variant whose
oldest request has waited longest gets it (FIFO across variants, so nobody
starves). Up to max_batch_size of that variant's requests run as one batch.

All torch work of the server happens on this one thread (the one that loaded the
base runs the loop: `serve_forever`; see llm_engine.py). It implements the same
`EngineAPI` as engine v2's `LLMEngine`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from server.config import Settings
from server.engine.core import Engine, WeightsUnavailable
from server.engine.generate import generate
from server.engine.job import INTERNAL, UNAVAILABLE, Job
from server.engine.llm_engine import QueueFull, run_controls
from server.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class Scheduler:
    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self._queues: dict[str | None, deque[Job]] = {}
        self._control: deque[tuple[Callable[[Engine], Any], Future[Any]]] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._slice_start = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the loop on a new thread (tests); the server uses serve_forever."""
        self._thread = threading.Thread(target=self._loop, name="deltaserve-worker", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Run the loop on the calling thread until stop()."""
        self._thread = threading.current_thread()
        self._loop()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            for q in self._queues.values():
                for job in q:
                    job.finish_reason = "cancelled"
                    job.emit("done", job)
            self._queues.clear()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ submitting

    def submit(self, job: Job) -> None:
        with self._cond:
            queued = sum(len(q) for q in self._queues.values())
            if queued >= self.settings.queue_limit:
                raise QueueFull(f"{queued} requests queued (limit {self.settings.queue_limit})")
            self._queues.setdefault(job.variant, deque()).append(job)
            self.metrics.queue_length.set(queued + 1)
            self._cond.notify_all()

    def control(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run fn(engine) on the worker thread between batches."""
        fut: Future[T] = Future()
        with self._cond:
            self._control.append((fn, fut))
            self._cond.notify_all()
        return fut

    def in_flight(self, variant: str) -> int:
        """Queued plus running requests for `variant`."""
        with self._cond:
            queued = len(self._queues.get(variant, ()))
            return queued + sum(1 for j in self._running if j.variant == variant)

    def variants_in_flight(self) -> set[str]:
        """The variants (compositions included) with queued or running requests."""
        with self._cond:
            names = {v for v, q in self._queues.items() if q}
            names |= {j.variant for j in self._running}
        return {v for v in names if v is not None}

    # ------------------------------------------------------------------ worker

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._control and not self._any_waiting():
                    self._cond.wait()
                if self._stop:
                    return
                controls = list(self._control)
                self._control.clear()
                batch = self._next_batch() if not controls else []
            run_controls(controls, self.engine)
            if batch:
                self._run(batch)

    def _any_waiting(self) -> bool:
        return any(self._queues.values())

    def _pick(self) -> str | None:
        waiting = {v: q for v, q in self._queues.items() if q}
        active = self.engine.active
        others = [v for v in waiting if v != active]
        slice_left = time.perf_counter() - self._slice_start < self.settings.time_slice_s
        if active in waiting and (not others or slice_left):
            return active
        return min(others or list(waiting), key=lambda v: waiting[v][0].enqueued)

    def _next_batch(self) -> list[Job]:
        while self._any_waiting():
            variant = self._pick()
            q = self._queues[variant]
            batch: list[Job] = []
            while q and len(batch) < self.settings.max_batch_size:
                job = q.popleft()
                if job.cancelled.is_set():
                    job.finish_reason = "cancelled"
                    job.emit("done", job)
                else:
                    batch.append(job)
            if not q:
                del self._queues[variant]
            if batch:
                self._running = batch
                self.metrics.queue_length.set(sum(len(x) for x in self._queues.values()))
                return batch
        return []

    def _run(self, batch: list[Job]) -> None:
        variant = batch[0].variant
        try:
            self.engine.check()
            swap = self.engine.activate(variant)
            if swap.switched:
                self._slice_start = time.perf_counter()
                self.metrics.swap_seconds.labels(swap.mode.value).observe(swap.seconds)
            now = time.perf_counter()
            for job in batch:
                job.started = now
                self.metrics.queue_seconds.observe(now - job.enqueued)
            self.metrics.batch_size.observe(len(batch))
            generate(self.engine.model, self.engine.tokenizer, batch, self.engine.device)
        except Exception as e:  # one bad variant must not take the worker down
            log.exception(
                "batch for %r failed (requests %s)", variant, [j.request_id for j in batch]
            )
            for job in batch:
                if job.finish_reason is None:
                    job.finish_reason = "error"
                    job.emit(
                        "error", UNAVAILABLE if isinstance(e, WeightsUnavailable) else INTERNAL
                    )
        finally:
            with self._cond:
                self._running = []
            for job in batch:
                job.finished = time.perf_counter()
                if job.finish_reason != "error":
                    job.emit("done", job)
