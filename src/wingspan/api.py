"""The Python API for notebooks and scripts: the CLI's functions behind a few names.

    import wingspan as ws
    data = ws.read("photos/")                     # data.inspect(), data.split(), data.preview()
    run = ws.train(data, epochs_finetune=4)       # run.history, run.plot(), run.metrics
    ev = run.evaluate()                           # ev.metrics, ev.report()
    preds = run.predict(["a.jpg", "field/"])      # a DataFrame
    run = ws.load("runs/my-run")                  # a run folder or a model bundle

Every name, argument and default is the CLI's (`wingspan.config` holds them), every
function calls the one the CLI calls, and mistakes raise the same `WingspanError`s. In
Jupyter, datasets, runs and evaluations display themselves (`_repr_html_`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import html
import inspect
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from wingspan.config import (
    AUGMENT_POLICIES,
    PRECISION_ENV,
    RUNS_DIR,
    RUNTIME_ENV,
    SPLITS,
    TOP_K,
    AugmentConfig,
    DemoConfig,
    InspectConfig,
    ReadConfig,
    SplitConfig,
    TrainConfig,
    check_not_options,
)
from wingspan.data.samples import SPLIT, Dataset
from wingspan.errors import WingspanError, counted, some
from wingspan.files import os_error_said
from wingspan.training.folder import CONFIG_FILE, HISTORY_FILE, read_history

__all__ = ["Data", "Evaluation", "Image", "Inspection", "Run", "demo_data", "is_main_process",
           "load", "read", "resume", "runs", "train"]


# ---------------------------------------------------------------------------- keywords


@contextlib.contextmanager
def _os_errors_said():
    """An OSError the CLI puts in words (a read-only run folder, a full disk, a permission)
    raised as that WingspanError, as the README promises: not a bare `OSError [Errno 30]`.
    (A `with` block, not a wrapper: the warnings' stacklevel counts the frames.)"""
    try:
        yield
    except OSError as e:
        said = os_error_said(e)
        if said is None:
            raise
        raise said from e


def _keywords_checked(function):
    """An unknown keyword as a WingspanError naming the closest ones (`run.predict(p,
    topk=2)`: top_k), as the config classes answer (`ws.train(data, epoch_head=1)`), not
    Python's bare TypeError; and OSErrors said as the CLI says them. Functions taking
    **settings leave the keywords to their config."""
    from wingspan.config import check_names

    names = [name for name, p in inspect.signature(function).parameters.items()
             if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    called = function.__qualname__.replace("Run.", "run.").replace("Data.", "data.")

    @functools.wraps(function)
    def checked(*args, **kwargs):
        check_names(kwargs, names, f"{called}() takes no keyword '{{}}'.", "It takes")
        with _os_errors_said():
            return function(*args, **kwargs)

    return checked


# ---------------------------------------------------------------------------- display


class Image:
    """A PNG that wingspan wrote; Jupyter shows it, `path` says where it is."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()  # (a notebook's later %cd must not lose it)

    def _repr_png_(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:  # deleted since: Jupyter shows the repr (the path) instead
            return None

    def __repr__(self) -> str:
        return f"Image({str(self.path)!r})"


class Images(list):
    """Images (a list of them) that Jupyter shows side by side, each under its file name,
    where a plain list shows only their reprs."""

    def _repr_html_(self) -> str:
        return "".join(
            f'<figure style="display:inline-block;margin:4px">'
            f'{_img(image.path, image.path.name, 256)}'
            f'<figcaption>{html.escape(image.path.name)}</figcaption></figure>'
            for image in self)


class Html:
    """A page for Jupyter to show (`_repr_html_`); `source` says what it shows."""

    def __init__(self, text: str, source: str | Path):
        self.text, self.source = text, source

    def _repr_html_(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Html({str(self.source)!r})"


def _img(png: str | Path | bytes, alt: str, width: int | None = None) -> str:
    try:
        data = png if isinstance(png, bytes) else Path(png).read_bytes()
    except OSError as e:  # deleted or moved since it was written: the display goes on
        return f"<p><em>{html.escape(alt)}: {html.escape(str(png))} cannot be read " \
               f"({html.escape(e.strerror or str(e))}).</em></p>"
    size = f" width='{width}'" if width else ""
    return (f"<img alt='{html.escape(alt)}'{size} "
            f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>")


def _plotted(plot: Callable[[Path], Path]) -> bytes:
    """The PNG bytes of a plot function that writes to a path, leaving no file behind."""
    with tempfile.TemporaryDirectory() as tmp:
        return plot(Path(tmp) / "plot.png").read_bytes()


def _kv(title: str, pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                   f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                   for k, v in pairs)
    return f"<b>{html.escape(title)}</b><table>{rows}</table>"


def _frame(frame: pd.DataFrame, floats: str = "{:.3f}") -> str:
    return frame.to_html(border=0, float_format=floats.format)


# ---------------------------------------------------------------------------- data


@_keywords_checked
def read(path: str | Path, format: str | None = None, group_regex: str | None = None,
         strict: bool = False, check_files: bool = True) -> Data:
    """Read a dataset: a folder of class folders (with an optional taxonomy.csv and
    splits.csv), a CSV (path,label,...) or an ETHEC root, as `wingspan data ...` does.
    `check_files=False` reads the labels only (e.g. ETHEC's split files without images).

    >>> data = ws.read("photos/")
    >>> data                      # in Jupyter: the classes per split
    >>> data.table.head()         # path, group, split, one column per level
    """
    from wingspan.data import read_dataset

    config = ReadConfig(format=format, group_regex=group_regex,
                        strict=_switch_arg("strict", strict),
                        check_files=_switch_arg("check_files", check_files))
    return Data(read_dataset(_path_arg("path", path), config))


def demo_data(out: str | Path = "runs/demo/data", **settings) -> Data:
    """Generate the demo's synthetic butterflies (with a taxonomy) and read them.
    `settings` are DemoConfig's, e.g. images_per_class, image_size, seed.

    >>> data = ws.demo_data("runs/tutorial/data", images_per_class=(40, 30, 20, 12))
    """
    from wingspan.data.demo import generate_demo

    training = [k for k in settings if k in TrainConfig.__dataclass_fields__
                and k not in ("image_size", "seed")]  # DemoConfig's for `wingspan demo`'s run
    if training:
        raise WingspanError(f"demo_data only draws the images; {training[0]!r} is a training "
                            "setting.", hint=f"Give it to ws.train(data, {training[0]}=...).")
    with _os_errors_said():
        return read(generate_demo(_path_arg("out", out), DemoConfig(**settings)))


class Data:
    """A dataset: the sample table with its label levels, and what to do with it.

    >>> data = ws.read("photos/")
    >>> data.counts()             # images per class and split
    >>> data.inspect()            # problems, balance plots (runs/data/<name>/)
    >>> data = data.split()       # train/val/test without leakage
    """

    def __init__(self, dataset: Dataset, split_report=None):
        self.dataset = dataset
        self.split_report = split_report  # from `split`: sizes, classes kept in train only

    @property
    def table(self) -> pd.DataFrame:
        """One row per image: path, group, split, and one column per level."""
        return self.dataset.table

    @property
    def levels(self) -> list[str]:
        """The label levels, coarse to fine, e.g. ['family', 'label']."""
        return list(self.dataset.levels)

    @property
    def name(self) -> str:
        return self.dataset.name

    def __len__(self) -> int:
        return len(self.dataset)

    def counts(self, level: str | None = None) -> pd.DataFrame:
        """Images per class at `level` (default: the finest), per split, largest first.

        >>> data.counts("family")
        """
        level = self.dataset.resolve_level(level)
        table = self.table
        counts = pd.crosstab(table[level], table[SPLIT].replace("", "all"))
        counts = counts[[c for c in ("train", "val", "test", "all") if c in counts.columns]]
        counts["total"] = counts.sum(axis=1)
        counts.columns.name = None
        return counts.sort_values("total", ascending=False)

    @_keywords_checked
    def inspect(self, out: str | Path | None = None, level: str | None = None,
                tiny_px: int = InspectConfig.tiny_px, metadata_only: bool = False,
                quiet: bool = False, max_pixels: int | None = None) -> Inspection:
        """Count classes per level and find broken, duplicate, odd and tiny images, as
        `wingspan data inspect`; writes summary.json and a balance plot per level to
        `out` (default runs/data/<name>).

        >>> data.inspect().summary["levels"]["label"]["imbalance_ratio"]
        """
        from wingspan.data.inspect import inspect_dataset

        metadata_only = _switch_arg("metadata_only", metadata_only)  # ("no" was true)
        level = self.dataset.resolve_level(level)
        # (absolute, as a Run's: its plots are found after a later %cd)
        out_dir = (_out_arg(out) or self.dataset.claim_out_dir()).absolute()
        with _max_pixels(max_pixels):
            summary = inspect_dataset(self.dataset, out_dir, InspectConfig(tiny_px=tiny_px),
                                      check_images=not metadata_only,
                                      progress=not _switch_arg("quiet", quiet))
        return Inspection(summary, out_dir, self.counts(level), level)

    @_keywords_checked
    def split(self, level: str | None = None, val: float = SplitConfig.val_fraction,
              test: float = SplitConfig.test_fraction, seed: int = SplitConfig.seed,
              max_per_class: int | None = None, oversample_to: int | None = None,
              out: str | Path | None = None) -> Data:
        """A new split into train/val/test, stratified by `level` and grouped (no group on
        two sides), as `wingspan data split`; writes splits.csv and sampling.json to `out`
        (default runs/data/<name>). Returns the split data; `.split_report` says how.

        >>> data = data.split(val=0.2, test=0.2)
        >>> data.counts()
        """
        from wingspan.data.split import split_and_sample

        config = SplitConfig(val_fraction=val, test_fraction=test, seed=seed,
                             max_per_class=max_per_class, oversample_to=oversample_to)
        out_dir = _out_arg(out) or self.dataset.claim_out_dir()
        if self.dataset.has_splits:  # a published split is what figures compare on
            sides = self.dataset.table[SPLIT].value_counts()
            warnings.warn("This data has a split of its own (" + ", ".join(
                f"{k} {sides[k]}" for k in SPLITS if k in sides) + "); the Data returned "
                "holds a new one. Train on the data as read to keep its own.", stacklevel=3)
        result = split_and_sample(self.dataset, out_dir, level, config)
        return Data(result.dataset, result.report)

    @_keywords_checked
    def preview(self, augment: str = AugmentConfig.policy,
                image_size: int = AugmentConfig.image_size, level: str | None = None,
                rows: int = 6, views: int = 5, seed: int = 0,
                out: str | Path | None = None) -> Image:
        """Originals beside augmented versions, as `wingspan data preview`; writes
        preview.png to `out` (default runs/data/<name>).

        >>> data.preview(augment="strong", rows=4)
        """
        from wingspan.data.preview import write_preview

        if augment not in AUGMENT_POLICIES:  # (AugmentConfig would name its field, policy)
            raise WingspanError(f"augment: expected one of {', '.join(AUGMENT_POLICIES)}; got "
                                f"{augment!r:.60}.")
        config = AugmentConfig(policy=augment, image_size=image_size)
        out_dir = _out_arg(out) or self.dataset.claim_out_dir()
        return Image(write_preview(self.dataset, out_dir / "preview.png", config, level,
                                   rows=rows, augmented=views, seed=seed))

    def __repr__(self) -> str:
        return (f"Data({self.name!r}: {len(self)} images, levels {self.levels}, "
                f"{self.dataset.format})")

    def _repr_html_(self) -> str:
        splits = self.table[SPLIT].replace("", "none").value_counts().to_dict()
        parts = [_kv(f"Dataset {self.name}", [
            ("images", len(self)), ("format", self.dataset.format),
            ("levels", ", ".join(f"{lv} ({self.table[lv].nunique()} classes)"
                                 for lv in self.levels)),
            ("splits", ", ".join(f"{k} {v}" for k, v in splits.items())),
            ("problems while reading", len(self.dataset.problems))])]
        if self.split_report is not None:
            r = self.split_report
            # The split's sizes, and where max_per_class or oversample_to changed them since.
            now = self.table[SPLIT].value_counts()
            parts.append(_kv("Split", [(k, f"{v} ({r.fractions[k]:.0%})" + (
                f", {now.get(k, 0)} after sampling" if now.get(k, 0) != v else ""))
                                       for k, v in r.sizes.items()]
                             + [("classes in train only", len(r.train_only))]))
        parts.append(f"<b>Images per {self.dataset.default_level}</b>"
                     + _frame(self.counts().head(30)))
        return "<div>" + "".join(parts) + "</div>"


class Inspection:
    """What `Data.inspect` found: `summary` (summary.json), the balance plots in `dir`."""

    def __init__(self, summary: dict, out_dir: Path, counts: pd.DataFrame, level: str):
        self.summary, self.dir, self.counts, self.level = summary, out_dir, counts, level

    @property
    def text(self) -> str:
        """The digest `wingspan data inspect` prints."""
        import io

        from rich.console import Console

        from wingspan.data.inspect import print_summary

        console = Console(file=io.StringIO(), width=100, force_jupyter=False,
                          force_terminal=False)
        print_summary(self.summary, console)
        return console.file.getvalue()

    def plot(self, level: str | None = None) -> Image:
        """The class-balance plot of a level (default: the one inspected)."""
        plots, level = self.summary["plots"], level or self.level
        if level not in plots:
            raise WingspanError(f"No plot of a level '{level}'.",
                                hint=f"The levels plotted: {', '.join(plots) or 'none'} (a "
                                     "level blank for every image has none).")
        return Image(plots[level])

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        plots = "".join(_img(p, f"balance of {lv}", 480)
                        for lv, p in self.summary["plots"].items())
        return (f"<pre>{html.escape(self.text)}</pre><b>Images per {self.level}</b>"
                f"{_frame(self.counts.head(30))}<div>{plots}</div>")


# ---------------------------------------------------------------------------- training


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
    best_epoch, train_seconds, created, path), oldest first or by the column `sort`
    (scores best first). Folders that are no run are left out.

    >>> ws.runs().groupby("backbone")["held_out_macro_f1"].describe()
    """
    from wingspan.run_table import run_table

    return run_table(_path_arg("runs_dir", runs_dir), sort)


def _dataset(data: Data | Dataset | str | Path) -> Dataset:
    if isinstance(data, Data):
        return data.dataset
    if isinstance(data, Dataset):
        return data
    if not isinstance(data, str | os.PathLike):
        raise WingspanError(f"data: expected a dataset (ws.read's) or a path to one, got "
                            f"{_shown(data)}.", hint=_table_hint(data))
    return read(data).dataset


def _shown(value) -> str:
    """A wrong argument as a message shows it: its type, and its start on one line."""
    return f"{type(value).__name__} {' '.join(repr(value).split())!s:.60}"


def _table_hint(value) -> str | None:
    """What to do with a table of paths and labels (fastai's from_df habit), which
    wingspan reads from a CSV: its paths are then kept relative to it, with the runs."""
    if not isinstance(value, pd.DataFrame):
        return None
    return ("Save the table as a CSV and give its path: df.to_csv(\"photos.csv\", "
            "index=False), with the columns path,label[,split][,group][,<level>...] "
            "(paths absolute, or relative to the CSV).")


def _path_arg(name: str, value) -> Path:
    """A file or folder argument, or a WingspanError naming it (not a TypeError later).
    "~" is the user's home, as a shell would read it (a folder named "~" made in the
    current one instead is one a user may later clean up with `rm -rf ~`)."""
    if not isinstance(value, str | os.PathLike):
        raise WingspanError(f"{name}: expected a path (str or Path), got {_shown(value)}.",
                            hint=_table_hint(value))
    if not str(value).strip():  # ("" is the current folder: a run's files landed in it, as
        # an unset variable's would; the command line refuses it alike)
        raise WingspanError(f"{name} is empty: give a path (\".\" for the current folder).")
    return Path(value).expanduser()


def _out_arg(value) -> Path | None:
    """An optional output folder: None (the default place) or a path."""
    return None if value is None else _path_arg("out", value)


def _paths_arg(value, name: str = "paths") -> list[str]:
    """Files, folders or globs: one, or a list (a tuple, a pandas column...) of them."""
    if isinstance(value, str | os.PathLike):
        return [os.path.expanduser(value)]
    if isinstance(value, pd.DataFrame):  # (iterating one gives its column names)
        column = "'path'" if "path" in value.columns else "NAME"
        raise WingspanError(f"{name}: got a DataFrame; give its column of paths, "
                            f"frame[{column}].")
    if isinstance(value, bytes | bytearray | dict) or not isinstance(value, Iterable):
        raise WingspanError(f"{name}: expected a file, folder or glob, or a list of them; got "
                            f"{type(value).__name__}.",
                            hint="Pass image files as paths; save an in-memory image to a "
                                 "file first (or post it to `wingspan serve`).")
    items = list(value)
    odd = [p for p in items if not isinstance(p, str | os.PathLike)]  # None among them too
    if odd:
        raise WingspanError(f"{name}: each must be a path (str or Path); got "
                            f"{type(odd[0]).__name__} {odd[0]!r:.60}.")
    if not items:
        raise WingspanError(f"{name}: got an empty list; give at least one file, folder or "
                            "glob.")
    return [os.path.expanduser(p) for p in items]


def _count_arg(name: str, value, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise WingspanError(f"{name}: expected a whole number of at least {least}, got "
                            f"{value!r}.")
    return int(value)


def _switch_arg(name: str, value) -> bool:
    """True or False: "no" or "false" (a string, so true) turned a switch on."""
    if not isinstance(value, bool | np.bool_):
        raise WingspanError(f"{name}: expected True or False, got {type(value).__name__} "
                            f"{value!r:.60}.")
    return bool(value)


def _optional_count(name: str, value) -> int | None:
    return None if value is None else _count_arg(name, value)


def _workers_arg(value) -> int | None:
    """None (sized to the machine) or 0 or more data workers, named as the API names it."""
    return None if value is None else _count_arg("workers", value, least=0)


def _class_map_arg(value) -> dict[str, str] | None:
    """{model class: data class}; the CLI's "a=b" strings (one, or a list) are taken too."""
    if value is None or isinstance(value, dict):
        return value
    texts = [value] if isinstance(value, str) else list(value) if isinstance(
        value, Iterable) else value
    if isinstance(texts, list) and all(isinstance(t, str) for t in texts):
        from wingspan.config import name_pairs

        return name_pairs(list(texts), "class_map")
    raise WingspanError(f"class_map: expected a dict {{model class: data class}}, got "
                        f"{type(value).__name__}.", hint='For example {"admiral": "red_admiral"}.')


def _data_arg(value) -> Dataset | Path | None:
    """evaluate's and calibrate's `data`: what ws.read gave (read as it was, as train takes
    it), a Dataset, a path, or None (the run's own)."""
    if isinstance(value, Data):
        return value.dataset
    if isinstance(value, str) and value in (*SPLITS, "all") and not Path(value).exists():
        # run.evaluate("test"): data comes first, so a split given by position reads as a
        # path; said so here, not as "No dataset at test".
        raise WingspanError(f"data: {value!r} is a split name, and no such folder is here.",
                            hint=f"To choose the run's own split, name it: split={value!r}.")
    return value if value is None or isinstance(value, Dataset) else _path_arg("data", value)


def _split_arg(value, unset_means: str = "the test split (else val)") -> str | None:
    """None (the default split) or one of SPLITS or "all", as evaluate's --split."""
    if value is None or (isinstance(value, str) and value in (*SPLITS, "all")):
        return value
    raise WingspanError(f"split: expected one of {', '.join(SPLITS)} or all, got "
                        f"{type(value).__name__} {value!r:.60}.",
                        hint=f"Leave it out for {unset_means}.")


def _rate_arg(value) -> float | None:
    """None (the model's own) or a share strictly between 0 and 1, as --unknown-rate."""
    if value is None or (isinstance(value, float | np.floating) and 0 < value < 1):
        return None if value is None else float(value)
    raise WingspanError(f"unknown_rate: expected a share above 0 and below 1, e.g. 0.05; got "
                        f"{type(value).__name__} {value!r:.60}.")


def _max_pixels(value) -> contextlib.AbstractContextManager:
    """--max-pixels for one call, in its thread only (not the process's environment, as the
    CLI sets it: two calls in two threads may each have their own)."""
    if value is None:
        return contextlib.nullcontext()
    from wingspan.data.images import call_budget

    return call_budget(_count_arg("max_pixels", value))


def _predictions(rows: list[dict]) -> pd.DataFrame:
    """Run.predict's table (its columns even with no rows). Its text columns hold None
    where there is no text, as documented, whatever the rows: pandas turned the None of a
    column that also holds strings into NaN (`error`, once one input failed)."""
    frame = pd.DataFrame(rows, columns=["path", "answer", "class", "probability", "branch",
                                        "top", "known_level", "unknown_score", "threshold",
                                        "score_level", "error"])
    text = ["path", "answer", "class", "branch", "known_level", "score_level", "error"]
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
    if kind == "failed":
        path, why = result.failed[i]
        return {"path": path, "answer": None, "class": None, "probability": float("nan"),
                "branch": "", "top": [], "known_level": None, "unknown_score": float("nan"),
                "threshold": float("nan"), "score_level": None, "error": why}
    row = result.rows[i]
    (best, p), branch = row["top"][0], ""
    if "taxonomy" in row:  # the consistent branch is the prediction
        _, best, p = row["taxonomy"][-1]
        branch = " > ".join(f"{c} {q:.2f}" for _, c, q in row["taxonomy"])
    return {"path": row["path"], "answer": row["answer"], "class": best, "probability": p,
            "branch": branch, "top": row["top"], "known_level": row.get("known_level"),
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
        from wingspan.evaluate.calibrate import calibrate, fit_unknown
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
        if unknown:
            if data is not None or split is not None or class_map:
                raise WingspanError("calibrate(unknown=True) fits the unknown scores on the "
                                    "run's own train and val images: it takes no data, split "
                                    "or class_map.",
                                    hint="Leave them out (without unknown=True they choose "
                                         "what the temperature is fitted on).")
            with _max_pixels(max_pixels):
                return fit_unknown(self._model, _rate_arg(unknown_rate), unknown_score,
                                   **options)
        if unknown_rate is not None or unknown_score is not None:
            raise WingspanError("unknown_rate and unknown_score set the unknown answer, which "
                                "calibrate fits again only with unknown=True.",
                                hint="Add unknown=True (the temperature is then left as it is).")
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
        predict`. One row per image: path, answer (the class, or "unknown" for an image
        unlike every class the model knows; with levels, the class at the finest level
        it is known at), class and probability (calibrated: the closest class, whatever
        the answer), branch (the consistent taxonomic branch of a model with levels, e.g.
        "nymphalidae 0.98 > monarch 0.95"), top (the top_k (class, probability) pairs),
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
            warnings.warn(not_images_said(result.not_images), stacklevel=2)
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


# ---------------------------------------------------------------------------- evaluation


# predictions.csv's columns of numbers; the others (and p:CLASS's names) are text.
NUMBER_COLUMNS = ("probability", "unknown_score", "threshold")


def _table(path: Path, text: list[str] = (), numbers: tuple[str, ...] | None = None
           ) -> pd.DataFrame:
    """An evaluation's CSV with its class names as written: pandas' defaults read classes
    named "NA", "None" or "nan" as missing and "01", "1" and "1.0" as the one number 1.
    `text`: the columns of names; with `numbers`, every column but those and p:CLASS's."""
    if numbers is not None:
        header = pd.read_csv(path, nrows=0).columns
        text = [c for c in header if c not in numbers and not c.startswith("p:")]
    return pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False,
                       na_values=[""])


def _confusion(path: Path) -> pd.DataFrame:
    """confusion.csv: counts, true classes (rows) by predicted ones, named as written."""
    return pd.read_csv(path, dtype=str, keep_default_na=False, index_col=0).astype(int)


class Evaluation:
    """What `Run.evaluate` measured: `metrics` (metrics.json), the tables and plots in
    `dir`, and `report_path` (report.html, one self-contained page).

    >>> ev = run.evaluate()
    >>> ev.per_class              # precision, recall, F1, support per class
    >>> ev.report()               # the whole report, embedded in the notebook
    """

    def __init__(self, out_dir: Path, metrics: dict, report: Path):
        self.dir, self.metrics = Path(out_dir).absolute(), metrics
        self.report_path = Path(report).absolute()
        # The tables are read now: a later evaluation into the same folder (after
        # run.calibrate, say) replaces it whole, and this one must keep showing its own.
        self._written = self._stamp()
        self.per_class = _table(self.dir / "per_class.csv", ["class"])
        self.confusion = _confusion(self.dir / "confusion.csv")  # rows: truth
        self.predictions = _table(self.dir / "predictions.csv", numbers=NUMBER_COLUMNS)

    def _stamp(self) -> str | None:
        try:
            return (self.dir / "metrics.json").read_text()
        except OSError:
            return None

    def _files(self) -> Path:
        """The folder, once checked to hold this evaluation's plots and report still."""
        if not self.dir.is_dir():
            raise WingspanError(f"{self.dir}, this evaluation's folder, is gone: its plots "
                                "and report with it (its metrics and tables are kept in this "
                                "object).", hint="Evaluate again for its plots.")
        if self._stamp() != self._written:
            raise WingspanError(
                f"{self.dir} now holds a later evaluation; this one's plots and report were "
                "replaced with it (its metrics and tables are kept in this object).",
                hint="Evaluate again for its plots, or give each evaluation its own folder "
                     "with out=.")
        return self.dir

    @_keywords_checked
    def plot(self, name: str = "confusion") -> Image:
        """One of the evaluation's plots: confusion, reliability, mistakes, curves,
        balance, preview.

        >>> ev.plot("reliability")    # calibration before and after the temperature
        """
        path = self._files() / f"{name}.png"
        if not path.is_file():
            found = sorted(p.stem for p in self.dir.glob("*.png"))
            raise WingspanError(f"No plot '{name}' in {self.dir}.",
                                hint=f"Available: {', '.join(found)}." if found else
                                "It was evaluated with plots=False: evaluate again without it.")
        return Image(path)

    @_keywords_checked
    def report(self, open: bool = False) -> Html:
        """report.html embedded in the notebook; `open=True` also opens it in the browser.

        >>> ev.report()
        """
        self._files()
        if open:
            import webbrowser

            webbrowser.open(self.report_path.resolve().as_uri())
        page = html.escape(self.report_path.read_text(encoding="utf-8"), quote=True)
        # sandbox: the page runs no script of its own, so none runs at all, in case a label
        # (a class name from someone else's data) ever slipped past the report's escaping.
        return Html(f"<iframe sandbox srcdoc=\"{page}\" style='width:100%;height:720px;"
                    "border:1px solid #ddd'></iframe>", self.report_path)

    def __repr__(self) -> str:
        m = self.metrics
        return (f"Evaluation({m['split']} split, {m['images']} images: accuracy "
                f"{m['accuracy']:.4f}, macro-F1 {m['macro']['f1']:.4f}; {self.report_path})")

    def _repr_html_(self) -> str:
        from wingspan.evaluate.metrics import summary_rows
        from wingspan.evaluate.wording import answer_rows, at_threshold

        m = self.metrics
        pairs = [("images", m["images"]), *summary_rows(m),
                 ("ECE before / after the temperature",
                   f"{m['ece_uncalibrated']:.4f} / {m['ece']:.4f} "
                   f"(T = {m['temperature']:.2f})"), *answer_rows(m.get("answers")),
                  ("are these figures fair?", m["fair"]), ("report", self.report_path)]
        parts = [_kv(f"Evaluation: {m['split']} split, level '{m['level']}'", pairs)]
        if u := m.get("unknown"):  # evaluated with unknown=: the unseen images' figures
            scores = pd.DataFrame({(f"{name} (in use)" if name == u["score"] else name):
                                   {"AUROC": v["auroc"], "FPR at 95% TPR": v["fpr95"]}
                                   for name, v in u["scores"].items()}).T
            parts.append(f"<b>Unknown images: {u['unseen_images']} of unseen classes against "
                         f"the known ones</b>" + _frame(scores, "{:.4f}")
                         + f"<p>{html.escape(at_threshold(u))}</p>")
        if m.get("hierarchy"):
            levels = pd.DataFrame({lv: {"micro-F1": v["micro_f1"]}
                                   for lv, v in m["hierarchy"]["levels"].items()})
            parts.append("<b>Per level (consistent predictions)</b>" + _frame(levels))
        plots = [("confusion", 380), ("reliability", 380), ("curves", 780)]
        if self._stamp() == self._written:  # (a later evaluation's plots are not this one's)
            parts.append("<div>" + "".join(_img(self.dir / f"{n}.png", n, w) for n, w in plots
                                           if (self.dir / f"{n}.png").is_file()) + "</div>")
        return "<div>" + "".join(parts) + "</div>"
