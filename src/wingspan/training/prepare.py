"""From a dataset to what training needs: splits, classes, weights, image pipelines."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from wingspan.config import (
    AugmentConfig,
    ReadConfig,
    SplitConfig,
    TrainConfig,
    default_cache_dir,
)
from wingspan.data import read_dataset
from wingspan.data.leaks import find_leaks, repair_leaks
from wingspan.data.samples import GROUP, PATH, SPLIT, Dataset, renamed, split_by
from wingspan.data.sampling import capped_classes, undersample
from wingspan.data.split import SplitReport, split_dataset
from wingspan.data.taxonomy import TAXONOMY_FILE, Taxonomy
from wingspan.data.transforms import eval_transform, train_transform
from wingspan.errors import WingspanError, counted, some
from wingspan.files import real_paths
from wingspan.models.classifier import Preprocessing
from wingspan.models.weights import run_of_weights
from wingspan.training.context import TrainData
from wingspan.training.data import LabelledImages
from wingspan.training.decode_cache import DecodeCache
from wingspan.training.folder import SPLITS_FILE


def ensure_splits(dataset: Dataset, level: str, config: TrainConfig,
                  log=print) -> Dataset:
    """Use the dataset's own train/val split; make one (grouped, stratified) when it has
    none, or carve val out of train when only val is missing."""
    table = dataset.table
    if not dataset.has_splits:
        log(f"The data has no split: splitting it {split_by(table)}, stratified by "
            f"'{level}' (val {config.val_fraction}, test {config.test_fraction})")
        split, report = split_dataset(dataset, level, SplitConfig(
            config.val_fraction, config.test_fraction, config.seed))
        if _keep_source_runs_images_out_of_test(split, config, log):
            report.recount(split.table, level,
                           [s for s in ("test", "val") if getattr(config, f"{s}_fraction")])
        _say_split_made(report, config, log)
        if report.train_only:
            log(f"{counted(len(report.train_only), 'class has', 'classes have')} too few "
                "groups to appear on every side; kept in train only (not evaluated): "
                + ", ".join(f"{c} ({n})" for c, n in list(report.train_only.items())[:5]))
        if report.repeats_dropped:
            log(f"{counted(report.repeats_dropped, 'image')} listed on more than one side: one "
                "row each now")
        if report.duplicates_grouped:
            log(f"{counted(report.duplicates_grouped, 'group holds', 'groups hold')} a picture "
                "that another group also holds (the same file saved twice): each such pair is "
                "kept on one side")
        if report.mixed_labels:
            log(report.mixed_labels_said(level))
        return split
    # Images whose split is left blank (a CSV that marks only its test images, say) are
    # not set aside: they train (and val is carved from them as below, when the data has
    # none). Before the leak check: they must share no group with val or test. Those a
    # folder's splits.csv does not list (added since it was written) or lists on two
    # sides are the reader's findings, and stay out.
    findings = {p.path for p in dataset.problems
                if p.kind in ("not_in_splits", "conflicting_splits")}
    blank = table[SPLIT] == ""
    unlisted = blank & table[PATH].isin(findings)
    if unlisted.any():
        log(f"{counted(int(unlisted.sum()), 'image has', 'images have')} no split (see "
            "`wingspan data inspect`) and will not be used")
        dataset, table, blank = (dataset.subset((~unlisted).to_numpy()),
                                 table[~unlisted], blank[~unlisted])
    if blank.any():
        log(f"{counted(int(blank.sum()), 'image has', 'images have')} a blank split in the "
            "data: trained on, with its train images (its val and test images stay apart)")
        dataset = dataset.with_table(dataset.table.assign(
            **{SPLIT: renamed(dataset.table[SPLIT], {"": "train"})}))
    dataset = _check_leaks(dataset, level, config, log)
    splits = set(dataset.table[SPLIT])
    if "val" not in splits and "test" not in splits and config.test_fraction:
        log(f"The data's split has train only: taking {config.val_fraction:.0%} of it for val "
            f"and {config.test_fraction:.0%} for test, {split_by(dataset.table)}, and "
            "stratified")
        return _carve_val(dataset, level, config, test=True)
    if "val" not in splits:
        log(f"The data has no val split: taking {config.val_fraction:.0%} of train for it")
        # (with no test split either, test_fraction is 0 here: kept, as asked)
        _unused(config, ["test_fraction"] if "test" in splits else [], log)
        return _carve_val(dataset, level, config)
    if "test" not in splits and config.selection == "holdout":
        log(f"The data's own val split is kept apart as the test split, for a score that no "
            f"choice was made on; epochs are chosen on {config.val_fraction:.0%} of train, "
            "carved out as val (--selection val chooses on the data's val instead)")
        _unused(config, ["test_fraction"], log)
        table = dataset.table.assign(**{SPLIT: renamed(dataset.table[SPLIT], {"val": "test"})})
        return _carve_val(dataset.with_table(table), level, config)
    _unused(config, ["val_fraction", "test_fraction"], log)
    return dataset


def _unused(config: TrainConfig, names: list[str], log) -> None:
    """Says the fractions set away from their defaults that the data's own split leaves
    unused (the run's config.yaml keeps them as given)."""
    given = [n for n in names
             if getattr(config, n) != TrainConfig.__dataclass_fields__[n].default]
    if given:
        typed = (" and ".join(f"--{n.replace('_', '-')} {getattr(config, n):g}" for n in given)
                 + f" ({', '.join(given)} in Python)")
        keywords = ", ".join(f"{n.split('_')[0]}={getattr(config, n):g}" for n in given)
        log(f"Warning: {typed} left unused: the data has a split of its own "
            f"(`wingspan data split DATA` makes a new one with them; in Python "
            f"data.split({keywords}))")


def _carve_val(dataset: Dataset, level: str, config: TrainConfig, test: bool = False
               ) -> Dataset:
    """val_fraction of train (and test_fraction, with `test`), by group and stratified,
    becomes the val split (and the test split)."""
    train = dataset.subset((dataset.table[SPLIT] == "train").to_numpy())
    carved = split_dataset(train, level, SplitConfig(
        config.val_fraction, config.test_fraction if test else 0.0, config.seed))[0]
    rest = dataset.table[dataset.table[SPLIT] != "train"]
    return dataset.with_table(pd.concat([carved.table, rest], ignore_index=True))


def _check_leaks(dataset: Dataset, level: str, config: TrainConfig, log) -> Dataset:
    """Given splits must not share a group, a file or a picture between sides: ETHEC's
    published splits are repaired (they list 51 images in both val and test), others are
    refused unless `allow_leaky_splits`."""
    leaks = find_leaks(dataset)
    if not leaks:
        return dataset
    if dataset.format == "ethec":
        repaired, dropped = repair_leaks(dataset, leaks)
        log(f"The ETHEC splits leak: {leaks.describe()}. Repaired: "
            f"{counted(dropped, 'record')} dropped, each leaked image kept on one side only "
            "(train, else test, else val)")
        # A rare class whose one specimen the published files put in val and test both has
        # no val image left (33 species in ETHEC's): said here, as the repair's doing.
        def in_val(d: Dataset) -> set[str]:
            return set(d.table.loc[d.table[SPLIT] == "val", level])

        emptied = sorted(in_val(dataset) - in_val(repaired))
        if emptied:
            log(f"{counted(len(emptied), f'{level} class', f'{level} classes')} lost every val "
                "image to the repair (each class's val specimens were on another side too, "
                f"and are kept there): {some(emptied)}")
        return repaired
    if config.allow_leaky_splits:
        log(f"WARNING: the given splits leak ({leaks.describe()}); training on them anyway "
            "(--allow-leaky-splits): validation scores will be optimistic")
        return dataset
    raise WingspanError(
        f"The data's own splits leak between training and evaluation: {leaks.describe()}.",
        hint="Re-split with `wingspan data split` (which keeps groups and identical files "
        "together), fix the split column, or pass --allow-leaky-splits.")


def check_classes(table: pd.DataFrame, level: str) -> list[str]:
    """The classes to learn: those with training images. A class seen only in val or test
    cannot be learned; refuse rather than report a meaningless score."""
    train = set(table.loc[table[SPLIT] == "train", level])
    if not train:  # e.g. ETHEC without its train.json, or a CSV marking only val and test
        sides = table[SPLIT].replace("", "none").value_counts()
        raise WingspanError(
            "The training split is empty: the data's own split puts its images in "
            + ", ".join(f"{k} ({v})" for k, v in sides.items()) + ".",
            hint="Give the data its training images (ETHEC: train.json beside val.json and "
            "test.json), or mark some rows train, or leave the split column blank to have "
            "one made.")
    absent = sorted(set(table[level]) - train)
    if absent:
        where = table[table[level].isin(absent)].groupby(level)[SPLIT].agg(
            lambda s: "/".join(sorted(set(s))))
        raise WingspanError(
            f"{counted(len(absent), f'{level!r} class')} "
            f"{'has' if len(absent) == 1 else 'have'} no training images: "
            + some([f"{c} (only in {where[c]})" for c in absent]),
            hint="Re-split with `wingspan data split` (rare classes go to train), or remove "
            "them from the data.")
    return sorted(train)


@dataclass
class LabelPlan:
    """Which rows train, at which levels, with which classes."""

    table: pd.DataFrame  # train and val rows, labels possibly rewritten for rare classes
    levels: list[str]  # coarse to fine; the last is what the model predicts
    classes: dict[str, list[str]]
    taxonomy: Taxonomy | None  # when several levels are trained
    rare: dict[str, str]  # rare finest class -> the class it trains as
    test_images: int = 0  # kept apart: never trained or chosen on


def _check_level_names(levels: list[str]) -> None:
    """A level's name heads predict's CSV columns (LEVEL, LEVEL_prob): one named as a
    column of its own (a taxonomy column 'answer') made two columns of that name, and
    pandas read the level's as the answer."""
    from wingspan.predict import UNKNOWN_KEYS

    taken = {"path", "error", "predicted", "probability", *UNKNOWN_KEYS,
             *(f"{lv}_prob" for lv in levels)}
    clash = next((lv for lv in levels if lv in taken or re.fullmatch(r"(class|prob)_\d+", lv)),
                 None)
    if clash:
        raise WingspanError(f"The level '{clash}' cannot be trained: its name is one of "
                            "predict's own output columns.",
                            hint=f"Rename that column (in the CSV or taxonomy.csv), e.g. "
                                 f"{clash}_level.")


def capped(dataset: Dataset, finest: str, config: TrainConfig, log=print) -> Dataset:
    """The training split with at most `--max-per-class` images of each class, at random:
    done before the run's splits.csv is written, so that it lists only the images trained
    on (as `data split`'s does), and evaluate, adapt and calibrate do not take those left
    out for trained on."""
    if not config.max_per_class:
        return dataset
    dataset, dropped = undersample(dataset, finest, config.max_per_class, config.seed)
    if dropped:
        log(f"Undersampled train to {config.max_per_class} per class: left out "
            f"{counted(sum(dropped.values()), 'image')} of "
            f"{counted(len(dropped), 'class', 'classes')}")
    return dataset


def plan_labels(dataset: Dataset, levels: list[str], config: TrainConfig, log=print
                ) -> LabelPlan:
    finest = levels[-1]
    dotted = [lv for lv in levels if "." in lv or not lv]  # (torch's module names: a head
    if dotted:                                              # per level, keyed by its name)
        raise WingspanError(f"The level '{dotted[0]}' cannot be trained: a level's name may "
                            "not hold a '.' (nor be empty).",
                            hint="Rename that column (in the CSV or taxonomy.csv), e.g. "
                                 f"{dotted[0].replace('.', '_') or 'level'}.")
    _check_level_names(levels)
    dataset = capped(dataset, finest, config, log)  # (done already, but in older runs)
    check_classes(dataset.table[dataset.table[SPLIT] != ""], finest)  # none only in val/test
    table = dataset.table[dataset.table[SPLIT].isin(["train", "val"])].copy()
    empty = (table[levels] == "").any(axis=1)
    if empty.any():
        lack = counted(int(empty.sum()), "train or val image lacks", "train and val images lack")
        row = table[empty].iloc[0]
        gap = next(lv for lv in levels if row[lv] == "")
        # The curator's usual slip: one row's genus left blank that the species' other
        # rows give.
        given = table.loc[(table[finest] == row[finest]) & (table[gap] != ""), gap]
        known = f"; other rows of {finest} '{row[finest]}' give '{given.iloc[0]}'" \
            if row[finest] and len(given) else ""
        where = (f"the level columns of {dataset.root.name} (or {TAXONOMY_FILE} beside it)"
                 if dataset.format == "csv" else TAXONOMY_FILE)
        raise WingspanError(f"{lack} a label at one of the levels {levels}, e.g. "
                            f"{row['path']} (no {gap}{known})",
                            hint=f"Fill in the missing levels in {where}, or train fewer "
                            "levels.")
    rare: dict[str, str] = {}
    if config.rare_below and len(levels) > 1:
        counts = table.loc[table[SPLIT] == "train", finest].value_counts()
        parent = table.drop_duplicates(finest).set_index(finest)[levels[-2]]
        rare = {c: f"{parent[c]} (rare {finest})" for c in counts[counts < config.rare_below].index}
        if rare:
            table[finest] = renamed(table[finest], rare)
            log(f"{counted(len(rare), f'{finest} class has', f'{finest} classes have')} fewer "
                f"than {counted(config.rare_below, 'training image')}: "
                + ("it trains as its" if len(rare) == 1 else "they train as their")
                + f" {levels[-2]} only")
        if len(rare) == len(counts):  # the run would learn no finest class at all
            log(f"Warning: that is every '{finest}' class: none is learnt as such, and the "
                f"finest answer is a {levels[-2]}. A lower --rare-below keeps the commoner "
                f"ones (the commonest has {counts.max()} training images).")
    if len(levels) > 1:  # the test rows too: they would be scored against the tree
        labelled = dataset.table[dataset.table[SPLIT] != ""]
        Taxonomy.from_table(labelled[~(labelled[levels] == "").any(axis=1)], levels)
    taxonomy = Taxonomy.from_table(table, levels) if len(levels) > 1 else None
    classes = {lv: check_classes(table, lv) for lv in levels}
    if len(classes[finest]) < 2:  # a softmax over one class says 1.0 whatever it sees
        # One folder around the class folders (photos/Butterflies/<species>/...) is the
        # likeliest cause: the reader noted its subfolders.
        nested = [p.path for p in dataset.problems if p.kind == "nested_classes"]
        raise WingspanError(f"The training split has one '{finest}' class only "
                            f"({classes[finest][0]}): there is nothing to tell apart.",
                            hint=f"Its images sit in subfolders: give {nested[0]} as DATA to "
                                 "learn them as the classes." if len(nested) == 1 else
                                 "Give images of at least two classes.")
    val = table[SPLIT] == "val"
    unknown = val & ~table[finest].isin(classes[finest])
    table = table[~unknown]
    if not (table[SPLIT] == "val").any():
        raise WingspanError("The validation split is empty.",
                            hint="Give --val-fraction above 0 (val is carved from train when "
                                 "the data has none): the best epoch, the temperature and the "
                                 "unknown thresholds are all chosen on it."
                            if not config.val_fraction else
                            "Give data with a val split, or more images.")
    _warn_of_classes_without_val(table, finest, classes[finest], log,
                                 coarser=levels[-2] if len(levels) > 1 and not rare else None)
    return LabelPlan(table, levels, classes, taxonomy, rare,
                     int((dataset.table[SPLIT] == "test").sum()))


def _keep_source_runs_images_out_of_test(split: Dataset, config: TrainConfig, log) -> bool:
    """A run started from another run's weights (--weights RUN, as resume's hint says to do
    when the data changed) splits the data afresh: the groups of the images that run
    trained or chose on (a photo of the same observation too) that this split put in test
    go to train, or the test split would not be unseen. Whether any moved."""
    source = run_of_weights(config.weights)
    if not source:
        return False
    try:
        theirs = read_dataset(Path(source) / SPLITS_FILE, ReadConfig(check_files=False)).table
    except WingspanError:
        return False
    seen = set(real_paths(theirs.loc[theirs[SPLIT].isin(["train", "val"]), PATH]))
    table = split.table
    test = table[SPLIT] == "test"
    known = test & pd.Series(real_paths(table[PATH]), index=table.index).isin(seen)
    moved = test & table[GROUP].isin(table.loc[known, GROUP])
    if not moved.any():
        return False
    table.loc[moved, SPLIT] = "train"
    left = int((table[SPLIT] == "test").sum())
    log(f"{counted(int(moved.sum()), 'image')} that {source} (whose weights this run starts "
        "from) trained or chose on, or of their groups, went to train, not test: "
        + (f"the test split keeps {left} of the {int(test.sum())} it was given"
           if left else "no test image is left, every one was seen by that run"))
    return True


def _say_split_made(report: SplitReport, config: TrainConfig, log) -> None:
    """The shares the split made, where they differ from those asked: a class of a few
    images gives each held-out split one image (group), so 4 images a class held out 50%
    where 30% was asked, without a word; and the classes left without a test image (those
    without a val image are said with the labels' plan)."""
    asked = config.val_fraction + config.test_fraction
    held = report.fractions.get("val", 0.0) + report.fractions.get("test", 0.0)
    if asked and held > 1.5 * asked:
        log(f"Warning: the split holds out {held:.0%} of the images, not the {asked:.0%} "
            "asked (" + ", ".join(f"{k} {n} ({report.fractions[k]:.0%})"
                                  for k, n in report.sizes.items())
            + "): classes this small give each held-out split an image of their own. "
            "--test-fraction 0 trains on more of them (val is then the only figure, and "
            "optimistic).")
    names = [c for c in report.missing.get("test", []) if c not in report.train_only]
    if names:  # (the train-only ones are said as such)
        log(f"Warning: {counted(len(names), 'class has', 'classes have')} no test image, so "
            f"no held-out figure says how they do: {some(names)}.")


def _warn_of_classes_without_val(table: pd.DataFrame, level: str, classes: list[str],
                                 log, coarser: str | None = None) -> None:
    """A class with no val image has no val figure (the epoch is chosen on the classes val
    holds: `stages.epoch_f1`): the per-class val figures would leave it out without a word.
    With a `coarser` level (and no --rare-below yet), the rare classes can be learnt there
    instead."""
    seen = set(table.loc[table[SPLIT] == "val", level])
    absent = [c for c in classes if c not in seen]
    if absent:
        names = some(absent)
        log(f"Warning: {len(absent)} of {len(classes)} '{level}' classes have no val image, "
            f"so no val figure says how they do: {names}. Give them more images (val images, "
            "where the data has its own split), or a larger --val-fraction"
            + (f"; or let {level} classes this rare be named at their {coarser} only (--rare-below "
               "N: classes with fewer than N training images)." if coarser else "."))


def weigh_classes(labels: torch.Tensor, levels: list[str], classes: dict[str, list[str]],
                  config: TrainConfig) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """Per level (a column of `labels`, of indices into its `classes`):
    balanced weights, n / (classes x count) as scikit-learn's, capped at `max_class_weight`
    times the commonest class's, and whether the loss uses them (`class_weights`).
    Training counts the images it can read (see `balance`)."""
    weights, use = {}, {}
    for i, lv in enumerate(levels):
        # (clamped: a class with nothing readable stops the run before a step, not here)
        counts = torch.bincount(labels[:, i], minlength=len(classes[lv])).double().clamp_min(1)
        balanced = len(labels) / (len(counts) * counts)
        # Uncapped, a species of 1 image among 324 weighs as 36 images, and the model names
        # it for what it is unsure of: 14 of 65 test photos (40 after a short run), test
        # accuracy 0.59 (0.26); capped at 10x, 1 (4) and 0.65 (0.62). (README, training.)
        cap = config.max_class_weight * balanced.min() if config.max_class_weight else None
        weights[lv] = balanced.clamp_max(cap).float() if cap else balanced.float()
        ratio = float(counts.max() / counts.min())
        # The weighted sampler already draws classes evenly: weighting the loss as well
        # would count a rare class's images about `ratio` times over.
        use[lv] = config.class_weights == "balanced" or (
            config.class_weights == "auto" and ratio > config.imbalance_threshold
            and config.sampler != "weighted")
    return weights, use


class Weighting(NamedTuple):
    """How training balances the classes, both parts from one count of readable images."""

    loss: dict[str, torch.Tensor | None]  # per level, the loss's class weights (None: off)
    sample: torch.Tensor | None  # per training image, the weighted sampler's (None: shuffle)


def balance(labels: torch.Tensor, readable: torch.Tensor, levels: list[str],
            classes: dict[str, list[str]], config: TrainConfig) -> Weighting:
    """The loss's class weights and the weighted sampler's image weights, counted on the
    `readable` training images (a mask over `labels`): the one place both are computed,
    at the start (every image, none known unreadable) and once images cannot be read. A
    class's unreadable files must not make it look common to the loss, nor take draws from
    the sampler that are then thrown away (an unreadable image gets weight 0)."""
    weights, use = weigh_classes(labels[readable], levels, classes, config)
    sample = (weights[levels[-1]][labels[:, -1]] * readable
              if config.sampler == "weighted" else None)
    return Weighting({lv: weights[lv] if use[lv] else None for lv in levels}, sample)


def build_train_data(plan: LabelPlan, config: TrainConfig, pre: Preprocessing,
                     log=print) -> TrainData:
    table, levels, finest = plan.table, plan.levels, plan.levels[-1]
    train, val = table[table[SPLIT] == "train"], table[table[SPLIT] == "val"]

    def label_matrix(part: pd.DataFrame) -> np.ndarray:
        return np.stack([part[lv].map({c: i for i, c in enumerate(plan.classes[lv])})
                         .to_numpy() for lv in levels], axis=1)

    labels = torch.as_tensor(label_matrix(train))
    # None is known to be unreadable yet: every image counts (stages.weighting recounts).
    weights = balance(labels, torch.ones(len(labels), dtype=torch.bool), levels,
                      plan.classes, config)
    ratio = train[finest].value_counts()
    # Every level's weights: a coarse level can be far more imbalanced than the finest.
    def capped(level: str) -> str:  # the classes whose weight the cap held down
        n = len(capped_classes(train[level], config.max_class_weight))
        return (f" ({counted(n, 'class', 'classes')} capped at {config.max_class_weight:g}x "
                "the commonest's: --max-class-weight)" if n else "")

    weighted = [(f"{lv} " if len(levels) > 1 else "")
                + f"on; weights {w.min():.2f}-{w.max():.2f}" + capped(lv)
                for lv, w in weights.loss.items() if w is not None]
    log(f"{len(train)} training and {counted(len(val), 'validation image')}; "  # train has 2+
        + "; ".join(f"{lv}: {counted(len(plan.classes[lv]), 'class', 'classes')}"
                    for lv in levels)
        + f" (imbalance {ratio.max() / ratio.min():.1f}x); class-weighted loss: "
        + (", ".join(weighted) or "off")
        + (" (the weighted sampler draws classes evenly)"
           if config.sampler == "weighted" and not weighted else ""))
    if config.sampler == "weighted" and weighted:
        log("Warning: --class-weights balanced with --sampler weighted corrects the imbalance "
            "twice (the sampler draws classes evenly, and the loss weights rare classes up "
            "again): rare classes then count far more than common ones. Use one of the two.")

    size = pre.input_size
    augment = AugmentConfig(policy=config.augment, image_size=size, eval_crop=pre.crop_pct)
    cache = DecodeCache(config.cache_dir or default_cache_dir(), round(size / pre.crop_pct),
                        pre.interpolation)
    norm = {"mean": pre.mean, "std": pre.std, "interpolation": pre.interpolation}
    clean, augmented = eval_transform(augment, **norm), train_transform(augment, **norm)

    def images(part: pd.DataFrame, transform) -> LabelledImages:
        return LabelledImages(part["path"].tolist(), label_matrix(part), transform, cache,
                              config.seed, size)

    return TrainData(
        level=finest, classes=plan.classes[finest], levels=levels, level_classes=plan.classes,
        taxonomy=plan.taxonomy, rare=plan.rare,
        train=images(train, augmented), train_clean=images(train, clean),
        val=images(val, clean),
        class_weights=weights.loss,
        level_weights=dict(zip(levels, config.level_weights or [1.0] * len(levels),
                               strict=True)),
        sample_weights=weights.sample,
        test_images=plan.test_images,
    )
