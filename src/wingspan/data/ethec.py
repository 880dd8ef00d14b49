"""The ETH Entomological Collection (ETHEC): JSON split files and a tree of images.

Layout: `ROOT/splits/{train,val,test}.json` (or the JSON files in ROOT itself) and
`ROOT/IMAGO_build_test_resized/<image_path>/<image_name>`. Each JSON file is a dict
of records keyed by token. Levels: family, subfamily, genus, species (genus +
specific epithet); the group is the specimen's barcode.

The published split files have flaws this reader reports rather than hides: images
listed twice in one split (the copies are dropped), and images and barcodes present
in two splits (a leak: re-split with `wingspan data split` to remove it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd

from wingspan.config import SPLITS, ReadConfig
from wingspan.data.leaks import find_leaks
from wingspan.data.readers import _keep_existing, register_reader
from wingspan.data.samples import GROUP, PATH, SPLIT, Dataset, Problem
from wingspan.data.taxonomy import binomial
from wingspan.errors import WingspanError, counted

IMAGE_DIR = "IMAGO_build_test_resized"
LEVELS = ["family", "subfamily", "genus", "species"]
TAXA = ["family", "subfamily", "genus", "specific_epithet"]
FIELDS = ["token", "image_path", "image_name", *TAXA, "barcode"]


# A train.json or val.json at the top of DATA is what marks an ETHEC root.
NOT_ETHEC = ("DATA was read as ETHEC because it holds train.json, val.json or test.json; if it "
             "is a folder of class folders, pass --format folder.")


DAMAGED = ("The file looks damaged: download the dataset again (`wingspan data download "
           "ethec`), or mend the record.")


def _split_files(root: Path) -> dict[str, Path]:
    for folder in (root / "splits", root):
        found = {s: folder / f"{s}.json" for s in SPLITS if (folder / f"{s}.json").is_file()}
        if found:
            return found
    return {}


def is_ethec_root(path: Path) -> bool:
    return path.is_dir() and bool(_split_files(path))


def root_near(path: Path) -> tuple[Path, str] | None:
    """The ETHEC root that `path` is part of, or holds, when `path` is not it: what a user
    gives by mistake (a split file, the splits or image folder, or the folder the dataset
    was unpacked in), which read otherwise as 95 classes named after scan dates, as one
    class, or as 19,771 missing images. Then (the root, what `path` is)."""
    if path.is_file():
        root = path.parent.parent if path.parent.name == "splits" else path.parent
        if path.suffix.lower() == ".json" and path.stem in SPLITS and is_ethec_root(root):
            return root, "a split file"
        return None
    if path.name == "splits" and is_ethec_root(path.parent):
        return path.parent, "the folder of the split files"
    if path.name == IMAGE_DIR and is_ethec_root(path.parent):
        return path.parent, "the image folder"
    try:
        if path.is_dir() and not is_ethec_root(path):
            with os.scandir(path) as entries:
                inside = next((Path(e.path) for e in entries if e.is_dir() and
                               is_ethec_root(Path(e.path))), None)
            if inside is not None:
                return inside, "the folder that holds"
    except OSError:  # (a folder it may not list: the reader says so)
        pass
    return None


def _load_split(path: Path, split: str) -> pd.DataFrame:
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except OSError as e:
        raise WingspanError(f"Cannot read the ETHEC split file {path}: {e}",
                            hint=NOT_ETHEC) from e
    except ValueError as e:  # (JSON cut short, or not UTF-8 text)
        if not any((folder / IMAGE_DIR).is_dir() for folder in path.parents[:2]):
            raise WingspanError(f"Cannot read {path} as an ETHEC split file: {e}",
                                hint=NOT_ETHEC) from e  # (another tool's file, say)
        raise WingspanError(f"The ETHEC split file {path} is damaged: {e}", hint=DAMAGED) from e
    if not isinstance(records, dict) or not records:
        raise WingspanError(f"{path} is not an ETHEC split file (a dict of records by token).",
                            hint=NOT_ETHEC)
    odd = next((t for t, r in records.items() if not isinstance(r, dict)), None)
    if odd is not None:  # (none a record: another tool's train.json beside class folders)
        raise WingspanError(f"{path}: record {odd} is not an ETHEC record (field: value), "
                            f"but {_shown(records[odd])}.", hint=DAMAGED if any(
                                isinstance(r, dict) for r in records.values()) else NOT_ETHEC)
    table = pd.DataFrame.from_dict(records, orient="index")
    missing = [f for f in FIELDS if f not in table.columns]
    if missing:
        raise WingspanError(f"{path}: records lack the fields {', '.join(missing)}.",
                            hint=NOT_ETHEC)
    table = table[FIELDS].fillna("").astype(str)
    table[TAXA] = table[TAXA].apply(lambda names: names.str.strip())  # (as species names are)
    table[SPLIT] = split
    return table


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@register_reader("ethec", detect=is_ethec_root)
def read_ethec(root: Path, config: ReadConfig) -> Dataset:
    files = _split_files(root)
    if not files:
        raise WingspanError(
            f"{root} has no ETHEC split files.",
            hint="Expected ROOT/splits/train.json, val.json and test.json.",
        )
    raw = pd.concat([_load_split(p, s) for s, p in files.items()], ignore_index=True)
    problems: list[Problem] = []
    raw = _drop_nameless(_recover_nameless(raw, root, config.check_files, problems), problems)
    raw["image"] = raw["image_path"] + "/" + raw["image_name"]
    raw = _drop_unnamed_taxa(raw, problems)
    raw = _drop_repeats(raw, problems)

    image_root = root / IMAGE_DIR
    table = pd.DataFrame({
        PATH: [str(image_root / i) for i in raw["image"]],
        GROUP: raw["barcode"].where(raw["barcode"] != "", raw["token"]).to_numpy(),
        SPLIT: raw[SPLIT].to_numpy(),
        "family": raw["family"].to_numpy(),
        "subfamily": raw["subfamily"].to_numpy(),
        "genus": raw["genus"].to_numpy(),
        "species": binomial(raw["genus"], raw["specific_epithet"]).to_numpy(),
    })
    _report_cross_split(table, root, problems)  # of every record, whether its file is here or not
    table = _keep_existing(table, config, problems, "the ETHEC split files")
    return Dataset(table, list(LEVELS), root, "ethec", problems)


# An image's name holds its scan date, and its folder is that date with an R (every one of
# the 10,327 named records of the real val and test files): ETHZ_ENT01_2017_03_13_001805.JPG
# sits in 2017_03_13R.
SCAN_NAME = re.compile(r"ETHZ_ENT01_(\d{4}_\d\d_\d\d)_\d+\.jpe?g", re.IGNORECASE)


def _recover_nameless(raw: pd.DataFrame, root: Path, check_files: bool,
                      problems: list[Problem]) -> pd.DataFrame:
    """Records with an empty image_name and the file's name in image_path instead (8 in the
    val and test files, their other fields shifted too, but not the taxa or the barcode;
    the only images of Euphydryas sibirica there among them): read from the folder of the
    scan date the name holds, where the file is there (or files are not checked). Dropped,
    the species left the data unsaid; where the file is not there, they still are, as
    before, rather than each said missing (an error under --strict) on a guess of where it
    lies."""
    raw = raw.copy()
    found = pd.Series(False, index=raw.index)
    blank = raw["image_name"].str.strip() == ""
    for i in raw.index[blank]:
        name = raw.at[i, "image_path"].strip()
        scan = SCAN_NAME.fullmatch(name)
        if scan and (not check_files or (root / IMAGE_DIR / f"{scan[1]}R" / name).is_file()):
            raw.loc[i, ["image_path", "image_name"]] = f"{scan[1]}R", name
            found[i] = True
    for split, part in raw[found].groupby(SPLIT):
        problems.append(Problem("image_name_in_image_path", (
            f"{split}: {counted(len(part), 'record has', 'records have')} an empty image_name "
            "and the file's name in image_path: read from the folder of its scan date, e.g. "
            f"{part['image_path'].iloc[0]}/{part['image_name'].iloc[0]}")))
        problems += [Problem("image_name_in_image_path", f"{split}: record {t} read from {p}/{n}",
                             f"{p}/{n}") for t, p, n in zip(part["token"], part["image_path"],
                                                            part["image_name"], strict=True)]
    return raw


def _drop_nameless(raw: pd.DataFrame, problems: list[Problem]) -> pd.DataFrame:
    """Records without an image_name that `_recover_nameless` could not place point at no
    file: left out and said so, not counted as missing."""
    return _drop_records(
        raw, raw["image_name"].str.strip() == "", "no_image_name", "image_path",
        lambda part: f"{counted(len(part), 'record has', 'records have')} an empty image_name "
                     "(their image_path holds "
                     f"a file name, e.g. {part['image_path'].iloc[0]}): left out, no image "
                     "to read",
        "names no file", problems)


def _drop_unnamed_taxa(raw: pd.DataFrame, problems: list[Problem]) -> pd.DataFrame:
    """Records lacking a family, subfamily, genus or epithet (null or blank: a damaged
    record; the release has none) cannot be placed in the tree that `--levels` trains on:
    left out and said so, by token, not trained on as a blank label."""
    blank = raw[TAXA].eq("")
    return _drop_records(
        raw, blank.any(axis=1), "unnamed_taxon", "image",
        lambda part: f"{counted(len(part), 'record lacks', 'records lack')} a family, "
                     "subfamily, genus or specific epithet (e.g. record "
                     f"{part['token'].iloc[0]}: no {_first_blank(part)}): left out",
        "left out: it lacks a family, subfamily, genus or specific epithet", problems)


def _first_blank(part: pd.DataFrame) -> str:
    return next(t for t in TAXA if part[t].iloc[0] == "").replace("_", " ")


def _drop_repeats(raw: pd.DataFrame, problems: list[Problem]) -> pd.DataFrame:
    """Keep one record per image within each split, reporting every dropped copy; an
    image whose records label it differently keeps none (which label is right cannot be
    told: the CSV reader leaves such rows out alike)."""
    taxa = TAXA
    labels = raw.groupby([SPLIT, "image"])[taxa].transform("nunique").gt(1).any(axis=1)
    raw = _drop_records(
        raw, labels, "conflicting_labels", "image",
        lambda part: f"{counted(part['image'].nunique(), 'image is', 'images are')} listed "
                     f"under different labels (e.g. {_told_apart(part, taxa)}); all "
                     f"{counted(len(part), 'record')} left out",
        "left out: its image is labelled otherwise by another record", problems)
    return _drop_records(
        raw, raw.duplicated(subset=[SPLIT, "image"], keep="first"), "duplicate_record",
        "image", lambda part: f"{counted(part['image'].nunique(), 'image is', 'images are')} "
                              "listed more than once under different tokens; "
                              f"{counted(len(part), 'extra record')} dropped",
        "dropped", problems)


def _told_apart(part: pd.DataFrame, taxa: list[str]) -> str:
    """How the records of the first image in `part` differ: 'image: genus Ga / Gb'."""
    first = part[part["image"] == part["image"].iloc[0]]
    level = next(t for t in taxa if first[t].nunique() > 1)
    return f"{first['image'].iloc[0]}: {level} " + " / ".join(dict.fromkeys(first[level]))


def _drop_records(raw: pd.DataFrame, dropped: pd.Series, kind: str, where: str, summary,
                  each: str, problems: list[Problem]) -> pd.DataFrame:
    """Leave out the `dropped` records: per split one problem that sums them up, then one
    per record (its token; `where` as its path), so that what is counted is records."""
    for split, part in raw[dropped].groupby(SPLIT):
        problems.append(Problem(kind, f"{split}: {summary(part)}"))
        problems += [Problem(kind, f"{split}: record {t} {each}", i)
                     for t, i in zip(part["token"], part[where], strict=True)]
    return raw[~dropped].reset_index(drop=True)


def _report_cross_split(table: pd.DataFrame, root: Path, problems: list[Problem]) -> None:
    """Images and barcodes that sit in two splits leak between training and evaluation.
    Each leak is said once, as training's check counts it (find_leaks): an image listed in
    two splits lists its barcode twice too, which is no leak of its own; a barcode leaks
    through two of its images."""
    leaks = find_leaks(Dataset(table, list(LEVELS), root, "ethec"), by_content=False)
    # (a barcode whose one image is listed in two splits is that image's leak: the count
    # of barcodes is of those with different images on two sides, 116 of the 138 in the
    # ETHEC val and test files, and says so)
    for kind, found, one, many in (("image", leaks.by_path, "image is", "images are"),
                                   ("barcode", leaks.by_group,
                                    "barcode has different images",
                                    "barcodes have different images")):
        if not found:
            continue
        pairs = pd.Series(["+".join(sides) for sides in found.values()]).value_counts()
        where = ", ".join(f"{n} in {p}" for p, n in pairs.items())
        problems.append(Problem(
            f"{kind}_in_two_splits",
            f"{len(found)} {one if len(found) == 1 else many} in more than one split ({where}): "
            "a leak between training and evaluation. `wingspan train` repairs it (each image kept "
            "on one side); `wingspan data split` writes a split without it.",
        ))
