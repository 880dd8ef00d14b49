"""Are the probabilities honest? Expected calibration error and temperature scaling."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.special import softmax as scipy_softmax


def _answered(probs: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of the class answered: the top one, or `y_pred` (a taxonomy's
    top-down branch ends in a class that need not be the top species)."""
    y_pred = probs.argmax(1) if y_pred is None else np.asarray(y_pred)
    return probs[np.arange(len(probs)), y_pred], y_pred == y_true


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 15,
                               y_pred: np.ndarray | None = None) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size,
    of the class answered (`_answered`): the bins of the reliability diagram beside it."""
    r = reliability(probs, y_true, bins, y_pred)
    n = r["counts"].sum()
    return float((r["counts"] * np.abs(r["accuracy"] - r["confidence"])).sum() / n) if n else 0.0


def reliability(probs: np.ndarray, y_true: np.ndarray, bins: int = 15,
                y_pred: np.ndarray | None = None) -> dict:
    """Per-bin confidence, accuracy and count of the class answered, for the reliability
    diagram; bins are (lo, hi], the first [0, hi]."""
    confidence, correct = _answered(probs, y_true, y_pred)
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    acc = np.bincount(index, weights=correct, minlength=bins) / np.maximum(counts, 1)
    conf = np.bincount(index, weights=confidence, minlength=bins) / np.maximum(counts, 1)
    return {"edges": edges, "accuracy": acc, "confidence": conf, "counts": counts}


MIN_T, MAX_T = 0.25, 10.0


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature T that minimises the negative log-likelihood of softmax(logits / T).

    One number, fitted on validation data: it changes confidence, never the ranking.
    A val split with no mistake names no such T (below).
    """
    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true)
    if _all_right(logits, y_true):
        # Every val image right: the likelihood keeps rising as T -> 0, which would make
        # every probability 1.0 (and did: T ran to its bound, 0.25). What n right of n
        # does say is an accuracy of about (n + 1) / (n + 2) (Laplace's rule of
        # succession), so T is set where the mean top probability on val is that. On
        # Leeds (167 of 167) that is T 0.51-0.54, and the ECE on iNat field photos of the
        # same species falls from 0.18-0.22 at the bound to 0.07-0.11.
        n = len(y_true)
        return _temperature_for_confidence(logits, (n + 1) / (n + 2))
    with torch.inference_mode(False), torch.enable_grad():  # callers may be in either
        x = torch.tensor(logits, dtype=torch.float64)
        y = torch.tensor(y_true, dtype=torch.long)
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # T = exp(log_t) > 0
        optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    # Bounded: with (near) perfect validation predictions the optimum runs off to T -> 0,
    # which would make every probability 1.0.
    return float(log_t.detach().exp().clamp(MIN_T, MAX_T))


# Fewer val images say little about a temperature: `calibrate` refuses them, training
# (which must finish) fits on them and says so (see evaluate.calibrate.check_enough_to_calibrate).
MIN_CALIBRATION_IMAGES = 10


def calibration_record(logits: np.ndarray, y_true: np.ndarray, fitted_on: str,
                       answer: Callable[[np.ndarray], np.ndarray] | None = None,
                       previous: float | None = None) -> dict:
    """fit_temperature's T, and what a bundle's manifest keeps of it: on how many images and
    how it was set, whether it stopped at a bound of its search, and the ECE on them before
    any temperature and after this one. `answer`: the class answered for probabilities
    (N, C) at temperature 1, as evaluate scores it (a taxonomy's top-down branch, chosen at
    T 1 whatever the temperature: no temperature changes an answer); by default the top
    class.
    `previous`: the temperature this one replaces (`wingspan calibrate`), whose ECE on the
    same images is recorded too: what the fit changed for the user."""
    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true)
    temperature = fit_temperature(logits, y_true)

    y_pred = None if answer is None else answer(softmax(logits))

    def ece(t: float) -> float:  # binned as evaluate bins it, so the figures agree
        return expected_calibration_error(softmax(logits, t), y_true, y_pred=y_pred)

    return {"temperature": temperature, "fitted_on": fitted_on, "images": len(y_true),
            "method": ("rule of succession (no mistake to fit on)"
                       if _all_right(logits, y_true) else "likelihood"),
            "at_bound": not MIN_T < temperature < MAX_T,
            "val_ece_before": ece(1.0), "val_ece_after": ece(temperature),
            **({"previous_temperature": previous, "val_ece_previous": ece(previous)}
               if previous is not None else {})}


