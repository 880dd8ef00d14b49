"""Recipe levers side by side (issue 15): each against the default recipe, per split seed.

    python bench/levers.py                                  # every lever, seeds 0 and 1
    python bench/levers.py --levers baseline tta res300 --seeds 0
    python bench/levers.py --targets transfer --levers camzoom
    python bench/levers.py --list                           # the levers and what each does

Two figures per seed, both on photos no run trains or chooses on:
- inat: train on inat-butterflies (default recipe + the lever), macro-F1 on its test split
  (the data's own val photos, kept apart by `--selection holdout`);
- transfer: train on leeds-butterflies (web photos cropped to the butterfly), accuracy on
  every inat-butterflies photo of the 4 species both share (monarch, red admiral, painted
  lady, cabbage white), as `wingspan evaluate RUN inat/ --split all --map ...` scores it.

A lever either trains its own runs (`wingspan train` in a subprocess, one at a time) or
changes only how a baseline run predicts. Runs live in --runs-dir as `DATA-sSEED-LEVER`
and are reused when their model exists (a symlink to an earlier run of the same recipe
counts); scores are kept in --runs-dir/levers.json, so a second call only prints. The wall
column is what the lever costs: a training lever's `wingspan train` wall seconds (iNat,
then Leeds; mean over seeds), or a prediction lever's seconds to predict its photos (236
iNat test photos, then 826 transfer photos). Wall times are upper bounds when other work
shares the cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from scipy.stats import bootstrap
from sklearn.metrics import f1_score
from torchvision.transforms import v2

from wingspan.config import AugmentConfig, shared_data_dir
from wingspan.data import read_dataset
from wingspan.data.images import open_rgb
from wingspan.data.transforms import eval_transform, interpolation_mode
from wingspan.evaluate.metrics import resampled_macro_f1
from wingspan.inference import Predictor
from wingspan.training.adapt import adapt

DATA = {"inat": "inat-butterflies", "transfer": "leeds-butterflies"}
# Leeds class -> iNat class, for the 4 species both hold.
TRANSFER_MAP = {"001-danaus_plexippus": "monarch", "009-vanessa_atalanta": "admiral",
                "010-vanessa_cardui": "painted_lady", "008-pieris_rapae": "cabbage_white"}
EMA_DECAY = 0.98  # fine-tuning has ~120 steps on iNat, ~64 on Leeds
MIXUP_ALPHA = 0.4
DROP_PATH = 0.2  # timm's rate for EfficientNet-B0/Lite-sized models trained from scratch
SAM_RHO = 0.05  # Foret et al. 2021's radius for fine-tuning and for most of their runs
CUTMIX_ALPHA, CUTMIX_PROB = 1.0, 0.5  # timm's usual alpha; half the steps, as fine-tuning is short


WISE = {"wise": 0.5, "wise75": 0.75}  # mode: the fine-tuned weights' share

@dataclass
class Lever:
    about: str
    train: dict = field(default_factory=dict)  # TrainConfig settings of its own runs
    mode: str = "plain"  # how the run predicts (see `probabilities`)
    partner: dict | None = None  # a second run whose probabilities are averaged in
    targets: tuple[str, ...] = ("inat", "transfer")
    cost: str = "train"  # what its wall column shows: train (the runs) or predict (photos)
    patch: str | None = None  # trains with a recipe change made here (see `patched`)


LEVERS = {
    "baseline": Lever("the default recipe (efficientnet_lite2 offline, 4 fine-tuning epochs, "
                      "augment standard, label smoothing 0.1)"),
    "finetune2": Lever("--epochs-finetune 2 (default 4)", {"epochs_finetune": 2}),
    "finetune8": Lever("--epochs-finetune 8", {"epochs_finetune": 8}),
    "light": Lever("--augment light", {"augment": "light"}),
    "strong": Lever("--augment strong", {"augment": "strong"}),
    "size320": Lever("--image-size 320: train and predict at 320 px (Lite2's own 260)",
                     {"image_size": 320}),
    "unfreeze4": Lever("--unfreeze 4: fine-tune 4 of the backbone's stages (Lite2's default 3)",
                       {"unfreeze": 4}),
    "unfreeze5": Lever("--unfreeze 5: fine-tune 5 of the backbone's stages (Lite2's default 3)",
                       {"unfreeze": 5}),
    "ls0": Lever("--label-smoothing 0 (default 0.1)", {"label_smoothing": 0.0}),
    "ls0.2": Lever("--label-smoothing 0.2 (default 0.1)", {"label_smoothing": 0.2}),
    "ft-lr-0.1": Lever("fine-tuning's top rate 0.1x the head's (finetune_lr_scale; the "
                       "default until 2026-12-06, now 0.3)", {"finetune_lr_scale": 0.1}),
    "ft-lr-0.3": Lever("fine-tuning's top rate 0.3x the head's (finetune_lr_scale; the default "
                       "since 2026-12-06)", {"finetune_lr_scale": 0.3}),
    "ft-lr-0.6": Lever("fine-tuning's top rate 0.6x the head's (finetune_lr_scale)",
                       {"finetune_lr_scale": 0.6}),
    "layer-decay-0.8": Lever("each earlier stage fine-tunes at 0.8x the next one's rate "
                             "(layer_decay; default 0.5)", {"layer_decay": 0.8}),
    "layer-decay-0.65": Lever("each earlier stage fine-tunes at 0.65x the next one's rate "
                              "(layer_decay; default 0.5)", {"layer_decay": 0.65}),
    "field": Lever("--augment field: half the time the photo small and off-centre on a "
                   "blurred mirror copy of itself, then the standard augmentation",
                   {"augment": "field"}),
    "wd-0.05": Lever("AdamW's weight decay 0.05 in both stages (weight_decay; default 0.01)",
                     {"weight_decay": 0.05}),
    "finetune8-ld0.8": Lever("--epochs-finetune 8 with layer_decay 0.8: the two levers that "
                             "gained most on iNat, together", {"epochs_finetune": 8,
                                                               "layer_decay": 0.8}),
    "tta": Lever("evaluate --tta: mean of 4 views (centre crop, wider crop, their mirrors)",
                 mode="tta", cost="predict"),
    "res300": Lever("predict at 300 px (trained at 260)", mode="size300", cost="predict"),
    "res340": Lever("predict at 340 px (trained at 260)", mode="size340", cost="predict"),
    "flip": Lever("predict as the mean of the evaluation view and its mirror image (--tta "
                  "without its wider crops)", mode="flip", cost="predict"),
    "wide": Lever("predict on the whole shorter side's square (no centre crop within it; "
                  "Lite2's own crop keeps 0.89 of it)", mode="wide", cost="predict"),
    "squash": Lever("predict on the whole photo, squeezed to a square (a 4:3 photo's centre "
                    "crop shows 59% of it)", mode="squash", cost="predict"),
    "squash-train": Lever("as squash, and training's clean view too (the cached features "
                          "of the head stage, val, the bundle's scores)", mode="squash",
                          patch="squash"),
    "ensemble": Lever("mean probabilities of the baseline and an efficientnet_lite0 run "
                      "(same data and seed)", partner={"backbone": "efficientnet_lite0"}),
    "swa": Lever("SWA: the mean of the weights at the end of each fine-tuning epoch (frozen "
                 "BatchNorm, so no statistics to redo); same run as ema", mode="swa",
                 patch="averages"),
    "ema": Lever(f"EMA of the weights over the fine-tuning steps (timm ModelEmaV3, decay "
                 f"{EMA_DECAY}); same run as swa", mode="ema", patch="averages"),
    "nohue": Lever("--augment standard without its hue shift (+-0.03), which is half of a data "
                   "worker's cost per image (bench/augment_cost.py)", patch="nohue"),
    "feature-mixup": Lever(f"mixup (alpha {MIXUP_ALPHA}) of cached features and their labels "
                           "in the head stage", patch="feature-mixup"),
    "last": Lever("no epoch choice: each stage keeps its last epoch (the val split is still "
                  "carved out of train, for the temperature and the unknown threshold)",
                  patch="last"),
    "alltrain": Lever("as last, and the val images are trained on as well (iNat: 1,101 "
                      "training photos instead of 943; Leeds: 665 instead of 498)",
                      patch="alltrain"),
    "camzoom": Lever("two passes: predict, box the Grad-CAM map of the predicted class "
                     "(>= 0.5 of its peak), crop that box (square, 1.6x, at least 30% of "
                     "the short side) from the full-resolution photo, predict it; the two "
                     "passes' probabilities averaged", mode="camzoom", targets=("transfer",),
                     cost="predict"),
    "camzoom-crop": Lever("as camzoom, the crop's probabilities alone", mode="camzoom-crop",
                          targets=("transfer",), cost="predict"),
    "drop-path": Lever(f"stochastic depth: timm's drop_path_rate {DROP_PATH} in the backbone's "
                       "blocks (fine-tuning runs the frozen ones in training mode too, but for "
                       "BatchNorm, so it acts there as well, and the frozen prefix shrinks)",
                       patch="drop-path"),
    "wise": Lever("WiSE-FT (Wortsman et al. 2022): the mean of the fine-tuned weights and "
                  "those the fine-tuning began from (the best head on the frozen backbone), "
                  "said to keep the fine-tuned accuracy and gain under a shift of data; same "
                  "run as wise75", mode="wise", patch="wise"),
    "wise75": Lever("as wise, 0.75 of the fine-tuned weights and 0.25 of the head stage's; "
                    "same run as wise", mode="wise75", patch="wise"),
    "sam": Lever(f"SAM (Foret et al. 2021) in fine-tuning: each step's gradient taken where "
                 f"the loss rises most within radius {SAM_RHO} of the weights (2 passes a "
                 f"step), said to help transfer and shifts of data", patch="sam"),
    "cutmix": Lever(f"CutMix (Yun et al. 2019) in fine-tuning: on {CUTMIX_PROB:.0%} of the steps "
                    f"a box of each image (area ~ Beta({CUTMIX_ALPHA}, {CUTMIX_ALPHA})) is "
                    "taken from another image of the batch, and the loss weighs both labels "
                    "by area", patch="cutmix"),
    "adapt": Lever("wingspan adapt on the photos it then names (unlabelled: self-training of "
                   "the head, 3 rounds at p >= 0.7)", mode="adapt", targets=("transfer",),
                   cost="predict"),
}


def run_name(target: str, seed: int, settings: dict, patch: str | None = None) -> str:
    tag = "-".join([*(f"{k}={v}" for k, v in sorted(settings.items())), *([patch] if patch
                                                                        else [])]) or "base"
    return f"{target}-s{seed}-{tag}"


def log(text: str) -> None:
    print(f"{datetime.now():%H:%M:%S} {text}", file=sys.stderr, flush=True)


def ensure_run(runs: Path, data_dir: Path, target: str, seed: int, settings: dict,
               patch: str | None = None) -> Path:
    """The run of the default recipe + `settings` (+ `patch`) on `target`'s training data,
    trained here (`wingspan train` in a subprocess) unless it exists."""
    run = runs / run_name(target, seed, settings, patch)
    if (run / "model" / "manifest.json").is_file():
        return run
    data = str(data_dir / DATA[target])
    # The settings go in a config file: some (finetune_lr_scale, layer_decay) have no flag.
    # The baseline has none, and trains on the defaults without one.
    runs.mkdir(parents=True, exist_ok=True)
    flags = []
    if settings:
        settings_file = runs / f"{run.name}.yaml"
        settings_file.write_text(yaml.safe_dump(settings))
        flags = ["--config", str(settings_file)]
    cmd = ([sys.executable, __file__, "--train-patched", patch, data] if patch else
           [sys.executable, "-m", "wingspan", "train", data])
    cmd += ["--runs-dir", str(runs), "--name", run.name, "--seed", str(seed), "--quiet", *flags]
    log("training: " + " ".join(cmd[1:]))
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (run / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return run


def train_seconds(run: Path) -> float:
    """`wingspan train`'s wall seconds: timed here, else the span of its log."""
    timed = run / "wall.json"
    if timed.is_file():
        return json.loads(timed.read_text())["seconds"]
    stamps = [datetime.strptime(line[:8], "%H:%M:%S")
              for line in (run / "train.log").read_text().splitlines() if line[:2].isdigit()]
    return (stamps[-1] - stamps[0]).total_seconds() % 86400


