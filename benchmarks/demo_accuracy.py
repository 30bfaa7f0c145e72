"""The demos' accuracy in-process, for choosing their recipe: each demo's delta made
as `deltaserve serve` makes it (fine-tune + compress), materialized, and scored by
`deltaserve eval`'s rules (greedy, through the chat template, exact match) on its
test split and, for json-extract, on the held-out phrasings (`extract-phrasings`:
sentence shapes no training row has).

    python -m benchmarks.demo_accuracy [--rows 100] [--steps N --lr LR] [NAME ...]
    python -m benchmarks.demo_accuracy --shipped --rows 200     # the files the package ships

`--steps` / `--lr` / `--batch-size` override the recipe (to try one); the delta is
made in a fresh cache directory and removed afterwards. `--shipped` scores the
shipped files instead of making them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from deltastore.demo import DEMOS, demo_delta, shipped_delta
from deltastore.embedded import ensure_embedded_base
from deltastore.format import load_delta
from deltastore.materialize import materialize
from deltastore.sources import open_model
from deltastore.tasks import splits
from server.clients.evaluate import Row, score_local

RESULTS = Path(__file__).parent / "results" / "demo_accuracy.json"
HELD_OUT = {"json-extract": "extract-phrasings"}


def rows_of(task: str, n: int) -> list[Row]:
    return [Row(prompt=e.prompt, answer=e.answer) for e in splits(task, n_test=n)[2]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="demos (default: all)")
    ap.add_argument("--rows", type=int, default=100, help="test rows per set (default 100)")
    ap.add_argument("--steps", type=int, help="override the recipe's steps")
    ap.add_argument("--lr", type=float, help="override the recipe's learning rate")
    ap.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    ap.add_argument("--shipped", action="store_true", help="score the shipped demo files")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    base = ensure_embedded_base()
    runs = json.loads(args.out.read_text()) if args.out.is_file() else []
    for demo in DEMOS:
        if args.names and demo.name not in args.names:
            continue
        over = {
            k: v
            for k, v in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size))
            if v is not None
        }
        demo = replace(demo, config=replace(demo.config, **over))
        root = Path(tempfile.mkdtemp(prefix="demo-accuracy-"))
        os.environ["DELTASERVE_CACHE"] = str(root / "cache")
        (root / "cache" / "models").mkdir(parents=True)
        os.symlink(base, root / "cache" / "models" / base.name)
        try:
            t0 = time.perf_counter()
            shipped = shipped_delta(demo, base) if args.shipped else None
            if args.shipped and shipped is None:
                raise SystemExit(f"no shipped file fits {demo.name}'s recipe and this base")
            path = shipped or demo_delta(demo, base, rebuild=True)
            made = time.perf_counter() - t0
            model_dir = materialize(open_model(base), load_delta(path), root / "model", False)
            acc = {demo.task: score_local(model_dir, rows_of(demo.task, args.rows), True)}
            if demo.name in HELD_OUT:
                task = HELD_OUT[demo.name]
                acc[task] = score_local(model_dir, rows_of(task, args.rows), True)
        finally:
            del os.environ["DELTASERVE_CACHE"]
            shutil.rmtree(root, ignore_errors=True)
        run = {
            "demo": demo.name,
            "config": asdict(demo.config),
            "shipped": path.name if args.shipped else None,
            "seconds_to_make": round(made, 1),
            "rows": args.rows,
            "exact_match": acc,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        }
        print(json.dumps(run))
        runs.append(run)
        args.out.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
