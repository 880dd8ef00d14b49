"""What Jupyter shows: PNGs and HTML that wingspan wrote, and tables as HTML."""

from __future__ import annotations

import base64
import html
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd


class Image:
    """A PNG that wingspan wrote; Jupyter shows it, `path` says where it is."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()  # (a notebook's later %cd must not lose it)

    def _repr_png_(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:  # deleted since: Jupyter shows the repr (the path) instead
            return None

    def __repr__(self) -> str:
        return f"Image({str(self.path)!r})"


class Images(list):
    """Images (a list of them) that Jupyter shows side by side, each under its file name,
    where a plain list shows only their reprs."""

    def _repr_html_(self) -> str:
        return "".join(
            f'<figure style="display:inline-block;margin:4px">'
            f'{_img(image.path, image.path.name, 256)}'
            f'<figcaption>{html.escape(image.path.name)}</figcaption></figure>'
            for image in self)


class Html:
    """A page for Jupyter to show (`_repr_html_`); `source` says what it shows."""

    def __init__(self, text: str, source: str | Path):
        self.text, self.source = text, source

    def _repr_html_(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Html({str(self.source)!r})"


def _img(png: str | Path | bytes, alt: str, width: int | None = None) -> str:
    try:
        data = png if isinstance(png, bytes) else Path(png).read_bytes()
    except OSError as e:  # deleted or moved since it was written: the display goes on
        return f"<p><em>{html.escape(alt)}: {html.escape(str(png))} cannot be read " \
               f"({html.escape(e.strerror or str(e))}).</em></p>"
    size = f" width='{width}'" if width else ""
    return (f"<img alt='{html.escape(alt)}'{size} "
            f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>")


def _plotted(plot: Callable[[Path], Path]) -> bytes:
    """The PNG bytes of a plot function that writes to a path, leaving no file behind."""
    with tempfile.TemporaryDirectory() as tmp:
        return plot(Path(tmp) / "plot.png").read_bytes()


def _kv(title: str, pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                   f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                   for k, v in pairs)
    return f"<b>{html.escape(title)}</b><table>{rows}</table>"


def _frame(frame: pd.DataFrame, floats: str = "{:.3f}") -> str:
    return frame.to_html(border=0, float_format=floats.format)

