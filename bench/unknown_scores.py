"""Unknown scores that wingspan does not ship, on bench/unknown.py's held-out runs, beside
the bundle's own: GradNorm, the features' norms, ODIN (the README's table of other scores).

    python bench/unknown.py DATA --pairs a,b c,d --runs-dir RUNS      # trains the runs
    python bench/unknown_scores.py RUNS/not-butterflies RUNS/held-*   # GradNorm, norms
    python bench/unknown_scores.py RUNS/not-butterflies RUNS/held-* --odin

AUROC and FPR at 95% TPR: known test images against the held-out species' images, and
AUROC against the non-butterflies. GradNorm (Huang et al. 2021), for a linear head: the L1
norm of d KL(uniform || softmax) / d W = sum_k |p_k - 1/K| * ||features||_1 (higher: known).
ODIN (Liang et al. 2018): each image moved by eps along the sign of the gradient that
raises its top probability at temperature T, then 1 - that probability, in PyTorch fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.metrics import roc_auc_score

from wingspan.data import read_dataset
from wingspan.inference import Predictor, _Images

ODIN_T, ODIN_EPS = (1.0, 10.0, 1000.0), (0.0, 0.0005, 0.001, 0.002, 0.004)


def image_sets(run: Path, others: Path) -> dict[str, list[str]]:
    """test (known), unseen (the held-out species) and others (no butterfly)."""
    config = run / "config.yaml"
    held = yaml.safe_load(config.read_text())["holdout_classes"]
    data = config.read_text().splitlines()[0].split("Trained on ")[1].split(", read with")[0]
    table = read_dataset(data).table
    splits = pd.read_csv(run / "splits.csv")
    return {"test": splits[splits.split == "test"].path.tolist(),
            "unseen": table[table.label.isin(held)].path.tolist(),
            "others": sorted(str(p) for p in others.iterdir())}


def feature_scores(predictor: Predictor, paths: list[str]) -> dict[str, np.ndarray]:
    """The bundle's own scores and the candidates (higher: less known)."""
    rows = [r for r in predictor.run(paths, progress=False, every_score=True,
                                     with_features=True) if not r.error]
    feats, logits = np.stack([r.features for r in rows]), np.stack([r.logits for r in rows])
    p = torch.softmax(torch.from_numpy(logits), 1).numpy()
    l1 = np.abs(feats).sum(1)
    return {**{k: np.array([r.every_score[k] for r in rows]) for k in rows[0].every_score},
            "gradnorm": -(np.abs(p - 1 / p.shape[1]).sum(1) * l1), "feature_l1": -l1,
            "feature_l2": -np.linalg.norm(feats, axis=1)}


def odin_scores(predictor: Predictor, paths: list[str]) -> dict[str, np.ndarray]:
    model = predictor.model.float().eval().requires_grad_(False)
    images = _Images(paths, predictor.views(False), predictor.size, predictor.draft)
    out: dict[str, list] = {f"odin T{t:g} eps{e:g}": [] for t in ODIN_T for e in ODIN_EPS}
    for start in range(0, len(images), 16):
        items = [images[i] for i in range(start, min(start + 16, len(images)))]
        x = torch.stack([views[0] for views, error in items if not error])
        for t in ODIN_T:
            moving = x.clone().requires_grad_(True)
            logits = model(moving)[predictor.level]
            (-torch.log_softmax(logits / t, 1).max(1).values.sum()).backward()
            with torch.no_grad():
                for e in ODIN_EPS:
                    moved = model(x - e * moving.grad.sign())[predictor.level]
                    out[f"odin T{t:g} eps{e:g}"].append(
                        -torch.softmax(moved / t, 1).max(1).values.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("others", type=Path, help="bench/unknown.py's not-butterflies folder")
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--odin", action="store_true", help="ODIN (a backward pass an image)")
    args = parser.parse_args()
    for run in args.runs:
        predictor = Predictor(run / "model", runtime="torch", precision="fp32")
        score = odin_scores if args.odin else feature_scores
        sets = {k: score(predictor, v) for k, v in image_sets(run, args.others).items()}
        print(run.name)
        for name, known in sets["test"].items():
            unseen, others = sets["unseen"][name], sets["others"][name]
            auroc = roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(unseen))],
                                  np.r_[known, unseen])
            far = roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(others))],
                                np.r_[known, others])
            fpr95 = float((unseen <= np.quantile(known, 0.95)).mean())
            print(f"  {name:24} AUROC {auroc:.3f}  FPR95 {fpr95:.2f}  "
                  f"non-butterflies AUROC {far:.3f}", flush=True)


if __name__ == "__main__":
    main()
