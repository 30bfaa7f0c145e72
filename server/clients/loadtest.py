"""`deltaserve loadtest`: drive a deltaserve (or any OpenAI-compatible) server.

Closed loop (--concurrency C: C clients back to back) or open loop (--rate R:
Poisson arrivals at R requests/s), over a mix of models (uniform, Zipf, or a
weighted list), bounded by --requests and/or --duration: it always stops by itself.
Reports throughput, latency percentiles (time to first token, end to end),
per-model counts, and the server's own swap / cache counters read from /metrics
before and after.

It cannot measure nothing: by default every request asks for `ignore_eos` (vLLM's
extension, which deltaserve supports), so each generates the tokens it asks for; a
run that generated no tokens at all says so loudly and exits 1. Time to first token
is the time to the first chunk carrying text (not the role-only chunk), so it is
measured with --stream only; without it the report says TTFT was not measured.
--prompts FILE.jsonl mixes prompts (one {"prompt": "..."} per line, optionally
with its own "max_tokens").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from deltastore.clihelp import RawHelpFormatter
from deltastore.progress import show_progress

DEFAULT_DURATION_S = 60.0
MAX_IN_FLIGHT = 1024  # open loop: cap on outstanding requests


@dataclass(frozen=True)
class Mix:
    """Models and their request probabilities."""

    models: tuple[str, ...]
    weights: tuple[float, ...]

    def sample(self, rng: random.Random) -> str:
        return rng.choices(self.models, self.weights)[0]


def parse_mix(spec: str, available: list[str]) -> Mix:
    """uniform | zipf[:S] | weights:name=w,name=w (zipf ranks models in listed order)."""
    if not available:
        raise ValueError("no models to send requests to")
    if spec == "uniform":
        return Mix(tuple(available), tuple(1.0 for _ in available))
    if spec.startswith("zipf"):
        exponent = float(spec.split(":", 1)[1]) if ":" in spec else 1.0
        if exponent < 0:
            raise ValueError(f"zipf exponent must be >= 0, got {exponent}")
        return Mix(
            tuple(available), tuple(1.0 / (r + 1) ** exponent for r in range(len(available)))
        )
    if spec.startswith("weights:"):
        pairs = [p.split("=", 1) for p in spec[len("weights:") :].split(",") if p]
        try:
            weights = {name: float(w) for name, w in pairs}
        except ValueError:
            raise ValueError(f"bad weighted list {spec!r}: use weights:name=w,name=w") from None
        unknown = sorted(set(weights) - set(available))
        if unknown or not weights or any(w < 0 for w in weights.values()):
            raise ValueError(f"bad weighted list {spec!r} (unknown {unknown}; have {available})")
        return Mix(tuple(weights), tuple(weights.values()))
    raise ValueError(f"unknown distribution {spec!r}: uniform, zipf[:S] or weights:name=w,…")


@dataclass
class Result:
    model: str
    start: float  # seconds since the run began
    status: int  # HTTP status; 0 for a transport error
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Report:
    url: str
    mode: str
    duration_s: float
    sent: int
    succeeded: int
    failed_by_status: dict[str, int]
    requests_per_s: float
    tokens_per_s: float
    ttft_ms: dict[str, float]
    e2e_ms: dict[str, float]
    per_model: dict[str, int]
    server: dict[str, float]
    results: list[dict[str, Any]] = field(default_factory=list)
    generated_tokens: int = 0
    ttft_measured: bool = True


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {
        "p50": 1e3 * qs[49],
        "p90": 1e3 * qs[89],
        "p99": 1e3 * qs[98],
        "mean": 1e3 * statistics.fmean(values),
    }


_METRIC = re.compile(r"^(deltaserve_[a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$")
SERVER_COUNTERS = {
    "swaps": "deltaserve_swap_seconds_count",
    "cache_hits": "deltaserve_cache_hits_total",
    "cache_misses": "deltaserve_cache_misses_total",
    "cache_evictions": "deltaserve_cache_evictions_total",
    "generated_tokens": "deltaserve_generated_tokens_total",
    "steps": "deltaserve_steps_total",  # engine v2: forward passes, merged or not
    "step_seconds": "deltaserve_step_seconds_sum",  # their time: forward and sampling
    "step_rows": "deltaserve_step_rows_sum",  # tokens they computed (prefill included)
    "layout_loads": "deltaserve_layout_loads_total",  # variants laid out (loader or step)
    "layout_wait_seconds": "deltaserve_layout_wait_seconds_sum",  # requests' waits for them
}


def scrape(text: str) -> dict[str, float]:
    """Sum of each counter of interest over its labels."""
    totals = dict.fromkeys(SERVER_COUNTERS, 0.0)
    by_metric = {v: k for k, v in SERVER_COUNTERS.items()}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m and m.group(1) in by_metric:
            totals[by_metric[m.group(1)]] += float(m.group(3))
    return totals


async def _metrics(client: httpx.AsyncClient) -> dict[str, float] | None:
    try:
        r = await client.get("/metrics")
        return scrape(r.text) if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


@dataclass(frozen=True)
class Workload:
    mix: Mix
    prompt: str
    max_tokens: int
    stream: bool
    chat: bool
    temperature: float
    seed: int
    ignore_eos: bool = False  # ask for max_tokens whatever the model says
    prompts: tuple[tuple[str, int | None], ...] = ()  # (prompt, its max_tokens): mixed

    def pick_prompt(self, rng: random.Random) -> tuple[str, int]:
        if not self.prompts:
            return self.prompt, self.max_tokens
        prompt, max_tokens = rng.choice(self.prompts)
        return prompt, max_tokens or self.max_tokens


def load_prompts(path: Path) -> tuple[tuple[str, int | None], ...]:
    """A JSONL file of {"prompt": str, "max_tokens": int (optional)} per line."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, max_tokens = row["prompt"], row.get("max_tokens")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f'{path}:{i}: expected {{"prompt": "...", "max_tokens": N}}') from None
        if (
            not isinstance(prompt, str)
            or not prompt
            or not (max_tokens is None or (isinstance(max_tokens, int) and max_tokens >= 1))
        ):
            raise ValueError(f"{path}:{i}: a non-empty prompt and a max_tokens >= 1")
        out.append((prompt, max_tokens))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return tuple(out)


