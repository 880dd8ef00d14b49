"""`ws.train`, `ws.resume`, `ws.load` and `ws.runs`, and the `Run` they give: its
history, metrics and model, and what to do with them (evaluate, predict, explain,
adapt, export).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import pandas as pd

from wingspan.api.arguments import (
    _class_map_arg,
    _count_arg,
    _keywords_checked,
    _max_pixels,
    _optional_count,
    _os_errors_said,
    _out_arg,
    _path_arg,
    _paths_arg,
    _rate_arg,
    _split_arg,
    _switch_arg,
    _workers_arg,
)
from wingspan.api.dataset import Data, _data_arg, _dataset
from wingspan.api.display import Image, Images, _img, _kv, _plotted
from wingspan.api.evaluation import Evaluation
from wingspan.config import (
    PRECISION_ENV,
    RUNS_DIR,
    RUNTIME_ENV,
    TOP_K,
    TrainConfig,
    check_not_options,
)
from wingspan.data.samples import Dataset
from wingspan.errors import WingspanError, counted, some
from wingspan.training.folder import CONFIG_FILE, HISTORY_FILE, read_history


def train(data: Data | Dataset | str | Path, config: TrainConfig | dict | str | Path | None = None,
          name: str | None = None, runs_dir: str | Path = RUNS_DIR,
          quiet: bool = False, max_pixels: int | None = None, **settings) -> Run:
    """Train a classifier as `wingspan train` does: a new head on the frozen pretrained
    backbone (on cached features), then fine-tuning. `settings` are TrainConfig's fields
    (the CLI's options: backbone, epochs_head, epochs_finetune, levels, lr, ...);
    `config` is a TrainConfig, a dict or a YAML file of them, which `settings` override.

    >>> run = ws.train(data, backbone="efficientnet_lite0", epochs_finetune=4)
    >>> run = ws.train("photos/", levels=["family", "species"], name="taxonomy")
    """
    from wingspan.training import train as train_run

    # (ws.train(data, config={"max_pixels": ...}), ws.train(data, group_regex=...))
    check_not_options(config if isinstance(config, dict) else {}, "config: ", "a TrainConfig")
    check_not_options(settings, "", "a TrainConfig")
    if isinstance(config, TrainConfig | dict):
        settings = {**(dataclasses.asdict(config) if isinstance(config, TrainConfig)
                       else config), **settings}
        config = None
    # (an unknown keyword: the config classes name the closest setting themselves)
    if isinstance(config, str) and not Path(config).expanduser().exists():
        # ws.train(data, "efficientnet_lite0"): config comes second, so a setting given by
        # position reads as a file name; said so here, not as "Cannot read the config file".
        from wingspan.models.registry import BACKBONES

        example = (f"backbone={config!r}" if config == "auto" or config in BACKBONES
                   else "backbone='efficientnet_lite2', epochs_finetune=4")
        raise WingspanError(f"config: there is no file {config}.",
                            hint="The second argument is a YAML file, a TrainConfig or a dict "
                                 f"of settings; a setting goes by keyword: ws.train(data, "
                                 f"{example}).")
    settings = (TrainConfig.from_file(_path_arg("config", config), **settings)
                if config is not None else TrainConfig(**settings))
    runs_dir = _path_arg("runs_dir", runs_dir)
    if name is not None and not isinstance(name, str):
        raise WingspanError(f"name: expected a run name (a string), got {name!r}.",
                            hint="The run is written to runs_dir/name.")
    with _max_pixels(max_pixels), _os_errors_said():
        return Run(train_run(_dataset(data), settings, runs_dir, name,
                             _switch_arg("quiet", quiet)))


def resume(run: Run | str | Path, quiet: bool = False, max_pixels: int | None = None,
           **machine) -> Run:
    """Continue a stopped or killed run (its folder, or the Run `ws.load` gave) from its
    last checkpoint, as `wingspan train --resume`; `machine` may change only where it runs
    (device, devices, workers...).

    >>> run = ws.resume("runs/big", devices=1)
    """
    from wingspan.training import resume as resume_run

    if isinstance(run, Run):
        if run.dir is None:
            raise WingspanError(f"{run.name} is a model bundle without its run folder: "
                                "there is no training to resume.")
        run = run.dir
    with _max_pixels(max_pixels), _os_errors_said():
        return Run(resume_run(_path_arg("run", run), quiet=_switch_arg("quiet", quiet),
                              **machine))


def is_main_process() -> bool:
    """Whether this is the process that writes (global rank 0). `ws.train(...,
    devices=N)` and `run.predict(..., devices=N)` start the other processes by running the
    script again, so the code after them runs in every process: guard what should run
    once (an evaluation, a plot, a print) with `if ws.is_main_process():`. True where one
    process runs."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


@_keywords_checked
def load(path: str | Path) -> Run:
    """An earlier run (runs/NAME) or a model bundle (a run's model/ folder, or one that
    was copied elsewhere).

    >>> run = ws.load("runs/my-run")
    >>> run.predict(["field/"])
    """
    from wingspan.inference import find_bundle
    from wingspan.models.bundle import read_manifest

    path = _path_arg("path", path)
    if (path / CONFIG_FILE).is_file() and (path / HISTORY_FILE).is_file():
        return Run(path)
    bundle = find_bundle(path)
    read_manifest(bundle)  # a model at all (not a data folder, say): said now, not at first use
    if (bundle.parent / CONFIG_FILE).is_file() and (bundle.parent / HISTORY_FILE).is_file():
        return Run(bundle.parent)  # a run's own model/ folder: the whole run
    return Run(None, bundle)


@_keywords_checked
def runs(runs_dir: str | Path = RUNS_DIR, sort: str | None = None) -> pd.DataFrame:
    """The runs in `runs_dir` side by side, as `wingspan runs` lists them: one row per run
    folder (name; status, one of a few values to filter on: done, stopped (resumable),
    failed, damaged...; detail: where a stopped run stopped, the error a failed one stopped
    at, what is wrong with a damaged one;
    data, backbone, image_size, seed, selection, val_macro_f1 (the figure the best epoch
    was chosen on), held_out_macro_f1 (`evaluate`'s on the split nothing was chosen on,
    once run and fair), held_out_evaluated (whether it has been run), best_stage,
    best_epoch, train_seconds, created, changes: the settings that differ among the runs
    and the split where theirs differ, path), oldest first or by the column `sort`
    (scores best first). Folders that are no run are left out.

    >>> ws.runs().groupby("backbone")["held_out_macro_f1"].describe()
    """
    from wingspan.run_table import run_table

    return run_table(_path_arg("runs_dir", runs_dir), sort)


def _predictions(rows: list[dict]) -> pd.DataFrame:
    """Run.predict's table (its columns even with no rows). Its text columns hold None
    where there is no text, as documented, whatever the rows: pandas turned the None of a
    column that also holds strings into NaN (`error`, once one input failed)."""
    frame = pd.DataFrame(rows, columns=["path", "answer", "predicted", "probability", "branch",
                                        "top", "known_level", "unknown_score", "threshold",
                                        "score_level", "error"])
    text = ["path", "answer", "predicted", "known_level", "score_level", "error"]
    frame[text] = frame[text].astype(object).where(frame[text].notna(), None)
    return frame


def _evaluation_warnings(metrics: dict) -> list[str]:
    """What an evaluation's figures do not show: they are optimistic (images trained or
    chosen on), or images that could not be read, or of classes the model does not know,
    were left out of them."""
    from wingspan.evaluate.wording import (
        fairness,
        left_out_wording,
        tree_wording,
        unreadable_wording,
    )

    notes = []
    verdict, why = fairness(metrics.get("fair", ""))
    if verdict == "no":
        notes.append(f"These figures are not fair: {why}.")
    elif verdict == "unknown":
        notes.append(f"These figures may not be fair: {why}.")
    if said := unreadable_wording(metrics):
        notes.append(said + ".")
    if said := tree_wording(metrics):
        notes.append(said + ".")
    if said := left_out_wording(metrics, some(metrics.get("unknown_classes", []), 8),
                                "class_map={model class: data class}", python=True):
        notes.append(said + ".")
    return notes


def _prediction_row(result, kind: str, i: int) -> dict:
    """One row of `Run.predict`'s table: a prediction, or an input that could not be read
    (kept at its place among the inputs, as the CLI's output file keeps it)."""
    from wingspan.predict import table_path  # (absolute: as the CLI's files write them)

    if kind == "failed":
        path, why = result.failed[i]
        return {"path": table_path(path), "answer": None, "predicted": None,
                "probability": float("nan"), "branch": [], "top": [], "known_level": None,
                "unknown_score": float("nan"), "threshold": float("nan"),
                "score_level": None, "error": why}
    row = result.rows[i]
    return {"path": table_path(row["path"]), "answer": row["answer"],
            "predicted": row["predicted"], "probability": row["probability"],
            "branch": row.get("taxonomy", []), "top": row["top"],
            "known_level": row.get("known_level"),
            "unknown_score": row.get("unknown_score", float("nan")),
            "threshold": row.get("threshold", float("nan")),
            "score_level": row.get("score_level"), "error": None}  # (isna(): read)


# run.predict's loaded model and what it was loaded from (see Run._predictor): one for
# the process, not one per Run, which kept every Run's model in memory while it lived.
_LOADED: tuple[tuple, object] | None = None


class Run:
    """A trained run (or a model bundle on its own): its history, metrics and model, and
    what to do with them.

    >>> run = ws.load("runs/my-run")
    >>> run.history.tail()        # one row per epoch
    >>> run.plot()                # loss, accuracy and macro-F1 curves
    >>> run.evaluate().report()
    """

    def __init__(self, run_dir: str | Path | None, bundle: str | Path | None = None):
        if run_dir is None and bundle is None:
            raise WingspanError("Run() needs a run folder or a model bundle.",
                                hint="ws.load(PATH) takes either.")
        # Absolute: a notebook's %cd or a script's os.chdir after this must not lose the
        # run ("No model at runs/r1"), nor its evaluations and images (below).
        self.dir = Path(run_dir).absolute() if run_dir is not None else None
        self.bundle = Path(bundle).absolute() if bundle is not None else self.dir / "model"

    @property
    def name(self) -> str:
        return self.dir.name if self.dir else self.bundle.name

    @property
    def manifest(self) -> dict:
        """The bundle's manifest: classes, taxonomy, preprocessing, training, metrics."""
        from wingspan.inference import find_bundle
        from wingspan.models.bundle import read_manifest

        # A run folder without its model says why (stopped, or being trained now).
        return read_manifest(find_bundle(self.dir) if self.dir else self.bundle)

    @property
    def config(self) -> TrainConfig:
        """The resolved settings the run trained with."""
        if self.dir:  # a damaged file said as such, not as a YAML parser's traceback
            return TrainConfig.from_file(self.dir / CONFIG_FILE)
        training = {k: v for k, v in self.manifest["training"].items()
                    if k in TrainConfig.__dataclass_fields__}
        return TrainConfig(**training)

    @property
    def metrics(self) -> dict:
        """metrics.json: the best epoch, its val figures, stage seconds, engines... (a
        bundle alone: its manifest's copy). An adapted run has none, as they describe the
        model before adapting: what adapting did is in its adapt.json."""
        if self.dir and (self.dir / "metrics.json").is_file():
            try:
                with _os_errors_said():  # (a permission: the CLI's words, as methods say it)
                    return json.loads((self.dir / "metrics.json").read_text())
            except json.JSONDecodeError as e:
                raise WingspanError(
                    f"{self.dir / 'metrics.json'} is damaged: not valid JSON ({e}).",
                    hint=f"`ws.resume({str(self.dir)!r})` writes it again from the run's "
                         "checkpoints, and the model with it: a temperature or unknown "
                         "answer `calibrate` fitted since is then lost (said, with the "
                         "command that fits it again).") from e
        return self.manifest.get("metrics", {})

    @property
    def history(self) -> pd.DataFrame:
        """history.csv: per epoch, the stage, losses, accuracy, macro-F1, learning rate,
        images/s and seconds."""
        path = self._run_file(HISTORY_FILE)
        if not path.is_file():
            raise WingspanError(f"{self.dir} has no history.csv: it is no run folder, or its "
                                "run has not finished an epoch.",
                                hint="`ws.runs()` lists the runs and where each stopped.")
        with _os_errors_said():
            return read_history(self.dir)

    @property
    def classes(self) -> list[str]:
        """The finest level's class names."""
        classes = self.manifest["classes"]
        return classes[list(classes)[-1]]

    def _run_file(self, name: str) -> Path:
        if self.dir is None:
            raise WingspanError(f"{self.bundle} is a model bundle without its run folder, so "
                                f"it has no {name}.", hint="Load the run folder (runs/NAME).")
        if not self.dir.is_dir():
            raise WingspanError(f"No run folder at {self.dir}.",
                                hint="Give a run folder (runs/NAME); `ws.runs()` lists them.")
        return self.dir / name

    def plot(self) -> Image:
        """The training curves (loss, accuracy, macro-F1; the stage change and the epoch the
        model was kept from marked), written to RUN/curves.png.

        >>> run.plot()
        """
        from wingspan.evaluate.plots import plot_curves

        kept = self.metrics.get("best") if (self.bundle / "manifest.json").is_file() else None
        with _os_errors_said():  # (a read-only run folder)
            return Image(plot_curves(self.history, self._run_file("curves.png"), kept))

    @_keywords_checked
    def evaluate(self, data: str | Path | None = None, split: str | None = None,
                 out: str | Path | None = None, batch_size: int = TrainConfig.batch_size,
                 device: str = TrainConfig.device, precision: str = TrainConfig.precision,
                 runtime: str = TrainConfig.runtime, workers: int | None = None,
                 class_map: dict[str, str] | None = None,
                 unknown: str | Path | list[str] | None = None,
                 unknown_score: str | None = None, tta: bool = False,
                 quiet: bool = False, max_pixels: int | None = None,
                 plots: bool = True) -> Evaluation:
        """Metrics, confusion matrix, calibration, curves and report.html, as `wingspan
        evaluate`: the run's test split by default (else val), or `data`; written to
        RUN/evaluation-SPLIT (other data: RUN/evaluation-NAME-SPLIT; then -unknown with
        `unknown`, -SCORE with another `unknown_score` than the model's, -tta with `tta`;
        or `out`). `unknown`: a folder (or image paths) of classes the model never saw,
        for the unknown answer's figures (metrics["unknown"]).
        `tta`: test-time augmentation, as predict's (metrics["tta"] says so). `workers`:
        data workers (0: read the images in this process; None: sized to the machine).
        `plots=False`: no PNGs (seconds sooner for a small evaluation).

        >>> ev = run.evaluate()
        >>> ev.metrics["macro"]["f1"], ev.metrics["micro"]["f1"]
        >>> run.evaluate(unknown="moths/").metrics["unknown"]["auroc"]
        """
        from wingspan.evaluate.run import evaluate

        if isinstance(unknown, bool):  # calibrate's unknown=True is a switch; this one is data
            raise WingspanError("unknown: expected a folder (or image paths) of classes the "
                                f"model never saw, got {unknown}.",
                                hint="To fit the unknown answer again on the run's own images, "
                                     "use run.calibrate(unknown=True).")
        with _max_pixels(max_pixels):
            result = evaluate(
                self._model, _data_arg(data), _split_arg(split), _out_arg(out),
                progress=not _switch_arg("quiet", quiet),
                batch_size=_count_arg("batch_size", batch_size), workers=_workers_arg(workers),
                runtime=runtime, precision=precision, device=device,
                class_map=_class_map_arg(class_map),
                unknown=None if unknown is None else _paths_arg(unknown, "unknown"),
                unknown_score=unknown_score, tta=_switch_arg("tta", tta),
                plots=_switch_arg("plots", plots))
        for note in _evaluation_warnings(result.metrics):  # what the command prints in yellow
            warnings.warn(note, stacklevel=3)
        return Evaluation(result.out_dir, result.metrics, result.report)

    @_keywords_checked
    def calibrate(self, data: Data | str | Path | None = None, split: str | None = None,
                  batch_size: int = TrainConfig.batch_size, device: str = TrainConfig.device,
                  workers: int | None = None, class_map: dict[str, str] | None = None,
                  unknown: bool = False, unknown_rate: float | None = None,
                  unknown_score: str | None = None, quiet: bool = False,
                  max_pixels: int | None = None, precision: str = TrainConfig.precision,
                  runtime: str = TrainConfig.runtime) -> dict:
        """Fit the temperature again and store it in the bundle, as `wingspan calibrate`:
        on `split` of `data` (default: the run's own val split; `data`'s val split, or all
        of it when it has none), 10 labelled images at least; `class_map` as evaluate's.
        Returns what the bundle now keeps (but photo_sums, a hash per photo fitted on, for
        evaluate's leak check): temperature and previous_temperature, fitted_on,
        images, method, the ECE at the previous temperature, without one and at the new one
        (val_ece_previous, val_ece_before, val_ece_after), and at_bound (the search stopped
        at a bound; a warning says so). With `unknown=True`, instead: the unknown scores
        fitted again on the run's own train and val images (`unknown_rate`: the share of
        known val images turned away; `unknown_score`: the default score); returns score,
        rate, train_images, val_images and thresholds.

        >>> run.calibrate("garden/")["temperature"]
        >>> run.calibrate(unknown=True, unknown_rate=0.1)
        """
        from wingspan.evaluate.calibrate import (
            calibrate,
            check_calibrate_settings,
            fit_unknown,
        )
        from wingspan.evaluate.calibration import calibrate_warnings

        if not isinstance(unknown, bool):
            raise WingspanError(f"unknown: expected True or False, got {type(unknown).__name__} "
                                f"{unknown!r:.60}.",
                                hint="To measure the unknown answer on images of classes the "
                                     "model never saw, use run.evaluate(unknown=folder).")
        options = dict(progress=not _switch_arg("quiet", quiet),
                       batch_size=_count_arg("batch_size", batch_size),
                       workers=_workers_arg(workers), device=device, precision=precision,
                       runtime=runtime)
        check_calibrate_settings(unknown, data, split, class_map, unknown_rate, unknown_score,
                                 python=True)
        if unknown:
            with _max_pixels(max_pixels):
                return fit_unknown(self._model, _rate_arg(unknown_rate), unknown_score,
                                   **options)
        with _max_pixels(max_pixels):
            record = calibrate(self._model, _data_arg(data),
                               _split_arg(split, "the val split (else all of data)"),
                               class_map=_class_map_arg(class_map), **options)
        for note in calibrate_warnings(record):
            warnings.warn(note, stacklevel=3)
        # photo_sums (a hash per photo fitted on, for evaluate's leak check) stays in the
        # manifest: returned, a notebook showed all of it (10 KB for 228 photos).
        return {k: v for k, v in record.items() if k != "photo_sums"}

    @property
    def _model(self) -> Path:
        return self.dir if self.dir else self.bundle

    def _predictor(self, progress: bool, **settings):
        """predict's loaded model, kept (one, whichever Run loaded it last) for the next
        call with the same settings while the bundle's files and the engine settings in
        the environment are unchanged: a loop predicting one photo at a time loaded the
        model, and chose its engine, for each (0.5 s a call for a tiny CNN). A calibrate
        or a retrain rewrites the files, and the model is loaded again."""
        from wingspan.inference import Predictor, find_bundle

        global _LOADED
        bundle = find_bundle(self._model)
        files = sorted(bundle.iterdir()) if bundle.is_dir() else [bundle]
        stats = [(f.name, (s := f.stat()).st_ino, s.st_mtime_ns, s.st_ctime_ns, s.st_size)
                 for f in files]
        key = (str(bundle.resolve()), stats, sorted(settings.items()),
               [os.environ.get(name) for name in (PRECISION_ENV, RUNTIME_ENV)])
        loaded = _LOADED
        if loaded is None or loaded[0] != key:
            _LOADED = None  # (the old one freed before the new one loads)
            loaded = _LOADED = key, Predictor(bundle, progress=progress, **settings)
        return loaded[1]

    @_keywords_checked
    def predict(self, paths: str | Path | list[str | Path], top_k: int = TOP_K, tta: bool = False,
                batch_size: int = TrainConfig.batch_size, device: str = TrainConfig.device,
                precision: str = TrainConfig.precision, runtime: str = TrainConfig.runtime,
                workers: int | None = None, unknown_score: str | None = None,
                quiet: bool = False, max_pixels: int | None = None,
                devices: int | None = None, nodes: int | None = None,
                strategy: str = TrainConfig.strategy) -> pd.DataFrame:
        """Classes of image files, folders (searched recursively) and globs, as `wingspan
        predict`. One row per image: path (absolute), answer (the class, or "unknown"
        for an image unlike every class the model knows; with levels, the class at the
        finest level it is known at), predicted and probability (the class the model
        names, whatever the answer, and its calibrated probability: with levels, the
        branch's finest class), branch (the consistent taxonomic branch of a model
        with levels, a (level, class, probability) triple per level, coarse to fine, e.g.
        [("family", "Nymphalidae", 0.98), ("species", "monarch", 0.95)]; [] for one
        level), top (the top_k (class, probability) pairs),
        known_level (the level the answer is at; None for "unknown"), unknown_score,
        threshold and score_level (the score that decided, at the level it decided) and
        error (why an input was skipped; None where it was read). `workers`: data
        workers (0: read the images in this process; None: sized to the machine).
        `devices`, `nodes`, `strategy`: the images shared among processes, as predict's
        --devices (in a script: Fabric starts the others by running it again); the rows
        come back in the first process, the others get none.

        >>> preds = run.predict(["a.jpg", "field/"])
        >>> preds[preds.probability < 0.5]
        """
        from wingspan.inference import Predictor
        from wingspan.predict import not_images_said, predict, predict_fabric
        from wingspan.training.data import resolve_workers

        inputs = _paths_arg(paths)
        top_k, tta = _count_arg("top_k", top_k), _switch_arg("tta", tta)
        quiet = _switch_arg("quiet", quiet)
        batch_size, workers = _count_arg("batch_size", batch_size), _workers_arg(workers)
        with _max_pixels(max_pixels):
            fabric = predict_fabric(device, _optional_count("devices", devices),
                                    _optional_count("nodes", nodes), strategy, workers)
            main = fabric is None or fabric.is_global_zero
            settings = dict(device=device, batch_size=batch_size, workers=workers,
                            runtime=runtime, precision=precision, unknown_score=unknown_score)
            if fabric:
                predictor = Predictor(self._model, progress=main and not quiet,
                                      fabric=fabric, **settings)
            else:  # (workers sized for this call: none from a thread, say)
                predictor = self._predictor(not quiet, **{
                    **settings, "workers": resolve_workers(workers)})
            result = predict(predictor, inputs, top_k, tta, progress=main and not quiet,
                             fabric=fabric)
        if not main:  # its share is in the first process's rows
            return _predictions([])
        if result.not_images:  # (as the command says it)
            warnings.warn(not_images_said(result.not_images), stacklevel=3)
        if not result.rows:
            why = "; ".join(f"{path}: {reason}" for path, reason in result.failed[:3])
            raise WingspanError("No image could be predicted" + (f" ({why})" if why else "")
                                + ".", hint="Check the paths given.")
        return _predictions([_prediction_row(result, kind, i) for kind, i in result.order])

    @_keywords_checked
    def explain(self, images: str | Path | list[str | Path], out: str | Path | None = None,
                device: str = TrainConfig.device, quiet: bool = False) -> Images:
        """Grad-CAM overlays (where the model looked for the class it predicted), as
        `wingspan explain`; one PNG per image in `out` (default RUN/explain), returned as
        a list of Image that a notebook shows side by side. Inputs that cannot be read are
        left out, with a warning naming them.

        >>> run.explain(["a.jpg"])[0]
        """
        from wingspan.explain import explain
        from wingspan.inference import output_home
        from wingspan.predict import expand_paths

        paths, missing = expand_paths(_paths_arg(images, "images"))
        if not paths:
            raise WingspanError(f"No image to explain: {missing[0][0]}: {missing[0][1]}."
                                if missing else "No image to explain.")
        out = _out_arg(out) or output_home(self.bundle) / "explain"
        explained = explain(self._model, paths, out, device=device,
                            progress=not _switch_arg("quiet", quiet))
        failed = [f"{path}: {why}" for path, why in missing] + [
            f"{e.path}: {e.error}" for e in explained if e.error]
        if len(failed) == len(missing) + len(explained):  # as predict says it
            raise WingspanError(f"No image could be explained ({'; '.join(failed[:3])}).",
                                hint="Check the paths given.")
        if failed:  # the list is shorter than the inputs: say which are left out
            warnings.warn(f"{counted(len(failed), 'input')} left out: "
                          + "; ".join(failed[:3]) + ("; ..." if len(failed) > 3 else ""),
                          stacklevel=3)
        return Images(Image(e.png) for e in explained if not e.error)

    def adapt(self, photos: str | Path | list[str | Path], out: str | Path | None = None,
              workers: int | None = None, quiet: bool = False, max_pixels: int | None = None,
              **settings) -> Run:
        """Fit the model to unlabelled photos from where it will be used (self-training of
        its head), as `wingspan adapt`; returns the adapted run (this one is unchanged), in
        `out` or else RUN-adapted (RUN-adapted-2... when taken). `settings` are
        AdaptConfig's (neighbours, confidence, rounds, device, batch_size, ...).
        `workers`: data workers (0: read the images in this process; None: sized to the
        machine).

        >>> garden = run.adapt("my_garden_photos/")
        """
        from wingspan.config import AdaptConfig
        from wingspan.training.adapt import adapt

        with _max_pixels(max_pixels), _os_errors_said():
            done = adapt(self._model, _paths_arg(photos, "photos"), _out_arg(out),
                         AdaptConfig(**settings), progress=not _switch_arg("quiet", quiet),
                         workers=_workers_arg(workers))
        return Run(done["out"])

    @_keywords_checked
    def export(self, format: str = "onnx", quantize: str | None = None,
               out: str | Path | None = None, unknown_score: str | None = None) -> Path:
        """A model that runs without wingspan (ONNX Runtime or TorchScript), checked
        against PyTorch, with its unknown score, as `wingspan export`; returns the model
        file.

        >>> run.export()              # RUN/export/model.onnx and model.onnx.json
        """
        from wingspan.export import export_model

        return export_model(self._model, _out_arg(out), format, quantize=quantize,
                            unknown_score=unknown_score)

    def __repr__(self) -> str:
        return f"Run({str(self.dir or self.bundle)!r})"

    def _repr_html_(self) -> str:
        if self.dir and not (self.bundle / "manifest.json").is_file():
            return self._unfinished_html()
        if self.dir and (self.dir / "adapt.json").is_file():
            return self._adapted_html()
        m = self.metrics
        best = m.get("best", {})
        pairs = [("folder", self.dir or self.bundle),
                 ("backbone", self.manifest["model"]["backbone"]),
                 ("weights", m.get("weights")),
                 ("levels", ", ".join(f"{lv} ({n} classes)"
                                      for lv, n in m.get("classes", {}).items())),
                 ("best epoch", f"{best.get('stage')} epoch {best.get('epoch')}"),
                 ("val macro-F1", f"{best.get('val_macro_f1', float('nan')):.4f}"),
                 ("val accuracy", f"{best.get('val_acc', float('nan')):.4f}"),
                 ("seconds per stage", ", ".join(f"{stage} {seconds:g}" for stage, seconds
                                                 in (m.get("stage_seconds") or {}).items())),
                 ("engine", m.get("engine"))]
        curves = ""
        if (history := self._drawable_history()) is not None:
            from wingspan.evaluate.plots import plot_curves

            curves = _img(_plotted(lambda p: plot_curves(history, p, best)), "training curves",
                          780)
        return f"<div>{_kv(f'Run {self.name}', pairs)}{curves}</div>"

    def _adapted_html(self) -> str:
        """A run `adapt` wrote: what adapting did (its adapt.json), not a training's figures
        (it trained no epoch; its metrics.json stays with the run it came from)."""
        a = json.loads((self.dir / "adapt.json").read_text())
        used = a.get("photos_used_per_round", {})
        pairs = [("folder", self.dir), ("adapted from", a.get("adapted_from")),
                 ("backbone", self.manifest["model"]["backbone"]),
                 ("photos", f"{a.get('photos')} ({a.get('unreadable', 0)} could not be read)"),
                 ("photos the head was refitted on, per round",
                  "; ".join(f"{lv}: {', '.join(map(str, n)) or 'none'}"
                            for lv, n in used.items())),
                 ("answers changed", f"{a.get('changed', float('nan')):.1%}"),
                 ("val accuracy before / after", f"{a.get('val_accuracy_before', float('nan')):.4f}"
                  f" / {a.get('val_accuracy', float('nan')):.4f}"),
                 ("temperature", f"{a.get('temperature', float('nan')):.3f}")]
        return f"<div>{_kv(f'Adapted run {self.name}', pairs)}</div>"

    def _unfinished_html(self) -> str:
        """A run without its model yet: where it stopped, what continues it, its curves."""
        from wingspan.evaluate.plots import plot_curves
        from wingspan.run_table import STOPPED, run_row, status_text

        row = run_row(self.dir) or {"status": "no model", "detail": None}
        status = status_text(row["status"], row["detail"]) if self.dir.is_dir() else \
            "gone: the folder no longer exists (moved or deleted since it was loaded)"
        pairs = [("folder", self.dir), ("status", status)]
        if row["status"] == STOPPED:
            pairs.append(("continue it", f"ws.resume({str(self.dir)!r})"))
        curves = ""
        if (history := self._drawable_history()) is not None:
            curves = _img(_plotted(lambda p: plot_curves(history, p)), "training curves", 780)
        return f"<div>{_kv(f'Run {self.name}', pairs)}{curves}</div>"

    def _drawable_history(self) -> pd.DataFrame | None:
        """The history to draw in a display, if there is one with rows (a display shows
        what it can: a damaged history.csv leaves the curves out, not the run)."""
        if not (self.dir and (self.dir / HISTORY_FILE).is_file()):
            return None
        try:
            history = read_history(self.dir)
        except WingspanError:
            return None
        return history if len(history) else None


