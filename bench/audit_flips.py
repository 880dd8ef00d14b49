"""How well `wingspan data audit` finds label errors: flip a share of the training labels
on purpose (each to another class, at random), audit, and count how many of the flipped
images are in the audit's most suspect share (precision and recall at that cut).

    python bench/audit_flips.py ../shared/data/leeds-butterflies [--flip 0.05] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from wingspan.config import AuditConfig
from wingspan.data import read_dataset
from wingspan.data.audit import audit_dataset
from wingspan.data.samples import SPLIT


def flipped(dataset, level: str, share: float, seed: int):
    """The training split with `share` of its labels changed; and the flipped paths."""
    table = dataset.table[dataset.table[SPLIT].isin(["train", ""])].reset_index(drop=True)
    if table.empty:
        raise SystemExit("no training images")
    rng = np.random.default_rng(seed)
    classes = sorted(table[level].unique())
    picked = rng.choice(len(table), round(share * len(table)), replace=False)
    table = table.copy()
    for i in picked:
        table.loc[i, level] = rng.choice([c for c in classes if c != table.loc[i, level]])
    return dataset.with_table(table), set(table.loc[picked, "path"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--flip", type=float, default=0.05, help="share of labels flipped")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbone", default="auto")
    parser.add_argument("--level", default=None)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    dataset = read_dataset(args.data)
    level = dataset.resolve_level(args.level)
    results = []
    for seed in args.seeds:
        data, flips = flipped(dataset, level, args.flip, seed)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            result = audit_dataset(data, out, level, AuditConfig(backbone=args.backbone,
                                                                 seed=seed), progress=False)
        seconds = time.perf_counter() - start
        top = set(result.issues["path"].head(len(flips)))  # the top `flip` share
        flagged = set(result.issues.loc[result.issues["flagged"], "path"])
        row = {"seed": seed, "images": len(result.issues), "flipped": len(flips),
               "recall_at_top_share": len(top & flips) / len(flips),
               "precision_at_top_share": len(top & flips) / len(top),
               "cleanlab_flagged": len(flagged),
               "cleanlab_recall": len(flagged & flips) / len(flips),
               "cleanlab_precision": len(flagged & flips) / max(len(flagged), 1),
               # (of the labels as given, flips included: what an audit can know)
               "oof_accuracy": result.checker["accuracy"],
               "oof_balanced_accuracy": result.checker["balanced_accuracy"],
               "seconds": round(seconds, 1), "backbone": result.backbone}
        results.append(row)
        print(json.dumps(row))
    mean = {k: float(np.mean([r[k] for r in results])) for k in
            ("recall_at_top_share", "precision_at_top_share", "cleanlab_recall",
             "cleanlab_precision", "oof_accuracy")}
    print("mean over seeds:", json.dumps({k: round(v, 3) for k, v in mean.items()}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": results, "mean": mean}, f, indent=2)


if __name__ == "__main__":
    main()
