"""Pieces of the self-contained pages of photo cards that wingspan writes: `data audit`'s
gallery and predict's page. The thumbnails are embedded, so that one file is the whole page
(sent by mail, opened on a phone); the decoding is data.images', as training's."""

from __future__ import annotations

import base64
import html
import io
import os
import re
from pathlib import Path
from urllib.parse import quote

from wingspan.data.images import open_rgb
from wingspan.errors import WingspanError

# A phone lays a page without it out 980 px wide, its text a third of its size.
VIEWPORT = "<meta name='viewport' content='width=device-width, initial-scale=1'>"
# (cards at least 130 px: two a row down to a 320 px phone, where a pair, two columns
# wide, would otherwise widen the page)
# (overflow-wrap on .c: a species name has no space to wrap at, and one of 24 letters,
# "Pseudochazara_telephassa", ran over the next card's at 1280 px)
CARDS_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em}
.g{display:grid;grid-template-columns:repeat(auto-fill,minmax(130px,1fr));gap:12px}
.c{border:1px solid #ddd;padding:5px;min-width:0;overflow-wrap:anywhere}
.pair{grid-column:span 2}
.c img{width:100%;height:auto;aspect-ratio:1;object-fit:contain;background:#f4f4f4}
.pair img{width:calc(50% - 3px)}.s{color:#b00}
.m{color:#666;font-size:12px}.m+.m{margin-top:.3em}td,th{padding:.1em 1em .1em 0;text-align:left}"""


def thumbnail_uri(path: str, size: int = 160) -> str:
    """The image at most `size` px a side, as a data: URI of a JPEG ("" if unreadable)."""
    try:
        image = open_rgb(path, draft=size)
    except WingspanError:
        return ""
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def breakable(text) -> str:
    """`text` escaped for HTML, with a place to break after each _ / \\ and -: a species
    folder (Heteropterus_morpheus) or a path has no space, and overflow-wrap cut it a letter
    before the card's edge ("Heteropterus_m" over "orpheus"); a part wider than the card is
    still cut (overflow-wrap on .c)."""
    return re.sub(r"([_/\\-])", r"\1<wbr>", html.escape(str(text)))


def cards_page(title: str, body: str) -> str:
    """The whole page: `body` (HTML) under the cards' style."""
    return spelt_out(f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>"
                     f"{html.escape(title)}</title>{VIEWPORT}<style>{CARDS_STYLE}</style></head><body><main>{body}</main></body>"
                     "</html>")


def spelt_out(page: str) -> str:
    """`page` with a name in bytes that are not UTF-8 (b'caf\\xe9.jpg', from a zip made on
    Windows) spelt out ('caf\\udce9.jpg'), as the CSVs spell it: it stopped the page's write
    (predict's, once every image was predicted; runs', at a folder it may not read)."""
    return page.encode("utf-8", "backslashreplace").decode("utf-8")


def relative_link(file: Path, folder: Path) -> str:
    return Path(os.path.relpath(Path(file).resolve(), Path(folder).resolve())).as_posix()


def href(file: Path, folder: Path) -> str:
    """A link from a page in `folder`: relative where the two share a folder (they move
    together), else the file's own URI (another drive, or ../../../ up to / and down)."""
    file, folder = Path(file).resolve(), Path(folder).resolve()
    try:
        shared = os.path.commonpath([file, folder]) != file.anchor
    except ValueError:  # (another drive, on Windows)
        shared = False
    # (the name's own bytes: one that is not UTF-8, b'caf\xe9.jpg', stopped quote())
    return quote(os.fsencode(relative_link(file, folder))) if shared else file.as_uri()
