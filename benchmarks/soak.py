"""Soak test: greedy completions of many variants under admin churn and overload, every
answer checked against transformers, process memory watched; and 1,000 clients that
hang up mid-stream, after which nothing may be left behind in the server.

    python benchmarks/soak.py                          # 600 s soak on a tiny model
    python benchmarks/soak.py --duration 60 --disconnects 1000
    python benchmarks/soak.py --duration 0 --disconnects 1000   # the disconnects alone

The CLI builds everything itself (nothing is downloaded): a tiny Llama base (the test
suite's model, `deltastore/testing.py`), --variants stable fine-tunes and --churn-variants
churned ones (large perturbations compressed with DAREx-q, p = 0.5, as the test
suite's `variant_files`), and the reference text of every (variant, prompt, length)
from the fine-tune materialized and run in plain transformers (never the server). It
serves them with engine v2 from a `ThreadedServer` in this process on 127.0.0.1 (fp32
on the CPU, a small --queue-limit so that bursts overflow it), runs the soak for
--duration seconds and writes a JSON report (--out).

The soak (`run_soak`), until its time is up:
- --concurrency closed-loop clients send greedy completions (half of them streaming)
  of a few prompts to the base and every variant; each 200 must equal that variant's
  reference exactly;
- an admin thread churns: preload, evict, pin, unpin, replace with the same bytes (the
  stable variants and the churned ones), delete-then-reupload of the same bytes and
  upload/delete of extra variants (the churned ones only). Clients query the churned
  variants too: a 404 (`model_not_found`) is expected for one only while the churner
  has it deleted, tracked per request; a stable variant must always answer 200;
- every --burst-every seconds, --burst-size requests at once (longer generations) more
  than the queue and the running slots hold: some must be refused with 429 and the
  OpenAI error body {"error": {"message", "type", "code"}};
- the process RSS (VmRSS) is sampled: its growth from the end of --warmup to the end
  must stay under --rss-bound-mib.

The disconnects (`run_disconnects`): N streaming completions (16 at a time) that read
the first content chunk and close the connection. Afterwards the server must go idle:
no queued or running request, no KV slot used, nothing in flight for any variant, no
delta layout held but the merged variant's; and the RSS growth from after the first
100 to the end stays under a bound.

Memory bounds, from measurements (tiny model, 2 CPU cores, the RSS of the whole
process: server, clients and torch). Soak: after the warm-up, +1.5 MiB in a 150 s
soak (11,200 requests, 1,100 admin operations) and +5.1 MiB in a 600 s one (37,700
requests, 4,200 admin operations; benchmarks/results/soak.json). Before the store
read delta files through numpy, safetensors' framework="pt" reader kept ~2.2 KiB
per read of these deltas and a 300 s soak grew +8.5 MiB (about 2 MiB a minute).
Disconnects: +1.2 to +3.2 MiB from after the first 100 to 1,000; 8,000 in a row grew
7.4 MiB over the first 1,000 and then under 0.3 MiB per 1,000. The bounds, 64 MiB
for the soak and 32 MiB for the disconnects, hold that with room, while a leak of
5 KiB per request (60 MiB over the 150 s soak's 12,000) or of 36 KiB per dropped
stream would cross them; leaked slots and in-flight requests are checked directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from server.config import Settings

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["the cat sat", "on a mat and", "then the cat ran on"]
MAX_TOKENS = 10
BURST_PROMPT = "the cat sat"
BURST_MAX_TOKENS = 32
DISCONNECT_PROMPT = "the cat sat on a mat"
DISCONNECT_MAX_TOKENS = 200
SOAK_RSS_BOUND = 64 * MiB
DISCONNECT_RSS_BOUND = 32 * MiB
ADMIN_TOKEN = "soak-admin-token"
EXAMPLES = 10  # kept per kind of failure in a report
# admin answers that are by design under load, not failures: (op, status, error code)
EXPECTED_ADMIN_REFUSALS = {("evict", 409, "in_use")}


# --------------------------------------------------------------------------- helpers


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of `pid` (this process by default) from /proc."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


def is_error_body(obj: Any) -> bool:
    """The OpenAI error shape: {"error": {"message": str, "type": str, "code": ...}}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), dict):
        return False
    err = obj["error"]
    return (
        isinstance(err.get("message"), str) and isinstance(err.get("type"), str) and "code" in err
    )


