"""What predict answers, and what the unknown answer does: on the known images (how many it
names a class, how often rightly) and on images of unseen classes (--unknown: the open-set
figures, unknown.csv and unknown.png)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from wingspan.errors import WingspanError, none_read
from wingspan.evaluate import plots as charts  # not `plots`: evaluate() has a plots= flag
from wingspan.evaluate.openset import openset_metrics, separation
from wingspan.files import write_csv
from wingspan.inference import Predictor
from wingspan.predict import answer_for, deciding_score


def unknown_answer_figures(predictor: Predictor, preds: list, named: np.ndarray,
                           y: np.ndarray, y_pred: np.ndarray,
                           truth: dict[str, np.ndarray] | None) -> dict:
    """What the unknown answer does on these images: the share `named` a class at the
    model's level (the rest are answered "unknown", or with a taxonomy a coarser level) and
    how often that class is right. On data unlike the training data (--map) this is the
    figure a user acts on: a model may name few photos and be right on all of them. With a
    taxonomy the answer is a branch cut at the deepest level that passes its threshold
    together with every coarser one, so `by_level` gives the same figures at every level:
    the share answered at least that deep, and how often the branch's class there is
    right. An image the data leaves blank at a level (`truth` -1) is left out of that
    level's figures, as out of the levels' own."""
    taxonomy = predictor.taxonomy
    if taxonomy is None:
        return {"score": predictor.unknown_score, "rate": predictor.unknown.rate,
                **_answer_figures(named, y == y_pred)}
    # Predict names the top-down branch's class, which may differ from the flat argmax.
    branch = taxonomy.predict(np.stack([p.probs for p in preds]),
                              temperature=predictor.temperature)
    truth = {**truth, taxonomy.finest: y}  # (y: the finest level's, as the flat figures')
    depth = {lv: i for i, lv in enumerate(taxonomy.levels)}
    reach = np.array([depth.get(p.known_level, -1) for p in preds])
    merged = np.isin(branch[taxonomy.finest], [i for i, c in enumerate(
        taxonomy.classes[taxonomy.finest]) if c in predictor.merged])
    reach[merged & (reach == depth[taxonomy.finest])] -= 1  # named at the genus (answered)
    known = {lv: truth[lv] >= 0 for lv in taxonomy.levels}
    by_level = {lv: _answer_figures((reach >= depth[lv])[known[lv]],
                                    (truth[lv] == branch[lv])[known[lv]])
                for lv in taxonomy.levels}
    return {"score": predictor.unknown_score, "rate": predictor.unknown.rate,
            **by_level[taxonomy.finest], "by_level": by_level}


def _answer_figures(named: np.ndarray, right: np.ndarray) -> dict:
    if not len(named):  # (no image with a truth at this level)
        return {"named": None, "accuracy_when_named": None, "named_wrongly": None}
    return {"named": float(named.mean()),
            "accuracy_when_named": float(right[named].mean()) if named.any() else None,
            "named_wrongly": float((named & ~right).mean()),
            # (1.0000 on the one image named read as a fact)
            "images_named": int(named.sum()), "right_when_named": int(right[named].sum())}


def named_share(named: np.ndarray | None, y: np.ndarray, classes: list[str]
                ) -> dict[str, float] | None:
    """Per class with images, the share the unknown answer names a class for."""
    if named is None:
        return None
    images = np.bincount(y, minlength=len(classes))
    shares = np.bincount(y, weights=named, minlength=len(classes)) / np.maximum(images, 1)
    return {c: float(shares[k]) for k, c in enumerate(classes) if images[k]}


def openset_figures(predictor: Predictor, unknown, paths: list[str], known: list,
                    y: np.ndarray, y_pred: np.ndarray, labels: np.ndarray, out_dir: Path,
                    progress: bool, tta: bool = False, draw: bool = True,
                    missing: list = ()) -> dict:
    """The known images' unknown scores against those of images of unseen classes
    (`paths`, from `unknown`; `missing`: those of it that are no image, with why, counted
    unreadable); writes unknown.csv (each unseen image: answer, score, the class named) and
    unknown.png."""
    seen = list(predictor.run(paths, tta=tta, progress=progress, every_score=True))
    unseen = [p for p in seen if not p.error]
    if not unseen:
        where = unknown if isinstance(unknown, str | Path) else ", ".join(map(str, unknown))
        raise WingspanError(none_read(len(paths), "image", f" in {where}",
                                      example=seen[0].error))
    level, name = predictor.level, predictor.unknown_score
    k = np.array([p.unknown[level] for p in known])
    u = np.array([p.unknown[level] for p in unseen])
    # The figures of what predict answers: a class only where the image is known at the
    # finest level, and with a taxonomy the top-down branch's class (see
    # unknown_answer_figures).
    u_pred = _finest_answer(predictor, unseen)
    result = openset_metrics(k, u, predictor.thresholds[level], y, y_pred, u_pred, labels,
                             known_away=np.array([p.known_level != level for p in known]),
                             unknown_away=np.array([p.known_level != level for p in unseen]))
    result.update(score=name, rate=predictor.unknown.rate, unseen_images=len(unseen),
                  unreadable=[*map(tuple, missing),
                              *((p.path, p.error) for p in seen if p.error)],
                  scores={s: separation(np.array([p.every_score[s] for p in known]),
                                        np.array([p.every_score[s] for p in unseen]))
                          for s in known[0].every_score})
    if predictor.taxonomy:  # an unseen species may still be a known genus or family
        result["named_by"] = "branch"  # the figures count the top-down branch's class
        result["thresholds"] = {lv: float(t) for lv, t in predictor.thresholds.items()}
        result["unseen_known_at"] = {
            lv: sum(p.known_level == lv for p in unseen) for lv in predictor.model.levels}
    # The unseen images that got a class (at some level), surest first: what a user of the
    # model would have been told wrongly.
    said = [answered(predictor, p) for p in unseen]  # (level, answer): predict's
    answers = [answer for _, answer in said]
    named = sorted((i for i, p in enumerate(unseen) if p.known_level is not None),
                   key=lambda i: u[i])
    result["unseen_named"] = [{"path": os.path.abspath(unseen[i].path), "answer": answers[i],
                               "unknown_score": float(u[i])} for i in named[:UNSEEN_LISTED]]
    # The score that decided each answer, its threshold and level, as predict writes them
    # (with levels, each has its own threshold); and the finest level's, which AUROC ranks.
    deciding = pd.DataFrame([deciding_score(predictor, p.unknown) for p in unseen])
    # The answer's columns named and ordered as predictions.csv's (paths absolute: it is
    # read from elsewhere), then the class named and its probability under its names too.
    write_csv(pd.DataFrame({
        "path": [os.path.abspath(p.path) for p in unseen], "answer": answers,
        "known_level": [level or "" for level, _ in said], **deciding.to_dict("list"),
        **({f"{level}_score": u} if predictor.taxonomy else {}),
        "predicted": [predictor.classes[c] for c in u_pred],
        "probability": [float(p.probs[c]) for p, c in zip(unseen, u_pred, strict=True)]}),
        out_dir / "unknown.csv")
    if draw:
        charts.plot_unknown_scores(k, u, predictor.thresholds[level], name,
                                   out_dir / "unknown.png")
    return result


UNSEEN_LISTED = 20  # the unseen images given a class that the report lists (all: unknown.csv)


def _finest_answer(predictor: Predictor, preds: list) -> np.ndarray:
    """The class index predict names at the finest level, whether or not it is turned
    away: the flat argmax, or with a taxonomy the top-down branch's class."""
    return predicted_classes(predictor, np.stack([p.probs for p in preds]), predictor.temperature)


def predicted_classes(predictor: Predictor, probs: np.ndarray, temperature: float) -> np.ndarray:
    """`_finest_answer` from the probabilities (N, classes) at `temperature`."""
    if predictor.taxonomy is None:
        return probs.argmax(1)
    return predictor.taxonomy.answer(probs, temperature=temperature)


def said_otherwise(predictor: Predictor, p) -> str | None:
    """predict's answer for `p` where it is not the finest class ("unknown", a coarser
    class), else None: told by the level, not the text (a class may be named "unknown")."""
    level, said = answered(predictor, p)
    return None if level == predictor.level else said


def answered(predictor: Predictor, p) -> tuple[str | None, str]:
    """(the level predict answers `p` at, its answer): a --rare-below species' answer is
    its genus's, at that level."""
    return answer_for(predictor, p.probs, p.known_level)[1:]
