"""Swap time: apply+revert of a SmolLM2-135M delta beside its memory-bandwidth bound.

    python -m benchmarks.swap [--rates 0.9 0.99] [--dtypes float32 bfloat16] [--device auto]

For each rate: compress a real fine-tune of the embedded base with DARE, then time
apply_delta_ + revert_delta_ on the resident weights (median of --repeats, after
warm-ups), beside
- the bound: bytes moved / copy bandwidth measured in the same run, where every
  touched weight costs a whole cache line (64 B on CPU, a 32 B sector on GPU) read
  and written, plus the index, value and undo-log bytes actually streamed;
- the same work done one tensor at a time with the same primitives (the per-tensor
  loop the flat layout replaces);
- one random-access gather pass over the same positions: apply+revert needs at
  least three such passes (gather, scatter, scatter back), the practical floor of
  these primitives on this machine;
- the file size beside the dense fine-tune.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltastore.apply import BoundDelta, FlatWeights, apply_delta_, bind, revert_delta_
from deltastore.compress import CompressOptions, compress
from deltastore.embedded import ensure_embedded_base
from deltastore.finetune import FinetuneConfig, finetune
from deltastore.format import Delta, load_delta, save_delta
from deltastore.methods import Method
from deltastore.paths import cache_dir
from deltastore.sources import fingerprint, open_finetune, open_model
from deltastore.tasks import arithmetic


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3
) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 512 << 20, repeats: int = 10) -> float:
    """Bytes per second of a large device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / t


def lines_touched(bound_index: torch.Tensor, elem: int, line: int) -> int:
    return int(torch.unique_consecutive((bound_index * elem) // line).numel())


def per_tensor_swap(weights: FlatWeights, delta: Delta, device: torch.device) -> Callable[[], None]:
    """The same arithmetic one tensor at a time: the layout the flat buffer replaces."""
    parts = [
        (
            weights.tensor(t.name).view(-1),
            t.positions.to(device),
            (t.values.to(torch.float32) * t.scale).to(device),
        )
        for t in delta.tensors.values()
    ]

    def run() -> None:
        undo = []
        for view, pos, vals in parts:
            old = torch.take(view, pos)
            view.index_put_((pos,), torch.add(old.to(torch.float32), vals).to(view.dtype))
            undo.append(old)
        for (view, pos, _), old in zip(parts, undo, strict=True):
            view.index_put_((pos,), old)

    return run


def bytes_moved(bd: BoundDelta, elem: int, line: int) -> tuple[int, int]:
    """(bytes one apply + revert moves, cache lines touched): apply reads index and fp32
    values and writes the undo log, revert reads index and undo log; each touched line
    is read and written once in each."""
    k = bd.count
    lines = sum(lines_touched(g.index, elem, line) for g in bd.groups)
    return (8 + 4 + elem) * k + (8 + elem) * k + 2 * (2 * line * lines), lines


def time_swap(
    weights: FlatWeights, delta: Delta, device: torch.device, bw: float, repeats: int
) -> dict[str, float]:
    bd = bind(delta, weights)
    elem = weights.buffers[0].element_size()
    line = 32 if device.type == "cuda" else 64
    k = bd.count
    moved, lines = bytes_moved(bd, elem, line)
    t_swap = median_time(lambda: revert_delta_(weights, apply_delta_(weights, bd)), device, repeats)
    t_loop = median_time(per_tensor_swap(weights, delta, device), device, repeats)
    flat, index = weights.buffers[bd.groups[0].group], bd.groups[0].index
    t_pass = median_time(lambda: torch.take(flat, index), device, repeats)
    return {
        "kept": k,
        "lines": lines,
        "tensors": len(delta.tensors),
        "bytes_moved": moved,
        "bound_ms": 1e3 * moved / bw,
        "apply_revert_ms": 1e3 * t_swap,
        "per_tensor_ms": 1e3 * t_loop,
        "ratio_to_bound": t_swap * bw / moved,
        "gather_pass_ms": 1e3 * t_pass,
    }


def markdown(rows: list[dict[str, float]]) -> str:
    out = [
        "| dtype | p | kept | bound (ms) | apply+revert (ms) | x bound "
        "| per-tensor loop (ms) | one gather pass (ms) | file | vs dense bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['dtype']} | {r['rate']} | {r['kept']:,} | {r['bound_ms']:.1f} "
            f"| {r['apply_revert_ms']:.1f} | {r['ratio_to_bound']:.2f} "
            f"| {r['per_tensor_ms']:.1f} | {r['gather_pass_ms']:.1f} "
            f"| {r['file_bytes'] / 1e6:.2f} MB "
            f"| {100 * r['file_vs_dense_bf16']:.2f}% |"
        )
    return "\n".join(out)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rates", type=float, nargs="+", default=[0.9, 0.99])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30, help="fine-tune steps (benchmark variant)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/swap.json"))
    args = ap.parse_args()
    device = pick_device(args.device)

    base_dir = ensure_embedded_base()
    work = cache_dir() / "bench"
    ft_dir = finetune(
        base_dir,
        arithmetic(512),
        work / "finetunes" / "arith-adamw",
        FinetuneConfig(steps=args.steps),
        desc="fine-tune (benchmark variant)",
    )
    base = open_model(base_dir)
    ft = open_finetune(base, ft_dir)
    dense_bf16 = 2 * sum(torch.Size(base.shape(n)).numel() for n in base.names())

    deltas: dict[float, tuple[Delta, int]] = {}
    for rate in args.rates:
        path = work / f"swap-dare-{rate}.delta.safetensors"
        save_delta(path, compress(base, ft, CompressOptions(method=Method.DARE, rate=rate)))
        deltas[rate] = (load_delta(path), path.stat().st_size)

    bw = copy_bandwidth(device)
    fp = fingerprint(base)
    rows = []
    for dtype_name in args.dtypes:
        model = base.load_model(getattr(torch, dtype_name)).to(device)
        weights = FlatWeights.from_module(model, fingerprint=fp)
        for rate, (delta, size) in tqdm(deltas.items(), desc=f"time {dtype_name}"):
            row = time_swap(weights, delta, device, bw, args.repeats)
            row |= {"dtype": dtype_name, "rate": rate, "file_bytes": size}
            row["file_vs_dense_bf16"] = size / dense_bf16
            rows.append(row)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    info = {
        "device": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "copy_bandwidth_GBps": bw / 1e9,
        "dense_bf16_bytes": dense_bf16,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2))
    print(f"\ndevice {name}, {info['threads']} threads, copy {bw / 1e9:.1f} GB/s")
    print(markdown(rows))


if __name__ == "__main__":
    main()
