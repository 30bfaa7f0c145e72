"""The study's tables: accuracy and gain kept per method and rate, the recommended
recipes, their costs, and how well the fidelity estimate predicted the gain."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.fidelity.catalog import (
    FINETUNES,
    VARIANTS,
    gain_kept,
)
from benchmarks.fidelity.plots import plot_gains, plot_large
from deltastore.fidelity import THRESHOLD
from deltastore.methods import MIX_TOP
from deltastore.qsearch import QGrid, QSearch
from deltastore.recommend import choose


def report(results: dict[str, Any], plot: Path | None) -> str:
    lines = []
    fts = [k.split("|", 1)[1] for k in results if k.startswith("finetune|")]
    fts.sort(key=lambda n: list(FINETUNES).index(n))
    for ft in fts:
        info = results[f"finetune|{ft}"]
        base = results[f"base|{info['task']}"]["accuracy"]
        cells = {tuple(k.split("|")[1:]): v for k, v in results.items() if k.startswith(ft + "|")}
        rates = sorted({float(r) for _, r in cells})
        variants = [v for v in VARIANTS if any(c[0] == v for c in cells)]
        lines.append(
            f"\n**{ft}** (task {info['task']}; mean |Δ| = {info['mean_abs_delta']:.2e}): "
            f"base {base:.3f}, fine-tune {info['accuracy']:.3f}. Exact match on the test "
            "split; the last row is the file size (dare; the others differ by < 1%, "
            "structural aside); - = not run\n"
        )
        lines.append("| method | " + " | ".join(f"p={r:g}" for r in rates) + " |")
        lines.append("|---|" + "---|" * len(rates))
        for v in variants:
            row = []
            for r in rates:
                c = cells.get((v, str(r)))
                row.append("-" if c is None else f"{c['accuracy']:.3f}")
            lines.append(f"| {v} | " + " | ".join(row) + " |")
        sizes = []
        for r in rates:
            c = cells.get(("dare", str(r)))
            sizes.append("-" if c is None else f"{c['file_bytes'] / 1e6:.1f} MB")
        lines.append("| file (dare) | " + " | ".join(sizes) + " |")
    lines += ["", *summary(results, fts), "", *targets(results, fts), "", *costs(results)]
    lines += ["", *estimate_errors(results, fts)]
    if plot is not None:
        plot_gains(results, fts, plot)
        large = [ft for ft in fts if results[f"finetune|{ft}"]["mean_abs_delta"] > BIG]
        if large:
            plot_large(results, large, plot.with_name(plot.stem + "-large.png"))
    return "\n".join(lines)


def recommended(ft: str, info: dict[str, Any], labels: bool, rate: float = 0.99) -> str:
    """The variant `deltaserve recommend --rate RATE` picks for this fine-tune."""
    low_rank = FINETUNES[ft][1].lora_r > 0
    top = info.get("top_energy", math.nan)
    pick = choose(info["mean_abs_delta"], labels, low_rank, top, rate)
    # compress's default grid is the log one
    for name, v in VARIANTS.items():
        if (
            v.method.value == pick.method
            and v.q_search is not None
            and v.q_search.value == pick.q_search
            and v.q_grid is QGrid.LOG
            and v.q_groups.value == pick.q_groups
            and (v.q_search is not QSearch.UNLABELLED or v.q_objective.value == pick.q_objective)
            and v.mix_top == MIX_TOP
        ):
            return name
    groups = "" if pick.q_groups == "none" else f"/{pick.q_groups}-q"
    return f"{pick.method}/{pick.q_search}{groups} (not run)"


def summary(results: dict[str, Any], fts: list[str]) -> list[str]:
    """Gain kept at p = 0.99 / 0.999, and recommend's pick against the best at 0.99."""
    out = [
        "| fine-tune | mean abs Δ | darex-q gain kept at 0.99, labelled / unlabelled: "
        "linear grid; log grid "
        "| at 0.999: recommended (no labels) / dare | recommend (labels; none) at 0.99 "
        "| best at 0.99 |",
        "|---|---|---|---|---|---|",
    ]

    def acc(ft: str, v: str, r: float) -> float | None:
        c = results.get(f"{ft}|{v}|{r}")
        return None if c is None else float(c["accuracy"])

    def kept(ft: str, v: str, r: float) -> str:
        info = results[f"finetune|{ft}"]
        a = acc(ft, v, r)
        if a is None:
            return "-"
        g = gain_kept(a, results[f"base|{info['task']}"]["accuracy"], info["accuracy"])
        return f"{100 * g:.0f}%"

    for ft in fts:
        info = results[f"finetune|{ft}"]
        at99 = {
            k.split("|")[1]: c["accuracy"]
            for k, c in results.items()
            if k.startswith(ft + "|") and k.endswith("|0.99")
        }
        best = max(at99.items(), key=lambda kv: kv[1]) if at99 else None
        picks = []
        for labels in (True, False):
            label = recommended(ft, info, labels)
            a = at99.get(label)
            ok = "" if a is None or best is None else (" ✓" if best[1] - a <= 0.02 else " ✗")
            picks.append(f"{label} {'-' if a is None else f'{a:.3f}'}{ok}")
        out.append(
            f"| {ft} | {info['mean_abs_delta']:.1e} "
            f"| {kept(ft, 'darex-q/labelled', 0.99)} / {kept(ft, 'darex-q/unlabelled', 0.99)}; "
            f"{kept(ft, 'darex-q/labelled/log-grid', 0.99)} / "
            f"{kept(ft, 'darex-q/unlabelled/log-grid', 0.99)} "
            f"| {kept(ft, recommended(ft, info, False, 0.999), 0.999)} / "
            f"{kept(ft, 'dare', 0.999)} "
            f"| {'; '.join(picks)} "
            f"| {'-' if best is None else f'{best[0]} {best[1]:.3f}'} |"
        )
    return out


