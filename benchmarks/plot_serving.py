"""Plot benchmarks/results/serving-*.json (from benchmarks/serving.py) as one PNG.

python -m benchmarks.plot_serving [--out benchmarks/results/serving.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.png"))
    args = ap.parse_args()
    runs = sorted(args.results.glob("serving-[0-9]*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not runs:
        raise SystemExit(f"no serving-*.json in {args.results}: run benchmarks/serving.py first")
    fig, axes = plt.subplots(len(runs), 2, figsize=(13, 3.6 * len(runs)), squeeze=False)
    for row, path in zip(axes, runs, strict=True):
        data = json.loads(path.read_text())
        labels = [r["config"] for r in data["rows"]]
        y = range(len(labels))
        row[0].barh(y, [r["tokens_per_s"] for r in data["rows"]], color="tab:blue")
        row[0].set(
            yticks=list(y),
            yticklabels=labels,
            xlabel="generated tokens/s",
            title=f"{data['variants']} variants: throughput",
        )
        row[0].invert_yaxis()
        row[1].barh(y, [r["peak_rss_bytes"] / 2**30 for r in data["rows"]], color="tab:orange")
        row[1].set(
            yticks=list(y),
            yticklabels=[],
            xlabel="peak resident memory (GiB)",
            title=f"{data['variants']} variants: memory",
        )
        row[1].invert_yaxis()
    fig.suptitle("deltaserve vs the alternatives (same workload; benchmarks/serving.py)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
