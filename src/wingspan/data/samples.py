"""The sample table every reader returns, and the problems found while reading."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from wingspan.errors import WingspanError
from wingspan.files import PATH_TEXT, fitting_name

# Fixed columns of the table; every other column is a label level.
PATH, GROUP, SPLIT = "path", "group", "split"
SOURCE = ".source"  # in runs/data/NAME: the data folder (or file) it holds the outputs of


def folder_of(base: Path, source: Path) -> Path:
    """`base`, or base-HASH (8 hex digits of `source`'s path) where `base` holds the
    outputs of another folder or file of the same name, as its SOURCE file says: two
    "photos" folders each get their own."""
    try:
        owner = (base / SOURCE).read_text(**PATH_TEXT).strip()
    except OSError:  # no one's yet
        return base
    mine = str(source.resolve())
    if owner == mine:
        return base
    return base.with_name(f"{base.name}-{hashlib.sha256(os.fsencode(mine)).hexdigest()[:8]}")


# Reader findings that training goes on past but that bias its figures: a column of ids
# read as a level (one specimen's photos free to sit on two sides), one class read as two
# ('Monarch' and 'monarch': every confusion between them a mistake). Said as warnings.
BIASING_PROBLEMS = ("column_finer_than_label", "classes_differ_in_case")


@dataclass
class Problem:
    """Something wrong with the input that was skipped or needs attention."""

    kind: str  # e.g. "missing_file", "empty_class", "duplicate_record"
    message: str
    path: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "path": self.path}


@dataclass
class Dataset:
    """Samples as one table, plus what the reader learned about them.

    `table` has the columns `path` (absolute), `group` (samples that must stay on one
    side of a split: same specimen, observation or barcode), `split` (train/val/test
    when the source fixes one, else empty) and one column per label level, coarse to
    fine (`levels`). The finest level is the default label.
    """

    table: pd.DataFrame
    levels: list[str]
    root: Path
    format: str
    problems: list[Problem] = field(default_factory=list)
    group_regex: str | None = None  # how groups were read: a run records it, to read alike

    def __post_init__(self) -> None:
        front = [PATH, GROUP, SPLIT, *self.levels]
        self.table = self.table[front + [c for c in self.table.columns if c not in front]]

    def __len__(self) -> int:
        return len(self.table)

    @property
    def name(self) -> str:
        """The folder's name, or the file's; every `data split` writes a splits.csv, so
        that one is named with its folder (runs/data/leeds/splits.csv: leeds-splits)."""
        if not self.root.is_file():
            return self.root.name
        stem = self.root.stem
        return f"{self.root.parent.name}-{stem}" if stem == "splits" else stem

    @property
    def out_dir(self) -> Path:
        """Where `wingspan data inspect/split/preview/audit` (and `Data` in the API) write
        for this dataset unless told otherwise: runs/data/NAME, or NAME-HASH (8 hex digits
        of its path) where runs/data/NAME is another folder's of the same name (two
        "photos" folders, say), as its SOURCE file says."""
        return folder_of(Path("runs") / "data" / fitting_name(self.name), self.root)

    def claim_out_dir(self) -> Path:
        """`out_dir`, made, and marked as this data's if no one's yet (by the command about
        to write there)."""
        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        if not (out / SOURCE).is_file():
            (out / SOURCE).write_text(str(self.root.resolve()) + "\n", **PATH_TEXT)
        return out

    @property
    def default_level(self) -> str:
        return self.levels[-1]

    def resolve_level(self, level: str | None) -> str:
        """The level asked for, or the finest one; a clear error for an unknown name."""
        if level is None:
            return self.default_level
        if level not in self.levels:
            where = ("" if len(self.levels) > 1 else " Coarser levels come from a taxonomy.csv "
                     "beside the class folders (folder,family,subfamily,genus,specific_epithet)"
                     " or from a CSV's extra columns.")
            close = difflib.get_close_matches(str(level).lower(), self.levels, n=1, cutoff=0.5)
            raise WingspanError(
                f"This dataset has no label level '{level}'.",
                hint=(f"Did you mean '{close[0]}'? " if close else "")
                + f"Choose one of: {', '.join(self.levels)}.{where}",
            )
        return level

    @property
    def has_splits(self) -> bool:
        return bool((self.table[SPLIT] != "").any())

    def class_counts(self, level: str | None = None) -> pd.Series:
        """Images per class at a level, largest first."""
        return self.table[self.resolve_level(level)].value_counts()

    def with_table(self, table: pd.DataFrame) -> Dataset:
        """The same dataset with another table (rows or splits changed)."""
        return dataclasses.replace(self, table=table.reset_index(drop=True),
                                   levels=list(self.levels), problems=list(self.problems))

    def subset(self, rows) -> Dataset:
        """A dataset with the rows picked by a boolean mask or positions (repeats allowed)."""
        return self.with_table(self.table.iloc[np.asarray(rows)])


def make_table(
    paths: list[str], labels: dict[str, list[str]], groups: list[str] | None = None,
    splits: list[str] | None = None,
) -> pd.DataFrame:
    """Build the sample table with the column order every reader uses."""
    n = len(paths)
    data = {PATH: paths, GROUP: groups if groups is not None else list(paths),
            SPLIT: splits if splits is not None else [""] * n}
    data.update(labels)
    return pd.DataFrame(data)


def renamed(labels: pd.Series, names: Mapping[str, str]) -> pd.Series:
    """`labels.replace(names)` for label columns, in one hash lookup per row: pandas'
    replace tries each key in turn, a second at 48k rows and 300 rare classes. Like replace,
    one pass ({"a": "b", "b": "c"} turns "a" into "b", not "c"), and values that are not
    keys (None and NaN too) keep their value and the column its dtype."""
    hit = labels.isin(list(names)).to_numpy()
    out = labels.copy()
    out[hit] = labels[hit].map(names).to_numpy()
    return out


def report_reading(dataset: Dataset, log) -> dict[str, int]:
    """Say what reading the data left out or flagged (missing files, empty labels, empty
    class folders, repeated records...), by kind, with an example each; returns the counts."""
    kinds: dict[str, list] = {}
    for problem in dataset.problems:
        kinds.setdefault(problem.kind, []).append(problem)
    counts = {}
    for kind, problems in kinds.items():
        # A reader may sum a kind up (per split, say) besides listing each case: the sums
        # say it best, and the count is of the cases, not of cases and sums together.
        # A kind that is one sum alone (ETHEC's leaks: "49 images are in more than one
        # split") is said as it is, not as "1 x image in two splits, e.g. 49 images ...".
        cases = [p for p in problems if p.path] or problems
        sums = [p for p in problems if not p.path]
        counts[kind] = len(cases)
        said = "Warning: while reading the data" if kind in BIASING_PROBLEMS else \
            "While reading the data"
        if sums and (len(cases) < len(problems) or len(problems) == 1):
            for each in sums:
                log(f"{said}: {each.message}")
            continue
        example = cases[0]
        log(f"{said}: {len(cases)} x {kind.replace('_', ' ')}, e.g. "
            f"{example.message}" + (f" ({example.path})" if example.path else ""))
    return counts


# A splits.csv's group for identical files, which a split keeps together (data.split)
SAME_FILE = "same-file:"


def split_by(table: pd.DataFrame) -> str:
    """How a split is made: by the groups given, else photo by photo, said with its risk."""
    return "by group" if groups_given(table) else (
        "photo by photo (no groups given: photos of one specimen or observation may land on "
        "two sides; --group-regex or a CSV's group column keeps them together)")


def groups_given(table: pd.DataFrame) -> bool:
    """Whether groups were given (--group-regex, a CSV's group column): else each photo is
    its own group (identical files apart: grouped by their path, or SAME_FILE read back
    from a run's splits.csv), and photos of one specimen or observation may sit on two
    sides of a split."""
    if GROUP not in table:
        return False
    keys = table[GROUP].astype(str)
    return not (keys.isin(set(table[PATH])) | keys.str.startswith(SAME_FILE)).all()
