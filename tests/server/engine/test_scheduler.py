"""Engine v2's policy (server/engine/scheduler.py, server/engine/policy.py), on its own:
which rows a step takes, and when the cost model merges a variant."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from server.engine.policy import MergeMode, MergePolicy
from server.engine.scheduler import MIN_PREFILL, Scheduler, demand, plan_prefill


@dataclass
class Seq:
    """What the policy reads of a sequence."""

    variant: str | None
    prompt: list[int]
    prefilled: int = 0
    remaining: int = 10

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)


def _policy(mode: str = "auto", sparse_s: float = 1e-9, swap_s: float = 1e-8) -> MergePolicy:
    return MergePolicy(MergeMode(mode), sparse_s, swap_s)


def test_decode_rows_first_then_prompt_chunks_within_the_budget():
    done = [Seq("a", [1] * 5, prefilled=5) for _ in range(3)]
    long, short, late = Seq("b", [1] * 40), Seq(None, [1] * 7), Seq("c", [1] * 30, prefilled=10)
    sched = Scheduler(32, _policy())
    decode, chunks = sched.plan([done[0], long, done[1], short, late, done[2]])
    assert decode == done  # every sequence past its prompt: one row each, in order
    assert chunks == [(long, 29)]  # 32 - 3 decode rows; the others wait
    # a full decode still leaves room for prompts: MIN_PREFILL tokens at least
    many = [Seq("a", [1], prefilled=1) for _ in range(40)]
    assert plan_prefill([*many, long], 40, 32) == [(long, MIN_PREFILL)]
    # a prompt that fits is taken whole and the next gets the rest, from where it was
    assert plan_prefill([short, late], 0, 20) == [(short, 7), (late, 13)]


def test_demand_counts_decode_rows_or_else_prompt_tokens():
    a1, a2, b = Seq("a", [1], 1, 5), Seq("a", [1], 1, 7), Seq("b", [1], 1, 3)
    rows, remaining, steady = demand([a1, a2, b], [(Seq("c", [1] * 9), 9)])
    assert rows == {"a": 2, "b": 1} and remaining == {"a": [5, 7], "b": [3]} and steady
    p = Seq("c", [1] * 9, remaining=4)
    assert demand([], [(p, 9)]) == ({"c": 9}, {"c": [4]}, False)


def test_never_and_always():
    rows = {"a": 5, "b": 2, None: 1}
    kept = {"a": 1000, "b": 1000}
    assert _policy("never").choose(None, rows, kept, {}) is None
    assert _policy("never").choose("a", rows, kept, {}) is None
    assert _policy("always").choose(None, rows, kept, {}) == "a"
    assert _policy("always").choose("b", {"a": 2, "b": 2}, kept, {}) == "b"  # a tie keeps it
    assert _policy("always").choose("b", {None: 3}, {"b": 1000}, {}) == "b"  # base rows only


@pytest.mark.parametrize("materialized", [False, True])
def test_auto_merges_a_dominant_variant_when_the_saving_pays_for_the_swap(materialized):
    kept = {"a": 10_000, "b": 10_000}
    rows = {"a": 7, "b": 1}
    mat = {"a"} if materialized else set()
    cheap = _policy(sparse_s=1e-9, swap_s=1e-8)
    # saving per step 1e-9 * 1e4 * (14 - 8) = 6e-5 s, over a horizon of 50 steps 3e-3 s;
    # the swap (apply now, revert later) 2 * 1e-8 * 1e4 / 2 = 1e-4 s: it pays
    assert cheap.choose(None, rows, kept, {"a": [50] * 7}, mat) == "a"
    dear = _policy(sparse_s=1e-9, swap_s=1e-5)  # swaps cost 0.05 s: never worth it
    assert dear.choose(None, rows, kept, {"a": [50] * 7}, mat) == ("a" if materialized else None)
    # a short horizon does not pay for an in-place swap either
    assert cheap.choose(None, rows, kept, {"a": [1] * 7}, mat) == ("a" if materialized else None)
    # rows split evenly: merging saves nothing, the base stays
    assert cheap.choose(None, {"a": 4, "b": 4}, kept, {"a": [50] * 4}, mat) is None


def test_auto_unmerges_a_variant_that_only_costs_and_keeps_it_for_prompt_chunks():
    kept = {"a": 10_000, "b": 10_000}
    policy = _policy(sparse_s=1e-9, swap_s=1e-8)
    # a merged, none of its rows left, 8 rows of b and the base take it out every step
    assert policy.choose("a", {"b": 4, None: 4}, kept, {"b": [50] * 4}) is None
    # prompt chunks only (steady False): the merged variant stays whatever they are
    assert policy.choose("a", {"b": 64}, kept, {"b": [50]}, steady=False) == "a"
    # a merged variant still owning most rows stays merged
    assert policy.choose("a", {"a": 6, "b": 2}, kept, {"a": [50] * 6}) == "a"


def test_auto_never_merges_a_variant_that_saves_nothing():
    kept = {"a": 10_000, "b": 10_000}
    policy = _policy(sparse_s=1e-9, swap_s=1e-8)
    # b owns fewer than half the rows: merging it would cost every other row its delta
    assert policy.choose(None, {"b": 3, None: 5}, kept, {"b": [50] * 3}) is None
    assert policy.choose("a", {"b": 3, None: 5}, kept, {"b": [50] * 3}) is None
