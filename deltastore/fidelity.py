"""The fidelity estimate: how much of its fine-tune a compressed variant keeps, told
without labels, and the highest drop rate that keeps enough of it.

The reference is the fine-tune's own greedy continuations of the calibration text,
from the positions where it differs most from the base (`calib.continuations`). A
model reproduces a continuation when its greedy token is the fine-tune's at every
step of it, teacher-forced: exactly when greedy decoding from that prefix would
produce the same text. Agreement is the share of continuations reproduced; the
base's agreement is the floor (what the fine-tune added nothing to), the fine-tune's
(1 up to rounding) the ceiling, and the estimate is the share of the difference the
variant keeps:

    kept = (agreement(variant) - agreement(base)) / (agreement(fine-tune) - agreement(base))

Measured against exact match on held-out test prompts over every variant of the
fidelity study in BENCHMARKS.md, "Fidelity estimate".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from deltastore.calib import Continuations, score_continuations

# compress writes a variant estimated to keep less than this share of the fine-tune's
# gain only with --force
THRESHOLD = 0.5
# recommend (and compress, when it refuses) picks the highest rate estimated to keep
# at least this share
TARGET = 0.9
# the rates recommend tries, highest first
RATES = (0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.5)
# fewer continuations than this that the base does not already reproduce: the
# fine-tune changed too little of this text for a share of it to mean anything
MIN_GAIN = 2


@dataclass(frozen=True)
class Estimate:
    """What a variant keeps of its fine-tune's agreement above the base's."""

    kept: float | None  # None: the fine-tune's continuations are (nearly) the base's
    variant: float  # share of the continuations the variant reproduces
    base: float
    finetune: float
    continuations: int
    tokens: float  # the variant's share of continuation tokens reproduced (shown only)

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Estimate:
        return cls(
            d.get("kept"),
            float(d["variant"]),
            float(d["base"]),
            float(d["finetune"]),
            int(d["continuations"]),
            float(d.get("tokens", math.nan)),
        )

    @property
    def below(self) -> bool:
        """Under the threshold compress refuses at."""
        return self.kept is not None and self.kept < THRESHOLD

    def short(self) -> str:
        return "-" if self.kept is None else f"{100 * self.kept:.0f}%"

    def describe(self) -> str:
        counts = (
            f"{self.continuations} continuations of the calibration text: the variant "
            f"reproduces {self.variant:.0%}, the base {self.base:.0%}, the fine-tune "
            f"{self.finetune:.0%}"
        )
        if self.kept is None:
            return f"none: the fine-tune barely changes this text ({counts})"
        return f"keeps ~{self.kept:.0%} of the fine-tune's gain over the base ({counts})"


@dataclass(frozen=True)
class Agreement:
    sequences: float
    tokens: float


def agreement(model: torch.nn.Module, cont: Continuations) -> Agreement:
    """The share of the fine-tune's continuations (and of their tokens) `model`
    reproduces."""
    scores = score_continuations(model, cont)
    values = scores.values(cont.mask)
    return Agreement(values["sequence-agreement"], values["agreement"])


def estimate(variant: Agreement, base: Agreement, cont: Continuations) -> Estimate:
    ft = cont.ft_agreement[1]
    m = cont.tokens.shape[0]
    kept = None
    if (ft - base.sequences) * m >= MIN_GAIN:
        kept = (variant.sequences - base.sequences) / (ft - base.sequences)
    return Estimate(kept, variant.sequences, base.sequences, ft, m, variant.tokens)


# --------------------------------------------------------------------------- rates


@dataclass(frozen=True)
class RateRow:
    rate: float
    estimate: Estimate | None
    q: float | None  # None: per-tensor q
    seconds: float


def highest_rate(
    at: Callable[[float], tuple[Estimate | None, float | None, float]],
    rates: Iterable[float] = RATES,
    target: float = TARGET,
) -> tuple[float | None, list[RateRow]]:
    """Walk `rates` from the highest down, compressing at each (`at(rate)` gives the
    estimate, the q and the seconds it took), and stop at the first whose estimate
    keeps `target` of the gain. Returns that rate (None if none did) and every row
    evaluated."""
    rows = []
    for rate in sorted(rates, reverse=True):
        est, q, seconds = at(rate)
        rows.append(RateRow(rate, est, q, seconds))
        if est is None or est.kept is None or est.kept >= target:
            return rate, rows
    return None, rows


def most_kept(rows: list[RateRow]) -> RateRow:
    """The row whose estimate keeps the most (the highest rate among equals)."""

    def kept(r: RateRow) -> float:
        return -1.0 if r.estimate is None or r.estimate.kept is None else r.estimate.kept

    return max(rows, key=lambda r: (kept(r), r.rate))


def format_rates(rows: list[RateRow], picked: float, target: float = TARGET) -> str:
    """The table a rate was picked from: each rate tried, its q and estimate."""
    lines = [f"  {'p':>7}  {'q':>10}  {'kept (est.)':>11}  {'reproduced':>10}  {'time':>6}"]
    for r in rows:
        e = r.estimate
        q = "per-tensor" if r.q is None else f"{r.q:.4g}"
        kept = "-" if e is None else e.short()
        seen = "-" if e is None else f"{e.variant:.0%}"
        mark = "  <- picked" if r.rate == picked else ""
        lines.append(f"  {r.rate:>7g}  {q:>10}  {kept:>11}  {seen:>10}  {r.seconds:>5.0f}s{mark}")
    row = next((r for r in rows if r.rate == picked), None)
    share = None if row is None or row.estimate is None else row.estimate.kept
    if share is not None and share < target:
        lines.append(f"  no rate tried keeps {target:.0%}; p = {picked:g} keeps the most")
    return "\n".join(lines)
