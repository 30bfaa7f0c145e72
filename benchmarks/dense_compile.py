"""The dense part of a decode step: eager against torch.compile and deltaserve's own
dense kernel, beside the weight-read floor.

    python -m benchmarks.dense_compile                      # rows 8 16 32 64
    python -m benchmarks.dense_compile --rows 1 4 8 16 32 --modes eager kernel

In process, the embedded base's own weights in bf16 (the CPU default), laid out as
the runner computes them: per layer one q/k/v product, o, one gate/up product and
down (q/k/v and gate/up fused, as the runner's contiguous weights allow), then the
tied head over the vocabulary. Attention is left out (a stand-in takes the q rows
through o), so what is timed is the GEMMs every decode step runs whatever its
variants, at M rows (one per running sequence). Modes:
- eager: torch's bf16 GEMM (oneDNN), as the runner calls it;
- default: torch.compile (inductor), default mode;
- max-autotune: torch.compile with inductor's CPU GEMM templates benchmarked against
  the ATen GEMM per shape, weights frozen (inductor's `freezing`), so they may be
  pre-packed. Frozen weights are constants of the compiled graph: a variant merged
  in place afterwards would not be seen, so the server could not use this mode as is;
- max-autotune-live: the same without freezing (weights stay inputs the merge policy
  may change in place);
- kernel: the products by the engine's dense CPU kernel (kernels.decode_kernels, as
  the runner calls it with --decode-kernels auto: bf16 on a CPU with AVX512-BF16, up
  to DENSE_KERNEL_ROWS rows; torch's GEMM past that).
Reported per mode and M: the median of --repeats timed calls (after warm-up), the
ratio to eager, and the ratio to the weight-read floor: the weights' bytes over the
read rate of a plain sum over 512 MiB measured in the same run (`x floor`), and over
half the copy bandwidth (`x copy floor`, the floor this table used first: a copy moves
each byte twice, so it is the lower rate). Writes --out (JSON) and prints a table.
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

from benchmarks.mixed import copy_bandwidth
from deltastore.embedded import ensure_embedded_base
from server.engine.kernels import decode_kernels

MODES = ("eager", "default", "max-autotune", "max-autotune-live", "kernel")


class DenseStep(torch.nn.Module):
    """The step's dense GEMMs over M rows (see the module's docstring)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        cfg = model.config
        self.hidden = cfg.hidden_size
        self.inter = cfg.intermediate_size
        ws: list[torch.Tensor] = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            ws.append(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            ws.append(a.o_proj.weight)
            ws.append(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
            ws.append(m.down_proj.weight)
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(w.detach().contiguous(), requires_grad=False) for w in ws]
        )
        self.head = torch.nn.Parameter(
            model.lm_head.weight.detach().contiguous(), requires_grad=False
        )

    @property
    def nbytes(self) -> int:
        return sum(int(w.nbytes) for w in self.weights) + int(self.head.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, torch.nn.functional.linear)

    def run(self, x: torch.Tensor, linear: Any) -> torch.Tensor:
        h = x
        for i in range(0, len(self.weights), 4):
            qkv, o, gate_up, down = (self.weights[i + j] for j in range(4))
            q = linear(h, qkv, None)[:, : self.hidden].contiguous()  # attention's stand-in
            h = h + linear(q, o, None)
            g, u = linear(h, gate_up, None).split(self.inter, dim=-1)
            h = h + linear(torch.nn.functional.silu(g) * u, down, None)
        return linear(h, self.head, None)


def _compiled(step: DenseStep, mode: str) -> Any:
    if mode == "eager":
        return step
    if mode == "kernel":
        linear, _ = decode_kernels("auto", torch.device("cpu"), torch.bfloat16)
        if linear is torch.nn.functional.linear:
            raise SystemExit("the dense kernel is not built on this machine (no AVX512-BF16)")
        return lambda x: step.run(x, linear)
    import torch._inductor.config as inductor

    inductor.freezing = mode == "max-autotune"
    how = {"default": None, "max-autotune-live": "max-autotune"}.get(mode, mode)
    return torch.compile(step, mode=how, dynamic=False)


def read_bandwidth() -> float:
    """GB/s of a plain read: an int64 sum over 512 MiB (on torch's threads), median of 5."""
    src = torch.ones(1 << 26, dtype=torch.int64)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t)
    return src.nbytes / statistics.median(times[1:]) / 1e9


def _time(fn: Any, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(5):
            fn(x)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dense_compile.json"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ensure_embedded_base(), dtype=torch.bfloat16)
    step = DenseStep(model).eval()
    del model
    gbps = copy_bandwidth()
    copy_floor = step.nbytes / (gbps / 2 * 1e9)  # copy_bandwidth counts reads and writes
    read = read_bandwidth()
    floor = step.nbytes / (read * 1e9)
    rows_out: list[dict[str, Any]] = []
    work = [(mode, m) for mode in args.modes for m in args.rows]
    fns: dict[str, Any] = {}
    for mode, m in tqdm(work, desc="mode x rows"):
        x = torch.randn(m, step.hidden, dtype=torch.bfloat16)
        if mode not in fns:
            fns[mode] = _compiled(step, mode)
        t0 = time.perf_counter()
        with torch.inference_mode():
            fns[mode](x)  # compiles for this M (dynamic=False: one graph per shape)
        first = time.perf_counter() - t0
        t = _time(fns[mode], x, args.repeats)
        rows_out.append({"mode": mode, "rows": m, "ms": t * 1e3, "first_call_s": first})
    eager = {r["rows"]: r["ms"] for r in rows_out if r["mode"] == "eager"}
    print(
        f"weights {step.nbytes / 2**20:.0f} MiB, read {read:.1f} GB/s (floor "
        f"{floor * 1e3:.2f} ms), copy {gbps:.1f} GB/s (floor {copy_floor * 1e3:.2f} ms)"
    )
    print("| mode | rows | ms | × eager | × floor | × copy floor | first call (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows_out:
        r["x_floor"] = r["ms"] / (floor * 1e3)
        r["x_copy_floor"] = r["ms"] / (copy_floor * 1e3)
        r["x_eager"] = r["ms"] / eager[r["rows"]] if r["rows"] in eager else None
        xe = f"{r['x_eager']:.2f}" if r["x_eager"] is not None else "–"
        print(
            f"| {r['mode']} | {r['rows']} | {r['ms']:.2f} | {xe} | {r['x_floor']:.2f} "
            f"| {r['x_copy_floor']:.2f} | {r['first_call_s']:.1f} |"
        )
    result = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "copy_gb_per_s": gbps,
        "read_gb_per_s": read,
        "weight_bytes": step.nbytes,
        "floor_ms": floor * 1e3,
        "copy_floor_ms": copy_floor * 1e3,
        "rows": rows_out,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
