"""Decode each image once, at the working resolution, and keep it on disk.

A 4000-pixel JPEG takes ~100 ms to decode; the same picture stored as a 300-pixel
uint8 array loads in well under a millisecond. Entries are keyed by the file's path,
size and modification time and the working size, so an edited photo is decoded again.
JPEGs are decoded in draft mode (libjpeg scales while decoding) when they are large.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from wingspan.data.images import open_rgb
from wingspan.errors import WingspanError
from wingspan.files import atomic_path


class DecodeCache:
    def __init__(self, directory: str | Path | None, short_side: int):
        self.directory = Path(directory) / f"decoded-{short_side}" if directory else None
        self.short_side = short_side
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _entry(self, path: str) -> Path | None:
        if not self.directory:
            return None
        st = os.stat(path)
        key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{self.short_side}"
        return self.directory / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"

    def load(self, path: str) -> np.ndarray:
        """The image as an (H, W, 3) uint8 array, its shorter side at most `short_side`."""
        entry = self._entry(path)
        if entry is not None and entry.is_file():
            try:
                return np.load(entry, allow_pickle=False)
            except (OSError, ValueError, EOFError):
                pass  # a damaged or empty entry (e.g. a killed write): decode again
        array = np.array(self.decode(path))  # a writable copy
        if entry is not None:
            try:
                with atomic_path(entry, durable=False) as tmp:
                    np.save(tmp, array, allow_pickle=False)
            except (OSError, WingspanError):  # a full or read-only cache costs a decode next
                pass  # time; the image itself was read (it must not count as unreadable)
        return array

    def decode(self, path: str) -> Image.Image:
        image = open_rgb(path, draft=self.short_side)
        w, h = image.size
        scale = self.short_side / min(w, h)
        if scale < 1:  # only ever shrink
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                 Image.Resampling.BICUBIC, reducing_gap=3.0)
        return image
