"""The q curve: every unlabelled objective, the fidelity estimate and the accuracy,
over the whole q range.

    python -m benchmarks.qcurve [--finetunes arith-large,...] [--methods darex-q,mix]
                                [--rates 0.99,0.999] [--no-val] [--max-multiple K]
                                [--report]

For one fine-tune of the fidelity study (benchmarks/fidelity/, same cache), one
mask (one method and rate, seed 0, as `deltaserve compress` draws it) and each q of
the q search's coarse log grid (1-p, then x sqrt(2) up to 1): apply the pruned delta
rescaled by 1/q to the resident base, compute every unlabelled objective on the
calibration text (deltastore.calib.measure: logit MSE, KL with and without its tail
bucket, hidden-state MSE, the position-weighted KL, the KL on the fine-tune's greedy
replies to the calibration prompts, and the share of those replies' tokens and of
whole replies the candidate reproduces), and score exact match on the validation and
the test split (--no-val: the test split only). The fine-tune and the base are
measured the same way once per fine-tune: the base's agreement with the fine-tune's
continuations is the floor of the fidelity estimate (deltastore.fidelity).

Then: which q each objective's optimum picks on that grid, and what it scores on
test, beside the labelled pick (best validation accuracy) and the best test cell;
and how far the fidelity estimate is from the gain each point keeps on test. That
says which objective a search should follow, without running a search per
objective. Results are resumable (one entry per point in --out).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity.catalog import (
    FINETUNES,
    csv_arg,
    default_work,
    make_finetune,
    task_files,
    work_arg,
)
from benchmarks.fidelity.run import MemoryFinetune, load_results, save_results
from deltastore.calib import (
    DEFAULT_OBJECTIVE,
    Objective,
    Reference,
    collect,
    exact_match,
    load_calibration,
    load_examples,
    load_prompts,
    log_probs,
    measure,
    score_continuations,
)
from deltastore.compress import Calibration, CompressOptions, prune_deltas
from deltastore.embedded import ensure_embedded_base
from deltastore.fidelity import THRESHOLD
from deltastore.methods import Method
from deltastore.qsearch import LOG_STEP, ScaledDeltaModel
from deltastore.recommend import delta_stats, recommend
from deltastore.sources import open_finetune, open_model

SCORE_BATCH = 8
METHODS = {"darex-q": Method.DAREX_Q, "mix": Method.MIX, "magnitude": Method.MAGNITUDE}
ON_CALIBRATION = tuple(o for o in Objective if not o.on_continuations)


REPLIES = "replies"  # marks points measured on the replies to the calibration prompts


def measure_replies(model: Any, ref: Reference) -> dict[str, Any]:
    """The objectives on the fine-tune's replies to the calibration prompts, and per
    reply: the index of the first token the model does not reproduce (-1: all), the
    tokens it does, and the KL summed over its tokens."""
    assert ref.continuations is not None
    mask = ref.continuations.mask
    scores = score_continuations(model, ref.continuations)
    miss = ~scores.hit & mask
    first = torch.where(miss.any(1), miss.to(torch.int64).argmax(1), -1)
    return {
        **scores.values(mask),
        "first_miss": first.tolist(),
        "hits": scores.hit.sum(1).tolist(),
        "row_kl": [round(x, 5) for x in scores.kl.sum(1).tolist()],
    }


def measure_all(model: Any, ids: torch.Tensor, ref: Reference) -> dict[str, Any]:
    """Every objective and agreement measure (`measure_replies` for the replies)."""
    return {**measure(model, ids, ref, ON_CALIBRATION), **measure_replies(model, ref)}


def grid(q_min: float, q_max: float = 1.0) -> list[float]:
    """The coarse log grid of the q search: q_min * 2^(k/2) up to q_max."""
    steps = math.floor(math.log2(q_max / q_min) / LOG_STEP + 1e-9)
    return [round(q_min * 2 ** (k * LOG_STEP), 6) for k in range(steps + 1)]


def run(args: argparse.Namespace) -> None:
    base_dir = ensure_embedded_base()
    base = open_model(base_dir)
    tokenizer = base.load_tokenizer()
    model = base.load_model(torch.float32).eval()
    results = load_results(args.out)
    for ft_name in args.finetunes:
        task = FINETUNES[ft_name][0]
        test, calib, val_file = task_files(task, tokenizer, args.work)
        test, val = test[: args.n_test], load_examples(val_file, args.n_test)
        ft = MemoryFinetune(open_finetune(base, make_finetune(ft_name, base_dir, args.work)))
        ids = load_calibration(calib, tokenizer, 1024, 128)
        ft_model = ft.load_model(torch.float32).eval()
        prompts = load_prompts(calib, tokenizer)
        ref, stats = collect(
            ft_model, ids, hidden=True, base=log_probs(model, ids), prompts=prompts
        )
        key = f"ref|{ft_name}"
        if key not in results or not results[key].get(REPLIES):
            results[key] = {
                "task": task,
                "mean_abs_delta": recommend(delta_stats(ft, progress=False)).mean_abs,
                "finetune": {
                    "test": exact_match(ft_model, tokenizer, test, batch=SCORE_BATCH),
                    "val": exact_match(ft_model, tokenizer, val, batch=SCORE_BATCH),
                    **measure_all(ft_model, ids, ref),
                },
                "base": {
                    "test": exact_match(model, tokenizer, test, batch=SCORE_BATCH),
                    "val": exact_match(model, tokenizer, val, batch=SCORE_BATCH),
                    **measure_all(model, ids, ref),
                },
                "continuations": _describe(ref, tokenizer),
                REPLIES: True,
            }
            save_results(args.out, results)
        del ft_model
        for method in args.methods:
            for rate in args.rates:
                opts = CompressOptions(METHODS[method], rate, q=1.0, calib=calib, progress=False)
                pruned = prune_deltas(ft, opts, Calibration(stats=stats))
                trial = ScaledDeltaModel(model, pruned.tensors, pruned.fixed)
                sparse = [t.name for t in pruned.tensors if not t.dense]
                q_max = min(1.0, opts.q_min * args.max_multiple)
                for q in tqdm(grid(opts.q_min, q_max), desc=f"{ft_name} {method} {rate}"):
                    key = f"{ft_name}|{method}|{rate}|{q}"
                    old = results.get(key)
                    if old is not None and old.get(REPLIES):
                        continue
                    t0 = time.perf_counter()
                    with trial.scaled(dict.fromkeys(sparse, 1.0 / q)) as m:
                        if old is not None:  # measured on continuations of another kind
                            results[key] = {**old, **measure_replies(m, ref), REPLIES: True}
                            save_results(args.out, results)
                            continue
                        point = measure_all(m, ids, ref)
                        if args.val:
                            point["val"] = exact_match(m, tokenizer, val, batch=SCORE_BATCH)
                        acc_test = exact_match(m, tokenizer, test, batch=SCORE_BATCH)
                    results[key] = {
                        **point,
                        "test": acc_test,
                        "seconds": round(time.perf_counter() - t0, 1),
                        REPLIES: True,
                    }
                    save_results(args.out, results)
                del trial, pruned


def _describe(ref: Reference, tokenizer: Any) -> list[dict[str, Any]]:
    """Each reply: the end of its prompt, its text and length."""
    cont = ref.continuations
    assert cont is not None
    out = []
    for prompt, toks, m in zip(cont.ids, cont.tokens, cont.mask, strict=True):
        before = prompt[: cont.prefix][-24:]
        out.append(
            {
                "prompt_end": tokenizer.decode(before),
                "text": tokenizer.decode(toks[m]),
                "tokens": int(m.sum()),
            }
        )
    return out


# --------------------------------------------------------------------------- report

Case = tuple[str, str, str]


def _cases(results: dict[str, Any]) -> dict[Case, dict[float, dict[str, Any]]]:
    cases: dict[Case, dict[float, dict[str, Any]]] = {}
    for key, v in results.items():
        parts = key.split("|")
        if len(parts) == 4:
            ft, method, rate, q = parts
            cases.setdefault((ft, method, rate), {})[float(q)] = v
    return cases


# every objective the search can follow, today's KL without its tail bucket, and the
# labelled pick (best validation accuracy)
PICKS = ["logit-mse", "kl-top", *(o.value for o in Objective if o.value != "logit-mse"), "val"]
MAXIMISED = {Objective.AGREEMENT.value, "val"}


def picks(points: dict[float, dict[str, Any]]) -> dict[str, float]:
    """Per objective (and 'val', the labelled pick): the q it picks on the grid. Ties
    go to the smallest q, as the search's first-best rule."""
    out = {}
    qs = sorted(points)
    for name in PICKS:
        if name not in points[qs[0]]:
            continue
        sign = -1.0 if name in MAXIMISED else 1.0
        out[name] = min(qs, key=lambda x, n=name, s=sign: (s * points[x][n], x))
    return out