def costs(results: dict[str, Any], fts: list[str] | None = None) -> list[str]:
    """Per variant with a search: q evaluations and compression seconds (min-max over
    the cells run on `fts`, default all), at each rate."""
    rows: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for key, c in results.items():
        parts = key.split("|")
        if fts is not None and parts[0] not in fts:
            continue
        if len(parts) == 3 and c.get("search_evals") and c.get("compress_s") is not None:
            rows.setdefault((parts[1], parts[2]), []).append((c["search_evals"], c["compress_s"]))
    out = [
        "| variant | p | cells | q evaluations | compression (s) |",
        "|---|---|---|---|---|",
    ]
    for (v, r), cells in sorted(
        rows.items(), key=lambda x: (list(VARIANTS).index(x[0][0]), x[0][1])
    ):
        ev = [e for e, _ in cells]
        sec = [t for _, t in cells]
        out.append(
            f"| {v} | {r} | {len(cells)} | {min(ev)}-{max(ev)} | {min(sec):.0f}-{max(sec):.0f} |"
        )
    return out


PAPER_RECIPE = "darex-q/unlabelled/multiples"  # one global q on k(1-p), k = 1..30
BIG = 1e-3  # the line between ordinary and large deltas


def targets(results: dict[str, Any], fts: list[str]) -> list[str]:
    """recommend's default (no labels) on every fine-tune against the targets:
    >= 95% of the gain at p = 0.99; at p = 0.999 >= 90% where mean |delta| <= 1e-3,
    else >= 70% and above both DARE and the paper's recipe on the same mask."""
    out = [
        "| fine-tune | mean abs Δ | top 1% energy | default at 0.99 (no labels) "
        "| kept (≥ 95%) | default at 0.999 | kept (target) | dare | paper's recipe |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ft in fts:
        info = results[f"finetune|{ft}"]
        base = results[f"base|{info['task']}"]["accuracy"]
        pick, pick999 = recommended(ft, info, False), recommended(ft, info, False, 0.999)

        def gain(v: str, r: float, ft: str = ft, info: Any = info, base: float = base) -> float:
            c = results.get(f"{ft}|{v}|{r}")
            return math.nan if c is None else gain_kept(c["accuracy"], base, info["accuracy"])

        def pct(g: float) -> str:
            return "-" if math.isnan(g) else f"{100 * g:.0f}%"

        g99, g999 = gain(pick, 0.99), gain(pick999, 0.999)
        dare, paper = gain("dare", 0.999), gain(PAPER_RECIPE, 0.999)
        ok99 = "" if math.isnan(g99) else (" ✓" if g99 >= 0.95 else " ✗")
        if info["mean_abs_delta"] <= BIG:
            want, ok = "≥ 90%", (not math.isnan(g999)) and g999 >= 0.90
        else:
            want = "≥ 70%, > dare, > paper"
            ok = (not math.isnan(g999)) and g999 >= 0.70
            ok = ok and all(math.isnan(x) or g999 > x for x in (dare, paper))
        mark = "" if math.isnan(g999) else (" ✓" if ok else " ✗")
        top = info.get("top_energy", math.nan)
        out.append(
            f"| {ft} | {info['mean_abs_delta']:.1e} | {'-' if math.isnan(top) else f'{top:.1%}'} "
            f"| {pick} | {pct(g99)}{ok99} | {pick999} | {pct(g999)} ({want}){mark} "
            f"| {pct(dare)} | {pct(paper)} |"
        )
    return out


def estimate_errors(results: dict[str, Any], fts: list[str]) -> list[str]:
    """The fidelity estimate each compression recorded against the gain it kept on
    the test split, over every cell that has one."""
    pairs: list[tuple[str, str, float, float]] = []  # (fine-tune, cell, estimate, true)
    for ft in fts:
        info = results[f"finetune|{ft}"]
        base = results[f"base|{info['task']}"]["accuracy"]
        for key, c in results.items():
            fid = c.get("fidelity") if key.startswith(ft + "|") else None
            if fid is None or fid.get("kept") is None:
                continue
            true = gain_kept(c["accuracy"], base, info["accuracy"])
            if not math.isnan(true):
                pairs.append((ft, key, fid["kept"], true))
    if not pairs:
        return []
    err = [e - t for _, _, e, t in pairs]
    worst = max(pairs, key=lambda p: abs(p[2] - p[3]))
    flags = [p for p in pairs if p[2] < THRESHOLD]
    return [
        f"Fidelity estimate against the gain kept on test, over the {len(pairs)} "
        f"compressions that recorded one: mean |error| "
        f"{100 * sum(abs(x) for x in err) / len(err):.0f} points, mean error "
        f"{100 * sum(err) / len(err):+.0f}, worst {100 * (worst[2] - worst[3]):+.0f} "
        f"({worst[1]}: estimate {worst[2]:.0%}, kept {worst[3]:.0%}); "
        f"{len(flags)} flagged below {THRESHOLD:.0%}, of which "
        f"{sum(1 for p in flags if p[3] >= THRESHOLD)} kept at least that on test; "
        f"{sum(1 for p in pairs if p[2] >= THRESHOLD and p[3] < THRESHOLD)} not flagged "
        "that kept less.",
    ]
