"""A server under measurement: started in its own process group on 127.0.0.1, polled
until ready, driven by `deltaserve loadtest`'s runner, stopped whole."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from server.clients.loadtest import Workload, parse_mix, run


def start(
    cmd: list[str],
    port: int,
    env: dict[str, str] | None = None,
    ready_path: str = "/ready",
    timeout_s: float = 600,
    log: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `cmd` (in `cwd`) and wait until GET ready_path answers 200 on
    127.0.0.1:port."""
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopped whole
    )
    t0 = time.time()
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() - t0 > timeout_s:
            stop(proc)
            where = f" (its log: {log})" if log is not None else ""
            raise RuntimeError(f"{cmd[:4]} did not become ready{where}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def peak_rss(proc: subprocess.Popen[bytes]) -> int:
    """The process's peak resident memory (bytes), while it runs."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def load(
    port: int,
    models: list[str],
    prompt: str,
    max_tokens: int,
    concurrency: int,
    requests: int,
    warm: int = 16,
) -> dict[str, Any]:
    """One warm-up request for each of the `warm` most popular models, then
    `requests` streamed greedy completions (ignore_eos) from `concurrency` closed-loop
    clients, the model of each drawn from Zipf(1.0) over `models`."""
    url = f"http://127.0.0.1:{port}"
    for name in models[:warm]:
        body = {"model": name, "prompt": prompt, "max_tokens": 2, "temperature": 0}
        httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    w = Workload(parse_mix("zipf:1.0", models), prompt, max_tokens, True, False, 0, 0)
    rep = asdict(asyncio.run(run(url, w, concurrency, None, requests, None)))
    return {
        "tokens_per_s": rep["tokens_per_s"],
        "requests_per_s": rep["requests_per_s"],
        "tokens": sum(r["tokens"] for r in rep["results"]),
        "succeeded": rep["succeeded"],
        "sent": rep["sent"],
        "ttft_ms": rep["ttft_ms"],
        "e2e_ms": rep["e2e_ms"],
    }
