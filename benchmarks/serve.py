"""Serving: time to ready, swap time per switch, and tokens/s beside plain transformers.

    python -m benchmarks.serve [--repeats 5] [--max-tokens 64]

On the embedded base (fp32 on CPU, bf16 on CUDA) with two task variants
(`arith`, `json-extract` from benchmarks/task_deltas.py, the demos of the time):
1. time to ready: `deltaserve serve` started as a user starts it (a subprocess,
   demo variants already made), from process start to /ready answering 200;
2. swap per switch between the two variants, in the engine: cached (materialized:
   rebinding parameter storage) vs in place (revert one delta, apply the other),
   beside the memory-bandwidth bound of that revert + apply (benchmarks/swap.py);
3. tokens/s for one variant, greedy: deltaserve over HTTP (one request at a time,
   and 8 concurrent) vs plain `transformers` generate on the same fine-tune
   materialized as an ordinary model directory, same prompts, same tokens (checked).
   The demo variants answer in a few tokens, which would time prefill and HTTP, not
   decoding; so this variant is an SFT-scale delta (Laplace, mean |delta| 2e-4, DARE
   p = 0.99) that keeps the base's behaviour and writes the full --max-tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from benchmarks.servers import start, stop
from benchmarks.swap import bytes_moved, copy_bandwidth
from benchmarks.task_deltas import task_deltas
from deltastore.embedded import ensure_embedded_base
from deltastore.finetune import format_prompt
from deltastore.format import Delta, DeltaMeta, TensorDelta, load_delta, save_delta
from deltastore.materialize import materialize
from deltastore.sources import fingerprint, open_model
from deltastore.store import DeltaStore
from deltastore.testing import dare_positions
from server.config import Settings
from server.engine.core import Engine

NAMES = ("arith", "json-extract")  # the two demos when these figures were measured
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _store_with_demos(root: Path, base_dir: Path) -> Path:
    store = root / "store"
    store.mkdir()
    for name, path in task_deltas(base_dir, NAMES).items():
        shutil.copy(path, store / f"{name}.delta.safetensors")
    return store


PORT = 8931


def start_server(store: Path, *flags: str) -> subprocess.Popen[bytes]:
    """`deltaserve serve` as a user starts it, in its own process; returns once ready."""
    env = {"DELTASERVE_PORT": str(PORT), "DELTASERVE_STORE": str(store)}
    cmd = [sys.executable, "-m", "server.cli", "serve", "--no-demo", *flags]
    return start(cmd, PORT, env, timeout_s=300)


def time_to_ready(store: Path, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = start_server(store)
        times.append(time.perf_counter() - t0)
        stop(proc)
    return times


def swap_times(base_dir: Path, store: Path, repeats: int) -> dict[str, float]:
    names = list(NAMES)
    out: dict[str, float] = {}
    for label, budget in (("materialized", 2 << 30), ("inplace", 0)):
        engine = Engine(
            open_model(base_dir),
            DeltaStore(store),
            Settings(base=base_dir, store=store, materialized_cache_bytes=budget),
        )
        for n in names:  # first use: load, lay out, materialize (not timed)
            engine.activate(n)
        times = []
        for i in range(repeats * 2):
            swap = engine.activate(names[i % 2])
            assert swap.switched and swap.mode.value == label
            times.append(swap.seconds)
        out[f"{label}_ms"] = 1e3 * statistics.median(times)
        if label == "inplace":
            elem = engine.weights.buffers[0].element_size()
            line = 32 if engine.device.type == "cuda" else 64
            bounds = [bytes_moved(engine.bound(n), elem, line)[0] for n in names]
            out["bound_ms"] = 1e3 * statistics.mean(bounds) / copy_bandwidth(engine.device)
            out["device"] = str(engine.device)
            out["dtype"] = str(engine.dtype).removeprefix("torch.")
        del engine
    return out


def synthetic_variant(base_dir: Path, path: Path, seed: int = 0, rate: float = 0.99) -> Path:
    """An SFT-scale delta over every matrix (Laplace, mean |delta| 2e-4), DARE at `rate`:
    the kept entries drawn directly (uniform positions, Laplace values, scaled 1/(1-p)),
    as DARE keeps them from a dense delta of that distribution."""
    src = open_model(base_dir)
    tensors = {}
    for i, name in enumerate(src.names()):
        shape = src.shape(name)
        if len(shape) < 2:
            continue
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        pos = dare_positions(math.prod(shape), rate, g)
        d = torch.empty(pos.numel()).exponential_(generator=g) * 2e-4
        d *= torch.randint(0, 2, d.shape, generator=g) * 2 - 1  # Laplace: signed exponential
        tensors[name] = TensorDelta(name, shape, pos, d.bfloat16(), 1 / (1 - rate))
    meta = DeltaMeta(base_fingerprint=fingerprint(src), method="dare", rate=rate, q=1 - rate)
    save_delta(path, Delta(meta, tensors))
    return path


def tokens_per_second(
    base_dir: Path, store: Path, root: Path, max_tokens: int, repeats: int
) -> dict[str, object]:
    variant = "long-form"
    synthetic_variant(base_dir, store / f"{variant}.delta.safetensors")
    src = open_model(base_dir)
    tok = src.load_tokenizer()
    prompts = [PROMPT] + [f"{PROMPT} Make it number {i}." for i in range(1, 8)]
    # plain transformers on the same fine-tune, materialized as an ordinary model
    hf_dir = materialize(
        src, load_delta(store / f"{variant}.delta.safetensors"), root / "hf", progress=False
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = open_model(hf_dir).load_model(dtype).to(device)

    def hf_generate(prompt: str) -> tuple[str, int, float]:
        text = format_prompt(tok, prompt, chat=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
        dt = time.perf_counter() - t0
        new = out[0, ids.shape[1] :]
        return tok.decode(new, skip_special_tokens=True), int((new != tok.eos_token_id).sum()), dt

    hf_generate(PROMPT)  # warm-up
    hf_runs = [hf_generate(PROMPT) for _ in range(repeats)]
    t0 = time.perf_counter()
    hf_batch = [hf_generate(p) for p in prompts]  # one after another: plain generate serves one
    hf_batch_s = time.perf_counter() - t0

    proc = start_server(store)
    client = httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=600)

    def ds_generate(prompt: str) -> tuple[str, int, float]:
        body = {
            "model": variant,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        t0 = time.perf_counter()
        r = client.post("/v1/chat/completions", json=body).json()
        dt = time.perf_counter() - t0
        return r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"], dt

    try:
        ds_generate(PROMPT)  # warm-up (first use materializes the variant)
        ds_runs = [ds_generate(PROMPT) for _ in range(repeats)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            ds_batch = list(pool.map(ds_generate, prompts))
        ds_batch_s = time.perf_counter() - t0
    finally:
        client.close()
        stop(proc)
    counts = {n for _, n, _ in hf_runs + ds_runs + hf_batch + ds_batch}
    if counts != {max_tokens}:
        raise RuntimeError(f"runs generated {counts} tokens, not {max_tokens} each")
    same = hf_runs[0][0] == ds_runs[0][0]
    same_batch = sum(a[0] == b[0] for a, b in zip(hf_batch, ds_batch, strict=True))
    single_hf = statistics.median(n / dt for _, n, dt in hf_runs)
    single_ds = statistics.median(n / dt for _, n, dt in ds_runs)
    return {
        "tokens": hf_runs[0][1],
        "same_text": same,
        "same_text_8": f"{same_batch}/8",
        "single_hf_tok_s": single_hf,
        "single_ds_tok_s": single_ds,
        "concurrent8_hf_tok_s": sum(n for _, n, _ in hf_batch) / hf_batch_s,
        "concurrent8_ds_tok_s": sum(n for _, n, _ in ds_batch) / ds_batch_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    args = ap.parse_args()
    base_dir = ensure_embedded_base()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = _store_with_demos(root, base_dir)
        ready = time_to_ready(store, 3)
        swaps = swap_times(base_dir, store, args.repeats * 4)
        tps = tokens_per_second(base_dir, store, root, args.max_tokens, args.repeats)
    result = {
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "time_to_ready_s": ready,
        "swap": swaps,
        "tokens_per_s": tps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    rows = [
        ("time to ready (median of 3)", f"{statistics.median(ready):.2f} s"),
        ("swap, materialized (rebind)", f"{swaps['materialized_ms']:.3f} ms"),
        ("swap, in place (revert + apply)", f"{swaps['inplace_ms']:.1f} ms"),
        ("bound of that revert + apply", f"{swaps['bound_ms']:.1f} ms"),
        ("tokens/s, one request: deltaserve", f"{tps['single_ds_tok_s']:.1f}"),
        ("tokens/s, one request: transformers", f"{tps['single_hf_tok_s']:.1f}"),
        ("tokens/s, 8 requests: deltaserve", f"{tps['concurrent8_ds_tok_s']:.1f}"),
        ("tokens/s, 8 requests: transformers", f"{tps['concurrent8_hf_tok_s']:.1f}"),
    ]
    print("\n| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
