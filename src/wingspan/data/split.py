"""Train/val/test splits: stratified by a label level, grouped so no group leaks."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.utils import check_random_state

from wingspan.config import SplitConfig, TrainConfig
from wingspan.data.leaks import with_duplicates_grouped
from wingspan.data.readers import is_utf8, shown_utf8
from wingspan.data.samples import GROUP, PATH, SAME_FILE, SPLIT, Dataset
from wingspan.errors import WingspanError, counted, some
from wingspan.files import atomic_paths, frame_to_csv, remove_dead_leftovers


@dataclass
class SplitReport:
    """What the split did, for the user: sizes, and classes that could not go everywhere."""

    sizes: dict[str, int]
    fractions: dict[str, float]
    train_only: dict[str, int] = field(default_factory=dict)  # class -> groups it has
    missing: dict[str, list[str]] = field(default_factory=dict)  # split -> absent classes
    duplicates_grouped: int = 0  # groups merged into others because they hold one picture
    repeats_dropped: int = 0  # images listed on more than one side (ETHEC's), now one row
    # Groups of images with different classes: the same picture saved in two class folders
    # (copies are one group), or one observation given two. "a.jpg (admiral) = b.jpg (monarch)"
    mixed_labels: list[str] = field(default_factory=list)
    group_regex: str | None = None  # what made the groups, when a regex did

    def recount(self, table: pd.DataFrame, level: str, wanted: list[str]) -> None:
        """The sizes, shares and classes missing from each side of `table`'s split (again,
        once images were moved after it: `training.prepare`'s --weights RUN repair)."""
        sizes = table[SPLIT].value_counts().reindex(["train", "val", "test"], fill_value=0)
        present = table.groupby(SPLIT)[level].apply(set)
        labels = set(table[level])
        self.sizes = {k: int(v) for k, v in sizes.items()}
        self.fractions = {k: round(v / len(table), 3) for k, v in sizes.items()}
        self.missing = {s: sorted(labels - present.get(s, set()))
                        for s in ["train", *wanted] if labels - present.get(s, set())}

    def mixed_labels_said(self, level: str) -> str:
        """The warning for mixed_labels, or ""."""
        if not self.mixed_labels:
            return ""
        said = (f"{counted(len(self.mixed_labels), 'group holds', 'groups hold')} images of "
                f"different '{level}' classes (e.g. {self.mixed_labels[0]}): ")
        if self.group_regex:  # (`_\d+` took a frame number shared by every observation)
            return said + (f"--group-regex '{self.group_regex}' may take a part of the file "
                           "name that other observations share; else the same picture was "
                           "saved in two class folders, or one observation given two classes.")
        return said + ("the same picture saved in two class folders, or one observation given "
                       "two classes. One of them is wrong in training and in every score: fix "
                       "the labels (`wingspan data inspect` lists identical copies).")