def _content(chunk: dict[str, Any]) -> bool:
    """Whether a streamed chunk carries generated text (not only the role)."""
    for choice in chunk.get("choices") or []:
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


async def _one(
    client: httpx.AsyncClient, w: Workload, model: str, t0: float, rng: random.Random
) -> Result:
    path = "/v1/chat/completions" if w.chat else "/v1/completions"
    prompt, max_tokens = w.pick_prompt(rng)
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": w.temperature,
        "stream": w.stream,
    }
    if w.ignore_eos:
        body["ignore_eos"] = True
    if w.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if w.stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    res = Result(model, start - t0, 0)
    try:
        if not w.stream:
            r = await client.post(path, json=body)
            res.status = r.status_code
            res.e2e = time.perf_counter() - start  # no TTFT without a stream
            if r.status_code == 200:
                res.tokens = int(r.json()["usage"]["completion_tokens"])
            else:
                res.error = r.text[:200]
            return res
        async with client.stream("POST", path, json=body) as r:
            res.status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if res.ttft is None and _content(chunk):
                    res.ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    res.tokens = int(chunk["usage"]["completion_tokens"])
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:200]
        res.e2e = time.perf_counter() - start
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run(
    url: str,
    w: Workload,
    concurrency: int | None,
    rate: float | None,
    requests: int | None,
    duration: float | None,
    progress: bool = True,
) -> Report:
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of --concurrency (closed loop) or --rate (open loop)")
    if requests is None and duration is None:
        duration = DEFAULT_DURATION_S
    limits = httpx.Limits(max_connections=concurrency or MAX_IN_FLIGHT)
    timeout = httpx.Timeout(600.0, connect=10.0)
    rng = random.Random(w.seed)
    results: list[Result] = []
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        before = await _metrics(client)
        t0 = time.perf_counter()
        deadline = t0 + duration if duration is not None else math.inf
        bar = tqdm(total=requests, desc="loadtest", unit="req", disable=not progress)
        sent = 0

        def may_send() -> bool:
            return (requests is None or sent < requests) and time.perf_counter() < deadline

        def record(res: Result) -> None:
            results.append(res)
            ok = sum(r.status == 200 and r.error is None for r in results)
            elapsed = time.perf_counter() - t0
            bar.update()
            bar.set_postfix(ok=ok, failed=len(results) - ok, rps=f"{len(results) / elapsed:.1f}")

        if concurrency is not None:

            async def client_loop() -> None:
                nonlocal sent
                while may_send():
                    sent += 1
                    record(await _one(client, w, w.mix.sample(rng), t0, rng))

            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        else:
            assert rate is not None
            tasks: set[asyncio.Task[None]] = set()
            next_at = t0

            async def fire(model: str) -> None:
                record(await _one(client, w, model, t0, rng))

            while may_send():
                next_at += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                if not may_send():
                    break
                while len(tasks) >= MAX_IN_FLIGHT:
                    await asyncio.sleep(0.01)
                sent += 1
                task = asyncio.create_task(fire(w.mix.sample(rng)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        bar.close()
        after = await _metrics(client)
    rep = _report(url, concurrency, rate, elapsed, results, before, after)
    rep.ttft_measured = w.stream
    return rep


def _report(
    url: str,
    concurrency: int | None,
    rate: float | None,
    elapsed: float,
    results: list[Result],
    before: dict[str, float] | None,
    after: dict[str, float] | None,
) -> Report:
    ok = [r for r in results if r.status == 200 and r.error is None]
    failed: dict[str, int] = {}
    for r in results:
        if not (r.status == 200 and r.error is None):
            failed[str(r.status)] = failed.get(str(r.status), 0) + 1
    per_model: dict[str, int] = {}
    for r in results:
        per_model[r.model] = per_model.get(r.model, 0) + 1
    server = {k: after[k] - before[k] for k in after} if before and after else {}
    mode = f"closed loop, concurrency {concurrency}" if concurrency else f"open loop, {rate} req/s"
    return Report(
        url=url,
        mode=mode,
        duration_s=elapsed,
        sent=len(results),
        succeeded=len(ok),
        failed_by_status=failed,
        requests_per_s=len(ok) / elapsed if elapsed else 0.0,
        tokens_per_s=sum(r.tokens for r in ok) / elapsed if elapsed else 0.0,
        ttft_ms=percentiles([r.ttft for r in ok if r.ttft is not None]),
        e2e_ms=percentiles([r.e2e for r in ok if r.e2e is not None]),
        per_model=dict(sorted(per_model.items())),
        server=server,
        results=[asdict(r) for r in results],
        generated_tokens=sum(r.tokens for r in ok),
    )


def summary(rep: Report) -> str:
    lines = [
        f"{rep.url}: {rep.mode}, {rep.duration_s:.1f} s",
        f"  requests   sent {rep.sent}, succeeded {rep.succeeded}, "
        f"failed {rep.failed_by_status or 0}",
        f"  throughput {rep.requests_per_s:.2f} req/s, {rep.tokens_per_s:.1f} generated tokens/s",
    ]
    for name, p in (("ttft", rep.ttft_ms), ("e2e", rep.e2e_ms)):
        if p:
            lines.append(
                f"  {name:<10} p50 {p['p50']:.0f} ms, p90 {p['p90']:.0f} ms, p99 {p['p99']:.0f} ms"
            )
        elif name == "ttft" and not rep.ttft_measured:
            lines.append("  ttft       not measured (it needs --stream)")
    lines.append("  per model  " + ", ".join(f"{m}: {n}" for m, n in rep.per_model.items()))
    if rep.server:
        lines.append("  server     " + ", ".join(f"{k} +{v:g}" for k, v in rep.server.items()))
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib's pyplot (headless), or a clear error: --plot checks it before the
    run starts, so a missing package never costs a whole run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(
            "--plot needs matplotlib: pip install matplotlib (or 'deltaserve[plot]')"
        ) from e
    return plt


def plot(rep: Report, path: Path) -> None:
    plt = pyplot()
    ok = [r for r in rep.results if r["status"] == 200 and r["error"] is None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = (
        ("e2e", "end to end", "-", "tab:blue"),
        ("ttft", "time to first token", "--", "tab:orange"),
    )
    for key, label, style, color in styles:
        vals = sorted(1e3 * r[key] for r in ok if r[key] is not None)
        if vals:
            ys = [(i + 1) / len(vals) for i in range(len(vals))]
            ax1.plot(vals, ys, style, color=color, label=label, linewidth=2)
    ax1.set(xlabel="latency (ms)", ylabel="fraction of requests", title="latency distribution")
    ax1.legend()
    seconds = max(1, math.ceil(rep.duration_s))
    reqs, toks = [0] * seconds, [0] * seconds
    for r in ok:
        done = min(seconds - 1, int(r["start"] + (r["e2e"] or 0)))
        reqs[done] += 1
        toks[done] += r["tokens"]
    ax2.plot(range(seconds), reqs, color="tab:blue", label="requests/s")
    ax2.set(xlabel="time (s)", ylabel="requests/s", title="throughput over time")
    ax2.tick_params(axis="y", labelcolor="tab:blue")
    ax3 = ax2.twinx()  # tokens/s on its own axis: often 10-100x the requests/s
    ax3.plot(range(seconds), toks, "--", color="tab:orange", label="generated tokens/s")
    ax3.set_ylabel("generated tokens/s")
    ax3.tick_params(axis="y", labelcolor="tab:orange")
    lines = ax2.get_lines() + ax3.get_lines()
    ax2.legend(lines, [ln.get_label() for ln in lines], loc="upper left")
    fig.suptitle(f"deltaserve loadtest: {rep.mode}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_command(sub: Any) -> None:
    p = sub.add_parser(
        "loadtest",
        help="drive a server with completion requests and report latency and throughput",
        description=__doc__,
        formatter_class=RawHelpFormatter,
    )
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--models",
        default="all",
        help="'all' (every model /v1/models lists) or a comma-separated list",
    )
    p.add_argument(
        "--distribution",
        default="uniform",
        help="uniform | zipf[:S] (rank = list order) | weights:name=w,name=w",
    )
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, help="closed loop: this many clients (default 4)")
    loop.add_argument("--rate", type=float, help="open loop: Poisson arrivals, requests/s")
    p.add_argument("--requests", type=int, help="stop after this many requests")
    p.add_argument(
        "--duration",
        type=float,
        help=f"stop after this many seconds (default {DEFAULT_DURATION_S:g} if no --requests)",
    )
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request")
    p.add_argument("--prompt", default="Write one sentence about the sea.", help="prompt text")
    p.add_argument(
        "--prompts",
        type=Path,
        help='JSONL of {"prompt": "...", "max_tokens": N} per line: a mix of prompts',
    )
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask every request for max_tokens tokens (vLLM's ignore_eos; default on; "
        "--no-ignore-eos for servers without it)",
    )
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--stream", action="store_true", help="stream (measures time to first token)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the model mix and arrivals")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--plot", type=Path, help="write a PNG (latency CDF, throughput over time)")
    p.set_defaults(func=cmd_loadtest)


def cmd_loadtest(args: argparse.Namespace) -> int:
    for name in ("requests", "concurrency", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if (args.rate is not None and args.rate <= 0) or (
        args.duration is not None and args.duration <= 0
    ):
        raise ValueError("--rate and --duration must be > 0")
    if args.plot:  # before the run: a missing package or directory costs nothing
        pyplot()
        if not args.plot.parent.is_dir():
            raise FileNotFoundError(f"--plot {args.plot}: no directory {args.plot.parent}")
    if args.models == "all":
        try:
            listed = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            raise RuntimeError(f"cannot list models at {args.url}/v1/models: {e}") from e
        models = [m["id"] for m in listed]
    else:
        models = [m for m in args.models.split(",") if m]
    w = Workload(
        parse_mix(args.distribution, models),
        args.prompt,
        args.max_tokens,
        args.stream,
        args.chat,
        args.temperature,
        args.seed,
        ignore_eos=args.ignore_eos,
        prompts=load_prompts(args.prompts) if args.prompts else (),
    )
    concurrency = args.concurrency if args.rate is None else None
    if concurrency is None and args.rate is None:
        concurrency = 4
    rep = asyncio.run(
        run(
            args.url,
            w,
            concurrency,
            args.rate,
            args.requests,
            args.duration,
            progress=show_progress(),
        )
    )
    print(summary(rep))
    if args.out:
        args.out.write_text(json.dumps(asdict(rep), indent=2))
    if args.plot:
        plot(rep, args.plot)
    if rep.succeeded and rep.generated_tokens == 0:
        print(
            "WARNING: the requests succeeded but generated 0 tokens: this run measured "
            "nothing (the model ended at once). Use --ignore-eos (the default) on a server "
            "that supports it, or a prompt that makes the model write.",
            file=sys.stderr,
        )
        return 1
    return 0 if rep.succeeded else 1
