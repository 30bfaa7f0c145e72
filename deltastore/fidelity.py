"""The fidelity estimate: how much of its fine-tune a compressed variant keeps, told
without labels, and the highest drop rate that keeps enough of it.

The reference is the fine-tune's own greedy replies to the calibration prompts (a
calibration text in the chat format, cut after each reply header:
`calib.load_prompts`, `calib.continuations`). A model reproduces a reply when its
greedy token is the fine-tune's at every step of it, teacher-forced: exactly when
greedy decoding of that prompt would produce the same text. Agreement is the share
of replies reproduced; the base's agreement is the floor (what the fine-tune added
nothing to), the fine-tune's (1 up to rounding) the ceiling, and the estimate is the
share of the difference the variant keeps:

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
# No estimate (and no refusal) when the fine-tune changed too little for a share of it
# to mean anything: fewer than MIN_GAIN replies that the base does not already
# reproduce, or a mean KL(fine-tune || base) below MIN_SHIFT nats over the replies'
# tokens (a fine-tune that learnt its task moves far more; a few steps on a random
# tiny model, whose greedy tokens are near-ties, move ~0.05)
MIN_GAIN = 2
MIN_SHIFT = 0.5


@dataclass(frozen=True)
class Estimate:
    """What a variant keeps of its fine-tune's agreement above the base's."""

    kept: float | None  # None: the fine-tune changed too little to tell
    variant: float  # share of the replies the variant reproduces
    base: float
    finetune: float
    continuations: int  # replies (calibration prompts)
    tokens: float  # the variant's share of the replies' tokens reproduced (shown only)
    shift: float = math.nan  # mean KL(fine-tune || base) over the replies' tokens, nats

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Estimate:
        def num(key: str) -> float:
            v = d.get(key)
            return math.nan if v is None else float(v)

        kept = d.get("kept")
        return cls(
            None if kept is None else float(kept),
            num("variant"),
            num("base"),
            num("finetune"),
            int(d.get("continuations", 0)),
            num("tokens"),
            num("shift"),
        )

    @property
    def below(self) -> bool:
        """Under the threshold compress refuses at."""
        return self.kept is not None and self.kept < THRESHOLD

    def short(self) -> str:
        return "-" if self.kept is None else f"{100 * self.kept:.0f}%"

    def describe(self) -> str:
        counts = (
            f"the fine-tune's greedy replies to {self.continuations} calibration prompts: "
            f"the variant reproduces {self.variant:.0%}, the base {self.base:.0%}, the "
            f"fine-tune {self.finetune:.0%}"
        )
        if self.kept is None:
            return (
                f"none: the fine-tune barely moves from the base on these prompts (KL "
                f"{self.shift:.2g} nats per token; {counts})"
            )
        return f"keeps ~{self.kept:.0%} of the fine-tune's gain over the base ({counts})"


@dataclass(frozen=True)
class Agreement:
    sequences: float  # share of the replies reproduced whole
    tokens: float  # share of their tokens
    kl: float  # mean KL(fine-tune || model) per token


def agreement(model: torch.nn.Module, cont: Continuations) -> Agreement:
    """How much of the fine-tune's replies `model` reproduces."""
    values = score_continuations(model, cont).values(cont.mask)
    return Agreement(values["sequence-agreement"], values["agreement"], values["generated-kl"])


def estimate(variant: Agreement, base: Agreement, cont: Continuations) -> Estimate:
    ft = cont.ft_agreement[1]
    m = cont.tokens.shape[0]
    kept = None
    if (ft - base.sequences) * m >= MIN_GAIN and base.kl >= MIN_SHIFT:
        kept = (variant.sequences - base.sequences) / (ft - base.sequences)
    return Estimate(kept, variant.sequences, base.sequences, ft, m, variant.tokens, base.kl)


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
    """The highest of `rates` whose estimate keeps `target` of the gain, compressing at
    a rate with `at(rate)` (the estimate, the q and the seconds it took). The highest
    rate first (ordinary deltas keep everything there); then, as the estimate falls
    with the rate, a bisection of the rest: about log2(n) compressions, not n. Returns
    that rate (None if none does) and the rows evaluated, highest rate first."""
    ladder = sorted(set(rates), reverse=True)
    rows: dict[float, RateRow] = {}

    def keeps(i: int) -> bool:
        est, q, seconds = at(ladder[i])
        rows[ladder[i]] = RateRow(ladder[i], est, q, seconds)
        return est is None or est.kept is None or est.kept >= target

    def done(picked: float | None) -> tuple[float | None, list[RateRow]]:
        return picked, [rows[r] for r in sorted(rows, reverse=True)]

    if not ladder:
        raise ValueError("no rate to try")
    if keeps(0):
        return done(ladder[0])
    lo, hi = 0, len(ladder)  # ladder[lo] falls short; ladder[hi] keeps it (or hi = n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if keeps(mid):
            hi = mid
        else:
            lo = mid
    return done(ladder[hi] if hi < len(ladder) else None)


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
