"""Progress bars for long work, silenced for scripts and tests."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

T = TypeVar("T")
console = Console(stderr=True, soft_wrap=True)  # (paths whole in a log: see cli.common)


def _shown(enabled: bool) -> bool:
    """Whether to draw: in a terminal; in Jupyter, where rich draws live bars in an
    ipywidgets widget (one that updates in place; without ipywidgets it would only warn).
    Elsewhere (a log file, a pipe) a bar is not drawn, but left a blank line each.

    A terminal redraws a line: a tty, not TERM=dumb (Emacs' shell: a blank line per bar);
    $FORCE_COLOR, which CI jobs set for colour in their logs, makes no terminal of a log
    (rich then wrote every frame of a bar, \r and cursor codes and all, into it). Where
    $TTY_INTERACTIVE is set (rich's own switch), 1 draws and 0 does not."""
    if not enabled:
        return False
    if console.is_jupyter:
        return importlib.util.find_spec("ipywidgets") is not None
    interactive = os.environ.get("TTY_INTERACTIVE")  # (read here: rich reads it once)
    if interactive in ("0", "1"):
        return interactive == "1"
    return _isatty() and console.is_terminal and not console.is_dumb_terminal


def _isatty() -> bool:
    try:
        return console.file.isatty()
    except (AttributeError, ValueError):  # (no isatty; a file closed at exit)
        return False


def track(items: Iterable[T], description: str, total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """Iterate with a progress bar on stderr (nothing shown when disabled or not a tty)."""
    if not _shown(enabled):
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield from progress.track(items, total=total, description=description)


@contextmanager
def status(description: str, enabled: bool = True) -> Iterator[None]:
    """A spinner with a message on stderr while work with no count runs."""
    if not _shown(enabled):
        yield
        return
    with console.status(description):
        yield


class Bar:
    """A progress bar advanced by hand (for work that is not one loop over items)."""

    def __init__(self, total: int, description: str, enabled: bool = True,
                 units: str = "items"):
        """`units`: "items", or "bytes" (sizes and a transfer speed)."""
        self.enabled = enabled = _shown(enabled)
        if enabled:
            counts = ((DownloadColumn(), TransferSpeedColumn()) if units == "bytes"
                      else (MofNCompleteColumn(),))
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), *counts,
                                     TimeElapsedColumn(), TextColumn("eta"),
                                     TimeRemainingColumn(), console=console, transient=True)
            self.task = self.progress.add_task(description, total=total)

    def __enter__(self) -> Bar:
        if self.enabled:
            self.progress.start()
        return self

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.progress.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()
