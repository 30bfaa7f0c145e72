"""The disconnects: streaming clients that hang up after the first content chunk,
then what the server still holds and how its RSS grew."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from tqdm.auto import tqdm

from benchmarks.soak.fixtures import DISCONNECT_MAX_TOKENS, DISCONNECT_PROMPT
from benchmarks.soak.probes import EXAMPLES, MiB, counter_total, is_idle, rss_bytes, wait_idle

DISCONNECT_RSS_BOUND = 32 * MiB


@dataclass
class DisconnectReport:
    clients: int = 0
    concurrency: int = 0
    mid_stream: int = 0  # closed after a content chunk, before the stream's end
    finished_first: int = 0  # the stream ended before a content chunk came
    refused: dict[str, int] = field(default_factory=dict)  # non-200 statuses
    client_errors: int = 0
    seconds: float = 0.0
    steps: float | None = None  # engine steps the server ran (in-process only)
    settle_s: float | None = None  # until the server held nothing
    leftovers: dict[str, Any] | None = None
    rss_after_first_bytes: int = 0  # after the first `rss_after` clients
    rss_end_bytes: int = 0
    rss_growth_bytes: int = 0
    rss_bound_bytes: int = DISCONNECT_RSS_BOUND
    examples: list[str] = field(default_factory=list)

    @property
    def rss_flat(self) -> bool:
        return self.rss_growth_bytes < self.rss_bound_bytes

    def problems(self) -> list[str]:
        out = []
        if self.refused:
            out.append(f"refused {self.refused}")
        if self.mid_stream + self.finished_first != self.clients:
            out.append(f"only {self.mid_stream + self.finished_first} of {self.clients} streamed")
        if self.client_errors:
            out.append(f"{self.client_errors} client errors")
        if self.leftovers is not None and not is_idle(self.leftovers):
            out.append(f"left behind: {self.leftovers}")
        if not self.rss_flat:
            out.append(
                f"RSS grew {self.rss_growth_bytes / MiB:.1f} MiB "
                f"(bound {self.rss_bound_bytes / MiB:.0f} MiB)"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rss_flat"] = self.rss_flat
        d["problems"] = self.problems()
        return d

    def summary(self) -> str:
        problems = self.problems()
        return "\n".join(
            [
                f"disconnects: {self.clients} clients ({self.concurrency} at a time) in "
                f"{self.seconds:.1f} s: {self.mid_stream} closed mid-stream, "
                f"{self.finished_first} ended first, refused {self.refused or 0}, "
                f"client errors {self.client_errors}, server steps {self.steps}",
                f"  settled in {self.settle_s} s, left behind: {self.leftovers}",
                f"  RSS {self.rss_after_first_bytes / MiB:.1f} MiB after the first clients -> "
                f"{self.rss_end_bytes / MiB:.1f} MiB: growth "
                f"{self.rss_growth_bytes / MiB:+.1f} MiB, bound "
                f"{self.rss_bound_bytes / MiB:.0f} MiB",
                "  PASS" if not problems else "  FAIL: " + "; ".join(problems),
            ]
        )


def run_disconnects(
    url: str,
    models: list[str],
    n: int = 1000,
    concurrency: int = 16,
    *,
    prompt: str = DISCONNECT_PROMPT,
    max_tokens: int = DISCONNECT_MAX_TOKENS,
    rss_after: int = 100,
    rss_bound_bytes: int = DISCONNECT_RSS_BOUND,
    pid: int | None = None,
    state: Any = None,
    settle_timeout_s: float = 10.0,
    progress: bool = True,
) -> DisconnectReport:
    """`n` streaming completions (round-robin over `models`, `concurrency` at a time)
    that each read the first content chunk and close the connection. With `state` (an
    in-process server's `AppState`) it then waits up to `settle_timeout_s` for the
    server to hold nothing and reports what is left. A 429 (more at once than the
    queue holds) is counted in `refused`; RSS growth is from after the first
    `rss_after` clients to the end."""
    report = DisconnectReport(clients=n, concurrency=concurrency, rss_bound_bytes=rss_bound_bytes)
    refused: Counter[str] = Counter()
    steps0 = counter_total(state.metrics.steps) if state is not None else None
    bar = tqdm(total=n, desc="disconnects", disable=not progress)
    done = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": models[i % len(models)],
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        try:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    refused[str(r.status_code)] += 1
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        report.finished_first += 1
                        return
                    choice = json.loads(data)["choices"][0]
                    if choice.get("finish_reason"):
                        report.finished_first += 1
                        return
                    if choice.get("text"):
                        report.mid_stream += 1
                        return  # leaving the block closes the unread response's connection
                report.finished_first += 1
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            report.client_errors += 1
            if len(report.examples) < EXAMPLES:
                report.examples.append(f"{type(e).__name__}: {e}")

    async def worker(client: httpx.AsyncClient, queue: asyncio.Queue[int]) -> None:
        nonlocal done
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await one(client, i)
            done += 1
            bar.update(1)
            if done == min(rss_after, n):
                report.rss_after_first_bytes = rss_bytes(pid)

    async def main() -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            await asyncio.gather(*(worker(client, queue) for _ in range(concurrency)))

    t0 = time.monotonic()
    asyncio.run(main())
    report.seconds = round(time.monotonic() - t0, 2)
    bar.close()
    report.refused = dict(refused)
    if state is not None:
        report.leftovers, settle = wait_idle(state, settle_timeout_s)
        report.settle_s = round(settle, 2)
        assert steps0 is not None
        report.steps = counter_total(state.metrics.steps) - steps0
    report.rss_end_bytes = rss_bytes(pid)
    report.rss_growth_bytes = report.rss_end_bytes - report.rss_after_first_bytes
    return report
