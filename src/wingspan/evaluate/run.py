"""`wingspan evaluate`: metrics, plots and the HTML report for a trained model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from wingspan.config import BATCH_SIZE
from wingspan.data.samples import SOURCE, Dataset, renamed, report_reading
from wingspan.data.taxonomy import conflict_rows
from wingspan.errors import WingspanError
from wingspan.evaluate import plots as charts  # not `plots`: evaluate() has a plots= flag
from wingspan.evaluate.answers import (
    answered,
    named_share,
    openset_figures,
    predicted_classes,
    unknown_answer_figures,
)
from wingspan.evaluate.calibration import expected_calibration_error
from wingspan.evaluate.fairness import (
    PHOTO_SUM_DIGITS,
    among_evaluated,
    calibration_data,
    comparable_groups,
    copies_among,
    fairness_verdict,
    own_splits,
)
from wingspan.evaluate.figures import report_figures
from wingspan.evaluate.folder import default_out, writing
from wingspan.evaluate.hierarchy import (
    class_ancestors,
    confusion_tree,
    hierarchical_metrics,
    level_table,
    truth_indices,
)
from wingspan.evaluate.metrics import (
    averaged_classes,
    classification_metrics,
    confused_pairs,
    confusion,
    most_confused,
    per_class_table,
)
from wingspan.evaluate.report import write_evaluation_report
from wingspan.evaluate.rows import (
    check_no_split_name,
    check_split,
    default_split,
    evaluation_dataset,
    known_rows,
    nothing_read,
)
from wingspan.evaluate.transfer import check_class_map, transfer_table
from wingspan.evaluate.unseen import (
    check_unseen,
    held_out_among,
    held_out_by,
    unseen_paths,
)
from wingspan.evaluate.wording import tta_note
from wingspan.files import (
    PATH_TEXT,
    name_part,
    write_csv,
    write_text,
)
from wingspan.inference import Predictor, run_dir_of, view_probabilities
from wingspan.predict import deciding_score
from wingspan.training.folder import adapted_photos


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
    dataset = evaluation_dataset(data, run_dir, strict=strict, bundle=predictor.bundle)
    reading: list[str] = []  # what reading DATA left out (a missing file, a HEIC), as train
    if data is not None and not isinstance(data, Dataset):  # says it: not dropped unsaid
        report_reading(dataset, reading.append)
    level = predictor.level if predictor.level in dataset.levels else dataset.default_level
    split = split or default_split(dataset)
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
    final = Path(out).resolve() if out else default_out(predictor, dataset, split, data,
                                                        tta, unknown, unknown_score)
    with writing(final) as out_dir:  # a failed one (a full disk, Ctrl-C) leaves no folder
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
            metrics["answers"] = unknown_answer_figures(predictor, read, named, y, y_pred, truth)
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
        confused = most_confused(cm, classes, tree=class_ancestors(predictor.taxonomy,
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
            transfer, metrics["transfer_own"] = transfer_table(
                predictor, run_dir, {**class_map, **alike}, table, progress,
                named_share(named, y, classes), tta)
            write_csv(transfer, out_dir / "transfer.csv")
            # No figure (a class without images here or at home) is null in JSON, not NaN.
            metrics["transfer"] = transfer.astype(object).where(transfer.notna(), None).to_dict(
                "records")
            metrics["class_map"] = class_map  # (what calibrate on these photos needs too)
        if unknown is not None:
            metrics["unknown"] = openset_figures(predictor, unknown, unknown_paths, read, y,
                                                 y_pred, averaged_classes(y, y_pred, truth_only),
                                                 out_dir, progress, tta, plots, unknown_missing)
            if held := held_out_among(run_dir, unknown_paths):  # (the report names them)
                metrics["unknown"]["held_out_classes"] = held
        write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))

        pngs = report_figures(out_dir, predictor, dataset, level, run_dir, cm, classes, paths,
                              ok, y, y_pred, probs, (raw, raw_pred), metrics, read,
                              own=data is None) if plots else {}
        if unknown is not None and plots:  # openset_figures drew it
            pngs["unknown"] = out_dir / "unknown.png"
        if levels_table is not None:  # _per_level drew the coarser levels' matrices (if plots)
            pngs["levels"] = {lv: out_dir / f"confusion_{name_part(lv)}.png" if plots else None
                              for lv in predictor.taxonomy.levels[:-1]}
        # (the run and the folder: a run's test and --unknown reports were alike in the tabs)
        write_evaluation_report(out_dir,
                                f"{run_dir.name}, {final.name}" if run_dir else final.name,
                                predictor, dataset, level, split, metrics, table, confused, pngs,
                                levels_table, transfer, plots, run_dir)
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


def view_softmax(view_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities (images, classes) from each view's logits (images, views, classes),
    as predict gives them (`view_probabilities`; one view without TTA)."""
    return view_probabilities(torch.from_numpy(np.asarray(view_logits)), temperature).numpy()


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
        result["levels"][lv].update(most_confused=most_confused(
                                        cm, names, tree=class_ancestors(taxonomy, lv)),
                                    confused_pairs=confused_pairs(cm))
        if draw:
            charts.plot_confusion(cm, names, out_dir / f"confusion_{name_part(lv)}.png",
                                  tree=confusion_tree(taxonomy, lv))
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
        said = [answered(predictor, p) for p in read]
        frame = frame.assign(answer=[a for _, a in said], known_level=[lv for lv, _ in said],
                             unknown_score=[d.get("unknown_score") for d in decided],
                             threshold=[d.get("threshold") for d in decided],
                             score_level=[d.get("score_level") for d in decided])
    frame = pd.concat([frame, pd.DataFrame(probs, columns=[f"p:{c}" for c in classes])], axis=1)
    write_csv(frame, path)
