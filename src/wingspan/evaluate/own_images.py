"""A trained run's own labelled images, as the fine-tuned backbone sees them: what refitting
a part of the model after training needs (its unknown scores in `calibrate --unknown`, its
head in `adapt`). Training has these features at hand; afterwards they are computed again
from the images that `splits.csv` lists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wingspan.config import ReadConfig
from wingspan.data import read_dataset
from wingspan.data.samples import SPLIT, renamed
from wingspan.errors import WingspanError, none_read
from wingspan.inference import Predictor, spelt_as_trained
from wingspan.models.unknown import MAX_FIT_IMAGES, fit_subset
from wingspan.training.folder import SPLITS_FILE, data_moved_hint


@dataclass
class Labelled:
    paths: list[str]  # the readable images
    features: np.ndarray  # (N, C) float32 pooled features
    labels: dict[str, np.ndarray]  # per level, each image's class index in the bundle
    unreadable: int = 0


def run_folder(predictor: Predictor, purpose: str) -> Path:
    """The run folder the predictor's bundle sits in (resolved); a clear error when the
    bundle stands alone, without the `splits.csv` that names the run's images."""
    run_dir = predictor.bundle.parent
    if not (run_dir / SPLITS_FILE).is_file():
        raise WingspanError(f"The model {predictor.bundle} is not inside a run folder (no "
                            f"splits.csv beside it): {purpose} the run's own labelled images.",
                            hint="Give the folder `wingspan train` wrote (runs/NAME).")
    return run_dir.resolve()


def trained_seed(predictor: Predictor) -> int:
    """The seed the model was trained with, as its bundle records it."""
    return int((predictor.manifest.get("training") or {}).get("seed") or 0)


def _own_table(run_dir: Path, purpose: str) -> pd.DataFrame:
    """The run's splits.csv, its images read; where none is where it says (the data moved
    since the run trained), said so with what to do: the CSV reader's "no usable images"
    blamed splits.csv and said nothing of the move."""
    try:
        return read_dataset(run_dir / SPLITS_FILE).table
    except WingspanError as e:
        listed = read_dataset(run_dir / SPLITS_FILE, ReadConfig(check_files=False)).table
        if len(listed) and not any(Path(p).exists() for p in listed["path"][:20]):
            raise WingspanError(
                f"The run's own images, which {purpose}, are not where "
                f"{run_dir / SPLITS_FILE} says (e.g. {listed['path'].iloc[0]}).",
                hint=data_moved_hint(run_dir)) from e
        raise


def own_images(predictor: Predictor, purpose: str, per_class: bool = False,
               seed: int | None = None, progress: bool = True) -> dict[str, Labelled]:
    """The run's "train" and "val" images with their features. Past MAX_FIT_IMAGES training
    images a fixed random sample is taken (with `seed`, by default the run's own: then the
    very images training fitted the unknown scores on), of equal shares per class when
    `per_class` (a rare class keeps its images: a refitted head could never name a class
    missing from its fit)."""
    run_dir = run_folder(predictor, purpose)
    seed = trained_seed(predictor) if seed is None else seed
    levels, manifest = predictor.model.levels, predictor.manifest
    table = _own_table(run_dir, purpose)
    spelt = spelt_as_trained(predictor)  # as training named them
    table = table.assign(**{lv: renamed(table[lv], spelt.get(lv, {})) for lv in levels})
    table[levels[-1]] = renamed(table[levels[-1]], predictor.rare)
    table = table[table[levels[-1]].isin(predictor.classes)]
    train, val = table[table[SPLIT] == "train"], table[table[SPLIT] == "val"]
    if train.empty or val.empty:
        raise WingspanError(f"{run_dir} has no training or no val images in splits.csv.")
    if per_class and len(train) > MAX_FIT_IMAGES:
        share = max(1, MAX_FIT_IMAGES // train[levels[-1]].nunique())
        train = train.sample(frac=1.0, random_state=seed).groupby(levels[-1]).head(share)
    elif not per_class and (keep := fit_subset(len(train), seed)) is not None:
        train = train.iloc[keep.numpy()]  # training's own draw: the same images, all read
    index = {lv: {c: i for i, c in enumerate(manifest["classes"][lv])} for lv in levels}
    for lv in levels[:-1]:  # the finest level was filtered above; a coarser one may not map
        stray = sorted(set(pd.concat([train, val])[lv].astype(str)) - set(index[lv]))
        if stray:
            raise WingspanError(
                f"{run_dir / 'splits.csv'} names {lv} classes the model does not know: "
                f"{', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''}.",
                hint="splits.csv must be the one training wrote; restore it or train again.")
    return {name: _features(predictor, part, index, progress)
            for name, part in (("train", train), ("val", val))}


def _features(predictor: Predictor, part: pd.DataFrame, index: dict[str, dict[str, int]],
              progress: bool) -> Labelled:
    preds = list(predictor.run(part["path"].tolist(), progress=progress, with_features=True))
    ok = [i for i, p in enumerate(preds) if not p.error]
    if not ok:
        raise WingspanError(none_read(len(preds), "image", of="the run's",
                                      example=f"{preds[0].path}: {preds[0].error}"),
                            hint="The data folder the run was trained on must still be there.")
    return Labelled(paths=[preds[i].path for i in ok],
                    features=np.stack([preds[i].features for i in ok]).astype(np.float32),
                    labels={lv: part[lv].map(idx).to_numpy()[ok] for lv, idx in index.items()},
                    unreadable=len(preds) - len(ok))
