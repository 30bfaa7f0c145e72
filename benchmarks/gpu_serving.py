"""Engine v2 on a GPU: the base alone against N Zipf variants in mixed steps, and the
sparse product against the dense GEMM and the memory-bandwidth bound.

    python -m benchmarks.gpu_serving                          # llama-1b shape, on cuda
    python -m benchmarks.gpu_serving --shape llama-8b --variants 16 --concurrency 32
    python -m benchmarks.gpu_serving --device cpu --shape tiny --variants 2 \\
        --rates 0.99 --concurrency 4 --requests 8 --max-tokens 8   # the plumbing, on a CPU

The base is a synthetic checkpoint of the named shape (random bf16 weights, sharded
safetensors, a byte-level tokenizer padded to the vocabulary), so the check needs
nothing from a model hub; tokens are meaningless and every request generates
--max-tokens (ignore_eos). The variants are full fine-tunes: every tensor, the
embedding included, with a delta kept at rate p (random positions, SFT-scale values,
rescaled by 1/(1-p)), each variant its own positions. Cached under
~/.cache/deltaserve/bench/gpu.

Serving rows: for each concurrency, the base alone, then N variants at each p (each
server in its own process on 127.0.0.1, one warm-up request per model for the 16 most
popular, then --requests streamed completions from closed-loop clients, models drawn
from Zipf(1.0)). Kernel rows (--kernel, on by default): per matrix shape of the model,
the sparse product of d distinct variants (one token each) against the dense GEMM of
the same d rows, as time and as bytes read per second (entries at 4 bytes plus
rowptr; the dense weights at 2 bytes each).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.servers import load, start, stop
from deltastore.format import Delta, DeltaMeta, TensorDelta, save_delta
from deltastore.paths import cache_dir
from deltastore.sources import fingerprint, open_model
from deltastore.testing import tiny_tokenizer
from server.engine.kernels.layout import CSR, pack
from server.engine.sparse import Matrix, Segment, StepDeltas, VariantLayout

PORT = 8961
GiB = 1 << 30
PROMPT = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle, "
    "the storm that follows, and the ship that comes to the island at dawn."
)
# shapes of models people fine-tune (Llama 3.2 1B ties its head; 3.1 8B does not)
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}


def synthetic_base(shape: str, device: torch.device) -> Path:
    """A checkpoint of `shape` with random bf16 weights (made once, then cached)."""
    out = cache_dir() / "bench" / "gpu" / shape / "base"
    if (out / "config.json").is_file():
        return out
    cfg = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=4096,
        eos_token_id=256,
        pad_token_id=257,
        bos_token_id=None,
        torch_dtype="bfloat16",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    tmp = out.with_name("base.tmp")
    model.save_pretrained(tmp, max_shard_size="2GB")
    tiny_tokenizer(cfg.vocab_size).save_pretrained(tmp)
    tmp.rename(out)
    return out


def synthetic_deltas(base_dir: Path, n: int, rate: float, device: torch.device) -> Path:
    """A store of n full-fine-tune deltas at `rate` (made once each, then cached)."""
    store = base_dir.parent / f"deltas-p{rate}-n{n}"
    pool = base_dir.parent / f"pool-p{rate}"
    pool.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    src = open_model(base_dir)
    fp = fingerprint(src)
    for i in tqdm(range(n), desc=f"variants at p = {rate}"):
        path = pool / f"v{i:02d}.delta.safetensors"
        if not path.is_file():
            g = torch.Generator(device).manual_seed(1000 + i)
            tensors = {}
            for name in src.names():
                shape = src.shape(name)
                numel = int(torch.Size(shape).numel())
                k = max(1, round(numel * (1 - rate)))
                pos = torch.randint(numel, (k,), generator=g, device=device).unique()
                vals = torch.randn(pos.numel(), generator=g, device=device) * 2.5e-4
                tensors[name] = TensorDelta(
                    name, tuple(shape), pos.cpu(), vals.bfloat16().cpu(), 1 / (1 - rate)
                )
            meta = DeltaMeta(base_fingerprint=fp, method="dare", rate=rate, q=1 - rate)
            save_delta(path, Delta(meta, tensors))
        link = store / path.name
        if not link.exists():
            link.hardlink_to(path)
    return store


def sync(t: torch.Tensor) -> None:
    """Wait for the device (any device: a read of one value)."""
    float(t.reshape(-1)[0])


def timed(fn: Any, out: torch.Tensor, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    sync(out)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(out)
    return (time.perf_counter() - t0) / repeats


def kernel_rows(shape: str, rate: float, variants: list[int], device: torch.device) -> list[dict]:
    """The sparse product of d one-token variants per matrix shape, against the GEMM."""
    cfg = SHAPES[shape]
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    shapes = {
        "qkv": (h + 2 * cfg["num_key_value_heads"] * hd, h),
        "o": (h, h),
        "gate_up": (2 * inter, h),
        "down": (h, inter),
        "head": (cfg["vocab_size"], h),
    }
    rows = []
    g = torch.Generator().manual_seed(0)
    for label, (out_f, in_f) in shapes.items():
        n = out_f * in_f
        k = max(1, round(n * (1 - rate)))
        w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(device, torch.bfloat16)
        for d in variants:
            layouts = []
            for v in range(d):
                pos = torch.randint(n, (k,), generator=g).unique()
                csr = CSR.from_positions(
                    pos, torch.randn(pos.numel(), generator=g).bfloat16(), 1.0, (out_f, in_f)
                )
                data = pack({0: csr}, 1).to(device)
                layouts.append(
                    VariantLayout(f"v{v}", data, None, {"w": Matrix(0, (out_f, in_f), csr.count)})
                )
            step = StepDeltas.build([Segment(i, i + 1, layouts[i], 1.0) for i in range(d)], device)
            x = torch.randn(d, in_f, generator=g).to(device, torch.bfloat16)
            y = torch.nn.functional.linear(x, w)
            dense = timed(lambda x=x, w=w: torch.nn.functional.linear(x, w), y)
            sparse = timed(lambda x=x, y=y, step=step: step.spmm_add_(y, x, 0), y)
            sparse_bytes = sum(lay.nbytes for lay in layouts)
            rows.append(
                {
                    "matrix": label,
                    "shape": [out_f, in_f],
                    "rate": rate,
                    "variants": d,
                    "dense_us": dense * 1e6,
                    "sparse_us": sparse * 1e6,
                    "sparse_over_dense": sparse / dense,
                    "dense_gb_per_s": out_f * in_f * 2 / dense / 1e9,
                    "sparse_gb_per_s": sparse_bytes / sparse / 1e9,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def serve_cmd(base: Path, store: Path, device: str, concurrency: int, max_tokens: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--base",
        str(base),
        "--store",
        str(store),
        "--no-demo",
        "--port",
        str(PORT),
        "--device",
        device,
        "--dtype",
        "bfloat16",
        "--delta-kernel",
        "native",
        "--max-batch-size",
        str(concurrency),
        "--queue-limit",
        str(4 * concurrency),
        "--max-prompt-tokens",
        "256",
        "--max-new-tokens",
        str(max_tokens),
        "--kv-cache-bytes",
        str(16 * GiB if device == "cuda" else GiB),
        "--mixed-cache-bytes",
        str(32 * GiB if device == "cuda" else GiB),
        "--device-delta-cache-bytes",
        str(8 * GiB if device == "cuda" else GiB),
        "--host-delta-cache-bytes",
        str(32 * GiB if device == "cuda" else 4 * GiB),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--variants", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.99, 0.999])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--requests", type=int, default=256, help="completions per row")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per completion")
    ap.add_argument("--no-kernel", action="store_true", help="skip the kernel rows")
    ap.add_argument("--no-serving", action="store_true", help="skip the serving rows")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu to check the plumbing")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "shape": args.shape,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "kernel": [],
        "serving": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1))  # partial results survive a stop

    if not args.no_kernel:
        for rate in args.rates:
            result["kernel"] += kernel_rows(args.shape, rate, [1, 16], device)
            save()
    if not args.no_serving:
        base = synthetic_base(args.shape, device)
        empty = base.parent / "empty"
        empty.mkdir(exist_ok=True)
        stores = {
            (n, r): synthetic_deltas(base, n, r, device) for n in args.variants for r in args.rates
        }
        logs = args.out.parent / "gpu-logs"
        logs.mkdir(exist_ok=True)
        for c in args.concurrency:
            configs = [("base alone", empty, [base.name])]
            for (n, r), store in stores.items():
                configs.append(
                    (f"{n} full fine-tunes, p = {r}", store, [f"v{i:02d}" for i in range(n)])
                )
            for label, store, models in configs:
                cmd = serve_cmd(base, store, args.device, c, args.max_tokens)
                log = logs / f"{label.replace(' ', '_').replace(',', '').replace('=', '')}-c{c}.log"
                proc = start(cmd, PORT, log=log, timeout_s=1800)
                try:
                    row = load(PORT, models, PROMPT, args.max_tokens, c, args.requests)
                finally:
                    stop(proc)
                row = {"config": label, "concurrency": c, "models": len(models), **row}
                print(json.dumps(row), flush=True)
                result["serving"].append(row)
                save()
    save()
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    lines = []
    if result["kernel"]:
        lines += [
            "| matrix | shape | p | variants | dense GEMM (us) | sparse (us) | sparse / dense "
            "| dense GB/s | sparse GB/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["kernel"]:
            shape = f"{r['shape'][0]}x{r['shape'][1]}"
            lines.append(
                f"| {r['matrix']} | {shape} | {r['rate']} | {r['variants']} "
                f"| {r['dense_us']:.1f} | {r['sparse_us']:.1f} | {r['sparse_over_dense']:.2f} "
                f"| {r['dense_gb_per_s']:.0f} | {r['sparse_gb_per_s']:.0f} |"
            )
        lines.append("")
    if result["serving"]:
        lines += [
            "| concurrency | configuration | tokens/s | × base alone | TTFT p50 / p99 (ms) "
            "| e2e p50 / p99 (ms) |",
            "|---|---|---|---|---|---|",
        ]
        base = {
            r["concurrency"]: r["tokens_per_s"]
            for r in result["serving"]
            if r["config"] == "base alone"
        }
        for r in result["serving"]:
            ref = base.get(r["concurrency"])
            ratio = f"{r['tokens_per_s'] / ref:.2f}" if ref else "-"
            t, e = r["ttft_ms"], r["e2e_ms"]
            lines.append(
                f"| {r['concurrency']} | {r['config']} | {r['tokens_per_s']:.0f} | {ratio} "
                f"| {t.get('p50', 0):.0f} / {t.get('p99', 0):.0f} "
                f"| {e.get('p50', 0):.0f} / {e.get('p99', 0):.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
