"""Progress bars for long work, silenced for scripts and tests."""

from __future__ import annotations

import importlib.util
import os
import time
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


# Where no bar is drawn (a log, a CI job, `| tee`), long work says how far it has got in a
# plain line at most this often: an epoch, a predict over a folder or an audit said nothing
# for as long as it took, and CircleCI stops a job silent for 10 minutes by default.
LOG_EVERY_S = 60.0


class _Lines:
    """A bar's plain stand-in for a log: "Fine-tune epoch 2/5: 120 of 357 (34%), 1:00"."""

    def __init__(self, description: str, total: int | None, units: str = "items"):
        self.description, self.total, self.units = description, total, units
        self.done, self.start = 0, time.monotonic()
        self.said = self.start

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.said < LOG_EVERY_S:
            return
        self.said = now
        count = (f"{self.done / 2**20:.1f} of {self.total / 2**20:.1f} MB"
                 if self.units == "bytes" and self.total else
                 f"{self.done} of {self.total}" if self.total else str(self.done))
        if self.total:
            count += f" ({self.done / self.total:.0%})"
        minutes, seconds = divmod(int(now - self.start), 60)
        console.print(f"{self.description}: {count}, {minutes}:{seconds:02d}",
                      markup=False, highlight=False)


def track(items: Iterable[T], description: str, total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """Iterate with a progress bar on stderr; where none is drawn (not a terminal), a
    plain line at most every LOG_EVERY_S seconds; nothing when disabled."""
    if not _shown(enabled):
        if not enabled:
            yield from items
            return
        if total is None:
            try:  # (a loader over an iterable dataset has __len__, and raises in it)
                total = len(items)
            except TypeError:
                pass
        lines = _Lines(description, total)
        for item in items:
            yield item
            lines.advance()
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
        # (where no bar is drawn, plain lines for a log: see LOG_EVERY_S)
        self.lines = _Lines(description, total, units) if enabled and not _shown(
            enabled) else None
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
        elif self.lines:
            self.lines.advance(n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()
