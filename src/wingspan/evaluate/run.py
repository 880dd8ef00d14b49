"""`wingspan evaluate`: metrics, plots and the HTML report for a trained model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from wingspan.config import SPLITS, UNKNOWN_SCORES, AugmentConfig, ReadConfig, TrainConfig
from wingspan.data import read_dataset
from wingspan.data.csvfiles import name_as_read
from wingspan.data.plots import plot_class_balance
from wingspan.data.preview import write_preview
from wingspan.data.readers import is_image_name
from wingspan.data.samples import (
    GROUP,
    SOURCE,
    SPLIT,
    Dataset,
    folder_of,
    groups_given,
    renamed,
    report_reading,
)
from wingspan.data.taxonomy import conflict_rows
from wingspan.errors import WingspanError, counted, none_read, some
from wingspan.evaluate import plots as charts  # not `plots`: evaluate() has a plots= flag
from wingspan.evaluate.calibration import (
    MIN_CALIBRATION_IMAGES,
    bound_warning,
    calibration_record,
    expected_calibration_error,
    reliability,
)
from wingspan.evaluate.hierarchy import hierarchical_metrics, level_table, truth_indices
from wingspan.evaluate.metrics import (
    averaged_classes,
    classification_metrics,
    confusion,
    most_confused,
    per_class_table,
    summary_rows,
)
from wingspan.evaluate.openset import openset_metrics, separation
from wingspan.evaluate.report import write_report
from wingspan.files import (
    atomic_path,
    check_writable,
    disk_spelling,
    fitting_name,
    name_part,
    real_paths,
    replace_folder,
    write_text,
)
from wingspan.inference import (
    Predictor,
    output_home,
    run_dir_of,
    spelt_as_trained,
    view_probabilities,
)
from wingspan.models.bundle import update_manifest
from wingspan.predict import answer_for, deciding_score, expand_paths
from wingspan.training.folder import (
    HISTORY_FILE,
    HOLDOUT_FILE,
    SPLITS_FILE,
    adapted_photos,
    adapted_sums,
    hold_lock,
    read_history,
    release_lock,
    splits_digest,
    trained_on,
)


@dataclass
class Evaluation:
    out_dir: Path
    metrics: dict
    report: Path


def evaluate(model: str | Path, data: str | Path | None = None, split: str | None = None,
             out: str | Path | None = None, progress: bool = True,
             batch_size: int = 32, workers: int | None = None, runtime: str = "auto",
             precision: str = "auto", device: str = "auto",
             class_map: dict[str, str] | None = None,
             unknown: str | Path | list[str] | None = None,
             unknown_score: str | None = None, tta: bool = False,
             plots: bool = True, strict: bool = False) -> Evaluation:
    """Evaluate a model on a split of its own data or of DATA. `class_map` {model class:
    DATA's class} evaluates on another dataset whose names differ (the same names match
    anyway); the report then sets each class's recall there beside its recall on the
    run's own data: the drop that the change of data costs. `unknown`: a folder (or image
    paths) of classes the model never saw, scored against the known images (AUROC,
    FPR95, what the threshold costs; every score side by side). `tta`: score what
    `predict --tta` answers (each image's views averaged), on every image read here.
    `plots=False`: the metrics and tables without the PNGs (2-5 s less on a 2-core CPU,
    most of a small evaluation's time; Ultralytics' `val(plots=False)`). `strict`: a file
    DATA lists that is missing is an error before any work, as train's --strict (images
    that cannot be decoded are left out and listed all the same)."""
    _check_no_split_name(data)
    predictor = Predictor(model, device=device, batch_size=batch_size, workers=workers,
                          runtime=runtime, precision=precision, progress=progress,
                          unknown_score=unknown_score)
    if unknown is not None and predictor.unknown is None:
        raise WingspanError(f"The model {predictor.bundle} has no unknown scores to evaluate.",
                            hint="Fit them with `wingspan calibrate RUN --unknown` on its run "
                                 "folder (run.calibrate(unknown=True) in Python; training "
                                 "fits them since they exist).")
    run_dir = run_dir_of(predictor.bundle)
    dataset = _dataset(data, run_dir, strict=strict)
    reading: list[str] = []  # what reading DATA left out (a missing file, a HEIC), as train
    if data is not None and not isinstance(data, Dataset):  # says it: not dropped unsaid
        report_reading(dataset, reading.append)
    level = predictor.level if predictor.level in dataset.levels else dataset.default_level
    split = split or _default_split(dataset)
    _check_split(dataset, split)
    class_map = _check_class_map(class_map or {}, predictor, dataset, level)
    rows, left_out = _known_rows(dataset, split, level, predictor, class_map)
    moved = []
    if data is not None and predictor.taxonomy and not class_map:
        _check_data_tree(rows, predictor.taxonomy.levels)
        moved = _moved_classes(rows, predictor.taxonomy)
    unknown_paths, unknown_missing = _unknown_paths(unknown) if unknown is not None else (
        None, [])  # before any work
    if unknown_paths and not set(unknown_paths) <= _held_out_by(run_dir):
        _check_unseen(unknown_paths, rows["path"], predictor)
    final = Path(out).resolve() if out else _default_out(predictor, dataset, split, data,
                                                         tta, unknown, unknown_score)
    with _writing(final) as out_dir:  # a failed one (a full disk, Ctrl-C) leaves no folder
        if data is not None:  # whose folder (`folder_of`): another of the same name has its own
            (out_dir / SOURCE).write_text(str(dataset.root.resolve()) + "\n")
        paths = rows["path"].tolist()
        preds = list(predictor.run(paths, tta=tta, progress=progress,
                                   every_score=unknown is not None))
        speed = predictor.images_per_second
        ok = [i for i, p in enumerate(preds) if not p.error]
        failed = [(p.path, p.error) for p in preds if p.error]
        if not ok:
            moved = data is None and run_dir is not None and not any(
                os.path.exists(p) for p in paths[:20])  # the data moved since the run
            raise WingspanError(
                none_read(len(preds), "image", f" of the '{split}' split", example=failed[0][1]),
                hint=(f"The run's images are not where {run_dir / SPLITS_FILE} says: if the "
                      "data moved, write its new place into that file's paths (they are "
                      "absolute; e.g. sed 's|/old/place|/new/place|'), and evaluate again."
                      if moved else "Check the files (`wingspan data inspect DATA` lists "
                      "unreadable ones), or evaluate another split with --split."))
        index = {c: i for i, c in enumerate(predictor.classes)}
        y = rows["_label"].map(index).to_numpy()[ok]
        logits = np.stack([preds[i].view_logits for i in ok])  # (images, views, classes)
        probs = view_softmax(logits, predictor.temperature)
        classes = predictor.classes
        # On other data (holding some of the model's classes, with --map or by name), the
        # macro averages cover the classes it holds; on the run's own, every class seen.
        truth_only = data is not None
        # What predict answers (with a taxonomy the top-down branch's class, which may differ
        # from the finest head's own top class) is what is scored.
        y_pred = _predicted(predictor, probs, predictor.temperature)
        metrics = classification_metrics(y, probs, classes, truth_only=truth_only, y_pred=y_pred)
        metrics.update(level=level, split=split, unreadable=failed, **left_out,
                       **({"reading": reading} if reading else {}),
                       **({"tree_differs": moved} if moved else {}),
                       images_per_second=round(speed, 1), engine=predictor.policy.describe(),
                       ece_uncalibrated=expected_calibration_error(
                           view_softmax(logits), y,
                           y_pred=_predicted(predictor, view_softmax(logits), 1.0)),
                       temperature=predictor.temperature,
                       calibration=_calibration_used(predictor, split, data,
                                                     [paths[i] for i in ok]), tta=tta,
                       **({"tta_note": tta_note(predictor.unknown is not None)} if tta else {}),
                       fair=_fairness(
                           predictor.manifest, split, data, [paths[i] for i in ok],
                           _own_splits(dataset, data, run_dir), adapted_photos(run_dir),
                           run_dir, _comparable_groups(rows["group"].iloc[ok], dataset, data,
                                                       run_dir), dataset.root))
        read = [preds[i] for i in ok]  # the readable images' predictions, in y's order
        # Each image's class at every taxonomic level as the data gives it (-1 where blank)
        truth = truth_indices(predictor.taxonomy, _level_rows(
            rows.iloc[ok], predictor, level, class_map), predictor.rare) \
            if predictor.taxonomy else None
        named = None  # which images the answer gives a class (the rest: "unknown")
        if predictor.unknown is not None:
            # (a --rare-below class, rare species merged into their genus, is named at
            # the genus: its species is not)
            merged = np.isin(y_pred, [i for i, c in enumerate(classes) if c in predictor.merged])
            named = np.array([p.known_level == predictor.level for p in read]) & ~merged
            metrics["answers"] = _answers(predictor, read, named, y, y_pred, truth)
        table = per_class_table(y, y_pred, classes, truth_only)
        _write_csv(table, out_dir / "per_class.csv", index=False)
        # The model's classes the macro averages and that table leave out: no image of them
        # here (and on the run's own data, none predicted either).
        metrics["absent_classes"] = [c for c in classes if c not in set(table["class"])]
        # Images answered with one of them: wrong, in recall and micro's figures, in no
        # averaged class's precision (41% of iNat's photos, for a Leeds run with --map).
        metrics["answered_absent"] = int(np.isin(
            y_pred, [classes.index(c) for c in metrics["absent_classes"]]).sum())
        cm = confusion(y, y_pred, len(classes))
        _write_csv(pd.DataFrame(cm, index=classes, columns=classes), out_dir / "confusion.csv")
        confused = most_confused(cm, classes)
        metrics["most_confused"] = confused
        levels_table, by_level = None, {}
        if predictor.taxonomy:
            levels_table, by_level = _per_level(predictor, _level_rows(rows.iloc[ok], predictor,
                                                                       level, class_map),
                                                truth, probs, read, metrics, out_dir, truth_only,
                                                plots)
        _write_predictions(out_dir / "predictions.csv", [paths[i] for i in ok], y, y_pred, probs,
                           classes, predictor, read, by_level)
        transfer = None
        if class_map:
            # Every class evaluated: those mapped, and those matched by their names (left
            # out, a map of 2 classes showed the drop of 2 of the 3 evaluated).
            alike = {c: c for c, n in zip(table["class"], table["support"], strict=True)
                     if n and c not in class_map}
            transfer = _transfer(predictor, run_dir, {**class_map, **alike}, table, progress,
                                 _named_share(named, y, classes), tta)
            _write_csv(transfer, out_dir / "transfer.csv", index=False)
            # No figure (a class without images here or at home) is null in JSON, not NaN.
            metrics["transfer"] = transfer.astype(object).where(transfer.notna(), None).to_dict(
                "records")
            metrics["class_map"] = class_map  # (what calibrate on these photos needs too)
        if unknown is not None:
            metrics["unknown"] = _openset(predictor, unknown, unknown_paths, read, y, y_pred,
                                          averaged_classes(y, y_pred, truth_only),
                                          out_dir, progress, tta, plots, unknown_missing)
            if held := _held_out_classes(run_dir, unknown_paths):  # (the report names them)
                metrics["unknown"]["held_out_classes"] = held
        write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))

        pngs = _plots(out_dir, predictor, dataset, level, run_dir, cm, classes, paths, ok, y,
                      y_pred, probs, logits, read, own=data is None) if plots else {}
        if unknown is not None and plots:  # _openset drew it
            pngs["unknown"] = out_dir / "unknown.png"
        if levels_table is not None:  # _per_level drew the coarser levels' matrices (if plots)
            pngs["levels"] = {lv: out_dir / f"confusion_{name_part(lv)}.png" if plots else None
                              for lv in predictor.taxonomy.levels[:-1]}
        # (the run and the folder: a run's test and --unknown reports were alike in the tabs)
        _report(out_dir, f"{run_dir.name}, {final.name}" if run_dir else final.name,
                predictor, run_dir, dataset, level, split, metrics, table, confused, pngs,
                levels_table, transfer, plots)
    return Evaluation(final, metrics, final / "report.html")


def _check_data_tree(rows: pd.DataFrame, levels: list[str]) -> None:
    """DATA's own coarser levels are the truth of the per-level figures: a taxonomy that
    contradicts itself (a species under two families) is refused, as training refuses it,
    rather than scored against a truth that is no tree."""
    present = [lv for lv in levels if lv in rows]
    labelled = rows[~(rows[present] == "").any(axis=1)]
    conflicts = conflict_rows(labelled, present) if len(present) > 1 else []
    if conflicts:
        raise WingspanError(
            "The data's taxonomy contradicts itself:\n  " + "\n  ".join(conflicts[:10]),
            hint="Fix those rows (or taxonomy.csv) so that every class has one parent, as "
                 "the model's tree has.")


def _moved_classes(rows: pd.DataFrame, taxonomy) -> list[str]:
    """The finest classes DATA puts under other parents than the model's tree (a revised
    taxonomy, common between sources): "azure_spotwing: family nymphalidae here,
    lycaenidae in the model". Scored against DATA's tree, an answer right at the finest
    level counts as a mistake above it, unsaid: a family accuracy of 0.70 beside 0.97
    named right at the family in the same report."""
    index = {c: i for i, c in enumerate(taxonomy.classes[taxonomy.finest])}
    moved = []
    for label, group in rows[rows["_label"].isin(index)].groupby("_label", sort=True):
        for lv in taxonomy.levels[:-1]:
            theirs = group[lv].iloc[0] if lv in group else ""
            ours = taxonomy.classes[lv][taxonomy.parents[lv][index[label]]]
            if theirs and theirs != ours:
                moved.append(f"{label}: {lv} {theirs} here, {ours} in the model")
                break
    return moved


def tree_wording(metrics: dict) -> str | None:
    """What evaluate says when DATA's taxonomy places classes otherwise than the model's
    tree (see `_moved_classes`), or None."""
    moved = metrics.get("tree_differs") or []
    if not moved:
        return None
    return (f"The data's taxonomy places {counted(len(moved), 'class', 'classes')} otherwise "
            f"than the model's tree (e.g. {moved[0]}): the coarser levels are scored against "
            "the data's, where an answer right at the finest level can count as wrong")


def _left_out(rows: pd.DataFrame, known: pd.Series, level: str) -> dict:
    """What is left out of the figures, for metrics.json and `left_out_wording`: the data's
    classes the model does not know and their images, and the images blank at the level
    (a class folder that taxonomy.csv lacks, say), which are no class at all."""
    blank = rows["_label"] == ""
    other = ~known & ~blank
    return {"unknown_classes": sorted(set(rows.loc[other, "_label"])),
            "unknown_class_images": int(other.sum()),
            **({"unlabelled": {"level": level, "images": int(blank.sum())}}
               if blank.any() else {})}


def _known_rows(dataset: Dataset, split: str, level: str, predictor: Predictor,
                class_map: dict[str, str]) -> tuple[pd.DataFrame, dict]:
    """The split's images of the model's classes (see `_rows`), and what is left out (said
    so: `_left_out`)."""
    rows = _rows(dataset, split, level, predictor, class_map)
    known = rows["_label"].isin(predictor.classes)
    if not known.any():
        theirs = sorted(set(rows["_label"]) - {""})  # (blank: no class at this level)
        blank = int((rows["_label"] == "").sum())
        raise WingspanError(
            f"No images of the model's classes in the '{split}' split: the model knows "
            f"{some(predictor.classes)}; the data's '{level}' classes there are "
            f"{some(theirs) or 'none'}"
            + (f" ({counted(blank, 'image')} with no '{level}' at all)" if blank else "") + ".",
            hint="If they are the same classes under other names, map them with --map "
                 "MODEL_CLASS=DATA_CLASS (once per class; in Python class_map={model "
                 "class: data class}).")
    return rows[known], _left_out(rows, known, level)


def _default_out(predictor: Predictor, dataset: Dataset, split: str, data, tta: bool,
                 unknown, unknown_score: str | None) -> Path:
    """The evaluation's folder in the run (see `evaluation_name`). A score other than the
    bundle's own changes what the answer is (named, predictions.csv): it is named too."""
    score = (predictor.unknown_score
             if unknown_score and predictor.unknown_score != predictor.unknown.score else None)
    folder = output_home(predictor.bundle) / evaluation_name(
        dataset.name, split, data is not None, tta, unknown is not None, score)
    return folder if data is None else folder_of(folder, dataset.root)