def bound_warning(record: dict) -> str | None:
    """What to say of a temperature that stopped at a bound of its search: the best one
    lies beyond it, so the probabilities are still too sure (or too unsure) after it."""
    if not record.get("at_bound"):
        return None
    t = record["temperature"]
    side, sure = ("lower", "too unsure") if t <= MIN_T else ("upper", "too sure")
    return (f"the temperature stopped at the {side} bound of its search ({MIN_T:g}-{MAX_T:g}): "
            f"the best fit lies beyond it, so the probabilities are still {sure} (ECE "
            f"{record['val_ece_after']:.4f} on the {record['images']} images it was fitted "
            "on); `wingspan calibrate RUN DATA` (run.calibrate(data) in Python) fits it again on "
            "other labelled photos (on the same images again it would stop there too).")


def calibrate_warnings(record: dict) -> list[str]:
    """What `wingspan calibrate` warns of: a temperature at a bound of its search, or fitted
    on images the run trained on (it is surer of them than of new photos, so the fit comes
    out too sure) or on its test images (whose calibration figures it then flatters)."""
    notes = [bound_warning(record)] if bound_warning(record) else []
    among = record.get("run_images_among") or {}
    if among.get("train"):
        notes.append(f"{among['train']} of the {record['images']} images the temperature was "
                     "fitted on are ones the model was trained on: it is surer of those than "
                     "of new photos, so the probabilities come out too sure. Fit it on images "
                     "it never trained on (the run's val split: `wingspan calibrate RUN`, or "
                     "run.calibrate() in Python).")
    if among.get("adapted"):
        notes.append(f"{among['adapted']} of the {record['images']} images the temperature was "
                     "fitted on are photos `wingspan adapt` (run.adapt in Python) refitted "
                     "this model's head on: it is surer of those than of new photos, so the "
                     "probabilities come out too sure. Fit it on photos not given to adapt.")
    if among.get("test"):
        notes.append(f"{among['test']} of the {record['images']} images the temperature was "
                     "fitted on are the run's test images: their evaluation's calibration "
                     "figures (ECE, reliability) are now optimistic; its accuracy and F1 "
                     "are not.")
    kept = record.get("unknown_temperature")
    if kept is not None and round(kept, 3) != round(record["temperature"], 3):
        notes.append(f"The unknown answer keeps the temperature its scores and thresholds were "
                     f"fitted at (T {kept:.3f}), so it turns away the same images as before: "
                     "`wingspan calibrate RUN --unknown` fits them again at the new one.")
    return notes


def _all_right(logits: np.ndarray, y_true: np.ndarray) -> bool:
    """No mistake: the case in which the likelihood names no temperature."""
    return len(y_true) > 0 and bool((logits.argmax(1) == y_true).all())


def _temperature_for_confidence(logits: np.ndarray, confidence: float) -> float:
    """The T in [MIN_T, MAX_T] at which the mean top probability is `confidence` (it falls
    as T rises: one root, or a bound)."""
    from scipy.optimize import brentq

    def gap(log_t: float) -> float:
        return float(softmax(logits, float(np.exp(log_t))).max(1).mean()) - confidence

    low, high = np.log(MIN_T), np.log(MAX_T)
    if gap(low) <= 0:
        return MIN_T
    if gap(high) >= 0:
        return MAX_T
    return float(np.exp(brentq(gap, low, high, xtol=1e-9)))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities (N, C) from logits at a temperature (scipy's stable softmax)."""
    return scipy_softmax(logits / temperature, axis=1)
