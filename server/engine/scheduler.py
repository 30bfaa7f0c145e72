"""Which sequences run in engine v2's next step, and with which variant merged: the
policy, with no torch and no engine in it (llm_engine.py carries it out).

- Decode first: every running sequence past its prompt gets one row.
- Then prompt chunks (chunked prefill), in admission order, within what is left of
  `max_step_tokens` (at least 16 tokens, so prompts progress beside a full decode).
- The merged variant: the cost model of policy.py decides from the decode rows (the
  composition that lasts for the steps ahead); a step of prompt chunks only runs once,
  so it alone never pays for a swap.

Admission is FIFO across all variants (llm_engine.py), so no variant holds the model
and none starves.
"""

from __future__ import annotations

from collections.abc import Container

from server.engine.policy import MergePolicy
from server.engine.sequence import Sequence

MIN_PREFILL = 16  # prompt tokens a step always takes beside its decode rows


def plan_prefill(
    running: list[Sequence], n_decode: int, max_step_tokens: int
) -> list[tuple[Sequence, int]]:
    """(sequence, tokens) of the prompts that advance this step, in order."""
    budget = max(max_step_tokens - n_decode, MIN_PREFILL)
    chunks = []
    for seq in running:
        if seq.prefilling and budget > 0:
            n = min(len(seq.prompt) - seq.prefilled, budget)
            chunks.append((seq, n))
            budget -= n
    return chunks


def demand(
    decode: list[Sequence], chunks: list[tuple[Sequence, int]]
) -> tuple[dict[str | None, int], dict[str | None, list[int]], bool]:
    """Rows per variant, the tokens its sequences still have to generate, and whether
    the rows are decode rows (a lasting composition) rather than prompt chunks."""
    rows: dict[str | None, int] = {}
    remaining: dict[str | None, list[int]] = {}
    for s in decode:
        rows[s.variant] = rows.get(s.variant, 0) + 1
        remaining.setdefault(s.variant, []).append(s.remaining)
    if decode:
        return rows, remaining, True
    for s, n in chunks:
        rows[s.variant] = rows.get(s.variant, 0) + n
        remaining.setdefault(s.variant, []).append(s.remaining)
    return rows, remaining, False


class Scheduler:
    def __init__(self, max_step_tokens: int, policy: MergePolicy) -> None:
        self.max_step_tokens, self.policy = max_step_tokens, policy

    def plan(self, running: list[Sequence]) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """The step's decode rows and prompt chunks."""
        decode = [s for s in running if not s.prefilling]
        return decode, plan_prefill(running, len(decode), self.max_step_tokens)

    def merged(
        self,
        current: str | None,
        decode: list[Sequence],
        chunks: list[tuple[Sequence, int]],
        kept: dict[str, int],
        materialized: Container[str],
    ) -> str | None:
        """The variant to have merged for this step (None: the base alone). `kept`:
        kept entries of every variant in the step and of `current`."""
        rows, remaining, steady = demand(decode, chunks)
        return self.policy.choose(current, rows, kept, remaining, materialized, steady)