@contextlib.contextmanager
def _writing(final: Path):
    """The folder to write the evaluation in: one beside `final`, moved in place when the
    block ends (`replace_folder`). A failed evaluation removes it, and one killed outright
    (SIGKILL) leaves it: the previous results stay whole, never half of both. A lock file
    beside it keeps a second evaluation into `final` (the same command twice at once)
    from writing in the same folder: it is refused while this one runs."""
    _check_out_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = f".{final.name}.lock"
    if not hold_lock(final.parent, lock, again=False):
        raise WingspanError(f"Another `wingspan evaluate` is writing {final} now.",
                            hint="Wait for it to finish, then evaluate again (or give "
                                 "another --out).")
    try:
        out_dir = final.with_name(f".{final.name}.partial")
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        (out_dir / MARKER).write_text("written by wingspan evaluate; replaced whole by the "
                                      "next\n")
        try:
            yield out_dir
            # What it wrote, so that the next one can tell a file the user put here since
            # (notes beside the figures), which it would delete, and refuse instead.
            written = sorted(str(f.relative_to(out_dir)) for f in out_dir.rglob("*")
                             if f.is_file() and f.name != MARKER)
            with open(out_dir / MARKER, "a") as f:
                f.write("".join(f"{name}\n" for name in written))
            replace_folder(out_dir, final)
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
    finally:
        release_lock(final.parent, lock)


