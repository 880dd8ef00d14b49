"""Options that several commands take, declared once: the data read, the engine, devices,
processes, pixel budget and output folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from wingspan.config import MAX_PIXELS, MAX_PIXELS_ENV, UNKNOWN_SCORES, no_such_score


class Panel:
    """The panels `--help` groups options in, named alike in every command and shown in this
    order. What a command alone takes (and --quiet, --help) stays in its first panel,
    "Options"."""

    SERVER = "Server"
    DATA = "Data"  # what is read, and how it is split
    MODEL = "Model"
    TRAINING = "Training"
    UNKNOWN = "Unknown answer"
    ENGINES = "Engines & devices"
    OUTPUT = "Output"

# Options shared by every command that reads a dataset.
Data = Annotated[Path, typer.Argument(
    metavar="DATA",
    help="A folder of class folders, a CSV (path,label,...), or an ETHEC root.",
    show_default=False)]
Format = Annotated[str | None, typer.Option(
    "--format", help="folder | split-folders | csv | ethec (default: detected from DATA).",
    rich_help_panel=Panel.DATA)]
GroupRegex = Annotated[str | None, typer.Option(
    "--group-regex", help="Regex on the file name whose first group keeps images together in "
    r"splits, e.g. '_(\d+)_\d+\.jpg$' for iNaturalist observation ids.",
    rich_help_panel=Panel.DATA)]
Strict = Annotated[bool, typer.Option(
    "--strict/--no-strict",
    help="Stop at a missing or unreadable file instead of skipping and listing it.",
    rich_help_panel=Panel.DATA)]
SplitStrict = Annotated[bool, typer.Option(
    "--strict", help="Stop at a listed file that is missing instead of skipping and listing it "
    "(split opens no image: `data inspect` finds the unreadable ones).",
    rich_help_panel=Panel.DATA)]
# predict's and explain's: the work is done for the rest first, then the exit says so.
StrictAfter = Annotated[bool, typer.Option(
    "--strict", help="Exit 2 where an image was missing or unreadable (after doing the "
    "others); by default it is listed and skipped, and the exit is 0.", rich_help_panel=Panel.DATA)]
Level = Annotated[str | None, typer.Option(
    "--level", help="Label level to use (default: the finest: the class folder's name, or "
    "the CSV's label column).", rich_help_panel=Panel.DATA)]


def check_folder(value: Path | None) -> Path | None:
    check_not_stdout(value)
    if value is not None and value.exists() and not value.is_dir():
        raise typer.BadParameter(f"{value} is a file; name a folder to write into.")
    return value


def check_not_stdout(value: Path | None) -> Path | None:
    """'-' (standard output, for predict's and runs' --output) made a folder named '-'."""
    if value is not None and str(value) == "-":
        raise typer.BadParameter(f"'{value}' is no folder: these outputs are files (PNG, "
                                 "CSV, JSON, a model); name a folder to write them into.")
    return value


OutDir = Annotated[Path | None, typer.Option(
    "--out", callback=check_folder, help="Output folder (default: runs/data/<dataset name>).",
    rich_help_panel=Panel.OUTPUT)]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress bars or step-by-step lines (train's line per epoch); "
    "what the figures lack is still said.")]
Runtime = Annotated[str, typer.Option(
    help="Engine for passes with frozen weights: auto (the fastest, measured once per model "
    "and machine; see `wingspan doctor`) | torch | onnx. $WINGSPAN_RUNTIME sets auto.",
    rich_help_panel=Panel.ENGINES)]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="auto (a GPU when there is one) | cpu | cuda | cuda:N.",
    rich_help_panel=Panel.ENGINES)]
Devices = Annotated[int | None, typer.Option(
    help="Processes on this machine, one per GPU (or CPU processes): Lightning Fabric starts "
    "them (default: as torchrun started them, else 1).", show_default=False,
    rich_help_panel=Panel.ENGINES)]
Nodes = Annotated[int | None, typer.Option(
    help="Machines in the run (run the same command on each, or under SLURM / torchrun).",
    show_default=False, rich_help_panel=Panel.ENGINES)]
Strategy = Annotated[str, typer.Option(help="auto | ddp.", rich_help_panel=Panel.ENGINES)]


def _set_max_pixels(value: int | None) -> int | None:
    if value is not None:  # the environment reaches the data-loading worker processes too
        os.environ[MAX_PIXELS_ENV] = str(value)
    return value


MaxPixels = Annotated[int | None, typer.Option(
    "--max-pixels", min=1, callback=_set_max_pixels, show_default=False,
    help=f"Pixel budget of one image (default {MAX_PIXELS / 1e6:.0f} MP): larger JPEGs are "
    "decoded reduced, other images refused.", rich_help_panel=Panel.DATA)]


def _check_unknown_score(value: str | None) -> str | None:
    """A name that is no unknown score at all (`maha`) is said at once: it was said once
    torch and the model had loaded (5-8 s). One that this model lacks is said once it is
    read, in the same words."""
    if value is not None and value not in UNKNOWN_SCORES:
        raise no_such_score(value, list(UNKNOWN_SCORES))
    return value


UnknownScoreOpt = Annotated[str | None, typer.Option(
    help="The unknown score to use, of those the model holds: msp | energy | mahalanobis | "
    "knn | msp+knn (default: the model's own, set by training or calibrate --unknown).",
    callback=_check_unknown_score, show_default=False, rich_help_panel=Panel.UNKNOWN)]
Precision = Annotated[str, typer.Option(
    help="auto (measured, like --runtime) | fp32 | bf16 | fp16. $WINGSPAN_PRECISION sets "
    "auto.", rich_help_panel=Panel.ENGINES)]


# Every command that reads images through a data loader; checked by resolve_workers.
BatchSize = Annotated[int, typer.Option(min=1, help="Images per batch.",
                                        rich_help_panel=Panel.ENGINES)]
# train's and data audit's backbone weights
Weights = Annotated[str, typer.Option(
    help="auto (offline first) | none | a weights file | a wingspan run or model (its "
    "fine-tuned backbone; --backbone auto takes its architecture).",
    rich_help_panel=Panel.MODEL)]
Workers = Annotated[int | None, typer.Option(
    help="Data workers (0: read the images in this process; default: per machine).",
    show_default=False, rich_help_panel=Panel.ENGINES)]
Model = Annotated[Path, typer.Argument(metavar="RUN",
                                        help="A run folder (runs/NAME) or a model bundle.",
                                        show_default=False)]
