"""`wingspan train`: the recipe end to end, in a run folder that a killed run resumes from.

    freeze the backbone, train the head      (stage 1, on cached features)
    unfreeze the last stages, lower the rate (stage 2, end to end)
    keep the best model by val macro-F1, write the bundle

Every process of a distributed run runs these same functions (see `wingspan.parallel` for
which rank does what); `train` and `resume` start the other processes when asked to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from safetensors.torch import load_file

from wingspan.config import RUNS_DIR, ReadConfig, TrainConfig, check_names
from wingspan.data import read_dataset
from wingspan.data.images import call_budget, chosen_budget
from wingspan.data.samples import Dataset, report_reading
from wingspan.data.split import write_splits
from wingspan.errors import (
    TERMINATED,
    WingspanError,
    counted,
    end_started,
    first_line,
    forks_die_of_sigterm,
    sigterm_handler,
    some,
)
from wingspan.evaluate.calibration import (
    MIN_CALIBRATION_IMAGES,
    bound_warning,
    calibration_record,
)
from wingspan.files import atomic_paths, make_folder, remove_leftovers, write_text
from wingspan.models import create_classifier, resolve_policy, save_bundle
from wingspan.models.bundle import checked_weights, read_manifest
from wingspan.models.classifier import Classifier
from wingspan.models.engine import Choice
from wingspan.models.factory import choose_backbone
from wingspan.models.policy import Policy, check_engine_settings, settings_with_environment
from wingspan.models.runtime import forget_sessions
from wingspan.models.unknown import UNKNOWN, UnknownDetector, fit_subset, new_known_rate
from wingspan.parallel import (
    Processes,
    check_default_dtype,
    long_wait,
    lost_peer_said,
    peer_lost,
    rank_seed,
)
from wingspan.progress import Bar
from wingspan.training.checkpoint import load_checkpoint
from wingspan.training.context import MACHINE_SETTINGS, Run, RunState, learning_settings
from wingspan.training.data import fixed_batches, make_loader, resolve_workers
from wingspan.training.folder import (
    CONFIG_FILE,
    ERROR_FILE,
    HISTORY_FILE,
    HOLDOUT_FILE,
    SPLITS_FILE,
    being_trained,
    hold_lock,
    release_lock,
    splits_digest,
    stopped_by,
    stopped_while_set_up,
    trained_on,
)
from wingspan.training.lossy_check import avoided_engines, check_lossy_engines, fp32_engine
from wingspan.training.prepare import (
    build_train_data,
    capped,
    ensure_splits,
    plan_labels,
)
from wingspan.training.stages import (
    finetune,
    image_stamps,
    same_images,
    say_what_is_read,
    train_head,
)
from wingspan.training.step import choose_train


# Grad on whatever the caller left: a notebook's torch.set_grad_enabled(False) stopped the
# head's first step after its features were cached, and a model built in inference_mode
# cannot be trained at all.
@torch.inference_mode(False)
@torch.enable_grad()
def train(dataset: Dataset, config: TrainConfig, runs_dir: str | Path = RUNS_DIR,
          name: str | None = None, quiet: bool = False) -> Path:
    """Train a new run; returns its folder (runs/<name>, numbered if the name is taken).
    With `config.devices` (or `nodes`) above 1, or under torchrun, this runs in every
    process of the run, and Fabric starts those of this machine."""
    check_default_dtype()
    check_engine_settings(config.precision, config.runtime)  # (before a folder is made)
    config = resolve_levels(dataset, config)
    backbone, why = choose_backbone(config.backbone, config.weights)
    config = dataclasses.replace(config, backbone=backbone)  # the run records the real one
    level = config.level
    fabric = _processes(config).fabric()
    made = None
    name = f"{dataset.name}-{config.backbone}" if name is None else name  # '' is refused
    if fabric.is_global_zero:  # rank 0 names the run; the others learn its folder, or that
        try:  # it could not make one (a bad name, a folder it may not write), and stop too
            made = _new_run_dir(Path(runs_dir), name)
            hold_lock(made)  # a folder just made: no other process has it
        except BaseException:
            fabric.broadcast(None)
            raise
    made = fabric.broadcast(str(made) if made else None)
    if made is None:  # (rank 0 says why)
        raise WingspanError("No run folder could be made.", every_rank=True)
    run_dir = Path(made)
    # Whether a run of this name did not finish: said even with --quiet, as --resume may be
    # what the user meant.
    taken = _name_taken(run_dir, name) if fabric.is_global_zero else ""
    logs: list[str] = []
    report_reading(dataset, logs.append)
    try:
        dataset, held_out = hold_out(dataset, level, config.holdout_classes)
        if held_out is not None:
            logs.append(f"Holding out {', '.join(config.holdout_classes)} ({len(held_out)} "
                        "images): not trained on, scored as unknowns at the end")
        dataset = ensure_splits(dataset, level, config, log=logs.append)
        dataset = capped(dataset, config.trained_levels[-1], config, log=logs.append)
        _say_if_a_class_is_named_unknown(dataset, config.trained_levels, logs.append)
        if fabric.is_global_zero:
            _write_run_files(run_dir, dataset, held_out, config)
        run = _start(run_dir, config, dataset, quiet, None, fabric, before=(why,) if why else ())
    except BaseException as e:  # nothing trained yet (bad data, no weights): no empty run
        if fabric.is_global_zero:
            release_lock(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(e, WingspanError):  # every process read the same data: rank 0 says it
            e.every_rank = True
        raise
    try:
        if taken:
            run.log(taken, caveat=True)
        for line in filter(None, logs):  # (a warning is said even with --quiet, as caveats are)
            run.log(line, caveat=line.startswith("Warning:"))
    except SystemExit:
        _reader_gone(run)
        raise
    return _interruptible(run)


def _say_if_a_class_is_named_unknown(dataset: Dataset, levels: list[str], log) -> None:
    """A class called "unknown" is the word predict answers for a photo unlike every
    class: the user must know how to tell the two apart."""
    for lv in levels:
        named = sorted(c for c in dataset.table[lv].unique() if c.strip().lower() == UNKNOWN)
        if named:
            which = (f"class '{named[0]}' has" if len(named) == 1 else
                     "classes " + " and ".join(f"'{c}'" for c in named) + " have")
            log(f"The {lv} {which} the name predict answers for a photo unlike every class. "
                "Tell them apart by `known_level` (empty when turned away), or rename the "
                "class (e.g. 'unidentified').")


def _write_run_files(run_dir: Path, dataset: Dataset, held_out: pd.DataFrame | None,
                     config: TrainConfig) -> None:
    """splits.csv (and holdout.csv), then config.yaml, written together: a kill leaves
    all of them (a run to resume) or none (a run stopped while it was set up, see
    stopped_while_set_up), and config.yaml, renamed last, never without splits.csv."""
    files = [run_dir / SPLITS_FILE, run_dir / CONFIG_FILE]
    if held_out is not None:
        files.insert(1, run_dir / HOLDOUT_FILE)
    # $WINGSPAN_PRECISION / _RUNTIME are recorded as the run's own settings: a resumed
    # run keeps the engines it began with, whatever its shell says.
    precision, runtime = settings_with_environment(config.precision, config.runtime)
    recorded = dataclasses.replace(config, precision=precision, runtime=runtime)
    with atomic_paths(*files) as tmps:
        # The run rebuilds its data from this; absolute paths survive moving the run.
        write_splits(dataset, tmps[0], relative=False)
        if held_out is not None:
            tmps[1].write_text(held_out[["path", config.level]].to_csv(index=False),
                               encoding="utf-8")  # as read_csv reads it, whatever the locale
        tmps[-1].write_text(_data_comment(dataset, run_dir, held_out is not None)
                            + yaml.safe_dump(dataclasses.asdict(recorded), sort_keys=False),
                            encoding="utf-8")


def _recorded_budget(run_dir: Path) -> int | None:
    """The --max-pixels (or max_pixels=) the run began with, from config.yaml's comment
    (as `_data_comment` writes it)."""
    try:
        with open(run_dir / CONFIG_FILE, encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return None
    found = re.search(r"read with .*--max-pixels (\d+)", first)
    return int(found.group(1)) if found else None


def _data_comment(dataset: Dataset, run_dir: Path, held_out: bool) -> str:
    """What config.yaml cannot hold, as a comment: the data and how it was read (a group
    regex moves images between sides), and how to train again on the same split."""
    how = [f"--format {dataset.format}"]
    if dataset.group_regex:
        how.append(f"--group-regex '{dataset.group_regex}'")
    budget = f"--max-pixels {chosen_budget()}" if chosen_budget() else ""  # (or max_pixels=)
    if budget:
        how.append(budget)
    # A line to paste into a shell: paths quoted (a run named "ho run"), the budget kept
    # (without it the images were decoded at 50 MP, and the run was not the same)
    again = (f"wingspan train {shlex.quote(str(run_dir / SPLITS_FILE))} --config "
             f"{shlex.quote(str(run_dir / CONFIG_FILE))}" + (f" {budget}" if budget else ""))
    if held_out:  # splits.csv has none of their images
        again += (" --holdout-classes ''   # the held-out classes' images are in "
                  f"{HOLDOUT_FILE}: to score them as unknowns again, train on the data "
                  "above with this config")
    return (f"# Trained on {dataset.root}, read with {' '.join(how)}.\n"
            f"# Again on the same split: {again}\n")


def hold_out(dataset: Dataset, level: str, classes: list[str] | None):
    """The dataset without `classes` (at `level`), and their rows (None if none asked)."""
    if not classes:
        return dataset, None
    present = set(dataset.table[level])
    missing = [c for c in classes if c not in present]
    if missing:
        close = {c: difflib.get_close_matches(c, sorted(present), n=1) for c in missing}
        raise WingspanError(
            f"--holdout-classes: no class {', '.join(map(repr, missing))} at level '{level}'"
            + "".join(f" (did you mean {m[0]!r}?)" for m in close.values() if m) + ".",
            hint=f"The classes: {', '.join(sorted(present)[:20])}")
    held = dataset.table[level].isin(classes)
    if len(present - set(classes)) < 2:
        raise WingspanError("--holdout-classes would leave fewer than 2 classes to train.",
                            hint="Hold out fewer classes.")
    return dataset.with_table(dataset.table[~held]), dataset.table[held]


def _score_held_out(run_dir: Path, run: Run) -> Path:
    """With --holdout-classes: rank 0 evaluates the model with their images as unknowns
    (RUN/evaluation-unknown) and adds the figures to metrics.json."""
    held = run_dir / HOLDOUT_FILE
    if not (run.config.holdout_classes and run.is_main and held.is_file()):
        return run_dir
    from wingspan.evaluate.run import evaluate
    from wingspan.evaluate.wording import away_wording

    result = evaluate(run_dir, out=run_dir / "evaluation-unknown",
                      progress=run.show_progress, workers=run.workers,
                      unknown=pd.read_csv(held)["path"].tolist())
    u = result.metrics["unknown"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run.write_json("metrics.json", {**metrics, "unknown": u})
    away = away_wording(u)[0]
    run.log(f"Held-out classes as unknowns ({u['unseen_images']} images, score '{u['score']}'): "
            f"AUROC {u['auroc']:.3f}, FPR95 {u['fpr95']:.3f}; {u['unseen_flagged']:.1%} of them "
            f"{away}, the other {1 - u['unseen_flagged']:.1%} named as a known class; "
            f"{u['known_turned_away']:.1%} of the known {result.metrics['split']} images "
            f"{away} too"
            # (without a test split, val: the images the threshold was set on, so the share
            # is the rate asked, not a measure of it on new images)
            + (" (as fitted: the threshold was set on them)"
               if result.metrics["split"] == "val" else "") + f"; report {result.report}"
            + (f" ({len(u['unreadable'])} of their images could not be read and "
               + ("was" if len(u["unreadable"]) == 1 else "were")
               + " not scored: listed in metrics.json)" if u.get("unreadable") else ""),
            caveat=True)  # (figures asked for: said with --quiet too)
    return run_dir


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
    if not (run_dir / CONFIG_FILE).is_file() and (run_dir / "checkpoints").is_dir():
        raise WingspanError(f"{run_dir} has checkpoints but no {CONFIG_FILE}: a resume needs "
                            "the settings the run began with.",
                            hint=f"Put its {CONFIG_FILE} back (from a copy of the folder), or "
                                 "go on from its weights in a new run: wingspan train DATA "
                                 f"--weights {run_dir / 'checkpoints' / 'last.pt'}.")
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
    fabric = _processes(config).fabric()
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
                    f"training. {_go_on(run_dir)}")
            with contextlib.suppress(OSError), open(run_dir / "train.log", "a", encoding="utf-8",
                                                       errors="backslashreplace") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {said}\n")  # (not to mask the Ctrl-C)
            print(said, file=sys.stderr)
        raise
    except WingspanError as e:  # (a damaged checkpoint, data gone) before the recipe began:
        if fabric.is_global_zero:  # `wingspan runs` says it failed, as _interruptible has it
            from wingspan.run_table import DONE, run_row

            if (run_row(run_dir) or {}).get("status") != DONE:  # (not "nothing to resume")
                write_text(run_dir / ERROR_FILE, e.message + "\n")
        raise
    finally:
        release_lock(run_dir)


def _resume(run_dir: Path, config: TrainConfig, fabric, quiet: bool) -> Path:
    if fabric.is_global_zero:  # it holds the run's lock: nothing else writes there now
        for folder in (run_dir, run_dir / "checkpoints", run_dir / "cache", run_dir / "model"):
            remove_leftovers(folder)  # of the writes a kill cut short
    last = run_dir / "checkpoints" / "last.pt"
    complete = _complete_bundle(run_dir / "model", intact=True)
    try:
        checkpoint = load_checkpoint(last) if last.is_file() else None
    except WingspanError as e:  # (a finished model is never trained over: see below)
        raise WingspanError(e.message, hint=(
            f"It may be damaged; the run's finished model is in {run_dir / 'model'}."
            if complete else
            f"It may be damaged. Delete it to train this run again from its start "
            f"(`wingspan train --resume {run_dir}`), or train a new run.")) from e
    finished = checkpoint and checkpoint["state"]["stage"] == "done"
    metrics = _read_json(run_dir / "metrics.json")  # ({} when gone or damaged: written again)
    scored = bool(metrics) and (not config.holdout_classes or "unknown" in metrics)
    if finished and complete and scored:
        raise WingspanError(f"The run {run_dir} is finished; there is nothing to resume.",
                            hint=f"Its model is in {run_dir / 'model'}.",
                            every_rank=True)  # (said once, not once a process)
    _check_settings_kept(run_dir, config, checkpoint)
    if checkpoint and checkpoint.get("splits") not in (None, splits_digest(run_dir)):
        raise WingspanError(
            f"{run_dir / SPLITS_FILE} has changed since the run began (edited, or damaged): "
            "the checkpoint's batches are positions in its rows, and its classes the model's.",
            hint="Put the run's own splits.csv back to resume it, or train a new run (`--weights "
                 f"{run_dir / 'checkpoints' / 'last.pt'}` starts it from this one's backbone).")
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
    run = _start(run_dir, config, dataset, quiet, checkpoint, fabric,
                 resuming=_resuming(run_dir, checkpoint, scoring))
    run.note_unreadable([(p, f"Cannot read image {p}: the file is gone since the run began")
                         for p in gone])
    if run.is_main:
        _note_classes_added(run, dataset, config)
    before = _later_calibration(run_dir) if finished and not scoring else None
    done = _interruptible(run, scoring_only=scoring)
    if before and run.is_main:
        run.log(f"The model was written again from its checkpoint, as trained: {before}, "
                f"which `wingspan calibrate` fitted since, "
                f"{'are' if ' and ' in before else 'is'} not kept. Run it again on the same "
                f"images: wingspan calibrate {run_dir} ...", caveat=True)
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


def _note_classes_added(run: Run, dataset: Dataset, config: TrainConfig) -> None:
    """A resumed run keeps the split and the classes it began with: a class folder added
    to its data since is not trained on. Said, rather than left out without a word."""
    root = trained_on(run.dir)
    if not root or not os.path.exists(root):
        return
    try:
        now = read_dataset(root, ReadConfig(check_files=False))
        labels = now.table[now.resolve_level(config.level)]
    except WingspanError:  # the data moved or changed its shape: the split carries on
        return
    added = sorted(set(labels) - set(dataset.table[config.level])
                   - set(config.holdout_classes or []))
    if added:
        run.log(f"{root} now holds {counted(len(added), 'class', 'classes')} this run does "
                f"not train on ({some(added)}: {counted(int(labels.isin(added).sum()), 'image')}"
                "): a resumed run keeps the classes and split it began with. Train a new run "
                "to learn them.", caveat=True)


def _resuming(run_dir: Path, checkpoint: dict | None, scoring: bool) -> str:
    """train.log's first line of a resumed run: where it takes up."""
    if checkpoint is None:
        if (run_dir / HISTORY_FILE).is_file():  # epochs were saved: last.pt was deleted
            return (f"Resuming {run_dir} from the beginning: it has no checkpoint "
                    f"({run_dir / 'checkpoints' / 'last.pt'}) to go on from, so its epochs "
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


def _complete_bundle(path: Path, intact: bool = False) -> bool:
    """Whether training wrote its bundle to the end (the manifest comes last), and with
    `intact` whether its weights match their checksum (a resume writes a damaged one again
    from the checkpoint; reading them costs a second or two for a ResNet-50)."""
    try:
        manifest = read_manifest(path)
        return "calibration" in manifest and (not intact or bool(checked_weights(path,
                                                                                manifest)))
    except WingspanError:
        return False


def resolve_levels(dataset: Dataset, config: TrainConfig) -> TrainConfig:
    """Check the level names; order several levels coarse to fine, as the data has them."""
    if config.levels:
        for lv in config.levels:
            dataset.resolve_level(lv)
        levels = [lv for lv in dataset.levels if lv in config.levels]
        if config.level not in (None, levels[-1]):
            raise WingspanError(
                f"level '{config.level}' is not the finest of levels {levels}: a run with "
                f"several levels predicts the finest, here '{levels[-1]}'.",
                hint="Leave level out (or name the finest); evaluate and predict report "
                     "every level.")
        weights = config.level_weights
        if weights:
            by_name = dict(zip(config.levels, weights, strict=True))
            weights = [by_name[lv] for lv in levels]
            if weights[-1] <= 0:  # every answer and the unknown score come from its head
                raise WingspanError(
                    f"level_weights gives the finest level, '{levels[-1]}', weight "
                    f"{weights[-1]:g}: its head, which predict, the best epoch and the "
                    "unknown answer all read (coarser levels are summed from it), would "
                    "not learn.",
                    hint="Give the finest level a positive weight; a coarser one may be 0.")
        return dataclasses.replace(config, levels=levels, level_weights=weights,
                                   level=levels[-1])
    return dataclasses.replace(config, level=dataset.resolve_level(config.level))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a run's recipe, once train.log and the terminal have said how to go on.
    `run_dir` is the run's folder (absolute), the handle a notebook user has left:
    `ws.resume(e.run_dir)` goes on."""

    def __init__(self, run_dir: Path | None = None):
        super().__init__()  # (no message: a KeyboardInterrupt shows none)
        self.run_dir = None if run_dir is None else Path(run_dir).absolute()


class Stopped(WingspanError):
    """A run stopped by what befell it (another process lost, a data worker killed), to
    resume: said, and left paused, not failed."""


def _go_on(run_dir: Path) -> str:
    how = f"wingspan train --resume {run_dir} (in Python: ws.resume({str(run_dir)!r}))"
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return f"Continue from the last checkpoint with: {how}"
    return f"It has no checkpoint yet; start it again from the beginning with: {how}"


class _Terminated:
    """SIGTERM (what SLURM, Kubernetes and `timeout` send) stops a run as Ctrl-C does, with
    the line that says how to go on: by default it ended the process without a word. Its
    data workers, sent it too, may die first, and the loader then raises a RuntimeError."""

    def __init__(self):
        self.received, self.installed, self.previous = False, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # (only there in Python)
            forks_die_of_sigterm()  # (its data workers and pools: not as the run does)
            self.previous = signal.signal(signal.SIGTERM, self._stop)
            self.installed = True
        return self

    @sigterm_handler
    def _stop(self, signum, frame):
        self.received = True
        TERMINATED.set()
        end_started()  # (the run's other processes, where this one started them)
        raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, *exc):
        if self.installed:  # (None: a handler set outside Python, which we cannot put back)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None
                          else self.previous)


def _interruptible(run: Run, scoring_only: bool = False) -> Path:
    """The recipe (or, `scoring_only`, the held-out classes' scoring of a run killed
    there); Ctrl-C or SIGTERM leaves the run's last checkpoint, and says how to go on."""
    if run.is_main:
        (run.dir / ERROR_FILE).unlink(missing_ok=True)  # a resume goes at it again
    terminated = _Terminated()
    try:
        with terminated:
            return _score_held_out(run.dir if scoring_only else _recipe(run), run)
    except (KeyboardInterrupt, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not terminated.received:
            if run.fabric.world_size > 1 and peer_lost(e):
                # The others' view of a process that died or was killed: that process's
                # own output says why. The run stays stopped, to resume, not failed.
                said = lost_peer_said(run.fabric, e)
                run.log(said, shown=False)
                raise Stopped(said, hint=_go_on(run.dir)) from e
            if "DataLoader worker" in str(e) and ("killed by signal: Killed" in str(e)
                                                  or "exited unexpectedly" in str(e)):
                # SIGKILL (torch says it either way), most often the kernel's out-of-memory
                # killer: stopped, to resume (it was a 55-line traceback, and train.log did
                # not say the run had stopped).
                said = (f"Stopped: a data worker process was killed ({first_line(e).strip()}): "
                        "most often by the system, as memory ran out.")
                run.log(said, shown=False)
                raise Stopped(said, hint="Fewer --workers or a smaller --batch-size need "
                              f"less memory. {_go_on(run.dir)}") from e
            # One process's own fault, or a loader worker's death under Ctrl-C (that run
            # stays stopped, to resume).
            if run.fabric.world_size == 1 and not str(e).startswith("DataLoader worker"):
                _failed(run, f"{type(e).__name__}: {e}")
            raise
        stop = ("Stopped by SIGTERM (a scheduler's or `kill`'s, or torchrun's once another "
                "process failed: see its output). " if terminated.received else "Interrupted. ")
        if not run.is_main:  # (train.log and the terminal are rank 0's: say which one stopped)
            print(f"Process {run.fabric.global_rank} of {run.fabric.world_size}: "
                  f"{stop.strip()}", file=sys.stderr)
        run.log(stop + _go_on(run.dir), caveat=True)
        raise Interrupted(run.dir) from e
    except WingspanError as e:  # bad data, say: in train.log, and a failed run, not a paused one
        _failed(run, e.message)
        raise
    except SystemExit:
        _reader_gone(run)
        raise
    except Exception as e:  # a fault of ours or of a library: failed too, with what it said
        _failed(run, f"{type(e).__name__}: {e}")
        raise
    finally:
        release_lock(run.dir)
        forget_sessions()  # the ONNX graphs of this run's weights (see models.runtime)


def _reader_gone(run: Run) -> None:
    """rich's SystemExit where stderr's reader went (`2>&1 | head`, a pager quit): the run
    stops (its messages would go nowhere), and train.log says so, as for Ctrl-C."""
    with contextlib.suppress(OSError, WingspanError):
        run.log("Stopped: the reader of its messages went away (`| head`, a pager quit). "
                + _go_on(run.dir), shown=False)


def _failed(run: Run, message: str) -> None:
    """In train.log and error.txt, the error that stopped the run: `wingspan runs` then
    calls it failed and says why. (A full disk that stopped the run may refuse these too:
    its error is the one to say, not theirs.)"""
    with contextlib.suppress(OSError, WingspanError):
        run.log(f"Stopped: {message}", shown=False)  # (the error itself is printed)
        if run.is_main:
            write_text(run.dir / ERROR_FILE, message + "\n")


def _recipe(run: Run) -> Path:
    """The two stages, each skipped when a resumed run has already done it."""
    if run.state.stage == "head":
        if run.config.epochs_head:
            _timed(run, "head", train_head)
            # Fine-tune from the best head, not from wherever stage 1 happened to stop. It
            # goes into the stage's checkpoint: a run killed later, once a fine-tuned epoch
            # has replaced best.pt but before its own checkpoint, resumes from this head.
            run.fabric.barrier()  # rank 0's best.pt is on disk before any rank reads it
            if run.state.best_epoch > 0:
                run.model.load_state_dict(_best_checkpoint(run)["model"])
        _next_stage(run, "finetune")
    if run.state.stage == "finetune":
        if run.config.epochs_finetune:
            _timed(run, "finetune", finetune)
        _next_stage(run, "done")
    return _finish(run)


def _timed(run: Run, stage: str, fn) -> None:
    resumed = run.state.epoch > 0 or run.state.step > 0  # (a stage taken up where it stopped)
    at, start = (run.state.epoch, run.state.step), time.perf_counter()
    fn(run)
    took = time.perf_counter() - start
    if resumed and (run.state.epoch, run.state.step) == at:
        return  # (resumed after its last epoch: not "took 0.0s since the resume")
    run.log(f"Stage '{stage}' took {took:.1f}s" + (
        f" since the resume; its epochs took {run.state.stage_seconds.get(stage, 0.0):.1f}s "
        "in all, with those before it" if resumed else ""))


def _next_stage(run: Run, stage: str) -> None:
    run.state.stage, run.state.epoch, run.state.step = stage, 0, 0
    run.state.steps_per_epoch = 0  # the next stage sizes its own schedule
    run.state.bad_epochs, run.state.partial = 0, {}
    run.save()
    run.fabric.barrier()  # rank 0's checkpoints are on disk before any rank reads them


def _processes(config: TrainConfig) -> Processes:
    return Processes(config.device, config.devices, config.nodes, config.strategy)


def close_runs(path: Path) -> list[str]:
    """The runs beside a path that is no run (a typo, or a run's name without its runs
    folder), or in the runs folder there, whose names are closest to its name."""
    runs = []
    for folder in dict.fromkeys([path.parent, path.parent / "runs"]):
        try:
            runs += [d for d in sorted(folder.iterdir()) if (d / CONFIG_FILE).is_file()]
        except OSError:  # no such folder, or one we may not read: nothing to suggest
            pass
    close = difflib.get_close_matches(path.name, [d.name for d in runs], n=3)
    return [str(d) for name in close for d in runs if d.name == name]


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
                 f"{run_dir / 'checkpoints' / 'last.pt'} --backbone {trained.get('backbone')}")


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


def _saved_workers(run_dir: Path) -> int | None:
    """The --workers in the run's config.yaml (a resume may set another)."""
    try:
        return (yaml.safe_load((run_dir / CONFIG_FILE).read_bytes()) or {}).get("workers")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def _start(run_dir: Path, config: TrainConfig, dataset: Dataset, quiet: bool,
           checkpoint: dict | None, fabric, before: tuple[str, ...] = (),
           resuming: str = "") -> Run:
    """The run's model, engines, data and state, from scratch or from `checkpoint`;
    `before`: lines to log ahead of the "Run" line (why this backbone, say); `resuming`:
    a resumed run's first line, in its place. A run resumed from a checkpoint does not say
    again what its train.log says above (the data's counts and warnings)."""
    torch.manual_seed(config.seed)
    logs: list[str] = []
    said_before = checkpoint is not None
    # Before any work; a resumed run's saved --workers may come from a larger machine.
    saved = checkpoint is not None and config.workers == _saved_workers(run_dir)
    workers = resolve_workers(config.workers, _processes(config).world()[0],
                              log=logs.append if saved else None)
    policy = resolve_policy(str(fabric.device), config.precision, runtime=config.runtime)
    plan = plan_labels(dataset, config.trained_levels, config,
                       log=_unsaid if said_before else logs.append)
    # A resumed run takes every weight from its checkpoint, so it needs no download.
    weights = "none" if checkpoint else config.weights
    model, loaded = create_classifier(config.backbone,
                                      {lv: len(plan.classes[lv]) for lv in plan.levels},
                                      weights, hidden=config.hidden, dropout=config.dropout)
    model.backbone.train_bn = config.train_bn
    state = RunState(**checkpoint["state"]) if checkpoint else RunState(
        weights_source=loaded.describe() if loaded else config.weights,
        input_size=loaded.input_size if loaded else None)
    if config.image_size or state.input_size:  # (a size asked for is tried first)
        model.set_input_size(config.image_size or state.input_size,
                             check=bool(config.image_size) and not checkpoint)
    policy.prepare_model(model)
    if checkpoint:  # a resumed run that must choose again guards its own weights
        model.load_state_dict(checkpoint["model"])
    policy = _choose_engines(fabric, policy.adopt(state.engines), model, config, not quiet)
    state.engines = policy.records()
    if policy.train_precision != "fp32":  # the same processes, with the step's precision
        fabric = _processes(config).fabric(policy.train_precision)
    run = Run(run_dir, config, model, policy, None, state, workers, fabric, quiet,
              weights_source=state.weights_source or config.weights,
              resume_from=checkpoint)
    world = (f", {fabric.world_size} processes ({fabric.strategy.__class__.__name__})"
             if fabric.world_size > 1 else "")
    for line in before:
        run.log(line)
    if resuming:
        run.log(f"{resuming}, on {policy.describe()}")
    else:
        run.log(f"Run {run_dir}: {config.backbone} ({run.weights_source}) on {policy.describe()}"
                f", {counted(workers, 'data worker')}{world}")
    for kind, stage in (("frozen", "head"), ("train", "finetune")):
        choice = getattr(policy, kind)
        if choice and choice.how == "measured":  # the timing counts in the stage it serves
            state.stage_seconds[stage] = state.stage_seconds.get(stage, 0.0) + choice.seconds
            run.timing(stage, "engine_choice", choice.seconds)
    for line in logs:
        run.log(line)
    run.data = build_train_data(plan, config, model.preprocessing,
                                log=_unsaid if said_before else run.log)
    if checkpoint and fabric.is_global_zero:  # rank 0 goes on with the saved stream
        torch.set_rng_state(checkpoint["rng"])
        if checkpoint.get("cuda_rng") is not None and run.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], run.device)
    elif fabric.global_rank > 0:  # dropout masks of its own, not a copy of rank 0's
        torch.manual_seed(rank_seed(config.seed, fabric.global_rank, state.epoch, state.step))
    return run