def photos(target: str, run: Path, data_dir: Path) -> tuple[list[str], list[str]]:
    """(paths, true classes in the run's own names) that `target` scores on."""
    if target == "inat":
        splits = pd.read_csv(run / "splits.csv")
        test = splits[splits.split == "test"]
        return test.path.tolist(), test.label.tolist()
    table = read_dataset(data_dir / DATA["inat"]).table
    back = {v: k for k, v in TRANSFER_MAP.items()}
    table = table[table.label.isin(back)]
    return table.path.tolist(), [back[label] for label in table.label]


def resized(predictor: Predictor, size: int) -> Predictor:
    """The same predictor at another input size (resize + centre crop as trained)."""
    predictor.size = size
    predictor.config = AugmentConfig(image_size=size, eval_crop=predictor.config.eval_crop)
    predictor.forward = predictor.policy.runner(predictor.model, size, predictor.model.levels)
    return predictor


def squash_view(size: int, mean, std, interpolation: str = "bilinear",
                normalize: bool = True) -> v2.Compose:
    """All of the photo resized to a `size` square (its aspect not kept)."""
    steps = [v2.Resize((size, size), interpolation=interpolation_mode(interpolation),
                       antialias=True), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps + ([v2.Normalize(mean, std)] if normalize else []))


