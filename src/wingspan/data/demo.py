"""Synthetic butterflies: a small, imbalanced, hierarchical dataset made from nothing.

Each species differs in wing shape, colours and pattern; each image draws one at a
random pose, size and place on a noisy background, so a model must learn the
butterfly, not the picture. Deterministic for a seed; a few hundred images take
seconds. The taxonomy mixes real family names with invented genera.
"""

from __future__ import annotations

import csv
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from wingspan.config import DemoConfig
from wingspan.data.readers import is_file_manager_file
from wingspan.data.taxonomy import TAXONOMY_FILE
from wingspan.errors import WingspanError

# Right-hand wings in body coordinates: x outwards, y towards the tail, wingspan ~2.
FOREWINGS = {
    "rounded": [(0.05, -0.05), (0.3, -0.55), (0.7, -0.75), (0.95, -0.6), (0.9, -0.2),
                (0.5, 0.0), (0.05, 0.05)],
    "pointed": [(0.05, -0.05), (0.35, -0.6), (1.0, -0.85), (0.85, -0.35), (0.5, -0.05),
                (0.05, 0.05)],
}
HINDWINGS = {
    "rounded": [(0.05, 0.0), (0.55, 0.0), (0.8, 0.25), (0.7, 0.6), (0.35, 0.75), (0.05, 0.4)],
    "tailed": [(0.05, 0.0), (0.55, 0.0), (0.75, 0.3), (0.6, 0.6), (0.45, 0.65), (0.42, 1.05),
               (0.34, 1.05), (0.32, 0.7), (0.05, 0.4)],
    "scalloped": [(0.05, 0.0), (0.55, 0.0), (0.8, 0.2), (0.72, 0.3), (0.78, 0.45), (0.66, 0.55),
                  (0.65, 0.7), (0.5, 0.68), (0.4, 0.8), (0.3, 0.7), (0.05, 0.4)],
}


@dataclass(frozen=True)
class Species:
    folder: str
    family: str
    subfamily: str
    genus: str
    epithet: str
    forewing: str
    hindwing: str
    colour: tuple[int, int, int]
    accent: tuple[int, int, int]
    pattern: str  # spots | band | eyespots | veins | tips | plain


SPECIES = [
    Species("azure_spotwing", "Lycaenidae", "Polyommatinae", "Pixelia", "azurea",
            "rounded", "rounded", (90, 140, 230), (30, 30, 40), "spots"),
    Species("orange_veined", "Nymphalidae", "Danainae", "Nervia", "aurantia",
            "pointed", "rounded", (235, 130, 30), (25, 20, 20), "veins"),
    Species("yellow_tailwing", "Papilionidae", "Papilioninae", "Fictilia", "caudata",
            "pointed", "tailed", (240, 215, 70), (30, 30, 30), "band"),
    Species("white_darktip", "Pieridae", "Pierinae", "Chalkia", "alba",
            "rounded", "rounded", (240, 240, 232), (40, 40, 45), "tips"),
    Species("red_banded", "Nymphalidae", "Nymphalinae", "Synthia", "rubrofasciata",
            "pointed", "scalloped", (35, 30, 35), (215, 45, 35), "band"),
    Species("eyed_scallop", "Nymphalidae", "Nymphalinae", "Oculia", "pavonina",
            "rounded", "scalloped", (160, 40, 35), (250, 220, 90), "eyespots"),
    Species("green_plain", "Lycaenidae", "Theclinae", "Viridula", "viridis",
            "rounded", "rounded", (110, 170, 80), (60, 90, 40), "plain"),
    Species("blue_tailwing", "Papilionidae", "Papilioninae", "Fictilia", "cyanea",
            "pointed", "tailed", (40, 60, 120), (120, 200, 230), "spots"),
]

# Where patterns sit, in right-wing body coordinates.
SPOT_SITES = [(0.55, -0.45), (0.75, -0.55), (0.45, 0.25), (0.6, 0.35)]
EYE_SITES = [(0.7, -0.55), (0.5, 0.4)]


