"""The task fine-tunes the serving, composition and lm-eval benchmarks were measured
on: the demos' first recipe (30 full AdamW steps in fp32, lr 5e-5, 512 calibration
tokens), so those benchmarks can be re-run on the same kind of delta. One difference:
the q search now calibrates on the task's de-duplicated validation split, where the
first recipe used 64 fresh rows of seed 1, so a re-run's q may differ slightly. Made
on first use and cached like the demos (the recipe and the base name the file)."""

from __future__ import annotations

from pathlib import Path

from deltastore.demo import Demo, demo_delta
from deltastore.finetune import FinetuneConfig

STUDY = FinetuneConfig(steps=30, lr=5e-5, seed=0)
TASK_DELTAS = (
    Demo("arith", "arith", "two-digit additions, answered with the bare number", STUDY, 512),
    Demo("json-extract", "extract-v1", "a sentence about a person -> JSON", STUDY, 512),
    Demo("topic", "topic", "a sentence -> its topic", STUDY, 512),
)


def task_deltas(base_dir: Path, names: tuple[str, ...] | None = None) -> dict[str, Path]:
    """The delta file of each task fine-tune (all, or those named)."""
    return {
        d.name: demo_delta(d, base_dir) for d in TASK_DELTAS if names is None or d.name in names
    }
