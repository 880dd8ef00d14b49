"""`ws.read` and `ws.demo_data`: a dataset, its inspection, split and preview."""

from __future__ import annotations

import html
import os
import warnings
from pathlib import Path

import pandas as pd

from wingspan.api.arguments import (
    _keywords_checked,
    _max_pixels,
    _os_errors_said,
    _out_arg,
    _path_arg,
    _shown,
    _switch_arg,
    _table_hint,
)
from wingspan.api.display import Image, _frame, _img, _kv
from wingspan.config import (
    AUGMENT_POLICIES,
    PREVIEW_ROWS,
    PREVIEW_VIEWS,
    SPLITS,
    AugmentConfig,
    DemoConfig,
    InspectConfig,
    ReadConfig,
    SplitConfig,
    TrainConfig,
)
from wingspan.data.samples import SPLIT, Dataset
from wingspan.errors import WingspanError


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
                rows: int = PREVIEW_ROWS, views: int = PREVIEW_VIEWS, seed: int = 0,
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


def _dataset(data: Data | Dataset | str | Path) -> Dataset:
    if isinstance(data, Data):
        return data.dataset
    if isinstance(data, Dataset):
        return data
    if not isinstance(data, str | os.PathLike):
        raise WingspanError(f"data: expected a dataset (ws.read's) or a path to one, got "
                            f"{_shown(data)}.", hint=_table_hint(data))
    return read(data).dataset


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


