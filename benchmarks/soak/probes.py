"""What the soak watches: the process RSS, the OpenAI error body, what an in-process
server still holds for requests, the ERROR records it logs, and its metric counters."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MiB = 1 << 20
EXAMPLES = 10  # kept per kind of failure in a report


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of `pid` (this process by default) from /proc."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


def is_error_body(obj: Any) -> bool:
    """The OpenAI error shape: {"error": {"message": str, "type": str, "code": ...}}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), dict):
        return False
    err = obj["error"]
    return (
        isinstance(err.get("message"), str) and isinstance(err.get("type"), str) and "code" in err
    )


def server_leftovers(state: Any) -> dict[str, Any]:
    """What an in-process server (`ThreadedServer.state`) still holds for requests:
    queued and running ones, KV slots, in-flight counts per variant, and delta layouts
    or materialized copies in use beyond the merged/active variant's own hold."""
    sched, engine = state.scheduler, state.engine
    names = [None, *state.store.names()]
    out: dict[str, Any] = {
        "in_flight": {str(n): c for n in names if (c := sched.in_flight(n))},
        "retiring": sorted(state.retiring),
    }
    # private state, read strictly: a renamed attribute fails here, never passes
    out["waiting"] = len(sched._waiting)
    out["kv_used"] = sched.kv.used
    out["running"] = len(sched._running)
    held = sched._held
    out["layouts_in_use"] = [e.name for e in engine.layouts.list() if e.in_use and e.name != held]
    out["materialized_in_use"] = [
        e.name for e in engine.materialized.list() if e.in_use and e.name != engine.active
    ]
    return out


def is_idle(left: dict[str, Any]) -> bool:
    return not (
        left["in_flight"]
        or left["retiring"]
        or left["waiting"]
        or left["running"]
        or left["kv_used"]
        or left["layouts_in_use"]
        or left["materialized_in_use"]
    )


def wait_idle(state: Any, timeout: float = 10.0) -> tuple[dict[str, Any], float]:
    """Poll until the server holds nothing for requests (or `timeout`): the last
    leftovers and the seconds it took."""
    t0 = time.monotonic()
    while True:
        left = server_leftovers(state)
        if is_idle(left) or time.monotonic() - t0 > timeout:
            return left, time.monotonic() - t0
        time.sleep(0.05)


class _ErrorRecords(logging.Handler):
    """Keeps ERROR records (with their tracebacks) logged while it is installed."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@contextmanager
def capture_errors() -> Iterator[list[str]]:
    """ERROR records logged in this process meanwhile (an in-process server's)."""
    handler = _ErrorRecords()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]  # uvicorn's don't propagate
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def counter_total(metric: Any) -> float:
    """The sum of a prometheus counter over its labels."""
    return sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith("_total"))
