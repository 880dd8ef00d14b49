"""Opening images safely, and the facts `data inspect` checks about each file."""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wingspan.config import MAX_PIXELS, MAX_PIXELS_ENV
from wingspan.errors import WingspanError

# Pillow warns of a photo's damaged EXIF block (its orientation is then taken as upright)
# on the console, as its own source line, without the file's name: nothing a user can act
# on, amid progress bars. Only these, and only from Pillow's TIFF/EXIF parser, are quiet.
warnings.filterwarnings("ignore", message=r"(Possibly )?[Cc]orrupt EXIF data",
                        category=UserWarning, module=r"PIL\.TiffImagePlugin")

EXIF_ORIENTATION = 0x0112
UNUSUAL_MODES = {
    "CMYK": "CMYK colour",
    "I;16": "16-bit",
    "I;16B": "16-bit",
    "I;16L": "16-bit",
    "I": "32-bit integer",
    "F": "32-bit float",
    "RGBA": "alpha channel",
    "LA": "alpha channel",
    "PA": "alpha channel",
    "P": "palette",
    "1": "1-bit",
    "L": "greyscale",
}


SCALES = (1, 2, 4, 8)  # JPEG decoding scales libjpeg offers (as divisors)
# The formats wingspan opens: each decodes to the size its header states, which the budget
# checks first (an ICO or ICNS decodes an embedded PNG of any size, whatever it states).
FORMATS = ("JPEG", "PNG", "TIFF", "WEBP", "GIF", "BMP")  # JPEG's opener also reads MPO
REDUCIBLE = ("JPEG", "MPO")  # decoded by libjpeg, which can scale while decoding
# The shorter side a view resizes an image to, at most, when the caller gives no `draft`:
# with it, a long thin image is refused before its resize would outgrow the pixel budget.
VIEW_SIDE = 512
INSPECT_SIDE = 256  # the shorter side `data inspect` checks a resize at (see image_facts)
# Where a user raises the pixel budget, for hints: the CLI, the library, the environment.
RAISE_BUDGET = f"--max-pixels, max_pixels= in Python, or ${MAX_PIXELS_ENV}"


_PILLOW_LIMIT = threading.Lock()


@contextmanager
def open_image(path: str | Path | BinaryIO) -> Iterator[Image.Image]:
    """Image.open without Pillow's own decompression-bomb check. wingspan refuses bombs
    itself, from each image's header against its own budget (`max_pixels`), and decodes a
    large JPEG reduced first; Pillow's fixed check would refuse a museum drawer scan of over
    500 MP that 1/8 scale brings under the budget. Lifted only while the header is read
    (under a lock, for threads), so that Pillow's limit stays as the user's own code set it."""
    with _PILLOW_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(path, formats=FORMATS)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with im:
        yield im


def megapixels(pixels: float) -> str:
    """'0.64', '49', '1,600', '0.00005': megapixels in 3 figures, never '1.6e+03'."""
    mp = pixels / 1e6
    if mp >= 99.95:  # (.3g would round 999.7 to '1e+03')
        return f"{mp:,.0f}"
    return f"{mp:.3g}" if mp >= 1e-4 else f"{mp:.10f}".rstrip("0")


class ImageTooLarge(WingspanError):
    """An image over the pixel budget (a server answers it 413, not 422)."""


def skip_reason(e: WingspanError) -> str:
    """Why an image is skipped, as listed beside it: over the pixel budget, with how to raise
    it (not obvious, unlike what to do with a broken file); otherwise the message."""
    return f"{e.message} {e.hint}" if isinstance(e, ImageTooLarge) and e.hint else e.message


# The library's max_pixels= for one call: a context variable, so that calls in two threads
# each keep their own (the environment is the whole process's). A data loader's worker
# processes and a pool's threads do not see the call's context: the datasets and pools
# that read images there take the budget along (`max_pixels()` when they are made).
_CALL_BUDGET: ContextVar[int | None] = ContextVar("wingspan_max_pixels", default=None)


def max_pixels() -> int:
    """The pixel budget: the library call's max_pixels=, else $WINGSPAN_MAX_PIXELS (which
    the CLI's --max-pixels sets for its process), else MAX_PIXELS."""
    return chosen_budget() or MAX_PIXELS


def chosen_budget() -> int | None:
    """The budget a user chose (max_pixels= or --max-pixels), None for the default."""
    if called := _CALL_BUDGET.get():
        return called
    text = os.environ.get(MAX_PIXELS_ENV, "")
    budget = pixel_budget(text)
    if budget is None and text.strip():
        _unread_budget(text)
    return budget


