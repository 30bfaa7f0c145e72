"""A decode step's own CPU kernels against torch's ops, in process.

    python -m benchmarks.decode_kernels                    # both tables
    python -m benchmarks.decode_kernels --steps-only --rows 8 16 --variants 0 16

Two tables (bf16, the embedded base's shapes, torch's threads):
- attention: one layer's decode attention for B rows whose KV slots hold L positions,
  by the kernel (decode_attention_bf16: each row's positions read in place) against
  the runner's SDPA path (the rows' slots gathered to the longest row, masked, SDPA,
  the output rows scattered back), median of --repeats calls;
- steps: the engine stepping --rows requests of --max-tokens greedy tokens over d
  distinct variants (0: the base alone; the SFT-scale full fine-tunes of
  benchmarks.mixed), the decode kernels switched on and off on alternate steps of the
  same run (so both see the same batch, lengths and machine state); reported: the
  median step time of each, and their ratio.
Writes --out (JSON) and prints both tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.mixed import PROMPT, variants
from deltastore.embedded import ensure_embedded_base
from deltastore.sources import open_model
from deltastore.store import DeltaStore
from server.config import Settings
from server.engine.core import Engine
from server.engine.job import Job, SamplingParams
from server.engine.kernels import cpu, decode_kernels
from server.engine.llm_engine import LLMEngine
from server.metrics import Metrics


def _sdpa_path(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
) -> None:
    """The runner's decode attention without the kernel (model_runner._attention)."""
    b, hkv, d = idx.numel(), k.shape[1], k.shape[3]
    length = int(lens.max())
    qd = q.index_select(0, idx).view(b, hkv, q.shape[1] // hkv, d)
    kd, vd = k[slots, :, :length], v[slots, :, :length]
    keep = torch.arange(length)[None] < lens[:, None]
    od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=keep[:, None, None], scale=scale)
    out[idx] = od.reshape(b, -1)


def attention_table(cases: list[tuple[int, int]], repeats: int) -> list[dict[str, Any]]:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ensure_embedded_base())
    hkv, h = cfg.num_key_value_heads, cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    slots_n, max_len = 64, 2048
    k = torch.randn(slots_n, hkv, max_len, d).bfloat16()
    v = torch.randn_like(k)
    rows = []
    for b, length in tqdm(cases, desc="attention"):
        q = torch.randn(b, h, d).bfloat16()
        idx = torch.arange(b)
        slots = torch.randperm(slots_n)[:b].contiguous()
        lens = torch.full((b,), length)
        out = torch.empty(b, h * d).bfloat16()
        args = (q, k, v, idx, slots, lens)
        calls = {
            "kernel": functools.partial(cpu.decode_attention_, out, *args, None, d**-0.5),
            "sdpa": functools.partial(_sdpa_path, *args, out, d**-0.5),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(5):
            for fn in calls.values():
                fn()
        for _ in range(repeats):  # alternated
            for name, fn in calls.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        us = {name: 1e6 * statistics.median(ts) for name, ts in times.items()}
        rows.append(
            {"rows": b, "positions": length, "kernel_us": us["kernel"], "sdpa_us": us["sdpa"]}
        )
    return rows


def _steps(engine: Engine, settings: Settings, d: int, rows: int, max_tokens: int) -> dict:
    sched = LLMEngine(engine, settings, Metrics())
    sched.loader.start()
    on = (sched.runner.linear, sched.runner.attend)
    if on[1] is None:
        raise SystemExit("the decode kernels are not built on this machine (no AVX512-BF16)")
    tok = engine.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    jobs = []
    for i in range(rows):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        job = Job(None if d == 0 else f"v{i % d:02d}", ids, params, lambda kind, payload: None)
        jobs.append(job)
        sched.submit(job)
    while any(j.completion_tokens == 0 for j in jobs):
        sched.step()  # the prompts, before the timed decode steps
    times: dict[str, list[float]] = {"kernels": [], "torch": []}
    k = 0
    while any(j.finish_reason is None for j in jobs):
        name = "kernels" if k % 2 else "torch"
        k += 1
        sched.runner.linear, sched.runner.attend = on if name == "kernels" else (F.linear, None)
        t = time.perf_counter()
        sched.step()
        times[name].append(time.perf_counter() - t)
    sched.loader.stop()
    engine.activate(None)
    ms = {n: 1e3 * statistics.median(ts) for n, ts in times.items()}
    return {"variants": d, "rows": rows, "kernels_ms": ms["kernels"], "torch_ms": ms["torch"]}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--variants", type=int, nargs="+", default=[0, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--positions", type=int, nargs="+", default=[150, 600])
    ap.add_argument("--repeats", type=int, default=200, help="attention calls per case")
    ap.add_argument("--steps-only", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_kernels.json"))
    args = ap.parse_args()
    if decode_kernels("auto", torch.device("cpu"), torch.bfloat16)[1] is None:
        raise SystemExit("the decode kernels are not built on this machine (no AVX512-BF16)")
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    if not args.steps_only:
        cases = [(b, n) for b in args.rows for n in args.positions]
        result["attention"] = attention_table(cases, args.repeats)
        print("| rows | positions | kernel (µs) | SDPA path (µs) | × |")
        print("|---|---|---|---|---|")
        for r in result["attention"]:
            print(
                f"| {r['rows']} | {r['positions']} | {r['kernel_us']:.0f} | "
                f"{r['sdpa_us']:.0f} | {r['sdpa_us'] / r['kernel_us']:.2f} |"
            )
    base_dir = ensure_embedded_base()
    store = variants(base_dir, max(args.variants), "p0.99")
    steps = []
    for rows in args.rows:
        settings = Settings(
            base=base_dir,
            store=store,
            device="cpu",
            dtype="bfloat16",
            merge_policy="never",
            max_batch_size=rows,
            demo=False,
            max_new_tokens=max(args.max_tokens, 64),
        )
        engine = Engine(open_model(base_dir), DeltaStore(store), settings)
        for d in tqdm(args.variants, desc=f"steps, {rows} rows"):
            _steps(engine, settings, d, rows, 8)  # warm-up: layouts, kernel build
            steps.append(_steps(engine, settings, d, rows, args.max_tokens))
    result["steps"] = steps
    print("| rows | variants | torch's ops (ms a step) | the kernels (ms a step) | × |")
    print("|---|---|---|---|---|")
    for r in steps:
        print(
            f"| {r['rows']} | {r['variants']} | {r['torch_ms']:.1f} | {r['kernels_ms']:.1f} | "
            f"{r['torch_ms'] / r['kernels_ms']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
