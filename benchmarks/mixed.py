"""Engine v2's cost curve: tokens/s against distinct variants per step.

    python -m benchmarks.mixed                       # fp32 and bf16, merge never/auto
    python -m benchmarks.mixed --dtypes bfloat16 --variants 0 1 8 16 --policies never

In process (no HTTP): the embedded base with --rows concurrent requests, each of
--max-tokens greedy tokens (EOS ignored, so every configuration generates the same
number of tokens), the rows spread round-robin over d distinct variants (0: every
row on the base). The variants are SFT-scale deltas over every matrix (mean |Δ|
2e-4, DARE p = 0.99 unless --rate), cached under ~/.cache/deltaserve/bench/mixed.
Reported: generated tokens/s from the first submission to the last token (prefill
included; after one untimed run that lays the variants out), the median step time,
and the ratio to the base in the same run.
Also the sparse product per layer shape against the dense GEMM (`--kernel-only`), and
one layer's products by the kernel as built here against its portable build
(`--kernel-layer`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.serve import synthetic_variant
from deltastore.embedded import ensure_embedded_base
from deltastore.paths import cache_dir
from deltastore.sources import open_model
from deltastore.store import DeltaStore
from server.config import Settings
from server.engine.core import Engine
from server.engine.job import Job, SamplingParams
from server.engine.kernels.layout import pack
from server.engine.llm_engine import LLMEngine
from server.engine.sparse import CSR, Matrix, Segment, StepDeltas, VariantLayout, use_native
from server.metrics import Metrics

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def variants(base_dir: Path, n: int, rate_tag: str) -> Path:
    store = cache_dir() / "bench" / f"mixed-{rate_tag}"
    store.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(n), desc="variants"):
        path = store / f"v{i:02d}.delta.safetensors"
        if not path.is_file():
            synthetic_variant(base_dir, path, seed=i + 1)
    return store


def run_once(engine: Engine, settings: Settings, d: int, rows: int, max_tokens: int) -> dict:
    metrics = Metrics()
    sched = LLMEngine(engine, settings, metrics)
    sched.loader.start()  # variants not laid out yet load beside the steps, as in the server
    tok = engine.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    jobs = []
    t0 = time.perf_counter()
    for i in range(rows):
        variant = None if d == 0 else f"v{i % d:02d}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

        job = Job(variant, ids, params, lambda kind, payload: None)
        jobs.append(job)
        sched.submit(job)
    # the steps run on this thread, the one that loaded the model: torch compute from
    # another thread runs ~40% slower with this build's OpenMP (server/engine/llm_engine.py)
    step_times = []
    while any(j.finish_reason is None for j in jobs):
        t = time.perf_counter()
        sched.step()
        step_times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    sched.loader.stop()
    engine.activate(None)
    generated = sum(j.completion_tokens for j in jobs)
    steps = metrics.step_seconds.collect()[0].samples
    count = next(s.value for s in steps if s.name.endswith("_count"))
    total = next(s.value for s in steps if s.name.endswith("_sum"))
    return {
        "tokens_per_s": generated / wall,
        "generated": generated,
        "wall_s": wall,
        "mean_step_ms": 1e3 * total / count,
        "median_step_ms": 1e3 * statistics.median(step_times),  # a decode step
        "steps": count,
        "errors": sum(j.finish_reason == "error" for j in jobs),
    }


def copy_bandwidth() -> float:
    """GB/s of a 512 MiB copy (read + write counted), median of 5."""
    src = torch.ones(1 << 27)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def kernel_table(rates: list[float], dtypes: list[str], rows: int) -> list[dict]:
    """Sparse product of `rows` one-token segments (distinct variants) vs the dense GEMM."""
    out = []
    cpu = torch.device("cpu")
    native = use_native("auto", cpu)
    shapes = {
        "q/o 576x576": (576, 576),
        "k/v 192x576": (192, 576),
        "gate/up 1536x576": (1536, 576),
        "down 576x1536": (576, 1536),
        "lm_head 49152x576": (49152, 576),
    }
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for rate in rates:
            for label, shape in shapes.items():
                n = shape[0] * shape[1]
                k = int(n * (1 - rate))
                layouts = []
                for v in range(rows):
                    g = torch.Generator().manual_seed(v)
                    pos = torch.randperm(n, generator=g)[:k].sort().values
                    csr = CSR.from_positions(
                        pos, torch.randn(k, generator=g).bfloat16() * 1e-3, 100.0, shape
                    )
                    matrix = Matrix(0, shape, k)
                    layouts.append(VariantLayout(f"v{v}", pack({0: csr}, 1), None, {"w": matrix}))
                x = torch.randn(rows, shape[1]).to(dtype)
                w = torch.randn(shape).to(dtype)
                y = x @ w.T
                segments = [Segment(i, i + 1, layouts[i], 1.0) for i in range(rows)]
                step = StepDeltas.build(segments, cpu, native)

                def timed(fn) -> float:
                    for _ in range(5):
                        fn()
                    ts = []
                    for _ in range(50):
                        t = time.perf_counter()
                        fn()
                        ts.append(time.perf_counter() - t)
                    return statistics.median(ts)

                dense = timed(lambda x=x, w=w: torch.nn.functional.linear(x, w))
                sparse = timed(lambda x=x, y=y, step=step: step.spmm_add_(y, x, 0))
                out.append(
                    {
                        "dtype": dtype_name,
                        "rate": rate,
                        "shape": label,
                        "rows": rows,
                        "dense_ms": dense * 1e3,
                        "sparse_ms": sparse * 1e3,
                        "ratio": sparse / dense,
                    }
                )
                print(
                    f"{dtype_name} p={rate} {label}: dense {dense * 1e3:.3f} ms, "
                    f"sparse ({rows} variants) {sparse * 1e3:.3f} ms, {sparse / dense:.2f}x"
                )
    return out


LAYER_SHAPES = {  # one SmolLM2-135M layer as the runner computes it (q/k/v, gate/up fused)
    "qkv": (960, 576),
    "o": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
}


def _layer_call(
    step: StepDeltas, xs: list[torch.Tensor], ys: list[torch.Tensor], portable: bool
) -> float:
    from server.engine.kernels import cpu

    t = time.perf_counter()
    for i in range(len(LAYER_SHAPES)):
        cpu.spmm_add_(ys[i], xs[i], step.layouts, step.bases, step.items, i, portable=portable)
    return time.perf_counter() - t


def layer_table(rate: float, cases: list[tuple[int, int]], repeats: int = 200) -> list[dict]:
    """One layer's sparse products (bf16 values and activations) for `variants` items of
    `tokens` tokens each, by the C kernel as built here and by its portable build (the
    scalar code a machine without AVX-512 runs), alternated call by call."""
    out = []
    for variants_, tokens in cases:
        layouts = []
        for v in range(variants_):
            g = torch.Generator().manual_seed(v)
            csrs, matrices = {}, {}
            for i, (name, shape) in enumerate(LAYER_SHAPES.items()):
                n = shape[0] * shape[1]
                k = int(n * (1 - rate))
                pos = torch.randperm(n, generator=g)[:k].sort().values
                vals = torch.randn(k, generator=g).bfloat16() * 1e-3
                csrs[i] = CSR.from_positions(pos, vals, 100.0, shape)
                matrices[name] = Matrix(i, shape, k)
            layouts.append(VariantLayout(f"v{v}", pack(csrs, len(LAYER_SHAPES)), None, matrices))
        segments = [
            Segment(i * tokens, (i + 1) * tokens, lay, 1.0) for i, lay in enumerate(layouts)
        ]
        step = StepDeltas.build(segments, torch.device("cpu"))
        n_tok = variants_ * tokens
        xs = [torch.randn(n_tok, s[1]).bfloat16() for s in LAYER_SHAPES.values()]
        ys = [torch.zeros(n_tok, s[0]).bfloat16() for s in LAYER_SHAPES.values()]

        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(repeats + 20):
            for portable in (False, True):
                dt = _layer_call(step, xs, ys, portable)
                if i >= 20:
                    times[portable].append(dt)
        entries = sum(int(a * b * (1 - rate)) for a, b in LAYER_SHAPES.values()) * n_tok
        row = {
            "variants": variants_,
            "tokens": tokens,
            "rate": rate,
            "built_ms": statistics.median(times[False]) * 1e3,
            "portable_ms": statistics.median(times[True]) * 1e3,
        }
        row["built_ns_per_entry"] = row["built_ms"] * 1e6 / entries
        row["portable_ns_per_entry"] = row["portable_ms"] * 1e6 / entries
        out.append(row)
        print(
            f"{variants_} variants x {tokens} tokens: built {row['built_ms']:.3f} ms, "
            f"portable {row['portable_ms']:.3f} ms per layer "
            f"({row['built_ns_per_entry']:.2f} / {row['portable_ns_per_entry']:.2f} "
            "ns an entry-token)"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variants", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16])
    ap.add_argument("--policies", nargs="+", default=["never", "auto"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--kernel-only", action="store_true")
    ap.add_argument(
        "--kernel-layer",
        action="store_true",
        help="one layer's products for 16x1, 8x2, 5x3, 4x4, 2x8, 1x16, 1x46 (variants x tokens): "
        "the kernel as built here against its portable build",
    )
    ap.add_argument("--kernel-rates", type=float, nargs="+", default=[0.9, 0.99])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mixed.json"))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    result: dict[str, Any] = {
        "copy_gb_per_s": copy_bandwidth(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.kernel_layer:
        cases = [(16, 1), (8, 2), (5, 3), (4, 4), (2, 8), (1, 16), (1, 46)]
        result["layer"] = layer_table(0.99, cases)
        args.out.with_name("mixed-layer.json").write_text(json.dumps(result, indent=1))
        return
    if args.kernel_only:
        result["kernel"] = kernel_table(args.kernel_rates, args.dtypes, 8)
        args.out.with_name("mixed-kernel.json").write_text(json.dumps(result, indent=1))
        return
    base_dir = ensure_embedded_base()
    store = variants(base_dir, max(args.variants), "p0.99")
    rows = []
    for dtype in args.dtypes:
        for policy in args.policies:
            settings = Settings(
                base=base_dir,
                store=store,
                device="cpu",
                dtype=dtype,
                merge_policy=policy,
                max_batch_size=args.rows,
                demo=False,
                max_new_tokens=max(args.max_tokens, 64),
            )
            engine = Engine(open_model(base_dir), DeltaStore(store), settings)
            base_tps = None
            for d in args.variants:
                run_once(engine, settings, d, args.rows, args.max_tokens)  # warm-up: layouts
                reps = [
                    run_once(engine, settings, d, args.rows, args.max_tokens)
                    for _ in range(args.repeats)
                ]
                r = (
                    reps[len(reps) // 2]
                    if len(reps) == 1
                    else min(reps, key=lambda x: x["tokens_per_s"])
                )
                r["tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in reps)
                if d == 0:
                    base_tps = r["tokens_per_s"]
                r.update(
                    dtype=dtype,
                    policy=policy,
                    variants=d,
                    vs_base=(r["tokens_per_s"] / base_tps) if base_tps else None,
                )
                rows.append(r)
                print(json.dumps(r))
    result["runs"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(rows, args.out.with_suffix(".png"))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Tokens/s against distinct variants per step, one line per dtype and policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in sorted({(r["dtype"], r["policy"]) for r in rows}):
        pts = [r for r in rows if (r["dtype"], r["policy"]) == key]
        xs = [max(r["variants"], 0.5) for r in pts]  # 0 (the base alone) at the left edge
        ax.plot(xs, [r["tokens_per_s"] for r in pts], marker="o", label=f"{key[0]}, merge {key[1]}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([0.5, 1, 2, 4, 8, 16], ["base", "1", "2", "4", "8", "16"])
    ax.set_xlabel("distinct variants among the rows of each step")
    ax.set_ylabel("generated tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Engine v2 cost curve (SmolLM2-135M, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
