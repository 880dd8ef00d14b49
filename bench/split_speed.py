"""How long the grouped, stratified split takes: scikit-learn's StratifiedGroupKFold beside
wingspan's exact re-implementation of it (src/wingspan/data/split.py), on ETHEC's shape.

    python bench/split_speed.py                                 # 48k images, 48k groups
    python bench/split_speed.py --rows 200000 --groups 200000
    python bench/split_speed.py --rows 500000 --skip-sklearn

Species sizes are as uneven as ETHEC's (Dirichlet 0.5 over 500 species); with fewer groups
than rows, a group is a run of images of one species, as photos of one specimen are. Both
make the folds of the default test split (7); the script checks they are the same, sample
for sample, and prints both times and their ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from wingspan.data.split import stratified_group_folds
from wingspan.models.engine import cpu_name


def dataset(rows: int, groups: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    species = rng.choice(classes, rows, p=rng.dirichlet(np.full(classes, 0.5)))
    group = np.empty(rows, dtype=np.int64)
    group[np.argsort(species, kind="stable")] = np.arange(rows) * groups // rows
    return (np.array([f"species{s}" for s in species], dtype=object),
            np.array([f"/images/{g}.jpg" for g in group], dtype=object))


def sklearn_folds(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    folds = np.full(len(y), -1)
    splitter = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The least populated class ..."
        for fold, (_, test) in enumerate(splitter.split(y, y, groups)):
            folds[test] = fold
    return folds


def timed(fn, *args) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48_000)
    parser.add_argument("--groups", type=int, help="default: one per row")
    parser.add_argument("--classes", type=int, default=500)
    parser.add_argument("--folds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-sklearn", action="store_true", help="time wingspan's only")
    args = parser.parse_args()
    y, groups = dataset(args.rows, args.groups or args.rows, args.classes, args.seed)
    print(f"{args.rows} rows, {len(set(groups))} groups, {len(set(y))} classes, "
          f"{args.folds} folds, on {cpu_name()} ({platform.machine()}, "
          f"{os.cpu_count()} cores)")
    ours, ours_s = timed(stratified_group_folds, y, groups, args.folds, args.seed)
    print(f"wingspan:     {ours_s:7.1f} s")
    if not args.skip_sklearn:
        theirs, theirs_s = timed(sklearn_folds, y, groups, args.folds, args.seed)
        print(f"scikit-learn: {theirs_s:7.1f} s  ({theirs_s / ours_s:.1f}x wingspan's time)")
        same = np.array_equal(ours, theirs)
        print("folds:        " + ("the same" if same else
                                  f"DIFFERENT for {(ours != theirs).sum()} samples"))
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
