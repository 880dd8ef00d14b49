"""How well the "unknown" answer works on real photos: train the default recipe with two
species held out (--holdout-classes), for several pairs, and score the held-out species and
photos with no butterfly at all (scikit-image's samples and the demo's backgrounds) as
unknowns. Prints one row per pair and score.

    python bench/unknown.py ../shared/data/inat-butterflies \\
        --pairs painted_lady,silvery_checkerspot monarch,cabbage_white \\
                common_blue,tiger_swallowtail [--out unknown.json] [-- TRAIN OPTIONS]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--pairs", nargs="+", required=True, help="a,b: species held out")
    parser.add_argument("--runs-dir", default=None)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--seed", type=int, default=0)
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