def whole_photo(predictor: Predictor, how: str) -> Predictor:
    """The same predictor on more of each photo: `wide`, the centre square of the shorter
    side uncropped; `squash`, all of the photo resized to a square."""
    if how == "wide":
        predictor.config = AugmentConfig(image_size=predictor.size, eval_crop=1.0)
        return predictor
    view = squash_view(predictor.size, **predictor.norm)
    predictor.views = lambda tta: [view]
    predictor.config = AugmentConfig(image_size=predictor.size, eval_crop=1.0)  # JPEG draft
    return predictor


def batched_cam(predictor: Predictor, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """wingspan.explain.grad_cam for a batch (eval mode: images do not interact): maps
    upsampled to the input, each scaled to peak 1 (all zeros when nothing argues)."""
    model = predictor.model
    backbone = model.backbone
    with torch.enable_grad():
        x = x.clone().requires_grad_(True)
        features = backbone(x)
        features.retain_grad()
        logits = model.head(backbone.pool(features))[predictor.level]
        logits.gather(1, targets[:, None]).sum().backward()
        maps, grads = backbone.spatial(features.detach()), backbone.spatial(features.grad)
    cam = torch.relu((grads.mean((2, 3), keepdim=True) * maps).sum(1, keepdim=True))
    cam = F.interpolate(cam, tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]


def zoom_box(cam: np.ndarray, view: tuple[float, float, float], image_size: tuple[int, int],
             threshold: float = 0.5, scale: float = 1.6, least: float = 0.3
             ) -> tuple[int, int, int, int]:
    """A square box in the full photo around the map's hot region. `view` (left, top,
    side): the part of the photo the model's centre crop showed."""
    left, top, side = view
    ys, xs = np.nonzero(cam >= threshold)
    if not len(xs):  # nothing argued for the class: the centre crop itself
        return round(left), round(top), round(left + side), round(top + side)
    h, w = cam.shape
    x0, x1 = left + xs.min() / w * side, left + (xs.max() + 1) / w * side
    y0, y1 = top + ys.min() / h * side, top + (ys.max() + 1) / h * side
    width, height = image_size
    half = min(max(x1 - x0, y1 - y0, 0) * scale, min(width, height)) / 2
    half = max(half, least * min(width, height) / 2)
    cx = min(max((x0 + x1) / 2, half), width - half)
    cy = min(max((y0 + y1) / 2, half), height - half)
    return round(cx - half), round(cy - half), round(cx + half), round(cy + half)


def camzoom(predictor: Predictor, paths: list[str], batch: int = 16
            ) -> tuple[np.ndarray, np.ndarray]:
    """(first-pass, zoomed) probabilities of each photo."""
    model = predictor.model.float().eval()
    clean = eval_transform(predictor.config, **predictor.norm)
    square = eval_transform(AugmentConfig(image_size=predictor.size, eval_crop=1.0),
                            **predictor.norm)
    first, second = [], []
    for i in range(0, len(paths), batch):
        pictures = [open_rgb(p) for p in paths[i:i + batch]]
        x = torch.stack([clean(p) for p in pictures])
        with torch.inference_mode():
            logits = model(x)[predictor.level].float()
        probs = torch.softmax(logits / predictor.temperature, -1)
        cams = batched_cam(predictor, x, probs.argmax(1)).numpy()
        crops = []
        for picture, cam in zip(pictures, cams, strict=True):
            w, h = picture.size
            side = min(w, h) * predictor.config.eval_crop  # what the centre crop showed
            box = zoom_box(cam, ((w - side) / 2, (h - side) / 2, side), (w, h))
            crops.append(square(picture.crop(box)))
        with torch.inference_mode():
            zoomed = model(torch.stack(crops))[predictor.level].float()
        first.append(probs.numpy())
        second.append(torch.softmax(zoomed / predictor.temperature, -1).numpy())
    return np.concatenate(first), np.concatenate(second)


def probabilities(run: Path, mode: str, paths: list[str]) -> tuple[np.ndarray, list[str], float]:
    """(probabilities, the run's classes, seconds) of the run on `paths`, predicted as
    `mode` says; kept in the run folder."""
    keep = run / "levers" / f"{mode}-{len(paths)}.npz"
    if keep.is_file():
        saved = np.load(keep, allow_pickle=False)
        return saved["probs"], saved["classes"].tolist(), float(saved["seconds"])
    keep.parent.mkdir(exist_ok=True)
    cam = mode.startswith("camzoom")  # Grad-CAM needs gradients: torch, fp32
    # Another input size needs torch: an ONNX Runtime graph is exported at the trained one.
    torch_only = cam or mode.startswith("size")
    bundle = run / f"model-{mode}" if mode in ("swa", "ema", *WISE) else run
    adapting = 0.0
    if mode == "adapt":  # its cost: adapting (its features of every photo) and predicting
        start = time.perf_counter()
        bundle = run / "levers" / "adapted"
        adapt(run, paths, bundle, progress=False, workers=1)
        adapting = time.perf_counter() - start
    predictor = Predictor(bundle, workers=1, runtime="torch" if torch_only else "auto",
                          precision="fp32" if cam else "auto")
    start = time.perf_counter()
    if cam:  # one pass for both modes, each kept
        first, zoomed = camzoom(predictor, paths)
        seconds = time.perf_counter() - start
        for kind, p in (("camzoom", (first + zoomed) / 2), ("camzoom-crop", zoomed)):
            np.savez(run / "levers" / f"{kind}-{len(paths)}.npz", probs=p,
                     classes=np.array(predictor.classes), seconds=seconds)
        return probabilities(run, mode, paths)
    if mode.startswith("size"):
        resized(predictor, int(mode[4:]))
    if mode in ("wide", "squash"):
        whole_photo(predictor, mode)
    if mode == "flip":  # --tta's first two views
        views = predictor.views(True)[:2]
        predictor.views = lambda tta: views
    probs = np.stack([p.probs for p in predictor.run(paths, tta=mode in ("tta", "flip"),
                                                     progress=False)])
    seconds = time.perf_counter() - start + adapting
    np.savez(keep, probs=probs, classes=np.array(predictor.classes), seconds=seconds)
    return probs, predictor.classes, seconds


def figure(target: str, probs: np.ndarray, classes: list[str], truth: list[str]) -> float:
    predicted = [classes[i] for i in probs.argmax(1)]
    if target == "inat":
        return float(f1_score(truth, predicted, average="macro"))
    return float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))