def split_dataset(dataset: Dataset, level: str | None = None,
                  config: SplitConfig | None = None) -> tuple[Dataset, SplitReport]:
    """Assign every sample to train, val or test, replacing any split the source had.

    Whole groups go to one side (scikit-learn's StratifiedGroupKFold keeps class
    proportions as close as grouping allows); the same seed gives the same split.
    Classes with fewer groups than non-empty splits cannot appear in all of them: they
    go to train only, so the model can at least learn them, and are reported.
    """
    config = config or SplitConfig()
    level = dataset.resolve_level(level)
    # A path the source listed on two sides (ETHEC has such images in val and test) is one
    # image once the old sides are gone: its rows on the later sides go, or it would count
    # twice. Repeats on one side (oversampled training rows) stay.
    source = dataset.table
    first_side = source.groupby(PATH, sort=False)[SPLIT].transform("first")
    repeated = (source[PATH].duplicated() & (source[SPLIT] != first_side)).to_numpy()
    # Identical files (one picture saved under two names) go to the same side.
    table, merged = with_duplicates_grouped(dataset.table[~repeated].reset_index(drop=True))
    labels = table[level].to_numpy()
    if (labels == "").any():
        # Named by their finest class (a class folder taxonomy.csv lacks, most often).
        finest = sorted(set(table.loc[labels == "", dataset.levels[-1]]) - {""})
        raise WingspanError(
            f"{counted(int((labels == '').sum()), 'sample has', 'samples have')} no '{level}' "
            "label" + (f": those of {some([repr(c) for c in finest], 3)}." if finest else "."),
            hint="Give those classes their row in taxonomy.csv (or fill in the level, or the "
                 "columns it is made of, such as genus and specific_epithet for species), or "
                 "choose a level every sample has (--level).",
        )
    groups = table[GROUP].to_numpy()
    wanted = [s for s, f in (("test", config.test_fraction), ("val", config.val_fraction)) if f]
    groups_per_class = table.groupby(level)[GROUP].nunique()
    small = groups_per_class[groups_per_class < len(wanted) + 1]
    split = np.full(len(table), "train", dtype=object)
    pool = ~np.isin(labels, small.index)  # samples still to be divided
    if wanted and not pool.any():
        # Make no test split only where that leaves a class enough groups for train and val
        # (one picture copied into every file: the same error again, and the same hint).
        fewer = len(wanted) == 2 and groups_per_class.max() >= 2
        raise WingspanError(
            f"Every '{level}' class has fewer than {len(wanted) + 1} independent images "
            f"(groups), one for train and one for each of {' and '.join(wanted)}: there is "
            "nothing to split off"
            + (f" ({counted(merged, 'image is a copy', 'images are copies')} of another "
               "under another name, counted as one with it: `wingspan data inspect` lists "
               "them)." if merged else "."),
            hint="Add images, split on a coarser --level"
                 + (", or make no test split (--test 0 for data split, --test-fraction 0 for "
                    "train)." if fewer else "."))
    pooled = pool.copy()
    remaining = 1.0
    for name in wanted:
        fraction = getattr(config, f"{name}_fraction") / remaining
        split[_take_fold(labels, groups, pool, fraction, config.seed)] = name
        pool &= split == "train"
        remaining -= getattr(config, f"{name}_fraction")
    table[SPLIT] = split
    # A group holding a train-only class and a pooled one (one picture in two class
    # folders) could straddle two sides: it is kept whole, in train, where the train-only
    # class must be (elsewhere that class would have no training image at all).
    sides = table.groupby(GROUP)[SPLIT].nunique()
    table.loc[table[GROUP].isin(sides[sides > 1].index), SPLIT] = "train"
    split = table[SPLIT].to_numpy()
    _keep_one_in_train(split, labels, groups, pooled)
    table[SPLIT] = split
    # Repeats of one path (oversampled training rows, rows pasted twice) stay in train; in
    # val or test a row is an image scored, which would count twice in the figures (and
    # train, reading the file back, counts it once: its sizes were not the ones said here).
    table = table[~(table[PATH].duplicated() & (table[SPLIT] != "train")).to_numpy()
                  ].reset_index(drop=True)

    report = SplitReport(
        {}, {}, train_only={k: int(v) for k, v in small.items()}, duplicates_grouped=merged,
        repeats_dropped=int(source.loc[repeated, PATH].nunique()),  # images, not their rows
        mixed_labels=_mixed_labels(table, level), group_regex=dataset.group_regex,
    )
    report.recount(table, level, wanted)
    result = dataset.with_table(table)
    return result, report


