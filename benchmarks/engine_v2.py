"""Engine v2 serving comparison: many variants against the base alone, beside vLLM's CPU
build serving the same base with LoRA adapters.

    python -m benchmarks.engine_v2 --variants 16 64
    python -m benchmarks.engine_v2 --variants 16 --vllm /path/to/vllm-venv/bin/vllm

The workload, the same for every configuration: --concurrency closed-loop clients
(`deltaserve loadtest`, streaming, seed 0), --requests completions of --max-tokens
greedy tokens each, one fixed chat-formatted prompt that generates long text, the
model of each request drawn from Zipf(1.0) over the N variants (or the base alone).
Every server runs in its own process on 127.0.0.1, gets one warm-up request per
model it serves first (excluded), and is stopped after its run.

Configurations (each in the same run, so ratios compare like with like):
- deltaserve v2 on the base alone, and on N full fine-tunes (SFT-scale deltas over
  every matrix, mean |Δ| 2e-4, DARE p = 0.99); (engine v1, one variant per batch, ran
  beside it until it was retired: its rows in BENCHMARKS.md are from those runs);
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
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from benchmarks.serve import synthetic_variant
from benchmarks.servers import peak_rss, start, stop
from benchmarks.serving import QUESTION, make_adapter
from deltastore.compress import CompressOptions, compress
from deltastore.embedded import ensure_embedded_base
from deltastore.format import save_delta
from deltastore.methods import Method
from deltastore.paths import cache_dir
from deltastore.sources import open_finetune, open_model
from server.clients.loadtest import Workload, parse_mix, run

PORT = 8951


def prepare(
    base_dir: Path, n: int, sparse_rate: float | None = None, lora: bool = True
) -> dict[str, Path]:
    """Stores of exactly n full-fine-tune deltas (p = 0.99, and p = sparse_rate if
    given) and, with `lora`, n LoRA deltas and n adapters (v00, v01, ..., v999: each
    made once, cached in a pool shared by every n)."""
    work = cache_dir() / "bench" / "engine_v2"
    pool = {k: work / k for k in ("deltas", "adapters", "lora-deltas", "sparse-deltas")}
    for d in pool.values():
        d.mkdir(parents=True, exist_ok=True)
    base = open_model(base_dir)
    for i in tqdm(range(n), desc="variants" + (", adapters and their deltas" if lora else "")):
        delta = pool["deltas"] / f"v{i:02d}.delta.safetensors"
        if not delta.is_file():
            synthetic_variant(base_dir, delta, seed=i + 1)
        sdelta = pool["sparse-deltas"] / f"v{i:02d}.delta.safetensors"
        if sparse_rate is not None and not sdelta.is_file():
            synthetic_variant(base_dir, sdelta, seed=i + 1, rate=sparse_rate)
        if not lora:
            continue
        adapter = pool["adapters"] / f"lora{i:02d}"
        if not (adapter / "adapter_model.safetensors").is_file():
            make_adapter(base, adapter, seed=1000 + i)
        ldelta = pool["lora-deltas"] / f"lora{i:02d}.delta.safetensors"
        if not ldelta.is_file():
            opts = CompressOptions(method=Method.DARE, rate=0.99, progress=False)
            save_delta(ldelta, compress(base, open_finetune(base, adapter), opts))
    out = {}
    keys = [("deltas", "v{:02d}.delta.safetensors")]
    if lora:
        keys.append(("lora-deltas", "lora{:02d}.delta.safetensors"))
    if sparse_rate is not None:
        keys.append(("sparse-deltas", "v{:02d}.delta.safetensors"))
    for key, pattern in keys:
        store = work / f"{key}-{n}"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir()
        for i in range(n):
            name = pattern.format(i)
            os.link(pool[key] / name, store / name)
        out[key] = store
    out["adapters"] = pool["adapters"]
    return out


def drop_page_cache() -> None:
    """Drop the kernel's clean page cache (root on Linux), so the store's files are read
    from the disk: a cold store."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as e:
        raise SystemExit(
            f"--drop-caches: cannot drop the page cache here ({e}); run as root"
        ) from e


