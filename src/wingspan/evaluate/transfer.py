"""--map: a class map checked against the model and the data, and each class's recall on
the run's own data beside its recall on the data evaluated (the transfer figures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from wingspan.config import ReadConfig
from wingspan.data import read_dataset
from wingspan.data.csvfiles import name_as_read
from wingspan.data.samples import Dataset
from wingspan.errors import WingspanError, some
from wingspan.evaluate.answers import predicted_classes
from wingspan.evaluate.rows import default_split, split_rows
from wingspan.inference import Predictor, spelt_as_trained
from wingspan.training.folder import SPLITS_FILE


def check_class_map(class_map: dict[str, str], predictor: Predictor, dataset: Dataset,
                     level: str) -> dict[str, str]:
    """`class_map` with the model's classes as it spells them: 'monarch' names a model's
    'monarch ' (see `spelt_as_trained`), as the data's own 'monarch' matches it."""
    spelt = spelt_as_trained(predictor).get(predictor.level, {})
    class_map = {spelt.get(name_as_read(ours), name_as_read(ours))
                 if ours not in predictor.classes else ours: name_as_read(theirs)
                 for ours, theirs in class_map.items()}
    held = set(dataset.table[level])
    ours = [c for c in class_map if c not in predictor.classes]
    theirs = [c for c in class_map.values() if c not in held]
    if ours or theirs:
        raise WingspanError(
            "--map (class_map= in Python) names " + " and ".join(filter(None, [
                f"classes the model does not know ({', '.join(ours)})" if ours else "",
                f"classes the data does not have at level '{level}' ({', '.join(theirs)})"
                if theirs else ""])) + ".",
            hint=_map_slips(class_map, predictor.classes, held) + "Write --map "
            "MODEL_CLASS=DATA_CLASS (in Python: class_map={model class: data class}). The "
            f"model knows: {some(predictor.classes)}; the data has: {some(sorted(held))}.")
    if len(set(class_map.values())) < len(class_map):
        theirs = next(t for t in class_map.values() if list(class_map.values()).count(t) > 1)
        ours = [o for o, t in class_map.items() if t == theirs]
        raise WingspanError(
            f"--map (class_map= in Python) gives the data class '{theirs}' to {len(ours)} of "
            "the model's classes "
            f"({some(ours)}): each of its images would be right for one and wrong for the "
            "other.", hint="Map each data class to one model class.")
    # The data's classes named as the model's match without a map: one of those mapped
    # to, or from, another name would give a model class two data classes.
    mapped = set(class_map.values())
    alike = {spelt.get(c, c): c for c in set(dataset.table[level])}  # model's: data's name
    joined = [(ours, theirs) for ours, theirs in class_map.items()
              if alike.get(ours, theirs) != theirs and alike[ours] not in mapped]
    if joined:
        ours, theirs = joined[0]
        own = alike[ours]
        raise WingspanError(f"--map {own}={theirs} (class_map= in Python) would score the "
                            f"data's '{theirs}' and its own '{own}' both as the model's "
                            f"'{ours}'.",
                            hint=f"Map the data's '{own}' too (to another of the model's "
                                 f"classes), or leave {own}={theirs} out.")
    return class_map


def _map_slips(class_map: dict[str, str], model: list[str], data: set[str]) -> str:
    """The likely slips of a --map that names unknown classes, for its hint: the sides
    swapped ('monarch=001-danaus_plexippus'), a name in another case, or a typo
    ('azure_spotwng': the nearest name of its side, as a mistyped run folder is told)."""
    import difflib

    if all(ours in data and theirs in model for ours, theirs in class_map.items()):
        return "The sides look swapped: the model's class comes first. "
    # Each name against its own side's: a model class is no data class (a genus model's
    # --map azure_spotwing=AZURE_SPOTWING offered the data's name as the model's).
    unknown = [(given, side) for names, side in ((class_map, model),
                                                 (class_map.values(), sorted(data)))
               for given in names if given not in side]
    meant = [f"'{name}' for '{given}'" for given, side in unknown
             if (name := {n.casefold(): n for n in side}.get(given.casefold())) is not None]
    typos = [f"'{near[0]}' for '{given}'" for given, side in unknown
             if given.casefold() not in {n.casefold() for n in side}
             and (near := difflib.get_close_matches(given, side, n=1, cutoff=0.8))]
    return ((f"Did you mean {', '.join(meant)} (names differ in case)? " if meant else "")
            + (f"Did you mean {', '.join(typos)}? " if typos else ""))


def transfer_table(predictor: Predictor, run_dir: Path | None, class_map: dict[str, str],
                   here: pd.DataFrame, progress: bool, named: dict[str, float] | None = None,
                   tta: bool = False) -> tuple[pd.DataFrame, dict | None]:
    """Each class's recall (in `class_map`, {model class: data class}) on the run's own
    data (its test split, else val) beside its recall on the data evaluated (both with
    TTA or both without): the drop per class; and which of the run's splits that was, of
    how many images, how many of them could not be read (gone since: the run folder copied
    to another machine, say), or None without the run's folder. `named`: per class, the
    share of its images here that the unknown answer names a class for."""
    recall_here = dict(zip(here["class"], here["recall"], strict=True))
    support_here = dict(zip(here["class"], here["support"], strict=True))
    home, said = {}, None
    if run_dir is not None:
        # (its files are predicted, not checked first: gone ones are counted, not fatal)
        own = read_dataset(run_dir / SPLITS_FILE, ReadConfig(check_files=False))
        split = default_split(own)
        rows = split_rows(own, split, predictor.level, predictor)
        rows = rows[rows["_label"].isin(list(class_map))]
        preds = list(predictor.run(rows["path"].tolist(), tta=tta, progress=progress))
        said = {"split": split, "images": len(preds),
                "unreadable": sum(bool(p.error) for p in preds)}
        for label, p in zip(rows["_label"], preds, strict=True):
            if not p.error:
                hits = home.setdefault(label, [])
                answered = predicted_classes(predictor, p.probs[None], predictor.temperature)[0]
                hits.append(predictor.classes[int(answered)] == label)
    frame = pd.DataFrame([
        {"model class": ours, "data class": theirs,
         "recall on own data": float(np.mean(home[ours])) if home.get(ours) else np.nan,
         # None of its images here: no recall to compare (not a recall of 0)
         "recall here": recall_here[ours] if support_here.get(ours) else np.nan,
         "images here": int(support_here.get(ours, 0))}
        for ours, theirs in class_map.items()])
    # (in the order the terminal and the report show them)
    frame.insert(4, "drop", frame["recall on own data"] - frame["recall here"])
    if named is not None:
        frame["named here"] = [named.get(ours, np.nan) for ours in class_map]
    return frame, said
