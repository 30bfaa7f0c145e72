"""Scheduling: fairness across variants, the queue limit, and cancelled requests."""

from __future__ import annotations

import threading
import time

import pytest

from server.config import Settings
from server.engine.core import Mode, Swap
from server.engine.job import Job, SamplingParams
from server.engine.llm_engine import QueueFull
from server.engine.v1 import Scheduler
from server.metrics import Metrics


class FakeEngine:
    """Records the order variants get the model; each batch 'generates' for 10 ms."""

    def __init__(self) -> None:
        self.active: str | None = None
        self.order: list[tuple[str | None, int]] = []
        self.model = self.tokenizer = self.device = None

    def check(self):  # the engine's invariant check before each batch
        pass

    def activate(self, name):
        switched = name != self.active
        self.active = name
        return Swap(name, Mode.INPLACE, 0.001, switched)


@pytest.fixture
def sched(monkeypatch):
    engine = FakeEngine()

    def fake_generate(model, tok, jobs, device):
        engine.order.append((jobs[0].variant, len(jobs)))
        time.sleep(0.01)
        for j in jobs:
            j.finish_reason = "length"

    monkeypatch.setattr("server.engine.v1.generate", fake_generate)
    settings = Settings(base=None, max_batch_size=2, time_slice_s=0.03, queue_limit=50, demo=False)
    s = Scheduler(engine, settings, Metrics())  # type: ignore[arg-type]
    yield s, engine
    s.stop()


def _job(variant, done: threading.Event | None = None, counter: list | None = None) -> Job:
    def emit(kind, payload):
        if kind == "done" and counter is not None:
            counter.append(payload)
            if done is not None and len(counter) >= 1:
                done.set()

    return Job(variant, [1, 2], SamplingParams(max_tokens=4), emit)


def test_batches_by_variant_and_nobody_starves(sched):
    s, engine = sched
    finished: list = []
    for _ in range(10):
        s.submit(_job("hot", counter=finished))
    s.submit(_job("cold", counter=finished))
    s.start()
    deadline = time.time() + 10
    while len(finished) < 11 and time.time() < deadline:
        time.sleep(0.01)
    assert len(finished) == 11
    variants = [v for v, _ in engine.order]
    assert all(n <= 2 for _, n in engine.order)  # max batch size
    # the time slice hands the model to "cold" before "hot" has drained its queue
    assert variants.index("cold") < len(variants) - 1


def test_queue_limit(sched):
    s, _ = sched
    for _ in range(50):
        s.submit(_job("a"))
    with pytest.raises(QueueFull):
        s.submit(_job("a"))


def test_cancelled_jobs_are_dropped_before_running(sched):
    s, engine = sched
    finished: list = []
    jobs = [_job("a", counter=finished) for _ in range(4)]
    for j in jobs[:3]:
        j.cancelled.set()
    for j in jobs:
        s.submit(j)
    s.start()
    deadline = time.time() + 5
    while len(finished) < 4 and time.time() < deadline:
        time.sleep(0.01)
    assert [j.finish_reason for j in jobs] == ["cancelled"] * 3 + ["length"]
    assert sum(n for _, n in engine.order) == 1


def test_control_jobs_run_on_the_worker(sched):
    s, _ = sched
    s.start()
    assert s.control(lambda e: threading.current_thread().name).result(5) == "deltaserve-worker"
    with pytest.raises(ZeroDivisionError):
        s.control(lambda e: 1 / 0).result(5)
