"""Classification metrics from predictions, all computed by scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from wingspan.evaluate.calibration import expected_calibration_error


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                           ks: tuple[int, ...] = (3, 5), truth_only: bool = False) -> dict:
    """Everything `wingspan evaluate` reports about one label level.

    `y_true` holds class indices into `classes`; `probs` is (N, C). Averages are over the
    classes that occur in `y_true` or the predictions (scikit-learn's convention), or with
    `truth_only` over those in `y_true` alone: for data holding a few of the model's
    classes, where the others would each add an F1 of 0 to the macro average.
    """
    y_pred = probs.argmax(1)
    labels = np.arange(len(classes))
    result: dict = {"images": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred))}
    for k in ks:
        if k < len(classes):
            result[f"top{k}_accuracy"] = float(top_k_accuracy_score(y_true, probs, k=k,
                                                                    labels=labels))
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, average=average, zero_division=0,
            labels=np.unique(y_true) if truth_only else None)
        result[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    result["cohen_kappa"] = float(cohen_kappa_score(y_true, y_pred, labels=labels))
    result["ece"] = expected_calibration_error(probs, y_true)
    return result


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support of every class."""
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=np.arange(len(classes)),
                                                 zero_division=0)
    return pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s})


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))


def most_confused(cm: np.ndarray, classes: list[str], n: int = 15) -> list[dict]:
    """The largest off-diagonal cells: which true class is taken for which, how often."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:n]
    pairs = []
    for i in flat:
        t, p = np.unravel_index(i, off.shape)
        if off[t, p] == 0:
            break
        pairs.append({"true": classes[t], "predicted": classes[p], "count": int(off[t, p]),
                      "share_of_true": float(off[t, p] / max(cm[t].sum(), 1))})
    return pairs
