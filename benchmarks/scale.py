"""Scale: compress, inspect, materialize and serve at the sizes people fine-tune, on
this machine, beside the embedded 135M base in the same run.

    python -m benchmarks.scale                      # 135m, 1b and 8b
    python -m benchmarks.scale --shapes 135m 1b     # without the 8B shape
    python -m benchmarks.scale --shapes 8b --stages compress serve

Checkpoints: a Llama-3.2-1B and a Llama-3.1-8B shape (their configs: 128k vocabulary,
GQA, llama3 rope; the 1B's head tied to its embedding as in Llama-3.2-1B, the 8B's
untied), random weights (N(0, 0.02), norms 1) as sharded bf16 safetensors with a
model.safetensors.index.json, and the embedded SmolLM2-135M-Instruct base as it is.
Each base has one fine-tune with SFT-like statistics: every tensor moved by Gaussian
noise, per tensor of std 5% of the tensor's RMS for matrices (mean |delta| ~ 8e-4 on
N(0, 0.02) weights) and 1e-3 for vectors; a relative 1e-3 would round away in bf16's
8-bit mantissa. They are written under --work (default ~/.cache/deltaserve/scale, never
in the repository) one tensor at a time, and deleted at the end unless --keep. The
tokenizer is byte-level with filler tokens up to 128k (deltastore.testing), so every
id the model can emit decodes.

Stages, each command run as a user runs it (`python -m server.cli ...`, a process of
its own), its peak memory polled from /proc every 0.1 s: peak RSS (VmHWM: every page
it touched, file pages read through mmap included) and peak RssAnon (the memory it
allocated, what must fit beside everything else):
- digest: the base's files' fingerprint, cold (what compress and the first serve
  compute once and cache beside the model);
- compress: DARE at --rate, and DAREx-q with an unlabelled q search (KL on
  --calib-tokens of deltastore/data/calib.txt, bf16, the multiples grid k(1-p) up to
  --q-max: each evaluation is a pass of the whole model) resident (135m, 1b) and with
  --stream-weights (all); file size against the dense bf16 fine-tune;
- inspect and materialize of the DARE file;
- serve: time to /ready on a first start (the fingerprint's record removed), the
  server's peak memory, the fingerprint and the digest of the resident base that it
  takes in the background (from its log), tokens/s of the base alone and with 4 and
  16 variants (uniform over them, --concurrency closed-loop clients, ignore_eos; at
  8B one request per client), the variants DARE-shaped random deltas at --serve-rate
  (--serve-rate-8b at 8B: sixteen 8B variants at p = 0.99 would not fit beside the
  base); then, in a process of its own, apply + revert of one variant on the
  resident bf16 weights beside its memory-bandwidth bound (benchmarks/swap.py's).

Before each 8B stage the memory available (/proc/meminfo) is checked against what it
needs (--need-compress-gb, --need-serve-gb); short of it the stage waits (up to
--wait-s) and is then recorded as "not measured: memory".
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from deltastore.embedded import ensure_embedded_base
from deltastore.format import Delta, DeltaMeta, TensorDelta, save_delta
from deltastore.paths import cache_dir
from deltastore.shards import Spec, write_shards
from deltastore.sources import ModelSource, fingerprint, open_model
from deltastore.testing import dare_positions, tiny_tokenizer

CALIB = Path(__file__).resolve().parent.parent / "deltastore" / "data" / "calib.txt"
GB = 1e9
PORT = 8947
PROMPT = "Tell me a story."  # short: at 8B on 2 cores prefill is ~0.1 s a token

# --------------------------------------------------------------------------- shapes

LLAMA3 = dict(
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=256,  # the byte-level tokenizer's (deltastore.testing.tiny_tokenizer)
    pad_token_id=257,
    hidden_act="silu",
    initializer_range=0.02,
)
SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(  # Llama-3.2-1B
        LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        head_dim=64,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "8b": dict(  # Llama-3.1-8B
        LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        head_dim=128,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}
SHAPES["tiny"] = dict(  # the benchmark's own smoke test: seconds
    LLAMA3,
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
)
SHARD_BYTES = 4_900_000_000  # Meta's 8B checkpoint: four shards of ~5 GB
DELTA_REL = 0.05  # the fine-tune's noise: std 5% of each matrix's RMS
DELTA_VECTOR = 1e-3


def _seed(name: str, salt: int) -> int:
    return (hash_name(name) * 1_000_003 + salt) % (1 << 62)


def hash_name(name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


POOL = 1 << 24  # random values drawn once; a tensor is slices of them from per-name offsets


@functools.cache
def _pool(salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(salt)
    return torch.randn(2 * POOL, generator=g)  # (2 POOL,): a slice of POOL from any offset


def noise(name: str, salt: int, shape: tuple[int, ...]) -> torch.Tensor:
    """N(0, 1) values of `shape` (fp32): slices of one pool at offsets drawn from the
    name, so that writing 8B of them costs copies, not 8B draws (~20 M/s on 2 cores)."""
    pool = _pool(salt)
    numel = math.prod(shape)
    out = torch.empty(numel)
    off = _seed(name, salt)
    for i, start in enumerate(range(0, numel, POOL)):
        o = (off + i * 7_919_317) % POOL
        k = min(POOL, numel - start)
        out[start : start + k] = pool[o : o + k]
    return out.view(shape)


def random_weight(spec: Spec) -> torch.Tensor:
    """The synthetic base's tensor: N(0, 0.02) matrices, norms of ones."""
    if len(spec.shape) < 2:
        return torch.ones(spec.shape, dtype=spec.dtype)
    return noise(spec.name, 0, spec.shape).mul_(0.02).to(spec.dtype)


