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

from wingspan.config import BATCH_SIZE, SPLITS, AugmentConfig, ReadConfig
from wingspan.data import read_dataset
from wingspan.data.csvfiles import name_as_read
from wingspan.data.plots import plot_class_balance
from wingspan.data.preview import write_preview
from wingspan.data.readers import name_look
from wingspan.data.samples import SOURCE, SPLIT, Dataset, folder_of, renamed, report_reading
from wingspan.data.taxonomy import conflict_rows
from wingspan.errors import WingspanError, counted, none_read, some
from wingspan.evaluate import plots as charts  # not `plots`: evaluate() has a plots= flag
from wingspan.evaluate.calibration import bound_warning, expected_calibration_error, reliability
from wingspan.evaluate.fairness import (
    PHOTO_SUM_DIGITS,
    among_evaluated,
    calibration_data,
    comparable_groups,
    copies_among,
    fairness_verdict,
    own_splits,
)
from wingspan.evaluate.hierarchy import hierarchical_metrics, level_table, truth_indices
from wingspan.evaluate.metrics import (
    averaged_classes,
    classification_metrics,
    confused_pairs,
    confusion,
    most_confused,
    per_class_table,
    summary_rows,
)
from wingspan.evaluate.openset import openset_metrics, separation
from wingspan.evaluate.report import write_report
from wingspan.evaluate.unseen import (
    check_unseen,
    held_out_among,
    held_out_by,
    unseen_paths,
)
from wingspan.evaluate.wording import (
    absent_rows,
    answer_rows,
    epochs_run,
    kept_rows,
    look_alike_hint,
    tree_wording,
    tta_note,
    unknown_section,
)
from wingspan.files import (
    PATH_TEXT,
    fitting_name,
    name_part,
    replace_folder,
    write_csv,
    write_text,
)
from wingspan.inference import (
    Predictor,
    output_home,
    run_dir_of,
    spelt_as_trained,
    view_probabilities,
)
from wingspan.predict import answer_for, deciding_score
from wingspan.training.folder import (
    HISTORY_FILE,
    SPLITS_FILE,
    adapted_photos,
    data_moved_hint,
    hold_lock,
    read_history,
    release_lock,
    splits_digest,
)


@dataclass
class Evaluation:
    out_dir: Path
    metrics: dict
    report: Path