def _mixed_labels(table: pd.DataFrame, level: str) -> list[str]:
    """Each group that holds more than one class, as an image of each of its first two
    classes (a --group-regex group can hold dozens of images: all made one line of 6,000
    characters) and a count of the rest."""
    classes = table.groupby(GROUP)[level].nunique()
    mixed = table[table[GROUP].isin(classes.index[classes > 1])]
    said = []
    for _, part in mixed.groupby(GROUP, sort=True):
        shown = part.drop_duplicates(level).head(2)
        said.append(" = ".join(f"{p} ({c})" for p, c in zip(shown[PATH], shown[level],
                                                             strict=True))
                    + (f" (and {counted(len(part) - 2, 'more image')} in the group)"
                       if len(part) > 2 else ""))
    return said


def _keep_one_in_train(split: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                       pooled: np.ndarray) -> None:
    """A class of few groups can lose every one to the folds (3 groups at --val 0.3 --test
    0.3: two to test, the third to val), leaving nothing to learn it from. One of its
    groups goes back to train, whole, from the side that holds the most of them."""
    trains = pd.Series(split == "train").groupby(labels).any()  # (one pass: 10k classes)
    for cls in sorted(set(labels[pooled]) - set(trains[trains].index)):
        mine = labels == cls
        if (split[mine] == "train").any():  # given one with another class's group
            continue
        held = pd.Series(groups[mine]).groupby(split[mine]).nunique()
        side = held.index[np.argmax(held.to_numpy())]  # (the first of a tie: test)
        group = pd.unique(groups[mine & (split == side)])[0]
        split[groups == group] = "train"


def _take_fold(labels: np.ndarray, groups: np.ndarray, pool: np.ndarray, fraction: float,
               seed: int) -> np.ndarray:
    """Indices (into the full arrays) of one grouped, stratified fold of about `fraction`."""
    idx = np.flatnonzero(pool)
    # scikit-learn refuses more folds than the largest class has samples: with small
    # classes the fold grows a little (the report shows the fractions actually made).
    # So does it with few groups (independent images): 6 groups make 6 folds at most.
    largest = np.unique(labels[idx], return_counts=True)[1].max() if len(idx) else 0
    n_groups = len(np.unique(groups[idx]))
    if n_groups < 2:
        raise WingspanError(
            f"Too few independent images (groups) to split: {n_groups} left to divide.",
            hint="Add images, make fewer splits (--val 0 or --test 0), or group less "
                 "(--group-regex).")
    n_splits, taken = _fold_share(fraction, max(2, min(largest, n_groups)))
    folds = stratified_group_folds(labels[idx], groups[idx], n_splits, seed)
    return idx[folds < taken]


def stratified_group_folds(y: np.ndarray, groups: np.ndarray, n_splits: int,
                           seed: int) -> np.ndarray:
    """The fold (0 to n_splits - 1) of every sample: fold i holds exactly the test samples
    of the i-th split that scikit-learn's StratifiedGroupKFold(n_splits, shuffle=True,
    random_state=seed) makes, so every seed keeps the split it always gave.

    Hand-written for speed: scikit-learn (1.9.1's _iter_test_indices, matched here) scores
    every group against every fold with a std over the whole folds-by-classes table, in a
    Python loop: 23-46 s for ETHEC's 48k groups on 2 cores, 150 s at 200k. This runs the
    same greedy algorithm, re-scoring only the classes a group holds, with every float
    computed as numpy computes scikit-learn's: folds often tie (many hold as many of a class), and
    ties must break alike to the last bit. Unlike it, no "least populated class" warning:
    the split reports the classes missing from a side itself.
    """
    _, y_inv, y_cnt = np.unique(y, return_inverse=True, return_counts=True)
    _, g_inv, g_cnt = np.unique(groups, return_inverse=True, return_counts=True)
    n_classes, n_groups = len(y_cnt), len(g_cnt)
    if np.all(n_splits > y_cnt):
        raise ValueError(f"n_splits={n_splits} cannot be greater than the number of members "
                         "in each class.")
    if n_splits > n_groups:
        raise ValueError(f"Cannot have number of splits n_splits={n_splits} greater than the "
                         f"number of groups: {n_groups}.")
    # Each group's class counts, sparse: (group, class) pairs sorted by group, then class.
    pairs, pair_counts = np.unique(g_inv.astype(np.int64) * n_classes + y_inv,
                                   return_counts=True)
    pair_group, pair_class = np.divmod(pairs, n_classes)
    pair_counts = pair_counts.astype(float)
    perm = np.arange(n_groups)
    check_random_state(seed).shuffle(perm)
    spread = _group_spread(pair_group, pair_class, pair_counts, n_groups, n_classes)
    # Groups with the most uneven class counts first; shuffled order among equals.
    order = perm[np.argsort(-spread[perm], kind="stable")]
    fold_of_group = _assign_groups(order, np.searchsorted(pair_group, np.arange(n_groups + 1)),
                                   pair_class, pair_counts, y_cnt, g_cnt, n_splits)
    return fold_of_group[g_inv]