def measure(
    label: str,
    cmd: list[str],
    env: dict[str, str],
    ready: str,
    names: list[str],
    args: Any,
    cwd: Path | None = None,
) -> dict[str, Any]:
    if args.drop_caches:  # every file the server reads comes from the disk
        drop_page_cache()
    proc = start(cmd, PORT, env, ready, cwd=cwd)
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
        "page_cache": "dropped before start" if args.drop_caches else "as left",
    }
    server = d["server"]  # deltaserve's own counters over the run (none from vLLM)
    if server.get("steps"):
        row["steps"] = int(server["steps"])
        row["step_ms"] = 1e3 * server["step_seconds"] / server["steps"]
        row["rows_per_step"] = server["step_rows"] / server["steps"]
        row["layout_loads"] = int(server["layout_loads"])
        row["layout_wait_s"] = server["layout_wait_seconds"]
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
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--skip-base", action="store_true", help="no base-alone rows")
    ap.add_argument(
        "--sparse-rate",
        type=float,
        default=None,
        help="also serve the full fine-tunes pruned at this rate (e.g. 0.999)",
    )
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="an argument for every deltaserve server (repeatable), e.g. "
        "--server-arg=--max-batch-size=32",
    )
    ap.add_argument(
        "--before",
        type=Path,
        default=None,
        help="a checkout of earlier code (e.g. a git worktree): each deltaserve v2 row also "
        "runs on it, right beside, in the same run",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every configuration this many times, alternated (medians and spreads)",
    )
    ap.add_argument(
        "--drop-caches",
        action="store_true",
        help="drop the page cache before each server starts (root): a cold store",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_v2.json"))
    ap.add_argument("--replot", action="store_true", help="only redraw --out's PNG and table")
    args = ap.parse_args()
    if args.replot:
        result = json.loads(args.out.read_text())
        plot(result, args.out.with_suffix(".png"))
        print(markdown(result))
        return
    base_dir = ensure_embedded_base()
    base = base_dir.name
    tok = open_model(base_dir).load_tokenizer()
    args.prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    ds = [sys.executable, "-m", "server.cli", "serve", "--no-demo", "--port", str(PORT)]
    empty = cache_dir() / "bench" / "engine_v2" / "empty"
    empty.mkdir(parents=True, exist_ok=True)

    def ds2(store: Path) -> list[str]:  # engine v2 in the chosen dtype
        return [*ds, "--dtype", args.dtype, "--store", str(store), *args.server_arg]

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
        "server_args": args.server_arg,
        "dtype": args.dtype,
        "rows": rows,
    }
    # (label, command, env, readiness path, models), in the order they run
    configs: list[tuple[str, list[str], dict[str, str], str, list[str]]] = []
    if not args.skip_base:
        configs.append(("deltaserve v2: base alone", ds2(empty), {}, "/ready", [base]))
        if args.vllm:
            configs.append(("vLLM CPU: base alone", vllm([]), vllm_env, "/v1/models", [base]))
    for n in args.variants:
        stores = prepare(base_dir, n, args.sparse_rate, lora=not args.skip_lora)
        names = [f"v{i:02d}" for i in range(n)]
        lnames = [f"lora{i:02d}" for i in range(n)]
        configs.append(
            (f"deltaserve v2: {n} full fine-tunes", ds2(stores["deltas"]), {}, "/ready", names)
        )
        if args.sparse_rate is not None:
            configs.append(
                (
                    f"deltaserve v2: {n} full fine-tunes at p = {args.sparse_rate}",
                    ds2(stores["sparse-deltas"]),
                    {},
                    "/ready",
                    names,
                )
            )
        if not args.skip_lora:
            configs.append(
                (
                    f"deltaserve v2: {n} LoRA adapters as deltas",
                    ds2(stores["lora-deltas"]),
                    {},
                    "/ready",
                    lnames,
                )
            )
            if args.vllm:
                adapters = [stores["adapters"] / name for name in lnames]
                configs.append(
                    (f"vLLM CPU: {n} LoRA adapters", vllm(adapters), vllm_env, "/v1/models", lnames)
                )
    runs: list[tuple[str, list[str], dict[str, str], str, list[str], Path | None]] = []
    for label, cmd, env, ready, models in configs:
        runs.append((label, cmd, env, ready, models, None))
        if args.before is not None and label.startswith("deltaserve v2"):
            before = args.before.resolve()
            twin = {**env, "PYTHONPATH": str(before)}
            runs.append((f"before: {label}", cmd, twin, ready, models, before))
    result["before"] = str(args.before) if args.before else None
    result["repeats"] = args.repeats
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for rep in range(args.repeats):
        # alternated: odd repeats run the configurations in reverse, so a drift of the
        # machine over the run weighs on every configuration alike
        for label, cmd, env, ready, models, cwd in runs if rep % 2 == 0 else runs[::-1]:
            row = measure(label, cmd, env, ready, models, args, cwd)
            row["repeat"] = rep
            rows.append(row)
            args.out.write_text(json.dumps(result, indent=1))  # partial results survive a stop
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration (in first-run order): the median of its repeats, and
    the lowest and highest tokens/s."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    out = []
    for rs in by.values():
        tps = sorted(r["tokens_per_s"] for r in rs)
        mid = sorted(rs, key=lambda r: r["tokens_per_s"])[(len(rs) - 1) // 2]
        out.append(
            {
                **mid,
                "tokens_per_s": statistics.median(tps),
                "low": tps[0],
                "high": tps[-1],
                "runs": len(rs),
            }
        )
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Generated tokens/s per configuration, grouped by engine, base alone first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(result["rows"])
    # (deltaserve v1: rows of results from before engine v1 was retired)
    colors = {"deltaserve v2": "tab:blue", "deltaserve v1": "tab:gray", "vLLM CPU": "tab:orange"}
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.2))
    labels = [r["config"] for r in rows][::-1]
    values = [r["tokens_per_s"] for r in rows][::-1]
    bar_colors = [colors.get(label.split(":")[0], "tab:green") for label in labels]
    ax.barh(labels, values, color=bar_colors)
    for i, v in enumerate(values):
        ax.text(v + 1, i, f"{v:.0f}", va="center", fontsize=8)
    ax.set_xlabel(
        f"generated tokens/s ({result['concurrency']} clients, {result['max_tokens']} tokens, "
        "Zipf(1.0) over the models)"
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def markdown(result: dict[str, Any]) -> str:
    """The table: per configuration its median tokens/s (the lowest and highest of its
    repeats beside), its ratio to the base alone on the same code and engine."""
    rows = summary(result["rows"])
    spread = any(r["runs"] > 1 for r in rows)
    lines = [
        "| configuration | tokens/s"
        + (" (low–high)" if spread else "")
        + " | × its base alone | req/s | TTFT p50 / p99 (ms) | e2e p50 / p99 (ms) | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]

    def engine(label: str) -> str:
        return label.rsplit(":", 1)[0]

    bases = {
        engine(r["config"]): r["tokens_per_s"] for r in rows if r["config"].endswith("base alone")
    }
    for r in rows:
        ref = bases.get(engine(r["config"]))
        ratio = f"{r['tokens_per_s'] / ref:.2f}" if ref else "-"
        t, e = r["ttft_ms"], r["e2e_ms"]
        tps = f"{r['tokens_per_s']:.1f}"
        if spread:
            tps += f" ({r['low']:.1f}–{r['high']:.1f})"
        lines.append(
            f"| {r['config']} | {tps} | {ratio} | {r['requests_per_s']:.2f} "
            f"| {t.get('p50', 0):.0f} / {t.get('p99', 0):.0f} "
            f"| {e.get('p50', 0):.0f} / {e.get('p99', 0):.0f} "
            f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
