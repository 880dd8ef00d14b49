"""Readers turn a dataset on disk into one sample table; a registry picks the reader.

Formats:
- folder: `DATA/<class>/<image>`, optional `DATA/taxonomy.csv` (higher levels) and
  `DATA/splits.csv` (`path,label,split`, a fixed split);
- csv: `path,label[,split][,group][,<level>...]`, paths relative to the CSV;
- ethec: the ETHEC collection (see `wingspan.data.ethec`).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from wingspan.config import IMAGE_EXTENSIONS, SPLITS, ReadConfig
from wingspan.data.samples import GROUP, PATH, SPLIT, Dataset, Problem, make_table
from wingspan.data.taxonomy import TAXONOMY_FILE, apply_taxonomy, read_taxonomy
from wingspan.errors import WingspanError

Reader = Callable[[Path, ReadConfig], Dataset]
READERS: dict[str, Reader] = {}
# Folder layouts a reader recognises (name -> test), tried before the plain class folders.
DETECTORS: dict[str, Callable[[Path], bool]] = {}
SPLITS_FILE = "splits.csv"
LABEL = "label"


def register_reader(name: str, detect: Callable[[Path], bool] | None = None
                    ) -> Callable[[Reader], Reader]:
    """Add a reader; `detect` says whether a folder is in its layout."""
    def add(fn: Reader) -> Reader:
        READERS[name] = fn
        if detect is not None:
            DETECTORS[name] = detect
        return fn

    return add


def detect_format(path: Path) -> str:
    """Which reader fits DATA, judged from what it is."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise WingspanError(
            f"Cannot tell the dataset format of the file {path}.",
            hint="Give a folder of class folders, a .csv file, or an ETHEC root, "
            "or name the format with --format.",
        )
    return next((name for name, detect in DETECTORS.items() if detect(path)), "folder")


def read_dataset(path: str | Path, config: ReadConfig | None = None) -> Dataset:
    """Read any supported dataset into a `Dataset`; problems are listed, not hidden."""
    config = config or ReadConfig()
    path = Path(path).expanduser()
    if not path.exists():
        raise WingspanError(
            f"No dataset at {path}: the path does not exist.",
            hint="Check the spelling, or give the folder that holds one folder per class.",
        )
    fmt = config.format or detect_format(path)
    if fmt not in READERS:
        raise WingspanError(
            f"Unknown dataset format '{fmt}'.", hint=f"Choose one of: {', '.join(READERS)}."
        )
    dataset = READERS[fmt](path.resolve(), config)
    _check_not_empty(dataset, path)
    return dataset


def _check_not_empty(dataset: Dataset, path: Path) -> None:
    if len(dataset) == 0:
        missing = sum(p.kind == "missing_file" for p in dataset.problems)
        hint = "Put images in one folder per class: DATA/<class>/<image>.jpg"
        if missing:
            hint = (f"All {missing} listed images are missing. Check the image root (`data "
                    "inspect --metadata-only` reads the labels alone).")
        raise WingspanError(f"The dataset at {path} has no usable images.", hint=hint)


def _group_keys(paths: list[str], regex: str | None) -> tuple[list[str], list[Problem]]:
    """The group of each file: the regex's first group on the file name, else the file."""
    if not regex:
        return list(paths), []
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise WingspanError(f"--group-regex '{regex}' is not a valid regex: {e}") from e
    groups, problems = [], []
    for p in paths:
        m = pattern.search(os.path.basename(p))
        if m:
            groups.append(m.group(1) if pattern.groups else m.group(0))
        else:
            groups.append(p)
            problems.append(Problem("group_unmatched", "group regex does not match; file is "
                                    "its own group", p))
    return groups, problems


def _keep_existing(
    table: pd.DataFrame, config: ReadConfig, problems: list[Problem], where: str
) -> pd.DataFrame:
    """Drop rows whose file is missing, listing each one (an error under --strict)."""
    if not config.check_files:
        return table
    exists = table[PATH].map(os.path.isfile)
    missing = table.loc[~exists, PATH].tolist()
    if missing and config.strict:
        raise WingspanError(
            f"{len(missing)} images listed in {where} do not exist, e.g. {missing[0]}",
            hint="Fix the paths, or drop --strict to skip and list them.",
        )
    problems += [Problem("missing_file", f"listed in {where} but not found", p) for p in missing]
    return table[exists].reset_index(drop=True)


def _with_taxonomy(
    table: pd.DataFrame, levels: list[str], folder: Path, problems: list[Problem]
) -> tuple[pd.DataFrame, list[str]]:
    """Add higher levels from `folder/taxonomy.csv` when there is one."""
    tax_path = folder / TAXONOMY_FILE
    if not tax_path.is_file():
        return table, levels
    table, added, tax_problems = apply_taxonomy(table, LABEL, read_taxonomy(tax_path), tax_path)
    problems += tax_problems
    return table, added + levels