def _assign_groups(order: np.ndarray, starts: np.ndarray, pair_class: np.ndarray,
                   pair_counts: np.ndarray, y_cnt: np.ndarray, g_cnt: np.ndarray,
                   n_splits: int) -> np.ndarray:
    """Each group in turn to the fold scikit-learn's _find_best_fold picks: the lowest mean
    over classes of the std over folds of (class count in fold / class count)."""
    n_classes = len(y_cnt)
    pair_totals = y_cnt[pair_class]
    bounds, class_of, sizes_of = starts.tolist(), pair_class.tolist(), g_cnt.tolist()
    fold_counts = np.zeros((n_splits, n_classes))
    fold_shares = np.zeros((n_splits, n_classes))  # fold counts / class counts
    # scores[i, c]: std over folds of class c's share, were the group put in fold i. Only
    # the group's classes differ from one fold to the next (or from the folds as they are).
    scores = np.zeros((n_splits, n_classes))
    fold_sizes = [0] * n_splits
    fold_of_group = np.empty(len(sizes_of), dtype=np.int64)
    diagonal = np.eye(n_splits, dtype=bool)[:, :, None]
    for g in order.tolist():
        first, last = bounds[g], bounds[g + 1]
        counts, totals = pair_counts[first:last], pair_totals[first:last]
        # The group's classes: a slice (a view, much faster) for the usual one class.
        classes = (slice(class_of[first], class_of[first] + 1) if last - first == 1
                   else pair_class[first:last])
        # shares[i]: the folds' shares of these classes with the group put in fold i.
        shares = np.where(diagonal, (fold_counts[:, classes] + counts) / totals,
                          fold_shares[:, classes])
        stds = _std_over_folds(shares, n_classes == 1)
        scores[:, classes] = stds
        best = _first_best((np.add.reduce(scores, axis=1) / n_classes).tolist(), fold_sizes)
        scores[:, classes] = stds[best]
        fold_counts[best, classes] += counts
        fold_shares[best, classes] = shares[best, best]
        fold_sizes[best] += sizes_of[g]
        fold_of_group[g] = best
    return fold_of_group