def _calibration_used(predictor: Predictor, split: str, data, paths: list[str]) -> dict:
    """The temperature fitted when the model was trained (or by `wingspan calibrate`),
    where it was fitted, and whether on the images evaluated (the same split of the same
    data; or other data that held some of the run's images of the split evaluated, as
    `calibrate` counted them; or any of `paths` with the bytes of a photo `calibrate`
    fitted on, in a copy or a folder above): evaluating never changes the model."""
    fitted = dict(predictor.manifest.get("calibration", {}))
    among = {s: n for s, n in (fitted.get("run_images_among") or {}).items()
             if s != "adapted"}  # (the run's own splits)
    own_images = data is None and bool(among.get(split) or (split == "all" and among))
    sums = {int(size): set(hashes) for size, hashes in fitted.pop("photo_sums", {}).items()}
    return {"temperature": predictor.temperature, **(fitted or {"fitted_on": None}),
            "same_data_as_evaluation": own_images or _among_evaluated(
                fitted.get("fitted_on", "val"), _calibration_data(split, data))
            or _copies_among(set(paths), sums, digits=PHOTO_SUM_DIGITS) > 0}


def _level_rows(rows: pd.DataFrame, predictor: Predictor, level: str,
                class_map: dict[str, str]) -> pd.DataFrame:
    """The rows whose level columns give each image's truth at every taxonomic level. With
    --map (other names) the truth is the mapped class and its parents in the model's tree,
    not whatever the data calls its coarser levels."""
    finest = predictor.taxonomy.finest
    if class_map:
        theirs_to_ours = {theirs: ours for ours, theirs in class_map.items()}
        return rows.drop(columns=[lv for lv in predictor.taxonomy.levels if lv in rows]).assign(
            **{finest: renamed(rows[level], theirs_to_ours)})
    # Data that calls the finest level otherwise (a CSV's label column, class folders,
    # for a model's 'species') gives its truth in the level evaluated.
    return rows if finest in rows else rows.assign(**{finest: rows[level]})


def _named_share(named: np.ndarray | None, y: np.ndarray, classes: list[str]
                 ) -> dict[str, float] | None:
    """Per class with images, the share the unknown answer names a class for."""
    if named is None:
        return None
    images = np.bincount(y, minlength=len(classes))
    shares = np.bincount(y, weights=named, minlength=len(classes)) / np.maximum(images, 1)
    return {c: float(shares[k]) for k, c in enumerate(classes) if images[k]}


def evaluation_name(data_name: str, split: str, other_data: bool, tta: bool,
                    unknown: bool = False, score: str | None = None) -> str:
    """The default folder of an evaluation: evaluation-SPLIT for the run's own data,
    evaluation-NAME-SPLIT for other DATA, then "-unknown" with --unknown images (the
    figures under metrics.json's `unknown`), "-SCORE" with an --unknown-score other than
    the model's own, and "-tta" with TTA, so that no variant writes over another (a user
    compares them side by side; a plain rerun keeps the unknown figures). Training's
    --holdout-classes writes evaluation-unknown, which none of these is."""
    name = (f"evaluation-{fitting_name(data_name, 150)}-{split}" if other_data
            else f"evaluation-{split}")  # (a folder's name may take 255 bytes itself)
    if unknown:
        name += "-unknown"
    if score:
        name += f"-{score}"
    return f"{name}-tta" if tta else name


def tta_note(has_thresholds: bool) -> str:
    """What TTA does to the fitted figures: the temperature (and the unknown thresholds)
    are fitted on one view of each image (training, `wingspan calibrate`), while TTA
    scores the mean of the views, which is softer; refitting them on TTA would need
    TTA-specific values in the bundle, so the evaluation measures and says it instead."""
    fitted = "the temperature and the unknown thresholds were" if has_thresholds else \
        "the temperature was"
    return (f"{fitted} fitted on single views of the images, not on the mean of the views "
            "that TTA scores: the ECE after the temperature"
            + (" and the share of images turned away are" if has_thresholds else " is")
            + " as measured here, not as fitted")


def _answers(predictor: Predictor, preds: list, named: np.ndarray, y: np.ndarray,
             y_pred: np.ndarray, truth: dict[str, np.ndarray] | None) -> dict:
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
            "named_wrongly": float((named & ~right).mean())}


def _unknown_paths(unknown) -> tuple[list[str], list[tuple[str, str]]]:
    """The images of `--unknown` (a folder, files or globs, or a list of them), checked
    before anything is predicted, and those that are no image (a HEIC photo), with why."""
    inputs = [str(unknown)] if isinstance(unknown, str | Path) else [str(u) for u in unknown]
    paths, missing = expand_paths(inputs)
    if not paths:
        raise WingspanError(f"No images of unseen classes in {', '.join(inputs)}"
                            + (f": {missing[0][1]}" if missing else "."),
                            hint="Give a folder of images of classes the model never saw.")
    # A misspelt folder among several would otherwise only shrink the figures' image count.
    # A missing image file (one of --holdout-classes' images, deleted since) is counted
    # unreadable, as an unreadable one is.
    named = [(p, why) for p, why in missing if p in inputs and why.startswith("no such file")
             and (not is_image_name(Path(p).name) or any(c in p for c in "*?"))]
    if named:
        raise WingspanError(f"Among the unseen classes' images given, {named[0][0]}: "
                            f"{named[0][1]}.", hint="Check the path: the figures would be "
                            "of fewer images than given. Give folders, files or globs.")
    return paths, missing


def _held_out_by(run_dir: Path | None) -> set[str]:
    """The images of the classes `train --holdout-classes` left out of the run (its
    holdout.csv), which it scores as unknowns itself: chosen from the data's classes by
    name, so not checked as a folder given to --unknown is (a class 'Admiral' held out
    beside 'admiral', a photo saved in a held-out class and a known one too, which the
    split warned of, are the data's, not a slip; the run then failed at its very end)."""
    held = run_dir / HOLDOUT_FILE if run_dir else None
    return set(pd.read_csv(held)["path"]) if held and held.is_file() else set()


def _held_out_classes(run_dir: Path | None, unknown_paths: list[str]) -> dict[str, int]:
    """{class: images} of the classes `train --holdout-classes` left out, where those are
    the unseen images scored (else {}): the report named them nowhere but in paths."""
    held = run_dir / HOLDOUT_FILE if run_dir else None
    if not held or not held.is_file():
        return {}
    table = pd.read_csv(held, dtype=str, keep_default_na=False)
    if len(table.columns) < 2 or not set(unknown_paths) <= set(table["path"]):
        return {}
    counts = table[table["path"].isin(unknown_paths)][table.columns[1]].value_counts()
    return {str(c): int(n) for c, n in sorted(counts.items())}


def _check_unseen(unknown_paths: list[str], known_paths, predictor: Predictor) -> None:
    """Images of `--unknown` that are in the evaluated split, or sit in a folder named
    after one of the model's classes (DATA given as --unknown, say), would count a right
    answer against the unknown answer's figures."""
    # The finest level only: an unseen species is rightly filed under a known genus. Names
    # as folders read now: a model's 'monarch ' (see `spelt_as_trained`) is 'monarch'.
    # (in any case: 'Azure_Spotwing' holds azure_spotwing's photos as surely)
    known = {name_as_read(c).casefold(): c for c in predictor.classes}
    named = sorted({known[folder] for p in unknown_paths
                    if (folder := name_as_read(Path(p).parent.name).casefold()) in known})
    if named:
        raise WingspanError("The --unknown images (unknown= in Python) include folders named "
                            f"after classes the model knows: {some(named, 5)}.",
                            hint="Give a folder of images of classes the model never saw "
                                 "(rename a folder that only shares a name).")
    resolved = set(real_paths(known_paths))
    both = [p for p, real in zip(unknown_paths, real_paths(unknown_paths), strict=True)
            if real in resolved]
    if both:
        raise WingspanError(f"{len(both)} of the --unknown images (unknown= in Python) are "
                            f"also among the images of known classes evaluated, e.g. "
                            f"{both[0]}.",
                            hint="Give a folder of images of classes the model never saw.")
    # Copies of them (the same bytes) score as they do: AUROC 0.54 on 8 copied test images.
    sizes = set()
    for path in disk_spelling(unknown_paths):
        with contextlib.suppress(OSError):
            sizes.add(os.path.getsize(path))
    copies = _copies_among(set(unknown_paths), _sums_by_size(known_paths, sizes))
    if copies:
        raise WingspanError(f"{copies} of the --unknown images (unknown= in Python) "
                            + ("is a copy" if copies == 1 else "are copies")
                            + " (the same bytes) of images of known classes evaluated.",
                            hint="Give a folder of images of classes the model never saw.")


def _check_split(dataset: Dataset, split: str) -> None:
    """A split the data has ("all": every image)."""
    have = sorted(set(dataset.table[SPLIT]) - {""})
    if split != "all" and split not in have:
        raise WingspanError(f"The data has no '{split}' split.",
                            hint=f"It has: {', '.join(have) or 'none'} (or --split all).")


