"""When long-running commands show progress bars."""

from __future__ import annotations

import os
import sys


def show_progress() -> bool:
    """Progress bars on a terminal, or when DELTASERVE_PROGRESS is set."""
    return sys.stderr.isatty() or bool(os.environ.get("DELTASERVE_PROGRESS"))
