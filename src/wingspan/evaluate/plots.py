"""Evaluation plots: confusion matrix, training curves, worst mistakes, reliability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from wingspan.data.images import open_rgb
from wingspan.plotting import plt

MANY = 30  # above this many classes the confusion matrix drops its labels


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> Path:
    """Rows normalised (recall per class) for colour, counts written in the cells.

    With many classes, names and counts would be unreadable: the matrix is sorted by class
    frequency, drawn without labels, and the most confused pairs are listed beside it.
    """
    n = len(classes)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    if n <= MANY:
        fig, ax = plt.subplots(figsize=(2.5 + 0.45 * n, 2 + 0.4 * n))
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for t in range(n):
            for p in range(n):
                if cm[t, p]:
                    ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=7,
                            color="white" if norm[t, p] > 0.5 else "black")
        ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    else:
        order = np.argsort(-cm.sum(1), kind="stable")
        fig, ax = plt.subplots(figsize=(9, 8))
        im = ax.imshow(norm[np.ix_(order, order)], cmap="Blues", vmin=0, vmax=1,
                       interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{n} classes, sorted by number of images (largest top-left)")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    return _save(fig, path)


def plot_curves(history: pd.DataFrame, path: Path) -> Path:
    """Loss, accuracy and macro-F1 per epoch for train and val; the stage change marked."""
    h = history.reset_index(drop=True)
    x = np.arange(1, len(h) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ["loss", "acc", "macro_f1"], strict=True):
        ax.plot(x, h[f"train_{metric}"], "o-", ms=3, label="train")
        ax.plot(x, h[f"val_{metric}"], "o-", ms=3, label="val")
        ax.set_title({"loss": "loss", "acc": "accuracy", "macro_f1": "macro-F1"}[metric])
        ax.set_xlabel("epoch (all stages)")
        changes = np.flatnonzero(h["stage"].to_numpy()[1:] != h["stage"].to_numpy()[:-1])
        for c in changes:
            ax.axvline(c + 1.5, color="grey", ls="--", lw=1)
            ax.text(c + 1.6, ax.get_ylim()[1], f" {h['stage'][c + 1]}", va="top", fontsize=8,
                    color="grey")
        ax.grid(alpha=0.3)
    axes[0].legend()
    return _save(fig, path)


def mistake_title(m: dict) -> str:
    """A mistake's caption; where the unknown answer (or a coarser level) replaced the
    wrong class, what the user was told instead."""
    told = m.get("answer")
    return (f"true: {m['true'][:22]}\npred: {m['predicted'][:22]}\np = {m['probability']:.2f}"
            + (f", answered {told[:16]}" if told and told != m["predicted"] else ""))


def plot_mistakes(mistakes: list[dict], path: Path, columns: int = 6) -> Path:
    """The most confident wrong predictions: image, truth, prediction, probability (and the
    answer given, where it was not that class); with the model's view and its Grad-CAM
    for the wrong class where given ("pixels", "heatmap"): what the model took for
    evidence."""
    n = max(1, len(mistakes))
    columns = min(columns, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, mistakes, strict=False):
        try:
            if m.get("pixels") is not None:
                ax.imshow(m["pixels"])
                ax.imshow(m["heatmap"], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            else:
                image = open_rgb(m["path"], draft=256)
                image.thumbnail((256, 256))
                ax.imshow(image)
        except Exception:  # a file gone since prediction: show the text alone
            pass
        ax.set_title(mistake_title(m), fontsize=7)
    if not mistakes:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    return _save(fig, path)


def plot_reliability(before: dict, after: dict, ece: tuple[float, float], path: Path) -> Path:
    """Accuracy against confidence per bin; a calibrated model follows the diagonal."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
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


def plot_unknown_scores(known: np.ndarray, unknown: np.ndarray, threshold: float,
                        score: str, path: Path) -> Path:
    """The unknown score of known-class images against images of classes never seen, with
    the threshold: what lies right of it is answered "unknown"."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    both = np.concatenate([known, unknown])
    lo, hi = np.quantile(both, [0.0, 0.995])
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
    ax.hist(np.clip(known, lo, hi), bins=bins, alpha=0.6, density=True,
            label=f"known classes ({len(known)})", color="C0")
    ax.hist(np.clip(unknown, lo, hi), bins=bins, alpha=0.6, density=True,
            label=f"unseen classes ({len(unknown)})", color="C3")
    ax.axvline(threshold, color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel(f"unknown score ({score}; higher = less like the training images)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _save(fig, path)
