"""Serving comparison: one workload against deltaserve and the alternatives.

    python -m benchmarks.serving --variants 16            # warm: dense copies fit the page cache
    python -m benchmarks.serving --variants 48 --no-lora  # at scale: they exceed RAM

The workload: --variants variants of the embedded base, Zipf(1.0) popularity,
--requests completions of --max-tokens tokens (greedy, one fixed prompt), from
--concurrency closed-loop clients, seed 0; one warm-up request per server is
excluded. Driven by `deltaserve loadtest` against, each in its own process:
1. deltaserve with its defaults;
2. deltaserve with the materialized-variant cache off (every switch in place);
3. naive: plain transformers, reloading a variant's checkpoint when it changes;
4. dense: every variant held in memory, as many as fit in --dense-budget-gb;
5. LoRA: PEFT with all adapters loaded, set_adapter per request, beside
   deltaserve serving the same adapters as DARE-pruned deltas (p = 0.99).
Variants 1-4 are SFT-scale deltas over every matrix (mean |delta| 2e-4, p = 0.99);
the dense checkpoints for 3-4 are those deltas materialized, so every configuration
serves the same weights and generates the same text (checked on probe requests).
Reported: throughput, p50/p99 latency, peak resident memory (VmHWM) of the server,
bytes on disk per variant, and ratios to (1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import torch
from tqdm.auto import tqdm

from benchmarks.serve import synthetic_variant
from benchmarks.servers import peak_rss, start, stop
from deltastore.compress import CompressOptions, compress
from deltastore.embedded import ensure_embedded_base
from deltastore.format import load_delta, save_delta
from deltastore.materialize import materialize
from deltastore.methods import Method
from deltastore.paths import cache_dir
from deltastore.sources import open_finetune, open_model
from server.clients.loadtest import Workload, parse_mix, run

PORT = 8950
QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare(base_dir: Path, n: int, lora: bool) -> dict[str, Path]:
    """Variant deltas (store), their dense checkpoints, LoRA adapters and their deltas."""
    work = cache_dir() / "bench" / "serving"
    dirs = {k: work / k for k in ("store", "dense", "adapters", "lora-store")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    base = open_model(base_dir)
    for i in tqdm(range(n), desc="variants (delta + dense checkpoint)"):
        name = f"v{i:02d}"
        delta = dirs["store"] / f"{name}.delta.safetensors"
        if not delta.is_file():
            synthetic_variant(base_dir, delta, seed=i + 1)
        dense = dirs["dense"] / name
        if not (dense / "model.safetensors").is_file():
            shutil.rmtree(dense, ignore_errors=True)
            materialize(base, load_delta(delta), dense, progress=False)
    if lora:
        for i in tqdm(range(n), desc="LoRA adapters (+ their deltas)"):
            name = f"lora{i:02d}"
            adapter = dirs["adapters"] / name
            if not (adapter / "adapter_model.safetensors").is_file():
                make_adapter(base, adapter, seed=1000 + i)
            delta = dirs["lora-store"] / f"{name}.delta.safetensors"
            if not delta.is_file():
                opts = CompressOptions(method=Method.DARE, rate=0.99, progress=False)
                save_delta(delta, compress(base, open_finetune(base, adapter), opts))
    return dirs


def make_adapter(base: Any, path: Path, seed: int) -> Path:
    """An r=8 q/v PEFT LoRA adapter with an SFT-scale update (not a random rewrite)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base.load_model(), cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.mul_(0.02)
    model.save_pretrained(path)
    return path


def probe(names: list[str], prompt: str) -> dict[str, str]:
    out = {}
    for name in names:
        body = {"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{PORT}/v1/completions", json=body, timeout=600)
        out[name] = r.json()["choices"][0]["text"]
    return out


