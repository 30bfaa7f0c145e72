"""Where deltaserve keeps its caches (models, fingerprints, demo fine-tunes)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DELTASERVE_CACHE``, else ``~/.cache/deltaserve``. Never inside the repo."""
    env = os.environ.get("DELTASERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deltaserve"
