"""lm-evaluation-harness against deltaserve, unchanged: the same scores as the same
weights loaded in-process.

For the base and the arith and json-extract task deltas (benchmarks/task_deltas.py),
runs the repo's task (benchmarks/lmeval: a YAML task over a local JSONL file,
loglikelihood and generate_until) twice with lm-eval:

- `--model local-completions` against a deltaserve server (only `model` and
  `base_url` given: lm-eval finds /tokenizer_info and tokenizes through /tokenize);
- `--model hf` on the base directory, or on the variant materialized
  (`deltaserve materialize`), in-process.

and compares every request: loglikelihoods within --tol, is_greedy and generated
text exactly. lm-eval lives in its own virtual environment (it is not a dependency
of deltaserve):

    python3 -m venv ~/lmeval && ~/lmeval/bin/pip install torch==2.13.0 'lm-eval[api,hf]'
    python -m benchmarks.lmeval_check --lm-eval ~/lmeval/bin/lm-eval
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.task_deltas import task_deltas
from deltastore.embedded import ensure_embedded_base
from deltastore.format import load_delta
from deltastore.materialize import materialize
from deltastore.sources import open_model
from server.app import ThreadedServer
from server.config import Settings

TASKS = Path(__file__).parent / "lmeval"
TASK_NAMES = ("deltaserve_arith_mc", "deltaserve_arith_gen")
RESULTS = Path(__file__).parent / "results" / "lmeval.json"


def run_lm_eval(lm_eval: str, model_args: list[str], out: Path, limit: int | None) -> float:
    cmd = [
        lm_eval,
        "run",
        *model_args,
        "--include_path",
        str(TASKS),
        "--tasks",
        ",".join(TASK_NAMES),
        "--batch_size",
        "8",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    if limit:
        cmd += ["--limit", str(limit)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        raise SystemExit(f"lm-eval failed: {' '.join(cmd)}")
    return time.perf_counter() - t0


def samples(out: Path) -> dict[str, dict[int, Any]]:
    """task -> doc_id -> the per-request responses lm-eval logged."""
    found: dict[str, dict[int, Any]] = {}
    for task in TASK_NAMES:
        files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
        if not files:
            raise SystemExit(f"no samples for {task} under {out}")
        rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line]
        found[task] = {r["doc_id"]: r["resps"] for r in rows}
    return found


def metrics(out: Path) -> dict[str, dict[str, float]]:
    files = sorted(out.rglob("results_*.json"))
    res = json.loads(files[-1].read_text())["results"]
    return {
        t: {
            k.split(",")[0]: v
            for k, v in res[t].items()
            if isinstance(v, float) and "stderr" not in k
        }
        for t in TASK_NAMES
    }


def compare(api: dict[str, dict[int, Any]], hf: dict[str, dict[int, Any]]) -> dict[str, Any]:
    """Largest loglikelihood difference, is_greedy and generation mismatches."""
    worst, greedy_diff, gen_diff, n_ll, n_gen = 0.0, 0, 0, 0, 0
    for doc, resps in api["deltaserve_arith_mc"].items():
        for a, b in zip(resps, hf["deltaserve_arith_mc"][doc], strict=True):
            (ll_a, g_a), (ll_b, g_b) = a[0], b[0]
            worst = max(worst, abs(float(ll_a) - float(ll_b)))
            greedy_diff += g_a != g_b
            n_ll += 1
    for doc, resps in api["deltaserve_arith_gen"].items():
        gen_diff += resps != hf["deltaserve_arith_gen"][doc]
        n_gen += 1
    return {
        "loglikelihood_requests": n_ll,
        "max_abs_loglikelihood_diff": worst,
        "is_greedy_mismatches": greedy_diff,
        "generations": n_gen,
        "generation_mismatches": gen_diff,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-eval", required=True, help="the lm-eval executable (its own venv)")
    ap.add_argument("--tol", type=float, default=1e-4, help="loglikelihood tolerance")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default all)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    base_dir = ensure_embedded_base()
    work = Path(tempfile.mkdtemp(prefix="deltaserve-lmeval-"))
    store = work / "store"
    store.mkdir()
    models: dict[str, Path] = {base_dir.name: base_dir}
    base = open_model(base_dir)
    for name, path in task_deltas(base_dir, ("arith", "json-extract")).items():
        (store / f"{name}.delta.safetensors").write_bytes(path.read_bytes())
        models[name] = materialize(base, load_delta(path), work / name)
    settings = Settings(
        base=base_dir, store=store, device="cpu", dtype="float32", port=0, demo=False
    )
    server = ThreadedServer(settings)
    server.wait_ready()
    rows = []
    try:
        for name, model_dir in models.items():
            api_out, hf_out = work / f"{name}-api", work / f"{name}-hf"
            t_api = run_lm_eval(
                args.lm_eval,
                [
                    "--model",
                    "local-completions",
                    "--model_args",
                    f"model={name},base_url={server.url}/v1/completions",
                ],
                api_out,
                args.limit,
            )
            t_hf = run_lm_eval(
                args.lm_eval,
                [
                    "--model",
                    "hf",
                    "--model_args",
                    f"pretrained={model_dir},dtype=float32",
                    "--device",
                    "cpu",
                ],
                hf_out,
                args.limit,
            )
            diff = compare(samples(api_out), samples(hf_out))
            row = {
                "model": name,
                "server": metrics(api_out),
                "in_process": metrics(hf_out),
                **diff,
                "seconds_server": round(t_api, 1),
                "seconds_in_process": round(t_hf, 1),
            }
            row["equal"] = (
                diff["max_abs_loglikelihood_diff"] <= args.tol
                and diff["is_greedy_mismatches"] == 0
                and diff["generation_mismatches"] == 0
                and row["server"] == row["in_process"]
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
    report = {
        "command": "python -m benchmarks.lmeval_check " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "tolerance": args.tol,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{'model':24} {'acc server':>10} {'acc hf':>8} {'em server':>9} {'em hf':>6} "
        f"{'max |dLL|':>10} {'equal':>6}"
    )
    for r in rows:
        s, h = r["server"], r["in_process"]
        print(
            f"{r['model']:24} {s['deltaserve_arith_mc']['acc']:>10.3f} "
            f"{h['deltaserve_arith_mc']['acc']:>8.3f} "
            f"{s['deltaserve_arith_gen']['exact_match']:>9.3f} "
            f"{h['deltaserve_arith_gen']['exact_match']:>6.3f} "
            f"{r['max_abs_loglikelihood_diff']:>10.2e} {r['equal']!s:>6}"
        )
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