def generate_demo(out_dir: str | Path, config: DemoConfig | None = None) -> Path:
    """Write `out_dir/<species>/<n>.jpg` and `out_dir/taxonomy.csv`; returns out_dir."""
    config = config or DemoConfig()
    out_dir = Path(out_dir)
    _clear_previous(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    species = SPECIES[: len(config.images_per_class)]
    for sp, count in zip(species, config.images_per_class, strict=True):
        (out_dir / sp.folder).mkdir(exist_ok=True)
        for i in range(count):
            image = draw_butterfly(sp, config.image_size, rng)
            image.save(out_dir / sp.folder / f"{sp.folder}_{i:04d}.jpg", quality=90)
    with open(out_dir / TAXONOMY_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["folder", "family", "subfamily", "genus", "specific_epithet"])
        for sp in species:
            writer.writerow([sp.folder, sp.family, sp.subfamily, sp.genus, sp.epithet])
    return out_dir


def _clear_previous(out_dir: Path) -> None:
    """Remove what an earlier demo wrote here, so that asking for fewer images or species
    does not leave the old ones to be read with the new; refuse a folder holding anything
    else, which is not ours to delete."""
    if out_dir.exists() and not out_dir.is_dir():
        raise WingspanError(f"{out_dir} is a file; the demo's images go in a folder.",
                            hint="Give a new or empty folder for the demo data.")
    if not out_dir.is_dir():
        return
    ours = {sp.folder: sp for sp in SPECIES}
    foreign = [p for p in out_dir.iterdir()
               if p.name != TAXONOMY_FILE and p.name not in ours and not is_file_manager_file(p)]
    foreign += [f for p in out_dir.iterdir() if p.name in ours and p.is_dir()
                for f in p.iterdir()
                if not re.fullmatch(rf"{re.escape(p.name)}_\d{{4}}\.jpg", f.name)
                and not is_file_manager_file(f)]
    if foreign:
        names = ", ".join(str(f.relative_to(out_dir)) for f in foreign[:3])
        raise WingspanError(
            f"{out_dir} holds files that the demo generator did not write ({names}"
            f"{', ...' if len(foreign) > 3 else ''}); it replaces its images on a second run.",
            hint="Give a new or empty folder for the demo data.")
    for name in ours:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    (out_dir / TAXONOMY_FILE).unlink(missing_ok=True)


def draw_butterfly(sp: Species, size: int, rng: np.random.Generator) -> Image.Image:
    """One photo-like picture of a species at a random pose on a random background."""
    scale = 2  # draw large, then shrink: smooth edges without an antialiasing library
    big = size * scale
    image = _background(big, rng)
    angle = rng.uniform(-0.7, 0.7)
    half_span = big * rng.uniform(0.22, 0.42)
    centre = np.array([big / 2, big / 2]) + rng.uniform(-0.12, 0.12, 2) * big
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def place(points, mirror: bool) -> list[tuple[float, float]]:
        pts = np.asarray(points, float) * ([-1, 1] if mirror else [1, 1])
        return [tuple(p) for p in pts @ rot.T * half_span + centre]

    colour = _jitter(sp.colour, rng, 18)
    accent = _jitter(sp.accent, rng, 18)
    wings = Image.new("L", (big, big), 0)
    pattern = Image.new("L", (big, big), 0)
    wing_draw, pat_draw = ImageDraw.Draw(wings), ImageDraw.Draw(pattern)
    for mirror in (False, True):
        for shape in (FOREWINGS[sp.forewing], HINDWINGS[sp.hindwing]):
            wobble = np.asarray(shape) + rng.normal(0, 0.015, (len(shape), 2))
            wing_draw.polygon(place(wobble, mirror), fill=255)
        _draw_pattern(pat_draw, sp.pattern, lambda p, m=mirror: place(p, m), half_span)
    wing_layer = Image.new("RGB", (big, big), colour)
    wing_layer.paste(Image.new("RGB", (big, big), accent), mask=pattern)
    image.paste(wing_layer, mask=wings.filter(ImageFilter.GaussianBlur(1)))
    body = ImageDraw.Draw(image)
    body.line(place([(0, -0.35), (0, 0.55)], False), fill=(30, 25, 20), width=max(2, big // 40))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    noise = rng.normal(0, rng.uniform(3, 10), (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, float) + noise, 0, 255).astype(np.uint8))


def _draw_pattern(draw: ImageDraw.ImageDraw, pattern: str, place, half_span: float) -> None:
    r = 0.07 * half_span
    if pattern == "spots":
        for x, y in place(SPOT_SITES):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif pattern == "eyespots":
        for x, y in place(EYE_SITES):
            draw.ellipse([x - 2.2 * r, y - 2.2 * r, x + 2.2 * r, y + 2.2 * r], fill=255)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=0)
    elif pattern == "band":
        draw.polygon(place([(0.25, -0.35), (0.8, -0.7), (0.9, -0.55), (0.35, -0.2)]), fill=255)
    elif pattern == "veins":
        for end in [(0.95, -0.65), (0.85, -0.3), (0.7, 0.3), (0.5, 0.6), (0.6, -0.7)]:
            draw.line(place([(0.05, 0.0), end]), fill=255, width=max(1, int(r / 2)))
        draw.line(place(FOREWINGS["pointed"][1:4]), fill=255, width=max(2, int(r)))
    elif pattern == "tips":
        draw.polygon(place([(0.6, -0.72), (0.98, -0.62), (0.9, -0.35), (0.7, -0.45)]), fill=255)


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """A two-colour gradient (foliage, soil, a museum tray) with a few soft blobs."""
    a, b = rng.integers(40, 220, 3), rng.integers(40, 220, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    grad = a * (1 - t) + b * t
    image = Image.fromarray(np.repeat(grad, size, axis=1).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 6)):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.05, 0.2) * size
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in
                                                              rng.integers(40, 220, 3)))
    return image.filter(ImageFilter.GaussianBlur(size / 25))


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)
