"""Every default in one place, as typed and validated dataclasses.

The CLI reads its defaults from here, so a default changes in exactly one line.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from wingspan.errors import WingspanError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")


def _check(ok: bool, name: str, expected: str, got: object) -> None:
    if not ok:
        raise WingspanError(f"The '{name}' setting must be {expected}. Got {got!r} instead.")


@dataclass
class ReadConfig:
    """How a dataset is read."""

    format: str | None = None  # folder | csv | ethec; None = detect from DATA
    group_regex: str | None = None  # regex on the file name; its first group is the group key
    strict: bool = False  # unreadable or missing files are an error instead of skipped + listed
    check_files: bool = True  # False reads labels only (e.g. ETHEC split files without images)


@dataclass
class InspectConfig:
    """What `data inspect` flags."""

    tiny_px: int = 64  # images whose shorter side is below this are "tiny"
    workers: int = min(8, os.cpu_count() or 1)
    many_classes: int = 40  # above this many classes the balance plot becomes a sorted log plot

    def __post_init__(self) -> None:
        _check(self.tiny_px >= 1, "tiny_px", "a positive number of pixels", self.tiny_px)
        _check(self.workers >= 1, "workers", "at least 1", self.workers)


@dataclass
class SplitConfig:
    """A grouped, stratified train/val/test split and the sampling of its train part."""

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    max_per_class: int | None = None  # undersampling cap on train images per class
    oversample_to: int | None = None  # repeat rare train classes up to this many images

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            _check(0 <= v < 1, name, "a fraction in [0, 1)", v)
        _check(
            self.val_fraction + self.test_fraction < 1,
            "val_fraction + test_fraction",
            "below 1 so that something is left to train on",
            self.val_fraction + self.test_fraction,
        )
        if self.max_per_class is not None:
            _check(self.max_per_class >= 1, "max_per_class", "at least 1", self.max_per_class)
        if self.oversample_to is not None:
            _check(self.oversample_to >= 1, "oversample_to", "at least 1", self.oversample_to)
        if self.max_per_class and self.oversample_to:
            _check(
                self.oversample_to <= self.max_per_class,
                "oversample_to",
                f"at most max_per_class ({self.max_per_class})",
                self.oversample_to,
            )


@dataclass
class AugmentConfig:
    """On-the-fly augmentation for training, and the evaluation transform."""

    policy: str = "standard"  # light | standard | strong
    image_size: int = 224
    eval_crop: float = 0.875  # resize to size / crop, then centre-crop `size` (timm's default)

    def __post_init__(self) -> None:
        from wingspan.data.transforms import POLICIES

        _check(self.policy in POLICIES, "policy", f"one of {sorted(POLICIES)}", self.policy)
        _check(self.image_size >= 16, "image_size", "at least 16 pixels", self.image_size)
        _check(0 < self.eval_crop <= 1, "eval_crop", "a fraction in (0, 1]", self.eval_crop)


@dataclass
class DemoConfig:
    """The synthetic butterfly dataset that `make demo` and the tests use."""

    image_size: int = 96
    images_per_class: tuple[int, ...] = (60, 50, 40, 32, 26, 20)  # imbalanced on purpose
    seed: int = 0

    def __post_init__(self) -> None:
        from wingspan.data.demo import SPECIES

        _check(
            1 <= len(self.images_per_class) <= len(SPECIES),
            "images_per_class",
            f"one count per class, for 1 to {len(SPECIES)} classes",
            self.images_per_class,
        )
        _check(min(self.images_per_class) >= 1, "images_per_class", "counts >= 1",
               self.images_per_class)


def to_dict(config: object) -> dict:
    """A config as plain JSON-ready values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


def shared_data_dir() -> Path:
    """Where the real photo sets live: $WINGSPAN_SHARED_DATA, else ../shared/data."""
    env = os.environ.get("WINGSPAN_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"