@register_reader("folder")
def read_folder(root: Path, config: ReadConfig) -> Dataset:
    """`root/<class>/<image>`; images in nested folders count for their top class folder."""
    if not root.is_dir():
        raise WingspanError(f"{root} is not a folder.", hint="Use --format csv for a CSV file.")
    problems: list[Problem] = []
    paths, labels = [], []
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for class_dir in class_dirs:
        found = 0
        for f in sorted(class_dir.rglob("*")):
            # Hidden files and everything in hidden folders (.ipynb_checkpoints, .thumbnails)
            if any(part.startswith(".") for part in f.relative_to(class_dir).parts) \
                    or not f.is_file():
                continue
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(f))
                labels.append(class_dir.name)
                found += 1
            else:
                problems.append(Problem("not_image", "not an image file extension; ignored",
                                        str(f)))
        if not found:
            problems.append(Problem(
                "empty_class", f"class folder '{class_dir.name}' has no images; the class is "
                "left out. Add images or remove the folder.", str(class_dir)))
    if config.strict and any(p.kind == "empty_class" for p in problems):
        empty = next(p for p in problems if p.kind == "empty_class")
        raise WingspanError(f"Class folder {empty.path} has no images (--strict).",
                            hint="Add images or remove the folder; without --strict the "
                            "class is left out and listed.")
    groups, group_problems = _group_keys(paths, config.group_regex)
    problems += group_problems
    table = make_table(paths, {LABEL: labels}, groups)
    table, levels = _with_taxonomy(table, [LABEL], root, problems)
    if (root / SPLITS_FILE).is_file():
        table = _fixed_splits(table, root / SPLITS_FILE, problems)
    return Dataset(table, levels, root, "folder", problems)


def _fixed_splits(table: pd.DataFrame, splits_csv: Path, problems: list[Problem]) -> pd.DataFrame:
    """Take the split of each image from a `path,...,split` file beside the class folders."""
    fixed = _read_csv(splits_csv)
    if PATH not in fixed.columns or SPLIT not in fixed.columns:
        problems.append(Problem("splits_file_ignored", "has no path and split columns; ignored",
                                str(splits_csv)))
        return table
    _check_split_values(fixed, splits_csv)
    # Both sides resolved alike, so that a class folder reached through a symlink matches.
    fixed = fixed.assign(_key=[str((splits_csv.parent / p).resolve()) for p in fixed[PATH]])
    sides = fixed.groupby("_key")[SPLIT].nunique()
    torn = set(sides[sides > 1].index)  # listed twice, on two sides: neither is trusted
    problems += [Problem("conflicting_splits", f"listed in {splits_csv.name} on more than one "
                         "side; has no split", p) for p in sorted(torn)]
    by_path = dict(zip(fixed["_key"], fixed[SPLIT], strict=True))
    table[SPLIT] = [("" if key in torn else by_path.get(key, ""))
                    for key in (str(Path(p).resolve()) for p in table[PATH])]
    unlisted = [p for p, side in zip(table[PATH], table[SPLIT], strict=True)
                if side == "" and str(Path(p).resolve()) not in torn]
    problems += [Problem("not_in_splits", f"not listed in {splits_csv.name}; has no split", p)
                 for p in unlisted]
    return table


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        _check_field_counts(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
            csv.Error) as e:
        raise WingspanError(f"Cannot read the CSV file {path}: {e}") from e


def _check_field_counts(path: Path) -> None:
    """Every row as wide as the header. pandas would take a row with one field more as an
    index plus shifted columns (its label read as the split, say) without a word."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        for line, row in enumerate(rows, start=2):
            if len(row) > len(header):  # fewer is fine: pandas fills in empty fields
                raise WingspanError(
                    f"{path}, line {line}: {len(row)} fields where the header "
                    f"({','.join(header)}) has {len(header)}.",
                    hint="Quote values that contain commas, or fix the row.")


def _check_split_values(table: pd.DataFrame, where: Path) -> None:
    bad = table.loc[~table[SPLIT].isin([*SPLITS, ""])]
    if len(bad):
        row = bad.index[0] + 2  # header is line 1
        raise WingspanError(
            f"{where}, line {row}: split '{bad[SPLIT].iloc[0]}' is not one of {list(SPLITS)}.",
            hint="Use train, val or test (or leave it empty).",
        )


@register_reader("csv")
def read_csv_table(csv_path: Path, config: ReadConfig) -> Dataset:
    """`path,label[,split][,group][,<level>...]`; extra columns are coarser label levels."""
    if not csv_path.is_file():
        raise WingspanError(f"{csv_path} is not a CSV file.")
    raw = _read_csv(csv_path)
    missing = [c for c in (PATH, LABEL) if c not in raw.columns]
    if missing:
        raise WingspanError(
            f"{csv_path} has no {' or '.join(repr(c) for c in missing)} column "
            f"(its columns: {list(raw.columns)}).",
            hint="The first line must name the columns: path,label[,split][,group][,<level>...]",
        )
    if SPLIT in raw.columns:
        _check_split_values(raw, csv_path)
    problems: list[Problem] = []
    # " monarch" and "monarch " are the class "monarch", not two more.
    raw = raw.assign(**{c: raw[c].str.strip() for c in raw.columns
                        if c not in (PATH, SPLIT, GROUP)})
    unlabelled = raw[LABEL] == ""
    problems += [Problem("no_label", "row has an empty label; skipped", p)
                 for p in raw.loc[unlabelled, PATH]]
    raw = raw[~unlabelled]
    paths = [p if os.path.isabs(p) else os.path.normpath(csv_path.parent / p) for p in raw[PATH]]
    coarser = [c for c in raw.columns if c not in (PATH, LABEL, SPLIT, GROUP)]
    if GROUP in raw.columns:
        groups = [g or p for g, p in zip(raw[GROUP], paths, strict=True)]
    else:
        groups, group_problems = _group_keys(paths, config.group_regex)
        problems += group_problems
    table = make_table(paths, {**{c: raw[c].tolist() for c in coarser}, LABEL: raw[LABEL].tolist()},
                       groups, raw[SPLIT].tolist() if SPLIT in raw.columns else None)
    levels = [*coarser, LABEL]
    if not coarser:
        table, levels = _with_taxonomy(table, levels, csv_path.parent, problems)
    table = _keep_existing(table, config, problems, csv_path.name)
    return Dataset(table, levels, csv_path, "csv", problems)