def evaluate(model: str | Path, data: str | Path | None = None, split: str | None = None,
             out: str | Path | None = None, progress: bool = True,
             batch_size: int = BATCH_SIZE, workers: int | None = None, runtime: str = "auto",
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
    check_no_split_name(data)
    predictor = Predictor(model, device=device, batch_size=batch_size, workers=workers,
                          runtime=runtime, precision=precision, progress=progress,
                          unknown_score=unknown_score)
    if unknown is not None and predictor.unknown is None:
        raise WingspanError(f"The model {predictor.bundle} has no unknown scores to evaluate.",
                            hint="Fit them with `wingspan calibrate RUN --unknown` on its run "
                                 "folder (run.calibrate(unknown=True) in Python; training "
                                 "fits them since they exist).")
    run_dir = run_dir_of(predictor.bundle)
    dataset = evaluation_dataset(data, run_dir, strict=strict)
    reading: list[str] = []  # what reading DATA left out (a missing file, a HEIC), as train
    if data is not None and not isinstance(data, Dataset):  # says it: not dropped unsaid
        report_reading(dataset, reading.append)
    level = predictor.level if predictor.level in dataset.levels else dataset.default_level
    split = split or _default_split(dataset)
    check_split(dataset, split)
    class_map = check_class_map(class_map or {}, predictor, dataset, level)
    rows, left_out = known_rows(dataset, split, level, predictor, class_map)
    tree_moved = []  # classes DATA's taxonomy places otherwise than the model's
    if data is not None and predictor.taxonomy and not class_map:
        _check_data_tree(rows, predictor.taxonomy.levels)
        tree_moved = _moved_classes(rows, predictor.taxonomy)
    unknown_paths, unknown_missing = unseen_paths(unknown) if unknown is not None else (
        None, [])  # before any work
    if unknown_paths and not set(unknown_paths) <= held_out_by(run_dir):
        check_unseen(unknown_paths, rows["path"], predictor, class_map)
    final = Path(out).resolve() if out else _default_out(predictor, dataset, split, data,
                                                         tta, unknown, unknown_score)
    with _writing(final) as out_dir:  # a failed one (a full disk, Ctrl-C) leaves no folder
        if data is not None:  # whose folder (`folder_of`): another of the same name has its own
            (out_dir / SOURCE).write_text(str(dataset.root.resolve()) + "\n", **PATH_TEXT)
        paths = rows["path"].tolist()
        preds = list(predictor.run(paths, tta=tta, progress=progress,
                                   every_score=unknown is not None))
        speed = predictor.images_per_second
        ok = [i for i, p in enumerate(preds) if not p.error]
        failed = [(p.path, p.error) for p in preds if p.error]
        if not ok:
            raise nothing_read(failed, split, data, run_dir, "evaluate")
        index = {c: i for i, c in enumerate(predictor.classes)}
        y = rows["_label"].map(index).to_numpy()[ok]
        logits = np.stack([preds[i].view_logits for i in ok])  # (images, views, classes)
        probs = view_softmax(logits, predictor.temperature)
        raw = view_softmax(logits)  # (at T 1: what the temperature changed)
        raw_pred = predicted_classes(predictor, raw, 1.0)
        classes = predictor.classes
        # On other data (holding some of the model's classes, with --map or by name), the
        # macro averages cover the classes it holds; on the run's own, every class seen.
        truth_only = data is not None
        # What predict answers (with a taxonomy the top-down branch's class, which may differ
        # from the finest head's own top class) is what is scored.
        y_pred = predicted_classes(predictor, probs, predictor.temperature)
        metrics = classification_metrics(y, probs, classes, truth_only=truth_only, y_pred=y_pred)
        metrics.update(level=level, split=split, unreadable=failed, **left_out,
                       **({"reading": reading} if reading else {}),
                       **({"tree_differs": tree_moved} if tree_moved else {}),
                       images_per_second=round(speed, 1), engine=predictor.policy.describe(),
                       ece_uncalibrated=expected_calibration_error(raw, y, y_pred=raw_pred),
                       temperature=predictor.temperature,
                       calibration=_calibration_used(predictor, split, data,
                                                     [paths[i] for i in ok]), tta=tta,
                       **({"tta_note": tta_note(predictor.unknown is not None)} if tta else {}),
                       fair=fairness_verdict(
                           predictor.manifest, split, data, [paths[i] for i in ok],
                           own_splits(dataset, data, run_dir), adapted_photos(run_dir),
                           run_dir, comparable_groups(rows["group"].iloc[ok], dataset, data,
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
        write_csv(table, out_dir / "per_class.csv")
        # The model's classes the macro averages and that table leave out: no image of them
        # here (and on the run's own data, none predicted either).
        metrics["absent_classes"] = [c for c in classes if c not in set(table["class"])]
        # Images answered with one of them: wrong, in recall and micro's figures, in no
        # averaged class's precision (41% of iNat's photos, for a Leeds run with --map).
        metrics["answered_absent"] = int(np.isin(
            y_pred, [classes.index(c) for c in metrics["absent_classes"]]).sum())
        # On the run's own data, classes with no images here that were answered are in the
        # table and the averages (scikit-learn's convention), each with F1 0: said apart,
        # as "left out" read as if every class without images were.
        metrics["answered_only_classes"] = table.loc[table["support"] == 0, "class"].tolist()
        cm = confusion(y, y_pred, len(classes))
        _write_confusion(cm, classes, out_dir / "confusion.csv")
        confused = most_confused(cm, classes, tree=_ancestors(predictor.taxonomy,
                                                              predictor.level))
        metrics["most_confused"], metrics["confused_pairs"] = confused, confused_pairs(cm)
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
            transfer, metrics["transfer_own"] = _transfer(
                predictor, run_dir, {**class_map, **alike}, table, progress,
                _named_share(named, y, classes), tta)
            write_csv(transfer, out_dir / "transfer.csv")
            # No figure (a class without images here or at home) is null in JSON, not NaN.
            metrics["transfer"] = transfer.astype(object).where(transfer.notna(), None).to_dict(
                "records")
            metrics["class_map"] = class_map  # (what calibrate on these photos needs too)
        if unknown is not None:
            metrics["unknown"] = _openset(predictor, unknown, unknown_paths, read, y, y_pred,
                                          averaged_classes(y, y_pred, truth_only),
                                          out_dir, progress, tta, plots, unknown_missing)
            if held := held_out_among(run_dir, unknown_paths):  # (the report names them)
                metrics["unknown"]["held_out_classes"] = held
        write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))

        pngs = _plots(out_dir, predictor, dataset, level, run_dir, cm, classes, paths, ok, y,
                      y_pred, probs, (raw, raw_pred), metrics, read,
                      own=data is None) if plots else {}
        if unknown is not None and plots:  # _openset drew it
            pngs["unknown"] = out_dir / "unknown.png"
        if levels_table is not None:  # _per_level drew the coarser levels' matrices (if plots)
            pngs["levels"] = {lv: out_dir / f"confusion_{name_part(lv)}.png" if plots else None
                              for lv in predictor.taxonomy.levels[:-1]}
        # (the run and the folder: a run's test and --unknown reports were alike in the tabs)
        _report(out_dir, f"{run_dir.name}, {final.name}" if run_dir else final.name,
                predictor, dataset, level, split, metrics, table, confused, pngs,
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


def left_out_figures(rows: pd.DataFrame, known: pd.Series, level: str,
                     model_classes: list[str]) -> dict:
    """What is left out of the figures, for metrics.json and `left_out_wording`: the data's
    classes the model does not know and their images, those of them that only look like
    one of the model's that the data lacks (`look_alike`), and the images blank at the
    level (a class folder that taxonomy.csv lacks, say), which are no class at all."""
    blank = rows["_label"] == ""
    other = ~known & ~blank
    unknown = sorted(set(rows.loc[other, "_label"]))
    return {"unknown_classes": unknown, "unknown_class_images": int(other.sum()),
            **({"look_alike": alike} if (alike := look_alikes(
                unknown, set(model_classes) - set(rows["_label"]))) else {}),
            **({"unlabelled": {"level": level, "images": int(blank.sum())}}
               if blank.any() else {})}


def look_alikes(theirs: list[str], ours: set[str]) -> dict[str, str]:
    """{data class: model class} for names that differ only in case, spacing, width or
    invisible marks ('Monarch' for 'monarch'): what --map should pair, which names alone never do
    (two classes may differ only so)."""
    ours_by_look = {name_look(c): c for c in sorted(ours)}
    return {c: ours_by_look[name_look(c)] for c in theirs if name_look(c) in ours_by_look}


def known_rows(dataset: Dataset, split: str, level: str, predictor: Predictor,
               class_map: dict[str, str], doing: str = "") -> tuple[pd.DataFrame, dict]:
    """The split's images of the model's classes (see `split_rows`), and what is left out (said
    so: `left_out_figures`); evaluate's and calibrate's (`doing`: " to calibrate on")."""
    rows = split_rows(dataset, split, level, predictor, class_map)
    known = rows["_label"].isin(predictor.classes)
    if not known.any():
        theirs = sorted(set(rows["_label"]) - {""})  # (blank: no class at this level)
        blank = int((rows["_label"] == "").sum())
        others = sorted(set(dataset.table[SPLIT]) - {split, ""}) if split != "all" else []
        raise WingspanError(
            f"No images of the model's classes in the '{split}' split{doing}: the model knows "
            f"{some(predictor.classes)}; the data's '{level}' classes there are "
            f"{some(theirs) or 'none'}"
            + (f" ({counted(blank, 'image')} with no '{level}' at all)" if blank else "") + ".",
            hint=look_alike_hint(look_alikes(theirs, set(predictor.classes)), python=None)
            or "If they are the same classes under other names, map them with --map "
               "MODEL_CLASS=DATA_CLASS (once per class; in Python class_map={model "
               "class: data class})" + (f"; or give another --split ({', '.join(others)})."
                                        if others else "."))
    return rows[known], left_out_figures(rows, known, level, predictor.classes)


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
                                      "next\n", **PATH_TEXT)
        try:
            yield out_dir
            # What it wrote, so that the next one can tell a file the user put here since
            # (notes beside the figures), which it would delete, and refuse instead.
            written = sorted(str(f.relative_to(out_dir)) for f in out_dir.rglob("*")
                             if f.is_file() and f.name != MARKER)
            with open(out_dir / MARKER, "a", **PATH_TEXT) as f:
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
            "same_data_as_evaluation": own_images or among_evaluated(
                fitted.get("fitted_on", "val"), calibration_data(split, data))
            or copies_among(set(paths), sums, digits=PHOTO_SUM_DIGITS) > 0}


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
            "named_wrongly": float((named & ~right).mean()),
            # (1.0000 on the one image named read as a fact)
            "images_named": int(named.sum()), "right_when_named": int(right[named].sum())}


