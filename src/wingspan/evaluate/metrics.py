"""Classification metrics from predictions: scikit-learn's, with intervals (scipy's exact
binomial one for accuracy; a bootstrap of macro-F1 written here, see confidence_intervals)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from wingspan.evaluate.calibration import expected_calibration_error


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                           ks: tuple[int, ...] = (3, 5), truth_only: bool = False,
                           y_pred: np.ndarray | None = None) -> dict:
    """Everything `wingspan evaluate` reports about one label level.

    `y_true` holds class indices into `classes`; `probs` is (N, C). Averages are over the
    classes that occur in `y_true` or the predictions (scikit-learn's convention), or with
    `truth_only` over those in `y_true` alone: for data holding a few of the model's
    classes, where the others would each add an F1 of 0 to the macro average. `y_pred`:
    the class answered, when it is not the top one (a taxonomy's top-down branch).
    """
    y_pred = probs.argmax(1) if y_pred is None else y_pred
    labels = np.arange(len(classes))
    result: dict = {"images": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred))}
    # The answer first, then the likeliest others: a taxonomy's answer (its top-down
    # branch) need not be the finest head's top class, and ranked by the head alone top-3
    # came out below accuracy.
    ranked = np.array(probs, dtype=np.float64)
    ranked[np.arange(len(y_pred)), y_pred] = ranked.max(initial=0.0) + 1.0  # (finite)
    for k in ks:
        if k < len(classes):
            result[f"top{k}_accuracy"] = float(top_k_accuracy_score(y_true, ranked, k=k,
                                                                    labels=labels))
    for average in ("macro", "micro", "weighted"):
        # Micro counts every prediction (it equals accuracy): leaving the classes that are
        # not in y_true out of it would drop the mistakes into them.
        only = truth_only and average != "micro"
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, average=average, zero_division=0,
            labels=averaged_classes(y_true, y_pred, only))
        result[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    with warnings.catch_warnings():  # one class in truth and predictions: no kappa, and
        # "-" in the summary says so (scikit-learn's warning would only repeat it)
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        kappa = float(cohen_kappa_score(y_true, y_pred, labels=labels))
    result["cohen_kappa"] = None if np.isnan(kappa) else kappa  # NaN: one class; JSON: null
    result["ece"] = expected_calibration_error(probs, y_true, y_pred=y_pred)
    result["interval"] = confidence_intervals(y_true, y_pred, len(classes), truth_only)
    return result


def averaged_classes(y_true: np.ndarray, y_pred: np.ndarray, truth_only: bool = False
                     ) -> np.ndarray:
    """The class indices the macro averages cover: those in the truth or the predictions
    (scikit-learn's convention), or with `truth_only` those in the truth alone."""
    return np.unique(y_true) if truth_only else np.union1d(y_true, y_pred)


def confidence_intervals(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int,
                         truth_only: bool = False, confidence: float = 0.95,
                         resamples: int = 1000, seed: int = 0) -> dict | None:
    """Intervals of accuracy and macro-F1 over the evaluated images: how far the figures
    could move on another sample of as many images. On a test split of a few hundred photos
    that is several points, more than most recipe changes (docs/performance.md).
    - accuracy: the exact binomial (Clopper-Pearson) interval of the share right. A
      bootstrap says nothing when every image is right (every resample is all right too):
      33 of 33 gave "1.000-1.000", where the share right could well be 0.9;
    - macro-F1: the percentile bootstrap, as no formula gives its spread: images resampled
      with their predictions within each class (`stratified_resamples`: each class's count
      held, so a class of one image adds no spread), the figure's classes averaged in every
      resample; null when no resample moves it as every image is right (`interval_text`
      then says so: [1.0, 1.0] read as certainty to a reader of metrics.json), none when no
      resample moves it as every class has one image.
    None for no image; accuracy's alone for one (0.025-1.000 for one right, 0.000-0.975 for
    one wrong)."""
    if len(y_true) < 1:
        return None
    right = int((np.asarray(y_true) == np.asarray(y_pred)).sum())
    accuracy = binomtest(right, len(y_true)).proportion_ci(confidence, method="exact")
    if len(y_true) == 1:  # (a bootstrap of one image is that image)
        return {"confidence": confidence, "accuracy": [float(accuracy.low),
                                                       float(accuracy.high)]}
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    counted = np.zeros(n_classes, dtype=bool)  # the figure's classes, in every resample
    counted[averaged_classes(y_true, y_pred, truth_only)] = True
    rng, scores = np.random.default_rng(seed), []
    batch = max(1, 2_000_000 // (len(y_true) + n_classes))  # bounded memory
    for start in range(0, resamples, batch):
        rows = stratified_resamples(y_true, min(batch, resamples - start), rng)
        scores.append(resampled_macro_f1(y_true[rows], y_pred[rows], n_classes,
                                         counted=counted))
    tail = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(scores), [tail, 1 - tail])
    sizes = np.bincount(y_true, minlength=n_classes)[counted]
    found = {"confidence": confidence, "resamples": resamples,
             "accuracy": [float(accuracy.low), float(accuracy.high)],
             "macro_f1": [float(low), float(high)],
             # a class of 1-2 images adds (next to) no spread: the interval is too narrow
             "classes_of_few_images": int(((sizes >= 1) & (sizes <= 2)).sum()),
             "classes": int(len(sizes))}
    if low == high and right < len(y_true):  # each class one image: held, not known
        del found["macro_f1"]
    elif low == high:  # every image right: said instead (README)
        found["macro_f1"] = None
    return found


def stratified_resamples(y_true: np.ndarray, resamples: int, rng: np.random.Generator
                         ) -> np.ndarray:
    """(resamples, N) image indices, each class's images drawn with replacement from its
    own: every resample holds as many images of each class as the evaluation. Hand-written
    as scipy's bootstrap draws from all images at once, and a resample that misses a class
    of 1-2 images (mostly wrong) leaves its F1 of 0 out of the average: on a long tail (a
    fake ETHEC test split, 15 of 47 classes with 1-2 images) the figure sat at the bottom
    of its own interval, 0.559 in 0.557-0.664."""
    order = np.argsort(y_true, kind="stable")
    sorted_y = y_true[order]
    first = np.searchsorted(sorted_y, sorted_y, side="left")  # each slot's class block
    size = np.searchsorted(sorted_y, sorted_y, side="right") - first
    draws = (rng.random((resamples, len(y_true))) * size).astype(np.int64)
    return order[first + draws]


def macro_f1(y_true, y_pred, labels=None, truth_only: bool = False) -> float:
    """The macro-F1 of one set of answers, as every figure of wingspan averages it (each
    training epoch's, evaluate's, each taxonomic level's, the open set's): over `labels`,
    else the classes in the truth or the answers, or with `truth_only` the truth's alone
    (`averaged_classes`)."""
    if labels is None:
        labels = averaged_classes(np.asarray(y_true), np.asarray(y_pred), truth_only)
    return float(f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0))


def resampled_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int,
                       truth_only: bool = False, axis: int = -1,
                       counted: np.ndarray | None = None) -> np.ndarray:
    """Macro-F1 as `classification_metrics` averages it, for a batch of resamples at once
    (the last axis holds the images): scikit-learn's f1_score takes one sample per call,
    which is 1000 calls per interval. Each class present (in the truth or the predictions,
    or with `truth_only` in the truth) counts, with F1 = 2TP / (2TP + FP + FN); or the
    classes of the boolean mask `counted`, in every resample."""
    y, p = np.moveaxis(y_true, axis, -1), np.moveaxis(y_pred, axis, -1)
    if y.size and (min(y.min(), p.min()) < 0 or max(y.max(), p.max()) >= n_classes):
        raise ValueError(f"class indices must be in 0..{n_classes - 1}")  # else: another row
    shape = y.shape[:-1]
    if not y.shape[-1]:  # no images: no figure
        return np.full(shape, np.nan)
    y, p = y.reshape(-1, y.shape[-1]), p.reshape(-1, p.shape[-1])
    offset = (np.arange(len(y)) * n_classes)[:, None]  # one row of counts per resample

    def counts(index: np.ndarray) -> np.ndarray:
        return np.bincount(index.ravel(), minlength=len(y) * n_classes).reshape(len(y), -1)

    true_positive = counts((offset + y)[y == p])
    support, predicted = counts(offset + y), counts(offset + p)
    if counted is not None:
        present = np.broadcast_to(counted, support.shape)
    else:
        present = support > 0 if truth_only else (support + predicted) > 0
    denominator = support + predicted  # 2TP + FP + FN
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros(denominator.shape),
                   where=denominator > 0)
    return ((f1 * present).sum(1) / present.sum(1)).reshape(shape)


