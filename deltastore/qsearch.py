"""Finding DAREx's q: the rescale 1/q that keeps a pruned fine-tune closest to itself.

- global q, coarse-to-fine (DESIGN.md §1): a coarse grid over the whole of [1-p, u]
  at step s, then a fine pass at s/10 around the global best; the objective is
  unlabelled (on calibration text: logit MSE at the fine-tune's top-5 slots, the
  paper's; or KL divergence from the fine-tune, or every layer's hidden-state MSE:
  deltastore.calib.Objective) or labelled (exact match on a validation file,
  maximised). The coarse pass used to
  stop after 3 evaluations without improvement, which stopped in a local dip on
  large deltas (the objective rose just after q = 2(1-p), then fell to its minimum
  near 30(1-p)); the whole range costs one pass of the calibration text per point.
  The log grid (the default) searches the same interval in log2(q/(1-p)) at step
  1/2, then 1/8: at high p the best q is a small multiple of 1-p, where the linear
  grid's first steps (0.01 -> 0.06 at p = 0.99, 0.001 -> 0.051 at p = 0.999) are
  far too coarse. See BENCHMARKS.md, "Fidelity".
- per group (`QGroups`): from the global q, one q per module type or per quarter of
  the layers, by coordinate descent (`refine_groups`) on the same objective. On the
  study's large arith fine-tune it kept 91% of the gain at p = 0.99 where one global
  q kept 68% (BENCHMARKS.md, "Large deltas").
- analytical: per layer, per output row i, the q on the 0.001 grid minimising
  |eta(1-(1-p)/q) S1_i + eta^2 Phi(p) S2_i / (4q^2) + log(2/(1-gamma))| with
  S1_i = sum_j c_ij, S2_i = sum_j c_ij^2, c_ij = delta_ij * mean(x_j); the layer's q
  is the mean over rows, and eta, the one knob, is searched like a global q.
Each candidate is evaluated by applying the pruned delta to the resident base with
the candidate scales and reverting it exactly afterwards.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from deltastore.apply import FlatWeights, apply_delta_, bind, revert_delta_
from deltastore.format import TensorDelta
from deltastore.methods import parse_choice

log = logging.getLogger(__name__)

GAMMA = 0.95


class QSearch(StrEnum):
    LABELLED = "labelled"
    UNLABELLED = "unlabelled"
    ANALYTICAL = "analytical"


def parse_q_search(value: str) -> QSearch:
    return parse_choice(QSearch, value, "q search")


@dataclass
class SearchTrace:
    """Every evaluated point, in order. `minimise` says which way is better."""

    parameter: str
    objective: str
    minimise: bool
    points: list[tuple[float, float]] = field(default_factory=list)
    seconds: float = 0.0  # spent evaluating

    @property
    def best(self) -> tuple[float, float]:
        pick = min if self.minimise else max
        return pick(self.points, key=lambda pv: pv[1])

    def as_dict(self) -> dict[str, Any]:
        return {
            "parameter": self.parameter,
            "objective": self.objective,
            "minimise": self.minimise,
            "grid": [p for p, _ in self.points],
            "values": [v for _, v in self.points],
            "best": self.best[0],
            "best_value": self.best[1],
            "evaluations": len(self.points),
            "seconds": round(self.seconds, 2),
        }


class Progress:
    """Progress over a search's evaluations with the best value so far: a bar on a
    terminal (`shown`), else one log line per evaluation, so a long search is never
    silent. `total` is an upper bound (points outside the range are skipped)."""

    def __init__(self, trace: SearchTrace, desc: str, total: int, shown: bool) -> None:
        self.trace, self.desc, self.total = trace, desc, total
        self.bar = tqdm(desc=desc, total=total, disable=not shown, unit="eval", leave=False)
        self.n = 0

    def update(self, x: float, value: float) -> None:
        self.n += 1
        t = self.trace
        best_x, best_v = t.best
        last = f"{t.parameter}={x:.4g} {t.objective}={value:.4g}"
        best = f"{t.parameter}={best_x:.4g} {t.objective}={best_v:.4g}"
        if self.bar.disable:
            log.info(
                "%s: %d/%d evaluations: %s; best %s", self.desc, self.n, self.total, last, best
            )
            return
        self.bar.update()
        self.bar.set_postfix_str(f"best {best} (last {last})")

    def close(self) -> None:
        self.bar.total = self.bar.n
        self.bar.close()


def coarse_to_fine(
    f: Callable[[float], float],
    lo: float,
    hi: float,
    step: float,
    trace: SearchTrace,
    progress: bool = True,
    fine: tuple[int, int] = (10, 9),
    shown: Callable[[float], float] = lambda x: x,
    patience: int | None = None,
) -> float:
    """Minimise (or maximise) f over [lo, hi]; records every point in `trace` (as
    `shown(x)`). `fine` = (d, n): the fine pass tries n steps of step/d either side
    of the best coarse point. `patience`: stop the coarse pass after that many
    evaluations without improvement (None: the whole grid, so a local dip cannot
    hide the global optimum)."""
    if not lo <= hi:
        raise ValueError(f"empty search interval [{lo}, {hi}]")
    t0 = time.perf_counter()
    seen: dict[float, float] = {}
    n_coarse = math.floor((hi - lo) / step + 1e-9)
    bar = Progress(trace, f"search {trace.parameter}", n_coarse + 1 + 2 * fine[1], progress)

    def evaluate(x: float) -> float:
        x = round(x, 6)
        if x not in seen:
            seen[x] = f(x)
            trace.points.append((shown(x), seen[x]))
            bar.update(shown(x), seen[x])
        return seen[x]

    def better(a: float, b: float) -> bool:
        return a < b if trace.minimise else a > b

    best_x, best_v, misses = lo, evaluate(lo), 0
    for i in range(1, n_coarse + 1):
        x = lo + i * step
        v = evaluate(x)
        if better(v, best_v):
            best_x, best_v, misses = x, v, 0
        else:
            misses += 1
            if patience is not None and misses >= patience:
                break
    fine_step, centre = step / fine[0], best_x
    for k in range(-fine[1], fine[1] + 1):
        x = centre + k * fine_step
        if lo <= x <= hi and k != 0:
            v = evaluate(x)
            if better(v, best_v):
                best_x, best_v = x, v
    bar.close()
    trace.seconds += time.perf_counter() - t0
    return round(best_x, 6)


class QGrid(StrEnum):
    LOG = "log"
    LINEAR = "linear"
    MULTIPLES = "multiples"  # the DAREx paper's recipe: k (1-p), k = 1..30, no refinement


def parse_q_grid(value: str) -> QGrid:
    return parse_choice(QGrid, value, "q grid")


LOG_STEP = 0.5  # coarse step in log2(q/(1-p)); the fine pass is 1/4 of it, 3 each side
MULTIPLES = 30  # the multiples grid's last multiple of 1-p


def search_q(
    f: Callable[[float], float],
    rate: float,
    q_max: float,
    step: float,
    grid: QGrid,
    trace: SearchTrace,
    progress: bool = True,
    downward: bool = False,
    q_min: float | None = None,
) -> float:
    """The global q in [q_min, q_max] that optimises f, on the linear grid (coarse
    `step`), the log grid, or the multiples grid; every evaluated q is recorded in
    `trace`. q_min defaults to 1-p (DARE's q; the mix's is its sample's keep rate).

    The coarse pass covers the whole range, from q_min up, or with `downward` from
    q_max down (an importance mask's natural scale is q = 1); the direction only
    orders the evaluations."""
    lo = round(1.0 - rate if q_min is None else q_min, 6)
    hi = max(lo, q_max)
    top = math.log2(hi / lo)
    if grid is QGrid.MULTIPLES:
        ks = range(1, MULTIPLES + 1)
        qs = [q for q in (round(k * lo, 6) for k in ks) if q <= hi] or [lo]
        idx = coarse_to_fine(
            lambda i: f(qs[int(i)]),
            0.0,
            len(qs) - 1,
            1.0,
            trace,
            progress,
            fine=(1, 0),
            shown=lambda i: qs[int(i)],
        )
        return qs[int(idx)]

    def q_of(x: float) -> float:
        if grid is QGrid.LINEAR:
            q = hi - x if downward else lo + x
        else:
            q = hi * 2.0**-x if downward else lo * 2.0**x
        return round(min(hi, max(lo, q)), 6)

    span, coarse, fine = (
        (hi - lo, step, (10, 9)) if grid is QGrid.LINEAR else (top, LOG_STEP, (4, 3))
    )
    x = coarse_to_fine(
        lambda x: f(q_of(x)), 0.0, span, coarse, trace, progress, fine=fine, shown=q_of
    )
    return q_of(x)


# --------------------------------------------------------------------------- evaluation


class ScaledDeltaModel:
    """The base model with a pruned delta that can be applied under trial scales.

    `fixed`: per tensor, a bool over its kept entries that the scale must not touch
    (the mix's magnitude part). Such a tensor's values are the raw delta here; each
    trial folds them with `fix_values`, as the file stores them. `weights`: the model's
    parameters already re-homed in flat buffers (else they are, here)."""

    def __init__(
        self,
        model: nn.Module,
        tensors: list[TensorDelta],
        fixed: dict[str, torch.Tensor] | None = None,
        weights: FlatWeights | None = None,
    ):
        self.model = model
        self.weights = weights if weights is not None else FlatWeights.from_module(model)
        self.tensors = tensors
        self.fixed = fixed or {}

    @contextmanager
    def scaled(self, scales: dict[str, float]) -> Iterator[nn.Module]:
        tensors = trial_tensors(self.tensors, self.fixed, scales)
        undo = apply_delta_(self.weights, bind(tensors, self.weights, scales))
        try:
            yield self.model
        finally:
            revert_delta_(self.weights, undo)


def trial_tensors(
    tensors: list[TensorDelta], fixed: dict[str, torch.Tensor], scales: dict[str, float]
) -> list[TensorDelta]:
    """The tensors to apply under trial `scales`: those with `fixed` entries have their
    values folded for their scale (`fix_values`), the others are as given."""
    if not fixed:
        return tensors
    out = []
    for t in tensors:
        mask = fixed.get(t.name)
        if mask is not None:
            s = scales.get(t.name, t.scale)
            v = fix_values(t.values.to(torch.float32), mask, s)
            t = TensorDelta(t.name, t.shape, t.positions, v, s)
        out.append(t)
    return out


def global_scales(tensors: list[TensorDelta], q: float) -> dict[str, float]:
    return {t.name: 1.0 / q for t in tensors if not t.dense}


def fix_values(delta: torch.Tensor, fixed: torch.Tensor, scale: float) -> torch.Tensor:
    """Values to store with `scale` so that the `fixed` entries come out as `delta`
    (divided by the scale) and the others as delta * scale. fp32."""
    return torch.where(fixed, delta / scale, delta)


# --------------------------------------------------------------------------- per-group q


class QGroups(StrEnum):
    NONE = "none"
    MODULE = "module"  # one q per module type (q_proj, ..., down_proj, embed_tokens)
    DEPTH = "depth"  # one q per quarter of the layers (and one for the rest)


def parse_q_groups(value: str) -> QGroups:
    return parse_choice(QGroups, value, "q groups")


_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.*)$")
DEPTH_GROUPS = 4


def tensor_groups(names: list[str], how: QGroups) -> dict[str, list[str]]:
    """Group name -> tensor names (in the given order)."""
    layers = [int(m.group(1)) for n in names if (m := _LAYER.match(n))]
    per = max(1, math.ceil((max(layers) + 1) / DEPTH_GROUPS)) if layers else 1
    groups: dict[str, list[str]] = {}
    for n in names:
        m = _LAYER.match(n)
        if how is QGroups.NONE:
            key = "all"
        elif how is QGroups.MODULE:
            key = m.group(2) if m else n.rsplit(".", 2)[-2] if n.count(".") else n
            key = key.removesuffix(".weight")
        else:
            if m:
                first = int(m.group(1)) // per * per
                key = f"layers {first}-{first + per - 1}"
            else:
                key = "outside the layers"
        groups.setdefault(key, []).append(n)
    return groups


GROUP_FACTORS = (0.5, 2**-0.5, 2**0.5, 2.0)  # each group's q is tried at these multiples


def refine_groups(
    f: Callable[[dict[str, float]], float],
    groups: dict[str, list[str]],
    q: float,
    lo: float,
    hi: float,
    trace: SearchTrace,
    progress: bool = True,
    sweeps: int = 2,
) -> dict[str, float]:
    """Coordinate descent from one global q: each group in turn tries its q times each
    of GROUP_FACTORS (within [lo, hi]) with the other groups held, and keeps the best;
    a sweep that improves nothing ends it. f maps per-tensor q to the objective.
    Returns the q of every group; `trace` records (evaluation index, value)."""
    t0 = time.perf_counter()
    group_q = dict.fromkeys(groups, q)

    def per_tensor(gq: dict[str, float]) -> dict[str, float]:
        return {n: gq[g] for g, names in groups.items() for n in names}

    def better(a: float, b: float) -> bool:
        return a < b if trace.minimise else a > b

    best = f(per_tensor(group_q))
    trace.points.append((0, best))
    total = sweeps * len(groups) * len(GROUP_FACTORS)
    bar = Progress(trace, "search q per group", total, progress)
    for _ in range(sweeps):
        improved = False
        for g in groups:
            current = group_q[g]
            for factor in GROUP_FACTORS:
                cand = round(min(hi, max(lo, current * factor)), 6)
                if cand == current:
                    continue
                value = f(per_tensor({**group_q, g: cand}))
                trace.points.append((len(trace.points), value))
                bar.update(len(trace.points) - 1, value)
                if better(value, best):
                    best, group_q[g], improved = value, cand, True
        if not improved:
            break
    bar.close()
    trace.seconds += time.perf_counter() - t0
    return group_q


# --------------------------------------------------------------------------- analytical


def phi(p: float) -> float:
    """(1-2p) / log((1-p)/p), with its limit 1/2 at p = 1/2."""
    if abs(p - 0.5) < 1e-9:
        return 0.5
    return (1 - 2 * p) / math.log((1 - p) / p)


@dataclass(frozen=True)
class RowStats:
    """Per output row of one matrix: S1 = sum_j c_ij and S2 = sum_j c_ij^2."""

    s1: torch.Tensor  # (rows,) fp64
    s2: torch.Tensor  # (rows,) fp64


def row_stats(delta: torch.Tensor, mean_input: torch.Tensor) -> RowStats:
    c = delta.to(torch.float64) * mean_input.to(torch.float64)[None, :]  # (rows, in)
    return RowStats(c.sum(1), (c * c).sum(1))


def q_grid(rate: float) -> torch.Tensor:
    """0.001*k on [1-p, 0.998]."""
    lo = max(1, math.ceil(round((1 - rate) * 1000, 6)))
    return torch.arange(lo, 999, dtype=torch.float64) / 1000


def layer_q(stats: RowStats, rate: float, eta: float, grid: torch.Tensor) -> float:
    """The mean over rows of each row's bound-minimising q."""
    q = grid[None, :]  # (1, G)
    bound = (
        eta * (1 - (1 - rate) / q) * stats.s1[:, None]
        + eta**2 * phi(rate) * stats.s2[:, None] / (4 * q * q)
        + math.log(2 / (1 - GAMMA))
    ).abs()  # (rows, G)
    return float(grid[bound.argmin(dim=1)].mean())


def analytical_scales(
    stats: dict[str, RowStats], tensors: list[TensorDelta], rate: float, eta: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-tensor scales for one eta; tensors without input statistics (embeddings
    used as lookups) get the mean q of the others. Returns (scales, qs)."""
    grid = q_grid(rate)
    qs = {name: layer_q(s, rate, eta, grid) for name, s in stats.items()}
    fallback = sum(qs.values()) / len(qs) if qs else 1.0 - rate
    sparse = [t.name for t in tensors if not t.dense]
    full = {n: qs.get(n, fallback) for n in sparse}
    return {n: 1.0 / q for n, q in full.items()}, full


ETA_LOG10_RANGE = (-1.0, 6.0)
ETA_LOG10_STEP = 0.5


def search_eta(
    objective: Callable[[dict[str, float]], float],
    stats: dict[str, RowStats],
    tensors: list[TensorDelta],
    rate: float,
    trace: SearchTrace,
    progress: bool = True,
) -> tuple[float, dict[str, float]]:
    """Search eta (both signs, log-spaced magnitude) for the analytical per-layer q."""
    best: tuple[float, float, float] | None = None  # (value, eta, sign)
    for sign in (1.0, -1.0):
        sub = SearchTrace(trace.parameter, trace.objective, trace.minimise)

        def f(e: float, sign: float = sign) -> float:
            return objective(analytical_scales(stats, tensors, rate, sign * 10**e)[0])

        e = coarse_to_fine(f, *ETA_LOG10_RANGE, ETA_LOG10_STEP, sub, progress)
        value = dict(sub.points)[e]
        trace.points += [(sign * 10**x, v) for x, v in sub.points]
        if best is None or (value < best[0] if trace.minimise else value > best[0]):
            best = (value, e, sign)
    assert best is not None
    eta = best[2] * 10 ** best[1]
    return eta, analytical_scales(stats, tensors, rate, eta)[1]
