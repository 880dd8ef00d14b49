"""Augmentation on the fly (torchvision transforms v2) and the evaluation transform.

Policies are small registry entries: a name and the augmentations it applies, so
`--augment` lists them and a new one is one function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from wingspan.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

POLICIES: dict[str, Callable[[int, v2.InterpolationMode], list]] = {}


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """timm's names ('bicubic', 'bilinear', ...) as torchvision modes."""
    return v2.InterpolationMode(name.lower())


def register_policy(name: str):
    def add(fn):
        POLICIES[name] = fn
        return fn

    return add


# (config.AUGMENT_POLICIES names them for the settings' validation; a test keeps both equal.)
@register_policy("light")
def _light(size: int, interpolation: v2.InterpolationMode) -> list:
    return [v2.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=interpolation,
                                 antialias=True),
            v2.RandomHorizontalFlip()]


@register_policy("standard")
def _standard(size: int, interpolation: v2.InterpolationMode) -> list:
    # Zoom, mirror, a slight tilt and lighting changes: what varies between field photos.
    return [v2.RandomResizedCrop(size, scale=(0.3, 1.0), interpolation=interpolation,
                                 antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(15),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03)]


@register_policy("strong")
def _strong(size: int, interpolation: v2.InterpolationMode) -> list:
    return [v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=interpolation,
                                 antialias=True),
            v2.RandomHorizontalFlip(),
            v2.TrivialAugmentWide()]


class SmallOnClutter:
    """Half the time, the photo shrunk to 15-60% of its area and put at a random place on
    a blurred mirror image of itself: a butterfly small and off-centre on a busy
    background, as in field photos, for models trained on close crops (Leeds -> iNat:
    see docs/performance.md). Hand-written: torchvision's RandomZoomOut pastes onto a flat
    colour, which teaches a border, not a background. Uses torch's generator, which
    wingspan seeds per image."""

    def __init__(self, p: float = 0.5, area: tuple[float, float] = (0.15, 0.6)):
        self.p, self.area = p, area

    def __repr__(self) -> str:  # (as torchvision's: the features kept across runs key on it)
        return f"{type(self).__name__}(p={self.p}, area={self.area})"

    def __call__(self, image):
        from PIL import Image, ImageFilter, ImageOps

        if torch.rand(()) >= self.p:
            return image
        if not isinstance(image, Image.Image):
            image = v2.functional.to_pil_image(image)
        w, h = image.size
        blur = ImageFilter.GaussianBlur(max(w, h) * 0.04)
        back = ImageOps.mirror(image).filter(blur)
        side = float(torch.empty(()).uniform_(*self.area)) ** 0.5
        small = image.resize((max(1, round(w * side)), max(1, round(h * side))))
        x = int(torch.randint(0, w - small.width + 1, ()))
        y = int(torch.randint(0, h - small.height + 1, ()))
        back.paste(small, (x, y))
        return back


@register_policy("field")
def _field(size: int, interpolation: v2.InterpolationMode) -> list:
    return [SmallOnClutter(), *_standard(size, interpolation)]


def _to_tensor(mean, std, normalize: bool) -> list:
    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    return steps + [v2.Normalize(mean, std)] if normalize else steps


def train_transform(config: AugmentConfig | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    normalize: bool = True, interpolation: str = "bicubic") -> v2.Compose:
    """PIL RGB image -> augmented float tensor (C, size, size)."""
    config = config or AugmentConfig()
    steps = (POLICIES[config.policy](config.image_size, interpolation_mode(interpolation))
             + _to_tensor(mean, std, normalize))
    if config.policy == "strong":
        steps.append(v2.RandomErasing(p=0.25))
    return v2.Compose(steps)


def eval_transform(config: AugmentConfig | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   normalize: bool = True, interpolation: str = "bicubic") -> v2.Compose:
    """Resize the shorter side to size / eval_crop, then take the centre `size` square."""
    config = config or AugmentConfig()
    resize = round(config.image_size / config.eval_crop)
    return v2.Compose([v2.Resize(resize, interpolation=interpolation_mode(interpolation),
                                 antialias=True),
                       v2.CenterCrop(config.image_size),
                       *_to_tensor(mean, std, normalize)])
