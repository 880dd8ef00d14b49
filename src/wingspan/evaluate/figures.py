"""The figures of an evaluation's report: which it draws, and from what (the drawing
itself: plots.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd

from wingspan.config import AugmentConfig
from wingspan.data.plots import plot_class_balance
from wingspan.data.preview import write_preview
from wingspan.data.samples import SPLIT
from wingspan.errors import WingspanError
from wingspan.evaluate import plots as charts  # not `plots`: evaluate() has a plots= flag
from wingspan.evaluate.answers import said_otherwise
from wingspan.evaluate.calibration import reliability
from wingspan.evaluate.hierarchy import confusion_tree
from wingspan.inference import Predictor
from wingspan.training.folder import HISTORY_FILE, read_history


def report_figures(out_dir, predictor, dataset, level, run_dir, cm, classes, paths, ok, y,
                   y_pred, probs, raw: tuple[np.ndarray, np.ndarray], metrics: dict,
                   read: list, own: bool) -> dict:
    """The report's figures; `raw`: the probabilities at T 1 and the classes answered at it
    (the reliability diagram sets them beside the calibrated ones, with both ECEs)."""
    pngs = {"confusion": charts.plot_confusion(cm, classes, out_dir / "confusion.png",
                                               tree=confusion_tree(predictor.taxonomy,
                                                                   predictor.level))}
    wrong = np.flatnonzero(y_pred != y)
    p_pred = probs[np.arange(len(y_pred)), y_pred]
    worst = wrong[np.argsort(-p_pred[wrong])][:18]
    told = predictor.unknown is not None  # else the answer is always the top class
    shown = [{"path": paths[ok[i]], "true": classes[y[i]], "predicted": classes[y_pred[i]],
              "probability": float(p_pred[i]),
              "answer": said_otherwise(predictor, read[i]) if told else None} for i in worst]
    pngs["mistakes"] = charts.plot_mistakes(
        [{**m, **_grad_cam_view(predictor, paths[ok[i]], int(y_pred[i]))}
         for m, i in zip(shown, worst, strict=True)], out_dir / "mistakes.png")
    # The figure's captions as text too: 9 px high in the report, 3 px on a phone, and
    # nothing to a screen reader.
    pngs["mistakes_shown"] = pd.DataFrame(
        [{"image": Path(m["path"]).name, "true class": m["true"], "named": m["predicted"],
          "probability": m["probability"], **({"answered": m["answer"] or m["predicted"]}
                                              if told else {})} for m in shown])
    pngs["reliability"] = charts.plot_reliability(
        reliability(raw[0], y, y_pred=raw[1]), reliability(probs, y, y_pred=y_pred),
        (metrics["ece_uncalibrated"], metrics["ece"]), out_dir / "reliability.png")
    counts = dataset.table[level].value_counts()
    pngs["balance"] = plot_class_balance(counts, level, out_dir / "balance.png")
    if run_dir and (run_dir / HISTORY_FILE).is_file():
        with contextlib.suppress(WingspanError):  # damaged: the report goes without curves
            pngs["curves"] = charts.plot_curves(read_history(run_dir), out_dir / "curves.png",
                                                predictor.manifest.get("metrics", {}).get("best"))
    # The run's own training images, augmented as it trained: not other data's, which the
    # report would show as if the model had been trained on them.
    train = (dataset.table[SPLIT] == "train") & own
    if train.any():
        policy = predictor.manifest.get("training", {}).get("augment", "standard")
        try:
            pngs["preview"] = write_preview(
                dataset.subset(train.to_numpy()), out_dir / "preview.png",
                AugmentConfig(policy=policy, image_size=predictor.size,
                              eval_crop=predictor.config.eval_crop), level, rows=4,
                augmented=4, interpolation=predictor.norm["interpolation"])
        except WingspanError:  # no training image reads: the report goes without a preview
            pass
    return pngs


def _grad_cam_view(predictor: Predictor, path: str, target: int) -> dict:
    """The model's view of an image and its Grad-CAM for `target` (the wrong class), for
    the mistakes gallery; nothing when the image cannot be read or explained."""
    from wingspan.data.images import open_rgb
    from wingspan.explain import grad_cam, model_view

    try:
        x = predictor.views(tta=False)[0](open_rgb(path, draft=predictor.draft))
        return {"pixels": model_view(x, predictor), "heatmap": grad_cam(predictor, x, target)}
    except Exception:  # noqa: BLE001 - the gallery shows the plain image instead
        return {}
