"""`wingspan train --resume` (`ws.resume`): a stopped or killed run taken up from its last
checkpoint, once its folder, settings and images are checked to be the ones it began with."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from wingspan.config import MACHINE_SETTINGS, ReadConfig, TrainConfig, check_names
from wingspan.data import read_dataset
from wingspan.data.csvfiles import name_as_read
from wingspan.data.images import call_budget, chosen_budget
from wingspan.data.samples import Dataset
from wingspan.errors import WingspanError, command, counted, some
from wingspan.files import remove_leftovers, write_text
from wingspan.models.bundle import is_complete, read_manifest
from wingspan.models.policy import check_engine_settings
from wingspan.parallel import check_default_dtype
from wingspan.training.checkpoint import load_checkpoint
from wingspan.training.context import Run, learning_settings
from wingspan.training.folder import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    ERROR_FILE,
    HISTORY_FILE,
    SPLITS_FILE,
    close_runs,
    feature_cache_file,
    hold_lock,
    last_checkpoint,
    release_lock,
    scored,
    splits_digest,
    stopped_while_set_up,
    trained_on,
)
from wingspan.training.run import (
    Interrupted,
    Stopped,
    callers_random_stream_kept,
    go_on,
    interruptible,
    processes,
    start_run,
)


def _recorded_budget(run_dir: Path) -> int | None:
    """The --max-pixels (or max_pixels=) the run began with, from config.yaml's comment
    (as run._data_comment writes it)."""
    try:
        with open(run_dir / CONFIG_FILE, encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return None
    found = re.search(r"read with .*--max-pixels (\d+)", first)
    return int(found.group(1)) if found else None


@callers_random_stream_kept
@torch.inference_mode(False)
@torch.enable_grad()
def resume(run_dir: str | Path, quiet: bool = False, **machine) -> Path:
    """Continue a run that was stopped or killed, from its last checkpoint; `machine`
    changes MACHINE_SETTINGS, e.g. devices=1 for a run begun on 2 processes."""
    check_default_dtype()
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise _no_run_at(run_dir)
    if run_dir.is_dir() and not any(run_dir.iterdir()):  # a user's own, or a run killed
        raise WingspanError(f"{run_dir} is empty: there is no run in it to resume.",  # at mkdir
                            hint="Give the folder a `wingspan train` run wrote, e.g. "
                                 "runs/NAME; if this one was a run killed as it started, "
                                 "delete it and run the same `wingspan train` command again.")
    if not (run_dir / CONFIG_FILE).is_file() and stopped_while_set_up(run_dir):
        raise WingspanError(f"{run_dir} has no {CONFIG_FILE}: it holds a run that was stopped "
                            "while it was being set up, before its settings were written. "
                            "Nothing was trained, so nothing is lost.",
                            hint="Delete the folder and start the run again with the same "
                                 "`wingspan train` command.")
    if not (run_dir / CONFIG_FILE).is_file() and (run_dir / CHECKPOINTS_DIR).is_dir():
        raise WingspanError(f"{run_dir} has checkpoints but no {CONFIG_FILE}: a resume needs "
                            "the settings the run began with.",
                            hint=f"Put its {CONFIG_FILE} back (from a copy of the folder), or "
                                 "go on from its weights in a new run: wingspan train DATA "
                                 f"--weights {last_checkpoint(run_dir)}.")
    if not (run_dir / CONFIG_FILE).is_file():
        raise WingspanError(f"{run_dir} is not a wingspan run (no {CONFIG_FILE}).",
                            hint="Give the folder a `wingspan train` run wrote, e.g. runs/NAME")
    if (run_dir / "adapt.json").is_file():
        raise WingspanError(f"{run_dir} was written by `wingspan adapt`: there is no training "
                            "of its own to resume.",
                            hint="Resume the run it was adapted from, then adapt that again.")
    budget = _recorded_budget(run_dir)
    if budget and not chosen_budget():  # the pixel budget the run began with, unless this
        with call_budget(budget):  # call gives one: the same images, as the run began
            return resume(run_dir, quiet, **machine)
    config = _run_config(run_dir)
    check_engine_settings(config.precision, config.runtime)  # (the environment's, if auto)
    unknown = sorted(set(machine) - set(MACHINE_SETTINGS))
    # A name no setting has (worker=0) is a slip: named with the closest it may change.
    check_names([k for k in unknown if k not in TrainConfig.__dataclass_fields__],
                list(MACHINE_SETTINGS), listed="A resumed run may change")
    if unknown:
        raise WingspanError(f"A resumed run cannot change {', '.join(unknown)}.",
                            hint=f"It may change only {', '.join(MACHINE_SETTINGS)}.")
    # The processes: as given now, else as torchrun started them, else as the run began.
    if {"devices", "nodes"} & set(machine) or "TORCHELASTIC_RUN_ID" in os.environ:
        config = dataclasses.replace(config, devices=None, nodes=None)
    config = dataclasses.replace(config, **machine)
    fabric = processes(config).fabric()
    # Rank 0 takes the lock; every process learns whether it did, so all stop together.
    held = hold_lock(run_dir) if fabric.is_global_zero else None
    if not fabric.broadcast(held):
        raise WingspanError(f"The run {run_dir} is being trained by another process.",
                            hint="Wait for it to finish (or stop it), then resume.",
                            every_rank=True)
    try:
        return _resume(run_dir, config, fabric, quiet)
    except (Interrupted, Stopped):  # in the recipe: said there (and not failed)
        raise
    except KeyboardInterrupt:  # while it started up (the checkpoint read, the data checked)
        if fabric.is_global_zero:
            said = (f"Interrupted as the resume of {run_dir} started, before any further "
                    f"training. {go_on(run_dir)}")
            with contextlib.suppress(OSError), open(run_dir / "train.log", "a", encoding="utf-8",
                                                       errors="backslashreplace") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {said}\n")  # (not to mask the Ctrl-C)
            print(said, file=sys.stderr)
        raise
    except WingspanError as e:  # (a damaged checkpoint, data gone) before the recipe began:
        if fabric.is_global_zero:  # `wingspan runs` says it failed, as interruptible has it
            from wingspan.run_table import DONE, run_row

            if (run_row(run_dir) or {}).get("status") != DONE:  # (not "nothing to resume")
                write_text(run_dir / ERROR_FILE, e.message + "\n")
        raise
    finally:
        release_lock(run_dir)


def _resume(run_dir: Path, config: TrainConfig, fabric, quiet: bool) -> Path:
    if fabric.is_global_zero:  # it holds the run's lock: nothing else writes there now
        for folder in (run_dir, run_dir / CHECKPOINTS_DIR, run_dir / "cache", run_dir / "model"):
            remove_leftovers(folder)  # of the writes a kill cut short
    last = last_checkpoint(run_dir)
    complete = is_complete(run_dir / "model", intact=True)
    try:
        checkpoint = load_checkpoint(last) if last.is_file() else None
    except WingspanError as e:  # (a finished model is never trained over: see below)
        raise WingspanError(e.message, hint=(
            f"It may be damaged; the run's finished model is in {run_dir / 'model'}."
            if complete else
            f"It may be damaged. Delete it to train this run again from its start "
            f"(`{command('train', '--resume', run_dir)}`), or train a new run.")) from e
    finished = checkpoint and checkpoint["state"]["stage"] == "done"
    metrics = _read_json(run_dir / "metrics.json")  # ({} when gone or damaged: written again)
    if finished and complete and scored(metrics, config.holdout_classes):
        # Killed after the bundle but before finish.drop_feature_cache: a finished run is
        # never resumed, so nothing else would remove its features (GBs on a large set).
        if not config.keep_feature_cache and fabric.is_global_zero:  # (rank 0 writes)
            shutil.rmtree(feature_cache_file(run_dir).parent, ignore_errors=True)
        raise WingspanError(f"The run {run_dir} is finished; there is nothing to resume.",
                            hint=f"Its model is in {run_dir / 'model'}.",
                            every_rank=True)  # (said once, not once a process)
    _check_settings_kept(run_dir, config, checkpoint)
    if checkpoint and checkpoint.get("splits") not in (None, splits_digest(run_dir)):
        raise WingspanError(
            f"{run_dir / SPLITS_FILE} has changed since the run began (edited, or damaged): "
            "the checkpoint's batches are positions in its rows, and its classes the model's.",
            hint="Put the run's own splits.csv back to resume it, or train a new run (`--weights "
                 f"{last_checkpoint(run_dir)}` starts it from this one's backbone).")
    if checkpoint is None and complete:
        # Starting again from nothing would overwrite the finished model.
        raise WingspanError(f"The run {run_dir} has a finished model and no checkpoint "
                            f"({last}) to resume from.",
                            hint="Train a new run to train again; this one's model stays in "
                                 f"{run_dir / 'model'}.")
    # Every row as the run began, files gone since too: the checkpoint's batches are
    # positions in them. The gone ones are then left out as unreadable, and said so.
    dataset = read_dataset(run_dir / SPLITS_FILE, ReadConfig(check_files=False))
    gone = [p for p in dataset.table["path"] if not os.path.isfile(p)]
    _check_classes_remain(run_dir / SPLITS_FILE, dataset, gone, config.trained_levels)
    scoring = finished and complete and bool(metrics)  # killed scoring the held-out classes
    run = start_run(run_dir, config, dataset, quiet, checkpoint, fabric,
                 resuming=_resuming(run_dir, checkpoint, scoring))
    run.note_unreadable([(p, f"Cannot read image {p}: the file is gone since the run began")
                         for p in gone])
    if run.is_main:
        _note_data_changed(run, dataset, config)
    before = _later_calibration(run_dir) if finished and not scoring else None
    done = interruptible(run, scoring_only=scoring)
    if before and run.is_main:
        run.log(f"The model was written again from its checkpoint, as trained: {before}, "
                f"which `wingspan calibrate` fitted since, "
                f"{'are' if ' and ' in before else 'is'} not kept. Run it again on the same "
                f"images: {command('calibrate', run_dir)} ...", caveat=True)
    return done


def _later_calibration(run_dir: Path) -> str | None:
    """What `wingspan calibrate` changed in a finished run's bundle since training (a
    temperature fitted on other images, the unknown answer fitted again), as its manifest
    still says when only the weights are damaged; None when nothing was, or it is gone."""
    try:
        manifest = read_manifest(run_dir / "model")
    except WingspanError:
        return None
    calibration, unknown = manifest.get("calibration") or {}, manifest.get("unknown") or {}
    said = []
    if "previous_temperature" in calibration:  # (only calibrate writes it)
        said.append(f"the temperature {calibration.get('temperature', 0):.3f} (fitted on "
                    f"{calibration.get('fitted_on', '?')})")
    if unknown.get("fitted_by") == "calibrate":
        said.append("the unknown answer's scores and thresholds")
    return " and ".join(said) or None


def _note_data_changed(run: Run, dataset: Dataset, config: TrainConfig) -> None:
    """A resumed run keeps the split, the classes and the labels it began with: a class
    folder added to its data since is not trained on, nor a new image of its classes, and
    an image relabelled since (a label fixed in the CSV) keeps its old label. Said, rather
    than left as it was without a word."""
    root = trained_on(run.dir)
    if not root or not os.path.exists(root):
        return
    try:
        now = read_dataset(root, ReadConfig(check_files=False))
        labels = now.table[now.resolve_level(config.level)]
    except WingspanError:  # the data moved or changed its shape: the split carries on
        return
    added = sorted(set(labels) - set(dataset.table[config.level])
                   - {name_as_read(c) for c in config.holdout_classes or []})
    if added:
        run.log(f"{root} now holds {counted(len(added), 'class', 'classes')} this run does "
                f"not train on ({some(added)}: {counted(int(labels.isin(added).sum()), 'image')}"
                "): a resumed run keeps the classes and split it began with. Train a new run "
                "to learn them.", caveat=True)
    before = dict(zip(dataset.table["path"], dataset.table[config.level], strict=True))
    after = dict(zip(now.table["path"], labels, strict=True))
    relabelled = [p for p, label in after.items() if p in before and before[p] != label]
    # New: put there since the run began (splits.csv leaves out the images --max-per-class
    # drops, and a CSV's rows of files that are not there: those are no news)
    began, known = (run.dir / CONFIG_FILE).stat().st_mtime, set(before.values())
    new = sum(p not in before and label in known and _changed_after(p, began)
              for p, label in after.items())
    if relabelled or new:
        example = relabelled[0] if relabelled else None
        run.log(f"{root} has changed since this run began: "
                + " and ".join(part for part in (
                    f"{counted(len(relabelled), 'image has', 'images have')} another label "
                    f"(e.g. {example}: {before[example]} -> {after[example]})"
                    if relabelled else "",
                    f"{counted(new, 'new image')} of its classes" if new else "") if part)
                + ": a resumed run keeps the labels and split it began with. Train a new run "
                "to use them.", caveat=True)
    # Written again under the same name (an edited or re-exported photo): said too, as the
    # epochs before the kill trained or chose on the old bytes and those after on the new
    rewritten = [p for p, split in zip(dataset.table["path"], dataset.table["split"],
                                       strict=True)
                 if split in ("train", "val") and _changed_after(p, began, written=True)]
    if rewritten:
        run.log(f"{counted(len(rewritten), 'image')} this run trains or chooses on "
                f"{'was' if len(rewritten) == 1 else 'were'} written again since it began "
                f"(e.g. {rewritten[0]}): its epochs before this trained on the old bytes, "
                "those after train on the new. Train a new run for a model of the new ones "
                "alone.", caveat=True)


def _changed_after(path: str, when: float, written: bool = False) -> bool:
    """Whether the file was put where it is after `when` (its ctime: a copy, a move), or,
    `written`, its bytes written since (its mtime: a move keeps it)."""
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return (stat.st_mtime if written else stat.st_ctime) > when


def _resuming(run_dir: Path, checkpoint: dict | None, scoring: bool) -> str:
    """train.log's first line of a resumed run: where it takes up."""
    if checkpoint is None:
        if (run_dir / HISTORY_FILE).is_file():  # epochs were saved: last.pt was deleted
            return (f"Resuming {run_dir} from the beginning: it has no checkpoint "
                    f"({last_checkpoint(run_dir)}) to go on from, so its epochs "
                    "are trained again")
        return f"Resuming {run_dir} from the beginning: it stopped before its first checkpoint"
    state = checkpoint["state"]
    if scoring:
        return f"Resuming {run_dir}: its model is written, scoring the held-out classes"
    if state["stage"] == "done":
        return f"Resuming {run_dir}: training was done, writing its model"
    settings = checkpoint.get("settings") or {}
    planned = settings.get(f"epochs_{state['stage']}")
    if planned is not None and state["epoch"] >= planned and not state["step"]:
        # (killed after the stage's last epoch, before the next stage's checkpoint: "at
        # head epoch 4" of 3)
        return f"Resuming {run_dir}: its {state['stage']} stage's {planned} epochs are done"
    if state.get("bad_epochs", 0) >= settings.get("patience", math.inf) and not state["step"]:
        return (f"Resuming {run_dir}: its {state['stage']} stage stopped early, after "
                f"{state['epoch']} epochs")
    return (f"Resuming {run_dir} at {state['stage']} epoch {state['epoch'] + 1}"
            + (f", batch {state['step'] + 1}" if state["step"] else ""))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _no_run_at(run_dir: Path) -> WingspanError:
    """A run to resume that does not exist: the runs with the closest names."""
    meant = close_runs(run_dir)
    return WingspanError(
        f"{run_dir} does not exist: there is no run there to resume.",
        hint=(f"Did you mean {' or '.join(meant)}?" if meant else
              "Give the folder a `wingspan train` run wrote, e.g. runs/NAME."))


