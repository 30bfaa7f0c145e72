"""The study's plots: gain kept against the rate, per fine-tune."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.fidelity.catalog import (
    PAPER,
    VARIANTS,
    gain_kept,
)

STYLES = ["o-", "s--", "^-.", "v:", "D-", "x--", "*-."]  # overlapping lines stay visible


def plot_gains(results: dict[str, Any], fts: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = math.ceil(len(fts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, ft in zip(axes.flat, fts, strict=False):
        info = results[f"finetune|{ft}"]
        base = results[f"base|{info['task']}"]["accuracy"]
        for i, v in enumerate(PAPER):
            pts = sorted(
                (float(k.split("|")[2]), c["accuracy"])
                for k, c in results.items()
                if k.startswith(f"{ft}|{v}|")
            )
            if pts:
                xs = [-math.log10(1 - r) for r, _ in pts]
                style = STYLES[i % len(STYLES)]
                ax.plot(xs, [a for _, a in pts], style, ms=4, lw=1.2, alpha=0.8, label=v)
        ax.axhline(info["accuracy"], color="k", ls="--", lw=0.8)
        ax.axhline(base, color="grey", ls=":", lw=0.8)
        ax.set_title(ft, fontsize=9)
        ticks = sorted({float(k.split("|")[2]) for k in results if k.startswith(ft + "|")})
        ax.set_xticks([-math.log10(1 - r) for r in ticks], [f"{r:g}" for r in ticks], fontsize=7)
        ax.set_ylim(-0.02, 1.02)
    for ax in list(axes.flat)[len(fts) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=8)
    fig.supxlabel("pruning rate p (log scale of 1-p); dashed: fine-tune, dotted: base")
    fig.supylabel("exact match (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_large(results: dict[str, Any], fts: list[str], path: Path) -> None:
    """Gain kept by every variant run on the large-delta fine-tunes, at p = 0.99 and
    0.999 (one panel per fine-tune)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = ["0.99", "0.999"]
    fig, axes = plt.subplots(len(fts), 1, figsize=(11, 2.6 * len(fts)), squeeze=False)
    for ax, ft in zip(axes.flat, fts, strict=True):
        info = results[f"finetune|{ft}"]
        base = results[f"base|{info['task']}"]["accuracy"]
        variants = [v for v in VARIANTS if any(f"{ft}|{v}|{r}" in results for r in rates)]
        for j, r in enumerate(rates):
            xs = [i + (j - 0.5) * 0.4 for i in range(len(variants))]
            ys = [
                100 * gain_kept(results[k]["accuracy"], base, info["accuracy"])
                if (k := f"{ft}|{v}|{r}") in results
                else math.nan
                for v in variants
            ]
            ax.bar(xs, ys, width=0.4, label=f"p = {r}")
        ax.set_xticks(range(len(variants)), variants, rotation=25, ha="right", fontsize=7)
        ax.axhline(100, color="k", ls="--", lw=0.8)
        ax.set_ylim(-5, 110)
        ax.set_ylabel("gain kept (%)", fontsize=8)
        ax.set_title(
            f"{ft} (mean |Δ| {info['mean_abs_delta']:.1e}; fine-tune {info['accuracy']:.2f}, "
            f"base {base:.2f})",
            fontsize=9,
        )
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
