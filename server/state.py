"""What the app holds while it runs (built in the lifespan, no work at import time)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from server.config import Settings
from server.engine import Engine
from server.metrics import Metrics
from server.scheduler import SchedulerAPI
from server.store import DeltaStore


@dataclass
class AppState:
    settings: Settings
    store: DeltaStore
    metrics: Metrics
    base_dir: Path | None = None
    base_name: str = "base"
    engine: Engine | None = None
    scheduler: SchedulerAPI | None = None
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    ready_at: float | None = None
    retiring: set[str] = field(default_factory=set)  # deleted, draining in-flight requests