def _openset(predictor: Predictor, unknown, paths: list[str], known: list, y: np.ndarray,
             y_pred: np.ndarray, labels: np.ndarray, out_dir: Path, progress: bool,
             tta: bool = False, draw: bool = True, missing: list = ()) -> dict:
    """The known images' unknown scores against those of images of unseen classes
    (`paths`, from `unknown`; `missing`: those of it that are no image, with why, counted
    unreadable); writes unknown.csv (each unseen image: score, answer, closest class) and
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
    # finest level, and with a taxonomy the top-down branch's class (see _answers).
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
    said = [_answered(predictor, p) for p in unseen]  # (level, answer): predict's
    answers = [answer for _, answer in said]
    named = sorted((i for i, p in enumerate(unseen) if p.known_level is not None),
                   key=lambda i: u[i])
    result["unseen_named"] = [{"path": os.path.abspath(unseen[i].path), "answer": answers[i],
                               "unknown_score": float(u[i])} for i in named[:UNSEEN_LISTED]]
    # The score that decided each answer, its threshold and level, as predict writes them
    # (with levels, each has its own threshold); and the finest level's, which AUROC ranks.
    deciding = pd.DataFrame([deciding_score(predictor, p.unknown) for p in unseen])
    _write_csv(pd.DataFrame({  # (absolute, as predictions.csv: it is read from elsewhere)
        "path": [os.path.abspath(p.path) for p in unseen], **deciding.to_dict("list"),
        **({f"{level}_score": u} if predictor.taxonomy else {}),
        "answer": answers,
        "known_level": [level or "" for level, _ in said],
        "closest_class": [predictor.classes[c] for c in u_pred]}),
        out_dir / "unknown.csv", index=False)
    if draw:
        charts.plot_unknown_scores(k, u, predictor.thresholds[level], name,
                                   out_dir / "unknown.png")
    return result


UNSEEN_LISTED = 20  # the unseen images given a class that the report lists (all: unknown.csv)


def _finest_answer(predictor: Predictor, preds: list) -> np.ndarray:
    """The class index predict names at the finest level, whether or not it is turned
    away: the flat argmax, or with a taxonomy the top-down branch's class."""
    return _predicted(predictor, np.stack([p.probs for p in preds]), predictor.temperature)


def view_softmax(view_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities (images, classes) from each view's logits (images, views, classes),
    as predict gives them (`view_probabilities`; one view without TTA)."""
    return view_probabilities(torch.from_numpy(np.asarray(view_logits)), temperature).numpy()


def _predicted(predictor: Predictor, probs: np.ndarray, temperature: float) -> np.ndarray:
    """`_finest_answer` from the probabilities (N, classes) at `temperature`."""
    if predictor.taxonomy is None:
        return probs.argmax(1)
    return predictor.taxonomy.answer(probs, temperature=temperature)


def _said_otherwise(predictor: Predictor, p) -> str | None:
    """predict's answer for `p` where it is not the finest class ("unknown", a coarser
    class), else None: told by the level, not the text (a class may be named "unknown")."""
    level, said = _answered(predictor, p)
    return None if level == predictor.level else said


def _answered(predictor: Predictor, p) -> tuple[str | None, str]:
    """(the level predict answers `p` at, its answer): a --rare-below species' answer is
    its genus's, at that level."""
    return answer_for(predictor, p.probs, p.known_level)[1:]


MARKER = ".wingspan-evaluation"  # in every evaluation folder: only such a folder is replaced


def _check_out_dir(final: Path) -> None:
    """The output folder is replaced whole, so it must be new, empty, or an earlier
    evaluation's: never a run folder or a user's folder of other files."""
    name = final.resolve().name
    if not name or name in (".", ".."):
        raise WingspanError(f"--out {final} cannot be an evaluation folder.",
                            hint="Give a new folder, e.g. --out evaluations/test")
    if final.exists() and not final.is_dir():
        raise WingspanError(f"--out {final} is a file; the evaluation writes a folder.",
                            hint="Give a new or empty folder, or an earlier evaluation's.")
    if final.exists() and any(final.iterdir()) and not (final / MARKER).is_file():
        raise WingspanError(f"--out {final} already holds files that are not an evaluation's; "
                            "the evaluation replaces its folder whole.",
                            hint="Give a new or empty folder, or an earlier evaluation's.")
    if (final / MARKER).is_file():  # an earlier evaluation's: the files it wrote, listed
        listed = (final / MARKER).read_text().splitlines()[1:]
        added = sorted(str(f.relative_to(final)) for f in final.rglob("*") if f.is_file()
                       and f.name != MARKER and str(f.relative_to(final)) not in listed)
        if listed and added:
            raise WingspanError(f"{final} holds files the evaluation there did not write: "
                                f"{some(added, 5)}; this one would replace the folder whole.",
                                hint="Move them out first, or give this one another --out.")


def _per_level(predictor: Predictor, rows: pd.DataFrame, truth: dict[str, np.ndarray],
               probs: np.ndarray, preds: list, metrics: dict, out_dir: Path,
               truth_only: bool = False, draw: bool = True
               ) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Metrics at every taxonomic level; confusion matrices for the coarser ones. Returns
    the levels' table, and each image's true and predicted class at each coarser level
    (columns for predictions.csv; "" where the data does not say the truth)."""
    taxonomy = predictor.taxonomy
    heads = ({lv: np.stack([p.heads[lv] for p in preds]) for lv in preds[0].heads}
             if preds[0].heads else None)
    is_rare = rows[taxonomy.finest].isin(list(predictor.rare)).to_numpy()
    result = hierarchical_metrics(taxonomy, truth, probs, heads, is_rare, truth_only,
                                  temperature=predictor.temperature)
    marg = result.pop("predictions")
    for lv in taxonomy.levels[:-1] if draw else []:
        known = truth[lv] >= 0
        charts.plot_confusion(confusion(truth[lv][known], marg[lv][known],
                                        len(taxonomy.classes[lv])),
                              taxonomy.classes[lv], out_dir / f"confusion_{name_part(lv)}.png")
    metrics["hierarchy"] = result
    table = level_table(result, taxonomy.levels)
    _write_csv(table, out_dir / "levels.csv", index=False)
    for lv in taxonomy.levels[:-1]:  # (the finest level's is per_class.csv)
        known = truth[lv] >= 0  # (images whose data does not say this level: not scored)
        _write_csv(per_class_table(truth[lv][known], marg[lv][known], taxonomy.classes[lv],
                                   truth_only), out_dir / f"per_class_{name_part(lv)}.csv",
                   index=False)
    columns = {}
    for lv in taxonomy.levels[:-1]:
        names = taxonomy.classes[lv]
        columns[f"true:{lv}"] = [names[i] if i >= 0 else "" for i in truth[lv]]
        columns[f"predicted:{lv}"] = [names[i] for i in marg[lv]]
    return table, columns


def _check_no_split_name(data) -> None:
    """`evaluate RUN test`, `calibrate RUN val`: a split given where DATA goes, said before
    the model loads (not "No dataset at test", after it)."""
    if isinstance(data, str | Path) and str(data) in (*SPLITS, "all") and \
            not Path(data).exists():
        raise WingspanError(f"DATA '{data}' is a split name, and no such folder is here.",
                            hint=f"To choose the run's own split, name it: --split {data} "
                                 f"(in Python: split={str(data)!r}).")


def _dataset(data, run_dir: Path | None, doing: str = "evaluate on",
             command: str = "evaluate", strict: bool = False) -> Dataset:
    if isinstance(data, Dataset):  # read already (the API's ws.read)
        return data
    if data is not None:
        return read_dataset(data, ReadConfig(strict=strict))
    if run_dir is None:
        raise WingspanError(f"Give DATA to {doing}: this bundle is not inside a run folder, "
                            "so it has no split of its own.")
    _check_splits_unchanged(run_dir, command)
    # Every image the run split off, there or not: one deleted or moved since training is
    # then counted and named as unreadable, not dropped from the figures without a word.
    return read_dataset(run_dir / SPLITS_FILE, ReadConfig(check_files=False))


def _check_splits_unchanged(run_dir: Path, command: str) -> None:
    """The run's splits.csv as it trained (metrics.json keeps its digest): edited or cut
    short since, its test split is no longer the one kept apart, and its figures not the
    run's. (Paths may be rewritten: the digest leaves them out.)"""
    try:
        kept = json.loads((run_dir / "metrics.json").read_text()).get("splits_digest")
    except (OSError, ValueError, AttributeError):  # none (older runs, adapted copies)
        return
    if kept and kept != splits_digest(run_dir):
        raise WingspanError(
            f"{run_dir / 'splits.csv'} has changed since the run trained (edited, or "
            "damaged): its splits are no longer the ones the run kept apart.",
            hint=f"Put the run's own splits.csv back, or {command} on other data: "
                 f"`wingspan {command} {run_dir} DATA`.")


def _default_split(dataset: Dataset) -> str:
    splits = set(dataset.table[SPLIT])
    return "test" if "test" in splits else "val" if "val" in splits else "all"


def _rows(dataset: Dataset, split: str, level: str, predictor: Predictor,
          class_map: dict[str, str] | None = None) -> pd.DataFrame:
    """The rows of a split, with `_label`: the class each trained as (rare ones merged;
    DATA's names turned into the model's by `class_map`). The level columns name classes
    as the model spells them (see `spelt_as_trained`)."""
    rows = dataset.table if split == "all" else dataset.table[dataset.table[SPLIT] == split]
    theirs_to_ours = {theirs: ours for ours, theirs in (class_map or {}).items()}
    spelt = spelt_as_trained(predictor)
    spelt[level] = {k: v for k, v in spelt.pop(predictor.level, {}).items()
                    if k not in theirs_to_ours}  # --map says what those are
    rows = rows.assign(**{lv: renamed(rows[lv], names) for lv, names in spelt.items()
                          if names and lv in rows})
    return rows.assign(_label=renamed(renamed(rows[level], theirs_to_ours), predictor.rare))


