"""What each training augmentation costs a data worker, step by step (one CPU thread).

    python bench/augment_cost.py                     # every policy, 224 px, 200 images
    python bench/augment_cost.py --size 260 --policies standard field

On a fast GPU the data workers, not the GPU, set the fine-tuning speed: `make gpu-check`
measured 54-68% of each step waiting for data on an H200 (README, GPUs and clusters).
This prints where a worker's time goes and the images/s one worker can give, so a change
to the augmentation (or moving a step onto the GPU) can be judged here, without a GPU.
Images are the demo generator's, decoded once, as the decode cache hands them to workers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torchvision import tv_tensors
from torchvision.transforms import v2

from wingspan.config import AUGMENT_POLICIES, AugmentConfig, DemoConfig
from wingspan.data.demo import generate_demo
from wingspan.data.transforms import train_transform
from wingspan.training.decode_cache import DecodeCache


def step_name(step) -> str:
    if isinstance(step, v2.ColorJitter):  # the one whose parts differ most in cost
        parts = [k for k in ("brightness", "contrast", "saturation", "hue") if getattr(step, k)]
        return f"ColorJitter({', '.join(parts)})"
    return type(step).__name__


def costs(policy: str, images: list[torch.Tensor], size: int) -> list[tuple[str, float]]:
    """(step, ms per image) for each step of the policy's training transform, in order,
    each timed on the previous step's outputs."""
    steps = train_transform(AugmentConfig(policy=policy, image_size=size)).transforms
    torch.manual_seed(0)
    rows, xs = [], images
    for step in steps:
        start = time.perf_counter()
        xs = [step(x) for x in xs]
        rows.append((step_name(step), (time.perf_counter() - start) / len(xs) * 1e3))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="the training resolution")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--policies", nargs="+", default=list(AUGMENT_POLICIES),
                        choices=AUGMENT_POLICIES)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker's view
    with tempfile.TemporaryDirectory() as tmp:
        per_class = max(1, -(-args.images // 6))
        data = generate_demo(Path(tmp) / "demo", DemoConfig(image_size=round(args.size * 1.15),
                                                            images_per_class=(per_class,) * 6))
        cache = DecodeCache(None, round(args.size * 1.15))
        paths = sorted(data.rglob("*.jpg"))[:args.images]
        images = [tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(cache.load(str(p))))
                                   .permute(2, 0, 1)) for p in paths]
    console = Console()
    for policy in args.policies:
        rows = costs(policy, images, args.size)
        total = sum(ms for _, ms in rows)
        table = Table("step", "ms / image", "share",
                      title=f"'{policy}' at {args.size} px: {total:.2f} ms per image, "
                            f"{1000 / total:.0f} images/s per worker ({len(images)} images)")
        for name, ms in rows:
            table.add_row(name, f"{ms:.2f}", f"{ms / total:.0%}")
        console.print(table)


if __name__ == "__main__":
    main()