def server_leftovers(state: Any) -> dict[str, Any]:
    """What an in-process server (`ThreadedServer.state`) still holds for requests:
    queued and running ones, KV slots, in-flight counts per variant, and delta layouts
    or materialized copies in use beyond the merged/active variant's own hold."""
    sched, engine = state.scheduler, state.engine
    names = [None, *state.store.names()]
    out: dict[str, Any] = {
        "in_flight": {str(n): c for n in names if (c := sched.in_flight(n))},
        "retiring": sorted(state.retiring),
    }
    # private state, read strictly: a renamed attribute fails here, never passes
    if hasattr(sched, "kv"):  # engine v2
        out["waiting"] = len(sched._waiting)
        out["kv_used"] = sched.kv.used
    else:  # engine v1: one queue per variant, no KV slots
        out["waiting"] = sum(len(q) for q in sched._queues.values())
        out["kv_used"] = 0
    out["running"] = len(sched._running)
    held = getattr(sched, "_held", None)
    out["layouts_in_use"] = [e.name for e in engine.layouts.list() if e.in_use and e.name != held]
    out["materialized_in_use"] = [
        e.name for e in engine.materialized.list() if e.in_use and e.name != engine.active
    ]
    return out


def is_idle(left: dict[str, Any]) -> bool:
    return not (
        left["in_flight"]
        or left["retiring"]
        or left["waiting"]
        or left["running"]
        or left["kv_used"]
        or left["layouts_in_use"]
        or left["materialized_in_use"]
    )


def wait_idle(state: Any, timeout: float = 10.0) -> tuple[dict[str, Any], float]:
    """Poll until the server holds nothing for requests (or `timeout`): the last
    leftovers and the seconds it took."""
    t0 = time.monotonic()
    while True:
        left = server_leftovers(state)
        if is_idle(left) or time.monotonic() - t0 > timeout:
            return left, time.monotonic() - t0
        time.sleep(0.05)


def _is_json(r: httpx.Response) -> bool:
    try:
        return isinstance(r.json(), dict)
    except ValueError:
        return False


class _ErrorRecords(logging.Handler):
    """Keeps ERROR records (with their tracebacks) logged while it is installed."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@contextmanager
def capture_errors() -> Iterator[list[str]]:
    """ERROR records logged in this process meanwhile (an in-process server's)."""
    handler = _ErrorRecords()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]  # uvicorn's don't propagate
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def counter_total(metric: Any) -> float:
    """The sum of a prometheus counter over its labels."""
    return sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith("_total"))