def _check_class_map(class_map: dict[str, str], predictor: Predictor, dataset: Dataset,
                     level: str) -> dict[str, str]:
    """`class_map` with the model's classes as it spells them: 'monarch' names a model's
    'monarch ' (see `spelt_as_trained`), as the data's own 'monarch' matches it."""
    spelt = spelt_as_trained(predictor).get(predictor.level, {})
    class_map = {spelt.get(name_as_read(ours), ours) if ours not in predictor.classes
                 else ours: theirs for ours, theirs in class_map.items()}
    held = set(dataset.table[level])
    ours = [c for c in class_map if c not in predictor.classes]
    theirs = [c for c in class_map.values() if c not in held]
    if ours or theirs:
        raise WingspanError(
            "--map (class_map= in Python) names " + " and ".join(filter(None, [
                f"classes the model does not know ({', '.join(ours)})" if ours else "",
                f"classes the data does not have at level '{level}' ({', '.join(theirs)})"
                if theirs else ""])) + ".",
            hint=_map_slips(class_map, predictor.classes, held) + "Write --map "
            "MODEL_CLASS=DATA_CLASS (in Python: class_map={model class: data class}). The "
            f"model knows: {some(predictor.classes)}; the data has: {some(sorted(held))}.")
    if len(set(class_map.values())) < len(class_map):
        theirs = next(t for t in class_map.values() if list(class_map.values()).count(t) > 1)
        ours = [o for o, t in class_map.items() if t == theirs]
        raise WingspanError(
            f"--map (class_map= in Python) gives the data class '{theirs}' to {len(ours)} of "
            "the model's classes "
            f"({some(ours)}): each of its images would be right for one and wrong for the "
            "other.", hint="Map each data class to one model class.")
    # The data's classes named as the model's match without a map: one of those mapped
    # to, or from, another name would give a model class two data classes.
    mapped = set(class_map.values())
    alike = {spelt.get(c, c): c for c in set(dataset.table[level])}  # model's: data's name
    joined = [(ours, theirs) for ours, theirs in class_map.items()
              if alike.get(ours, theirs) != theirs and alike[ours] not in mapped]
    if joined:
        ours, theirs = joined[0]
        own = alike[ours]
        raise WingspanError(f"--map {own}={theirs} (class_map= in Python) would score the "
                            f"data's '{theirs}' and its own '{own}' both as the model's "
                            f"'{ours}'.",
                            hint=f"Map the data's '{own}' too (to another of the model's "
                                 f"classes), or leave {own}={theirs} out.")
    return class_map


def _map_slips(class_map: dict[str, str], model: list[str], data: set[str]) -> str:
    """The likely slips of a --map that names unknown classes, for its hint: the sides
    swapped ('monarch=001-danaus_plexippus'), or a name in another case."""
    if all(ours in data and theirs in model for ours, theirs in class_map.items()):
        return "The sides look swapped: the model's class comes first. "
    folded = {name.casefold(): name for name in [*model, *data]}
    meant = [f"'{name}' for '{given}'" for given in [*class_map, *class_map.values()]
             if given not in model and given not in data
             and (name := folded.get(given.casefold())) is not None]
    return f"Did you mean {', '.join(meant)} (names differ in case)? " if meant else ""


def _transfer(predictor: Predictor, run_dir: Path | None, class_map: dict[str, str],
              here: pd.DataFrame, progress: bool, named: dict[str, float] | None = None,
              tta: bool = False) -> pd.DataFrame:
    """Each class's recall (in `class_map`, {model class: data class}) on the run's own
    data (its test split, else val) beside its recall on the data evaluated (both with
    TTA or both without): the drop per class. `named`: per class, the share of its images
    here that the unknown answer names a class for."""
    recall_here = dict(zip(here["class"], here["recall"], strict=True))
    support_here = dict(zip(here["class"], here["support"], strict=True))
    home = {}
    if run_dir is not None:
        own = read_dataset(run_dir / SPLITS_FILE)
        split = _default_split(own)
        rows = _rows(own, split, predictor.level, predictor)
        rows = rows[rows["_label"].isin(list(class_map))]
        preds = list(predictor.run(rows["path"].tolist(), tta=tta, progress=progress))
        for label, p in zip(rows["_label"], preds, strict=True):
            if not p.error:
                hits = home.setdefault(label, [])
                answered = _predicted(predictor, p.probs[None], predictor.temperature)[0]
                hits.append(predictor.classes[int(answered)] == label)
    frame = pd.DataFrame([
        {"model class": ours, "data class": theirs,
         "recall on own data": float(np.mean(home[ours])) if home.get(ours) else np.nan,
         # None of its images here: no recall to compare (not a recall of 0)
         "recall here": recall_here[ours] if support_here.get(ours) else np.nan,
         "images here": int(support_here.get(ours, 0))}
        for ours, theirs in class_map.items()])
    frame["drop"] = frame["recall on own data"] - frame["recall here"]
    if named is not None:
        frame["named here"] = [named.get(ours, np.nan) for ours in class_map]
    return frame


