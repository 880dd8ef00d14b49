"""How well the "unknown" answer works on real photos: train the default recipe with two
species held out (--holdout-classes), for several pairs, and score the held-out species and
photos with no butterfly at all (scikit-image's samples and the demo's backgrounds) as
unknowns. Prints one row per pair and score.

    python bench/unknown.py ../shared/data/inat-butterflies \\
        --pairs painted_lady,silvery_checkerspot monarch,cabbage_white \\
                common_blue,tiger_swallowtail [--out unknown.json] [-- TRAIN OPTIONS]

--outliers GLOB: outlier exposure while fine-tuning (Hendrycks et al. 2019), a patch of the
loop, not an option: each fine-tuning step also passes as many images from the folders GLOB
matches (other species, say), drawn at random and augmented as training images are, and
adds --oe-weight x their cross-entropy to the uniform answer to the step's loss. The head
stage is as usual.
"""

from __future__ import annotations

import argparse
import glob
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

import wingspan as ws
from wingspan.evaluate.run import evaluate

SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field",
           "immunohistochemistry", "retina", "colorwheel", "camera", "horse", "brick",
           "grass", "gravel", "logo", "moon", "page", "text", "coins", "clock", "cell")


def non_butterflies(folder: Path, backgrounds: int = 50) -> Path:
    """scikit-image's sample pictures plus the demo generator's empty backgrounds."""
    from skimage import data as skdata

    from wingspan.data.demo import _background

    folder.mkdir(parents=True, exist_ok=True)
    for name in SKIMAGE:
        try:
            Image.fromarray(getattr(skdata, name)()).convert("RGB").save(folder / f"{name}.jpg")
        except Exception:  # noqa: BLE001 - a sample that would need a download
            continue
    rng = np.random.default_rng(0)
    for i in range(backgrounds):
        _background(384, rng).save(folder / f"background_{i}.jpg")
    return folder


def outlier_exposure(pattern: str, weight: float) -> None:
    """Patch fine-tuning for outlier exposure (module docstring)."""
    from wingspan.config import IMAGE_EXTENSIONS
    from wingspan.training import run as recipe
    from wingspan.training import stages
    from wingspan.training.data import LabelledImages

    paths = sorted(str(f) for d in glob.glob(pattern) for f in Path(d).rglob("*")
                   if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise SystemExit(f"--outliers {pattern!r}: no images")
    print(f"outlier exposure: {len(paths)} images, weight {weight}", flush=True)
    original_finetune, original_parts, original_loss = (recipe.finetune, stages.finetune_parts,
                                                        stages.loss_fn)

    def finetune(run) -> None:
        fabric, parts, exposed = run.fabric, {}, {}
        setup = fabric.setup
        train = run.data.train
        outliers = LabelledImages(paths, torch.zeros(len(paths), train.labels.shape[1]),
                                  train.transform, train.cache, train.seed + 1, train.size)
        g = torch.Generator().manual_seed(run.config.seed)
        steps = {"done": 0}  # (each step's draw seeded by its number)

        def finetune_parts(*args, **kwargs):
            parts["prefix"], trained = original_parts(*args, **kwargs)
            return parts["prefix"], trained

        def expose(module, args):
            (x,) = args
            if not module.training or not len(x):
                return None
            steps["done"] += 1
            idx = torch.randint(len(outliers), (len(x),), generator=g).tolist()
            items = [outliers[(i, steps["done"], 0)] for i in idx]
            o = torch.stack([item[0] for item in items if item[0] is not None])
            if parts.get("prefix") is not None:
                o = parts["prefix"](o)
            o = run.policy.prepare_batch(o).to(x.dtype)
            exposed["n"] = len(x)
            return (torch.cat([x, o]),)

        def with_exposure(module, *optimizers, **kwargs):
            module.register_forward_pre_hook(expose)
            return setup(module, *optimizers, **kwargs)

        def loss_fn(*args, **kwargs):
            criterion = original_loss(*args, **kwargs)

            def exposed_loss(outputs, labels):
                if "n" not in exposed:
                    return criterion(outputs, labels)
                n = exposed.pop("n")
                known = {k: v[:n] for k, v in outputs.items()}
                uniform = sum(-torch.log_softmax(v[n:].float(), 1).mean(1).mean()
                              for v in outputs.values()) / len(outputs)
                return criterion(known, labels) + weight * uniform
            return exposed_loss

        fabric.setup, stages.finetune_parts, stages.loss_fn = (with_exposure, finetune_parts,
                                                               loss_fn)
        try:
            original_finetune(run)
        finally:
            fabric.setup, stages.finetune_parts, stages.loss_fn = (setup, original_parts,
                                                                   original_loss)
        print(f"outlier exposure: {steps['done']} fine-tuning steps exposed", flush=True)

    recipe.finetune = finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--pairs", nargs="+", required=True, help="a,b: species held out")
    parser.add_argument("--runs-dir", default=None)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outliers", default=None, metavar="GLOB",
                        help="outlier exposure in fine-tuning with these folders' images")
    parser.add_argument("--oe-weight", type=float, default=0.5)
    args, train_options = parser.parse_known_args()
    options = {}
    items = iter(train_options[1:] if train_options[:1] == ["--"] else train_options)
    for item in items:  # --epochs-finetune=2 or --epochs-finetune 2, as the CLI takes them
        if not item.startswith("--"):
            parser.error(f"{item!r}: give training options as --NAME VALUE or --NAME=VALUE")
        key, said, value = item[2:].partition("=")
        value = value if said else next(items, None)
        if value is None:
            parser.error(f"{item}: no value given")
        options[key.replace("-", "_")] = yaml.safe_load(value)  # "0" -> 0, as the CLI types
    if args.outliers:
        outlier_exposure(args.outliers, args.oe_weight)
    runs = Path(args.runs_dir or tempfile.mkdtemp())
    others = non_butterflies(runs / "not-butterflies")
    results = []
    for pair in args.pairs:
        held = pair.split(",")
        start = time.perf_counter()
        run = ws.train(args.data, holdout_classes=held, seed=args.seed, runs_dir=runs,
                       name="held-" + "-".join(held), quiet=True, **options)
        seconds = time.perf_counter() - start
        u = run.metrics["unknown"]
        far = evaluate(run.dir, out=run.dir / "evaluation-not-butterflies", progress=False,
                       unknown=str(others)).metrics["unknown"]
        row = {"held_out": held, "train_seconds": round(seconds, 1), **{
            k: round(v, 4) for k, v in u.items() if isinstance(v, float)},
            "score": u["score"], "scores": u["scores"],
            "non_butterflies": {"images": far["unseen_images"],
                                "flagged": far["unseen_flagged"], "scores": far["scores"]}}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'held out':38} {'score':12} {'AUROC':>6} {'FPR95':>6} {'non-butterfly AUROC':>20}")
    for r in results:
        for name, v in r["scores"].items():
            mark = "*" if name == r["score"] else " "
            print(f"{'+'.join(r['held_out']):38} {name + mark:12} {v['auroc']:6.3f} "
                  f"{v['fpr95']:6.3f} {r['non_butterflies']['scores'][name]['auroc']:20.3f}")
    print("\nAt the default threshold (* score):")
    for r in results:
        print(f"{'+'.join(r['held_out']):38} unseen flagged {r['unseen_flagged']:.3f}, known "
              f"turned away {r['known_turned_away']:.3f}, known macro-F1 "
              f"{r['known_macro_f1']:.4f} -> {r['known_macro_f1_with_unknown']:.4f}, "
              f"non-butterflies flagged {r['non_butterflies']['flagged']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