def gain(acc: float, base: float, ft: float) -> float:
    return (acc - base) / (ft - base) if ft > base else math.nan


def estimate(point: dict[str, Any], ref: dict[str, Any], key: str) -> float:
    """The fidelity estimate from an agreement measure: the share of the fine-tune's
    agreement above the base's that the point keeps."""
    return gain(point[key], ref["base"][key], ref["finetune"][key])


def report(results: dict[str, Any], plot: Path | None) -> str:
    cases = _cases(results)
    lines = [
        "Gain kept on test at the q each objective picks on the coarse grid (picked q "
        "as a multiple of 1-p):",
        "",
        "| fine-tune | mean abs Δ | method | p | " + " | ".join(PICKS) + " | best test |",
        "|---|---|---|---|" + "---|" * (len(PICKS) + 1),
    ]
    misses: dict[str, list[float]] = {n: [] for n in PICKS}
    for (ft, method, rate), points in sorted(cases.items(), key=_order):
        ref = results.get(f"ref|{ft}")
        if ref is None:
            continue
        base, top = ref["base"]["test"], ref["finetune"]["test"]
        got = picks(points)
        one = 1 - float(rate)
        best = max(points, key=lambda x: points[x]["test"])
        cells = []
        for name in PICKS:
            if name not in got:
                cells.append("-")
                continue
            q = got[name]
            g = gain(points[q]["test"], base, top)
            misses[name].append(gain(points[best]["test"], base, top) - g)
            cells.append(f"{q / one:.3g}× → {100 * g:.0f}%")
        lines.append(
            f"| {ft} | {ref['mean_abs_delta']:.1e} | {method} | {rate} | "
            + " | ".join(cells)
            + f" | {best / one:.3g}× → {100 * gain(points[best]['test'], base, top):.0f}% |"
        )
    lines += [
        "",
        "Gain lost against the best cell of the grid, per objective (mean / worst over "
        "the cases above):",
        "",
        "| objective | mean | worst |",
        "|---|---|---|",
    ]
    for name, lost in misses.items():
        lost = [x for x in lost if not math.isnan(x)]
        if lost:
            lines.append(
                f"| {name} | {100 * statistics.mean(lost):.0f}% | {100 * max(lost):.0f}% |"
            )
    lines += ["", *targets(results, cases), "", *estimate_errors(results, cases)]
    if plot is not None and cases:
        _plot(results, cases, plot)
    return "\n".join(lines)