# --------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """A model clients query: its name, its delta file (None: the base), and the
    reference text of each (prompt, max_tokens) from transformers."""

    name: str
    file: Path | None
    refs: dict[tuple[str, int], str]
    churn: bool = False  # deleted and re-uploaded by the churner (404 while deleted)
    initially_present: bool = True


def soak_settings(base: Path, store: Path, **kw: Any) -> Settings:
    """A server for the soak: fp32 on the CPU (outputs are compared with fp32
    transformers), engine v2, 4 running slots and a queue of 8 (bursts overflow)."""
    values: dict[str, Any] = dict(
        base=base,
        store=store,
        device="cpu",
        dtype="float32",
        admin_token=ADMIN_TOKEN,
        host="127.0.0.1",
        port=0,
        engine="v2",
        materialized_cache_bytes=150_000,  # one materialized variant of the tiny model
        max_batch_size=4,
        queue_limit=8,
        time_slice_s=0.05,
        max_new_tokens=DISCONNECT_MAX_TOKENS,
        demo=False,
    )
    values.update(kw)
    return Settings(**values)


def build_variants(
    base_dir: Path,
    work: Path,
    n_stable: int = 8,
    n_cycle: int = 2,
    n_extra: int = 2,
    jobs: list[tuple[str, int]] | None = None,
    progress: bool = True,
) -> list[Variant]:
    """The base, `n_stable` variants v0.. and the churned ones c0.. (delete and
    re-upload) and x0.. (extra uploads, absent at first): fine-tunes of the base
    perturbed as the test suite's (std 0.6·std(W)), compressed with DAREx-q (p = 0.5),
    their files under `work`, their references from the materialized fine-tune in
    plain transformers (`deltastore.testing.reference_text`)."""
    from deltastore.compress import CompressOptions, compress
    from deltastore.format import load_delta, save_delta
    from deltastore.materialize import materialize
    from deltastore.methods import Method
    from deltastore.sources import SafetensorsModel, open_finetune, open_model
    from deltastore.testing import perturbed, reference_text, save

    jobs = jobs or [*((p, MAX_TOKENS) for p in PROMPTS), (BURST_PROMPT, BURST_MAX_TOKENS)]
    base = open_model(base_dir)
    assert isinstance(base, SafetensorsModel)
    names = [f"v{i}" for i in range(n_stable)]
    names += [f"c{i}" for i in range(n_cycle)] + [f"x{i}" for i in range(n_extra)]
    out = [Variant(base_dir.name, None, {j: reference_text(base_dir, *j) for j in jobs})]
    work.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(tqdm(names, desc="variants and references", disable=not progress)):
        ft_dir = save(perturbed(base.load_model(), 0.6, seed=500 + i), work / f"ft-{name}")
        opts = CompressOptions(method=Method.DAREX_Q, rate=0.5, q=0.7, seed=i, progress=False)
        path = work / f"{name}.delta.safetensors"
        save_delta(path, compress(base, open_finetune(base, ft_dir), opts))
        mat = materialize(base, load_delta(path), work / f"mat-{name}", progress=False)
        refs = {j: reference_text(mat, *j) for j in jobs}
        shutil.rmtree(ft_dir)
        shutil.rmtree(mat)
        churn = name[0] in "cx"
        out.append(Variant(name, path, refs, churn=churn, initially_present=name[0] != "x"))
    return out


def fill_store(store: Path, variants: list[Variant]) -> None:
    """Copy the variants present at the start into the server's store directory."""
    store.mkdir(parents=True, exist_ok=True)
    for v in variants:
        if v.file is not None and v.initially_present:
            shutil.copy(v.file, store / f"{v.name}.delta.safetensors")


# --------------------------------------------------------------------------- the soak


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


class _Presence:
    """The churner's view of which churned variants exist. Each change of a name bumps
    its epoch: before a DELETE is sent (the name may be gone from then on) and after
    an upload is answered 201 (it exists from then on). A request's 404 is expected
    when the name was absent, or changed, at some point between its start and its end."""

    def __init__(self, variants: list[Variant], stored: set[str] | None = None) -> None:
        self._lock = threading.Lock()
        self.present = {
            v.name: v.initially_present if stored is None else v.name in stored
            for v in variants
            if v.churn
        }
        self.epoch = dict.fromkeys(self.present, 0)

    def snapshot(self, name: str) -> tuple[bool, int]:
        with self._lock:
            return self.present[name], self.epoch[name]

    def set(self, name: str, present: bool) -> None:
        with self._lock:
            self.present[name] = present
            self.epoch[name] += 1

    def names(self, present: bool) -> list[str]:
        with self._lock:
            return [n for n, p in self.present.items() if p == present]


class _Tally:
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
    tally: _Tally,
    presence: _Presence,
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


