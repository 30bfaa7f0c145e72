"""Delta shape: the statistics `deltaserve recommend` reads, for the fidelity study's
fine-tunes (those already made in its cache).

    python -m benchmarks.delta_shape [--finetunes arith-lora,arith-large,...]

Per fine-tune: mean |delta|, the share of the delta's sum of squares held by its
largest 1% of entries (top_energy: ~8% for a Gaussian delta, more for heavy tails),
and the same statistic for the three largest tensors by energy.
"""

from __future__ import annotations

import argparse

from benchmarks.fidelity.catalog import FINETUNES, csv_arg, default_work, work_arg
from deltastore.embedded import ensure_embedded_base
from deltastore.recommend import delta_stats, recommend
from deltastore.sources import open_finetune, open_model


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--finetunes", type=csv_arg(str, FINETUNES), default=list(FINETUNES))
    work_arg(ap)
    args = ap.parse_args()
    work = args.work or default_work()
    base = open_model(ensure_embedded_base())
    print("| fine-tune | mean abs Δ | top 1% energy | largest tensors (share of energy; top 1%) |")
    print("|---|---|---|---|")
    for name in args.finetunes:
        path = work / "finetunes" / name
        if not path.is_dir():
            continue
        stats = delta_stats(open_finetune(base, path), progress=False)
        rec = recommend(stats)
        energy = {s.name: (s.std**2 + s.mean**2) * s.numel for s in stats}
        total = sum(energy.values())
        top = sorted(stats, key=lambda s: -energy[s.name])[:3]
        cells = ", ".join(
            f"{s.name.removeprefix('model.')} ({energy[s.name] / total:.0%}; {s.top_energy:.1%})"
            for s in top
        )
        print(f"| {name} | {rec.mean_abs:.1e} | {rec.top_energy:.1%} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
