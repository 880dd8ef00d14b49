"""Evaluation plots: confusion matrix, training curves, worst mistakes, reliability."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from wingspan.data.images import open_rgb
from wingspan.errors import rounded
from wingspan.plotting import (
    GRADCAM_COLORS,
    colormap,
    flat_note,
    literal_text,
    short_name,
    short_names,
    subplots,
)

ANNOTATED = 30  # up to this many classes the confusion matrix writes counts in its cells
LABELLED = 60  # ... and names its classes; above it the matrix drops its labels


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


@literal_text()
def plot_confusion(cm: np.ndarray, classes: list[str], path: Path,
                   tree: tuple[np.ndarray, list[str], str] | None = None) -> Path:
    """Rows normalised (recall per class) for colour, counts written in the cells.

    Classes with no images here and no answers are blank rows and columns (on an
    ETHEC-like test split a fifth of the matrix): left out, and said. With many classes
    counts, then names, would be unreadable: above ANNOTATED classes shown the cells lose
    their counts, above LABELLED the axes lose their names, and the matrix is sorted by
    class frequency (where the classes differ in it; else it keeps confusion.csv's order).
    (The most confused pairs are the report's table, not drawn here.)

    `tree` (a taxonomy's level below its coarsest: each class's ancestors' indices, coarse
    to fine, as an array of one row a class; the coarsest level's names; its name): above
    LABELLED the classes are sorted down the tree instead, lines between the coarsest
    groups, named. By frequency, a genus's species lay scattered over 300 rows, so that
    the confusions within a genus, a model's likeliest, showed no pattern.
    """
    counts = cm.sum(1)
    empty = (counts + cm.sum(0)) == 0
    if empty.all():  # (nothing to show but the classes)
        empty[:] = False
    kept = np.flatnonzero(~empty)
    left_out = (f"({empty.sum()} more with no images here and no answers left out)"
                if empty.any() else "")
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(kept)
    if n <= LABELLED:
        cm, norm = cm[np.ix_(kept, kept)], norm[np.ix_(kept, kept)]
        classes = [classes[i] for i in kept]
        short = short_names(classes)  # (full names left the matrix a sliver)
        names = [short[c] for c in classes]
        # Room for the names besides the cells: 2.5 in holds about 16 characters.
        room = max(0.0, 0.06 * (max(map(len, names), default=0) - 16))
        side = (2.5 + 0.45 * n if n <= ANNOTATED else 12) + room
        fig, ax = subplots(figsize=(side, side - 0.5))
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        for t in range(n if n <= ANNOTATED else 0):
            for p in range(n):
                if cm[t, p]:
                    ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=7,
                            color="white" if norm[t, p] > 0.5 else "black")
        size = 7 if n <= ANNOTATED else 6
        ax.set_xticks(range(n), names, rotation=60 if n <= ANNOTATED else 90,
                      ha="right" if n <= ANNOTATED else "center", fontsize=size)
        ax.set_yticks(range(n), names, fontsize=size)
        if left_out:  # (wrapped: over a matrix of 2 classes it ran past the figure)
            ax.set_title(textwrap.fill(left_out, 28 + 4 * n), fontsize=8)
    elif tree is not None:
        ancestors, group_names, group_level = tree
        ancestors = np.asarray(ancestors).reshape(len(classes), -1)
        # (lexsort: its last key first; the class's own index breaks ties, as confusion.csv)
        order = kept[np.lexsort([kept, *ancestors[kept].T[::-1]])]
        top = ancestors[order, 0]
        fig, ax = subplots(figsize=(9, 8))
        im = ax.imshow(norm[np.ix_(order, order)], cmap="Blues", vmin=0, vmax=1,
                       interpolation="nearest")
        edges = np.flatnonzero(np.diff(top)) + 0.5
        for e in edges:
            ax.axhline(e, color="0.55", lw=0.5)
            ax.axvline(e, color="0.55", lw=0.5)
        starts = np.concatenate([[-0.5], edges, [len(order) - 0.5]])
        centres = (starts[:-1] + starts[1:]) / 2
        names = [short_name(group_names[g]) for g in top[np.r_[0, np.ceil(edges).astype(int)]]]
        size = 7 if len(names) <= 30 else 5
        ax.set_xticks(centres, names, rotation=90, fontsize=size)
        ax.set_yticks(centres, names, fontsize=size)
        ax.set_title(f"{len(order)} classes, grouped by {group_level} (lines between), "
                     "then down the tree" + (f"\n{left_out}" if left_out else ""), fontsize=10)
    else:
        by_size = len(set(counts[kept].tolist())) > 1
        order = kept[np.argsort(-counts[kept], kind="stable")] if by_size else kept
        fig, ax = subplots(figsize=(9, 8))
        im = ax.imshow(norm[np.ix_(order, order)], cmap="Blues", vmin=0, vmax=1,
                       interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{len(order)} classes, " + (
            "sorted by number of images (largest top-left)" if by_size
            else "in confusion.csv's order") + (f"\n{left_out}" if left_out else ""),
            fontsize=10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    return _save(fig, path)


@literal_text()
def plot_curves(history: pd.DataFrame, path: Path, kept: dict | None = None) -> Path:
    """Loss, accuracy and macro-F1 per epoch for train and val; the stage change marked, and
    the epoch the model was kept from (`kept`: metrics.json's best, its stage and epoch)."""
    from matplotlib.ticker import MaxNLocator

    h = history.reset_index(drop=True)
    x = np.arange(1, len(h) + 1)
    at = None
    if kept:
        rows = np.flatnonzero((h["stage"] == kept.get("stage")).to_numpy()
                              & (h["epoch"] == kept.get("epoch")).to_numpy())
        at = int(rows[0]) + 1 if len(rows) else None
    fig, axes = subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ["loss", "acc", "macro_f1"], strict=True):
        ax.plot(x, h[f"train_{metric}"], "o-", ms=3, label="train")
        ax.plot(x, h[f"val_{metric}"], "s--", ms=3, label="val")  # (not told by colour alone)
        ax.set_title({"loss": "loss", "acc": "accuracy", "macro_f1": "macro-F1"}[metric])
        ax.set_xlabel("epoch (all stages)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # Inside the axes, in axes height: a label above them would overlap the title.
        top = ax.get_xaxis_transform()
        changes = np.flatnonzero(h["stage"].to_numpy()[1:] != h["stage"].to_numpy()[:-1])
        for c in changes:
            ax.axvline(c + 1.5, color="grey", ls="--", lw=1)
            ax.text(c + 1.35, 0.97, h["stage"][c + 1], transform=top, va="top", ha="right",
                    rotation=90, fontsize=8, color="grey")
        if at is not None:
            ax.plot(at, h[f"val_{metric}"][at - 1], "*", ms=13, color="C3", zorder=3,
                    label="model kept")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def mistake_title(m: dict, short: dict[str, str] | None = None) -> str:
    """A mistake's caption; where the unknown answer (or a coarser level) replaced the
    wrong class (`answer`, given only then), what the user was told instead. `short`: the
    names as the gallery shortens them (short_names), else each cut alone."""
    told, short = m.get("answer"), short or {}
    true, predicted = (short.get(m[k]) or short_name(m[k]) for k in ("true", "predicted"))
    p = rounded(m["probability"], 2)
    return (f"true: {true}\npred: {predicted}\n"
            + (f"p {p}" if p.startswith("<") else f"p = {p}")
            + (f", answered {short_name(told, 20)}" if told else ""))


def _side_by_side(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image, and beside it the image under its Grad-CAM: the overlay alone hides the
    colours, which are often what two species differ by. (GRADCAM_COLORS, not jet, whose red
    top end a red-green colour-blind reader sees as a dark olive, darker than its middle.)"""
    from PIL import Image as PILImage

    if heatmap.shape != pixels.shape[:2]:
        heatmap = np.asarray(PILImage.fromarray(heatmap.astype(np.float32)).resize(
            pixels.shape[1::-1], PILImage.BILINEAR))
    image = pixels.astype(np.float32) / (255.0 if pixels.dtype == np.uint8 else 1.0)
    heat = colormap(GRADCAM_COLORS)(np.clip(heatmap, 0, 1))[..., :3]
    gap = np.ones((image.shape[0], max(2, image.shape[1] // 40), 3))
    both = np.concatenate([image, gap, (1 - alpha) * image + alpha * heat], axis=1)
    return np.clip(both, 0.0, 1.0)  # (float rounding may pass 1: imshow would warn)


@literal_text()
def plot_mistakes(mistakes: list[dict], path: Path, columns: int = 4) -> Path:
    """The most confident wrong predictions: image, truth, prediction, probability (and the
    answer given, where it was not that class); where the model's view and its Grad-CAM
    for the wrong class are given ("pixels", "heatmap"), that view beside the same under
    its Grad-CAM: what the model took for evidence."""
    n = max(1, len(mistakes))
    short = short_names([m[k] for m in mistakes for k in ("true", "predicted")])
    columns = min(columns, n)
    rows = -(-n // columns)
    fig, axes = subplots(rows, columns, figsize=(3.4 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, mistakes, strict=False):
        note = ""
        try:
            if m.get("pixels") is not None:
                ax.imshow(_side_by_side(m["pixels"], m["heatmap"]))
                note = flat_note(m["heatmap"])
            else:
                image = open_rgb(m["path"], draft=256)
                image.thumbnail((256, 256))
                ax.imshow(image)
        except Exception:  # a file gone since prediction: show the text alone
            pass
        ax.set_title(mistake_title(m, short) + (f"\n({note})" if note else ""), fontsize=8)
    if not mistakes:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    return _save(fig, path)


@literal_text()
def plot_reliability(before: dict, after: dict, ece: tuple[float, float], path: Path) -> Path:
    """Accuracy against confidence per bin; a calibrated model follows the diagonal."""
    fig, axes = subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, rel, title, e in zip(axes, (before, after), ("before", "after temperature scaling"),
                                 ece, strict=True):
        centers = (rel["edges"][:-1] + rel["edges"][1:]) / 2
        width = rel["edges"][1] - rel["edges"][0]
        used = rel["counts"] > 0
        ax.bar(centers[used], rel["accuracy"][used], width=width * 0.9, alpha=0.7,
               label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot(rel["confidence"][used], rel["accuracy"][used], "o", color="C3", ms=4,
                label="mean confidence")
        ax.set_title(f"{title}: ECE {e:.3f}")
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    return _save(fig, path)


@literal_text()
def plot_unknown_scores(known: np.ndarray, unknown: np.ndarray, threshold: float,
                        score: str, path: Path) -> Path:
    """The unknown score of known-class images against images of classes never seen, with
    the threshold: what lies right of it is answered "unknown"."""
    from matplotlib.colors import to_rgba

    fig, ax = subplots(figsize=(7, 3.6))
    both = np.concatenate([known, unknown])
    lo, hi = np.quantile(both, [0.0, 0.995])
    hi = hi if hi > lo else lo + 1
    step = (hi - lo) / 39
    # What lies right of the line gets a bar's width at least: msp+knn's scores crowd just
    # under 1, and the images answered "unknown" (0.9992 to 0.9993) drew a bar 0.1 px wide,
    # hidden under the line; a threshold above the top quantile put them left of it.
    if lo < threshold and hi < threshold + step:
        hi = threshold + step
    bins = np.linspace(lo, hi, 40)
    if lo < threshold < hi:  # an edge: no bar straddles the line, which sides the answers
        bins = np.union1d(bins, [threshold])
    # Counts, not densities: a bar of 40 "density" over a narrow bin reads as 40 images.
    # Told apart by more than colour: the unseen bars hatched and outlined (where the two
    # overlap, their mixed colour matched neither key).
    for scores, kind, style in ((known, "known classes", dict(color="C0", alpha=0.6)),
                                (unknown, "unseen classes", dict(
                                    facecolor=to_rgba("C3", 0.35), edgecolor="C3",
                                    hatch="///", linewidth=1.2))):
        past = int((scores > threshold).sum())
        ax.hist(np.clip(scores, lo, hi), bins=bins, **style,
                label=f"{kind} ({len(scores)}; {past} right of the line)")
    ax.axvline(threshold, color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel(f"unknown score ({score}; higher = less like the training images)")
    ax.set_ylabel("images")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # (not "0.5 images")
    ax.legend(fontsize=8)
    return _save(fig, path)


@literal_text()
def plot_runs_f1(histories: dict[str, pd.DataFrame], path: Path) -> Path:
    """Each run's val macro-F1 per epoch, head then fine-tune epochs in sequence, one line a
    run, told apart by marker and dash as well as colour (the ten colours repeat); dotted,
    where fine-tuning began. The legend outside the axes: over them, many runs' names hid
    the lines."""
    from matplotlib.ticker import MaxNLocator

    short = short_names(list(histories))
    columns = 1 + (len(histories) - 1) // 25  # (a legend column 25 names high)
    fig, ax = subplots(figsize=(7 + 2.4 * columns,
                                max(3.6, 0.18 * -(-len(histories) // columns) + 0.8)))
    starts = set()
    for i, (name, history) in enumerate(histories.items()):
        h = history.reset_index(drop=True)
        ax.plot(np.arange(1, len(h) + 1), h["val_macro_f1"], color=f"C{i % 10}", ms=4,
                marker="osD^v<>"[i % 7], ls=("-", "--", ":", "-.")[i // 10 % 4],
                label=short[name])
        stage = h["stage"].to_numpy()
        starts.update((np.flatnonzero(stage[1:] != stage[:-1]) + 1.5).tolist())
    for i, start in enumerate(sorted(starts)):
        ax.axvline(start, color="grey", ls=":", lw=1,
                   label="fine-tuning begins" if i == 0 else None)
    ax.set_xlabel("epoch (head, then fine-tune)")
    ax.set_ylabel("val macro-F1")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, ncols=columns,
              frameon=False)
    return _save(fig, path)