def measure(
    label: str,
    cmd: list[str],
    env: dict[str, str],
    names: list[str],
    args: argparse.Namespace,
    disk: int,
) -> dict[str, Any]:
    proc = start(cmd, PORT, env)
    try:
        texts = probe(names[:3], args.prompt)  # also the warm-up
        w = Workload(
            parse_mix("zipf:1.0", names), args.prompt, args.max_tokens, False, False, 0.0, 0
        )
        rep = asyncio.run(
            run(
                f"http://127.0.0.1:{PORT}",
                w,
                args.concurrency,
                None,
                args.requests,
                None,
                progress=True,
            )
        )
        rss = peak_rss(proc)
    finally:
        stop(proc)
    d = asdict(rep)
    return {
        "config": label,
        "requests_per_s": d["requests_per_s"],
        "tokens_per_s": d["tokens_per_s"],
        "p50_ms": d["e2e_ms"].get("p50"),
        "p99_ms": d["e2e_ms"].get("p99"),
        "succeeded": d["succeeded"],
        "sent": d["sent"],
        "tokens": sum(r["tokens"] for r in d["results"]),
        "peak_rss_bytes": rss,
        "disk_bytes_per_variant": disk,
        "probe": texts,
        "server": d["server"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variants", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument(
        "--dense-budget-gb", type=float, default=16.0, help="memory for config 4's dense variants"
    )
    ap.add_argument("--no-lora", action="store_true", help="skip configuration 5")
    ap.add_argument(
        "--base-only",
        action="store_true",
        help="only the reference: the same workload, every request to the base",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    base_dir = ensure_embedded_base()
    # chat-formatted, sent as a raw completion: every server sees the same token ids
    tok = open_model(base_dir).load_tokenizer()
    args.prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    dirs = prepare(base_dir, args.variants, lora=not args.no_lora)
    names = [f"v{i:02d}" for i in range(args.variants)]
    # the store may hold more variants from an earlier, larger run: serve exactly these
    store = dirs["store"].parent / f"store-{args.variants}"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    for n in names:
        os.link(dirs["store"] / f"{n}.delta.safetensors", store / f"{n}.delta.safetensors")
    dense = dirs["dense"].parent / f"dense-{args.variants}"
    shutil.rmtree(dense, ignore_errors=True)
    dense.mkdir()
    for n in names:
        (dense / n).symlink_to(dirs["dense"] / n)
    delta_bytes = (store / f"{names[0]}.delta.safetensors").stat().st_size
    dense_bytes = _dir_bytes(dirs["dense"] / names[0])
    per_model = dense_bytes
    keep = max(1, int(args.dense_budget_gb * 2**30 // per_model))
    py = [sys.executable, "-m"]
    ds = [*py, "server.cli", "serve", "--no-demo", "--port", str(PORT), "--store"]
    if args.base_only:
        row = measure(
            "0 the base alone (deltaserve, no variants)",
            [*ds, str(store)],
            {},
            [base_dir.name],
            args,
            0,
        )
        out = args.out or Path("benchmarks/results/serving-base.json")
        out.write_text(json.dumps({"rows": [row]}, indent=2))
        print(
            f"base alone: {row['tokens_per_s']:.1f} tokens/s, {row['requests_per_s']:.2f} req/s, "
            f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms"
        )
        return
    naive = [*py, "benchmarks.naive_server", "--port", str(PORT), "--models-dir", str(dense)]
    configs = [
        ("1 deltaserve (defaults)", [*ds, str(store)], {}, names, delta_bytes),
        (
            "2 deltaserve, no materialized cache",
            [*ds, str(store), "--materialized-cache-bytes", "0"],
            {},
            names,
            delta_bytes,
        ),
        (
            "3 naive: reload checkpoint on change",
            [*naive, "--mode", "reload"],
            {},
            names,
            dense_bytes,
        ),
        (
            f"4 dense in memory (up to {keep})",
            [*naive, "--mode", "dense", "--keep", str(keep)],
            {},
            names,
            dense_bytes,
        ),
    ]
    if not args.no_lora:
        lnames = [f"lora{i:02d}" for i in range(args.variants)]
        adapters = dirs["adapters"].parent / f"adapters-{args.variants}"
        shutil.rmtree(adapters, ignore_errors=True)
        adapters.mkdir()
        for n in lnames:
            (adapters / n).symlink_to(dirs["adapters"] / n)
        lstore = dirs["lora-store"].parent / f"lora-store-{args.variants}"
        shutil.rmtree(lstore, ignore_errors=True)
        lstore.mkdir()
        for n in lnames:
            os.link(
                dirs["lora-store"] / f"{n}.delta.safetensors", lstore / f"{n}.delta.safetensors"
            )
        configs += [
            (
                "5a LoRA: deltaserve (DARE p=0.99 deltas)",
                [*ds, str(lstore)],
                {},
                lnames,
                (lstore / f"{lnames[0]}.delta.safetensors").stat().st_size,
            ),
            (
                "5b LoRA: PEFT, all adapters, set_adapter",
                [
                    *py,
                    "benchmarks.naive_server",
                    "--port",
                    str(PORT),
                    "--mode",
                    "peft",
                    "--models-dir",
                    str(adapters),
                    "--base",
                    str(base_dir),
                ],
                {},
                lnames,
                _dir_bytes(dirs["adapters"] / lnames[0]),
            ),
        ]
    rows = [measure(label, cmd, env, ns, args, disk) for label, cmd, env, ns, disk in configs]
    same = {r["config"]: r["probe"] == rows[0]["probe"] for r in rows[:4]}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "variants": args.variants,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "dense_bytes_total": dense_bytes * args.variants,
        "same_text_as_1": same,
        "rows": rows,
    }
    out = args.out or Path(f"benchmarks/results/serving-{args.variants}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    ref = rows[0]
    lines = [
        "| configuration | req/s | tokens/s | × (1) | p50 (ms) | p99 (ms) "
        "| peak RSS | disk per variant |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["tokens_per_s"] / ref["tokens_per_s"]
        lines.append(
            f"| {r['config']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} "
            f"| {ratio:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB "
            f"| {r['disk_bytes_per_variant'] / 2**20:.1f} MiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