def _order(item: tuple[Case, Any]) -> tuple[int, str, str]:
    (ft, method, rate), _ = item
    return (list(FINETUNES).index(ft) if ft in FINETUNES else 99, method, rate)


ESTIMATES = {"tokens": Objective.AGREEMENT.value, "sequences": "sequence-agreement"}

# the targets for the default objective: the share of the gain kept at p = 0.99
# on every fine-tune, at 0.999 on deltas up to SMALL_MEAN; on larger ones at 0.999,
# LARGE_TARGET wherever a q of the grid reaches it, and otherwise the estimate flags
# the variant (below fidelity.THRESHOLD)
AT_099, AT_0999, LARGE_TARGET, SMALL_MEAN = 0.95, 0.90, 0.70, 1e-3


def targets(results: dict[str, Any], cases: dict[Case, dict[float, dict[str, Any]]]) -> list[str]:
    """Each case against its target, at the q the default objective picks on the grid."""
    name = DEFAULT_OBJECTIVE.value
    out = [
        f"Targets, at the q the default objective ({name}) picks on the coarse grid:",
        "",
        "| fine-tune | mean abs Δ | method | p | picked q | gain kept | estimate | best cell "
        "| target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (ft, method, rate), points in sorted(cases.items(), key=_order):
        ref = results.get(f"ref|{ft}")
        got = picks(points)
        if ref is None or name not in got:
            continue
        base, top = ref["base"]["test"], ref["finetune"]["test"]
        q = got[name]
        kept = gain(points[q]["test"], base, top)
        est = estimate(points[q], ref, ESTIMATES["sequences"])
        best = max(gain(p["test"], base, top) for p in points.values())
        if float(rate) < 0.999:
            want, met = f"≥ {AT_099:.0%}", kept >= AT_099
        elif ref["mean_abs_delta"] <= SMALL_MEAN:
            want, met = f"≥ {AT_0999:.0%}", kept >= AT_0999
        elif best >= LARGE_TARGET:
            want, met = f"≥ {LARGE_TARGET:.0%} (a q reaches it)", kept >= LARGE_TARGET
        else:
            want, met = f"flagged (no q reaches {LARGE_TARGET:.0%})", est < THRESHOLD
        one = 1 - float(rate)
        out.append(
            f"| {ft} | {ref['mean_abs_delta']:.1e} | {method} | {rate} | {q / one:.3g}× | "
            f"{100 * kept:.0f}% | {100 * est:.0f}% | {100 * best:.0f}% | {want} | "
            f"{'✓' if met else '✗'} |"
        )
    return out


def estimate_errors(
    results: dict[str, Any], cases: dict[Case, dict[float, dict[str, Any]]]
) -> list[str]:
    """How far each form of the estimate is from the gain kept on test, over every
    point of every case (and over the points that keep at least half of the gain, or
    less: where the threshold decides)."""
    errors: dict[str, list[tuple[float, float]]] = {n: [] for n in ESTIMATES}
    for (ft, _, _), points in cases.items():
        ref = results.get(f"ref|{ft}")
        if ref is None:
            continue
        base, top = ref["base"]["test"], ref["finetune"]["test"]
        for point in points.values():
            true = gain(point["test"], base, top)
            for name, key in ESTIMATES.items():
                est = estimate(point, ref, key)
                if not (math.isnan(true) or math.isnan(est)):
                    errors[name].append((est, true))
    out = [
        "The fidelity estimate against the gain kept on test, over every point "
        "(estimate − true, in points of gain):",
        "",
        "| estimate from | points | mean abs error | worst | mean signed | "
        "flags (< 50%) that keep ≥ 50% | misses (≥ 50%) that keep < 50% |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, pairs in errors.items():
        if not pairs:
            continue
        err = [e - t for e, t in pairs]
        false_flags = sum(1 for e, t in pairs if e < 0.5 <= t)
        misses = sum(1 for e, t in pairs if t < 0.5 <= e)
        out.append(
            f"| {name} | {len(pairs)} | {100 * statistics.mean(abs(x) for x in err):.0f} "
            f"| {100 * max(abs(x) for x in err):.0f} | {100 * statistics.mean(err):+.0f} "
            f"| {false_flags} | {misses} |"
        )
    return out


STYLES = {
    "logit-mse": "o-",
    "kl-top": "s--",
    "kl": "s-",
    "hidden-mse": "^-.",
    "weighted-kl": "v-",
    "generated-kl": "D-",
    "agreement": "x--",
}


def _plot(
    results: dict[str, Any], cases: dict[Case, dict[float, dict[str, Any]]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(c, p) for c, p in sorted(cases.items(), key=_order) if f"ref|{c[0]}" in results]
    n = len(shown)
    if not n:
        return
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
    for ax, ((ft, method, rate), points) in zip(axes.flat, shown, strict=False):
        ref = results[f"ref|{ft}"]
        base, top = ref["base"]["test"], ref["finetune"]["test"]
        qs = sorted(points)
        xs = [q / (1 - float(rate)) for q in qs]
        for name, style in STYLES.items():
            if name not in points[qs[0]] or name == "kl-top":
                continue
            v = [points[q][name] for q in qs]
            if name in MAXIMISED:
                v = [-x for x in v]
            lo, hi = min(v), max(v)
            ax.plot(xs, [(x - lo) / (hi - lo or 1) for x in v], style, ms=3, lw=1, label=name)
        ax.plot(
            xs,
            [gain(points[q]["test"], base, top) for q in qs],
            "k-",
            lw=2.2,
            label="gain kept (test)",
        )
        ax.plot(
            xs,
            [estimate(points[q], ref, ESTIMATES["sequences"]) for q in qs],
            color="tab:red",
            ls=":",
            lw=2,
            label="estimate",
        )
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.1)
        ax.set_title(f"{ft}, {method}, p = {rate}", fontsize=9)
        ax.set_xlabel("q / (1-p)", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].set_ylabel("objective (scaled, lower is better) / gain", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--finetunes", type=csv_arg(str, FINETUNES), default=["arith-large"])
    ap.add_argument("--methods", type=csv_arg(str, METHODS), default=["darex-q"])
    ap.add_argument("--rates", type=csv_arg(float), default=[0.99, 0.999])
    ap.add_argument("--n-test", type=int, default=64, help="validation and test examples")
    ap.add_argument(
        "--no-val",
        dest="val",
        action="store_false",
        help="score each point on the test split only (no labelled pick; a third faster)",
    )
    ap.add_argument(
        "--max-multiple",
        type=float,
        default=math.inf,
        help="end the grid at this multiple of 1-p (default: q = 1); on a small delta the "
        "accuracy is the base's long before q = 1",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/qcurve-objectives.json"))
    ap.add_argument("--plot", type=Path, default=Path("benchmarks/results/qcurve-objectives.png"))
    ap.add_argument("--report", action="store_true", help="only print the tables and plot")
    work_arg(ap)
    args = ap.parse_args()
    args.work = args.work or default_work()
    if not args.report:
        run(args)
    print(report(load_results(args.out), args.plot))


if __name__ == "__main__":
    main()
