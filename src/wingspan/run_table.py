"""`wingspan runs`: the runs of a runs folder side by side, one row each, read from their
JSON, YAML and CSV files alone (never a checkpoint: no pickle, no torch), so that listing is
instant and a damaged run is a row that says what is wrong, never a crash.

(Not `wingspan/runs.py`: a submodule of that name would shadow the `wingspan.runs`
function once imported.)"""

from __future__ import annotations

import csv
import difflib
import json
import os
import time
import zipfile
from pathlib import Path

import pandas as pd
import yaml

from wingspan.config import NOT_LEARNT, RUNS_DIR, UNKNOWN_SCORES, setting_text
from wingspan.errors import WingspanError, first_line
from wingspan.evaluate.wording import fairness
from wingspan.files import csv_on_stdout, write_csv, write_text
from wingspan.training.folder import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FREE,
    HELD,
    HISTORY_FILE,
    SPLITS_FILE,
    UNREADABLE,
    last_checkpoint,
    lock_state,
    scored,
    splits_digest,
    stopped_by,
    stopped_while_set_up,
    trained_on,
)

COLUMNS = ["name", "status", "detail", "data", "backbone", "levels", "image_size", "seed",
           "selection", "val_macro_f1", "held_out_split", "held_out_macro_f1",
           "held_out_images", "held_out_unreadable", "held_out_evaluated", "best_stage",
           "best_epoch", "train_seconds", "created", "changes", "path"]
# Sorted best first; every other column in ascending order (names, dates, seeds...).
BEST_FIRST = ("val_macro_f1", "held_out_macro_f1")
INTEGERS = ("image_size", "seed", "best_epoch", "held_out_images", "held_out_unreadable")
FIGURES = BEST_FIRST + ("train_seconds",)
DONE, TRAINING, STOPPED, SET_UP = "done", "training now", "stopped (resumable)", \
    "left over: killed while set up"
ADAPTED = "done (adapted)"
# `train` takes a lock it cannot read as held (never two at once); a listing says so.
LOCK_UNREADABLE = "unknown: cannot read .lock"
DAMAGED = "damaged"  # `detail` says which file and what is wrong
FAILED = "failed"  # stopped at an error (bad data, say): `detail` says which
# Settings that say nothing of the recipe (where and how fast it ran), or that have a column
# of their own, are left out of `changes`.
NOT_RECIPE = {*NOT_LEARNT, "backbone", "image_size", "seed", "selection", "level", "levels",
              "strict"}
# `status` is one of the constants above, to filter on; `detail` says more where there is
# more to say: where a stopped run stopped, the error a failed one stopped at, what is
# wrong with a damaged one.


def status_text(status: str, detail) -> str:
    """A status and its detail in words: "stopped after finetune epoch 2 (resumable)",
    "damaged: metrics.json is not valid JSON (line 1, column 10)"."""
    if not isinstance(detail, str) or not detail:
        return status
    if status == STOPPED:
        return f"stopped {detail} (resumable)"
    return f"{status}: {detail}"


class Damaged(Exception):
    """A run file that cannot be read as wingspan wrote it; the message says which."""


def run_table(runs_dir: str | Path, sort: str | None = None) -> pd.DataFrame:
    """One row per run folder in `runs_dir` (COLUMNS), oldest first or by `sort`. Folders
    that are not runs are left out, and hidden ones: wingspan's own work in progress (a
    stopped `adapt`'s .NAME.partial holds a run's files and no model, and would read as a
    stopped run to resume). Folders this user may not read are left out too, their names
    in the frame's `attrs["unreadable"]`."""
    runs_dir = Path(runs_dir)
    try:
        _check_runs_dir(runs_dir)
        folders = _once_each([d for d in runs_dir.iterdir()
                              if d.is_dir() and not d.name.startswith(".")])
    except PermissionError as e:
        raise WingspanError(f"Cannot list runs in {runs_dir}: {e.strerror or first_line(e)}.",
                            hint="Give a folder you may read, or ask its owner for "
                                 "access.") from e
    rows = [row for d in folders if (row := run_row(d)) is not None]
    # Another user's private folders (umask 077): left out, and said (they were unsaid).
    # (read to list its files, entered to read them; the file system's own is no run; one
    # that may be entered alone, chmod 711, had its files read by name: listed)
    listed = {row["path"] for row in rows}
    unreadable = [d.name for d in folders if str(d) not in listed and d.name != "lost+found"
                  and not os.access(d, os.R_OK | os.X_OK)]
    _changes(rows)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for column in (*INTEGERS, *FIGURES):  # whole numbers empty where a run has none (not
        frame[column] = pd.to_numeric(frame[column], errors="coerce")  # 32.0 beside a NaN)
        if column in INTEGERS:
            frame[column] = frame[column].astype("Int64")
    frame = sort_runs(frame, sort or "created")
    # The folders this user may not read: left out, and said (they were left out unsaid).
    frame.attrs["unreadable"] = unreadable
    return frame