@cache
def _unread_budget(text: str) -> None:
    """Said once: the library takes the default for a $WINGSPAN_MAX_PIXELS that is no
    number (the CLI refuses it), where "200M" in a notebook trained at 50 MP unsaid."""
    warnings.warn(f"${MAX_PIXELS_ENV} is {text!r}, not a number of pixels: the default "
                  f"{MAX_PIXELS:,} is used. Set it to a whole number, e.g. 100000000, or "
                  "unset it.", UserWarning, stacklevel=3)


def budget_key(budget: int) -> str:
    """A budget's part of an on-disk cache key: "" for the default (so that entries made
    before budgets were keyed stay valid), else "|Npx". A low budget decodes a large JPEG
    smaller (or refuses it), which another budget must not be handed."""
    return "" if budget == MAX_PIXELS else f"|{budget}px"


@contextmanager
def call_budget(value: int) -> Iterator[None]:
    """`max_pixels()` is `value` inside, in this thread (or task) only."""
    token = _CALL_BUDGET.set(value)
    try:
        yield
    finally:
        _CALL_BUDGET.reset(token)


def pixel_budget(text: str) -> int | None:
    """A pixel count as written in $WINGSPAN_MAX_PIXELS ("100000000"); None if it is not
    one (the CLI refuses such a value, the library takes the default)."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def pil_filter(name: str) -> Image.Resampling:
    """timm's interpolation name ('bicubic', 'bilinear', ...) as Pillow's resize filter."""
    try:
        return Image.Resampling[name.upper()]
    except KeyError as e:
        raise WingspanError(
            f"Unknown resize filter '{name}'.",
            hint=f"Use one of: {', '.join(f.name.lower() for f in Image.Resampling)}.") from e


def _ceil(side: int, scale: int) -> int:
    """libjpeg's side at 1/scale: rounded up."""
    return -(-side // scale)


def _empty(path: str | Path) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:  # gone meanwhile: not empty, just unreadable
        return False


def resize_refused(w: int, h: int, budget: int, side: int) -> tuple[str, str] | None:
    """(why, hint) when resizing a w x h image to a shorter side of `side` px would outgrow
    the pixel budget (a 1 x 40000 PNG of 100 bytes, upscaled), else None."""
    resized = side * side * max(w, h) / max(min(w, h), 1)
    if max(budget, w * h) < resized <= MAX_PIXELS:
        # It would fit the default budget: not the image's shape but a lowered budget is
        # at fault (a square image is refused too).
        return (f"resizing its {w} x {h} pixels for a model (shorter side {side} px) makes "
                f"{megapixels(resized)} MP, over the pixel budget of {megapixels(budget)} MP",
                f"Raise the budget to at least {math.ceil(resized)} (the default is "
                f"{MAX_PIXELS}) with {RAISE_BUDGET}.")
    if resized > max(budget, w * h):
        return (f"{w} x {h} pixels is too long and thin to resize for a model (its shorter "
                f"side at {side} px would make {megapixels(resized)} MP, over the budget of "
                f"{megapixels(budget)} MP)", "Crop the image to the part that shows the subject.")
    return None


def open_rgb(path: str | Path | BinaryIO, draft: int | None = None,
             name: str | None = None, budget: int | None = None) -> Image.Image:
    """Decode an image as upright 8-bit RGB, whatever its mode or EXIF orientation.

    `draft` lets libjpeg decode a large JPEG at a reduced scale (1/2, 1/4, 1/8) that is
    still at least that many pixels on each side: much faster, and after the resize close
    to a full decode, not identical (libjpeg scales inside its inverse DCT, from each 8 x 8
    block's low frequencies, where a resize filter weighs neighbouring pixels: about 1
    level in 255 on average on photos, more at sharp edges). Training (its decode cache)
    and predict both decode with the same `draft` (the resize before the centre crop), so
    a model sees what it learned from.
    An image over the pixel budget (`max_pixels`, checked from its header, before any
    decoding) is decoded reduced if it is a JPEG that libjpeg can bring under it, and
    refused otherwise: a 15800 x 15800 PNG would take gigabytes to decode. `name`: what
    messages call the image (default: `path`; give one for bytes in memory). `budget`:
    `max_pixels()` where the caller looked it up (another process or thread sees another).
    """
    name = name or str(path)
    try:
        with open_image(path) as im:
            if _planar_wide_tiff(im):  # Pillow 13 reads it, striped and shifted
                raise WingspanError(
                    f"Cannot read image {name}: a TIFF of more than 8 bits per colour stored in "
                    "separate colour planes, which is decoded wrongly here.",
                    hint="Save it again with interleaved (contiguous) colours, or as 8 bits "
                         "per colour.")
            budget, (w, h) = budget or max_pixels(), im.size
            if refused := resize_refused(w, h, budget, draft or VIEW_SIDE):
                said, hint = refused
                raise ImageTooLarge(f"Cannot read image {name}: {said}.", hint=hint)
            if im.format in REDUCIBLE and (draft or w * h > budget):
                # libjpeg's scales: the least that fits the budget, and (for `draft`) the
                # most that keeps the shorter side at least `draft`.
                scale = next((s for s in SCALES if _ceil(w, s) * _ceil(h, s) <= budget), 8)
                if draft:
                    scale = max(scale, max(s for s in SCALES if min(w, h) // s >= draft
                                           or s == 1))
                # Rounded down: libjpeg's size at 1/scale is at least w // scale, so it is
                # this scale that is picked (rounded up, an odd side got the next one up).
                im.draft("RGB", (max(1, w // scale), max(1, h // scale)))
            if im.size[0] * im.size[1] > budget:
                raise ImageTooLarge(
                    f"Cannot read image {name}: {w} x {h} pixels ({megapixels(w * h)} MP) is over "
                    f"the budget of {megapixels(budget)} MP" + (
                        ", even decoded at 1/8 scale" if im.format in REDUCIBLE else "") + ".",
                    hint=f"Shrink the image, or raise the budget ({RAISE_BUDGET}); decoding "
                    "takes about 4 bytes a pixel, several times.")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or ("transparency" in im.info
                                                    and im.mode in ("P", "RGB", "L")):
                # Transparent areas (an alpha channel, or a colour key as in a PNG's tRNS)
                # become white rather than whatever colour they hid.
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                # Stretch 16/32-bit values over 0..255 (Pillow's own conversion to 8 bits
                # clips everything above 255 to white).
                # A float image's NaN or inf is left out of the stretch (one made the
                # whole image black): NaN and -inf count as its lowest value, inf as its
                # highest.
                values = np.asarray(im.convert("F"), dtype=np.float32)
                finite = values[np.isfinite(values)]
                low, high = (finite.min(), finite.max()) if finite.size else (0, 0)
                values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
                grey = (values - low) * (255 / (high - low)) if high > low else values * 0
                return Image.fromarray(grey.round().astype(np.uint8), "L").convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise WingspanError(f"Image not found: {name}") from e
    except UnidentifiedImageError as e:  # Pillow's words name the file again, and no format
        empty = isinstance(path, (str, Path)) and _empty(path)  # a download cut short
        kind = None if empty else _unread_kind(path)
        cut = None if empty or kind else signature_format(path)
        raise WingspanError(
            f"Cannot read image {name}: " + ("the file is empty (0 bytes)." if empty else
            f"{kind}." if kind else f"a {cut} cut short or damaged within its header." if cut
            else "it is not a JPEG, PNG, TIFF, WebP, GIF or BMP image, whatever its name says."),
            hint="Convert it to JPEG or PNG." if kind else
            "Replace or delete the file; `wingspan data inspect` lists all such files.",
        ) from e
    except (OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:  # the last: Pillow's own limit, past the header
        damaged = any(words in str(e).lower() for words in (  # Pillow's words for damage
            "cannot load this image", "broken data stream", "unexpected end", "corrupt",
            "truncated", "could not create decoder object"))  # (the last: WebP's)
        raise WingspanError(
            f"Cannot read image {name}: {e}" + (
                " (the file is cut short or damaged)" if damaged else ""),
            hint="Replace or delete the file; `wingspan data inspect` lists all such files.",
        ) from e


def _planar_wide_tiff(im: Image.Image) -> bool:
    """A TIFF of 16 bits or more per colour in separate planes (PlanarConfiguration 2),
    as scanners and museum workflows write them."""
    if im.format != "TIFF":
        return False
    bits = im.tag_v2.get(258, 8)  # BitsPerSample: one value, or one per colour
    return im.tag_v2.get(284) == 2 and max(bits if isinstance(bits, tuple) else (bits,)) > 8


# Files Pillow does not identify that are images all the same, by their first bytes: said
# as what they are, not as "no image whatever its name says".
_UNREAD_KINDS = ((b"II*\x00", 0, "a TIFF of a kind that cannot be read here (floating-point "
                  "pixels, say)"),
                 (b"MM\x00*", 0, "a TIFF of a kind that cannot be read here (floating-point "
                  "pixels, say)"),
                 (b"ftyphei", 4, "a HEIC photo, which cannot be read here"),
                 (b"ftypmif1", 4, "a HEIC photo, which cannot be read here"),
                 (b"ftyphevc", 4, "a HEIC photo, which cannot be read here"))


# The first bytes of the formats Pillow reads. Pillow does not identify one that stops
# within its header at some bytes (a JPEG at a segment marker, a GIF within its palette):
# such a file is said to be cut short, not "no image whatever its name says".
_READ_SIGNATURES = ((b"\xff\xd8\xff", 0, "JPEG"), (b"\x89PNG", 0, "PNG"), (b"GIF8", 0, "GIF"),
                    (b"WEBP", 8, "WebP"), (b"BM", 0, "BMP"), (b"II*\x00", 0, "TIFF"),
                    (b"MM\x00*", 0, "TIFF"))


def _head(path: str | Path | BinaryIO) -> bytes:
    try:
        if isinstance(path, (str, Path)):
            with open(path, "rb") as f:
                return f.read(16)
        path.seek(0)
        return path.read(16)
    except OSError:
        return b""


def _unread_kind(path: str | Path | BinaryIO) -> str | None:
    head = _head(path)
    if head[:2] in (b"II", b"MM") and _tiff_cut(path, head):
        return None  # a download stopped within the header: no TIFF a converter could read
    return next((kind for magic, at, kind in _UNREAD_KINDS
                 if head[at:at + len(magic)] == magic), None)


def _tiff_cut(path: str | Path | BinaryIO, head: bytes) -> bool:
    """Whether a TIFF's first directory (its offset in bytes 4-8) lies past the file's end."""
    try:
        size = os.path.getsize(path) if isinstance(path, (str, Path)) else path.seek(0, 2)
    except OSError:
        return False
    offset = int.from_bytes(head[4:8], "little" if head[:2] == b"II" else "big")
    return len(head) < 8 or offset + 2 > size


def signature_format(path: str | Path | BinaryIO) -> str | None:
    """The format, of those Pillow reads, that a file's first bytes say it is, else None:
    for a file Pillow did not identify, one cut short (a download stopped within the
    header); for a file named as a phone's photo (.heic), the JPEG it holds."""
    head = _head(path)
    if head[8:12] == b"WEBP" and head[:4] != b"RIFF":
        return None
    if head[:2] == b"BM" and head[6:10].strip(b"\0"):  # a BMP's reserved bytes are zeros:
        return None  # a text that begins "BM" is no BMP
    return next((name for magic, at, name in _READ_SIGNATURES
                 if head[at:at + len(magic)] == magic), None)


@dataclass
class ImageFacts:
    """What inspection learns from one file."""

    path: str
    sha256: str | None = None
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    exif_rotated: bool = False
    error: str | None = None  # set when the file cannot be decoded in full


def image_facts(path: str, budget: int | None = None) -> ImageFacts:
    """Hash the bytes and decode the image completely, so truncation is caught too.
    `budget`: as open_rgb's."""
    facts, budget = ImageFacts(path), budget or max_pixels()
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        facts.error = f"cannot read file: {e.strerror or e}"
        return facts
    facts.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with open_image(path) as im:
            facts.width, facts.height = im.size
            facts.mode, facts.format = im.mode, im.format or ""
            if im.format in REDUCIBLE:  # at 1/8 scale: fast, and still reads all the data
                im.draft(im.mode, (_ceil(im.width, 8), _ceil(im.height, 8)))
            # Checked before anything decodes (a PNG's EXIF is read by decoding it): no bomb.
            if im.size[0] * im.size[1] > budget:
                facts.error = (f"{facts.width} x {facts.height} pixels is over the pixel "
                               f"budget of {megapixels(budget)} MP (raise it with "
                               f"{RAISE_BUDGET})")
                return facts
            # As train, predict and serve refuse it for a model at the usual 224 px (resized
            # to 256 first): inspect knows no model, and at VIEW_SIDE it called a 96 x 96
            # photo unreadable under a budget that the model's own resize fits.
            if refused := resize_refused(facts.width, facts.height, budget, INSPECT_SIDE):
                facts.error = f"{refused[0]}: {refused[1][0].lower()}{refused[1][1:]}"
                return facts
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            # 2-8 turn or mirror the picture; other values (0, 9, 255 from some cameras)
            # are ignored by the decoding that training and predict share, so not listed.
            facts.exif_rotated = orientation in range(2, 9)
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        unknown = isinstance(e, UnidentifiedImageError)  # said as decoding says it:
        kind = unknown and not _empty(path) and _unread_kind(path)  # (a HEIC by its bytes)
        cut = unknown and not kind and signature_format(path)
        facts.error = str(e) if not unknown else (
            "the file is empty (0 bytes)" if _empty(path)
            else kind if kind
            else f"a {cut} cut short or damaged within its header" if cut
            else "not an image (unrecognised format)")
    return facts
