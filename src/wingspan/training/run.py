"""`wingspan train`: the recipe end to end, in a run folder that a killed run resumes from.

    freeze the backbone, train the head      (stage 1, on cached features)
    unfreeze the last stages, lower the rate (stage 2, end to end)
    keep the best model by val macro-F1, write the bundle (finish.py)

Ctrl-C and SIGTERM stop it with the line that says how to go on (resuming.py takes a
stopped run up again). Every process of a distributed run runs these same functions (see
`wingspan.parallel` for which rank does what); `train` and `resume` start the other
processes when asked to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from wingspan.config import RUNS_DIR, TrainConfig
from wingspan.data.csvfiles import name_as_read
from wingspan.data.images import chosen_budget
from wingspan.data.samples import Dataset, report_reading
from wingspan.data.split import write_splits
from wingspan.errors import (
    DROPPED,
    RUN_SIGNALLED,
    TERMINATED,
    WingspanError,
    command,
    counted,
    end_started,
    first_line,
    forks_die_of_sigterm,
    out_of_memory_said,
    redeliver_dropped_sigterm,
    sigterm_handler,
    some,
    stop_if_signalled,
)
from wingspan.files import atomic_paths, frame_to_csv, make_folder, write_text
from wingspan.models import create_classifier, resolve_policy
from wingspan.models.bundle import is_complete
from wingspan.models.classifier import Classifier
from wingspan.models.factory import choose_backbone
from wingspan.models.policy import Policy, check_engine_settings, settings_with_environment
from wingspan.models.runtime import forget_sessions
from wingspan.models.unknown import UNKNOWN
from wingspan.models.weights import source_run
from wingspan.parallel import Processes, check_default_dtype, lost_peer_said, peer_lost, rank_seed
from wingspan.training.context import Run, RunState
from wingspan.training.data import resolve_workers, room_for_workers
from wingspan.training.finetune_engine import choose_train
from wingspan.training.finish import (
    best_checkpoint,
    drop_feature_cache,
    finish,
    score_held_out,
)
from wingspan.training.folder import (
    CONFIG_FILE,
    ERROR_FILE,
    HOLDOUT_FILE,
    SPLITS_FILE,
    TRAIN_AGAIN,
    being_trained,
    hold_lock,
    last_checkpoint,
    release_lock,
    scored,
    stopped_by,
    stopped_while_set_up,
)
from wingspan.training.prepare import build_train_data, capped, ensure_splits, plan_labels
from wingspan.training.stages import finetune, train_head


def callers_random_stream_kept(fn):
    """`fn` seeds torch's random stream for the run (start_run) and gives the caller's back
    at the end: a notebook's torch.manual_seed(123), then ws.train(seed=7), had left torch
    seeded at 7 for the rest of the notebook. CUDA's streams are given back where the
    caller had started CUDA (forking them would start it); where it had not, torch seeds
    CUDA lazily, and the run's seed took the caller's place: it is seeded again with the
    caller's seed, as the caller's torch.manual_seed had left it."""
    @functools.wraps(fn)
    def kept(*args, **kwargs):
        started = torch.cuda.is_initialized()
        cuda, seed = list(range(_gpus())) if started else [], torch.initial_seed()
        with torch.random.fork_rng(devices=cuda):
            try:
                return fn(*args, **kwargs)
            finally:
                if not started and _gpus():
                    torch.cuda.manual_seed_all(seed)
    return kept


def _gpus() -> int:
    return torch.cuda.device_count()


# Grad on whatever the caller left: a notebook's torch.set_grad_enabled(False) stopped the
# head's first step after its features were cached, and a model built in inference_mode
# cannot be trained at all.
@callers_random_stream_kept
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
    fabric = processes(config).fabric()
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
        if held_out is not None:  # recorded as the data names them (hold_out's reading)
            config = dataclasses.replace(config, holdout_classes=sorted(set(held_out[level])))
            logs.append(f"Holding out {', '.join(config.holdout_classes)} ({len(held_out)} "
                        "images): not trained on, scored as unknowns at the end")
        dataset = ensure_splits(dataset, level, config, log=logs.append)
        dataset = capped(dataset, config.trained_levels[-1], config, log=logs.append)
        _say_if_a_class_is_named_unknown(dataset, config.trained_levels, logs.append)
        if fabric.is_global_zero:
            _write_run_files(run_dir, dataset, held_out, config)
        # (said after the run's first line, before the counts start_run's reading gives)
        told = [(taken, True)] if taken else []
        told += [(line, line.startswith("Warning:")) for line in filter(None, logs)]
        run = start_run(run_dir, config, dataset, quiet, None, fabric,
                        before=(why,) if why else (), told=tuple(told))
    except BaseException as e:  # nothing trained yet (bad data, no weights): no empty run
        if fabric.is_global_zero:
            release_lock(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(e, WingspanError):  # every process read the same data: rank 0 says it
            e.every_rank = True
        raise
    return interruptible(run)


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
            frame_to_csv(held_out[["path", config.level]], tmps[1])
        tmps[-1].write_text(_data_comment(dataset, run_dir, held_out is not None)
                            + yaml.safe_dump(dataclasses.asdict(recorded), sort_keys=False),
                            encoding="utf-8")


def _data_comment(dataset: Dataset, run_dir: Path, held_out: bool) -> str:
    """What config.yaml cannot hold, as a comment: the data and how it was read (a group
    regex moves images between sides), and how to train again on the same split."""
    how = [f"--format {dataset.format}"]
    if dataset.group_regex:
        how.append(f"--group-regex '{dataset.group_regex}'")
    budget = f"--max-pixels {chosen_budget()}" if chosen_budget() else ""  # (or max_pixels=)
    if budget:
        how.append(budget)
    # A line to paste into a shell: paths quoted (a run named "ho run") and whole (relative,
    # they held only from the folder trained in), the budget kept (without it the images
    # were decoded at 50 MP, and the run was not the same)
    run_dir = Path(os.path.abspath(run_dir))
    again = (command("train", run_dir / SPLITS_FILE, "--config", run_dir / CONFIG_FILE)
             + (f" {budget}" if budget else ""))
    if held_out:  # splits.csv has none of their images
        again += (" --holdout-classes ''   # the held-out classes' images are in "
                  f"{HOLDOUT_FILE}: to score them as unknowns again, train on the data "
                  "above with this config")
    return (f"# Trained on {dataset.root}, read with {' '.join(how)}.\n"
            f"{TRAIN_AGAIN}{again}\n")


def _comma_names_joined(names: list[str], present: set[str]) -> list[str]:
    """`names` as the command line split them at commas, with each class whose own name
    holds commas ("Vanessa atalanta (Linnaeus, 1758)") put back together from its parts."""
    for whole in (c for c in present if "," in c and c not in names):
        parts = [part.strip() for part in whole.split(",")]
        for i in range(len(names) - len(parts) + 1):
            if names[i:i + len(parts)] == parts:
                names = names[:i] + [whole] + names[i + len(parts):]
                break
    return names


def hold_out(dataset: Dataset, level: str, classes: list[str] | None):
    """The dataset without `classes` (at `level`), and their rows (None if none asked)."""
    if not classes:
        return dataset, None
    present = set(dataset.table[level])
    classes = _comma_names_joined([name_as_read(c) for c in classes], present)
    missing = [c for c in classes if c not in present]
    if missing:
        close = {c: difflib.get_close_matches(c, sorted(present), n=1) for c in missing}
        # A coarser level's class (a family, with --levels): its classes at `level` are what
        # holding it out means (said: the hint listed the species alone).
        coarser = {c: (lv, sorted(set(dataset.table.loc[dataset.table[lv] == c, level])))
                   for c in missing for lv in dataset.levels
                   if lv != level and c in set(dataset.table[lv])}
        raise WingspanError(
            f"--holdout-classes: no class {', '.join(map(repr, missing))} at level '{level}'"
            + "".join(f" (did you mean {m[0]!r}?)" for c, m in close.items()
                      if m and c not in coarser) + ".",
            hint="".join(f"{c!r} is a {lv}: hold out its {level} classes, --holdout-classes "
                         f"{','.join(under)}. " if len(under) <= 20 else
                         f"{c!r} is a {lv}: hold out its {len(under)} {level} classes "
                         f"({', '.join(under[:5])}...). " for c, (lv, under) in coarser.items())
            + f"The classes: {some(sorted(present), 20)}.")  # (how many it leaves out)
    held = dataset.table[level].isin(classes)
    if len(present - set(classes)) < 2:
        raise WingspanError("--holdout-classes would leave fewer than 2 classes to train.",
                            hint="Hold out fewer classes.")
    return dataset.with_table(dataset.table[~held]), dataset.table[held]


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


def go_on(run_dir: Path) -> str:
    """The line that says how to continue a stopped run (from its checkpoint, if any)."""
    # (quoted for the shell: a path with spaces, pasted, was two arguments)
    how = (f"{command('train', '--resume', run_dir)} (in Python: "
           f"ws.resume({str(run_dir)!r}))")
    if last_checkpoint(run_dir).is_file():
        return f"Continue from the last checkpoint with: {how}"
    return f"It has no checkpoint yet; start it again from the beginning with: {how}"


class _Terminated:
    """SIGTERM (what SLURM, Kubernetes and `timeout` send) stops a run as Ctrl-C does, with
    the line that says how to go on: by default it ended the process without a word. Its
    data workers, sent it too, may die first, and the loader then raises a RuntimeError."""

    def __init__(self):
        self.received, self.installed, self.previous = False, False, None

    def __enter__(self):
        RUN_SIGNALLED.clear()  # (a run before it in this process may have been stopped so)
        if threading.current_thread() is threading.main_thread():  # (only there in Python)
            redeliver_dropped_sigterm()  # (a SIGTERM that lands in a __del__: sent again)
            forks_die_of_sigterm()  # (its data workers and pools: not as the run does)
            self.previous = signal.signal(signal.SIGTERM, self._stop)
            self.installed = True
        return self

    @sigterm_handler
    def _stop(self, signum, frame):
        self.received = True
        DROPPED.clear()
        TERMINATED.set()
        RUN_SIGNALLED.set()
        end_started()  # (the run's other processes, where this one started them)
        raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, *exc):
        RUN_SIGNALLED.clear()
        if exc[0] is not None:  # a stop under way: a dropped SIGTERM is not sent into it
            DROPPED.clear()
        if self.installed:  # (None: a handler set outside Python, which we cannot put back)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None
                          else self.previous)


def interruptible(run: Run, scoring_only: bool = False) -> Path:
    """Run the recipe (or, `scoring_only`, the held-out classes' scoring of a run killed
    there) so that Ctrl-C or SIGTERM stops it at its last checkpoint, saying how to go
    on, and any other error marks the run failed (error.txt), with what it said."""
    if run.is_main:
        (run.dir / ERROR_FILE).unlink(missing_ok=True)  # a resume goes at it again
    terminated = _Terminated()
    try:
        with terminated:
            return score_held_out(run.dir if scoring_only else _recipe(run), run)
    except (KeyboardInterrupt, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not terminated.received:
            if run.fabric.world_size > 1 and peer_lost(e):
                # The others' view of a process that died or was killed: that process's
                # own output says why. The run stays stopped, to resume, not failed.
                said = lost_peer_said(run.fabric, e)
                run.log(said, shown=False)
                raise Stopped(said, hint=go_on(run.dir)) from e
            if "DataLoader worker" in str(e) and ("killed by signal: Killed" in str(e)
                                                  or "exited unexpectedly" in str(e)):
                # SIGKILL (torch says it either way), most often the kernel's out-of-memory
                # killer: stopped, to resume (it was a 55-line traceback, and train.log did
                # not say the run had stopped).
                said = (f"Stopped: a data worker process was killed ({first_line(e).strip()}): "
                        "most often by the system, as memory ran out.")
                run.log(said, shown=False)
                raise Stopped(said, hint="Fewer --workers or a smaller --batch-size need "
                              f"less memory. {go_on(run.dir)}") from e
            oom = out_of_memory_said(e, run.config.batch_size, training=True)
            if oom is not None:  # failed, not stopped: a resume keeps the batch size
                if run.fabric.world_size == 1:
                    _failed(run, oom.message)
                raise oom from e
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
        if run.is_main and _done(run):  # (stopped in the last lines: nothing to resume)
            drop_feature_cache(run)  # the step it cut short
            run.log(stop + f"The run had finished: its model is in {run.dir / 'model'}.",
                    caveat=True)
        else:
            run.log(stop + go_on(run.dir), caveat=True)
        raise Interrupted(run.dir) from e
    except WingspanError as e:  # bad data, say: in train.log, and a failed run, not a paused one
        _failed(run, e.message)
        raise
    except SystemExit:
        _reader_gone(run)
        raise
    except Exception as e:  # a fault of ours or of a library: failed too, with what it said
        oom = out_of_memory_said(e, run.config.batch_size, training=True)  # (a MemoryError)
        _failed(run, oom.message if oom else f"{type(e).__name__}: {e}")
        if oom:
            raise oom from e
        raise
    finally:
        release_lock(run.dir)
        forget_sessions()  # the ONNX graphs of this run's weights (see models.runtime)


def _reader_gone(run: Run) -> None:
    """rich's SystemExit where stderr's reader went (`2>&1 | head`, a pager quit): the run
    stops (its messages would go nowhere), and train.log says so, as for Ctrl-C."""
    with contextlib.suppress(OSError, WingspanError):
        run.log("Stopped: the reader of its messages went away (`| head`, a pager quit). "
                + go_on(run.dir), shown=False)


def _failed(run: Run, message: str) -> None:
    """In train.log and error.txt, the error that stopped the run: `wingspan runs` then
    calls it failed and says why. (A full disk that stopped the run may refuse these too:
    its error is the one to say, not theirs.)"""
    with contextlib.suppress(OSError, WingspanError):
        run.log(f"Stopped: {message}", shown=False)  # (the error itself is printed)
        if run.is_main:
            write_text(run.dir / ERROR_FILE, message + "\n")


def _done(run: Run) -> bool:
    """Its model written and, with --holdout-classes, those classes scored: what `train
    --resume` calls finished (a stop in the run's last lines said to resume it, which
    then said there was nothing to resume)."""
    try:
        metrics = json.loads((run.dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return run.state.stage == "done" and is_complete(run.dir / "model") and scored(
        metrics, run.config.holdout_classes)


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
                run.model.load_state_dict(best_checkpoint(run)["model"])
        _next_stage(run, "finetune")
    if run.state.stage == "finetune":
        if run.config.epochs_finetune:
            _timed(run, "finetune", finetune)
        _next_stage(run, "done")
    return finish(run)


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
    stop_if_signalled()  # (a SIGTERM lost where it came: the run stops here, resumable)


def processes(config: TrainConfig) -> Processes:
    return Processes(config.device, config.devices, config.nodes, config.strategy)


def _saved_workers(run_dir: Path) -> int | None:
    """The --workers in the run's config.yaml (a resume may set another)."""
    try:
        return (yaml.safe_load((run_dir / CONFIG_FILE).read_bytes()) or {}).get("workers")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def start_run(run_dir: Path, config: TrainConfig, dataset: Dataset, quiet: bool,
           checkpoint: dict | None, fabric, before: tuple[str, ...] = (),
           told: tuple[tuple[str, bool], ...] = (), resuming: str = "") -> Run:
    """The run's model, engines, data and state, from scratch or from `checkpoint`;
    `before`: lines to log ahead of the "Run" line (why this backbone, say); `told`: what
    reading the data said before the run began, (line, caveat) pairs logged after that
    line and before what this reading says; `resuming`: a resumed run's first line, in its
    place. A run resumed from a checkpoint does not say again what its train.log says above
    (the data's counts and warnings)."""
    torch.manual_seed(config.seed)
    logs: list[str] = []
    said_before = checkpoint is not None
    # Before any work; a resumed run's saved --workers may come from a larger machine.
    saved = checkpoint is not None and config.workers == _saved_workers(run_dir)
    workers = resolve_workers(config.workers, processes(config).world()[0],
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
        started_from=source_run(loaded), input_size=loaded.input_size if loaded else None)
    if config.image_size or state.input_size:  # (a size asked for is tried first)
        model.set_input_size(config.image_size or state.input_size,
                             check=bool(config.image_size) and not checkpoint)
    policy.prepare_model(model)
    if checkpoint:  # a resumed run that must choose again guards its own weights
        model.load_state_dict(checkpoint["model"])
    policy = _choose_engines(fabric, policy.adopt(state.engines), model, config, not quiet)
    state.engines = policy.records()
    if policy.train_precision != "fp32":  # the same processes, with the step's precision
        fabric = processes(config).fabric(policy.train_precision)
    # (as many as /dev/shm holds batches of, said here and in the run's line: every loader
    # of the run takes this number)
    workers = room_for_workers(workers, config.batch_size, model.preprocessing.input_size,
                               processes=processes(config).world()[0])
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
    for line, caveat in told:  # (a warning is said even with --quiet, as caveats are)
        run.log(line, caveat=caveat)
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
        stages = config.stages_to_unfreeze(model.spec.unfreeze)  # (as finetune does)
        policy = choose_train(policy, model, stages, size, config.batch_size,
                              progress=progress)
    return policy


def _name_taken(run_dir: Path, name: str) -> str:
    """Why a run is not runs/NAME (the name was taken), and whether a run before it there
    did not finish: rerunning a stopped run's command (after a Ctrl-C) starts afresh, and
    the user must know that `--resume` continues the other instead."""
    if run_dir.name == name:
        return ""
    n = int(run_dir.name.rpartition("-")[2])
    earlier = [run_dir.parent / name, *(run_dir.parent / f"{name}-{k}" for k in range(2, n))]
    training, stopped, set_up = [], [], []
    for d in earlier:
        try:  # (Path.is_file raises PermissionError in a folder we may not enter)
            if (d / ".lock").is_file() and being_trained(d):  # now
                training.append(d)
            elif (d / CONFIG_FILE).is_file():
                if not is_complete(d / "model") and not stopped_by(d):
                    stopped.append(d)
            elif stopped_while_set_up(d):  # killed before config.yaml: nothing to resume
                set_up.append(d)
        except OSError:  # another user's run in a shared runs folder (umask 077): taken,
            pass  # no telling more (every default-named train of the others stopped here)
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
            f"{run_dir}. If that one was stopped, `{command('train', '--resume', stopped[-1])}` "
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