def _changes(rows: list[dict]) -> None:
    """Each row's `changes`: its values of the settings that differ among the runs listed
    ("lr=0.01 label_smoothing=0.0"), and "split=" where their splits differ (held-out
    figures of two splits are of other images). Three runs of one command but --lr or
    --label-smoothing read alike, row for row. Drops the rows' private settings."""
    settings = [row.pop("_settings", None) or {} for row in rows]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    # (a setting a run lacks, a stopped run's split say, tells nothing either way)
    varying = [k for k in keys if len({repr(s[k]) for s in settings if k in s}) > 1]
    for row, own in zip(rows, settings, strict=True):
        row["changes"] = " ".join(f"{k}={setting_text(own[k])}" for k in varying
                                  if k in own) or None


def _once_each(folders: list[Path]) -> list[Path]:
    """Each run once, where a link beside it (or a second link) leads to it too: the run's
    own folder before a link to it (a run linked in from elsewhere stays)."""
    seen: set[Path] = set()
    kept = []
    for folder in sorted(sorted(folders), key=Path.is_symlink):  # (in name order within)
        if (target := folder.resolve()) not in seen:
            seen.add(target)
            kept.append(folder)
    return sorted(kept)


# `wingspan runs`' headers, as --sort takes them too (in any case, "-" or " " for "_").
HEADERS = {"run": "name", "val_f1": "val_macro_f1", "held_out_f1": "held_out_macro_f1",
           "held_out_f1_(images)": "held_out_macro_f1", "held_out": "held_out_macro_f1",
           "size": "image_size", "seconds": "train_seconds"}