def summary_rows(m: dict) -> list[tuple[str, str]]:
    """The headline figures of an evaluation's metrics as (label, value) rows, as the
    terminal, the report and a notebook show them: accuracy and top-k, precision / recall
    / F1 per average (with the intervals), Cohen's kappa."""
    rows = [("accuracy", f"{m['accuracy']:.4f}{interval_text(m, 'accuracy')}")]
    rows += [(k.replace("_", " "), f"{m[k]:.4f}") for k in m if k.startswith("top")]
    rows += [(f"{avg} precision / recall / F1", f"{m[avg]['precision']:.4f} / "
              f"{m[avg]['recall']:.4f} / {m[avg]['f1']:.4f}"
              + (interval_text(m, "macro_f1") if avg == "macro" else ""))
             for avg in ("macro", "micro", "weighted")]
    kappa = m["cohen_kappa"]
    return [*rows, ("Cohen's kappa", "-" if kappa is None else f"{kappa:.4f}")]


def ece_row(m: dict) -> tuple[str, str]:
    """The calibration error before and after the temperature, as the terminal and a
    notebook show it (the report gives it a section): optimistic where the temperature
    was fitted on the images evaluated."""
    fitted_here = m["calibration"].get("same_data_as_evaluation")
    return ("ECE (temperature)", f"{m['ece_uncalibrated']:.4f} -> {m['ece']:.4f} "
            f"(T = {m['temperature']:.2f}"
            + ("; optimistic: fitted on these images" if fitted_here else "") + ")")


