"""Open-set figures: how well the unknown score separates images of the model's classes
from images of classes it never saw, and what its threshold costs the known ones."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from wingspan.evaluate.metrics import macro_f1

TPR = 0.95  # FPR is reported where this share of known images is kept


def separation(known: np.ndarray, unknown: np.ndarray) -> dict:
    """AUROC (unseen images as positives, higher score = unknown) and the share of unseen
    images still taken for known where 95% of the known images are kept (FPR95)."""
    truth = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
    # The lowest known score with at least 95% of the known images at or below it (the
    # first cut of an ROC curve at TPR >= 0.95): the default interpolation fell between two
    # scores and kept fewer (25 of 27), so the FPR read lower than it is.
    keep_up_to = np.quantile(known, TPR, method="inverted_cdf")
    return {"auroc": float(roc_auc_score(truth, np.r_[known, unknown])),
            "fpr95": float((unknown <= keep_up_to).mean())}


def openset_metrics(known: np.ndarray, unknown: np.ndarray, threshold: float,
                    y: np.ndarray, y_pred: np.ndarray, unknown_pred: np.ndarray,
                    labels: np.ndarray, known_away: np.ndarray | None = None,
                    unknown_away: np.ndarray | None = None) -> dict:
    """At the model's threshold: the share of each kind turned away, and macro-F1 over the
    known classes (1) without the unknown answer, (2) on the known images with it (a
    known image turned away is a miss) and (3) open-set: known and unseen images together,
    where an unseen image given a class is a false positive of that class. Predictions are
    class indices; -1 is "unknown". Which images are turned away: those scoring above
    `threshold`, unless `known_away` and `unknown_away` say (a model with a taxonomy names
    a species only when every coarser level passes its own threshold too). `labels`: the
    classes the macro averages cover, as the evaluation's own macro figures do."""
    labels = list(labels)
    known_away = known > threshold if known_away is None else known_away
    unknown_away = unknown > threshold if unknown_away is None else unknown_away
    answered = np.where(known_away, -1, y_pred)
    unseen_answered = np.where(unknown_away, -1, unknown_pred)

    def macro(truth, pred):  # (the unknown answer, -1, is in no class's average)
        return macro_f1(truth, pred, labels=labels)

    return {
        **separation(known, unknown), "threshold": float(threshold),
        "known_turned_away": float(known_away.mean()),
        "unseen_flagged": float(unknown_away.mean()),
        "known_accuracy": float((y_pred == y).mean()),
        "known_accuracy_with_unknown": float((answered == y).mean()),
        "known_macro_f1": macro(y, y_pred),
        "known_macro_f1_with_unknown": macro(y, answered),
        "open_macro_f1": macro(np.r_[y, np.full(len(unknown), -1)],
                               np.r_[answered, unseen_answered]),
        "open_macro_f1_without_unknown": macro(np.r_[y, np.full(len(unknown), -1)],
                                               np.r_[y_pred, unknown_pred]),
    }