def finetuned(w: torch.Tensor, name: str) -> torch.Tensor:
    """w moved by SFT-like noise (in fp32, stored in w's dtype)."""
    x = w.to(torch.float32, copy=True)
    std = DELTA_REL * float(x.square().mean().sqrt()) if w.dim() >= 2 else DELTA_VECTOR
    x += noise(name, 1, tuple(w.shape)).mul_(std)
    return x.to(w.dtype)


def synthetic_base(shape: str, out: Path) -> Path:
    """A base of `shape` with random weights, written once (kept across runs)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(**SHAPES[shape], dtype="bfloat16")
    cfg.save_pretrained(tmp)
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(cfg)
    skeleton.tie_weights()
    seen: set[int] = set()
    specs = []
    for name, p in skeleton.named_parameters():
        if id(p) not in seen:  # a tied head is not stored
            seen.add(id(p))
            specs.append(Spec(name, tuple(p.shape), torch.bfloat16))
    lookup = {s.name: s for s in specs}
    write_shards(tmp, specs, lambda n: random_weight(lookup[n]), SHARD_BYTES, desc=f"{shape} base")
    tiny_tokenizer(SHAPES[shape]["vocab_size"]).save_pretrained(tmp)
    tmp.rename(out)
    return out


def synthetic_finetune(base_dir: Path, out: Path) -> Path:
    """The base with every tensor moved by SFT-like noise, in the base's dtypes."""
    if (out / "config.json").is_file():
        return out
    base = open_model(base_dir)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = [Spec(n, base.shape(n), base.dtype(n)) for n in base.names()]
    write_shards(
        tmp,
        specs,
        lambda n: finetuned(base.get(n), n),
        SHARD_BYTES,
        desc=f"{base_dir.name} fine-tune",
    )
    for f in base_dir.iterdir():  # config, tokenizer, chat template
        side = f.suffix in (".json", ".txt", ".jinja") or "tokenizer" in f.name
        if f.is_file() and side and not f.name.startswith((".", "model.safetensors")):
            shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


def dense_bf16_bytes(base: ModelSource) -> int:
    return 2 * sum(math.prod(base.shape(n)) for n in base.names())


# --------------------------------------------------------------------------- processes


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GB
    return 0.0


def wait_for_memory(need_gb: float, wait_s: float, what: str) -> bool:
    """True once `need_gb` is available; False after `wait_s` without it."""
    t0 = time.time()
    while True:
        have = available_gb()
        if have >= need_gb:
            return True
        if time.time() - t0 >= wait_s:
            tqdm.write(f"{what}: {have:.1f} GB available, {need_gb} needed: not measured")
            return False
        tqdm.write(f"{what}: {have:.1f} GB available, waiting for {need_gb}")
        time.sleep(60)