def _unsaid(line: str) -> None:
    """What a resumed run's train.log already says, above."""


def _choose_engines(fabric, policy: Policy, model: Classifier, config: TrainConfig,
                    progress: bool) -> Policy:
    """The engines for frozen passes and, if the run fine-tunes, for its training step:
    forced, cached, or timed now (once per model and machine; see wingspan.models.engine).
    Rank 0 chooses and the other ranks take its choice. Timing leaves the model and the
    random stream as they were."""
    chosen = _choose_here(policy, model, config, progress) if fabric.is_global_zero else None
    if fabric.world_size == 1:
        return chosen
    records = fabric.broadcast(chosen.records() if chosen else None)
    return chosen or policy.adopt(records, "as rank 0 chose")


def _choose_here(policy: Policy, model: Classifier, config: TrainConfig,
                 progress: bool) -> Policy:
    size = model.preprocessing.input_size
    policy = policy.choose_frozen(model, size, config.batch_size, progress=progress)
    if config.epochs_finetune:
        stages = model.spec.unfreeze if config.unfreeze is None else config.unfreeze
        policy = choose_train(policy, model, stages, size, config.batch_size,
                              progress=progress)
    return policy


def _finish(run: Run) -> Path:
    """Load the best model, write metrics.json and the bundle (rank 0; the others wait, so
    that the bundle exists wherever `train` returns)."""
    wait = long_wait(run.fabric)
    if run.is_main:
        _write_results(run)
    wait()
    return run.dir