def calibrate(model: str | Path, data: str | Path | None = None, split: str | None = None,
              progress: bool = True, batch_size: int = 32, workers: int | None = None,
              device: str = "auto", class_map: dict[str, str] | None = None,
              precision: str = "auto", runtime: str = "auto") -> dict:
    """Fit the temperature again, on `split` of DATA (default: the run's own val split;
    DATA's val split, or all of it when it has none), and store it in the bundle: the one
    command that changes a trained model's probabilities (training fits it on its val
    split; evaluate never does). `class_map` {model class: DATA's class}, as evaluate's:
    DATA's images of the model's classes under other names (the same names match anyway);
    the images of classes the model does not know are left out."""
    _check_no_split_name(data)
    predictor = Predictor(model, device=device, batch_size=batch_size, workers=workers,
                          progress=progress, precision=precision, runtime=runtime)
    _check_bundle_writable(predictor.bundle, "calibrate stores the new temperature there")
    run_dir = run_dir_of(predictor.bundle)
    dataset = _dataset(data, run_dir, "fit the temperature on", command="calibrate")
    level = predictor.level if predictor.level in dataset.levels else dataset.default_level
    if split is None:  # labelled photos from elsewhere often come without a split
        split = "val" if data is None or "val" in set(dataset.table[SPLIT]) else "all"
    _check_split(dataset, split)
    class_map = _check_class_map(class_map or {}, predictor, dataset, level)
    rows = _rows(dataset, split, level, predictor, class_map)
    theirs = sorted(set(rows["_label"]) - {""})  # (blank: no class at this level)
    known = rows["_label"].isin(predictor.classes)
    left_out = _left_out(rows, known, level)  # said, as evaluate says them
    rows = rows[known]
    if rows.empty:  # as evaluate says it
        raise WingspanError(
            f"No images of the model's classes in the '{split}' split to calibrate on: the "
            f"model knows {some(predictor.classes)}; the data's '{level}' classes there are "
            f"{some(theirs) or 'none'}.",
            hint="If they are the same classes under other names, map them with --map "
                 "MODEL_CLASS=DATA_CLASS (once per class; in Python class_map={model "
                 "class: data class})" + (
                     "; or give another --split." if data is not None else "."))
    preds = list(predictor.run(rows["path"].tolist(), progress=progress))
    ok = [i for i, p in enumerate(preds) if not p.error]
    if not ok:
        raise WingspanError(none_read(len(preds), "image", f" of the '{split}' split") + ".")
    _check_enough_to_calibrate(len(ok), len(preds), split, predictor.manifest)
    index = {c: i for i, c in enumerate(predictor.classes)}
    y = rows["_label"].map(index).to_numpy()[ok]
    logits = np.stack([preds[i].logits for i in ok])
    fitted = rows["path"].iloc[ok].tolist()
    among = _run_images_among(fitted, _own_splits(dataset, data, run_dir), run_dir,
                              dataset.root if data is not None else None)
    calibration = {**calibration_record(logits, y, _calibration_data(split, data),
                                        answer=lambda probs: _predicted(predictor, probs, 1.0),
                                        previous=predictor.temperature),
                   **({"class_map": class_map} if class_map else {}),
                   **({"run_images_among": among} if among else {}),
                   "photo_sums": _photo_sums(fitted),
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
    among = {"adapted": len(fitted.intersection(photos)) + _copies_among(
        fitted.difference(photos), adapted_sums(run_dir))}
    if own is not None:
        seen = dict(zip(real_paths(own["path"]), own[SPLIT], strict=True))
        copies = _copies_of_own(fitted, seen, trained_on(run_dir) if run_dir else None,
                                data_root)
        among.update({s: sum(seen.get(p) == s for p in fitted) + copies.get(s, 0)
                      for s in ("train", "val", "test")})
    return {s: n for s, n in among.items() if n}


def _check_enough_to_calibrate(readable: int, given: int, split: str, manifest: dict) -> None:
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


def _check_bundle_writable(bundle: Path, what: str) -> None:
    """Before a calibration's work: the bundle it rewrites can be (a read-only run folder
    failed once the fit was done, naming a temporary file)."""
    check_writable(bundle if bundle.is_dir() else bundle.parent, what,
                   hint="Copy the run (or its model/ folder) somewhere writable and "
                        "calibrate the copy.")


def fit_unknown(model: str | Path, rate: float | None = None, score: str | None = None,
                progress: bool = True, batch_size: int = 32, workers: int | None = None,
                device: str = "auto", seed: int | None = None, precision: str = "auto",
                runtime: str = "auto") -> dict:
    """Fit the unknown scores again on a run's own training images and set their
    thresholds on its val split (training does this once): for another `rate` or default
    `score`, or for a model trained before wingspan had them. Rewrites the bundle. `seed`:
    by default the run's own, so that a run with more than MAX_FIT_IMAGES training images
    refits on the very ones training drew (with seed 0, only seed-0 runs did)."""
    import torch

    from wingspan.evaluate.own_images import own_images, run_folder, trained_seed
    from wingspan.models import save_bundle
    from wingspan.models.unknown import UnknownDetector, check_rate

    if rate is not None:
        check_rate(rate)  # before any image is read
    if score is not None and score not in UNKNOWN_SCORES:
        raise WingspanError(f"Unknown score '{score}'.",
                            hint=f"Use one of: {', '.join(UNKNOWN_SCORES)}.")
    predictor = Predictor(model, device=device, batch_size=batch_size, workers=workers,
                          progress=progress, precision=precision, runtime=runtime)
    purpose = "the unknown scores are fitted on"
    run_folder(predictor, purpose)  # before anything is computed
    seed = trained_seed(predictor) if seed is None else seed
    _check_bundle_writable(predictor.bundle, "calibrate --unknown stores the scores there")
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


def _write_predictions(path: Path, paths: list[str], y: np.ndarray, y_pred: np.ndarray,
                       probs: np.ndarray, classes: list[str], predictor: Predictor,
                       read: list, by_level: dict[str, list[str]] | None = None) -> None:
    """One row per image: its true class, the class predicted and its probability (and
    with a taxonomy both at each coarser level, `by_level`), and with unknown scores what
    predict would answer (a class, or "unknown") and the score that decided it; then every
    class's probability."""
    frame = pd.DataFrame({"path": paths, "true": [classes[i] for i in y],
                          "predicted": [classes[i] for i in y_pred],
                          "probability": probs[np.arange(len(y_pred)), y_pred],
                          **(by_level or {})})
    if predictor.unknown is not None:
        decided = [deciding_score(predictor, p.unknown) for p in read]
        said = [_answered(predictor, p) for p in read]
        frame = frame.assign(answer=[a for _, a in said], known_level=[lv for lv, _ in said],
                             unknown_score=[d.get("unknown_score") for d in decided],
                             threshold=[d.get("threshold") for d in decided],
                             score_level=[d.get("score_level") for d in decided])
    frame = pd.concat([frame, pd.DataFrame(probs, columns=[f"p:{c}" for c in classes])], axis=1)
    _write_csv(frame, path, index=False)


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


def _write_csv(frame: pd.DataFrame, path: Path, **options) -> None:
    with atomic_path(path) as tmp:  # (a data folder named in other bytes than UTF-8: its
        frame.to_csv(tmp, errors="backslashreplace", **options)  # paths spelt out)


def _plots(out_dir, predictor, dataset, level, run_dir, cm, classes, paths, ok, y, y_pred,
           probs, logits, read: list, own: bool) -> dict:
    pngs = {"confusion": charts.plot_confusion(cm, classes, out_dir / "confusion.png")}
    wrong = np.flatnonzero(y_pred != y)
    p_pred = probs[np.arange(len(y_pred)), y_pred]
    worst = wrong[np.argsort(-p_pred[wrong])][:18]
    told = predictor.unknown is not None  # else the answer is always the top class
    pngs["mistakes"] = charts.plot_mistakes(
        [{"path": paths[ok[i]], "true": classes[y[i]], "predicted": classes[y_pred[i]],
          "probability": float(p_pred[i]),
          "answer": _said_otherwise(predictor, read[i]) if told else None,
          **_grad_cam_view(predictor, paths[ok[i]], int(y_pred[i]))} for i in worst],
        out_dir / "mistakes.png")
    raw = view_softmax(logits)
    raw_pred = _predicted(predictor, raw, 1.0)
    pngs["reliability"] = charts.plot_reliability(
        reliability(raw, y, y_pred=raw_pred), reliability(probs, y, y_pred=y_pred),
        (expected_calibration_error(raw, y, y_pred=raw_pred),
         expected_calibration_error(probs, y, y_pred=y_pred)), out_dir / "reliability.png")
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
                AugmentConfig(policy=policy, image_size=predictor.size), level, rows=4,
                augmented=4)
        except WingspanError:  # no training image reads: the report goes without a preview
            pass
    return pngs


def _calibration_data(split: str, data) -> str:
    """What a temperature was fitted on, as the bundle records it: "val" (training's), or
    the split of the data `wingspan calibrate` was given."""
    if isinstance(data, Dataset):
        data = data.root
    return f"{split} of {Path(data).resolve()}" if data is not None else split


def _among_evaluated(fitted_on: str | None, evaluated: str) -> bool:
    """Whether the images a temperature was fitted on are among those evaluated (both as
    `_calibration_data` writes them): the same split of the same data, or all of it on
    either side (fitted on all of DATA and evaluated on its test split, say)."""
    if not fitted_on:
        return False
    fitted_split, _, fitted_data = fitted_on.partition(" of ")
    split, _, data = evaluated.partition(" of ")
    return fitted_data == data and (fitted_split == split or "all" in (fitted_split, split))


def _own_splits(dataset: Dataset, data, run_dir: Path | None) -> pd.DataFrame | None:
    """The run's images and their splits (its splits.csv), None for a bundle on its own."""
    if data is None:
        return dataset.table
    if run_dir is None or not (run_dir / SPLITS_FILE).is_file():
        return None
    try:  # the paths are matched, not opened: the run's images may be gone since
        return read_dataset(run_dir / SPLITS_FILE, ReadConfig(check_files=False)).table
    except WingspanError:  # an unreadable splits.csv: not this evaluation's concern
        return None


def _comparable_groups(groups: pd.Series, dataset: Dataset, data, run_dir: Path | None
                       ) -> list[str] | None:
    """The evaluated images' groups (an ETHEC specimen's barcode, an observation) where they
    mean what the run's splits.csv means by them: DATA is the data the run was trained on
    (a group key of other data, a number a regex found, may name something else)."""
    source = trained_on(run_dir) if run_dir is not None and data is not None else None
    if source is None or Path(source).resolve() != Path(dataset.root).resolve():
        return None
    return groups.tolist()


def _copies_of_own(evaluated: set[str], seen: dict[str, str], own_root: str | None,
                   data_root: Path | None) -> dict[str, int]:
    """How many of the `evaluated` files (real paths) that are not the run's own are its
    train or val images (`seen`: real path -> side) copied or moved: the same path below
    the data's root as one of them below the run's data root, with the same bytes (a copy),
    or with the run's file gone when at least half of its files are matched so (the data
    moved, not a name or two reused: new photos may be IMG_0001.jpg too)."""
    from wingspan.data.leaks import content_hashes

    found = dict.fromkeys(("train", "val", *seen.values()), 0)  # (calibrate asks of test)
    if own_root is None or data_root is None:
        return found
    own_root, data_root = (os.path.realpath(_folder_of(r)) for r in (own_root, data_root))
    mine = {os.path.relpath(p, own_root): (p, side) for p, side in seen.items()
            if p.startswith(own_root + os.sep)}
    pairs = [(e, *mine[key]) for e in sorted(evaluated - seen.keys())
             if e.startswith(data_root + os.sep)
             and (key := os.path.relpath(e, data_root)) in mine]
    moved = dict.fromkeys(found, 0)
    # (the keys are in NFC: a name copied from macOS is opened as the disk spells it)
    disk = dict(zip(keys := [p for pair in pairs for p in pair[:2]], disk_spelling(keys),
                    strict=True))
    for path, original, side in ((disk[e], disk[o], side) for e, o, side in pairs):
        if not os.path.exists(original):
            moved[side] += 1
            continue
        with contextlib.suppress(OSError):  # (a file unreadable now is no copy)
            if os.path.getsize(original) == os.path.getsize(path):  # only then read both
                a, b = content_hashes([original, path])
                found[side] += bool(a) and a == b
    if 2 * sum(moved.values()) >= len(mine):
        found = {side: found[side] + moved[side] for side in found}
    return found


def _copies_among(paths: set[str], sums: dict[int, set[str]], digits: int = 64) -> int:
    """How many of `paths` hold the same bytes as a photo `wingspan adapt` refitted on, or
    `calibrate` fitted on (`sums`: size -> the sha256 of the photos of that size, the first
    `digits` of it): sizes first, so only files of a photo's size are read."""
    from wingspan.data.leaks import content_hashes

    if not sums:  # a run not adapted (or adapted before the sums were kept): nothing to read
        return 0
    sizes = {}
    for path in disk_spelling(sorted(paths)):  # (real_paths' NFC keys, opened as spelt)
        with contextlib.suppress(OSError):
            if (size := os.path.getsize(path)) in sums:
                sizes[path] = size
    return sum(h[:digits] in sums[size] for size, h in zip(
        sizes.values(), content_hashes(list(sizes)), strict=True))


