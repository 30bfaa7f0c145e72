"""The soak: closed-loop clients and bursts of greedy completions, each checked against
its reference and counted, under the admin churner, with the RSS sampled."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from tqdm.auto import tqdm

from benchmarks.soak.churn import Churner, Presence, stored_variants
from benchmarks.soak.fixtures import (
    BURST_MAX_TOKENS,
    BURST_PROMPT,
    MAX_TOKENS,
    PROMPTS,
    Variant,
)
from benchmarks.soak.probes import (
    EXAMPLES,
    MiB,
    capture_errors,
    is_error_body,
    is_idle,
    rss_bytes,
    wait_idle,
)

SOAK_RSS_BOUND = 64 * MiB


@dataclass
class SoakReport:
    duration_s: float = 0.0
    concurrency: int = 0
    models: int = 0
    requests: int = 0  # every completion sent (steady traffic and bursts)
    ok: int = 0  # 200s
    streamed: int = 0  # 200s that streamed
    wrong: int = 0  # 200s whose text differs from the reference
    server_errors: int = 0  # 5xx, and error events inside a 200 stream
    rate_limited: int = 0  # 429s (bursts and steady traffic)
    bad_429_bodies: int = 0  # 429s without the OpenAI error shape
    expected_404: int = 0  # churned variants asked for while deleted
    unexpected: dict[str, int] = field(default_factory=dict)  # other statuses
    client_errors: int = 0  # transport errors, timeouts, unparsable answers
    bursts: int = 0
    burst_requests: int = 0
    burst_429: int = 0
    bursts_with_429: int = 0
    per_model: dict[str, int] = field(default_factory=dict)  # 200s per model
    admin_ops: dict[str, int] = field(default_factory=dict)  # succeeded, per kind
    admin_failures: dict[str, int] = field(default_factory=dict)  # "kind status" -> count
    admin_refused: dict[str, int] = field(default_factory=dict)  # expected refusals
    server_log_errors: int = 0  # ERROR records logged in this process (in-process server)
    latency_ms: dict[str, float] = field(default_factory=dict)  # steady 200s: p50, p99, max
    rss_warm_bytes: int = 0  # after the warm-up
    rss_end_bytes: int = 0
    rss_max_bytes: int = 0  # after the warm-up
    rss_growth_bytes: int = 0
    rss_bound_bytes: int = SOAK_RSS_BOUND
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (s, bytes)
    leftovers: dict[str, Any] | None = None  # in-process server only, after the soak
    examples: dict[str, list[Any]] = field(default_factory=dict)  # a few of each failure

    @property
    def rss_flat(self) -> bool:
        return self.rss_growth_bytes < self.rss_bound_bytes

    def problems(self) -> list[str]:
        """What failed, in words (empty: the soak passed)."""
        out = []
        if self.wrong:
            out.append(f"{self.wrong} wrong outputs")
        if self.server_errors:
            out.append(f"{self.server_errors} server errors")
        if self.unexpected:
            out.append(f"unexpected statuses {self.unexpected}")
        if self.client_errors:
            out.append(f"{self.client_errors} client errors")
        if not self.rate_limited:
            out.append("no 429 under bursts")
        if self.bad_429_bodies:
            out.append(f"{self.bad_429_bodies} 429s without the OpenAI error body")
        if self.admin_failures:
            out.append(f"admin failures {self.admin_failures}")
        if not self.rss_flat:
            out.append(
                f"RSS grew {self.rss_growth_bytes / MiB:.1f} MiB "
                f"(bound {self.rss_bound_bytes / MiB:.0f} MiB)"
            )
        if self.leftovers is not None and not is_idle(self.leftovers):
            out.append(f"server not idle after the soak: {self.leftovers}")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rss_flat"] = self.rss_flat
        d["problems"] = self.problems()
        return d

    def summary(self) -> str:
        lines = [
            f"soak: {self.duration_s:.0f} s, {self.concurrency} clients, {self.models} models",
            f"  requests {self.requests}: 200 {self.ok} ({self.streamed} streamed), "
            f"wrong {self.wrong}, 5xx {self.server_errors}, 429 {self.rate_limited}, "
            f"expected 404 {self.expected_404}, unexpected {self.unexpected or 0}, "
            f"client errors {self.client_errors}",
            f"  bursts {self.bursts} ({self.burst_requests} requests): 429 in "
            f"{self.bursts_with_429}, {self.burst_429} in all",
            f"  admin ops {sum(self.admin_ops.values())} {self.admin_ops}, "
            f"failures {self.admin_failures or 0}, expected refusals {self.admin_refused or 0}",
            f"  server errors logged {self.server_log_errors}",
            f"  latency (steady 200s) {self.latency_ms}",
            f"  RSS {self.rss_warm_bytes / MiB:.1f} MiB after warm-up -> "
            f"{self.rss_end_bytes / MiB:.1f} MiB at the end "
            f"(max {self.rss_max_bytes / MiB:.1f}): growth {self.rss_growth_bytes / MiB:+.1f} "
            f"MiB, bound {self.rss_bound_bytes / MiB:.0f} MiB",
        ]
        problems = self.problems()
        lines.append("  PASS" if not problems else "  FAIL: " + "; ".join(problems))
        return "\n".join(lines)


class Tally:
    """Counters shared by the client tasks and the churner thread."""

    def __init__(self, report: SoakReport) -> None:
        self.report = report
        self.lock = threading.Lock()
        self.unexpected: Counter[str] = Counter()
        self.per_model: Counter[str] = Counter()
        self.admin_ops: Counter[str] = Counter()
        self.admin_failures: Counter[str] = Counter()
        self.admin_refused: Counter[str] = Counter()
        self.latencies: list[float] = []

    def example(self, kind: str, item: Any) -> None:
        with self.lock:
            ex = self.report.examples.setdefault(kind, [])
            if len(ex) < EXAMPLES:
                ex.append(item)

    def add(self, attr: str, n: int = 1) -> None:
        with self.lock:
            setattr(self.report, attr, getattr(self.report, attr) + n)


def _parse_stream(lines: list[str]) -> tuple[str, str | None, Any]:
    """Text, finish reason and the error event (if any) of a completion stream."""
    text, finish, error, done = [], None, None, False
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            done = True
            continue
        obj = json.loads(data)
        if "error" in obj:
            error = obj
            continue
        for choice in obj.get("choices", []):
            text.append(choice.get("text") or "")
            finish = choice.get("finish_reason") or finish
    if not done and error is None:
        raise ValueError("stream ended without [DONE]")
    return "".join(text), finish, error


async def _complete(
    client: httpx.AsyncClient,
    v: Variant,
    prompt: str,
    max_tokens: int,
    stream: bool,
    tally: Tally,
    presence: Presence,
    steady: bool,
) -> int | None:
    """One completion, checked and counted; its status (None: a client error)."""
    body = {
        "model": v.name,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    before = presence.snapshot(v.name) if v.churn else None
    tally.add("requests")
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            status = r.status_code
            if status == 200 and stream:
                lines = [line async for line in r.aiter_lines()]
                text, finish, error = _parse_stream(lines)
                payload: Any = None
            else:
                payload = json.loads(await r.aread())
                error, text, finish = None, "", None
                if status == 200:
                    text = payload["choices"][0]["text"]
                    finish = payload["choices"][0]["finish_reason"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        tally.add("client_errors")
        tally.example("client_errors", {**body, "error": f"{type(e).__name__}: {e}"})
        return None
    elapsed = time.perf_counter() - t0
    where = {"model": v.name, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    if status == 200 and error is not None:
        tally.add("server_errors")
        tally.example("server_errors", {**where, "status": 200, "event": error})
    elif status == 200:
        tally.add("ok")
        if stream:
            tally.add("streamed")
        with tally.lock:
            tally.per_model[v.name] += 1
            if steady:
                tally.latencies.append(elapsed)
        want = v.refs[(prompt, max_tokens)]
        if text != want or finish not in ("stop", "length"):
            tally.add("wrong")
            tally.example("wrong", {**where, "got": text, "want": want, "finish": finish})
    elif status == 429:
        tally.add("rate_limited")
        if not is_error_body(payload) or payload["error"].get("type") != "rate_limit_error":
            tally.add("bad_429_bodies")
            tally.example("bad_429_bodies", {**where, "body": payload})
    elif status >= 500:
        tally.add("server_errors")
        tally.example("server_errors", {**where, "status": status, "body": payload})
    elif status == 404 and v.churn and before is not None:
        after = presence.snapshot(v.name)
        code = payload.get("error", {}).get("code") if isinstance(payload, dict) else None
        absent = not before[0] or not after[0] or before[1] != after[1]
        if absent and code == "model_not_found":
            tally.add("expected_404")
        else:
            with tally.lock:
                tally.unexpected["404"] += 1
            tally.example("unexpected", {**where, "status": 404, "body": payload})
    else:
        with tally.lock:
            tally.unexpected[str(status)] += 1
        tally.example("unexpected", {**where, "status": status, "body": payload})
    return status


def run_soak(
    url: str,
    admin_token: str,
    variants: list[Variant],
    duration_s: float,
    concurrency: int = 8,
    *,
    prompts: list[str] | None = None,
    max_tokens: int = MAX_TOKENS,
    stream_fraction: float = 0.5,
    burst_size: int = 32,
    burst_every_s: float = 5.0,
    burst_prompt: str = BURST_PROMPT,
    burst_max_tokens: int = BURST_MAX_TOKENS,
    admin_pause_s: float = 0.2,
    churn: bool = True,
    warmup_s: float | None = None,
    rss_bound_bytes: int = SOAK_RSS_BOUND,
    pid: int | None = None,
    state: Any = None,
    seed: int = 0,
    progress: bool = True,
) -> SoakReport:
    """Soak the server at `url` (127.0.0.1) for `duration_s` seconds; see the package
    docstring. `variants` hold the references of every (prompt, max_tokens) and
    (burst_prompt, burst_max_tokens); the churned ones' presence must match the store.
    RSS is read for `pid` (default: this process, for an in-process server); with
    `state` (an in-process server's `AppState`) the report says what the server still
    holds once the traffic has stopped. `churn=False`, `burst_size=0` or
    `concurrency=0` leave one kind of load out (to tell which one a problem follows)."""
    prompts = prompts or PROMPTS
    warmup = warmup_s if warmup_s is not None else min(30.0, duration_s / 5)
    report = SoakReport(
        concurrency=concurrency, models=len(variants), rss_bound_bytes=rss_bound_bytes
    )
    tally = Tally(report)
    stored, pinned = stored_variants(url, admin_token)  # where an earlier run left things
    presence = Presence(variants, stored)
    stable = [v for v in variants if not v.churn]
    t_start = time.monotonic()
    end = t_start + duration_s
    churner = Churner(url, admin_token, variants, presence, tally, end, admin_pause_s, seed + 1)
    churner.pinned = pinned

    async def client_loop(client: httpx.AsyncClient, i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < end:
            v = rng.choice(variants)
            stream = rng.random() < stream_fraction
            await _complete(
                client, v, rng.choice(prompts), max_tokens, stream, tally, presence, True
            )

    async def bursts(client: httpx.AsyncClient) -> None:
        rng = random.Random(seed + 2)
        while burst_size > 0:
            await asyncio.sleep(burst_every_s)
            if time.monotonic() + 5 > end:
                return
            calls = [
                _complete(
                    client,
                    rng.choice(stable),
                    burst_prompt,
                    burst_max_tokens,
                    rng.random() < stream_fraction,
                    tally,
                    presence,
                    False,
                )
                for _ in range(burst_size)
            ]
            statuses = await asyncio.gather(*calls)
            refused = sum(1 for s in statuses if s == 429)
            tally.add("bursts")
            tally.add("burst_requests", burst_size)
            tally.add("burst_429", refused)
            tally.add("bursts_with_429", int(refused > 0))

    async def monitor() -> None:
        bar = tqdm(
            total=round(duration_s),
            desc="soak",
            unit="s",
            disable=not progress,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s {postfix}",
        )
        shown = 0
        warm = False
        while (now := time.monotonic()) < end:
            rss = rss_bytes(pid)
            t = now - t_start
            if t >= warmup:
                if not warm:
                    report.rss_warm_bytes, warm = rss, True
                report.rss_max_bytes = max(report.rss_max_bytes, rss)
            if not report.rss_samples or t - report.rss_samples[-1][0] >= 5:
                report.rss_samples.append((round(t, 1), rss))
            step = min(int(t), bar.total) - shown
            if step > 0:
                bar.update(step)
                shown += step
            bar.set_postfix_str(
                f"req {report.requests} ok {report.ok} wrong {report.wrong} "
                f"5xx {report.server_errors} 429 {report.rate_limited} "
                f"admin {sum(tally.admin_ops.values())} rss {rss / MiB:.0f}MiB",
                refresh=False,
            )
            await asyncio.sleep(min(1.0, max(end - now, 0.01)))
        bar.update(bar.total - shown)
        bar.close()
        if not warm:  # shorter than the warm-up: compare with the first sample
            report.rss_warm_bytes = report.rss_samples[0][1] if report.rss_samples else 0

    async def main() -> None:
        limits = httpx.Limits(max_connections=concurrency + burst_size + 4)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            await asyncio.gather(
                monitor(), bursts(client), *(client_loop(client, i) for i in range(concurrency))
            )

    with capture_errors() as logged:
        if churn:
            churner.thread.start()
        else:
            churner.client.close()
        try:
            asyncio.run(main())
        finally:
            if churn:
                churner.thread.join()
    report.server_log_errors = len(logged)
    report.examples["server_log"] = logged[:EXAMPLES]
    if churner.error is not None:
        raise RuntimeError(f"the churner failed: {churner.error!r}") from churner.error
    report.duration_s = round(time.monotonic() - t_start, 1)
    report.rss_end_bytes = rss_bytes(pid)
    report.rss_max_bytes = max(report.rss_max_bytes, report.rss_end_bytes)
    report.rss_samples.append((report.duration_s, report.rss_end_bytes))
    report.rss_growth_bytes = report.rss_end_bytes - report.rss_warm_bytes
    report.unexpected = dict(tally.unexpected)
    report.per_model = dict(sorted(tally.per_model.items()))
    report.admin_ops = dict(sorted(tally.admin_ops.items()))
    report.admin_failures = dict(sorted(tally.admin_failures.items()))
    report.admin_refused = dict(sorted(tally.admin_refused.items()))
    lat = sorted(tally.latencies)
    if lat:
        report.latency_ms = {
            "p50": round(lat[len(lat) // 2] * 1e3, 1),
            "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 1),
            "max": round(lat[-1] * 1e3, 1),
        }
    if state is not None:
        report.leftovers, _ = wait_idle(state)
    return report
