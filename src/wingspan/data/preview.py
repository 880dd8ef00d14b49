"""`wingspan data preview`: a grid of images as evaluated beside augmented versions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch

from wingspan.config import PREVIEW_ROWS, PREVIEW_VIEWS, AugmentConfig
from wingspan.data.images import open_rgb
from wingspan.data.samples import PATH, Dataset
from wingspan.data.transforms import eval_transform, train_transform
from wingspan.errors import WingspanError
from wingspan.files import atomic_path, remove_dead_leftovers
from wingspan.plotting import literal_text, short_name, subplots


@literal_text()
def write_preview(dataset: Dataset, out: Path, config: AugmentConfig | None = None,
                  level: str | None = None, rows: int = PREVIEW_ROWS,
                  augmented: int = PREVIEW_VIEWS, seed: int = 0, log=None,
                  interpolation: str = "bicubic") -> Path:
    """One row per class (up to `rows`): the evaluation view, then augmented views. An
    unreadable image is passed over for another of its class; a class with none readable
    is left out, and `log` (a function of a line) told which. `config` and `interpolation`:
    a model's size, crop and resize filter, for its views as trained and evaluated."""
    config = config or AugmentConfig()
    level = dataset.resolve_level(level)
    # Each panel is drawn 160 px wide, whatever its size: a grid beyond these bounds only
    # runs out of memory (a 10^9 px resize) or time (10^5 views), drawing what none could see.
    for name, value, low, high, usual in (
            ("rows", rows, 1, 100, PREVIEW_ROWS), ("views", augmented, 0, 20, PREVIEW_VIEWS),
            ("seed", seed, 0, 2**32 - 1, 0),
            ("image-size", config.image_size, 16, 1024, AugmentConfig.image_size)):
        if not low <= value <= high:
            top = "2**32 - 1" if name == "seed" else high
            raise WingspanError(
                f"A preview's {name} (--{name}, {name.replace('-', '_')}= in Python) must be "
                f"from {low} to {top}, got {value}.", hint=f"Use {usual}, say.")
    rng = np.random.default_rng(seed)
    named = dataset.table[dataset.table[level] != ""]  # blank at the level: no class of it
    classes = list(named.groupby(level))
    picks, unreadable = [], []
    for i in rng.permutation(len(classes)):
        label, part = classes[i]
        image = _first_readable(part[PATH].iloc[rng.permutation(len(part))])
        if image is not None:
            picks.append((i, label, image))
        else:
            unreadable.append(str(label))
        if len(picks) == rows:
            break
    if unreadable and log:
        log(f"Not shown: {', '.join(sorted(unreadable))} (no image of "
            + ("these classes" if len(unreadable) > 1 else "the class") + " could be read).")
    if not picks:
        raise WingspanError("No image of the data could be read for the preview.",
                            hint="Run `wingspan data inspect DATA` to list the broken files.")
    picks = [(label, image) for _, label, image in sorted(picks, key=lambda p: p[0])]
    clean = eval_transform(config, normalize=False, interpolation=interpolation)
    augment = train_transform(config, normalize=False, interpolation=interpolation)
    with torch.random.fork_rng(devices=[]):  # (the caller's own stream left as it was)
        torch.manual_seed(seed)
        return _draw(picks, clean, augment, augmented, config, out)


def _draw(picks, clean, augment, augmented: int, config: AugmentConfig, out: Path) -> Path:
    cols = augmented + 1
    fig, axes = subplots(len(picks), cols, figsize=(1.6 * cols, 1.7 * len(picks)),
                         squeeze=False)
    for r, (label, image) in enumerate(picks):
        views = [clean(image)] + [augment(image) for _ in range(augmented)]
        for c, view in enumerate(views):
            ax = axes[r][c]
            ax.imshow(view.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel("\n".join(_name_lines(str(label))), fontsize=7)
            if r == 0:
                # (the first, resized and cropped as evaluation sees it: not the file itself)
                ax.set_title("as evaluated" if c == 0 else f"augmented {c}", fontsize=8)
    fig.suptitle(f"augmentation '{config.policy}' at {config.image_size}px", fontsize=9)
    fig.tight_layout()
    # (a SIGTERM's, which no `finally` removes; atomic_path makes the folder, and removes
    # it, empty, when the write fails)
    remove_dead_leftovers(out)
    with atomic_path(out) as tmp:  # (a kill while saving left a torn PNG in place)
        fig.savefig(tmp, dpi=100)
    return out


def _name_lines(name: str, width: int = 16, most: int = 3) -> list[str]:
    """A class name over lines of `width` characters, three at most: where its words take
    more, cut in the middle to fit (its end kept: names often differ there)."""
    lines = textwrap.wrap(name, width)
    if len(lines) <= most:
        return lines
    short = short_name(name, width * most)
    return [short[i:i + width] for i in range(0, len(short), width)]


def _first_readable(paths, tries: int = 20):
    """The first of `paths` (at most `tries`) that opens as an image, or None."""
    for path in paths[:tries]:
        try:
            return open_rgb(path)
        except WingspanError:
            continue
    return None
