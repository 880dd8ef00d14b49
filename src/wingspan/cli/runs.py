"""`wingspan runs`: the runs of a folder side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wingspan.cli.app import app
from wingspan.cli.common import check_output_file, folded_table, here, out, plain
from wingspan.cli.options import Panel
from wingspan.config import RUNS_DIR
from wingspan.errors import command, counted


@app.command("runs")
def runs_command(
    runs_dir: Annotated[Path, typer.Argument(metavar="RUNS_DIR",
        help="The folder `wingspan train` wrote its runs into (its --runs-dir).")]
    = Path(RUNS_DIR),
    sort: Annotated[str | None, typer.Option(
        help="Order by this column (a header, or one of the CSV: name, status, val_macro_f1, "
        "held_out_macro_f1, train_seconds, seed...); scores best first, the rest ascending "
        "(default: created, oldest first).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        help="Write every column to a .csv or .json file, or the table and a figure of "
             "the runs' val F1 per epoch to a self-contained .html page; - writes the CSV "
             "to standard output (for a pipe).", rich_help_panel=Panel.OUTPUT)] = None,
) -> None:
    """List the runs in RUNS_DIR side by side: status, data, backbone, seed, the val figure
    the best epoch was chosen on and the fair held-out one, training time."""
    from wingspan.run_table import (
        FAILED,
        LOCK_UNREADABLE,
        SET_UP,
        STOPPED,
        run_table,
        sort_column,
        write_run_table,
    )

    if output and str(output) != "-":
        check_output_file(output, (".csv", ".json", ".html"))
    frame = run_table(runs_dir, sort)
    chosen = bool(sort) and sort_column(frame, sort) == "held_out_macro_f1" and \
        frame["held_out_macro_f1"].notna().sum() > 1
    if output and output.suffix.lower() == ".html":
        _write_page(frame, output, runs_dir, chosen)
    elif output:
        write_run_table(frame, output)
    if str(output) == "-":  # the CSV alone on standard output, for a pipe
        return
    if frame.empty:
        out.print(f"No runs in {plain(runs_dir)}.")
    else:
        out.print(_runs_table(frame))
        beneath = [] if _wide() else _beneath(frame)
        if beneath:  # (a column folded a word a line)
            out.print("What differs among them (split: a held-out figure of another split "
                      "is of other images):")
            for name, changes in beneath:
                out.print(f"  {plain(name)}: {plain(changes)}")
        if chosen:
            out.print(plain(_CHOICE_SPENT))
        if (frame["status"] == STOPPED).any():
            out.print("A stopped run continues with "
                      f"`{plain(command('train', '--resume', Path(runs_dir) / 'NAME'))}`.")
        if (frame["status"] == SET_UP).any():
            out.print("A run killed while set up trained nothing: delete its folder.")
        if (frame["status"] == FAILED).any():
            out.print("A failed run stopped at the error shown (its train.log says more): "
                      "fix that and `--resume` it, or delete it.")
        if (frame["status"] == LOCK_UNREADABLE).any():
            out.print("A run whose .lock cannot be read may or may not be training now: "
                      "ask its owner (or for read access to its .lock).")
    if said := _unreadable_said(frame):
        out.print(plain(said))
    if output:
        out.print(f"Wrote {plain(output)}")


# (the test split is fair to one run; a choice among several spends it, as the epoch's
# choice spends val)
_CHOICE_SPENT = ("Choosing a run by its held-out F1 makes that figure optimistic too: choose "
                 "by val F1, or score the chosen one on data no choice has seen "
                 f"(`{command('evaluate', 'RUN', 'OTHER_DATA')}`).")


def _write_page(frame, path: Path, runs_dir: Path, chosen: bool) -> None:
    """runs.html: the wide table's columns, their caption, and the runs' curves."""
    import pandas as pd

    from wingspan.evaluate.report import write_runs_page
    from wingspan.run_table import status_text

    columns = [(header, cell) for header, cell, _ in _RUN_COLUMNS]
    cells = pd.DataFrame([[cell(r) for _, cell in columns] for r in frame.to_dict("records")],
                         columns=[header for header, _ in columns], dtype=object)
    # A page has room for a failed run's whole error (the terminal's first words)
    cells["status"] = [status_text(s, d if _given(d) else None)
                       for s, d in zip(frame["status"], frame["detail"], strict=True)]
    notes = [*([_caption(True)] if len(frame) else []), *([_CHOICE_SPENT] if chosen else []),
             _unreadable_said(frame)]
    write_runs_page(path, f"wingspan runs: {runs_dir}", frame, cells, [n for n in notes if n])


def _unreadable_said(frame) -> str | None:
    """Which folders this user may not read: left out of the table (run_table)."""
    if unreadable := frame.attrs.get("unreadable"):
        return (f"Not listed: {counted(len(unreadable), 'folder')} this user may not read "
                f"({', '.join(unreadable)}); ask the owner for read access.")
    return None


# `wingspan runs`' columns: header, the cell of a row, and whether it is shown in a narrow
# terminal (80 columns, or a pipe) too, where the others would squeeze every cell to "0.…".
_RUN_COLUMNS = [
    ("run", lambda r: r["name"], True),
    ("status", lambda r: _status_cell(r), True),
    ("data", lambda r: here(r["data"]) if _given(r["data"]) else "", False),
    ("backbone", lambda r: _cell(r["backbone"]), True),
    ("levels", lambda r: _cell(r["levels"]), False),
    ("size", lambda r: _cell(r["image_size"]), False),
    ("seed", lambda r: _cell(r["seed"]), True),
    ("selection", lambda r: _cell(r["selection"]), False),
    ("val F1", lambda r: f"{r['val_macro_f1']:.4f}" if _given(r["val_macro_f1"]) else "",
     True),
    ("held-out F1 (images)", lambda r: _held_out(r), True),
    ("best", lambda r: f"{r['best_stage']} {r['best_epoch']}" if _given(r["best_stage"])
     else "", True),
    ("seconds", lambda r: f"{r['train_seconds']:.1f}" if _given(r["train_seconds"]) else "",
     False),
    ("created", lambda r: str(r["created"])[:16], False),
    # What tells runs of one command apart: the settings that differ among them
    ("changes", lambda r: _cell(r["changes"]), False),
]


def _runs_table(frame):
    from rich import box

    from wingspan.run_table import (
        ADAPTED,
        DONE,
        LOCK_UNREADABLE,
        SET_UP,
        STOPPED,
        TRAINING,
    )

    wide = _wide()
    shown = [c for c in _RUN_COLUMNS if wide or c[2]]
    table = folded_table(*(header for header, _, _ in shown), box=box.SIMPLE_HEAD)
    colours = {DONE: "green", ADAPTED: "green", TRAINING: "cyan", STOPPED: "yellow",
               SET_UP: "yellow", LOCK_UNREADABLE: "yellow"}  # and red: damaged
    for r in frame.to_dict("records"):
        cells = [plain(cell(r)) for _, cell, _ in shown]
        cells[1] = f"[{colours.get(r['status'], 'red')}]{cells[1]}[/]"
        table.add_row(*cells)
    table.caption = _caption(wide)
    return table


def _caption(wide: bool) -> str:
    return ("val F1: the macro-F1 the best epoch was chosen on (optimistic); held-out F1: on "
            "the split nothing was chosen on, once `wingspan evaluate RUN` has scored it"
            + ("; changes: the settings that differ among the runs (split: a held-out "
               "figure of another split is of other images)" if wide else "")
            + ("" if wide else "; data, size, selection, seconds and created in a wider "
               "terminal or with --output"))


# Columns left out of `changes` that a narrow terminal does not show: said beneath where
# they differ (runs on two datasets, at 64 and 96 px, or of --levels family,species and of
# species alone read alike there, and a held-out sort ranked them together).
_HIDDEN_SETTINGS = ("data", "levels", "image_size", "selection")


def _beneath(frame) -> list[tuple[str, str]]:
    """Each run's differences as listed beneath a narrow table: `changes`, after the
    hidden columns' settings where they differ among the runs."""
    varying = [c for c in _HIDDEN_SETTINGS if frame[c].dropna().nunique() > 1]
    rows = []
    for r in frame.to_dict("records"):
        said = [f"{c}={here(r[c]) if c == 'data' else _cell(r[c])}" for c in varying
                if _given(r[c])]
        said += [r["changes"]] if _given(r["changes"]) else []
        if said:
            rows.append((r["name"], " ".join(said)))
    return rows