class _Churner:
    """Admin churn until `end` on a thread of its own: one operation at a time, a short
    random pause between."""

    def __init__(
        self,
        url: str,
        token: str,
        variants: list[Variant],
        presence: _Presence,
        tally: _Tally,
        end: float,
        pause_s: float,
        seed: int,
    ) -> None:
        self.thread = threading.Thread(target=self.run, name="soak-churner", daemon=True)
        self.client = httpx.Client(
            base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"}
        )
        self.stable = [v.name for v in variants if v.file is not None and not v.churn]
        self.cycled = [v.name for v in variants if v.churn and v.initially_present]
        self.extra = [v.name for v in variants if v.churn and not v.initially_present]
        self.data = {v.name: v.file.read_bytes() for v in variants if v.file is not None}
        self.presence, self.tally, self.end = presence, tally, end
        self.pause_s, self.rng = pause_s, random.Random(seed)
        self.pinned: set[str] = set()
        self.error: BaseException | None = None

    def _call(self, kind: str, method: str, path: str, ok: int, **kw: Any) -> bool:
        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as e:
            key, detail = f"{kind} {type(e).__name__}", str(e)
        else:
            if r.status_code == ok:
                with self.tally.lock:
                    self.tally.admin_ops[kind] += 1
                return True
            key, detail = f"{kind} {r.status_code}", r.text[:300]
            code = r.json().get("error", {}).get("code") if _is_json(r) else None
            if (kind, r.status_code, code) in EXPECTED_ADMIN_REFUSALS:
                with self.tally.lock:
                    self.tally.admin_refused[f"{key} {code}"] += 1
                return False
        with self.tally.lock:
            self.tally.admin_failures[key] += 1
        self.tally.example("admin_failures", {"op": kind, "path": path, "error": detail})
        return False

    def _upload(self, kind: str, name: str, replace: bool) -> bool:
        params = {"name": name, **({"replace": "true"} if replace else {})}
        return self._call(
            kind, "POST", "/admin/deltas", 201, params=params, content=self.data[name]
        )

    def _delete_variant(self, kind: str, name: str) -> bool:
        self.presence.set(name, False)  # from now on a 404 for it is expected
        self.pinned.discard(name)  # a delete unpins
        return self._call(kind, "DELETE", f"/admin/deltas/{name}", 200)

    def step(self) -> None:
        present = self.stable + self.presence.names(True)
        kind = self.rng.choice(
            ["preload", "evict", "pin", "unpin", "replace", "cycle", "extra", "extra"]
        )
        if kind in ("preload", "pin", "replace"):
            name = self.rng.choice(present)
            if kind == "replace":
                self._upload(kind, name, replace=True)
            elif self._call(kind, "POST", f"/admin/deltas/{name}/{kind}", 200) and kind == "pin":
                self.pinned.add(name)
        elif kind == "unpin":
            name = self.rng.choice(sorted(self.pinned) or present)
            if self._call(kind, "POST", f"/admin/deltas/{name}/unpin", 200):
                self.pinned.discard(name)
        elif kind == "evict":
            choices = [n for n in present if n not in self.pinned]
            if choices:  # evicting a pinned variant is refused (409) by design
                self._call(kind, "POST", f"/admin/deltas/{self.rng.choice(choices)}/evict", 200)
        elif kind == "cycle" and self.cycled:  # delete, then upload the same bytes again
            name = self.rng.choice(self.cycled)
            if self.presence.snapshot(name)[0]:
                self._delete_variant("cycle-delete", name)
                time.sleep(self.rng.uniform(0, self.pause_s))
            if self._upload("cycle-upload", name, replace=False):
                self.presence.set(name, True)
        elif kind == "extra" and self.extra:  # an extra variant comes or goes
            name = self.rng.choice(self.extra)
            if self.presence.snapshot(name)[0]:
                self._delete_variant("extra-delete", name)
            elif self._upload("extra-upload", name, replace=False):
                self.presence.set(name, True)

    def run(self) -> None:
        try:
            while time.monotonic() < self.end:
                self.step()
                time.sleep(self.rng.uniform(0, self.pause_s))
        except BaseException as e:  # reported by run_soak
            self.error = e
        finally:
            self.client.close()


def _stored(url: str, admin_token: str) -> tuple[set[str], set[str]]:
    """The variants in the server's store, and the pinned ones (admin API)."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    r = httpx.get(f"{url}/admin/deltas", headers=headers, timeout=60)
    r.raise_for_status()
    infos = r.json()
    return {d["name"] for d in infos}, {d["name"] for d in infos if d["pinned"]}


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
    """Soak the server at `url` (127.0.0.1) for `duration_s` seconds; see the module
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
    tally = _Tally(report)
    stored, pinned = _stored(url, admin_token)  # where an earlier run left things
    presence = _Presence(variants, stored)
    stable = [v for v in variants if not v.churn]
    t_start = time.monotonic()
    end = t_start + duration_s
    churner = _Churner(url, admin_token, variants, presence, tally, end, admin_pause_s, seed + 1)
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