class Peak:
    """A process's peak RSS and peak RssAnon, polled from /proc while it runs."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self.pid, self.rss, self.anon = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every_s,), daemon=True)
        self._thread.start()

    def _poll(self, every_s: float) -> None:
        while not self._stop.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.rss = max(self.rss, int(line.split()[1]) * 1024)
                elif line.startswith("RssAnon:"):
                    self.anon = max(self.anon, int(line.split()[1]) * 1024)
            self._stop.wait(every_s)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_gb": self.rss / GB, "peak_anon_gb": self.anon / GB}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", *args]


def timed(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run `cmd` to its end: wall seconds, peak memory (VmHWM and RssAnon, polled)."""
    t0 = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        peak = Peak(proc.pid)
        proc.wait()
    seconds = time.perf_counter() - t0
    # polled, not ru_maxrss: Linux carries the parent's high-water mark across fork
    # and exec into the child's, so a small command reads as large as this process
    mem = peak.stop()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd[2:5])} failed ({proc.returncode}):\n{tail}")
    return {"seconds": seconds, **mem}


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Run:
    shape: str
    base: Path
    ft: Path
    work: Path
    args: argparse.Namespace

    @property
    def big(self) -> bool:
        return self.shape == "8b"


def stage_digest(run: Run) -> dict[str, Any]:
    """The base's fingerprint computed as on a first start (its cached record removed),
    then cached again for the commands that follow."""
    base = open_model(run.base)
    (run.base / ".deltaserve-fingerprint.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    fingerprint(base)
    return {"fingerprint_s": time.perf_counter() - t0}


def compress_variants(run: Run) -> dict[str, list[str]]:
    a = run.args
    darex = [
        "--method",
        "darex-q",
        "--rate",
        str(a.rate),
        "--q-search",
        "unlabelled",
        "--q-grid",
        "multiples",  # k (1-p) for k = 1, 2, ...: few evaluations, each a pass of the model
        "--q-max",
        str(a.q_max),
        "--calib",
        str(CALIB),
        "--calib-tokens",
        str(a.calib_tokens),
        "--seq-len",
        str(a.seq_len),
        "--search-dtype",
        "bfloat16",
        "--no-estimate",
    ]
    out = {"dare": ["--method", "dare", "--rate", str(a.rate)]}
    if not run.big:  # the resident search holds the model: 16 GB at 8B
        out["darex-q"] = darex
    out["darex-q streamed"] = [*darex, "--stream-weights"]
    return out


def stage_compress(run: Run) -> dict[str, Any]:
    base = open_model(run.base)
    fingerprint(base)  # cached beside the base: not part of any command's time
    dense = dense_bf16_bytes(base)
    rows: dict[str, Any] = {}
    for label, flags in compress_variants(run).items():
        if run.big and not wait_for_memory(run.args.need_compress_gb, run.args.wait_s, label):
            rows[label] = {"not_measured": "memory"}
            continue
        path = run.work / f"{run.shape}-{label.replace(' ', '-')}.delta.safetensors"
        cmd = cli("compress", str(run.base), str(run.ft), "-o", str(path), "--force", *flags)
        row = timed(cmd, run.work / f"{run.shape}-{label.replace(' ', '-')}.log")
        meta = json.loads(subprocess.check_output(cli("inspect", str(path), "--json")))
        search = meta.get("q_search") or {}
        row |= {
            "file_bytes": path.stat().st_size,
            "pct_of_dense_bf16": 100 * path.stat().st_size / dense,
            "q": meta.get("q"),
            "evaluations": search.get("evaluations"),
            "search_s": search.get("seconds"),
            "path": str(path),
        }
        rows[label] = row
        tqdm.write(f"{run.shape} compress {label}: {_short(row)}")
    files = [r["path"] for k, r in rows.items() if k != "dare" and "path" in r]
    if len(files) == 2:  # resident and streamed: the same file but for its date
        same = _same_payload(Path(files[0]), Path(files[1]))
        rows["resident_equals_streamed"] = same
    return {"dense_bf16_bytes": dense, "compress": rows}


def _same_payload(a: Path, b: Path) -> bool:
    ma = json.loads(subprocess.check_output(cli("inspect", str(a), "--json")))
    mb = json.loads(subprocess.check_output(cli("inspect", str(b), "--json")))
    return bool(ma.get("payload_sha256") == mb.get("payload_sha256") and ma.get("q") == mb.get("q"))


def _short(row: dict[str, Any]) -> str:
    keys = ("seconds", "peak_rss_gb", "peak_anon_gb", "pct_of_dense_bf16", "q")
    return ", ".join(f"{k} {row[k]:.3g}" for k in keys if isinstance(row.get(k), float))


def stage_inspect_materialize(run: Run, delta: Path) -> dict[str, Any]:
    row = timed(cli("inspect", str(delta)), run.work / f"{run.shape}-inspect.log")
    out: dict[str, Any] = {"inspect": row}
    target = run.work / f"{run.shape}-materialized"
    shutil.rmtree(target, ignore_errors=True)
    if run.big and not wait_for_memory(run.args.need_compress_gb, run.args.wait_s, "materialize"):
        out["materialize"] = {"not_measured": "memory"}
        return out
    cmd = cli("materialize", str(run.base), str(delta), "-o", str(target))
    out["materialize"] = timed(cmd, run.work / f"{run.shape}-materialize.log")
    shutil.rmtree(target, ignore_errors=True)
    tqdm.write(f"{run.shape} inspect {_short(row)}; materialize {_short(out['materialize'])}")
    return out


def random_variant(base: ModelSource, path: Path, seed: int, rate: float, fp: str) -> Path:
    """A DARE-shaped delta over every matrix: each entry kept with probability 1-p
    (drawn as uniform positions), values N(0, (5% of 0.02)^2), rescaled by 1/(1-p)."""
    if path.is_file():
        return path
    tensors = {}
    for i, name in enumerate(base.names()):
        shape = base.shape(name)
        if len(shape) < 2:
            continue
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        pos = dare_positions(math.prod(shape), rate, g)
        vals = (torch.randn(pos.numel(), generator=g) * DELTA_REL * 0.02).bfloat16()
        tensors[name] = TensorDelta(name, shape, pos, vals, 1 / (1 - rate))
    meta = DeltaMeta(base_fingerprint=fp, method="dare", rate=rate, q=1 - rate)
    save_delta(path, Delta(meta, tensors))
    return path


def _serve_env(run: Run, store: Path) -> dict[str, str]:
    a = run.args
    env = {
        "DELTASERVE_PORT": str(PORT),
        "DELTASERVE_STORE": str(store),
        "DELTASERVE_DTYPE": "bfloat16",
        "DELTASERVE_MAX_BATCH_SIZE": str(a.concurrency),
        "DELTASERVE_MATERIALIZED_CACHE_BYTES": "0",  # no copies of touched tensors
        "DELTASERVE_KV_CACHE_BYTES": str(512 << 20),
    }
    if run.big:
        env["DELTASERVE_MIXED_CACHE_BYTES"] = str(2 << 30)
    return env


def load(port: int, models: list[str], max_tokens: int, concurrency: int, requests: int) -> dict:
    import asyncio
    from dataclasses import asdict

    import httpx

    from server.clients.loadtest import Workload, parse_mix
    from server.clients.loadtest import run as run_load

    url = f"http://127.0.0.1:{port}"
    for name in models:  # first use: load and lay out (not timed)
        body = {"model": name, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
        httpx.post(f"{url}/v1/completions", json=body, timeout=1800).raise_for_status()
    w = Workload(parse_mix("uniform", models), PROMPT, max_tokens, True, False, 0, 0, True)
    rep = asdict(asyncio.run(run_load(url, w, concurrency, None, requests, None, False)))
    return {
        "tokens_per_s": rep["tokens_per_s"],
        "succeeded": rep["succeeded"],
        "sent": rep["sent"],
        "tokens": sum(r["tokens"] for r in rep["results"]),
        "seconds": rep["duration_s"],
    }


def stage_serve(run: Run) -> dict[str, Any]:
    from benchmarks.servers import start, stop

    a = run.args
    if run.big and not wait_for_memory(a.need_serve_gb, a.wait_s, "serve"):
        return {"serve": {"not_measured": "memory"}}
    base = open_model(run.base)
    fp = fingerprint(base)
    store = run.work / f"{run.shape}-store"
    store.mkdir(exist_ok=True)
    names = [f"v{i:02d}" for i in range(16)]
    for i, n in enumerate(tqdm(names, desc=f"{run.shape} variants")):
        random_variant(base, store / f"{n}.delta.safetensors", i + 1, a.serve_rate, fp)
    log = run.work / f"{run.shape}-serve.log"
    # a first start: the server takes the fingerprint again, in the background
    (run.base / ".deltaserve-fingerprint.json").unlink(missing_ok=True)
    cmd = cli("serve", "--no-demo", "--base", str(run.base))
    t0 = time.perf_counter()
    proc = start(cmd, PORT, _serve_env(run, store), timeout_s=1800, log=log)
    ready = time.perf_counter() - t0
    peak = Peak(proc.pid)
    out: dict[str, Any] = {"time_to_ready_s": ready, "serve_rate": a.serve_rate}
    try:
        served = run.base.name
        mt, conc = a.max_tokens, a.concurrency
        reqs = a.requests
        load(PORT, [served], mt, conc, conc)  # warm-up: the first steps after start are slow
        out["base"] = load(PORT, [served], mt, conc, reqs)
        out["4 variants"] = load(PORT, names[:4], mt, conc, reqs)
        out["16 variants"] = load(PORT, names, mt, conc, reqs)
    finally:
        from benchmarks.servers import peak_rss

        with_rss = peak_rss(proc)
        stop(proc)
        mem = peak.stop()
    out |= mem
    out["peak_rss_gb"] = max(out["peak_rss_gb"], with_rss / GB)
    text = log.read_text(errors="replace")
    for what in ("digest", "fingerprint"):  # made in the background (server/engine/core.py)
        m = re.search(rf"base {what} taken in ([\d.]+) s", text)
        out[f"background_{what}_s"] = float(m.group(1)) if m else None
    tqdm.write(f"{run.shape} serve: {json.dumps(out)}")
    swap = _swap_child(run, store / "v00.delta.safetensors")
    return {"serve": out, "swap": swap}


def _swap_child(run: Run, delta: Path) -> dict[str, Any]:
    log = run.work / f"{run.shape}-swap.log"
    result = run.work / f"{run.shape}-swap.json"
    cmd = [sys.executable, "-m", "benchmarks.scale", "swap", str(run.base), str(delta), str(result)]
    row = timed(cmd, log)
    return {**json.loads(result.read_text()), "process_peak_anon_gb": row["peak_anon_gb"]}


def swap_main(base_dir: Path, delta_path: Path, result: Path) -> None:
    """apply + revert of one delta on the resident bf16 base (a process of its own)."""
    from benchmarks.swap import copy_bandwidth, time_swap
    from deltastore.apply import FlatWeights
    from deltastore.format import load_delta

    device = torch.device("cpu")
    base = open_model(base_dir)
    model = base.load_model(torch.bfloat16)  # as the engine loads it
    weights = FlatWeights.from_module(model, fingerprint(base))
    delta = load_delta(delta_path)
    row = time_swap(weights, delta, device, copy_bandwidth(device), repeats=5)
    result.write_text(json.dumps(row))


# --------------------------------------------------------------------------- main


def table(results: dict[str, Any]) -> str:
    def cell(row: dict[str, Any] | None, key: str, fmt: str) -> str:
        if not row:
            return "-"
        if "not_measured" in row:
            return f"not measured: {row['not_measured']}"
        v = row.get(key)
        return "-" if v is None else format(v, fmt)

    lines = [
        "| | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]

    def add(label: str, get: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(get(r) for r in results.values()) + " |")

    add("parameters", lambda r: f"{r['params'] / 1e9:.3g} B")
    add("dense bf16", lambda r: f"{r.get('dense_bf16_bytes', 0) / GB:.2f} GB")
    add("fingerprint, cold (s)", lambda r: cell(r.get("digest"), "fingerprint_s", ".1f"))
    for label in ("dare", "darex-q", "darex-q streamed"):
        c = lambda r, label=label: (r.get("compress") or {}).get(label)  # noqa: E731
        add(f"compress {label} (s)", lambda r, c=c: cell(c(r), "seconds", ".0f"))
        add("  peak RSS / anon (GB)", lambda r, c=c: _mem(c(r)))
        add("  file (% of dense bf16)", lambda r, c=c: cell(c(r), "pct_of_dense_bf16", ".2f"))
    add("inspect (s)", lambda r: cell(r.get("inspect"), "seconds", ".2f"))
    add("materialize (s)", lambda r: cell(r.get("materialize"), "seconds", ".0f"))
    add("  peak anon (GB)", lambda r: cell(r.get("materialize"), "peak_anon_gb", ".1f"))
    s = lambda r: r.get("serve")  # noqa: E731
    add("serve: time to ready (s)", lambda r: cell(s(r), "time_to_ready_s", ".1f"))
    add("  peak RSS / anon (GB)", lambda r: _mem(s(r)))
    add("  background fingerprint (s)", lambda r: cell(s(r), "background_fingerprint_s", ".1f"))
    add("  background digest (s)", lambda r: cell(s(r), "background_digest_s", ".1f"))
    for k in ("base", "4 variants", "16 variants"):
        add(f"  tokens/s, {k}", lambda r, k=k: cell((s(r) or {}).get(k), "tokens_per_s", ".1f"))
    add("swap apply+revert (ms)", lambda r: cell(r.get("swap"), "apply_revert_ms", ".0f"))
    add("  bandwidth bound (ms)", lambda r: cell(r.get("swap"), "bound_ms", ".0f"))
    return "\n".join(lines)


def _mem(row: dict[str, Any] | None) -> str:
    if not row:
        return "-"
    if "not_measured" in row:
        return f"not measured: {row['not_measured']}"
    if "peak_rss_gb" not in row:
        return "-"
    return f"{row['peak_rss_gb']:.1f} / {row['peak_anon_gb']:.1f}"


STAGES = ("digest", "compress", "materialize", "serve")


def run_shape(shape: str, args: argparse.Namespace, smol: Path) -> dict[str, Any]:
    """Every stage asked for, on one shape's base and fine-tune."""
    work = args.work
    base_dir = smol if shape == "135m" else synthetic_base(shape, work / f"llama-{shape}")
    ft_dir = work / f"{shape}-ft"
    if "compress" in args.stages:  # only compress reads the fine-tune
        synthetic_finetune(base_dir, ft_dir)
    base = open_model(base_dir)
    run = Run(shape, base_dir, ft_dir, work, args)
    result: dict[str, Any] = {"params": sum(math.prod(base.shape(n)) for n in base.names())}
    result["dense_bf16_bytes"] = dense_bf16_bytes(base)
    if "digest" in args.stages:
        result["digest"] = stage_digest(run)
    if "compress" in args.stages:
        result |= stage_compress(run)
        if run.big and not args.keep:  # compress alone reads it: room on disk to materialize
            shutil.rmtree(ft_dir, ignore_errors=True)
    dare = work / f"{shape}-dare.delta.safetensors"
    if "materialize" in args.stages and dare.is_file():
        result |= stage_inspect_materialize(run, dare)
    if "serve" in args.stages:
        result |= stage_serve(run)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "swap":  # the swap stage's own process
        swap_main(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", nargs="+", default=["135m", "1b", "8b"], choices=["135m", *SHAPES])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--work", type=Path, default=cache_dir() / "scale", help="checkpoints here")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--rate", type=float, default=0.99, help="compress's drop rate p")
    ap.add_argument("--serve-rate", type=float, default=0.99, help="the served variants' p")
    ap.add_argument("--serve-rate-8b", type=float, default=0.999, help="at 8B (memory)")
    ap.add_argument("--calib-tokens", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--q-max", type=float, default=0.05, help="q searched up to (5 at p=0.99)")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens per request")
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    ap.add_argument("--requests", type=int, default=32, help="requests per load")
    ap.add_argument("--need-compress-gb", type=float, default=14.0)
    ap.add_argument("--need-serve-gb", type=float, default=19.0)
    ap.add_argument("--wait-s", type=float, default=1200.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("HF_HUB_OFFLINE"):
        os.environ["HF_HUB_OFFLINE"] = "1"  # every model here is local
    smol = ensure_embedded_base()
    results: dict[str, Any] = {}
    if args.out.is_file():  # shapes run earlier (one at a time) stay in the table
        results = json.loads(args.out.read_text()).get("shapes", {})
    try:
        for shape in tqdm(args.shapes, desc="shapes"):
            sub = argparse.Namespace(**vars(args))
            if shape == "8b":
                sub.serve_rate = args.serve_rate_8b
                sub.requests = args.concurrency  # one request per client
            # stages run now replace their rows; the shape's other stages stay
            results[shape] = results.get(shape, {}) | run_shape(shape, sub, smol)
            _write(args, results)
    finally:
        if not args.keep:
            for shape in args.shapes:
                shutil.rmtree(args.work / f"llama-{shape}", ignore_errors=True)
                shutil.rmtree(args.work / f"{shape}-ft", ignore_errors=True)
    print(table({k: results[k] for k in ("135m", "1b", "8b", "tiny") if k in results}))


def _write(args: argparse.Namespace, results: dict[str, Any]) -> None:
    info = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "shapes": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