def _wide() -> bool:
    """Room for every column; else the main ones (and `changes` beneath the table)."""
    return out.width >= 150


def _given(value) -> bool:
    import pandas as pd

    return value is not None and not pd.isna(value)


def _cell(value) -> str:
    if not _given(value):
        return ""
    return f"{value:.4f}" if isinstance(value, float) and not value.is_integer() else str(value)


def _status_cell(row: dict) -> str:
    from wingspan.run_table import status_text

    detail = row["detail"] if _given(row["detail"]) else None
    # A failed run's whole error took 70 lines of a narrow terminal: its first words here
    # (all of it in train.log and --output).
    if isinstance(detail, str) and len(detail) > DETAIL_CHARS:
        detail = detail[:DETAIL_CHARS - 3].rstrip() + "..."
    return status_text(row["status"], detail)


DETAIL_CHARS = 60


def _held_out(row: dict) -> str:
    from wingspan.run_table import ADAPTED, DONE

    if _given(row["held_out_macro_f1"]):
        images, unread = row.get("held_out_images"), row.get("held_out_unreadable")
        return f"{row['held_out_macro_f1']:.4f}" + (
            "" if not _given(images) else f" ({images:.0f} of {images + unread:.0f})"
            if _given(unread) and unread else f" ({images:.0f})")
    if row["status"] not in (DONE, ADAPTED):
        return ""
    if not _given(row["held_out_split"]):
        return "none kept"
    # (evaluated, and found not fair: an adapted run scored on photos it adapted on)
    evaluated = _given(row["held_out_evaluated"]) and bool(row["held_out_evaluated"])
    return "not fair (see evaluate)" if evaluated else "not evaluated"
