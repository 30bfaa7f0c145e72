"""`deltaserve finetune`'s defaults: the fast settings the demos use (bf16 autocast,
a frozen embedding) against full fp32 training, at the command's default recipe
(30 AdamW steps, lr 5e-5, batch 8, 512 training rows), on each built-in task.

    python -m benchmarks.finetune_defaults [--tasks arith,extract,topic] [--rows 50]

For each task and setting: the fine-tune is made as the command makes it, timed
(seconds per step: the whole fine-tune over its steps, loading included), and its
exact-match accuracy scored in-process on the task's test split (greedy, through the
chat template, `deltaserve eval`'s rules). The fast settings are the default where
they keep the accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from deltastore.embedded import ensure_embedded_base
from deltastore.finetune import FinetuneConfig, finetune
from deltastore.tasks import splits
from server.clients.evaluate import Row, score_local

RESULTS = Path(__file__).parent / "results" / "finetune_defaults.json"
SETTINGS = {
    "fp32, embedding trained": dict(bf16=False, train_embeddings=True),
    "bf16 autocast, embedding frozen": dict(bf16=True, train_embeddings=False),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="arith,extract,topic")
    ap.add_argument("--rows", type=int, default=50, help="test rows scored (default 50)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    base = ensure_embedded_base()
    runs = json.loads(args.out.read_text()) if args.out.is_file() else []
    for task in args.tasks.split(","):
        train, _, test = splits(task, n_test=args.rows)
        rows = [Row(prompt=e.prompt, answer=e.answer) for e in test]
        for label, kw in SETTINGS.items():
            cfg = FinetuneConfig(**kw)  # the command's defaults otherwise
            work = Path(tempfile.mkdtemp(prefix="finetune-defaults-"))
            try:
                t0 = time.perf_counter()
                out = finetune(base, train, work / "ft", cfg, desc=f"{task}: {label}")
                seconds = time.perf_counter() - t0
                acc = score_local(out, rows, chat=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            run = {
                "task": task,
                "setting": label,
                "config": asdict(cfg),
                "seconds_per_step": round(seconds / cfg.steps, 2),
                "exact_match": round(acc, 3),
                "rows": len(rows),
                "threads": torch.get_num_threads(),
                "load_average": os.getloadavg()[0],
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            }
            print(json.dumps(run), flush=True)
            runs.append(run)
            args.out.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