def nothing_read(failed: list[tuple[str, str]], split: str, data, run_dir: Path | None,
                 verb: str) -> WingspanError:
    """The error for a split of which no image could be read (`failed`: (path, why) of
    each), which says where the run's own images went when they are not where its
    splits.csv says (the data moved since the run trained)."""
    moved = data is None and run_dir is not None and not any(
        os.path.exists(path) for path, _ in failed[:20])
    return WingspanError(
        none_read(len(failed), "image", f" of the '{split}' split", example=failed[0][1]),
        hint=(data_moved_hint(run_dir, verb) if moved else
              "Check the files (`wingspan data inspect DATA` lists unreadable ones), or "
              f"{verb} on another split with --split."))


def check_split(dataset: Dataset, split: str) -> None:
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


def view_softmax(view_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities (images, classes) from each view's logits (images, views, classes),
    as predict gives them (`view_probabilities`; one view without TTA)."""
    return view_probabilities(torch.from_numpy(np.asarray(view_logits)), temperature).numpy()


def predicted_classes(predictor: Predictor, probs: np.ndarray, temperature: float) -> np.ndarray:
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
        listed = (final / MARKER).read_text(**PATH_TEXT).splitlines()[1:]
        added = sorted(str(f.relative_to(final)) for f in final.rglob("*") if f.is_file()
                       and f.name != MARKER and str(f.relative_to(final)) not in listed)
        if listed and added:
            raise WingspanError(f"{final} holds files the evaluation there did not write: "
                                f"{some(added, 5)}; this one would replace the folder whole.",
                                hint="Move them out first, or give this one another --out.")


def _per_level(predictor: Predictor, rows: pd.DataFrame, truth: dict[str, np.ndarray],
               probs: np.ndarray, preds: list, metrics: dict, out_dir: Path,
               truth_only: bool = False, draw: bool = True
               ) -> tuple[pd.DataFrame, dict[str, list]]:
    """Metrics at every taxonomic level; confusion matrices and their most confused pairs
    for the coarser ones. Returns the levels' table, and each image's true and predicted
    class at each coarser level and the branch's probability there (columns for
    predictions.csv; "" where the data does not say the truth)."""
    taxonomy = predictor.taxonomy
    heads = ({lv: np.stack([p.heads[lv] for p in preds]) for lv in preds[0].heads}
             if preds[0].heads else None)
    is_rare = rows[taxonomy.finest].isin(list(predictor.rare)).to_numpy()
    result = hierarchical_metrics(taxonomy, truth, probs, heads, is_rare, truth_only,
                                  temperature=predictor.temperature)
    marg = result.pop("predictions")
    for lv in taxonomy.levels[:-1]:
        known, names = truth[lv] >= 0, taxonomy.classes[lv]
        cm = confusion(truth[lv][known], marg[lv][known], len(names))
        _write_confusion(cm, names, out_dir / f"confusion_{name_part(lv)}.csv")
        # (above 60 classes its matrix names none: these pairs are what a reader can use)
        result["levels"][lv].update(most_confused=most_confused(cm, names,
                                                                tree=_ancestors(taxonomy, lv)),
                                    confused_pairs=confused_pairs(cm))
        if draw:
            charts.plot_confusion(cm, names, out_dir / f"confusion_{name_part(lv)}.png",
                                  tree=_tree(taxonomy, lv))
    metrics["hierarchy"] = result
    table = level_table(result, taxonomy.levels)
    write_csv(table, out_dir / "levels.csv")
    for lv in taxonomy.levels[:-1]:  # (the finest level's is per_class.csv)
        known = truth[lv] >= 0  # (images whose data does not say this level: not scored)
        write_csv(per_class_table(truth[lv][known], marg[lv][known], taxonomy.classes[lv],
                                  truth_only), out_dir / f"per_class_{name_part(lv)}.csv")
    columns = {}
    shares = taxonomy.marginals(probs)  # (the branch's probabilities, as predict gives them)
    for lv in taxonomy.levels[:-1]:
        names = taxonomy.classes[lv]
        columns[f"true:{lv}"] = [names[i] if i >= 0 else "" for i in truth[lv]]
        columns[f"predicted:{lv}"] = [names[i] for i in marg[lv]]
        columns[f"probability:{lv}"] = shares[lv][np.arange(len(marg[lv])), marg[lv]]
    return table, columns


def _write_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    # (the corner says which way it reads, in a spreadsheet too)
    write_csv(pd.DataFrame(cm, index=pd.Index(classes, name="true \\ predicted"),
                           columns=classes), path, index=True)


def check_no_split_name(data) -> None:
    """`evaluate RUN test`, `calibrate RUN val`: a split given where DATA goes, said before
    the model loads (not "No dataset at test", after it)."""
    if isinstance(data, str | Path) and str(data) in (*SPLITS, "all") and \
            not Path(data).exists():
        raise WingspanError(f"DATA '{data}' is a split name, and no such folder is here.",
                            hint=f"To choose the run's own split, name it: --split {data} "
                                 f"(in Python: split={str(data)!r}).")


def evaluation_dataset(data, run_dir: Path | None, doing: str = "evaluate on",
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


def split_rows(dataset: Dataset, split: str, level: str, predictor: Predictor,
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


def check_class_map(class_map: dict[str, str], predictor: Predictor, dataset: Dataset,
                     level: str) -> dict[str, str]:
    """`class_map` with the model's classes as it spells them: 'monarch' names a model's
    'monarch ' (see `spelt_as_trained`), as the data's own 'monarch' matches it."""
    spelt = spelt_as_trained(predictor).get(predictor.level, {})
    class_map = {spelt.get(name_as_read(ours), name_as_read(ours))
                 if ours not in predictor.classes else ours: name_as_read(theirs)
                 for ours, theirs in class_map.items()}
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
    swapped ('monarch=001-danaus_plexippus'), a name in another case, or a typo
    ('azure_spotwng': the nearest name of its side, as a mistyped run folder is told)."""
    import difflib

    if all(ours in data and theirs in model for ours, theirs in class_map.items()):
        return "The sides look swapped: the model's class comes first. "
    folded = {name.casefold(): name for name in [*model, *data]}
    unknown = [(given, side) for names, side in ((class_map, model),
                                                 (class_map.values(), sorted(data)))
               for given in names if given not in model and given not in data]
    meant = [f"'{name}' for '{given}'" for given, _ in unknown
             if (name := folded.get(given.casefold())) is not None]
    typos = [f"'{near[0]}' for '{given}'" for given, side in unknown
             if given.casefold() not in folded
             and (near := difflib.get_close_matches(given, side, n=1, cutoff=0.8))]
    return ((f"Did you mean {', '.join(meant)} (names differ in case)? " if meant else "")
            + (f"Did you mean {', '.join(typos)}? " if typos else ""))


def _transfer(predictor: Predictor, run_dir: Path | None, class_map: dict[str, str],
              here: pd.DataFrame, progress: bool, named: dict[str, float] | None = None,
              tta: bool = False) -> tuple[pd.DataFrame, dict | None]:
    """Each class's recall (in `class_map`, {model class: data class}) on the run's own
    data (its test split, else val) beside its recall on the data evaluated (both with
    TTA or both without): the drop per class; and which of the run's splits that was, of
    how many images, how many of them could not be read (gone since: the run folder copied
    to another machine, say), or None without the run's folder. `named`: per class, the
    share of its images here that the unknown answer names a class for."""
    recall_here = dict(zip(here["class"], here["recall"], strict=True))
    support_here = dict(zip(here["class"], here["support"], strict=True))
    home, said = {}, None
    if run_dir is not None:
        # (its files are predicted, not checked first: gone ones are counted, not fatal)
        own = read_dataset(run_dir / SPLITS_FILE, ReadConfig(check_files=False))
        split = _default_split(own)
        rows = split_rows(own, split, predictor.level, predictor)
        rows = rows[rows["_label"].isin(list(class_map))]
        preds = list(predictor.run(rows["path"].tolist(), tta=tta, progress=progress))
        said = {"split": split, "images": len(preds),
                "unreadable": sum(bool(p.error) for p in preds)}
        for label, p in zip(rows["_label"], preds, strict=True):
            if not p.error:
                hits = home.setdefault(label, [])
                answered = predicted_classes(predictor, p.probs[None], predictor.temperature)[0]
                hits.append(predictor.classes[int(answered)] == label)
    frame = pd.DataFrame([
        {"model class": ours, "data class": theirs,
         "recall on own data": float(np.mean(home[ours])) if home.get(ours) else np.nan,
         # None of its images here: no recall to compare (not a recall of 0)
         "recall here": recall_here[ours] if support_here.get(ours) else np.nan,
         "images here": int(support_here.get(ours, 0))}
        for ours, theirs in class_map.items()])
    # (in the order the terminal and the report show them)
    frame.insert(4, "drop", frame["recall on own data"] - frame["recall here"])
    if named is not None:
        frame["named here"] = [named.get(ours, np.nan) for ours in class_map]
    return frame, said


def _write_predictions(path: Path, paths: list[str], y: np.ndarray, y_pred: np.ndarray,
                       probs: np.ndarray, classes: list[str], predictor: Predictor,
                       read: list, by_level: dict[str, list] | None = None) -> None:
    """One row per image: its true class, the class predicted and its probability (and
    with a taxonomy all three at each coarser level, `by_level`), and with unknown scores what
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
    write_csv(frame, path)


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


