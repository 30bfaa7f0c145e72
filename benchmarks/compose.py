"""Compositions of fine-tunes of the embedded base: what each task keeps under
sum / ties / dare-merge, and what serving compositions costs.

Three fine-tunes on different tasks (`arith`, `json-extract` and `topic`,
benchmarks/task_deltas.py: 30 AdamW steps, DAREx-q at p = 0.99, q searched on text),
each pair composed by every method (weights 1). For each task, the accuracy (greedy
exact match through the chat template, 50 held-out test rows from
benchmarks/eval/) of the base, the fine-tune alone, and every composition that
contains it, all served by one deltaserve server (CPU default dtype).

Serving: `deltaserve loadtest` (closed loop, streaming, ignore_eos) over the two
demos alone, then over the two demos and their sum composition, alternated, so
tokens/s with compositions in the mix compare with single variants under the same
load. Also the kept entries of each merged delta against its members'.

    python -m benchmarks.compose [--rows 50] [--requests 48]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.task_deltas import task_deltas
from deltastore.embedded import ensure_embedded_base
from deltastore.format import load_delta
from deltastore.merge import MergeMethod, merge
from server.app import ThreadedServer
from server.clients.evaluate import Client, load_rows, score_served
from server.config import Settings

EVAL = Path(__file__).parent / "eval"
RESULTS = Path(__file__).parent / "results" / "compose.json"
TOKEN = "compose-benchmark"


def deltas(base_dir: Path) -> dict[str, Path]:
    return task_deltas(base_dir)


def loadtest(url: str, models: str, requests: int, out: Path) -> dict[str, float]:
    cmd = [
        sys.executable, "-m", "server.cli", "loadtest", "--url", url, "--models", models,
        "--concurrency", "4", "--requests", str(requests), "--max-tokens", "32", "--stream",
        "--out", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    report = json.loads(out.read_text())
    return {
        "tokens_per_s": float(report["tokens_per_s"]),
        "requests_per_s": float(report["requests_per_s"]),
        "ttft_p50_ms": float(report["ttft_ms"].get("p50", 0.0)),
        "per_model": report["per_model"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50, help="test rows per task")
    ap.add_argument("--requests", type=int, default=48, help="requests per load-test run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    base_dir = ensure_embedded_base()
    files = deltas(base_dir)
    work = Path(tempfile.mkdtemp(prefix="deltaserve-compose-"))
    store = work / "store"
    store.mkdir()
    for name, path in files.items():
        (store / f"{name}.delta.safetensors").write_bytes(path.read_bytes())
    os.environ["DELTASERVE_ADMIN_TOKEN"] = TOKEN
    settings = Settings(base=base_dir, store=store, port=0, demo=False)
    server = ThreadedServer(settings)
    server.wait_ready()
    client = Client(server.url, None)
    admin = {"Authorization": f"Bearer {TOKEN}"}
    tasks = {"arith": "arith", "json-extract": "json-extract", "topic": "topic"}
    rows = {t: load_rows(EVAL / f"{t}.jsonl", args.rows) for t in tasks}
    report: dict[str, object] = {
        "command": "python -m benchmarks.compose " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
    }
    try:
        models: dict[str, list[str]] = {}  # composition -> its members
        entries = {}
        for a, b in itertools.combinations(sorted(files), 2):
            members = [a, b]
            models[f"{a}+{b}"] = members  # sum: the expression
            for method in (MergeMethod.TIES, MergeMethod.DARE_MERGE):
                name = f"{method.value}-{a}-{b}"
                body = {"name": name, "members": members, "method": method.value}
                r = client.http.post("/admin/compositions", json=body, headers=admin)
                r.raise_for_status()
                models[name] = members
            loaded = [(m, load_delta(files[m]), 1.0) for m in members]
            for method in MergeMethod:
                merged = merge(loaded, method)
                entries[f"{method.value} {a}+{b}"] = {
                    "members": [d.count for _, d, _ in loaded],
                    "merged": merged.count,
                }
        scores: dict[str, dict[str, float]] = {}
        for task, task_rows in rows.items():
            scores[task] = {"base": score_served(client, base_dir.name, task_rows, True, 4)}
            scores[task]["alone"] = score_served(client, task, task_rows, True, 4)
            for model, members in models.items():
                if task in members:
                    scores[task][model] = score_served(client, model, task_rows, True, 4)
            print(json.dumps({task: scores[task]}), flush=True)
        report["accuracy"] = scores
        report["entries"] = entries
        runs = []
        singles = "arith,json-extract"
        mixed = "arith,json-extract,arith+json-extract"
        for i in range(2):  # alternated: like with like
            for label, mix in (("singles", singles), ("with composition", mixed)):
                res = loadtest(server.url, mix, args.requests, work / f"load-{label}-{i}.json")
                runs.append({"mix": label, "models": mix, **res})
                print(json.dumps(runs[-1]), flush=True)
        report["serving"] = runs
    finally:
        server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