def _sums_by_size(paths, sizes: set[int]) -> dict[int, set[str]]:
    """{size: the sha256 of those of `paths` of that size}, reading only the files whose
    size is among `sizes` (those of the files they are compared with)."""
    from wingspan.data.leaks import content_hashes

    wanted = {}
    for path in disk_spelling(sorted(set(map(str, paths)))):
        with contextlib.suppress(OSError):
            if (size := os.path.getsize(path)) in sizes:
                wanted[path] = size
    sums: dict[int, set[str]] = {}
    for size, digest in zip(wanted.values(), content_hashes(list(wanted)), strict=True):
        if digest:
            sums.setdefault(size, set()).add(digest)
    return sums


# A calibration's photos, kept in the bundle by size and the start of their sha256 (16 hex
# digits: 20 KB in manifest.json for 1,000 photos; a chance match is 1 in 2^64).
PHOTO_SUM_DIGITS = 16


def _photo_sums(paths: list[str]) -> dict[str, list[str]]:
    """{size: [sha256 prefix, ...]} of the files (JSON keys are strings)."""
    from wingspan.data.leaks import content_hashes

    sums: dict[str, set[str]] = {}
    for path, digest in zip(paths, content_hashes(paths), strict=True):
        with contextlib.suppress(OSError):
            if digest:
                sums.setdefault(str(os.path.getsize(path)), set()).add(
                    digest[:PHOTO_SUM_DIGITS])
    return {size: sorted(hashes) for size, hashes in sorted(sums.items())}


def _folder_of(root: str | Path) -> Path:
    """The folder a dataset's paths are below: a CSV's own folder (its paths are relative
    to it), else the root itself."""
    root = Path(root)
    return root.parent if root.suffix.lower() in (".csv", ".tsv", ".txt") else root


def _fairness(manifest: dict, split: str, data, paths: list[str],
              own: pd.DataFrame | None, adapted: list[str] = (),
              run_dir: Path | None = None, groups: list[str] | None = None,
              data_root: Path | None = None) -> str:
    """Whether this evaluation's figures are unbiased: none of the images evaluated
    (`paths`) is one the run trained on (its train split) or chose its best epoch on (val),
    as its splits.csv (`own`, None without one) names them, whatever data or split they
    came from, nor one that `wingspan adapt` refitted its head on (`adapted`, real paths),
    nor (`groups`, on the run's own data) another photo of a specimen or observation it
    trained or chose on."""
    evaluated = set(real_paths(paths))
    copies = _copies_among(evaluated.difference(adapted), adapted_sums(run_dir))
    among = len(evaluated.intersection(adapted)) + copies
    adapted_on = among or (data is None and split == "test" and manifest.get(
        "training", {}).get("adapted", {}).get("test_images_among_photos"))
    if adapted_on:  # (before the list was kept, the count of the run's own test images)
        return (f"no: `wingspan adapt` refitted this model on {adapted_on} of these "
                + (f"{len(evaluated)} " if among else "") + "images (as unlabelled photos"
                + (f"; {copies} of them as copies in another place" if copies else "") + "), "
                "so these figures are optimistic: evaluate it on photos that were not given "
                "to adapt")
    if own is None:  # (a model bundle copied without its run folder: no splits.csv)
        return ("unknown: this model came without its run folder, whose splits.csv says "
                "which images it was trained or chosen on; the figures are fair only if this "
                "data holds none of them")
    seen = own[own[SPLIT].isin(["train", "val"])]
    seen = dict(zip(real_paths(seen["path"]), seen[SPLIT], strict=True))
    trained, chosen = (sum(seen.get(p) == side for p in evaluated) for side in ("train", "val"))
    copies = (_copies_of_own(evaluated, seen, trained_on(run_dir) if run_dir else None,
                             data_root) if data is not None else {"train": 0, "val": 0})
    trained, chosen = trained + copies["train"], chosen + copies["val"]
    copied = (f" ({counted(copies['train'] + copies['val'], 'copy', 'copies')} of its files "
              "in another folder, or moved there)" if copies["train"] + copies["val"] else "")
    groups_seen = set(own.loc[own[SPLIT].isin(["train", "val"]), GROUP]) if groups else set()
    if not trained and not chosen and (shared := sum(g in groups_seen for g in groups or [])):
        return (f"no: {shared} of these {len(evaluated)} images show a specimen or "
                "observation (the same group) that the run trained or chose its best epoch "
                "on in another photo, so these figures are optimistic; the run's own test "
                f"split keeps groups apart (`wingspan evaluate {run_dir or 'RUN'}`, or "
                "run.evaluate() in Python)")
    if not trained and not chosen:
        return ("yes: the test split was never trained or chosen on" + (
                "" if own.empty or groups_given(own) else
                " (each photo its own group: none were given, so if several photos show one "
                "specimen or observation, some may sit on both sides; `wingspan data audit "
                f"{run_dir or 'RUN'}/splits.csv` lists near-duplicates across them)")
                if data is None else
                "yes: none of these files is one the run trained or chose its best epoch on, "
                "nor a copy of one (copies under other file names would not be seen)")
    tests = int((own[SPLIT] == "test").sum())
    fair = (f"; for a fair figure evaluate the run's {counted(tests, 'test image')}, never "
            f"trained or chosen on (`wingspan evaluate {run_dir or 'RUN'} --split test`, or "
            "run.evaluate(split=\"test\") in Python)"
            if tests else "")
    if not trained:
        return (f"no: the best epoch was chosen on val ({chosen} of these images{copied}), "
                "so these figures are optimistic" + fair)
    n = len(evaluated)  # files: one named twice is one
    share = ("this image" if trained == n == 1 else f"all {trained} of these images"
             if trained == n else f"{trained} of these {n} images")
    return (f"no: the model was trained on {share}"
            + (f" and chose its best epoch on {chosen}" if chosen else "") + copied
            + ", so these figures are optimistic: they show how well it fits the images it "
            "learnt from, not how well it does on new ones" + fair)


def _report(out_dir, name, predictor, run_dir, dataset, level, split, metrics, table, confused,
            pngs, levels_table=None, transfer=None, plots: bool = True) -> Path:
    manifest = predictor.manifest
    data_table = pd.crosstab(dataset.table[level], dataset.table[SPLIT].replace("", "all"))
    data_table.columns.name = None  # else an empty column headed "split"
    order = ["train", "val", "test", "all"]  # the recipe's order, not the alphabet's
    data_table = data_table[sorted(data_table.columns, key=lambda c: (
        order.index(c) if c in order else len(order), str(c)))]
    data_table.insert(0, "class", data_table.index)
    summary = [("images evaluated", metrics["images"]), *summary_rows(metrics),
               ("unreadable images", len(metrics["unreadable"])),
               ("images of classes the model does not know (left out)",
                f"{counted(metrics.get('unknown_class_images', 0), 'image')} of "
                + counted(len(metrics["unknown_classes"]), "class", "classes")
                + (f": {', '.join(metrics['unknown_classes'][:8])}"
                   if metrics["unknown_classes"] else "")
                if metrics["unknown_classes"] else "none"),
               *([(f"images with no '{metrics['unlabelled']['level']}' in the data (left out)",
                   metrics["unlabelled"]["images"])] if metrics.get("unlabelled") else []),
               *absent_rows(metrics.get("absent_classes"), metrics.get("answered_absent", 0),
                            metrics["images"]),
               *answer_rows(metrics.get("answers")),
               ("inference speed", f"{metrics['images_per_second']} images/s on "
                f"{metrics['engine']}")]
    cal = metrics["calibration"]
    calibration = [("temperature", f"{metrics['temperature']:.3f}"),
                   ("ECE before / after", f"{metrics['ece_uncalibrated']:.4f} / "
                    f"{metrics['ece']:.4f}")]
    if cal.get("same_data_as_evaluation"):
        calibration.append(("note", "the temperature was fitted on the images being "
                            "evaluated (or some of them): the ECE after is optimistic"))
    if metrics.get("tta_note"):
        calibration.append(("test-time augmentation", metrics["tta_note"]))
    if bound_warning(cal):
        calibration.append(("warning", bound_warning(cal)))
    if cal.get("method", "likelihood") != "likelihood":
        calibration.append(("set by", f"the {cal['method']}: every one of the "
                            f"{cal.get('images')} images it was fitted on was right"))
    elif cal.get("images"):
        calibration.append(("set by", f"the likelihood of {cal['images']} images "
                            f"({cal.get('fitted_on', 'val')})"))
    training = manifest.get("training", {})
    train_metrics = manifest.get("metrics", {})
    overview = [("model", predictor.bundle), ("backbone", manifest["model"]["backbone"]),
                ("weights", manifest.get("weights_source")),
                ("levels (coarse to fine), scored at each" if predictor.taxonomy else "level",
                 " > ".join(predictor.taxonomy.levels) if predictor.taxonomy else level),
                ("classes", len(predictor.classes)), ("evaluated split", split),
                ("test-time augmentation", "on: each image's flips and crops averaged, as "
                 "predict --tta" if metrics.get("tta") else "off"),
                *([("adapted", f"by `wingspan adapt` from {adapted['adapted_from']} on "
                    f"{counted(adapted['photos'], 'unlabelled photo')}: its backbone, the "
                    "training epochs and the training curves below are that run's, before "
                    "adapting (adapt.json says what adapting did)")]
                  if (adapted := training.get("adapted")) else []),
                ("training epochs (head + fine-tune)", _epochs_run(training, train_metrics)),
                *_kept_rows(train_metrics),
                ("are these figures fair?", metrics["fair"]),
                *([("taxonomy", said)] if (said := tree_wording(metrics)) else [])]
    profile = None
    if train_metrics.get("profile"):
        profile = pd.DataFrame([{"stage": s, **v} for s, v in train_metrics["profile"].items()])
    title = f"wingspan report: {name}" + (" (test-time augmentation)" if metrics["tta"] else "")
    return write_report(out_dir / "report.html", title,
                        {"overview": overview, "data": data_table,
                         "balance_png": pngs.get("balance"),
                         "preview_png": pngs.get("preview"), "curves_png": pngs.get("curves"),
                         "summary": summary, "per_class": table,
                         "confusion_png": pngs.get("confusion"),
                         "level_confusion_pngs": pngs.get("levels"),
                         "confused": pd.DataFrame(confused), "mistakes_png": pngs.get("mistakes"),
                         "calibration": calibration, "reliability_png": pngs.get("reliability"),
                         "profile": profile, "levels": levels_table, "transfer": transfer,
                         "hierarchy": metrics.get("hierarchy"),
                         "unknown": _unknown_section(metrics.get("unknown"),
                                                     metrics["split"], metrics["tta"]),
                         "unknown_png": pngs.get("unknown"), "no_plots": not plots,
                         "all_right": metrics["accuracy"] == 1.0})