def _ancestors(taxonomy, level: str) -> tuple[np.ndarray, list[str]] | None:
    """A level's classes' ancestors (coarse to fine, a row a class) and those levels'
    names. None at the coarsest level, or without a taxonomy."""
    coarser = taxonomy.levels[:taxonomy.levels.index(level)] if taxonomy else []
    if not coarser:
        return None
    return np.stack([taxonomy.parent_of(level, c) for c in coarser], axis=1), coarser


def _tree(taxonomy, level: str) -> tuple[np.ndarray, list[str], str] | None:
    """A level's classes' ancestors, the coarsest level's names and its name:
    plot_confusion's order down the tree. None at the coarsest, or without a taxonomy."""
    if (ancestry := _ancestors(taxonomy, level)) is None:
        return None
    ancestors, coarser = ancestry
    return ancestors, list(taxonomy.classes[coarser[0]]), coarser[0]


def _plots(out_dir, predictor, dataset, level, run_dir, cm, classes, paths, ok, y, y_pred,
           probs, raw: tuple[np.ndarray, np.ndarray], metrics: dict, read: list, own: bool
           ) -> dict:
    """The report's figures; `raw`: the probabilities at T 1 and the classes answered at it
    (the reliability diagram sets them beside the calibrated ones, with both ECEs)."""
    pngs = {"confusion": charts.plot_confusion(cm, classes, out_dir / "confusion.png",
                                               tree=_tree(predictor.taxonomy,
                                                          predictor.level))}
    wrong = np.flatnonzero(y_pred != y)
    p_pred = probs[np.arange(len(y_pred)), y_pred]
    worst = wrong[np.argsort(-p_pred[wrong])][:18]
    told = predictor.unknown is not None  # else the answer is always the top class
    shown = [{"path": paths[ok[i]], "true": classes[y[i]], "predicted": classes[y_pred[i]],
              "probability": float(p_pred[i]),
              "answer": _said_otherwise(predictor, read[i]) if told else None} for i in worst]
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


