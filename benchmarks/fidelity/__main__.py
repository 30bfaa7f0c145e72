"""`python -m benchmarks.fidelity`: see the package's docstring."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.fidelity import __doc__ as DOC
from benchmarks.fidelity.catalog import (
    FINETUNES,
    PAPER,
    RATES,
    VARIANTS,
    csv_arg,
    default_work,
    make_finetune,
    work_arg,
)
from benchmarks.fidelity.report import report
from benchmarks.fidelity.run import load_results, run
from deltastore.embedded import ensure_embedded_base


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.fidelity",
        description=DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--finetunes",
        type=csv_arg(str, FINETUNES),
        default=list(FINETUNES),
        help=f"comma-separated, from {', '.join(FINETUNES)} (default all)",
    )
    ap.add_argument("--rates", type=csv_arg(float), default=list(RATES), help=f"default {RATES}")
    ap.add_argument(
        "--methods",
        type=csv_arg(str, VARIANTS),
        default=PAPER,
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: the paper's seven)",
    )
    ap.add_argument("--n-test", type=int, default=64, help="test examples per task")
    ap.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/fidelity.json"), help="results"
    )
    ap.add_argument("--plot", type=Path, default=Path("benchmarks/results/fidelity.png"))
    ap.add_argument("--report", action="store_true", help="only print tables and plot")
    ap.add_argument("--finetune-only", action="store_true", help="only make the fine-tunes")
    work_arg(ap)
    args = ap.parse_args()
    args.work = args.work or default_work()
    torch.manual_seed(0)
    if args.finetune_only:
        base_dir = ensure_embedded_base()
        for name in args.finetunes:
            make_finetune(name, base_dir, args.work)
        return
    if not args.report:
        run(args)
    print(report(load_results(args.out), args.plot))


if __name__ == "__main__":
    main()
