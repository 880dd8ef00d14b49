"""Plots about the data: class balance per level."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib import ticker

from wingspan.files import atomic_path
from wingspan.plotting import literal_text, short_name, short_names, subplots


@literal_text()
def plot_class_balance(counts: pd.Series, level: str, path: Path, many: int = 40) -> Path:
    """Bar chart of images per class; a sorted log-scale rank plot for long tails.

    Up to `many` classes every bar is labelled with its name and count. Beyond that
    names would be unreadable, so the plot shows count against rank on a log axis
    (the shape of the tail), with the largest and smallest classes named.
    """
    counts = counts.sort_values(ascending=False)
    n = len(counts)
    if n <= many:
        fig, ax = subplots(figsize=(8, 1.2 + 0.32 * n))
        ax.barh(range(n), counts.to_numpy(), color="#4c72b0")
        short = short_names([str(c) for c in counts.index])
        ax.set_yticks(range(n), [short[str(c)] for c in counts.index], fontsize=8)
        ax.invert_yaxis()
        for i, v in enumerate(counts.to_numpy()):
            ax.text(v, i, f" {v}", va="center", fontsize=8)
        ax.set_xlabel("images")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # (not "2.5 images")
        ax.margins(x=0.12)
    else:
        fig, ax = subplots(figsize=(9, 5))
        ranks = range(1, n + 1)
        ax.fill_between(ranks, counts.to_numpy(), step="mid", alpha=0.35, color="#4c72b0")
        ax.step(ranks, counts.to_numpy(), where="mid", color="#4c72b0")
        ax.set_yscale("log")
        # Plain numbers: the log axis writes its ticks in mathtext ("10^2"), and plots are
        # drawn with math off (plotting.literal_text), which showed them as source.
        # Minor ticks are labelled where a decade or so is in view (25-40 images a class
        # showed no number at all); LogFormatter writes no mathtext.
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False,
                                                         minor_thresholds=(2, 0.5)))
        ax.set_xlim(1, n)
        ax.set_xlabel(f"class rank (1 = largest of {n})")
        ax.set_ylabel("images (log scale)")
        ax.axhline(counts.median(), color="grey", ls="--", lw=1,
                   label=f"median {counts.median():g}")
        ax.legend(loc="upper right")
        for rank, (name, v) in [(1, (counts.index[0], counts.iloc[0])),
                                (n, (counts.index[-1], counts.iloc[-1]))]:
            ax.annotate(f"{short_name(str(name))} ({v})", (rank, v), fontsize=8,
                        ha="left" if rank == 1 else "right", va="bottom")
    ratio = counts.iloc[0] / max(counts.iloc[-1], 1)
    ax.set_title(f"{level}: {n} classes, {counts.sum()} images, imbalance {ratio:.1f}x")
    fig.tight_layout()
    # (renamed into place: a kill while drawing left an empty plot beside the old summary)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path