def outputs(name: str, target: str, seed: int, runs: Path, data_dir: Path,
            train: bool = True) -> dict | None:
    """A lever's probabilities on `target`'s photos (trained and predicted here unless
    kept; with `train` False, None for a run that is not there), with the photos, their
    true classes and what it cost."""
    lever = LEVERS[name]
    runs_needed = [run_name(target, seed, lever.train, lever.patch),
                   *([run_name(target, seed, lever.partner)] if lever.partner else [])]
    if not train and not all((runs / r / "model" / "manifest.json").is_file()
                             for r in runs_needed):
        return None
    run = ensure_run(runs, data_dir, target, seed, lever.train, lever.patch)
    paths, truth = photos(target, run, data_dir)
    probs, classes, seconds = probabilities(run, lever.mode, paths)
    seconds_training = train_seconds(run)
    if lever.partner is not None:
        other = ensure_run(runs, data_dir, target, seed, lever.partner)
        more, other_classes, more_seconds = probabilities(other, "plain", paths)
        assert other_classes == classes
        probs, seconds = (probs + more) / 2, seconds + more_seconds
        seconds_training += train_seconds(other)
    return {"run": run, "paths": paths, "truth": truth, "probs": probs, "classes": classes,
            "seconds": seconds, "train": seconds_training}


