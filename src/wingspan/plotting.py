"""Figures drawn straight into files, with matplotlib's Figure rather than pyplot: pyplot
needs a backend, and choosing one here (Agg) switched off a script's or notebook's own
windows and inline figures as soon as wingspan was imported. A Figure made on its own has
no backend and no place in pyplot's list of open figures, so nothing is left to close."""

import re
import threading
import warnings
from collections import Counter
from contextlib import contextmanager
from functools import lru_cache

import matplotlib
import numpy as np
from matplotlib.figure import Figure

__all__ = ["GRADCAM_COLORS", "colormap", "flat_note", "literal_text", "short_name",
           "short_names", "subplots"]

# Grad-CAM's colours: lightness rises with the evidence, so a colour-blind reader (and a
# grey print) reads them in order; jet's red top end is a dark olive to a deuteranope.
GRADCAM_COLORS = "inferno"

# Class names are the user's folder names, and matplotlib reads "$...$" in any text as
# mathematics: "$\foo$" stopped `data inspect` and `evaluate` with a parse error, and "price
# $5-$10" was drawn as "price 5 - 10" in italics. Every function that draws a figure (and
# saves it: tick labels are made as it is drawn) runs under this (`@literal_text()`), which
# leaves the user's own figures in a notebook as they are. One at a time: rc_context sets
# and puts back the process's settings, and the server draws in several threads (pyplot's
# figures are not for threads either).
_DRAWING = threading.RLock()


# A class name in letters the font lacks (CJK, say, where no CJK font is installed) drew one
# warning per letter and figure: 66 lines of evaluate's output. Said once, with what to do.
_GLYPH_MISSING = re.compile(r"Glyph \d+ .*missing from (current )?font")
_FONT_SAID = []


# Fonts with the letters that DejaVu Sans lacks (CJK, Hebrew, Arabic, Indic, Thai), as
# Linux, macOS and Windows name them. matplotlib draws a letter from a later family in
# font.family only when that family is named there, never from any other installed font:
# after the user's own families, those of these that are installed are named.
FALLBACK_FONTS = (
    "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR",
    "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "IPAexGothic",
    "IPAGothic", "TakaoGothic", "Hiragino Sans", "Hiragino Sans GB", "PingFang SC",
    "Apple SD Gothic Neo", "Microsoft YaHei", "Yu Gothic", "Meiryo", "Malgun Gothic",
    "SimHei", "Noto Sans Hebrew", "Noto Sans Arabic", "Noto Sans Devanagari",
    "Noto Sans Thai", "Arial Unicode MS")


@lru_cache(maxsize=1)
def fallback_families() -> tuple[str, ...]:
    """The FALLBACK_FONTS that matplotlib finds installed."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return tuple(name for name in FALLBACK_FONTS if name in installed)


@contextmanager
def literal_text():
    caught: list = []
    families = list(matplotlib.rcParams["font.family"])
    families += [f for f in fallback_families() if f not in families]
    try:
        with _DRAWING, matplotlib.rc_context({"text.parse_math": False,
                                              "font.family": families}), \
                warnings.catch_warnings(record=True) as recorded:
            caught = recorded
            yield
    finally:  # (a drawing that failed still shows what was warned of before)
        _show(caught)


def _show(caught: list) -> None:
    missing = [w for w in caught if _GLYPH_MISSING.search(str(w.message))]
    for w in caught:  # the others, as they would have been shown
        if w not in missing:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing and not _FONT_SAID:
        _FONT_SAID.append(True)
        warnings.warn_explicit(  # (one line: no source line of ours under it)
            "Some class names have letters that the plots' font lacks: the PNGs show them "
            "as boxes. Install a font that has them (e.g. Debian's fonts-noto-cjk), then "
            "delete matplotlib's font cache (~/.cache/matplotlib); a font wingspan does not "
            "know of, name in matplotlibrc's font.family after your first.", UserWarning,
            "wingspan", 0)


def flat_note(heatmap: np.ndarray) -> str:
    """What a map with no region in it means ("" where it has one): all zeros, nothing in
    the image argued for the class; one value, a feature map of one cell (a 32-px image
    on an EfficientNet), which gives no place. Drawn flat, either read as a finding."""
    if heatmap.size and np.ptp(heatmap) > 1e-6:
        return ""
    return ("Grad-CAM: nothing argued for it" if not heatmap.any()
            else "Grad-CAM: one cell at this image size, no region")


def short_name(name: str, most: int = 34) -> str:
    """A name cut in the middle where too long: class names often differ at their end
    (..._00, ..._35), which a cut at the end would hide."""
    if len(name) <= most:
        return name
    keep = most - 1
    return f"{name[:keep - keep // 2]}…{name[-(keep // 2):]}"


def short_names(names: list[str], most: int = 34) -> dict[str, str]:
    """Each name's short_name, made distinct among `names`, which one figure shows: three
    subspecies 'Polyommatus (Lysandra) bellargus / icarus / dorylas ssp. punctifera' all
    read 'Polyommatus (Lysa… ssp. punctifera'. Those that would read alike are cut wider,
    as far as their full names."""
    names = list(dict.fromkeys(names))
    short = {n: short_name(n, most) for n in names}
    longest = max(map(len, names), default=0)
    while most < longest and len(set(short.values())) < len(short):
        most += 6
        seen = Counter(short.values())
        short = {n: short_name(n, most) if seen[s] > 1 else s for n, s in short.items()}
    return short


def subplots(*grid, figsize: tuple[float, float] | None = None, dpi: float | None = None,
             **options):
    """(figure, axes) as `pyplot.subplots` gives them, without pyplot (see above)."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(*grid, **options)


def colormap(name: str):
    return matplotlib.colormaps[name]
