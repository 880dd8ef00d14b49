"""pyplot for drawing into files: the Agg backend (no display needed), unless a backend
was chosen in MPLBACKEND. A Jupyter kernel sets its inline backend there, and switching
it to Agg would stop the user's own figures from showing in the notebook."""

import os
import threading
from contextlib import contextmanager

import matplotlib

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["literal_text", "plt", "short_name"]

# Class names are the user's folder names, and matplotlib reads "$...$" in any text as
# mathematics: "$\foo$" stopped `data inspect` and `evaluate` with a parse error, and "price
# $5-$10" was drawn as "price 5 - 10" in italics. Every function that draws a figure (and
# saves it: tick labels are made as it is drawn) runs under this (`@literal_text()`), which
# leaves the user's own figures in a notebook as they are. One at a time: rc_context sets
# and puts back the process's settings, and the server draws in several threads (pyplot's
# figures are not for threads either).
_DRAWING = threading.RLock()


@contextmanager
def literal_text():
    with _DRAWING, matplotlib.rc_context({"text.parse_math": False}):
        yield


def short_name(name: str, most: int = 34) -> str:
    """A name cut in the middle where too long: class names often differ at their end
    (..._00, ..._35), which a cut at the end would hide."""
    if len(name) <= most:
        return name
    keep = most - 1
    return f"{name[:keep - keep // 2]}…{name[-(keep // 2):]}"