def _check_settings_kept(run_dir: Path, config: TrainConfig, checkpoint: dict | None) -> None:
    """config.yaml as the checkpoint was trained with (edited since, or cut short so that
    settings fall back to their defaults, the rest of the run would follow other ones and
    its model match neither). Checkpoints written before they kept their settings pass."""
    trained = (checkpoint or {}).get("settings")
    if not trained:
        return
    now = learning_settings(config)
    changed = [f"{k}: {now[k]!r} (trained with {v!r})" for k, v in trained.items()
               if k in now and now[k] != v]
    if changed:
        raise WingspanError(
            f"{run_dir / CONFIG_FILE} no longer holds the settings the run was trained with: "
            + "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6
                                        else "") + ".",
            hint="Put those values back to resume it. To train on with other settings, start "
                 "a new run from this one's backbone: wingspan train DATA --weights "
                 f"{last_checkpoint(run_dir)} --backbone {trained.get('backbone')}")


def _run_config(run_dir: Path) -> TrainConfig:
    """The settings a run began with, from its config.yaml; a folder whose config.yaml is
    another program's (or whose splits.csv is gone) is not a run to resume."""
    not_a_run = WingspanError(f"{run_dir} is not a wingspan run: its {CONFIG_FILE} is not "
                              f"one `wingspan train` wrote, or its {SPLITS_FILE} is gone.",
                              hint="Give the folder a `wingspan train` run wrote, e.g. "
                                   "runs/NAME")
    try:
        settings = yaml.safe_load((run_dir / CONFIG_FILE).read_bytes())
    except yaml.YAMLError as e:  # a run's, damaged (as `wingspan runs` says it)
        if not (run_dir / "train.log").is_file():  # (another program's file)
            raise not_a_run from e
        where = getattr(e, "problem_mark", None)
        raise WingspanError(
            f"The run's {run_dir / CONFIG_FILE} is damaged: not valid YAML"
            + (f" (line {where.line + 1}, column {where.column + 1})" if where else "") + ".",
            hint="Mend it (it holds the settings `wingspan train` began the run with) or "
                 "train a new run.") from e
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(settings, dict) or not (run_dir / SPLITS_FILE).is_file():
        raise not_a_run
    unknown = sorted(set(settings) - fields)
    if unknown and {"backbone", "epochs_head"} <= set(settings):  # a run, of another version
        raise WingspanError(f"The run {run_dir} has settings this wingspan does not know: "
                            f"{', '.join(unknown)}. Another version of wingspan wrote it.",
                            hint="Resume it with that version, or train a new run.")
    if unknown:
        raise not_a_run
    if "weights" in settings and settings["weights"] is None:  # (TrainConfig reads Python's
        raise WingspanError(f"{run_dir / CONFIG_FILE}: 'weights' is empty.",  # None as random)
                            hint="Write what the run began with: auto, none (random weights) "
                                 "or the weights file.")
    return TrainConfig(**settings)


def _check_classes_remain(splits: Path, dataset: Dataset, gone: list[str],
                          levels: list[str]) -> None:
    """A resumed run's model has an output per class it began with: a class whose every
    training image has gone since (moved, deleted) cannot be resumed, and is named."""
    train = dataset.table[dataset.table["split"] == "train"]
    left = train[~train["path"].isin(gone)]
    lost = sorted({c for lv in levels if lv in train for c in set(train[lv]) - set(left[lv])
                   if c})
    if lost:
        raise WingspanError(
            f"Every training image of {', '.join(lost)} is gone since the run began "
            f"({len(gone)} of the files {splits} lists cannot be found, e.g. {gone[0]}): the "
            "model cannot resume without them.",
            hint=f"Put the images back where {splits.name} says, or, if the data moved, "
                 f"write their new paths into {splits} (its rows otherwise unchanged); or "
                 "start a new run.")