def measure(name: str, target: str, seed: int, runs: Path, data_dir: Path) -> dict:
    lever = LEVERS[name]
    out = outputs(name, target, seed, runs, data_dir)
    run, truth, classes = out["run"], out["truth"], out["classes"]
    checked = lever.patch in ("averages", "wise")  # a model written beside the run's own
    if checked:
        live, _, _ = probabilities(run, "plain", out["paths"])  # the run's own model, a check
        result_live = figure(target, live, classes, truth)
    return {"figure": figure(target, out["probs"], classes, truth),
            "train_seconds": out["train"], "predict_seconds": out["seconds"],
            "images": len(out["paths"]), "run": run.name,
            **({"live_model": result_live} if checked else {})}


def against_baseline(lever: dict, base: dict, target: str) -> tuple[float, float, float]:
    """The lever's figure less the baseline's on the same photos (`outputs` of each), with
    a 95% paired bootstrap interval (photos resampled with both models' answers): a lever
    whose interval holds 0 is not told apart from the default by these photos. With many
    levers some intervals leave out 0 by chance alone (1 in 20 at 95%)."""
    where = {path: i for i, path in enumerate(lever["paths"])}
    assert sorted(where) == sorted(base["paths"]) and lever["classes"] == base["classes"]
    index = {c: i for i, c in enumerate(base["classes"])}
    truth = np.array([index[t] for t in base["truth"]])
    ours = lever["probs"][[where[path] for path in base["paths"]]].argmax(1)
    theirs = base["probs"].argmax(1)
    n = len(lever["classes"])

    def score(t, p, axis):
        return resampled_macro_f1(t, p, n, axis=axis) if target == "inat" else (t == p).mean(axis)

    def gain(t, a, b, axis=-1):
        return score(t, a, axis) - score(t, b, axis)

    found = bootstrap((truth, ours, theirs), gain, paired=True, vectorized=True,
                      n_resamples=2000, method="percentile", random_state=0)
    low, high = found.confidence_interval
    return float(gain(truth, ours, theirs)), float(low), float(high)


# --- recipe changes tried here, on wingspan's own training loop -------------------------