def interval_text(metrics: dict, name: str) -> str:
    """' (95% CI low-high)' for a figure with an interval, else ''."""
    interval = metrics.get("interval")
    if not interval:
        return ""
    few = (f"; {interval['classes_of_few_images']} of its {interval['classes']} classes "
           f"{'has' if interval['classes_of_few_images'] == 1 else 'have'} 1-2 images here, "
           "whose chance it leaves out: too few to judge them"
           if name == "macro_f1" and interval.get("classes_of_few_images") else "")
    if (name == "macro_f1" and name not in interval and metrics.get("images", 0) > 1) or \
            interval.get(name, 0) is None:  # (no resample moves it: a wrong answer too)
        return (" (no resample of the images moves it: the model gave every image of a class "
                f"the same answer; see accuracy's interval{few})")
    if name not in interval:
        return ""
    low, high = interval[name]
    return f" ({interval['confidence']:.0%} CI {low:.3f}-{high:.3f}{few})"


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str],
                    truth_only: bool = False) -> pd.DataFrame:
    """Precision, recall, F1 and support of each class the macro averages cover (see
    `averaged_classes`): a class left out of them is left out here too, not listed with
    an F1 of 0 it was never scored on."""
    labels = averaged_classes(y_true, y_pred, truth_only)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                 zero_division=0)
    return pd.DataFrame({"class": [classes[i] for i in labels], "precision": p, "recall": r,
                         "f1": f, "support": s.astype(int)})


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    with warnings.catch_warnings():  # one class everywhere (a taxonomy's single family):
        # scikit-learn warns of a shape that `labels` already fixes
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        return confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))


def most_confused(cm: np.ndarray, classes: list[str], n: int = 15,
                  tree: tuple[np.ndarray, list[str]] | None = None) -> list[dict]:
    """The largest off-diagonal cells: which true class is taken for which, how often;
    ties by the larger share of the true class, then in the matrix's order (an unstable
    sort listed 15 of 47 pairs of one image each in no order at all). `tree`: each class's
    ancestors (a row a class, coarse to fine) and their levels; each pair then names the
    deepest level its two classes share, "none" where they part at the top (a near miss
    in one genus, or a mistake across families)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    share = off / np.maximum(cm.sum(1, keepdims=True), 1)
    t, p = np.nonzero(off)
    order = np.lexsort((p, t, -share[t, p], -off[t, p]))[:n]  # (the last key sorts first)
    pairs = [{"true": classes[t[i]], "predicted": classes[p[i]], "count": int(off[t[i], p[i]]),
              "share_of_true": float(share[t[i], p[i]])} for i in order]
    if tree is not None:
        ancestors, levels = tree
        for pair, i in zip(pairs, order, strict=True):
            # (the levels alike from the top down: in a tree, the first that differs
            # parts them below it too)
            shared = int(np.cumprod(ancestors[t[i]] == ancestors[p[i]]).sum())
            pair["shared_level"] = levels[shared - 1] if shared else "none"
    return pairs


def confused_pairs(cm: np.ndarray) -> int:
    """How many (true, predicted) pairs of different classes have an image."""
    return int(np.count_nonzero(cm) - np.count_nonzero(np.diag(cm)))