# --------------------------------------------------------------------------- disconnects


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


# --------------------------------------------------------------------------- the CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/soak.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--duration", type=float, default=600, help="soak seconds (0: no soak)")
    ap.add_argument("--concurrency", type=int, default=8, help="steady closed-loop clients")
    ap.add_argument("--variants", type=int, default=8, help="stable variants (besides the base)")
    ap.add_argument(
        "--churn-variants",
        type=int,
        default=2,
        help="variants deleted and re-uploaded, and as many extra ones uploaded and deleted",
    )
    ap.add_argument("--queue-limit", type=int, default=8, help="the server's queue_limit")
    ap.add_argument("--max-batch-size", type=int, default=4, help="the server's running slots")
    ap.add_argument("--burst-size", type=int, default=32, help="requests sent at once per burst")
    ap.add_argument("--burst-every", type=float, default=5.0, help="seconds between bursts")
    ap.add_argument("--admin-pause", type=float, default=0.2, help="longest pause between ops")
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline")
    ap.add_argument("--rss-bound-mib", type=float, default=SOAK_RSS_BOUND / MiB)
    ap.add_argument("--disconnects", type=int, default=0, help="clients that hang up (0: none)")
    ap.add_argument("--disconnect-concurrency", type=int, default=16)
    ap.add_argument("--disconnect-rss-bound-mib", type=float, default=DISCONNECT_RSS_BOUND / MiB)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: temp)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = ap.parse_args(argv)

    import platform
    import tempfile

    import torch
    from transformers.utils import logging as hf_logging

    from deltastore.testing import make_model, save
    from server.app import ThreadedServer

    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="deltaserve-soak-"))
    base_dir = save(make_model(0), work / "base")
    variants = build_variants(
        base_dir, work / "variants", args.variants, args.churn_variants, args.churn_variants
    )
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    fill_store(store, variants)
    settings = soak_settings(
        base_dir, store, queue_limit=args.queue_limit, max_batch_size=args.max_batch_size
    )
    out: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "server": settings.model_dump(mode="json", exclude={"admin_token"}),
        "models": [v.name for v in variants],
    }
    failed = False
    try:
        if args.duration > 0:
            srv = ThreadedServer(settings)
            try:
                srv.wait_ready()
                soak = run_soak(
                    srv.url,
                    ADMIN_TOKEN,
                    variants,
                    args.duration,
                    args.concurrency,
                    burst_size=args.burst_size,
                    burst_every_s=args.burst_every,
                    admin_pause_s=args.admin_pause,
                    warmup_s=args.warmup,
                    rss_bound_bytes=int(args.rss_bound_mib * MiB),
                    state=srv.state,
                    seed=args.seed,
                )
            finally:
                srv.stop()
            out["soak"] = soak.to_dict()
            print(soak.summary())
            failed |= bool(soak.problems())
        if args.disconnects > 0:
            # a server of its own, its queue (64) deeper than the clients at once
            dsettings = soak_settings(
                base_dir, store, max_batch_size=args.max_batch_size, queue_limit=64
            )
            out["disconnect_server"] = dsettings.model_dump(mode="json", exclude={"admin_token"})
            srv = ThreadedServer(dsettings)
            try:
                srv.wait_ready()
                disc = run_disconnects(
                    srv.url,
                    [v.name for v in variants if not v.churn],
                    args.disconnects,
                    args.disconnect_concurrency,
                    rss_bound_bytes=int(args.disconnect_rss_bound_mib * MiB),
                    state=srv.state,
                )
            finally:
                srv.stop()
            out["disconnects"] = disc.to_dict()
            print(disc.summary())
            failed |= bool(disc.problems())
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"report: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
