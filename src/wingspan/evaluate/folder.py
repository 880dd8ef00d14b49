"""The evaluation's folder: its default name and place in the run, and writing it whole (a
folder beside, moved in place at the end), so that a failed evaluation leaves the last."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from wingspan.data.samples import Dataset, folder_of
from wingspan.errors import WingspanError, some
from wingspan.files import PATH_TEXT, fitting_name, replace_folder
from wingspan.inference import Predictor, output_home
from wingspan.training.folder import hold_lock, release_lock


def evaluation_name(data_name: str, split: str, other_data: bool, tta: bool,
                    unknown: bool = False, score: str | None = None) -> str:
    """The default folder of an evaluation: evaluation-SPLIT for the run's own data,
    evaluation-NAME-SPLIT for other DATA, then "-unknown" with --unknown images (the
    figures under metrics.json's `unknown`), "-SCORE" with an --unknown-score other than
    the model's own, and "-tta" with TTA, so that no variant writes over another (a user
    compares them side by side; a plain rerun keeps the unknown figures). Training's
    --holdout-classes writes evaluation-unknown, which none of these is."""
    name = (f"evaluation-{fitting_name(data_name, 150)}-{split}" if other_data
            else f"evaluation-{split}")  # (a folder's name may take 255 bytes itself)
    if unknown:
        name += "-unknown"
    if score:
        name += f"-{score}"
    return f"{name}-tta" if tta else name


def default_out(predictor: Predictor, dataset: Dataset, split: str, data, tta: bool,
                unknown, unknown_score: str | None) -> Path:
    """The evaluation's folder in the run (see `evaluation_name`). A score other than the
    bundle's own changes what the answer is (named, predictions.csv): it is named too."""
    score = (predictor.unknown_score
             if unknown_score and predictor.unknown_score != predictor.unknown.score else None)
    folder = output_home(predictor.bundle) / evaluation_name(
        dataset.name, split, data is not None, tta, unknown is not None, score)
    return folder if data is None else folder_of(folder, dataset.root)


@contextlib.contextmanager
def writing(final: Path):
    """The folder to write the evaluation in: one beside `final`, moved in place when the
    block ends (`replace_folder`). A failed evaluation removes it, and one killed outright
    (SIGKILL) leaves it: the previous results stay whole, never half of both. A lock file
    beside it keeps a second evaluation into `final` (the same command twice at once)
    from writing in the same folder: it is refused while this one runs."""
    _check_out_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = f".{final.name}.lock"
    if not hold_lock(final.parent, lock, again=False):
        raise WingspanError(f"Another `wingspan evaluate` is writing {final} now.",
                            hint="Wait for it to finish, then evaluate again (or give "
                                 "another --out).")
    try:
        out_dir = final.with_name(f".{final.name}.partial")
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        (out_dir / MARKER).write_text("written by wingspan evaluate; replaced whole by the "
                                      "next\n", **PATH_TEXT)
        try:
            yield out_dir
            # What it wrote, so that the next one can tell a file the user put here since
            # (notes beside the figures), which it would delete, and refuse instead.
            written = sorted(str(f.relative_to(out_dir)) for f in out_dir.rglob("*")
                             if f.is_file() and f.name != MARKER)
            with open(out_dir / MARKER, "a", **PATH_TEXT) as f:
                f.write("".join(f"{name}\n" for name in written))
            replace_folder(out_dir, final)
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
    finally:
        release_lock(final.parent, lock)


MARKER = ".wingspan-evaluation"  # in every evaluation folder: only such a folder is replaced


def _check_out_dir(final: Path) -> None:
    """The output folder is replaced whole, so it must be new, empty, or an earlier
    evaluation's: never a run folder or a user's folder of other files."""
    name = final.resolve().name
    if not name or name in (".", ".."):
        raise WingspanError(f"--out {final} cannot be an evaluation folder.",
                            hint="Give a new folder, e.g. --out evaluations/test")
    if final.exists() and not final.is_dir():
        raise WingspanError(f"--out {final} is a file; the evaluation writes a folder.",
                            hint="Give a new or empty folder, or an earlier evaluation's.")
    if final.exists() and any(final.iterdir()) and not (final / MARKER).is_file():
        raise WingspanError(f"--out {final} already holds files that are not an evaluation's; "
                            "the evaluation replaces its folder whole.",
                            hint="Give a new or empty folder, or an earlier evaluation's.")
    if (final / MARKER).is_file():  # an earlier evaluation's: the files it wrote, listed
        listed = (final / MARKER).read_text(**PATH_TEXT).splitlines()[1:]
        added = sorted(str(f.relative_to(final)) for f in final.rglob("*") if f.is_file()
                       and f.name != MARKER and str(f.relative_to(final)) not in listed)
        if listed and added:
            raise WingspanError(f"{final} holds files the evaluation there did not write: "
                                f"{some(added, 5)}; this one would replace the folder whole.",
                                hint="Move them out first, or give this one another --out.")