def two_label_loss(original_loss, mixed: dict):
    """`stages.loss_fn` whose loss, after a batch was mixed (`mixed` then holds its share
    lam and the permutation it was mixed with), is both labels' weighed by their shares."""
    def loss_fn(*args, **kwargs):
        criterion = original_loss(*args, **kwargs)

        def mixed_loss(outputs, labels):
            if not mixed:
                return criterion(outputs, labels)
            lam, perm = mixed.pop("lam"), mixed.pop("perm")
            return lam * criterion(outputs, labels) + (1 - lam) * criterion(outputs, labels[perm])
        return mixed_loss
    return loss_fn


def patched(patch: str) -> None:
    """Change `wingspan train`'s recipe in this process (the names the loop looks up at
    call time), for a lever that has no option of its own:
    - feature-mixup: in the head stage each batch of cached features is mixed with a
      shuffled copy of itself (weight lam ~ Beta(alpha, alpha)), its loss with both labels;
    - averages: fine-tuning as usual, and beside it an EMA of the weights after every
      step and the mean of the weights at each epoch's end (SWA); both are written as
      bundles `model-ema` and `model-swa` next to the run's own `model`;
    - nohue: the 'standard' policy's colour jitter without its hue shift;
    - last: every epoch counts as the best, so each stage ends with its last;
    - alltrain: as last, and the val split's images are added to train too (val stays, so
      the loop runs as usual, but it chooses nothing);
    - drop-path: the backbone built with timm's stochastic depth (identity in eval mode, so
      the feature cache and the bundle are as usual; in fine-tuning, every block with it
      runs in PyTorch, as `Backbone` keeps random modules out of the frozen prefix);
    - sam: fine-tuning's backward pass taken twice: once where the weights are, then
      again at the weights moved by SAM_RHO along that gradient (the same batch, after
      the frozen prefix), whose gradient the optimizer then steps with from the weights
      as they were. The head stage is as usual;
    - cutmix: in fine-tuning, a box of each batch's input to the trained part (the frozen
      prefix's feature map where a prefix runs on another engine, else the images) is
      replaced by the same box of a shuffled copy of the batch, on CUTMIX_PROB of the steps,
      and the loss is both labels' weighed by the box's area (timm's `rand_bbox`)."""
    from wingspan.training import run as recipe
    from wingspan.training import stages

    if patch == "feature-mixup":
        original_head, original_loss = recipe.train_head, stages.loss_fn

        def train_head(run) -> None:
            g = torch.Generator().manual_seed(run.config.seed)
            beta = torch.distributions.Beta(MIXUP_ALPHA, MIXUP_ALPHA)
            mixed: dict = {}

            def mix(module, args):
                if module.training:
                    (feats,) = args
                    lam = float(beta.sample())
                    perm = torch.randperm(len(feats), generator=g).to(feats.device)
                    mixed.update(lam=lam, perm=perm)
                    return (lam * feats + (1 - lam) * feats[perm],)
                return None

            handle = run.model.head.register_forward_pre_hook(mix)
            stages.loss_fn = two_label_loss(original_loss, mixed)
            try:
                original_head(run)
            finally:
                handle.remove()
                stages.loss_fn = original_loss

        recipe.train_head = train_head
    elif patch == "squash":
        from wingspan.training import prepare

        def squashed(config=None, mean=None, std=None, normalize=True,
                     interpolation="bilinear"):
            return squash_view(config.image_size, mean, std, interpolation, normalize)

        prepare.eval_transform = squashed
    elif patch == "nohue":
        from torchvision.transforms import v2

        from wingspan.data import transforms

        standard = transforms.POLICIES["standard"]

        def without_hue(size, interpolation) -> list:
            return [v2.ColorJitter(s.brightness, s.contrast, s.saturation)
                    if isinstance(s, v2.ColorJitter) else s for s in standard(size, interpolation)]

        transforms.POLICIES["standard"] = without_hue
    elif patch in ("last", "alltrain"):
        from wingspan.training.context import Run

        consider = Run.consider_best

        def always(self, f1, stage, epoch, loss=float("inf")) -> bool:
            self.state.best_f1 = self.state.best_loss = float("-inf")
            return consider(self, f1, stage, epoch, loss)

        Run.consider_best = always
        if patch == "alltrain":
            from wingspan.data.samples import SPLIT

            original_splits = recipe.ensure_splits

            def ensure_splits(*args, **kwargs):
                dataset = original_splits(*args, **kwargs)
                table = dataset.table
                val = table[table[SPLIT] == "val"].assign(**{SPLIT: "train"})
                return dataset.with_table(pd.concat([table, val], ignore_index=True))

            recipe.ensure_splits = ensure_splits
    elif patch == "drop-path":
        from wingspan.models import backbone

        create = backbone.timm.create_model

        def with_drop_path(*args, **kwargs):
            return create(*args, **{**kwargs, "drop_path_rate": DROP_PATH})

        backbone.timm = type("timm", (), {"create_model": staticmethod(with_drop_path)})
    elif patch == "wise":
        original_finetune = recipe.finetune

        def finetune(run) -> None:
            start = {k: v.detach().float().cpu().clone()
                     for k, v in run.model.state_dict().items()}
            original_finetune(run)
            torch.save(start, run.dir / "head-stage.pt")

        recipe.finetune = finetune
    elif patch == "sam":
        original_finetune, original_loss = recipe.finetune, stages.loss_fn

        def finetune(run) -> None:
            fabric, last = run.fabric, {}
            setup, backward = fabric.setup, fabric.backward

            def remember_setup(module, *optimizers, **kwargs):
                module.register_forward_pre_hook(lambda _, args: last.update(x=args[0]))
                wrapped = setup(module, *optimizers, **kwargs)
                last["module"] = wrapped[0]
                return wrapped

            def loss_fn(*args, **kwargs):
                criterion = original_loss(*args, **kwargs)

                def remembered(outputs, labels):
                    last.update(criterion=criterion, labels=labels)
                    return criterion(outputs, labels)
                return remembered

            def sam_backward(loss, *args, **kwargs):
                backward(loss, *args, **kwargs)
                params = [p for p in last["module"].parameters() if p.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
                if not torch.isfinite(norm):  # (fp16's scaler skips this step: no move)
                    return
                with torch.no_grad():
                    moves = [p.grad * (SAM_RHO / (norm + 1e-12)) for p in params]
                    for p, move in zip(params, moves, strict=True):
                        p.add_(move)
                        p.grad = None
                sharp = last["criterion"](last["module"](last["x"]), last["labels"])
                backward(sharp, *args, **kwargs)
                with torch.no_grad():
                    for p, move in zip(params, moves, strict=True):
                        p.sub_(move)

            fabric.setup, fabric.backward, stages.loss_fn = (remember_setup, sam_backward,
                                                             loss_fn)
            try:
                original_finetune(run)
            finally:
                fabric.setup, fabric.backward, stages.loss_fn = setup, backward, original_loss

        recipe.finetune = finetune
    elif patch == "cutmix":
        from timm.data.mixup import rand_bbox

        original_finetune, original_loss = recipe.finetune, stages.loss_fn

        def finetune(run) -> None:
            fabric, mixed = run.fabric, {}
            setup = fabric.setup
            g = torch.Generator().manual_seed(run.config.seed)
            rng = np.random.default_rng(run.config.seed)

            def cut(module, args):
                (x,) = args
                if not module.training or len(x) < 2 or rng.random() >= CUTMIX_PROB:
                    return None
                lam = rng.beta(CUTMIX_ALPHA, CUTMIX_ALPHA)
                top, bottom, left, right = rand_bbox(x.shape, lam)
                perm = torch.randperm(len(x), generator=g).to(x.device)
                x = x.clone()
                x[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
                area = (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
                mixed.update(lam=1 - area, perm=perm)
                return (x,)

            def with_cut(module, *optimizers, **kwargs):
                module.register_forward_pre_hook(cut)
                return setup(module, *optimizers, **kwargs)

            fabric.setup, stages.loss_fn = with_cut, two_label_loss(original_loss, mixed)
            try:
                original_finetune(run)
            finally:
                fabric.setup, stages.loss_fn = setup, original_loss

        recipe.finetune = finetune
    elif patch == "averages":
        from timm.utils import ModelEmaV3

        original_finetune, original_end = recipe.finetune, stages._end_epoch

        def finetune(run) -> None:
            ema = ModelEmaV3(run.model, decay=EMA_DECAY)
            swa: dict[str, torch.Tensor] = {}
            ends = 0
            original_optimizer = stages.make_optimizer

            def make_optimizer(*args, **kwargs):
                optimizer = original_optimizer(*args, **kwargs)
                optimizer.register_step_post_hook(lambda *_: ema.update(run.model))
                return optimizer

            def end_epoch(run_, stage, *args, **kwargs):
                nonlocal ends
                if stage == "finetune":
                    ends += 1
                    for k, v in run.model.state_dict().items():
                        v = v.detach().float().cpu()
                        swa[k] = v.clone() if k not in swa else swa[k] + (v - swa[k]) / ends
                return original_end(run_, stage, *args, **kwargs)

            stages.make_optimizer, stages._end_epoch = make_optimizer, end_epoch
            try:
                original_finetune(run)
            finally:
                stages.make_optimizer, stages._end_epoch = original_optimizer, original_end
            torch.save({"ema": ema.module.state_dict(), "swa": swa},
                       run.dir / "averages.pt")

        recipe.finetune = finetune
    else:
        raise SystemExit(f"no such patch: {patch}")


def train_patched(patch: str, argv: list[str]) -> None:
    """`wingspan train ARGV` with `patch`, then (averages) the two averaged bundles."""
    from wingspan.cli import main as cli
    from wingspan.models import load_bundle, save_bundle

    patched(patch)
    try:
        cli(["train", *argv])
    except SystemExit as e:  # typer's way to end, 0 included
        if e.code:
            raise
    run = Path(argv[argv.index("--runs-dir") + 1]) / argv[argv.index("--name") + 1]
    if patch == "wise":
        start = torch.load(run / "head-stage.pt", weights_only=True)
        for mode, share in WISE.items():
            model, manifest = load_bundle(run / "model")
            model.load_state_dict({
                k: (share * v.float() + (1 - share) * start[k]).to(v.dtype)
                if v.is_floating_point() else v for k, v in model.state_dict().items()})
            save_bundle(model, run / f"model-{mode}", manifest["classes"],
                        manifest.get("taxonomy"), manifest.get("training"),
                        manifest.get("metrics"), manifest.get("weights_source"),
                        manifest.get("calibration"))
    if patch == "averages":
        averages = torch.load(run / "averages.pt", weights_only=True)
        for kind in ("ema", "swa"):
            model, manifest = load_bundle(run / "model")
            state = model.state_dict()
            model.load_state_dict({k: averages[kind][k].to(v.dtype) for k, v in state.items()})
            save_bundle(model, run / f"model-{kind}", manifest["classes"],
                        manifest.get("taxonomy"), manifest.get("training"),
                        manifest.get("metrics"), manifest.get("weights_source"),
                        manifest.get("calibration"))


def table(results: dict, levers: list[str], seeds: list[int]) -> str:
    head = ["lever", *[f"iNat test macro-F1 s{s}" for s in seeds],
            *[f"Leeds->iNat accuracy s{s}" for s in seeds], "wall s (iNat; Leeds)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in levers:
        cost = LEVERS[name].cost
        cells, walls = [], {}
        for target in DATA:
            for seed in seeds:
                r = results.get(f"{name}/{target}/{seed}")
                cells.append(f"{r['figure']:.3f}" if r else "")
                if r:
                    walls.setdefault(target, []).append(r[f"{cost}_seconds"])
        wall = "; ".join(f"{np.mean(w):.0f}" if w else "-" for w in
                         (walls.get(t, []) for t in DATA))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cost} {wall} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS),
                        metavar="LEVER", help="which levers (default: all; see --list)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1],
                        help="split seeds (default: 0 1)")
    parser.add_argument("--targets", nargs="+", default=list(DATA), choices=list(DATA),
                        help="inat (in-domain test macro-F1), transfer (Leeds -> iNat)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/levers"),
                        help="where the runs and levers.json go (default: runs/levers)")
    parser.add_argument("--data", type=Path, default=None,
                        help="the shared data folder (default: $WINGSPAN_SHARED_DATA or "
                             "../shared/data)")
    parser.add_argument("--list", action="store_true", help="list the levers and exit")
    if sys.argv[1:2] == ["--train-patched"]:  # internal (ensure_run): PATCH, then train's
        return train_patched(sys.argv[2], sys.argv[3:])
    args = parser.parse_args()
    if args.list:
        for name, lever in LEVERS.items():
            print(f"{name:13} {lever.about}")
        return
    data_dir = args.data or shared_data_dir()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    saved = args.runs_dir / "levers.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for name in args.levers:
        for target in args.targets:
            if target not in LEVERS[name].targets:
                continue
            for seed in args.seeds:
                key = f"{name}/{target}/{seed}"
                if key not in results:
                    result = measure(name, target, seed, args.runs_dir, data_dir)
                    # Merged into the file as it is now: another call may have added some.
                    results = {**(json.loads(saved.read_text()) if saved.is_file() else {}),
                               **results, key: result}
                    saved.write_text(json.dumps(results, indent=1))
                log(f"{key}: {results[key]['figure']:.3f}")
    print(table(results, args.levers, args.seeds))
    print("\nAgainst the baseline on the same photos: the lever's figure less the baseline's "
          "(95% paired bootstrap interval)")
    head = [f"{t} s{s}" for t in args.targets for s in args.seeds]
    print("| lever | " + " | ".join(head) + " |\n|" + "---|" * (len(head) + 1))
    # Only runs that are there: printing trains nothing.
    bases = {(t, s): outputs("baseline", t, s, args.runs_dir, data_dir, train=False)
             for t in args.targets for s in args.seeds}
    for name in [n for n in args.levers if n != "baseline"]:
        cells = []
        for target in args.targets:
            for seed in args.seeds:
                base = bases[target, seed]
                lever = (outputs(name, target, seed, args.runs_dir, data_dir, train=False)
                         if base and f"{name}/{target}/{seed}" in results else None)
                if lever is None:
                    cells.append("")
                    continue
                gain, low, high = against_baseline(lever, base, target)
                cells.append(f"{gain:+.3f} ({low:+.3f}, {high:+.3f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