def _epochs_run(training: dict, train_metrics: dict) -> str:
    """The epochs each stage ran, and where that is not what was asked (stopped early)."""
    ran = train_metrics.get("epochs", {})
    parts = []
    for stage, asked in (("head", training.get("epochs_head")),
                         ("finetune", training.get("epochs_finetune"))):
        done = ran.get(stage, asked)
        parts.append(f"{done}" + (f" (of {asked}: stopped early)" if asked is not None
                                  and done is not None and done < asked else ""))
    return " + ".join(parts)


def _kept_rows(train_metrics: dict) -> list[tuple[str, str]]:
    """Which epoch the model is, and its val figure, which is optimistic (chosen on)."""
    best = train_metrics.get("best") or {}
    if not best:
        return []
    stage = {"head": "head", "finetune": "fine-tuning"}.get(best.get("stage"), best.get("stage"))
    f1 = best.get("val_macro_f1")
    return [("model kept", f"{stage} epoch {best.get('epoch')}, the best on val"),
            ("its val macro-F1 (optimistic: the epoch was chosen on it)",
             "-" if f1 is None else f"{f1:.4f}")]


def absent_rows(absent: list[str] | None, answered: int = 0, images: int = 0
                ) -> list[tuple[str, str]]:
    """The model's classes left out of the per-class table and the macro averages, and
    the images answered with them, as (label, value) rows for the report (none when every
    class is there)."""
    if not absent:
        return []
    return [("the model's classes without images here (left out of the per-class table "
             "and the macro averages)", f"{len(absent)}: {some(absent, 8)}"),
            *([("images answered with one of them (wrong: counted in recall, in no "
                "averaged class's precision)", f"{answered} ({answered / images:.1%})")]
              if answered and images else [])]


def answer_rows(a: dict | None) -> list[tuple[str, str]]:
    """The `answers` figures as (label, value) rows, for the report and the CLI."""
    if not a:
        return []

    def accuracy(f: dict) -> str:
        return "-" if f["accuracy_when_named"] is None else f"{f['accuracy_when_named']:.4f}"

    rest = "a coarser level or unknown" if a.get("by_level") else "unknown"
    return [(f"named a class (the rest answered {rest}; '{a['score']}' at "
             f"{a['rate']:.0%})", f"{a['named']:.1%}"),
            ("accuracy when a class is named", accuracy(a)),
            ("named a wrong class", f"{a['named_wrongly']:.1%}"),
            *((f"named at {lv} or finer (accuracy there)", f"{f['named']:.1%} ({accuracy(f)})")
              for lv, f in list(a.get("by_level", {}).items())[:-1]  # the finest is above
              if f["named"] is not None)]  # (no image the data gives a class at lv)


def left_out_wording(metrics: dict, names: str, how_to_map: str) -> str | None:
    """What evaluate says of the images of classes the model does not know (left out of
    every figure), or None; `names` lists them, `how_to_map` is the CLI's --map or the
    library's class_map."""
    said = []
    if metrics.get("unknown_classes"):
        left = metrics.get("unknown_class_images", 0)
        classes = counted(len(metrics["unknown_classes"]), "class", "classes")
        said.append(f"{counted(left, 'image')} of {classes} the model does not know "
                    f"{'was' if left == 1 else 'were'} left out: {names} ({how_to_map} names "
                    "one of the model's)")
    if blank := metrics.get("unlabelled"):
        n = blank["images"]
        said.append(f"{counted(n, 'image')} with no '{blank['level']}' in the data (blank "
                    f"there: a class folder that taxonomy.csv lacks, say) "
                    f"{'was' if n == 1 else 'were'} left out")
    return "; ".join(said) or None


def unreadable_wording(metrics: dict) -> str | None:
    """What evaluate says of the images it could not read (gone since training, broken),
    left out of every figure; None when it read them all."""
    failed = metrics.get("unreadable") or []
    if not failed:
        return None
    path, why = failed[0]
    return (f"{counted(len(failed), 'image')} of the {len(failed) + metrics['images']} "
            f"could not be read and {'was' if len(failed) == 1 else 'were'} left out of "
            f"these figures, e.g. {path}: {why} (all in metrics.json's unreadable)")


def away_wording(u: dict) -> tuple[str, str]:
    """How to say what the open-set figures count: (what a turned-away image is answered,
    a note on which class is named). A model with a taxonomy names its finest level only
    when every level passes its threshold, and then the top-down branch's class."""
    if u.get("named_by") == "branch":
        return ("not named at the finest level (answered a coarser level or unknown)",
                " (the top-down branch's class, as predict names it)")
    return "answered unknown", ""


def at_threshold(u: dict) -> str:
    """What the threshold does to unseen and known images, in a sentence (the terminal and
    a notebook say it alike)."""
    away, branch = away_wording(u)
    where = ("At the thresholds of every level" if branch else
             f"At the threshold ({u['score']} > {u['threshold']:.6g})")
    return (f"{where}: {u['unseen_flagged']:.1%} of unseen images {away}, "
            f"{u['known_turned_away']:.1%} of known ones; known macro-F1{branch} "
            f"{u['known_macro_f1']:.4f} -> {u['known_macro_f1_with_unknown']:.4f}, open-set "
            f"macro-F1 {u['open_macro_f1_without_unknown']:.4f} -> {u['open_macro_f1']:.4f}")


def _unknown_section(u: dict | None, split: str, tta: bool = False) -> dict | None:
    if not u:
        return None
    away, branch = away_wording(u)
    limits = (", ".join(f"{lv} {t:.6g}" for lv, t in u["thresholds"].items()) + ": each"
              if u.get("thresholds") else f"{u['threshold']:.6g}:")
    summary = [
        ("score (threshold)", f"{u['score']} ({limits} turns away {u['rate']:.0%} of known "
                              "val images" + (", each a single view, without TTA" if tta
                                              else "") + ")"),
        ("images of unseen classes", u["unseen_images"]),
        *([("classes held out of training (images)", ", ".join(
            f"{c} ({n})" for c, n in u["held_out_classes"].items()))]
          if u.get("held_out_classes") else []),
        ("unreadable images of unseen classes (not scored)", len(u.get("unreadable", []))),
        ("AUROC / FPR at 95% TPR", f"{u['auroc']:.4f} / {u['fpr95']:.4f}"),
        (f"unseen images {away}", f"{u['unseen_flagged']:.1%}"),
        (f"known images {away}", f"{u['known_turned_away']:.1%}"),
        (f"known accuracy without / with the unknown answer{branch}",
         f"{u['known_accuracy']:.4f} / {u['known_accuracy_with_unknown']:.4f}"),
        ("known-class macro-F1 without / with", f"{u['known_macro_f1']:.4f} / "
                                               f"{u['known_macro_f1_with_unknown']:.4f}"),
        ("open-set macro-F1 (known + unseen images) without / with",
         f"{u['open_macro_f1_without_unknown']:.4f} / {u['open_macro_f1']:.4f}")]
    if u.get("unseen_known_at"):
        known_at = u["unseen_known_at"]
        summary.append(("unseen images known down to (level: images)", ", ".join(
            f"{lv}: {n}" for lv, n in known_at.items())
            + f"; unknown: {u['unseen_images'] - sum(known_at.values())}"))
    scores = pd.DataFrame([{"score": s + (" (in use)" if s == u["score"] else ""), **v}
                           for s, v in u["scores"].items()])
    named = pd.DataFrame(u.get("unseen_named") or [], columns=["path", "answer",
                                                               "unknown_score"])
    return {"summary": summary, "scores": scores, "named": named,
            "against": f"the known images of the '{split}' split"}
