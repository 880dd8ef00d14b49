"""Decode each large image once, at the working resolution, and keep it on disk.

A 4000-pixel JPEG takes ~100 ms to decode; the same picture stored as a 300-pixel
uint8 array loads in well under a millisecond. A small file (a few hundred pixels a
side) decodes in 2-3 ms and is not kept: its entry would take several times its size.
Entries are keyed by the file's path, size, modification and change times, the working
size and the pixel budget, so an edited photo is decoded again (files.FileArrays).
JPEGs are decoded in draft mode (libjpeg scales while decoding) when they are large.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.transforms.v2.functional import resize

from wingspan.config import DECODE_CACHE_MIN_BYTES, DECODE_CACHE_MIN_PIXELS
from wingspan.data.images import budget_key, max_pixels, open_rgb
from wingspan.data.transforms import interpolation_mode
from wingspan.files import FileArrays


class DecodeCache:
    def __init__(self, directory: str | Path | None, short_side: int,
                 interpolation: str = "bicubic", min_bytes: int = DECODE_CACHE_MIN_BYTES):
        """`interpolation`: the model's resize filter (timm's name), as predict resizes.
        `min_bytes`: smaller files (of few pixels) are decoded each time, not kept."""
        key = f"{short_side}" + ("" if interpolation == "bicubic" else f"-{interpolation}")
        folder = Path(directory).expanduser() / f"decoded-{key}" if directory else None  # ~/x
        self.budget = max_pixels()  # the call's, taken along to the worker processes
        # The cache is on disk, shared by every run (and budget: `budget_key`). "tv":
        # resized by torchvision (entries from before, shrunk by Pillow with the long side
        # rounded, miss).
        self.arrays = FileArrays(folder, f"{key}|tv{budget_key(self.budget)}")
        self.short_side, self.min_bytes = short_side, min_bytes
        self.interpolation = interpolation_mode(interpolation)

    def load(self, path: str) -> np.ndarray:
        """The image as an (H, W, 3) uint8 array, its shorter side `short_side`. A file
        under `min_bytes` of fewer than DECODE_CACHE_MIN_PIXELS is decoded each time:
        keeping it costs more disk than the decode costs time (config)."""
        if self.arrays.directory is None or not self._worth_keeping(path):
            return np.array(self.decode(path))
        entry = self.arrays.entry(path)
        array = self.arrays.get(entry)
        # An entry damaged where it still loads (written over by hand, a disk's bad block)
        # crashed the loader or trained on the wrong picture: one of another shape is a miss.
        if array is not None and (array.dtype != np.uint8 or array.ndim != 3
                                  or array.shape[2] != 3
                                  or min(array.shape[:2]) != self.short_side):
            array = None
        if array is None:
            # Decoded, a writable copy; a cache that cannot keep it costs a decode next
            # time, and the image itself was read (it must not count as unreadable).
            array = np.array(self.decode(path))
            self.arrays.put(entry, array)
        return array

    def _worth_keeping(self, path: str) -> bool:
        """A file of `min_bytes` or more, or of DECODE_CACHE_MIN_PIXELS by its header."""
        if os.stat(path).st_size >= self.min_bytes:
            return True
        try:
            with Image.open(path) as im:
                return im.size[0] * im.size[1] >= DECODE_CACHE_MIN_PIXELS
        except Exception:  # noqa: BLE001 - the decode says what is wrong with the file
            return False

    def decode(self, path: str) -> Image.Image:
        image = open_rgb(path, draft=self.short_side, budget=self.budget)
        # torchvision's own resize of the PIL image, as predict's eval transform resizes it:
        # the same sizes (it truncates the long side) and pixels, so that what training
        # chooses its epoch, temperature and thresholds on is what predict sees. A smaller
        # image is enlarged here too: the transform's resize of the cached array would
        # enlarge it with torch's kernel, not Pillow's.
        return resize(image, [self.short_side], interpolation=self.interpolation)