def sort_runs(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    said = column.strip().lower().replace("-", "_").replace(" ", "_")
    column = sort_column(frame, column)
    if said == "best":  # the table's "best" (finetune 3) shows two columns
        raise WingspanError("Cannot sort by 'best': it shows two columns, best_stage and "
                            "best_epoch.", hint="Sort by one of them: --sort best_epoch.")
    if column not in frame.columns:
        close = [HEADERS.get(c, c) for c in difflib.get_close_matches(
            said, [*frame.columns, *HEADERS], n=1)]
        raise WingspanError(f"Cannot sort by '{column}': no such column.",
                            hint=(f"Did you mean '{close[0]}'? " if close else "")
                            + f"The columns: {', '.join(frame.columns)}.")
    # Ties (and empty cells, put last) keep the names' order.
    return frame.sort_values(column, ascending=column not in BEST_FIRST, kind="stable",
                             na_position="last").reset_index(drop=True)


def sort_column(frame: pd.DataFrame, column: str) -> str:
    """The column `--sort` names: a header as shown ("held-out F1") or a column's name."""
    said = column.strip().lower().replace("-", "_").replace(" ", "_")
    return HEADERS.get(said, said if said in frame.columns else column)


def _check_runs_dir(path: Path) -> None:
    hint = ("Give the folder `wingspan train` wrote its runs into: its --runs-dir "
            f"({RUNS_DIR} by default), e.g. `wingspan runs experiments/runs` "
            "(ws.runs(\"experiments/runs\") in Python).")
    if not path.exists():
        raise WingspanError(f"There is no folder {path} to list runs from.", hint=hint)
    if not path.is_dir():
        raise WingspanError(f"{path} is a file, not a folder of runs.", hint=hint)
    if (path / CONFIG_FILE).is_file() and (path / SPLITS_FILE).is_file():
        raise WingspanError(f"{path} is a run itself, not a folder of runs.",
                            hint=f"List the folder that holds it: `wingspan runs "
                                 f"{path.parent}`.")


def run_row(run_dir: Path) -> dict | None:
    """The row of a run folder, or None for a folder that is no run."""
    row = dict.fromkeys(COLUMNS)
    row.update(name=run_dir.name, path=str(run_dir))
    try:  # (Path.is_file raises PermissionError for a folder we may not enter)
        configured = (run_dir / CONFIG_FILE).is_file()
        # A run that trained and has lost its config.yaml: listed as damaged, as `train
        # --resume` calls it (it was left out of the listing, unsaid).
        lost = not configured and (run_dir / SPLITS_FILE).is_file() and (
            (run_dir / CHECKPOINTS_DIR).is_dir() or (run_dir / HISTORY_FILE).is_file())
        # What `train` writes before config.yaml, and nothing else: killed then, or being
        # set up now. (An empty folder may be anyone's: not listed.)
        if not configured and not lost and (not any(run_dir.iterdir())
                                            or not stopped_while_set_up(run_dir)):
            return None
    except OSError:  # a folder we may not read: no telling what it holds
        return None
    if lost:
        row.update(status=DAMAGED, detail=f"{CONFIG_FILE} is missing (a resume needs it)",
                   created=_stamp(run_dir / SPLITS_FILE))
        return row
    if not configured:
        row.update(status=_LOCKED.get(lock_state(run_dir), SET_UP), created=_stamp(run_dir))
        return row
    if not (run_dir / SPLITS_FILE).is_file():  # train writes both together: another
        if not any((run_dir / f).exists() for f in OWN_FILES):  # program's config.yaml,
            return None  # or a run that lost its splits.csv (it was left out, unsaid)
        row.update(status=DAMAGED, detail=f"{SPLITS_FILE} is missing (evaluate and a "
                   "resume need it)", created=_stamp(run_dir / CONFIG_FILE))
        return row
    try:
        _read_run(run_dir, row)
    except Damaged as e:
        row.update(status=DAMAGED, detail=str(e))
    row["created"] = row["created"] or _stamp(run_dir / CONFIG_FILE)
    if (lock := lock_state(run_dir)) != FREE:  # a resume of a finished run ends at once:
        row.update(status=_LOCKED[lock], detail=None)  # never "done"
    return row


# What only a wingspan run holds beside its config.yaml.
OWN_FILES = ("metrics.json", HISTORY_FILE, CHECKPOINTS_DIR, "model/manifest.json")
_LOCKED = {HELD: TRAINING, UNREADABLE: LOCK_UNREADABLE}  # the status a lock state tells


def _read_run(run_dir: Path, row: dict) -> None:
    """Fills `row` file by file, so that a damaged run keeps what could be read."""
    row["data"] = trained_on(run_dir)
    config = _read(run_dir, CONFIG_FILE)
    row.update({k: config.get(k) for k in ("backbone", "image_size", "seed", "selection")})
    row["_settings"] = {k: v for k, v in config.items() if k not in NOT_RECIPE}
    manifest = _read(run_dir, "model/manifest.json", missing={})
    classes = manifest.get("classes")
    # The levels learnt, coarse to fine as the bundle orders them (config.yaml keeps them
    # as typed); a stopped run's as configured.
    levels = list(classes) if isinstance(classes, dict) else (
        config.get("levels") or ([config["level"]] if config.get("level") else None))
    row["levels"] = ",".join(map(str, levels)) if levels else None
    preprocessing = manifest.get("preprocessing")
    if row["image_size"] is None and isinstance(preprocessing, dict):  # the backbone's own
        row["image_size"] = preprocessing.get("input_size")  # as the bundle records it
    if (run_dir / "adapt.json").is_file():  # a copy: created when adapted, not trained
        adapted = _read(run_dir, "adapt.json")  # (metrics.json stays with the run it was
        # made from: no val figure)
        row.update(status=ADAPTED, created=_stamp(run_dir / "adapt.json"),
                   detail=f"from {Path(str(adapted.get('adapted_from', '?'))).name} on "
                   f"{adapted.get('photos', '?')} photos",
                   held_out_split="test" if _has_test_split(run_dir) else None)
        if row["held_out_split"]:  # what `evaluate` of the adapted model found, if fair
            row.update(_held_out_figure(run_dir, "test"))
        return
    metrics = _read(run_dir, "metrics.json", missing={})
    # As `train --resume` tells a finished run: its bundle written to the end (the
    # manifest comes last) and, with --holdout-classes, those classes scored.
    trained = ("calibration" in manifest and (run_dir / "model" / "model.safetensors").is_file()
               and bool(metrics))
    done = trained and scored(metrics, config.get("holdout_classes"))
    if not done:
        error = stopped_by(run_dir)
        last = last_checkpoint(run_dir)
        # (torch.save writes a zip: one cut short, by a copy say, lacks the zip's end record;
        # saves here are atomic, so only something else leaves one so)
        if not error and last.is_file() and not zipfile.is_zipfile(last):
            raise Damaged("checkpoints/last.pt is cut short or damaged, and the run cannot "
                          "resume from it: put back a whole copy, or delete it to train "
                          "again from the start with `wingspan train --resume`")
        row.update(status=FAILED if error else STOPPED, detail=error or (
            "model written; its held-out classes not scored yet" if trained
            else _stopped_after(run_dir)))
        return
    try:
        best, selection = metrics["best"], metrics.get("selection") or {}
        row.update(status=DONE, val_macro_f1=float(best["val_macro_f1"]),
                   best_stage=best["stage"], best_epoch=int(best["epoch"]),
                   train_seconds=round(sum(metrics["stage_seconds"].values()), 1),
                   held_out_split=selection.get("unbiased_split"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise Damaged(f"metrics.json is not one wingspan wrote ({first_line(e)})") from e
    try:
        digest = splits_digest(run_dir) if metrics.get("splits_digest") else None
    except (OSError, ValueError, csv.Error) as e:
        raise Damaged(f"{SPLITS_FILE} cannot be read ({first_line(e)})") from e
    if digest:  # (--seed draws another split too, where the data has none of its own)
        row["_settings"]["split"] = digest[:8]
    if digest != metrics.get("splits_digest"):  # as evaluate checks it
        raise Damaged(f"{SPLITS_FILE} has changed since the run trained (edited, or damaged): "
                      "evaluate and calibrate refuse it until the run's own is put back")
    if row["held_out_split"]:
        row.update(_held_out_figure(run_dir, row["held_out_split"]))


def _has_test_split(run_dir: Path) -> bool:
    """Whether the run's splits.csv keeps a test split (the one nothing was chosen on)."""
    try:
        return bool((pd.read_csv(run_dir / SPLITS_FILE, usecols=["split"], dtype=str)["split"]
                     == "test").any())
    except (OSError, ValueError) as e:
        raise Damaged(f"{SPLITS_FILE} cannot be read ({first_line(e)})") from e


def _stopped_after(run_dir: Path) -> str | None:
    """"after finetune epoch 2": the last epoch a stopped run finished, as history.csv
    tells (a row is written as each epoch ends). A history missing or damaged tells
    nothing: None, never a crash."""
    try:
        last = pd.read_csv(run_dir / HISTORY_FILE, usecols=["stage", "epoch"]).iloc[-1]
        stage, epoch = str(last["stage"]), int(last["epoch"])
    except (OSError, ValueError, IndexError):  # pandas' parse errors are ValueErrors
        return None
    if stage not in ("head", "finetune") or epoch < 1:
        return None
    # The head stage checkpoints every few minutes, not every epoch: a resume may take up
    # from before the last epoch history.csv holds.
    last = last_checkpoint(run_dir)
    try:
        behind = last.stat().st_mtime < (run_dir / HISTORY_FILE).stat().st_mtime
    except OSError:
        return f"after {stage} epoch {epoch}; no checkpoint yet: resumes from the start"
    return f"after {stage} epoch {epoch}" + ("; resumes from an earlier checkpoint"
                                             if behind else "")


def _held_out_figure(run_dir: Path, split: str) -> dict:
    """The macro-F1 that `wingspan evaluate RUN` measured on the split nothing was chosen
    on and its count of images, when it has been run and called its figure fair (None until
    then, or when it was not fair: an adapted run scored on photos it adapted on), and
    whether it has been run. (The count: 1.0 on 2 images topped the table, unsaid.)
    `--unknown`'s folder holds the same plain figures beside its own, as does the one
    `train --holdout-classes` writes (evaluation-unknown, of its own split), and those of
    another --unknown-score (evaluation-test-unknown-knn); `--tta`'s are another recipe's."""
    folders = [f"evaluation-{split}-{unknown}{score}" for unknown in ("unknown-", "")
               for score in UNKNOWN_SCORES]  # (evaluation_folder's names)
    name = next((f"{folder}/metrics.json" for folder in (
        f"evaluation-{split}", f"evaluation-{split}-unknown", *folders, "evaluation-unknown")
                 if (run_dir / folder / "metrics.json").is_file()),
                f"evaluation-{split}/metrics.json")
    evaluation = _read(run_dir, name, missing={})
    if name.startswith("evaluation-unknown/") and evaluation.get("split") != split:
        evaluation = {}  # (of another split: not the figure asked for)
    try:
        fair = fairness(evaluation.get("fair", ""))[0] == "yes"
        # (to the 5 places of history.csv's val figure beside it: unrounded, the same 1/14
        # read as a val figure above the held-out one)
        kept = bool(evaluation) and fair
        # (and those of the split it could not read: gone since, a class folder renamed)
        return {"held_out_macro_f1": round(float(evaluation["macro"]["f1"]), 5) if kept
                else None, "held_out_images": int(evaluation["images"]) if kept else None,
                "held_out_unreadable": len(evaluation.get("unreadable") or ()) if kept
                else None, "held_out_evaluated": bool(evaluation)}
    except (KeyError, TypeError, ValueError) as e:
        raise Damaged(f"{name} is not one wingspan wrote ({first_line(e)})") from e


def _read(run_dir: Path, name: str, missing: dict | None = None) -> dict:
    """The JSON or YAML mapping in the run's file `name`; `missing` when the file is not
    there (None: it must be)."""
    path = run_dir / name
    if missing is not None and not path.is_file():
        return missing
    try:
        text = path.read_bytes()
        value = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as e:
        raise Damaged(f"{name} cannot be read ({first_line(e)})") from e
    except (ValueError, yaml.YAMLError) as e:  # JSONDecodeError and UnicodeDecodeError too
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise Damaged(f"{name} is not valid {kind}{_where(e)}") from e
    if not isinstance(value, dict):
        raise Damaged(f"{name} is not one wingspan wrote (not a mapping)")
    return value


def _where(error: Exception) -> str:
    """Where a JSON or YAML error is, briefly: " (line 3, column 7)"."""
    mark = getattr(error, "problem_mark", None)  # YAML's, counted from 0
    line, column = ((error.lineno, error.colno) if hasattr(error, "lineno") else
                    (mark.line + 1, mark.column + 1) if mark else (None, None))
    return f" (line {line}, column {column})" if line else ""


def _stamp(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(path.stat().st_mtime))


def _plain(value):
    """numpy's numbers as JSON's."""
    return value.item() if hasattr(value, "item") else str(value)


def write_run_table(frame: pd.DataFrame, path: str | Path) -> None:
    """CSV (a header row, the columns above) or JSON ({"runs": [one object per run]},
    empty cells as null), by the file's suffix; "-": the CSV on standard output."""
    if str(path) == "-":
        with csv_on_stdout() as f:
            frame.to_csv(f, index=False)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        records = frame.astype(object).where(frame.notna(), None).to_dict("records")
        write_text(path, json.dumps({"runs": records}, indent=2, default=_plain))
        return
    write_csv(frame, path)
