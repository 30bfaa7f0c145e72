"""The q curve: every unlabelled objective and the accuracy, over the whole q range.

    python -m benchmarks.qcurve [--finetunes arith-large,...] [--methods darex-q,mix]
                                [--rates 0.999] [--report]

For one fine-tune of the fidelity study (benchmarks/fidelity.py, same cache), one
mask (one method and rate, seed 0, as `deltaserve compress` draws it) and each q of
the q search's coarse log grid (1-p, then x sqrt(2) up to 1): apply the pruned delta
rescaled by 1/q to the resident base, compute each unlabelled objective on the
calibration text (deltastore.calib.objectives: logit MSE, KL, hidden-state MSE, in
one forward pass), and score exact match on the validation and the test split.

Then: which q each objective's minimum picks on that grid, and what it scores on
test, beside the labelled pick (best validation accuracy) and the best test cell.
That says which objective a search should follow, without running a search per
objective. Results are resumable (one entry per point in --out).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity import (
    FINETUNES,
    MemoryFinetune,
    _csv,
    _load,
    _save,
    _task_files,
    default_work,
    make_finetune,
    work_arg,
)
from deltastore.calib import (
    Objective,
    collect,
    exact_match,
    load_calibration,
    load_examples,
    objectives,
)
from deltastore.compress import Calibration, CompressOptions, _prune
from deltastore.embedded import ensure_embedded_base
from deltastore.methods import Method
from deltastore.qsearch import LOG_STEP, ScaledDeltaModel
from deltastore.sources import open_finetune, open_model

SCORE_BATCH = 8
METHODS = {"darex-q": Method.DAREX_Q, "mix": Method.MIX, "magnitude": Method.MAGNITUDE}


def grid(q_min: float, q_max: float = 1.0) -> list[float]:
    """The coarse log grid of the q search: q_min * 2^(k/2) up to q_max."""
    steps = math.floor(math.log2(q_max / q_min) / LOG_STEP + 1e-9)
    return [round(q_min * 2 ** (k * LOG_STEP), 6) for k in range(steps + 1)]


def run(args: argparse.Namespace) -> None:
    base_dir = ensure_embedded_base()
    base = open_model(base_dir)
    tokenizer = base.load_tokenizer()
    model = base.load_model(torch.float32).eval()
    results = _load(args.out)
    for ft_name in args.finetunes:
        task = FINETUNES[ft_name][0]
        test, calib, val_file = _task_files(task, tokenizer, args.work)
        test, val = test[: args.n_test], load_examples(val_file, args.n_test)
        ft = MemoryFinetune(open_finetune(base, make_finetune(ft_name, base_dir, args.work)))
        ids = load_calibration(calib, tokenizer, 1024, 128)
        ref, stats = collect(ft.load_model(torch.float32).eval(), ids, hidden=True)
        for method in args.methods:
            for rate in args.rates:
                opts = CompressOptions(METHODS[method], rate, q=1.0, calib=calib, progress=False)
                pruned = _prune(ft, opts, Calibration(stats=stats))
                trial = ScaledDeltaModel(model, pruned.tensors, pruned.fixed)
                sparse = [t.name for t in pruned.tensors if not t.dense]
                for q in tqdm(grid(opts.q_min), desc=f"{ft_name} {method} {rate}"):
                    key = f"{ft_name}|{method}|{rate}|{q}"
                    if key in results:
                        continue
                    t0 = time.perf_counter()
                    with trial.scaled(dict.fromkeys(sparse, 1.0 / q)) as m:
                        obj = objectives(m, ids, ref)
                        acc_val = exact_match(m, tokenizer, val, batch=SCORE_BATCH)
                        acc_test = exact_match(m, tokenizer, test, batch=SCORE_BATCH)
                    results[key] = {
                        **{o.value: v for o, v in obj.items()},
                        "val": acc_val,
                        "test": acc_test,
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                    _save(args.out, results)
                del trial, pruned


# --------------------------------------------------------------------------- report


def _cases(results: dict[str, Any]) -> dict[tuple[str, str, str], dict[float, dict[str, Any]]]:
    cases: dict[tuple[str, str, str], dict[float, dict[str, Any]]] = {}
    for key, v in results.items():
        ft, method, rate, q = key.split("|")
        cases.setdefault((ft, method, rate), {})[float(q)] = v
    return cases


PICKS = [o.value for o in Objective] + ["val"]


def picks(points: dict[float, dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per objective (and 'val', the labelled pick): (q picked, its test accuracy).
    Ties go to the smallest q, as the search's first-best rule."""
    out = {}
    qs = sorted(points)
    for name in PICKS:
        if name == "val":
            q = max(qs, key=lambda x: (points[x]["val"], -x))
        else:
            q = min(qs, key=lambda x: (points[x][name], x))
        out[name] = (q, points[q]["test"])
    return out


def report(results: dict[str, Any], plot: Path | None) -> str:
    lines = [
        "| fine-tune | method | p | "
        + " | ".join(f"{n}: q → test" for n in PICKS)
        + " | best test |",
        "|---|---|---|" + "---|" * (len(PICKS) + 1),
    ]
    cases = _cases(results)
    for (ft, method, rate), points in sorted(cases.items()):
        got = picks(points)
        best = max(points, key=lambda x: points[x]["test"])
        cells = [f"{q:.4g} → {acc:.3f}" for q, acc in (got[n] for n in PICKS)]
        lines.append(
            f"| {ft} | {method} | {rate} | " + " | ".join(cells) + f" | {best:.4g} → "
            f"{points[best]['test']:.3f} |"
        )
    if plot is not None and cases:
        _plot(cases, plot)
    return "\n".join(lines)


def _plot(cases: dict[tuple[str, str, str], dict[float, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cases)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, ((ft, method, rate), points) in zip(axes.flat, sorted(cases.items()), strict=False):
        qs = sorted(points)
        for name, style in zip([o.value for o in Objective], ["o-", "s--", "^-."], strict=True):
            v = [points[q][name] for q in qs]
            lo, hi = min(v), max(v)
            ax.plot(qs, [(x - lo) / (hi - lo or 1) for x in v], style, ms=3, label=name)
        ax.plot(qs, [points[q]["test"] for q in qs], "k-", lw=2, label="test accuracy")
        ax.plot(qs, [points[q]["val"] for q in qs], "k:", lw=1.5, label="val accuracy")
        ax.set_xscale("log")
        ax.set_title(f"{ft}, {method}, p = {rate}", fontsize=9)
        ax.set_xlabel("q (rescale 1/q)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].set_ylabel("objective (scaled to [0, 1]) / accuracy")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--finetunes", type=_csv(str, FINETUNES), default=["arith-large"])
    ap.add_argument("--methods", type=_csv(str, METHODS), default=["darex-q", "mix"])
    ap.add_argument("--rates", type=_csv(float), default=[0.999])
    ap.add_argument("--n-test", type=int, default=64, help="validation and test examples")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/qcurve.json"))
    ap.add_argument("--plot", type=Path, default=Path("benchmarks/results/qcurve.png"))
    ap.add_argument("--report", action="store_true", help="only print the table and plot")
    work_arg(ap)
    args = ap.parse_args()
    args.work = args.work or default_work()
    if not args.report:
        run(args)
    print(report(_load(args.out), args.plot))


if __name__ == "__main__":
    main()
