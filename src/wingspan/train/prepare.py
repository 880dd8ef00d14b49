"""From a dataset to what training needs: splits, classes, weights, image pipelines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from wingspan.config import AugmentConfig, SplitConfig, TrainConfig, default_cache_dir
from wingspan.data.samples import SPLIT, Dataset
from wingspan.data.sampling import class_weights, undersample
from wingspan.data.split import split_dataset
from wingspan.data.transforms import eval_transform, train_transform
from wingspan.errors import WingspanError
from wingspan.models.classifier import Preprocessing
from wingspan.train.context import TrainData
from wingspan.train.data import LabelledImages
from wingspan.train.decode_cache import DecodeCache


def ensure_splits(dataset: Dataset, level: str, config: TrainConfig,
                  log=print) -> Dataset:
    """Use the dataset's own train/val split; make one (grouped, stratified) when it has
    none, or carve val out of train when only val is missing."""
    table = dataset.table
    if not dataset.has_splits:
        log("The data has no split: splitting it by group, stratified by "
            f"'{level}' (val {config.val_fraction}, test {config.test_fraction})")
        return split_dataset(dataset, level, SplitConfig(config.val_fraction,
                                                         config.test_fraction, config.seed))[0]
    unsplit = int((table[SPLIT] == "").sum())
    if unsplit:
        log(f"{unsplit} images have no split and are not used")
        dataset = dataset.subset((table[SPLIT] != "").to_numpy())
    if not (dataset.table[SPLIT] == "val").any():
        log(f"The data has no val split: taking {config.val_fraction:.0%} of train for it")
        train = dataset.subset((dataset.table[SPLIT] == "train").to_numpy())
        carved = split_dataset(train, level, SplitConfig(config.val_fraction, 0.0,
                                                         config.seed))[0]
        rest = dataset.table[dataset.table[SPLIT] != "train"]
        dataset = Dataset(pd.concat([carved.table, rest], ignore_index=True), dataset.levels,
                          dataset.root, dataset.format, dataset.problems)
    return dataset


def check_classes(table: pd.DataFrame, level: str) -> list[str]:
    """The classes to learn: those with training images. A class seen only in val or test
    cannot be learned; refuse rather than report a meaningless score."""
    train = set(table.loc[table[SPLIT] == "train", level])
    if not train:
        raise WingspanError("The training split is empty.")
    absent = sorted(set(table[level]) - train)
    if absent:
        where = table[table[level].isin(absent)].groupby(level)[SPLIT].agg(
            lambda s: "/".join(sorted(set(s))))
        raise WingspanError(
            "These classes have no training images: "
            + ", ".join(f"'{c}' (only in {where[c]})" for c in absent[:10]),
            hint="Re-split with `wingspan data split` (rare classes go to train), or remove "
            "them from the data.")
    return sorted(train)


def build_train_data(dataset: Dataset, level: str, config: TrainConfig,
                     pre: Preprocessing, log=print) -> TrainData:
    if config.max_per_class:
        dataset, dropped = undersample(dataset, level, config.max_per_class, config.seed)
        if dropped:
            log(f"Undersampled train to {config.max_per_class} per class: left out "
                f"{sum(dropped.values())} images of {len(dropped)} classes")
    table = dataset.table
    classes = check_classes(table, level)
    index = {c: i for i, c in enumerate(classes)}
    train = table[table[SPLIT] == "train"]
    val = table[(table[SPLIT] == "val") & table[level].isin(classes)]
    if len(val) == 0:
        raise WingspanError("The validation split is empty.",
                            hint="Give data with a val split, or more images.")
    y_train = train[level].map(index).to_numpy()
    counts = np.bincount(y_train, minlength=len(classes))
    ratio = counts.max() / counts.min()
    weights = torch.tensor([class_weights(train[level])[c] for c in classes], dtype=torch.float)
    use_weights = config.class_weights == "balanced" or (
        config.class_weights == "auto" and ratio > config.imbalance_threshold)
    log(f"{len(train)} training and {len(val)} validation images, {len(classes)} classes "
        f"(imbalance {ratio:.1f}x); class-weighted loss: {'on' if use_weights else 'off'}"
        + (f"; weights {weights.min():.2f}-{weights.max():.2f}" if use_weights else ""))

    size = pre.input_size
    augment = AugmentConfig(policy=config.augment, image_size=size, eval_crop=pre.crop_pct)
    cache = DecodeCache(config.cache_dir or default_cache_dir(), round(size / pre.crop_pct))
    norm = {"mean": pre.mean, "std": pre.std, "interpolation": pre.interpolation}
    clean, augmented = eval_transform(augment, **norm), train_transform(augment, **norm)

    def images(part: pd.DataFrame, transform) -> LabelledImages:
        return LabelledImages(part["path"].tolist(), part[level].map(index).tolist(), transform,
                              cache, config.seed)

    return TrainData(
        level=level, classes=classes,
        train=images(train, augmented), train_clean=images(train, clean),
        val=images(val, clean),
        class_weights=weights if use_weights else None,
        sample_weights=(weights[torch.as_tensor(y_train)] if config.sampler == "weighted"
                        else None),
    )
