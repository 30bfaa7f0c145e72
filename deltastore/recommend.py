"""`deltaserve recommend`: delta statistics and the method the DAREx pipeline picks.

The pipeline (Deng et al. 2024): if you control training, fine-tune with AdamR-L2
and prune with DARE/DAREx-q. Otherwise look at the delta: large deltas (continued
pre-training, mean |delta| around 1e-2) prune better by importance (magnitude,
WANDA); ordinary SFT deltas (mean |delta| around 1e-3 or less) by DAREx-q, with q
searched on labels (q_v) when you have them, on calibration text (q_e) when not.

Two changes, each measured on fine-tunes of the embedded base (BENCHMARKS.md,
"Fidelity"): an importance mask always gets a searched q (the DAREx rescale; with
q = 1, magnitude fell to the base's accuracy on every fine-tune at p >= 0.99, and the
search includes q = 1, so it can only help), and a LoRA delta gets magnitude + q
whatever its size (it kept 100% of the gain at p = 0.99 where DAREx-q kept 86%).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from deltastore.calib import DEFAULT_OBJECTIVE, Objective
from deltastore.compress import CompressOptions, Compressor
from deltastore.fidelity import RATES, TARGET, Estimate, RateRow, highest_rate, most_kept
from deltastore.methods import MIX_TOP, Method
from deltastore.qsearch import QGroups, QSearch
from deltastore.sources import FinetuneSource

# Between the paper's "large" (~1e-2) and "small" (~1e-3 or less): the geometric middle.
LARGE_DELTA = 3e-3


@dataclass(frozen=True)
class TensorStats:
    name: str
    numel: int
    mean: float
    mean_abs: float
    std: float
    max_abs: float
    base_mean_abs: float
    # share of the tensor's sum of squares held by its largest 1% of |delta| entries:
    # ~8% for a Gaussian delta, ~3% for a flat (sign-like) one, more for heavy tails
    top_energy: float = math.nan


TOP_SHARE = 0.01  # the top_energy statistic's share of entries (what p = 0.99 keeps)


def top_energy(d: torch.Tensor) -> float:
    """Share of sum(d^2) in the largest TOP_SHARE of |d| (at least one entry)."""
    sq = d.reshape(-1).to(torch.float32).square()
    total = float(sq.sum(dtype=torch.float64))
    if total == 0.0:
        return 0.0
    k = max(1, round(TOP_SHARE * sq.numel()))
    return float(torch.topk(sq, k, sorted=False).values.sum(dtype=torch.float64)) / total


@dataclass(frozen=True)
class Recommendation:
    method: str
    q_search: str
    reason: str
    q_objective: str
    q_groups: str
    rate: float
    rate_reason: str
    mean_abs: float
    std: float
    max_abs: float
    relative: float  # mean |delta| / mean |base weight|
    top_energy: float  # pooled TensorStats.top_energy (weighted by each tensor's energy)
    tensors: list[TensorStats]
    low_rank: bool = False
    # the rates tried with the fidelity estimate (recommend --calib), highest first
    estimates: list[RateRow] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def options(self, template: CompressOptions, rate: float) -> CompressOptions:
        """`template` with the method, q search and objective this delta gets at `rate`
        (without labels: the fidelity estimate needs none either)."""
        pick = choose(self.mean_abs, False, self.low_rank, self.top_energy, rate)
        return replace(
            template,
            method=Method(pick.method),
            rate=rate,
            q=None,
            q_search=QSearch(pick.q_search),
            q_objective=Objective(pick.q_objective),
            q_groups=QGroups(pick.q_groups),
            mix_top=MIX_TOP,
        )

    def by_estimate(
        self,
        compressor: Compressor,
        template: CompressOptions,
        rates: tuple[float, ...] = RATES,
    ) -> Recommendation:
        """The highest of `rates` whose fidelity estimate keeps fidelity.TARGET of the
        gain, compressing at each from the highest down (`template` gives the
        calibration text and everything else); if none does, the one that keeps most."""

        def at(rate: float) -> tuple[Estimate | None, float | None, float]:
            t0 = time.perf_counter()
            delta = compressor(self.options(template, rate))
            fid = delta.meta.fidelity
            est = None if fid is None else Estimate.from_dict(fid)
            return est, delta.meta.q, time.perf_counter() - t0

        picked, rows = highest_rate(at, rates)
        rate = picked if picked is not None else most_kept(rows).rate
        kept = next(r.estimate for r in rows if r.rate == rate)
        if picked is None:
            why = (
                f"no rate tried keeps {TARGET:.0%} of the gain by the fidelity estimate; "
                f"p = {rate:g} keeps the most ({'-' if kept is None else kept.short()})"
            )
        else:
            why = (
                f"the highest rate whose fidelity estimate keeps at least {TARGET:.0%} of the "
                f"fine-tune's gain on the calibration text "
                f"({'-' if kept is None else kept.short()}; the table below)"
            )
        pick = choose(self.mean_abs, False, self.low_rank, self.top_energy, rate)
        return replace(
            self,
            method=pick.method,
            q_search=pick.q_search,
            reason=pick.reason,
            q_objective=pick.q_objective,
            q_groups=pick.q_groups,
            rate=rate,
            rate_reason=why,
            estimates=rows,
        )


def delta_stats(ft: FinetuneSource, progress: bool = True) -> list[TensorStats]:
    out = []
    names = ft.base.names()
    for name, d in tqdm(ft.deltas(), total=len(names), desc="stats", disable=not progress):
        d64 = d.to(torch.float64)
        base_abs = float(ft.base.get(name).to(torch.float64).abs().mean())
        out.append(
            TensorStats(
                name,
                d.numel(),
                float(d64.mean()),
                float(d64.abs().mean()),
                float(d64.std(correction=0)),
                float(d64.abs().max()),
                base_abs,
                top_energy(d),
            )
        )
    return out


def _on(have_labels: bool) -> str:
    if have_labels:
        return "on labels (q_v)"
    return f"on calibration text (q_e, by {DEFAULT_OBJECTIVE.value})"


@dataclass(frozen=True)
class Choice:
    """What `deltaserve compress` should run: its --method, --q-search and
    --q-objective (the last for an unlabelled search only)."""

    method: str
    q_search: str
    reason: str
    q_objective: str = DEFAULT_OBJECTIVE.value
    q_groups: str = "none"


# At most this mean |delta|, the fidelity study's SFT deltas (3e-5 to 2.4e-4) kept
# their whole gain at p = 0.999; a held-out one at 5.5e-4 kept 87% there, 99% at 0.99.
SMALL_DELTA = 3e-4
LARGE_SFT = 1e-3  # the study's large full fine-tunes: 1.3e-3 to 2.2e-3
EXTREME_RATE = 0.999
LARGE_AT_099 = (
    "DAREx-q with one q per module type kept 91-100% of the gain at p = 0.99 (one "
    "global q on the DAREx paper's logit MSE, and DARE, 68-100%; magnitude + q 0-100%)"
)
LARGE_AT_EXTREME = (
    "DAREx-q with one q per module type, searched by KL divergence, kept 6-98% of the "
    "gain at p = 0.999 (98% and 95% on two of three; DARE and the paper's recipe 0%)"
)

# The largest 1% of entries of the study's full fine-tunes hold 6.6-9.5% of their
# energy (a Gaussian's 8.5%), the LoRA delta's 12.8%: above this a delta is
# heavy-tailed, and an importance mask keeps most of it. BENCHMARKS.md, "Fidelity".
HEAVY_TAIL = 0.12


def choose(
    mean_abs: float,
    have_labels: bool = False,
    low_rank: bool = False,
    top_energy: float = math.nan,
    rate: float = 0.99,
) -> Choice:
    """The method for a delta of this size, shape and kind at drop rate `rate`, from
    the fidelity study's measured table (BENCHMARKS.md, "Fidelity"; each reason names
    its evidence)."""
    q_search = "labelled" if have_labels else "unlabelled"
    if low_rank:
        return Choice(
            "magnitude",
            q_search,
            "a low-rank (LoRA) delta: its mass sits in its largest entries, so keep "
            f"those (magnitude) and rescale by a q searched {_on(have_labels)}; on the "
            "study's LoRA delta this kept 106% of the gain at p = 0.99, DAREx-q 86%",
        )
    heavy = not math.isnan(top_energy) and top_energy >= HEAVY_TAIL
    if mean_abs >= LARGE_DELTA and heavy:
        return Choice(
            "magnitude",
            q_search,
            f"mean |delta| = {mean_abs:.2e} >= {LARGE_DELTA:.0e} and heavy-tailed (its "
            f"largest 1% hold {top_energy:.0%} of its energy): a continued-pre-training "
            "scale delta, where importance-based pruning beats random drop (the DAREx "
            f"paper); the kept entries are rescaled by a q searched {_on(have_labels)}",
        )
    if mean_abs > LARGE_SFT:
        shape = "" if math.isnan(top_energy) else f", flat (its largest 1% hold {top_energy:.0%})"
        measured = LARGE_AT_EXTREME if rate >= EXTREME_RATE else LARGE_AT_099
        return Choice(
            "darex-q",
            q_search,
            f"mean |delta| = {mean_abs:.2e} > {LARGE_SFT:.0e}{shape}: on the study's large "
            f"full fine-tunes, {measured}; q searched {_on(have_labels)}, one per module type",
            q_groups="module",
        )
    return Choice(
        "darex-q",
        q_search,
        f"mean |delta| = {mean_abs:.2e} < {LARGE_DELTA:.0e}: an SFT delta, where DAREx-q "
        f"kept 95-110% of the gain at p = 0.99 in the study; q searched {_on(have_labels)}",
    )


def choose_rate(mean_abs: float, low_rank: bool = False) -> tuple[float, str]:
    """(drop rate p, reason), from what the fidelity study measured (BENCHMARKS.md)."""
    if low_rank:
        return 0.99, ("the study's LoRA delta kept all of its gain at p = 0.99 and 89% at 0.999")
    if mean_abs <= SMALL_DELTA:
        return 0.999, (
            f"mean |delta| {mean_abs:.1e} <= {SMALL_DELTA:.0e}: the study's SFT deltas of this "
            "size kept their whole gain at p = 0.999 (a file 5x smaller than at 0.99); "
            "check with a labelled set, and use 0.99 if it falls short"
        )
    if mean_abs > LARGE_SFT:
        return 0.99, (
            f"mean |delta| {mean_abs:.1e} > {LARGE_SFT:.0e}: the study's large full "
            "fine-tunes kept 91-100% of their gain at p = 0.99 and 6-98% at 0.999 (with one "
            "q per module type; at 0.999 a row of a 576-wide matrix keeps 0.6 entries, and "
            "arithmetic kept 6%)"
        )
    return 0.99, (
        f"mean |delta| {mean_abs:.1e} > {SMALL_DELTA:.0e}: larger deltas lose gain at "
        "p = 0.999 (a held-out fine-tune at 5.5e-4 kept 87% there, 99% at 0.99)"
    )


def recommend(
    stats: list[TensorStats],
    have_labels: bool = False,
    low_rank: bool = False,
    rate: float | None = None,
) -> Recommendation:
    """The method and rate for this delta; `rate` fixes the rate (the method is the
    one measured best there) instead of recommending one."""
    if not stats:
        raise ValueError("the fine-tune does not change any tensor of the base")
    n = sum(s.numel for s in stats)
    mean_abs = sum(s.mean_abs * s.numel for s in stats) / n
    # pooled std over all entries, from each tensor's mean and (population) std
    mean = sum(s.mean * s.numel for s in stats) / n
    second = sum((s.std**2 + s.mean**2) * s.numel for s in stats) / n
    std = math.sqrt(max(second - mean**2, 0.0))
    max_abs = max(s.max_abs for s in stats)
    base_abs = sum(s.base_mean_abs * s.numel for s in stats) / n
    relative = mean_abs / base_abs if base_abs else math.inf
    energy = [(s.std**2 + s.mean**2) * s.numel for s in stats]
    top = sum(e * s.top_energy for e, s in zip(energy, stats, strict=True))
    top = top / sum(energy) if sum(energy) else 0.0
    if rate is None:
        rate, rate_reason = choose_rate(mean_abs, low_rank)
    else:
        rate_reason = "given (--rate)"
    pick = choose(mean_abs, have_labels, low_rank, top, rate)
    return Recommendation(
        pick.method,
        pick.q_search,
        pick.reason,
        pick.q_objective,
        pick.q_groups,
        rate,
        rate_reason,
        mean_abs,
        std,
        max_abs,
        relative,
        top,
        stats,
        low_rank,
    )


def natural_key(name: str) -> list[Any]:
    """`layers.2` before `layers.10`: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