def _group_spread(pair_group: np.ndarray, pair_class: np.ndarray, pair_counts: np.ndarray,
                  n_groups: int, n_classes: int) -> np.ndarray:
    """np.std of each group's dense row of class counts, as scikit-learn computes it (the
    sum's rounding depends on where the counts sit in the row), a block of rows at a time
    so the groups-by-classes table is never whole in memory."""
    spread = np.empty(n_groups)
    rows = max(1, 2**22 // n_classes)
    for first in range(0, n_groups, rows):
        last = min(first + rows, n_groups)
        span = slice(*np.searchsorted(pair_group, [first, last]))
        dense = np.zeros((last - first, n_classes))
        dense[pair_group[span] - first, pair_class[span]] = pair_counts[span]
        spread[first:last] = np.std(dense, axis=1)
    return spread


def _std_over_folds(shares: np.ndarray, one_class: bool) -> np.ndarray:
    """np.std over axis 1 of (candidates, folds, classes), with numpy's rounding for
    scikit-learn's (folds, classes) table: its axis-0 sum adds fold after fold, except with
    one class, where numpy sums the folds pairwise (which np.std here does too)."""
    if one_class:
        return np.std(shares, axis=1)
    n = shares.shape[1]
    mean = np.add.accumulate(shares, axis=1)[:, -1:] / n
    deviation = np.square(shares - mean)
    return np.sqrt(np.add.accumulate(deviation, axis=1)[:, -1] / n)


def _first_best(scores: list[float], sizes: list[int]) -> int:
    """scikit-learn's choice of fold, in its order: a fold beats the best so far with a lower
    score, or with one np.isclose to it (default tolerances) and fewer samples."""
    best, low, low_size = 0, scores[0], sizes[0]
    for fold in range(1, len(scores)):
        score, size = scores[fold], sizes[fold]
        if score < low or (size < low_size and abs(score - low) <= 1e-08 + 1e-05 * abs(low)):
            best, low, low_size = fold, score, size
    return best


def _fold_share(fraction: float, most: int) -> tuple[int, int]:
    """(folds, folds taken) whose share is nearest `fraction`, with at most `most` folds
    (or 1 / fraction, for a small fraction; 1 / (1 - fraction) for a large one). One fold
    of round(1 / fraction) gave 0.5 for 0.4 and for 0.7 (a val of 0.5 after a test of 0.3
    took a third): several folds of a few are taken where one is far off. The fewest folds
    win a tie, so the usual fractions (0.15, 0.2, 0.25) are one fold, as before."""
    limit = min(most, max(10, round(1 / min(fraction, 1 - fraction))))
    options = [(abs(round(fraction * k) / k - fraction), k, round(fraction * k))
               for k in range(2, limit + 1) if 0 < round(fraction * k) < k]
    if not options:  # a share under 1 / limit, or over 1 - 1 / limit: the nearest there is
        return limit, 1 if fraction < 0.5 else limit - 1
    _, k, m = min(options)
    return k, m


def write_splits(dataset: Dataset, path: str | os.PathLike, relative: bool = True) -> None:
    """Write `splits.csv` (path,label,split,group,<levels>), paths relative to the file
    (a split kept beside its data moves with it) or absolute (a run's record of its data,
    which keeps working wherever the run folder is moved). To a temporary path of
    atomic_paths, as both callers give (with one of its own too, a kill left its
    "..splits.PID.tmp.PID.tmp.csv" that nothing removed)."""
    table = dataset.table.copy()
    base = os.path.dirname(os.path.abspath(path))

    def where(p: str) -> str:
        return os.path.relpath(p, base) if relative else os.path.abspath(p)

    # A group that is a file's path (a file alone, or identical copies merged into the
    # first one's group): "" for a file alone, read back as the file itself; for copies a
    # key spelled like the paths (relative: it moves with the data), shared by them all.
    own = (table[GROUP] == table["path"]) & ~table[GROUP].duplicated(keep=False)
    shared_file = table[GROUP].isin(set(table["path"])) & ~own
    table[GROUP] = [("" if alone else f"{SAME_FILE}{where(g)}" if copies else g)
                    for g, alone, copies in zip(table[GROUP], own, shared_file, strict=True)]
    table["path"] = [where(p) for p in table["path"]]
    if odd := next((p for p in table["path"] if not is_utf8(p)), None):
        # (the readers leave out such names within the data; this is the data's own place,
        # which splits.csv, UTF-8 text, cannot name: a traceback once the split was made)
        raise WingspanError(f"The data's folder is named in bytes that are not UTF-8 text "
                            f"({shown_utf8(odd)}), which splits.csv cannot hold.",
                            hint="Rename that folder (`convmv -f cp1252 -t utf-8 -r FOLDER` "
                                 "shows the UTF-8 name), or move the data to a folder with "
                                 "a UTF-8 name.")
    finest = dataset.default_level
    table["label"] = table[finest]  # the CSV reader's finest level; other levels keep names
    coarser = [lv for lv in dataset.levels if lv != "label"]
    frame_to_csv(table[["path", "label", SPLIT, GROUP, *coarser]], path)


def leaked_groups(table: pd.DataFrame) -> list[str]:
    """Groups found in more than one split (should be none after `split_dataset`)."""
    sides = table[table[SPLIT] != ""].groupby(GROUP)[SPLIT].nunique()
    return sides[sides > 1].index.tolist()


@dataclass
class SplitResult:
    level: str
    dataset: Dataset
    report: SplitReport
    undersampled: dict[str, int]
    oversampled: dict[str, int]
    class_weights: dict[str, float]  # capped as train caps them by default
    splits_csv: Path
    sampling_json: Path
    capped: list[str] = field(default_factory=list)  # the classes whose weight was capped


def _check_oversample_to(dataset: Dataset, level: str, target: int) -> None:
    """Oversampling evens rare classes up to the common ones: above the largest class it
    repeats every class, and a slip of a few zeros wrote (slowly) a splits.csv of
    classes x N rows."""
    largest = int(dataset.table.loc[dataset.table[SPLIT] == "train", level]
                  .value_counts().max())
    if target > largest:
        raise WingspanError(f"--oversample-to {target} is above the largest class's "
                            f"{largest} training images: every class would be repeated.",
                            hint=f"Use at most {largest}: the classes below it are repeated "
                                 "up to it.")


def split_and_sample(dataset: Dataset, out_dir: Path, level: str | None = None,
                     config: SplitConfig | None = None) -> SplitResult:
    """Split, then cap / oversample the training classes; write splits.csv and sampling.json.

    The CSV is the dataset to train on: images left out by the cap are not in it (they
    are listed in sampling.json) and oversampled images appear more than once.
    """
    from wingspan.data.sampling import (
        capped_classes,
        class_weights,
        oversample,
        undersample,
    )

    config = config or SplitConfig()
    level = dataset.resolve_level(level)
    result, report = split_dataset(dataset, level, config)
    left_out: list[str] = []
    undersampled: dict[str, int] = {}
    oversampled: dict[str, int] = {}
    if config.max_per_class:
        before = set(result.table["path"])
        result, undersampled = undersample(result, level, config.max_per_class, config.seed)
        left_out = sorted(before - set(result.table["path"]))
    if config.oversample_to:
        _check_oversample_to(result, level, config.oversample_to)
        result, oversampled = oversample(result, level, config.oversample_to, config.seed)
    train_labels = result.table.loc[result.table[SPLIT] == "train", level]
    # As train weighs them by default (so the figures agree), and uncapped beside them.
    cap = TrainConfig.max_class_weight
    weights, uncapped = class_weights(train_labels, cap), class_weights(train_labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits_csv, sampling_json = out_dir / "splits.csv", out_dir / "sampling.json"
    remove_dead_leftovers(splits_csv, sampling_json)  # (a SIGTERM's)
    # Replaced together: a kill between them left a new split beside the old class weights.
    with atomic_paths(splits_csv, sampling_json) as (splits_tmp, sampling_tmp):
        write_splits(result, splits_tmp)
        sampling_tmp.write_text(json.dumps({
            "level": level, "config": asdict(config), "sizes": report.sizes,
            "train_counts": train_labels.value_counts().to_dict(),
            "class_weights": weights, "class_weight_cap": cap,
            "class_weights_uncapped": uncapped, "train_only_classes": report.train_only,
            "missing_classes": report.missing, "undersampled": undersampled,
            "left_out_by_cap": left_out, "oversampled": oversampled,
        }, indent=2))
    return SplitResult(level, result, report, undersampled, oversampled, weights, splits_csv,
                       sampling_json, capped_classes(train_labels, cap))
