"""pyplot for drawing into files: the Agg backend (no display needed), unless a backend
was chosen in MPLBACKEND. A Jupyter kernel sets its inline backend there, and switching
it to Agg would stop the user's own figures from showing in the notebook."""

import os

import matplotlib

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt"]