def _write_results(run: Run) -> None:
    state = run.state
    say_what_is_read(run)  # what the last epoch found too
    best = _best_checkpoint(run)
    run.model.load_state_dict(best["model"])
    # last.pt holds the best weights before the bundle is written (README: both checkpoints
    # hold them once the run is done): killed between the two, the run read as finished
    # with the last epoch's weights in last.pt, which `--weights RUN/.../last.pt` trains on.
    run.save()
    best_row = next(r for r in state.history
                    if r["stage"] == best["stage"] and r["epoch"] == best["epoch"])
    test_gone = _test_images_gone(run)
    metrics = {
        "level": run.data.level, "levels": run.data.levels,
        "classes": {lv: len(c) for lv, c in run.data.level_classes.items()},
        "best": {"stage": best["stage"], "epoch": best["epoch"], "val_acc": best_row["val_acc"],
                 "val_macro_f1": best_row["val_macro_f1"], "val_loss": best_row["val_loss"]},
        "stage_seconds": {k: round(v, 1) for k, v in state.stage_seconds.items()},
        "epochs": {s: sum(r["stage"] == s for r in state.history) for s in ("head", "finetune")},
        "profile": _profile_table(state.profile),
        "weights": run.weights_source, "engine": run.policy.describe(),
        "engines": run.policy.records(),
        # The images it could read (the others are listed under "unreadable")
        "train_images": int(run.readable(run.data.train).sum()),
        "val_images": int(run.readable(run.data.val).sum()),
        "test_images": run.data.test_images - test_gone,  # (gone since the run began: left)
        # Which figure is fair: the best epoch was chosen on val, so its score is optimistic.
        "selection": {"chosen_on": "val", "unbiased_split": "test" if run.data.test_images
                      else None},
        "unreadable": [{"path": p, "reason": why} for p, why in state.skipped.items()],
        "splits_digest": run.splits_digest,  # evaluate checks its splits.csv against it
    }
    taxonomy = run.data.taxonomy.to_dict() if run.data.taxonomy else None
    training = json.loads(json.dumps(dataclasses.asdict(run.config)))
    training["rare_classes"] = run.data.rare
    training["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    run.model.eval()
    inference = _check_lossy(run)
    # (read and checked once, for both splits)
    switched = _in_fp32_from_here(run, avoided_engines(inference))
    if switched:  # (the engine line is the epochs'; the last passes' is added)
        metrics["engine"] += (f"; final passes {run.policy.frozen.engine.name}, as this "
                              "model's predictions")
    run.write_json("metrics.json", metrics)
    cached = None if switched else _cached_features(run)
    val = _final_outputs(run, "val", cached)
    calibration = _fit_calibration(run, val)
    metrics["calibration"] = calibration
    unknown = _fit_unknown(run, val, calibration["temperature"], cached)
    save_bundle(run.model.cpu(), run.dir / "model", run.data.level_classes, taxonomy=taxonomy,
                training=training, metrics=metrics, weights_source=run.weights_source,
                calibration=calibration, unknown=unknown, inference=inference)
    run.log(f"Best val macro-F1 {best_row['val_macro_f1']:.4f} (acc {best_row['val_acc']:.4f}) "
            f"at {best['stage']} epoch {best['epoch']}; model in {run.dir / 'model'}")
    if run.data.test_images:
        left = run.data.test_images - test_gone
        run.log(f"That val figure is optimistic (the epoch was chosen on it). For a fair one: "
                f"`wingspan evaluate {run.dir}` (run.evaluate() in Python) scores the "
                f"{left} test images"
                + (f" left ({test_gone} of the {run.data.test_images} are gone since the run "
                   "began)" if test_gone else "") + ", never trained or chosen on.",
                caveat=True)
    else:
        why = ("--test-fraction 0" if not run.config.test_fraction else
               "--selection val on data with its own val" if run.config.selection == "val"
               else "the data's own split has no test images that could be read")
        run.log(f"No test split was kept apart ({why}): the val figure is the only one, and "
                "optimistic (the epoch was chosen on it).", caveat=True)


def _check_lossy(run: Run) -> dict | None:
    """The lossy engines' answers on val against fp32's (training.lossy_check), said in
    train.log, for the bundle. A check that fails is said and skipped: it only advises,
    and the run is done."""
    try:
        checked = check_lossy_engines(run)
    except Exception as e:  # noqa: BLE001 - whatever it is (out of memory), the run stands
        run.log(f"The lossy engines' answers could not be checked ({first_line(e)}): this "
                "model's predictions may run them.", caveat=True)
        return None
    if not checked:
        return None
    inference = {"lossy_engines": checked}
    avoided = avoided_engines(inference)
    for name, got in checked.items():
        run.log(f"{name} answered otherwise than fp32 on {got['answers_changed']} of "
                f"{got['images']} val images: " + (
                    "left out of this model's predictions" if name in avoided else
                    "kept among the engines its predictions may run"))
    return inference


def _in_fp32_from_here(run: Run, avoided: dict[str, str]) -> bool:
    """Where the frozen passes' engine is one the check left out of the model's
    predictions, the final passes (the temperature, the unknown scores and their
    thresholds) run fp32 too, as its predictions will, not on the head stage's cache."""
    engine = run.policy.frozen.engine if run.policy.frozen else None
    precision, runtime = settings_with_environment(run.config.precision, run.config.runtime)
    if engine is None or precision != "auto" or (  # (bf16 forced: as asked)
            engine.name not in avoided):
        return False
    fp32 = fp32_engine(run.policy.device, runtime)
    run.policy = run.policy.with_choice("frozen", Choice(fp32, "fp32 for this model"))
    run.log(f"The final passes run {fp32.name}, as this model's predictions will "
            f"({engine.name} left out)")
    return True


def _best_checkpoint(run: Run) -> dict:
    """best.pt; when it cannot be read (a damaged disk or copy), the model as it stands,
    said so: the run still finishes rather than stopping for good. That model is the best
    head where the head stage is over and no fine-tuned epoch followed (_recipe loaded
    it before the checkpoint it was resumed from), else the last epoch's."""
    try:
        return load_checkpoint(run.checkpoints / "best.pt")
    except WingspanError as e:
        state, last = run.state, run.state.history[-1]
        if state.stage != "head" and last["stage"] == "head" == state.best_stage:
            run.log(f"{e.message} The model is the best one's all the same (head epoch "
                    f"{state.best_epoch}, kept in the last checkpoint).", caveat=True)
        else:
            run.log(f"{e.message} The model is the last epoch's ({last['stage']} epoch "
                    f"{last['epoch']}), not the best one's ({state.best_stage} epoch "
                    f"{state.best_epoch}).", caveat=True)
            # That epoch is the best from here on, and best.pt is written again with it.
            run.keep_best(last["val_macro_f1"], last["stage"], last["epoch"], last["val_loss"])
        return {"model": run.model.state_dict(), "stage": state.best_stage,
                "epoch": state.best_epoch}


def _test_images_gone(run: Run) -> int:
    """How many of the run's test images are gone since it began (deleted or moved while
    it was stopped): what evaluate then cannot score."""
    if not run.data.test_images:
        return 0
    table = read_dataset(run.dir / SPLITS_FILE, ReadConfig(check_files=False)).table
    return sum(not os.path.isfile(p) for p in table.loc[table["split"] == "test", "path"])


@torch.inference_mode()
def _final_outputs(run: Run, split: str, cached: dict[str, torch.Tensor] | None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The best model's pooled features, logits per level and labels (N, levels) of the
    readable images of `train` (clean views; at most MAX_FIT_IMAGES, those the unknown
    scores are fitted on) or `val`. From the feature cache (`cached`, see
    _cached_features) where it holds them; else one pass with the final weights."""
    images = run.data.train_clean if split == "train" else run.data.val
    rows = torch.arange(len(images))[run.readable(images)]
    # Of the training images, those the unknown scores are fitted on, drawn first: past
    # MAX_FIT_IMAGES the rest would be a pass for nothing (28k of 33k images on ETHEC).
    if split == "train" and (keep := fit_subset(len(rows), run.config.seed)) is not None:
        rows = rows[keep]
    feats = cached[split] if cached is not None else None
    if feats is not None:
        feats = (feats[:, 0] if split == "train" else feats)[rows]
        labels = images.labels[rows]
    else:
        run_model = _final_pass(run)
        parts, index = [], []
        loader = make_loader(images, fixed_batches(rows.tolist(), run.config.batch_size),
                             run.workers)
        with Bar(len(rows), f"Final {split} features", run.show_progress) as bar:
            for x, _, idx, failed in loader:
                if len(idx):
                    parts.append(run_model(x)["features"])
                    index.append(idx)
                bar.advance(len(idx) + len(failed))
        feats, labels = torch.cat(parts), images.labels[torch.cat(index)]
    head = run.model.head.float().cpu()
    logits = {lv: v.float() for lv, v in head(feats.float()).items()}
    return feats.float(), logits, labels


def _cached_features(run: Run) -> dict[str, torch.Tensor] | None:
    """The head stage's cached features of train and val, where the best model is a head
    on the frozen backbone (which never moved) and the cache holds these very images;
    else None (computed again): the file damaged (as stage 1 takes it), of other images,
    or an image edited while the run was stopped and resumed in fine-tuning, which never
    looks at the cache (its old features would fit the temperature and unknown score)."""
    cache = run.dir / "cache" / "features.safetensors"
    if run.state.best_stage != "head" or not cache.is_file():
        return None
    try:
        saved = load_file(cache)
        sizes = len(saved["train"]), len(saved["val"])
    except Exception as e:  # noqa: BLE001 - safetensors raises many types for a bad file
        run.log(f"The feature cache {cache} cannot be read ({type(e).__name__}); computing "
                "the final features again")
        return None
    now = image_stamps(run.data.train.paths + run.data.val.paths)
    same = sizes == (len(run.data.train_clean), len(run.data.val))
    return saved if same and same_images(run, saved.get("stamps"), now) else None


def _final_pass(run: Run):
    """images -> {"features", ...} of the best model, as it is now, in fp32 on the frozen
    passes' engine: with ONNX Runtime, one export of the whole model for both final passes
    (val, then train: a thousand images or more, where the export's second pays for itself;
    the fine-tuning prefix with the rest in PyTorch fp32 ran them no faster on an AMX Xeon,
    bench/oneoff_pass.py, and PyTorch fp32 is 3-4x slower than ONNX Runtime on an AVX2 EPYC),
    or the last validation pass's graph when that was of these weights. The logits are the
    head's (_final_outputs). Its graph is not kept on disk: predict runs the bundle's
    feature extractor, another graph."""
    module, names = run.model.with_features()
    return run.policy.runner(module, run.image_size, names, keep=False)


def _fit_calibration(run: Run, val: tuple) -> dict:
    """The temperature that makes the best model's probabilities honest on the run's own
    val split (fitted here, once, so that evaluating never changes the model;
    `wingspan calibrate` fits it again on purpose). Rank 0 alone: no collectives."""
    _, logits, labels = val
    taxonomy = run.data.taxonomy  # the class answered is its top-down branch's, as evaluate's
    answer = (lambda probs: taxonomy.answer(probs, temperature=1.0)) if taxonomy else None
    record = calibration_record(logits[run.data.level].numpy(), labels[:, -1].numpy(), "val",
                                answer=answer)
    if bound_warning(record):
        run.log(f"Warning: {bound_warning(record)}", caveat=True)
    if record["images"] < MIN_CALIBRATION_IMAGES:  # still fitted: the run must finish
        run.log(f"Warning: the temperature ({record['temperature']:.3f}) rests on "
                f"{counted(record['images'], 'val image')}, too few to say much (`wingspan "
                f"calibrate` asks for {MIN_CALIBRATION_IMAGES}). Fit it again on more labelled "
                f"images of these classes: `wingspan calibrate {run.dir} DATA`.", caveat=True)
    if record["method"] != "likelihood":
        aim = f"{record['images'] + 1} / {record['images'] + 2}"
        run.log(f"Every val image is right: the temperature ({record['temperature']:.3f}) is "
                f"set by the {record['method']}, so that the mean top probability on val is "
                + (f"{aim}." if not record["at_bound"] else
                   f"as near {aim} as the bound lets it (see the warning above)."))
    return record


def _fit_unknown(run: Run, val: tuple, temperature: float,
                 cached: dict[str, torch.Tensor] | None) -> UnknownDetector:
    """Every unknown score, fitted on the training images' features with the best model,
    and thresholded on val (see wingspan.models.unknown)."""
    feats, logits, labels = _final_outputs(run, "train", cached)
    levels = run.data.levels
    rate, n = run.config.unknown_rate, len(val[0])
    # On few val images the threshold's rate on new known images is well over `rate`,
    # and loose: +- 2 binomial standard deviations.
    expected = new_known_rate(n, rate)
    spread = 2 * (expected * (1 - expected) / max(n, 1)) ** 0.5
    few = spread > rate / 2 or expected > 1.5 * rate
    # On 20 val images or fewer (at 5%) the threshold is above them all: none turned away.
    above_all = n and math.ceil((1 - rate) * (n - 1)) == n - 1
    run.log(f"Unknown answer ('{run.config.unknown_score}'): the threshold "
            + (f"is just above all {n} known val images (on so few, the {rate:.0%} asked "
               "turns none of them away)" if above_all else
               f"turns away at most {rate:.0%} of the {n} known val images")
            + (f"; on new known images expect about {expected:.0%} (from "
               f"{max(expected - spread, 0):.0%} to {min(expected + spread, 1):.0%}) with so "
               "few (more val images narrow it: --val-fraction, or the data's own val "
               "split, where it has one)" if few else ""),
            caveat=expected > 2 * rate)
    return UnknownDetector.fit(
        feats, logits, {lv: labels[:, i] for i, lv in enumerate(levels)}, val[0], val[1],
        score=run.config.unknown_score, rate=rate, temperature=temperature,
        seed=run.config.seed, members=run.data.taxonomy.member if run.data.taxonomy else None)


def _profile_table(profile: dict) -> dict:
    """Seconds per kind of work and training images/s, per stage. Every stage has every
    kind (0 where it did none, as stage 2 builds no feature cache): a table of the stages
    then shows a figure in each cell, not a NaN."""
    kinds = list(dict.fromkeys(k for spent in profile.values() for k in spent if k != "images"))
    table = {}
    for stage, spent in profile.items():
        row = {k: round(spent.get(k, 0.0), 2) for k in kinds}
        busy = sum(spent.get(k, 0.0) for k in ("data", "forward", "backward"))
        row["train_images_per_s"] = round(spent.get("images", 0) / busy, 1) if busy else None
        table[stage] = row
    return table


def _name_taken(run_dir: Path, name: str) -> str:
    """Why a run is not runs/NAME (the name was taken), and whether a run before it there
    did not finish: rerunning a stopped run's command (after a Ctrl-C) starts afresh, and
    the user must know that `--resume` continues the other instead."""
    if run_dir.name == name:
        return ""
    n = int(run_dir.name.rpartition("-")[2])
    earlier = [run_dir.parent / name, *(run_dir.parent / f"{name}-{k}" for k in range(2, n))]
    training = [d for d in earlier if (d / ".lock").is_file() and being_trained(d)]  # now
    stopped = [d for d in earlier if (d / CONFIG_FILE).is_file() and d not in training
               and not _complete_bundle(d / "model") and not stopped_by(d)]
    # Killed before config.yaml (none of them is being set up now): nothing to resume.
    set_up = [d for d in earlier if stopped_while_set_up(d) and d not in training]
    if not stopped and set_up:
        what = (f"{set_up[-1]} is left from a run killed while it was being set up, before "
                "it trained anything" if any(set_up[-1].iterdir())
                else f"{set_up[-1]} is an empty folder")
        return (f"{what}: this run is {run_dir}. Delete {set_up[-1]} (there is nothing in it "
                "to resume) to give a run that name again.")
    if not stopped:
        return (f"{training[-1]} is being trained now" if training
                else f"{earlier[0]} is taken") + f": this run is {run_dir}"
    return (f"{stopped[-1]} holds a run that did not finish; this one starts afresh in "
            f"{run_dir}. If that one was stopped, `wingspan train --resume {stopped[-1]}` "
            "continues it instead (Ctrl-C this one).")


MAX_NAME_BYTES = 200


def _new_run_dir(runs: Path, name: str) -> Path:
    if name in (".", "..") or "/" in name or os.sep in name:  # a name, not a path
        raise WingspanError(f"The run name '{name}' is a path; a run is named, and goes in "
                            f"--runs-dir ({runs}).", hint="Give a plain name, e.g. leeds-lite2, "
                            "and the folder with --runs-dir.")
    # A blank name makes a folder no one can tell apart; 255 bytes is the longest a file
    # system takes, with room for what is added to a run's name ("-2", "-adapted-2").
    if not name.strip() or len(name.encode()) > MAX_NAME_BYTES:
        raise WingspanError(f"The run name '{name[:60]}{'...' if len(name) > 60 else ''}' is "
                            + ("blank." if not name.strip() else
                               f"{len(name.encode())} bytes long; a run's name takes at most "
                               f"{MAX_NAME_BYTES}."),
                            hint="Give a short plain name with --name (name= in Python), "
                                 "e.g. leeds-lite2.")
    path, n = make_folder(runs) / name, 2
    while True:
        try:  # (mkdir, not a look first: two runs started at once took one name, and the
            path.mkdir()  # later stopped with "is a file, where a folder is needed")
            return path
        except FileExistsError:
            path, n = runs / f"{name}-{n}", n + 1
