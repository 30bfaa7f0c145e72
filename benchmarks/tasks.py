"""Small generated tasks for benchmark fine-tunes (fixed seeds, nothing downloaded)."""

from __future__ import annotations

import random

from deltastore.calib import Example


def arithmetic(n: int, seed: int = 0) -> list[Example]:
    """Two-digit additions answered with the bare number."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append(Example(f"What is {a} + {b}? Answer with the number only.", str(a + b)))
    return out