def _report(out_dir, name, predictor, dataset, level, split, metrics, table, confused, pngs,
            levels_table=None, transfer=None, plots: bool = True) -> Path:
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
                            metrics["images"], metrics.get("answered_only_classes")),
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
                # The figures first, with whether they are fair: the val figure below is
                # the optimistic one, which a reader skimming the top took for the score.
                *[row for row in summary_rows(metrics)
                  if row[0] in ("accuracy", "macro precision / recall / F1")],
                ("are these figures fair?", metrics["fair"]),
                ("test-time augmentation", "on: each image's flips and crops averaged, as "
                 "predict --tta" if metrics.get("tta") else "off"),
                *([("adapted", f"by `wingspan adapt` from {adapted['adapted_from']} on "
                    f"{counted(adapted['photos'], 'unlabelled photo')}"
                    + (f" (and {adapted['earlier_photos']} more that one was adapted on)"
                       if adapted.get("earlier_photos") else "") + ": its backbone, the "
                    "training epochs and the training curves below are that run's, before "
                    "adapting (adapt.json says what adapting did)")]
                  if (adapted := training.get("adapted")) else []),
                ("training epochs (head + fine-tune)", epochs_run(training, train_metrics)),
                *kept_rows(train_metrics),
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
                         "confused": pd.DataFrame(confused),
                         "confused_pairs": metrics.get("confused_pairs"),
                         "mistakes_png": pngs.get("mistakes"),
                         "mistakes_shown": pngs.get("mistakes_shown"),
                         "calibration": calibration, "reliability_png": pngs.get("reliability"),
                         "profile": profile, "levels": levels_table, "transfer": transfer,
                         "transfer_own": metrics.get("transfer_own"),
                         "hierarchy": metrics.get("hierarchy"),
                         "unknown": unknown_section(metrics.get("unknown"),
                                                     metrics["split"], metrics["tta"]),
                         "unknown_png": pngs.get("unknown"), "no_plots": not plots,
                         "all_right": metrics["accuracy"] == 1.0})


