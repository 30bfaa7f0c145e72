"""Crash points, for the crash tests: `point(name)` kills the process with SIGKILL
when the file named by DELTASERVE_CRASH_AT lists `name` (one per line). With the
variable unset (always, outside those tests) a point is one environment lookup.

Points sit between the steps whose order makes a commit durable, so a test can kill
the server exactly there and check what a restart finds (tests/server/test_crash.py).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "DELTASERVE_CRASH_AT"


def point(name: str) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        armed = name in Path(path).read_text().split()
    except OSError:
        return
    if armed:
        os.kill(os.getpid(), signal.SIGKILL)
