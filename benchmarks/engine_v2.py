"""Engine v2 serving comparison: many variants against the base alone, beside today's
engine and vLLM's CPU build serving the same base with LoRA adapters.

    python -m benchmarks.engine_v2 --variants 16 64
    python -m benchmarks.engine_v2 --variants 16 --vllm /path/to/vllm-venv/bin/vllm

The workload, the same for every configuration: --concurrency closed-loop clients
(`deltaserve loadtest`, streaming, seed 0), --requests completions of --max-tokens
greedy tokens each, one fixed chat-formatted prompt that generates long text, the
model of each request drawn from Zipf(1.0) over the N variants (or the base alone).
Every server runs in its own process on 127.0.0.1, gets one warm-up request per
model it serves first (excluded), and is stopped after its run.

Configurations (each in the same run, so ratios compare like with like):
- deltaserve v2 / v1 on the base alone, and on N full fine-tunes (SFT-scale deltas
  over every matrix, mean |Δ| 2e-4, DARE p = 0.99);
- deltaserve v2 on N LoRA adapters (r=8 q/v) densified and DARE-pruned (p = 0.99);
- vLLM's CPU build (given by --vllm, in its own environment, never a dependency of
  this project) on the base alone and with the same N LoRA adapters
  (--enable-lora --max-loras min(N, 16) --max-cpu-loras N).
Reported: generated tokens/s (the completion tokens the servers report), req/s,
time to first token and end-to-end p50/p99, peak RSS, and ratios to the base
alone on the same engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from benchmarks.serve import synthetic_variant
from benchmarks.serving import QUESTION, make_adapter, peak_rss
from deltastore.compress import CompressOptions, compress
from deltastore.embedded import ensure_embedded_base
from deltastore.format import save_delta
from deltastore.methods import Method
from deltastore.paths import cache_dir
from deltastore.sources import open_finetune, open_model
from server.loadtest import Workload, parse_mix, run

PORT = 8951


def prepare(base_dir: Path, n: int) -> dict[str, Path]:
    """Stores of exactly n full-fine-tune deltas and n LoRA deltas, and n adapters."""
    work = cache_dir() / "bench" / "engine_v2"
    pool = {k: work / k for k in ("deltas", "adapters", "lora-deltas")}
    for d in pool.values():
        d.mkdir(parents=True, exist_ok=True)
    base = open_model(base_dir)
    for i in tqdm(range(n), desc="variants, adapters and their deltas"):
        delta = pool["deltas"] / f"v{i:02d}.delta.safetensors"
        if not delta.is_file():
            synthetic_variant(base_dir, delta, seed=i + 1)
        adapter = pool["adapters"] / f"lora{i:02d}"
        if not (adapter / "adapter_model.safetensors").is_file():
            make_adapter(base, adapter, seed=1000 + i)
        ldelta = pool["lora-deltas"] / f"lora{i:02d}.delta.safetensors"
        if not ldelta.is_file():
            opts = CompressOptions(method=Method.DARE, rate=0.99, progress=False)
            save_delta(ldelta, compress(base, open_finetune(base, adapter), opts))
    out = {}
    for key, pattern in (("deltas", "v*.delta.safetensors"), ("lora-deltas", "lora*")):
        store = work / f"{key}-{n}"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir()
        for p in sorted(pool[key].glob(pattern))[:n]:
            os.link(p, store / p.name)
        out[key] = store
    out["adapters"] = pool["adapters"]
    return out


def start(cmd: list[str], env: dict[str, str], ready_path: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopped whole
    )
    t0 = time.time()
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}{ready_path}", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() - t0 > 600:
            stop(proc)
            raise RuntimeError(f"{cmd[:4]} did not become ready")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def measure(
    label: str, cmd: list[str], env: dict[str, str], ready: str, names: list[str], args: Any
) -> dict[str, Any]:
    proc = start(cmd, env, ready)
    try:
        for name in names[:16]:  # warm-up: first use of each of the most popular models
            body = {"model": name, "prompt": args.prompt, "max_tokens": 2, "temperature": 0}
            httpx.post(f"http://127.0.0.1:{PORT}/v1/completions", json=body, timeout=600)
        w = Workload(parse_mix("zipf:1.0", names), args.prompt, args.max_tokens, True, False, 0, 0)
        rep = asyncio.run(
            run(f"http://127.0.0.1:{PORT}", w, args.concurrency, None, args.requests, None)
        )
        rss = peak_rss(proc)
    finally:
        stop(proc)
    d = asdict(rep)
    row = {
        "config": label,
        "models": len(names),
        "tokens_per_s": d["tokens_per_s"],
        "requests_per_s": d["requests_per_s"],
        "tokens": sum(r["tokens"] for r in d["results"]),
        "succeeded": d["succeeded"],
        "sent": d["sent"],
        "ttft_ms": d["ttft_ms"],
        "e2e_ms": d["e2e_ms"],
        "peak_rss_bytes": rss,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variants", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", help="deltaserve's resident dtype")
    ap.add_argument("--vllm", type=Path, default=None, help="the vllm executable of its venv")
    ap.add_argument("--skip-v1", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_v2.json"))
    args = ap.parse_args()
    base_dir = ensure_embedded_base()
    base = base_dir.name
    tok = open_model(base_dir).load_tokenizer()
    args.prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    ds = [sys.executable, "-m", "server.cli", "serve", "--no-demo", "--port", str(PORT)]
    empty = cache_dir() / "bench" / "engine_v2" / "empty"
    empty.mkdir(parents=True, exist_ok=True)

    def deltaserve(engine: str, store: Path, dtype: str) -> list[str]:
        return [*ds, "--engine", engine, "--dtype", dtype, "--store", str(store)]

    vllm_env = {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }

    def vllm(adapters: list[Path]) -> list[str]:
        assert args.vllm is not None
        cmd = [
            str(args.vllm),
            "serve",
            str(base_dir),
            "--served-model-name",
            base,
            "--host",
            "127.0.0.1",
            "--port",
            str(PORT),
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "2048",
            "--enforce-eager",
        ]
        if adapters:
            cmd += [
                "--enable-lora",
                "--max-loras",
                str(min(len(adapters), 16)),
                "--max-cpu-loras",
                str(len(adapters)),
                "--max-lora-rank",
                "8",
                "--lora-modules",
                *[f"{a.name}={a}" for a in adapters],
            ]
        return cmd

    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "dtype": args.dtype,
        "rows": rows,
    }
    rows.append(
        measure(
            "deltaserve v2: base alone",
            deltaserve("v2", empty, args.dtype),
            {},
            "/ready",
            [base],
            args,
        )
    )
    if not args.skip_v1:
        rows.append(
            measure(
                "deltaserve v1: base alone",
                deltaserve("v1", empty, "float32"),
                {},
                "/ready",
                [base],
                args,
            )
        )
    if args.vllm:
        rows.append(measure("vLLM CPU: base alone", vllm([]), vllm_env, "/v1/models", [base], args))
    for n in args.variants:
        stores = prepare(base_dir, n)
        names = [f"v{i:02d}" for i in range(n)]
        lnames = [f"lora{i:02d}" for i in range(n)]
        rows.append(
            measure(
                f"deltaserve v2: {n} full fine-tunes",
                deltaserve("v2", stores["deltas"], args.dtype),
                {},
                "/ready",
                names,
                args,
            )
        )
        if not args.skip_v1:
            rows.append(
                measure(
                    f"deltaserve v1: {n} full fine-tunes",
                    deltaserve("v1", stores["deltas"], "float32"),
                    {},
                    "/ready",
                    names,
                    args,
                )
            )
        rows.append(
            measure(
                f"deltaserve v2: {n} LoRA adapters as deltas",
                deltaserve("v2", stores["lora-deltas"], args.dtype),
                {},
                "/ready",
                lnames,
                args,
            )
        )
        if args.vllm:
            adapters = [stores["adapters"] / name for name in lnames]
            rows.append(
                measure(
                    f"vLLM CPU: {n} LoRA adapters",
                    vllm(adapters),
                    vllm_env,
                    "/v1/models",
                    lnames,
                    args,
                )
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| configuration | tokens/s | × its base alone | req/s | TTFT p50 / p99 (ms) "
        "| e2e p50 / p99 (ms) | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    bases = {
        r["config"].split(":")[0]: r["tokens_per_s"]
        for r in result["rows"]
        if r["config"].endswith("base alone")
    }
    for r in result["rows"]:
        ref = bases.get(r["config"].split(":")[0])
        ratio = f"{r['tokens_per_s'] / ref:.2f}" if ref else "-"
        t, e = r["ttft_ms"], r["e2e_ms"]
        lines.append(
            f"| {r['config']} | {r['tokens_per_s']:.1f} | {ratio} | {r['requests_per_s']:.2f} "
            f"| {t.get('p50', 0):.0f} / {t.get('p99', 0):.0f} "
            f"| {e.get('p50', 0):.0f} / {e.get('p99', 0):.0f} "
            f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
