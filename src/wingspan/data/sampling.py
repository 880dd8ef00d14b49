"""Balancing the training split: an undersampling cap, oversampling, class weights."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.utils.class_weight import compute_class_weight

from wingspan.data.samples import SPLIT, Dataset


def undersample(dataset: Dataset, level: str, max_per_class: int, seed: int = 0,
                split: str | None = "train") -> tuple[Dataset, dict[str, int]]:
    """Keep at most `max_per_class` random samples of each class in `split`.

    Other splits are left alone so evaluation still sees the true class mix; with
    `split=None` the whole dataset is capped. Returns the dataset and how many samples
    of each class were left out.
    """
    table = dataset.table
    target = np.ones(len(table), bool) if split is None else (table[SPLIT] == split).to_numpy()
    rng = np.random.default_rng(seed)
    keep = np.ones(len(table), bool)
    dropped: dict[str, int] = {}
    for label, idx in table[target].groupby(level).indices.items():
        rows = np.flatnonzero(target)[idx]
        if len(rows) > max_per_class:
            keep[rng.choice(rows, len(rows) - max_per_class, replace=False)] = False
            dropped[label] = len(rows) - max_per_class
    return dataset.subset(keep), dropped


def oversample(dataset: Dataset, level: str, min_per_class: int, seed: int = 0,
               split: str = "train") -> tuple[Dataset, dict[str, int]]:
    """Repeat random samples of rare classes in `split` until each has `min_per_class`.

    Returns the dataset (with repeated rows) and how many copies each class gained.
    """
    table = dataset.table
    target = np.flatnonzero((table[SPLIT] == split).to_numpy())
    rng = np.random.default_rng(seed)
    extra: list[np.ndarray] = []
    added: dict[str, int] = {}
    for label, idx in table.iloc[target].groupby(level).indices.items():
        short = min_per_class - len(idx)
        if short > 0:
            extra.append(rng.choice(target[idx], short, replace=True))
            added[label] = short
    order = np.concatenate([np.arange(len(table)), *extra]) if extra else np.arange(len(table))
    return dataset.subset(order), added


def class_weights(labels: pd.Series | np.ndarray | list[str], cap: float = 0
                  ) -> dict[str, float]:
    """Balanced weights, n_samples / (n_classes * count), as scikit-learn computes them;
    with `cap`, at most that many times the commonest class's, as train caps them
    (--max-class-weight)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    if cap and len(weights):
        weights = np.minimum(weights, cap * weights.min())
    return {str(c): float(w) for c, w in zip(classes, weights, strict=True)}


def capped_classes(labels: pd.Series, cap: float) -> list[str]:
    """The classes whose balanced weight `cap` holds down: rarer than the commonest by more
    than cap times. Counted on whole counts, so a class exactly at the cap is not one (the
    weights themselves differ there by a float rounding step)."""
    counts = pd.Series(labels).value_counts()
    return [str(c) for c, n in counts.items() if cap and counts.max() > cap * n]
