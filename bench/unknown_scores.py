"""Unknown scores that wingspan does not ship, on bench/unknown.py's held-out runs, beside
the bundle's own: GradNorm, the features' norms, ODIN, activation shaping, outlier exposure
(docs/performance.md's table of other scores).

    python bench/unknown.py DATA --pairs a,b c,d --runs-dir RUNS      # trains the runs
    python bench/unknown_scores.py RUNS/not-butterflies RUNS/held-*   # GradNorm, norms
    python bench/unknown_scores.py RUNS/not-butterflies RUNS/held-* --odin
    python bench/unknown_scores.py RUNS/not-butterflies RUNS/held-* --shaping
    python bench/unknown_scores.py RUNS/not-butterflies RUNS/held-* --outliers 'LEEDS/00[234567]*'

--shaping: energy on features shaped before the head (ASH-S, Djurisic et al. 2023: the top
p% of each image's activations kept and scaled by exp(sum / kept sum); SCALE, Xu et al.
2024: all kept and scaled so), DICE (Sun and Li 2022: the head's weights kept where their
mean contribution on the training images is in the top p%) and SHE (Zhang et al. 2023: the
features' dot product with the mean training feature of the predicted class).
--outliers GLOB: the linear head fitted again on the run's training features from the
run's own head, with outlier images (folders matched by GLOB) taught as none of the known
classes: OE (Hendrycks et al. 2019: cross-entropy to the uniform on the outliers) and MixOE
(Zhang et al. 2023: known and outlier features mixed, lambda ~ U(0, 1), with the target
mixed as lambda one-hot + (1 - lambda) uniform); then MSP.

AUROC and FPR at 95% TPR: known test images against the held-out species' images, and
AUROC against the non-butterflies. GradNorm (Huang et al. 2021), for a linear head: the L1
norm of d KL(uniform || softmax) / d W = sum_k |p_k - 1/K| * ||features||_1 (higher: known).
ODIN (Liang et al. 2018): each image moved by eps along the sign of the gradient that
raises its top probability at temperature T, then 1 - that probability, in PyTorch fp32.
"""

from __future__ import annotations

import argparse
import glob
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


def _split_paths(run: Path, split: str) -> list[str]:
    splits = pd.read_csv(run / "splits.csv")
    return splits[splits.split == split].path.tolist()


def _features(predictor: Predictor, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in predictor.run(paths, progress=False, with_features=True) if not r.error]
    return np.stack([r.features for r in rows]), np.stack([r.logits for r in rows])


def _energy(logits: np.ndarray) -> np.ndarray:
    return -torch.logsumexp(torch.from_numpy(logits).double(), 1).numpy()  # higher: unknown


def shaping_scores(predictor: Predictor, paths: list[str], train: tuple
                   ) -> dict[str, np.ndarray]:
    """ASH-S, SCALE, DICE and SHE (module docstring); `train`: the training images'
    (features, logits)."""
    layer = predictor.model.head.outputs[predictor.level]
    w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
    f, logits = (a.astype(np.float64) for a in _features(predictor, paths))
    out = {}
    for p in (65, 80, 90):
        top = f >= np.percentile(f, p, axis=1, keepdims=True)
        scale = np.exp(f.sum(1) / np.where(top, f, 0).sum(1))[:, None]
        out[f"ash-s p{p}"] = _energy((np.where(top, f, 0) * scale) @ w.T + b)
        out[f"scale p{p}"] = _energy((f * scale) @ w.T + b)
    contribution = train[0].mean(0)[None, :] * w
    for p in (50, 70, 90):
        kept = contribution >= np.percentile(contribution, p)
        out[f"dice p{p}"] = _energy(f @ (w * kept).T + b)
    answers = train[1].argmax(1)
    patterns = np.stack([train[0][answers == c].mean(0) if (answers == c).any()
                         else np.zeros(train[0].shape[1]) for c in range(len(b))])
    out["she"] = -(f * patterns[logits.argmax(1)]).sum(1)
    out["energy"] = _energy(logits)
    return out


def outlier_heads(predictor: Predictor, train: tuple, outliers: np.ndarray, seed: int = 0
                  ) -> dict[str, torch.nn.Linear]:
    """The run's head fitted again on the training features (60 epochs of AdamW, as the
    head stage's label smoothing 0.1), plain, with OE and with MixOE (module docstring)."""
    layer = predictor.model.head.outputs[predictor.level]
    x, y = torch.from_numpy(train[0]).float(), torch.from_numpy(train[1].argmax(1))
    o, k = torch.from_numpy(outliers).float(), layer.out_features
    heads = {}
    for name in ("plain", "oe", "mixoe"):
        g = torch.Generator().manual_seed(seed)
        head = torch.nn.Linear(layer.in_features, k)
        head.load_state_dict(layer.state_dict())
        opt = torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=1e-4)
        for _ in range(60):
            for idx in torch.randperm(len(y), generator=g).split(32):
                t = torch.nn.functional.one_hot(y[idx], k).float()
                loss = torch.nn.functional.cross_entropy(head(x[idx]), t, label_smoothing=0.1)
                out = o[torch.randint(len(o), (len(idx),), generator=g)]
                if name == "oe":
                    loss = loss - 0.5 * torch.log_softmax(head(out), 1).mean()
                elif name == "mixoe":
                    lam = torch.rand(len(idx), 1, generator=g)
                    mixed = head(lam * x[idx] + (1 - lam) * out)
                    target = lam * t + (1 - lam) / k
                    loss = loss - 0.5 * (target * torch.log_softmax(mixed, 1)).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        heads[name] = head.eval()
    return heads


def outlier_scores(predictor: Predictor, paths: list[str], heads: dict) -> dict[str, np.ndarray]:
    f = torch.from_numpy(_features(predictor, paths)[0]).float()
    with torch.no_grad():
        return {f"msp, head {name}": -torch.softmax(head(f), 1).max(1).values.numpy()
                for name, head in heads.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("others", type=Path, help="bench/unknown.py's not-butterflies folder")
    parser.add_argument("runs", type=Path, nargs="+")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--odin", action="store_true", help="ODIN (a backward pass an image)")
    kind.add_argument("--shaping", action="store_true", help="ASH-S, SCALE, DICE, SHE")
    kind.add_argument("--outliers", help="a glob of folders of outlier images: OE, MixOE")
    args = parser.parse_args()
    for run in args.runs:
        predictor = Predictor(run / "model", runtime="torch", precision="fp32")
        score = odin_scores if args.odin else feature_scores
        if args.shaping or args.outliers:
            train = _features(predictor, _split_paths(run, "train"))
            if args.shaping:
                def score(p, paths, train=train):
                    return shaping_scores(p, paths, train)
            else:
                outliers = [str(f) for d in sorted(glob.glob(args.outliers))
                            for f in sorted(Path(d).iterdir())]
                heads = outlier_heads(predictor, train, _features(predictor, outliers)[0])

                def score(p, paths, heads=heads):
                    return outlier_scores(p, paths, heads)
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
