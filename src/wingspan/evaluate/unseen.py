"""The images of classes a model never saw (`evaluate --unknown`, or those `train
--holdout-classes` left out): found, and checked before any work."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pandas as pd

from wingspan.data.csvfiles import name_as_read
from wingspan.data.readers import is_image_name
from wingspan.errors import WingspanError, some
from wingspan.evaluate.fairness import copies_among, sums_by_size
from wingspan.files import disk_spelling, real_paths
from wingspan.inference import Predictor
from wingspan.predict import expand_paths
from wingspan.training.folder import HOLDOUT_FILE


def unseen_paths(unknown) -> tuple[list[str], list[tuple[str, str]]]:
    """The images of `--unknown` (a folder, files or globs, or a list of them), checked
    before anything is predicted, and those that are no image (a HEIC photo), with why."""
    inputs = [str(unknown)] if isinstance(unknown, str | Path) else [str(u) for u in unknown]
    paths, missing = expand_paths(inputs)
    if not paths:
        raise WingspanError(f"No images of unseen classes in {', '.join(inputs)}"
                            + (f": {missing[0][1]}." if missing else "."),
                            hint="Give a folder of images of classes the model never saw.")
    # A misspelt folder among several would otherwise only shrink the figures' image count.
    # A missing image file (one of --holdout-classes' images, deleted since) is counted
    # unreadable, as an unreadable one is.
    named = [(p, why) for p, why in missing if p in inputs and why.startswith("no such file")
             and (not is_image_name(Path(p).name) or any(c in p for c in "*?"))]
    if named:
        raise WingspanError(f"Among the unseen classes' images given, {named[0][0]}: "
                            f"{named[0][1]}.", hint="Check the path: the figures would be "
                            "of fewer images than given. Give folders, files or globs.")
    return paths, missing


def held_out_by(run_dir: Path | None) -> set[str]:
    """The images of the classes `train --holdout-classes` left out of the run (its
    holdout.csv), which it scores as unknowns itself: chosen from the data's classes by
    name, so not checked as a folder given to --unknown is (a class 'Admiral' held out
    beside 'admiral', a photo saved in a held-out class and a known one too, which the
    split warned of, are the data's, not a slip; the run then failed at its very end)."""
    held = run_dir / HOLDOUT_FILE if run_dir else None
    return set(pd.read_csv(held)["path"]) if held and held.is_file() else set()


def held_out_among(run_dir: Path | None, unknown_paths: list[str]) -> dict[str, int]:
    """{class: images} of the classes `train --holdout-classes` left out, where those are
    the unseen images scored (else {}): the report named them nowhere but in paths."""
    held = run_dir / HOLDOUT_FILE if run_dir else None
    if not held or not held.is_file():
        return {}
    table = pd.read_csv(held, dtype=str, keep_default_na=False)
    if len(table.columns) < 2 or not set(unknown_paths) <= set(table["path"]):
        return {}
    counts = table[table["path"].isin(unknown_paths)][table.columns[1]].value_counts()
    return {str(c): int(n) for c, n in sorted(counts.items())}


def check_unseen(unknown_paths: list[str], known_paths, predictor: Predictor,
                 class_map: dict[str, str] | None = None) -> None:
    """Images of `--unknown` that are in the evaluated split, or sit in a folder named
    after one of the model's classes (DATA given as --unknown, say) or, with `class_map`
    ({model class: data class}), after a data class mapped to one, would count a right
    answer against the unknown answer's figures."""
    # The finest level only: an unseen species is rightly filed under a known genus. Names
    # as folders read now: a model's 'monarch ' (see `spelt_as_trained`) is 'monarch'.
    # (in any case: 'Azure_Spotwing' holds azure_spotwing's photos as surely)
    known = {name_as_read(c).casefold(): c for c in predictor.classes}
    known.update({name_as_read(theirs).casefold(): f"{theirs} (--map: {ours})"
                  for ours, theirs in (class_map or {}).items()
                  if name_as_read(theirs).casefold() not in known})
    named = sorted({known[folder] for p in unknown_paths
                    if (folder := name_as_read(Path(p).parent.name).casefold()) in known})
    if named:
        raise WingspanError("The --unknown images (unknown= in Python) include folders named "
                            f"after classes the model knows: {some(named, 5)}.",
                            hint="Give a folder of images of classes the model never saw "
                                 "(rename a folder that only shares a name).")
    resolved = set(real_paths(known_paths))
    both = [p for p, real in zip(unknown_paths, real_paths(unknown_paths), strict=True)
            if real in resolved]
    if both:
        raise WingspanError(f"{len(both)} of the --unknown images (unknown= in Python) are "
                            f"also among the images of known classes evaluated, e.g. "
                            f"{both[0]}.",
                            hint="Give a folder of images of classes the model never saw.")
    # Copies of them (the same bytes) score as they do: AUROC 0.54 on 8 copied test images.
    sizes = set()
    for path in disk_spelling(unknown_paths):
        with contextlib.suppress(OSError):
            sizes.add(os.path.getsize(path))
    copies = copies_among(set(unknown_paths), sums_by_size(known_paths, sizes))
    if copies:
        raise WingspanError(f"{copies} of the --unknown images (unknown= in Python) "
                            + ("is a copy" if copies == 1 else "are copies")
                            + " (the same bytes) of images of known classes evaluated.",
                            hint="Give a folder of images of classes the model never saw.")
