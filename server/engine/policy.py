"""Merged or unmerged, chosen per step from a cost model measured at start-up.

In a step, variant v has n_v tokens and a delta of k_v kept entries. Unmerged, its
rows cost a·k_v·n_v of sparse work (a: seconds per entry and token, measured with
the kernel). With variant c merged into the resident weights, c's rows cost nothing
and every other row pays for taking c back out (-Δ_c): the step saves

    a · k_c · (2·n_c − N)

Merging c costs a swap (apply in place, later a revert; s seconds per entry, measured
on the resident weights), unless c is materialized (a pointer swap). The policy
switches when the saving over the steps c's rows still have to run pays for the
swap; a merged variant whose saving turns negative is reverted the same way. Neither
mode wins everywhere (dLoRA), so `auto` decides, and `never` / `always` pin one mode
for measurements.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from deltastore.apply import BoundDelta, BoundGroup, apply_delta_, revert_delta_
from server.engine.kernels.layout import pack
from server.engine.sparse import CSR, Matrix, Segment, StepDeltas, VariantLayout


class MergeMode(StrEnum):
    AUTO = "auto"
    NEVER = "never"  # always unmerged: the base stays resident
    ALWAYS = "always"  # merge the variant with the most rows of each step


@dataclass
class MergePolicy:
    mode: MergeMode
    sparse_s: float  # seconds per kept entry and token (unmerged product)
    swap_s: float  # seconds per kept entry of an apply + revert

    @classmethod
    def calibrate(cls, engine: Any, native: bool, mode: str) -> MergePolicy:
        return cls(MergeMode(mode), _measure_sparse(native, engine.device), _measure_swap(engine))

    def observe_swap(self, swap: Any, kept: int) -> None:
        """Track the real in-place swap cost (an apply or revert is half a round trip)."""
        if kept and swap.mode.value == "inplace":
            self.swap_s = 0.8 * self.swap_s + 0.2 * (2 * swap.seconds / kept)

    def choose(
        self,
        merged: str | None,
        tokens: dict[str | None, int],
        kept: dict[str, int],
        remaining: dict[str | None, list[int]],
        materialized: Container[str] = (),
        steady: bool = True,
    ) -> str | None:
        """The variant to have merged for this step (None: the base alone). `tokens`
        counts each variant's rows; `kept` the kept entries of those variants and of
        `merged`; `remaining` the tokens each variant's sequences still generate;
        `materialized` the variants a swap to costs nothing (pointer swaps); `steady` is
        False when the rows are prompt chunks only (a composition that lasts one step:
        auto then keeps what it has)."""
        if self.mode is MergeMode.NEVER:
            return None
        variants = [v for v in tokens if v is not None]
        if not variants:
            return merged if self.mode is MergeMode.ALWAYS else None
        best = max(variants, key=lambda v: (tokens[v], v == merged))
        if self.mode is MergeMode.ALWAYS:
            return best
        if not steady:
            return merged
        total = sum(tokens.values())

        def saving(v: str | None) -> float:
            if v is None:
                return 0.0
            if v not in tokens:  # merged, none of its rows here: every row takes it out
                return -self.sparse_s * kept.get(v, 0) * total
            return self.sparse_s * kept[v] * (2 * tokens[v] - total)

        def swap_cost(v: str | None) -> float:
            if v is None or v in materialized:
                return 0.0
            return self.swap_s * kept.get(v, 0) / 2

        horizon = max(statistics.median(remaining.get(best) or [1]), 1)
        switch = (saving(best) - saving(merged)) * horizon
        # twice the swap cost: the composition of the rows changes as they finish; a
        # variant whose merge saves nothing is never worth more than the base
        if (
            best != merged
            and saving(best) > 0
            and switch > 2 * (swap_cost(merged) + swap_cost(best))
        ):
            return best
        losing = merged is not None and saving(merged) < 0
        if losing and -saving(merged) * horizon > swap_cost(merged):
            return None
        return merged


def _measure_sparse(native: bool, device: torch.device) -> float:
    """Seconds per entry and token of the sparse product on the engine's device: the
    slope between 1%- and 4%-dense 1536x576 deltas (4 rows of four variants each). A
    call's fixed cost (dispatch, the thread pool's start) is paid whether or not a
    variant is merged, so it is left out: counted in, it made merging look cheap and
    a 16-variant step swapped every few steps."""
    g = torch.Generator().manual_seed(0)
    out, inp, n = 1536, 576, 4

    def timed(k: int) -> float:
        layouts = []
        for i in range(n):
            pos = torch.randperm(out * inp, generator=g)[:k].sort().values
            vals = torch.randn(k, generator=g).bfloat16() * 1e-3
            csr = CSR.from_positions(pos, vals, 1.0, (out, inp))
            matrices = {"w": Matrix(0, (out, inp), k)}
            layouts.append(
                VariantLayout(f"calibration{i}", pack({0: csr}, 1).to(device), None, matrices)
            )
        segments = [Segment(i, i + 1, layouts[i], 1.0) for i in range(n)]
        step = StepDeltas.build(segments, device, native)
        x = torch.randn(n, inp, generator=g).to(device)
        y = torch.zeros(n, out, device=device)
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            step.spmm_add_(y, x, 0)
            float(y[0, 0])  # waits for the device
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    small, large = out * inp // 100, out * inp // 25
    t_small, t_large = timed(small), timed(large)
    slope = (t_large - t_small) / ((large - small) * n)
    # timer noise can make the difference meaningless: then the whole large call
    return slope if slope > 0 else t_large / (large * n)


def _measure_swap(engine: Any) -> float:
    """Seconds per entry of apply + revert on the resident weights (a zero delta at
    random positions: the revert restores every bit)."""
    weights = engine.weights
    group = max(range(len(weights.buffers)), key=lambda i: weights.buffers[i].numel())
    flat = weights.buffers[group]
    k = max(min(flat.numel() // 100, 1 << 20), 1)
    g = torch.Generator().manual_seed(0)
    # k positions drawn with replacement, duplicates dropped: a permutation of the whole
    # buffer would hold 8 bytes per weight (10 GB for a 1B base) and take minutes
    index = torch.randint(flat.numel(), (k,), generator=g).unique().to(flat.device)
    k = int(index.numel())
    bound = BoundDelta((BoundGroup(group, index, torch.zeros(k, device=flat.device)),))
    times = []
    for _ in range(3):
        with engine.digest_lock:  # the base's digest, taken meanwhile, sees no write
            t0 = time.perf_counter()
            revert_delta_(weights, apply_delta_(weights, bound))
            float(flat[0])  # waits for the device
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / k
