"""`wingspan calibrate`: fit a trained model's temperature again, or its unknown scores."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd

from wingspan.config import BATCH_SIZE, UNKNOWN_SCORES, TrainConfig
from wingspan.data.samples import SPLIT
from wingspan.errors import WingspanError, counted
from wingspan.evaluate.answers import predicted_classes
from wingspan.evaluate.calibration import MIN_CALIBRATION_IMAGES, calibration_record
from wingspan.evaluate.fairness import (
    calibration_data,
    copies_among,
    copies_of_own,
    own_splits,
    photo_sums,
)
from wingspan.evaluate.rows import (
    check_no_split_name,
    check_split,
    evaluation_dataset,
    known_rows,
    nothing_read,
)
from wingspan.evaluate.transfer import check_class_map
from wingspan.files import check_writable, real_paths
from wingspan.inference import Predictor, check_reading, find_bundle, run_dir_of
from wingspan.models.bundle import update_manifest
from wingspan.training.folder import (
    adapted_photos,
    adapted_sums,
    hold_lock,
    release_lock,
    trained_on,
)


def check_calibrate_settings(unknown: bool, data, split, class_map, unknown_rate,
                             unknown_score, python: bool = False) -> None:
    """What calibrate takes together, for the CLI and the library alike (`python`: named
    as keywords): with --unknown it fits the unknown scores on the run's own images, so it
    takes no DATA, --split or --map; --unknown-rate and --unknown-score set only those
    scores, so they need --unknown."""
    if python:
        data_, split_, map_, unknown_ = "data", "split", "class_map", "unknown=True"
        rate_, score_, command, leave = "unknown_rate", "unknown_score", "calibrate", "them"
    else:
        data_, split_, map_, unknown_ = "DATA", "--split", "--map", "--unknown"
        rate_, score_, command = "--unknown-rate", "--unknown-score", "`calibrate`"
        leave = "DATA, --split and --map"
    if unknown and (data is not None or split is not None or class_map):
        with_unknown = "calibrate(unknown=True)" if python else "calibrate --unknown"
        raise WingspanError(f"{with_unknown} fits the unknown scores on the run's own train "
                            f"and val images: it takes no {data_}, {split_} or {map_}.",
                            hint=f"Leave {leave} out (without {unknown_} they choose what the "
                                 "temperature is fitted on).")
    if not unknown and (unknown_rate is not None or unknown_score is not None):
        raise WingspanError(f"{rate_} and {score_} set the unknown answer, which {command} "
                            f"fits again only with {unknown_}.",
                            hint=f"Add {unknown_} (the temperature is then left as it is).")


def calibrate(model: str | Path, data: str | Path | None = None, split: str | None = None,
              progress: bool = True, batch_size: int = BATCH_SIZE, workers: int | None = None,
              device: str = "auto", class_map: dict[str, str] | None = None,
              precision: str = "auto", runtime: str = "auto") -> dict:
    """Fit the temperature again, on `split` of DATA (default: the run's own val split;
    DATA's val split, or all of it when it has none), and store it in the bundle: the one
    command that changes a trained model's probabilities (training fits it on its val
    split; evaluate never does). `class_map` {model class: DATA's class}, as evaluate's:
    DATA's images of the model's classes under other names (the same names match anyway);
    the images of classes the model does not know are left out."""
    check_no_split_name(data)
    with _one_at_a_time(model, batch_size, workers):
        predictor = Predictor(model, device=device, batch_size=batch_size, workers=workers,
                              progress=progress, precision=precision, runtime=runtime)
        run_dir = run_dir_of(predictor.bundle)
        dataset = evaluation_dataset(data, run_dir, "fit the temperature on", command="calibrate",
                                     bundle=predictor.bundle)
        level = predictor.level if predictor.level in dataset.levels else dataset.default_level
        if split is None:  # labelled photos from elsewhere often come without a split
            split = "val" if data is None or "val" in set(dataset.table[SPLIT]) else "all"
        check_split(dataset, split)
        class_map = check_class_map(class_map or {}, predictor, dataset, level)
        rows, left_out = known_rows(dataset, split, level, predictor, class_map,
                                    " to calibrate on")
        preds = list(predictor.run(rows["path"].tolist(), progress=progress))
        ok = [i for i, p in enumerate(preds) if not p.error]
        if not ok:
            raise nothing_read([(p.path, p.error) for p in preds], split, data, run_dir,
                               "calibrate")
        check_enough_to_calibrate(len(ok), len(preds), split, predictor.manifest)
        index = {c: i for i, c in enumerate(predictor.classes)}
        y = rows["_label"].map(index).to_numpy()[ok]
        logits = np.stack([preds[i].logits for i in ok])
        fitted = rows["path"].iloc[ok].tolist()
        among = _run_images_among(fitted, own_splits(dataset, data, run_dir), run_dir,
                                  dataset.root if data is not None else None)
        calibration = {**calibration_record(logits, y, calibration_data(split, data),
                                            answer=lambda probs: predicted_classes(predictor,
                                                                                   probs, 1.0),
                                            previous=predictor.temperature),
                       **({"class_map": class_map} if class_map else {}),
                       **({"run_images_among": among} if among else {}),
                       "photo_sums": photo_sums(fitted),
                       # left out, as evaluate leaves them out (said beside the figures)
                       **({"unreadable": len(preds) - len(ok), "unreadable_examples": [
                           [p.path, p.error] for p in preds if p.error][:5]}
                          if len(ok) < len(preds) else {}),
                       **(left_out if left_out["unknown_classes"] or "unlabelled" in left_out
                          else {}),
                       # (kept: the unknown thresholds were set on scores at that temperature)
                       **({"unknown_temperature": predictor.unknown.temperature}
                          if predictor.unknown is not None else {})}
        update_manifest(predictor.bundle, calibration=calibration)
        return calibration


def _run_images_among(paths: list[str], own: pd.DataFrame | None,
                      run_dir: Path | None = None, data_root: Path | None = None
                      ) -> dict[str, int]:
    """How many of `paths` are the run's own images of each split (by real path, as
    evaluate's fairness check matches them, or copies of them below `data_root`, other
    data's root, as it finds them), and photos `wingspan adapt` refitted it on ("adapted",
    copies too), where any are: calibrate warns of train, test and adapted, and evaluate
    says when it scores the split a temperature was fitted on."""
    fitted = set(real_paths(paths))
    photos = adapted_photos(run_dir)
    among = {"adapted": len(fitted.intersection(photos)) + copies_among(
        fitted.difference(photos), adapted_sums(run_dir))}
    if own is not None:
        seen = dict(zip(real_paths(own["path"]), own[SPLIT], strict=True))
        copies = copies_of_own(fitted, seen, trained_on(run_dir) if run_dir else None,
                                data_root)
        among.update({s: sum(seen.get(p) == s for p in fitted) + copies.get(s, 0)
                      for s in ("train", "val", "test")})
    return {s: n for s, n in among.items() if n}


def check_enough_to_calibrate(readable: int, given: int, split: str, manifest: dict) -> None:
    """A temperature fitted on a handful of images says little (drawn 60 times from a model
    calibrated at T = 1, 5 images gave T 0.55-1.9 and 10 gave 0.63-1.6, 10th to 90th
    percentile; 1 image 0.8 to the bound, 10), and `calibrate` would put it in place of
    the one the bundle has: refused, with the minimum said."""
    if readable >= MIN_CALIBRATION_IMAGES:
        return
    kept = manifest.get("calibration", {})
    unread = f" ({given - readable} could not be read)" if given > readable else ""
    raise WingspanError(
        f"Only {counted(readable, 'image')} of the model's classes in the "
        f"'{split}' split to fit the temperature on{unread}: a temperature fitted on fewer "
        f"than {MIN_CALIBRATION_IMAGES} says little about other images. The model keeps its "
        f"temperature ({kept.get('temperature', 1.0):.3f}"
        + (f", fitted on {kept['images']} images of {kept.get('fitted_on')}"
           if kept.get("images") else "") + ").",
        hint="Give DATA with more labelled images of the model's classes, or another "
             "--split (all: every image of DATA).")


@contextlib.contextmanager
def _one_at_a_time(model: str | Path, batch_size: int, workers: int | None):
    """Hold the model's calibrate lock while a calibration reads the bundle and stores
    what it fitted: a `calibrate --unknown` that ended after a `calibrate` begun later
    wrote back the temperature it had read, and the new one was lost without a word (each
    fits at what the other stores). Checks first the settings and that the bundle can be
    written."""
    check_reading(batch_size, workers)
    bundle = find_bundle(model)
    folder = bundle if bundle.is_dir() else bundle.parent
    check_bundle_writable(bundle, "calibrate stores what it fits there")
    lock = f".{bundle.name}.calibrate.lock"
    if not hold_lock(folder, lock, again=False):
        raise WingspanError(f"Another `wingspan calibrate` is changing {bundle} now.",
                            hint="Wait for it to finish, then calibrate again.")
    try:
        yield
    finally:
        release_lock(folder, lock)


def check_bundle_writable(bundle: Path, what: str) -> None:
    """Before a calibration's work: the bundle it rewrites can be (a read-only run folder
    failed once the fit was done, naming a temporary file)."""
    check_writable(bundle if bundle.is_dir() else bundle.parent, what,
                   hint="Copy the run (or its model/ folder) somewhere writable and "
                        "calibrate the copy.")


def fit_unknown(model: str | Path, rate: float | None = None, score: str | None = None,
                progress: bool = True, batch_size: int = BATCH_SIZE, workers: int | None = None,
                device: str = "auto", seed: int | None = None, precision: str = "auto",
                runtime: str = "auto") -> dict:
    """Fit the unknown scores again on a run's own training images and set their
    thresholds on its val split (training does this once): for another `rate` or default
    `score`, or for a model trained before wingspan had them. Rewrites the bundle. `seed`:
    by default the run's own, so that a run with more than MAX_FIT_IMAGES training images
    refits on the very ones training drew (with seed 0, only seed-0 runs did)."""
    import torch

    from wingspan.config import no_such_score
    from wingspan.evaluate.own_images import own_images, run_folder, trained_seed
    from wingspan.models import save_bundle
    from wingspan.models.unknown import UnknownDetector, check_rate

    if rate is not None:
        check_rate(rate)  # before any image is read
    if score is not None and score not in UNKNOWN_SCORES:
        raise no_such_score(score, list(UNKNOWN_SCORES))
    with _one_at_a_time(model, batch_size, workers):
        predictor = Predictor(model, device=device, batch_size=batch_size, workers=workers,
                              progress=progress, precision=precision, runtime=runtime)
        purpose = "the unknown scores are fitted on"
        run_folder(predictor, purpose)  # before anything is computed
        seed = trained_seed(predictor) if seed is None else seed
        manifest = predictor.manifest
        previous = manifest.get("unknown") or {}
        training = manifest.get("training", {})
        rate = rate if rate is not None else previous.get("rate") or TrainConfig.unknown_rate
        score = score or previous.get("score") or TrainConfig.unknown_score
        parts = {}
        # A uniform sample past MAX_FIT_IMAGES, as training's detector takes.
        for name, part in own_images(predictor, purpose, seed=seed, progress=progress).items():
            x = torch.as_tensor(part.features)
            parts[name] = (x, predictor.heads(x),
                           {lv: torch.as_tensor(y) for lv, y in part.labels.items()})
        detector = UnknownDetector.fit(parts["train"][0], parts["train"][1], parts["train"][2],
                                       parts["val"][0], parts["val"][1], score=score, rate=rate,
                                       temperature=predictor.temperature, seed=seed,
                                       members=predictor.taxonomy.member
                                       if predictor.taxonomy else None)
        detector.fitted_by = "calibrate"
        calibration = manifest.get("calibration")
        if calibration and "unknown_temperature" in calibration:  # now fitted at today's
            calibration = {**calibration, "unknown_temperature": predictor.temperature}
        save_bundle(predictor.model.cpu(), predictor.bundle, manifest["classes"],
                    taxonomy=manifest.get("taxonomy"), training=training,
                    metrics=manifest.get("metrics"), weights_source=manifest.get("weights_source"),
                    calibration=calibration, unknown=detector,
                    inference=manifest.get("inference"))  # (the same weights: still true)
        return {"score": score, "rate": rate, "train_images": len(parts["train"][0]),
                "val_images": len(parts["val"][0]),
                "thresholds": detector.thresholds[score]}


