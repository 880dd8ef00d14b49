"""The images an evaluation scores (and calibrate fits on): DATA read, or the run's own
splits.csv; the split; its rows of the model's classes, and what is left out of the figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from wingspan.config import SPLITS, ReadConfig
from wingspan.data import read_dataset
from wingspan.data.readers import name_look
from wingspan.data.samples import SPLIT, Dataset, renamed
from wingspan.errors import WingspanError, counted, none_read, some
from wingspan.evaluate.wording import look_alike_hint
from wingspan.inference import Predictor, spelt_as_trained
from wingspan.training.folder import CONFIG_FILE, SPLITS_FILE, data_moved_hint, splits_digest


def check_no_split_name(data) -> None:
    """`evaluate RUN test`, `calibrate RUN val`: a split given where DATA goes, said before
    the model loads (not "No dataset at test", after it)."""
    if isinstance(data, str | Path) and str(data) in (*SPLITS, "all") and \
            not Path(data).exists():
        raise WingspanError(f"DATA '{data}' is a split name, and no such folder is here.",
                            hint=f"To choose the run's own split, name it: --split {data} "
                                 f"(in Python: split={str(data)!r}).")


def evaluation_dataset(data, run_dir: Path | None, doing: str = "evaluate on",
             command: str = "evaluate", strict: bool = False,
             bundle: Path | None = None) -> Dataset:
    if isinstance(data, Dataset):  # read already (the API's ws.read)
        return data
    if data is not None:
        return read_dataset(data, ReadConfig(strict=strict))
    folder = Path(bundle).parent if bundle else None
    if run_dir is None and folder and (folder / SPLITS_FILE).is_file():
        # (a run whose config.yaml was deleted was told its bundle is in no run folder)
        raise WingspanError(f"{folder / CONFIG_FILE} is missing: {folder} has a run's "
                            f"{SPLITS_FILE} but is no longer taken as a run without it.",
                            hint=f"Put the run's {CONFIG_FILE} back to {command} on its own "
                                 f"splits, or give DATA: `wingspan {command} "
                                 f"{bundle} DATA`.")
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
    if kept and not (run_dir / SPLITS_FILE).is_file():  # (it read "has changed")
        raise WingspanError(f"{run_dir / SPLITS_FILE} is missing: the run's splits, its "
                            "test split among them, are gone.",
                            hint=f"Put the run's own splits.csv back, or {command} on other "
                                 f"data: `wingspan {command} {run_dir} DATA`.")
    if kept and kept != splits_digest(run_dir):
        raise WingspanError(
            f"{run_dir / 'splits.csv'} has changed since the run trained (edited, or "
            "damaged): its splits are no longer the ones the run kept apart.",
            hint=f"Put the run's own splits.csv back, or {command} on other data: "
                 f"`wingspan {command} {run_dir} DATA`.")


def default_split(dataset: Dataset) -> str:
    splits = set(dataset.table[SPLIT])
    return "test" if "test" in splits else "val" if "val" in splits else "all"


def check_split(dataset: Dataset, split: str) -> None:
    """A split the data has ("all": every image)."""
    have = sorted(set(dataset.table[SPLIT]) - {""})
    if split != "all" and split not in have:
        raise WingspanError(f"The data has no '{split}' split.",
                            hint=f"It has: {', '.join(have) or 'none'} (or --split all).")


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
