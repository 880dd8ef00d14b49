"""Readers turn a dataset on disk into one sample table; a registry picks the reader.

Formats:
- folder: `DATA/<class>/<image>`, optional `DATA/taxonomy.csv` (higher levels) and
  `DATA/splits.csv` (`path,label,split`, a fixed split);
- split-folders: `DATA/<train|val|test>/<class>/<image>`, the layout of Ultralytics,
  Keras and Kaggle (`valid` and `validation` are val): a fixed split;
- csv: `path,label[,split][,group][,<level>...]`, paths relative to the CSV;
- ethec: the ETHEC collection (see `wingspan.data.ethec`).
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from wingspan.config import IMAGE_EXTENSIONS, SPLITS, ReadConfig
from wingspan.data.csvfiles import name_as_read, nfc, read_csv
from wingspan.data.samples import GROUP, PATH, SPLIT, Dataset, Problem, make_table
from wingspan.data.taxonomy import (
    TAXONOMY_FILE,
    apply_taxonomy,
    coarse_to_fine,
    read_taxonomy,
)
from wingspan.errors import WingspanError, command, counted, some
from wingspan.files import disk_spelling, real_paths

Reader = Callable[[Path, ReadConfig], Dataset]
READERS: dict[str, Reader] = {}
# Folder layouts a reader recognises (name -> test), tried before the plain class folders.
DETECTORS: dict[str, Callable[[Path], bool]] = {}
SPLITS_FILE = "splits.csv"
LABEL = "label"
# Top folders that name a side of a fixed split, as other tools' layouts spell them.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test"}
# Files that wingspan writes at the top of its output folders: a folder holding one is
# wingspan's output (`runs/` when a command ran inside DATA), not a class.
OUTPUT_MARKERS = ("manifest.json", "summary.json", "demo_config.json")


def register_reader(name: str, detect: Callable[[Path], bool] | None = None
                    ) -> Callable[[Reader], Reader]:
    """Add a reader; `detect` says whether a folder is in its layout."""
    def add(fn: Reader) -> Reader:
        READERS[name] = fn
        if detect is not None:
            DETECTORS[name] = detect
        return fn

    return add


def detect_format(path: Path) -> str:
    """Which reader fits DATA, judged from what it is."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return "csv"
        # A spreadsheet saved as itself, or as Excel's "Text (Tab delimited)"
        sheet = suffix in (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")
        raise WingspanError(
            f"Cannot tell the dataset format of the file {path}.",
            hint=("Save the sheet as CSV (in Excel: File > Save As > CSV UTF-8) and give "
                  "that file." if sheet else
                  "If it is a table of path and label (tabs or semicolons are fine), read "
                  "it as one with --format csv (format='csv' in Python)."
                  if suffix in (".tsv", ".txt", ".tab") else
                  "Give a folder of class folders, a .csv file, or an ETHEC root, "
                  "or name the format with --format (format= in Python)."),
        )
    return next((name for name, detect in DETECTORS.items() if detect(path)), "folder")


def read_dataset(path: str | Path, config: ReadConfig | None = None) -> Dataset:
    """Read any supported dataset into a `Dataset`; problems are listed, not hidden."""
    config = config or ReadConfig()
    path = Path(path).expanduser()
    if not path.exists():
        raise WingspanError(
            f"No dataset at {path}: the path does not exist.",
            hint="Check the spelling, or give the folder that holds one folder per class.",
        )
    if config.format in (None, "ethec"):
        _check_not_in_ethec(path.resolve())  # (`.` inside the image folder, a link to it)
    fmt = config.format or detect_format(path)
    if fmt not in READERS:
        raise WingspanError(
            f"Unknown dataset format '{fmt}'.", hint=f"Choose one of: {', '.join(READERS)}."
        )
    dataset = _without_names_not_utf8(READERS[fmt](path.resolve(), config))
    _check_not_empty(dataset, path)
    dataset.group_regex = config.group_regex
    return dataset


def _check_not_in_ethec(path: Path) -> None:
    """A part of an ETHEC dataset, or the folder around one, given for the dataset."""
    from wingspan.data.ethec import IMAGE_DIR, root_near

    near = root_near(path)
    if near is not None:
        root, what = near
        raise WingspanError(
            f"{path} is {what} the ETHEC dataset at {root}." if what.endswith("holds") else
            f"{path} is {what} of the ETHEC dataset at {root}, not the dataset itself.",
            hint=f"Give {root} as DATA: it holds the split files and {IMAGE_DIR}.")


NOT_UTF8 = ("its name, or a folder's above it, is not UTF-8 text (as a zip made on Windows or "
            "an old network share writes accents), which a run's splits.csv and plots cannot "
            "hold; left out: rename it (`convmv -f cp1252 -t utf-8 -r FOLDER` shows the "
            "UTF-8 names, and renames the files once told to)")


def shown_utf8(name: str) -> str:
    """A name that is not UTF-8 text, with its odd bytes spelt out ('caf\\udce9.jpg'): what
    a CSV or JSON of skipped files can hold."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def is_utf8(text: str) -> bool:
    """Whether a name can be written as UTF-8: a file name of other bytes (b'caf\\xe9.jpg')
    comes to Python as a lone surrogate, which every UTF-8 writer refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _without_names_not_utf8(dataset: Dataset) -> Dataset:
    """The rows whose path, group and labels are UTF-8 text; the others listed as problems
    (they crashed the run's splits.csv, predict's CSV and the plots, after the work)."""
    table = dataset.table
    names = (PATH, GROUP, *dataset.levels)
    # As a rule all are: one encode a column says so (8 ms at 48k rows, not 150 row by row).
    if all(is_utf8("\n".join(table[column].astype(str).tolist())) for column in names):
        return dataset
    # The names within the data (DATA's own place is the user's to name: a run's files
    # can still hold it, and inspect and predict read such a place as before).
    root = str(dataset.root if dataset.root.is_dir() else dataset.root.parent) + os.sep

    def within(path: str) -> str:
        return path[len(root):] if path.startswith(root) else path

    columns = [table[column].astype(str) for column in names]
    columns[:2] = [column.map(within) for column in columns[:2]]  # (the path and group)
    bad = ~np.logical_and.reduce([column.map(is_utf8).to_numpy() for column in columns])
    if not bad.any():
        return dataset
    dataset.problems += [Problem("name_not_utf8", NOT_UTF8, shown_utf8(path))
                         for path in table.loc[bad, PATH]]
    return dataset.subset(~bad)


def _check_not_empty(dataset: Dataset, path: Path) -> None:
    if len(dataset) == 0:
        missing = sum(p.kind == "missing_file" for p in dataset.problems)
        loose = sum(p.kind == "not_in_class_folder" for p in dataset.problems)
        message = f"The dataset at {path} has no usable images."
        hint = "Put images in one folder per class: DATA/<class>/<image>.jpg"
        if path.is_file():  # a CSV: its rows, not folders, name the images
            unlabelled = sum(p.kind == "no_label" for p in dataset.problems)
            conflicting = sum(p.kind == "conflicting_labels" for p in dataset.problems)
            hint = ("List one image per row under the header: path,label"
                    + (f" ({counted(unlabelled, 'row')} with an empty label left out)"
                       if unlabelled else "")
                    + (f" ({counted(conflicting, 'image')} listed with two labels left out)"
                       if conflicting else "") + ".")
        if missing:
            first = next(p.path for p in dataset.problems if p.kind == "missing_file")
            windows = re.search(r"(^|[\\/])[A-Za-z]:[\\/]", first)  # C:\photos, read here
            hint = (f"All {missing} listed images are missing, e.g. {first}"
                    + (": a Windows path, which this machine cannot open; write the paths "
                       "relative to the CSV's folder" if windows else
                       ": check where the paths point" + (" (a relative path is read from "
                                                          "the CSV's folder)"
                                                          if path.is_file() else ""))
                    + ". `data inspect --metadata-only` reads the labels alone.")
        elif not_utf8 := sum(p.kind == "name_not_utf8" for p in dataset.problems):
            hint = f"All {counted(not_utf8, 'image')} were left out: {NOT_UTF8}."
        elif loose:  # a folder of photos, or one class's folder, given as DATA
            message = (f"{path} has no class folders: its {counted(loose, 'image')} lie in "
                       "it directly, and an image's class is the name of its folder.")
            hint = (f"Sort them into one folder per class, {path}/<class>/<image>.jpg (or, "
                    f"if {path} is one class's folder, give the folder above it).")
        raise WingspanError(message, hint=hint)


def _group_keys(paths: list[str], regex: str | None) -> tuple[list[str], list[Problem]]:
    """The group of each file: the regex's first group on the file name, else the file."""
    if not regex:
        return list(paths), []
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise WingspanError(f"--group-regex '{regex}' is not a valid regex: {e}") from e
    groups, problems = [], []
    for p in paths:
        m = pattern.search(os.path.basename(p))
        # The first group that took part: with `a(\d+)|b(\d+)` one of the two is None.
        key = next((g for g in m.groups() if g is not None), None) if m and pattern.groups \
            else (m.group(0) if m else None)
        if key is not None:
            groups.append(key)
        else:
            groups.append(p)
            problems.append(Problem("group_unmatched", "group regex does not match; file is "
                                    "its own group", p))
    if paths and len(problems) == len(paths):  # a slip in the regex, not ungrouped photos
        raise WingspanError(
            f"--group-regex '{regex}' matches none of the {counted(len(paths), 'file name')} "
            f"(e.g. {os.path.basename(paths[0])}): nothing would be grouped.",
            hint="It is searched in each file's name (not its folders); its first group "
                 r"is the key, e.g. '_(\d+)_\d+\.' for inat_123_1.jpg.")
    keys = {g for g, p in zip(groups, paths, strict=True) if g is not p}
    if not pattern.groups and len(paths) > 1 and len(keys) == 1 and not problems:
        # a whole match the same for every file ('\.jpg$'), where a group was meant
        raise WingspanError(
            f"--group-regex '{regex}' gives all {counted(len(paths), 'file')} the one group "
            f"'{keys.pop()}': nothing could be split.",
            hint="Put the part that names a specimen or observation in parentheses: its "
                 r"first group is the key, e.g. '_(\d+)_\d+\.' for inat_123_1.jpg.")
    return groups, problems


def _keep_existing(
    table: pd.DataFrame, config: ReadConfig, problems: list[Problem], where: str
) -> pd.DataFrame:
    """Drop rows whose file is missing, listing each one (an error under --strict)."""
    if not config.check_files:
        return table
    exists = table[PATH].map(os.path.isfile).astype(bool)  # (empty: object, read as columns)
    # A list typed or exported elsewhere spells in one character (NFC) the 'é' that macOS
    # wrote in two (NFD), or the other way; one made on Windows or macOS may write a name in
    # another case ('.JPG' for '.jpg'), which they read as one: so is it here, and said.
    for any_case in (False, True):
        if exists.all():
            break
        table = table.copy()
        rows = exists.index[~exists]
        spelt = pd.Series(disk_spelling(table.loc[rows, PATH], any_case), index=rows)
        rows = rows[spelt.map(os.path.isfile).astype(bool).to_numpy()]
        if GROUP in table:  # a photo's own group is its path: the same file's, spelt so
            own = rows[(table.loc[rows, GROUP] == table.loc[rows, PATH]).to_numpy()]
            table.loc[own, GROUP] = spelt[own]
        problems += [Problem("name_case_differs", f"listed in {where} as "
                             f"'{_differing_end(table.at[i, PATH], spelt[i])}': read as "
                             f"'{_differing_end(spelt[i], table.at[i, PATH])}', which differs "
                             "in case only (as Windows and macOS read it)", spelt[i])
                     for i in rows if any_case]
        table.loc[rows, PATH] = spelt[rows]
        exists[rows] = True
        # Two rows of one file in two spellings: a repeat as any other (one label to it).
        # (Rows repeated as written were dealt with already, and are again alike.)
        if (table.loc[exists, PATH].duplicated(keep=False)
                & table.loc[exists, PATH].isin(set(spelt[rows]))).any():
            keep, repeats = _repeated_paths(table, table[PATH].tolist())
            problems += repeats
            table, exists = (table[keep].reset_index(drop=True),
                             exists[keep].reset_index(drop=True))
    missing = table.loc[~exists, PATH].tolist()
    if missing and config.strict:
        raise WingspanError(
            f"{counted(len(missing), 'image')} listed in {where} "
            + ("does not exist:" if len(missing) == 1 else "do not exist, e.g.")
            + f" {missing[0]}",
            hint="Fix the paths, or drop --strict to skip and list them.",
        )
    problems += [Problem("missing_file", f"listed in {where}, but " + (
        "a folder, not an image file" if os.path.isdir(p) else "not found"), p)
        for p in missing]
    return table[exists].reset_index(drop=True)


def _differing_end(path: str, other: str) -> str:
    """The end of `path` from the first of its last names that differs from `other`'s
    (`MONARCH/m0.jpg` for a folder spelt otherwise, not 'm0.jpg' against 'm0.jpg')."""
    mine, theirs = Path(path).parts, Path(other).parts
    same = 0
    while same < min(len(mine), len(theirs)) and mine[-1 - same] == theirs[-1 - same]:
        same += 1
    return str(Path(*mine[max(0, len(mine) - same - 1):]))


def _with_taxonomy(
    table: pd.DataFrame, levels: list[str], folder: Path, problems: list[Problem]
) -> tuple[pd.DataFrame, list[str]]:
    """Add higher levels from `folder/taxonomy.csv` when there is one."""
    tax_path = folder / TAXONOMY_FILE
    if not tax_path.is_file():
        return table, levels
    table, added, tax_problems = apply_taxonomy(table, LABEL, read_taxonomy(tax_path), tax_path)
    problems += tax_problems
    return table, added + levels


def _is_output(folder: Path) -> bool:
    """Whether `folder` is wingspan's own output: one it wrote into (--out), or `runs/` with
    `data/<name>/summary.json` or `<run>/manifest.json` inside, which a command run from
    inside DATA leaves there. (A few stats per class folder: no listing of its images.)"""
    try:  # (a folder we may not enter: Python 3.11's is_file raises, not False)
        if any((folder / marker).is_file() for marker in OUTPUT_MARKERS):
            return True
        return folder.name == "runs" and any(
            next(folder.glob(f"{deep}{marker}"), None) is not None
            for marker in OUTPUT_MARKERS for deep in ("*/", "*/*/"))
    except OSError:  # a class folder then, whose images are listed as lost (images_under)
        return False


# Photos that cameras and phones write in formats Pillow does not read: said as such, not
# as files that are no images (an iPhone's default is HEIC).
UNREADABLE_PHOTOS = {".heic": "HEIC", ".heif": "HEIF", ".cr2": "Canon RAW",
                     ".cr3": "Canon RAW", ".nef": "Nikon RAW", ".arw": "Sony RAW",
                     ".dng": "DNG RAW", ".raf": "Fujifilm RAW", ".orf": "Olympus RAW",
                     ".rw2": "Panasonic RAW"}
# What Windows writes into photo folders (thumbnail caches, folder settings): skipped as
# hidden files are, not listed as files that are not images.
FILE_MANAGER_JUNK = {"thumbs.db", "ehthumbs.db", "desktop.ini"}


def is_file_manager_file(path: Path) -> bool:
    """A file a file manager leaves behind (.DS_Store, a Mac's ._photo.jpg, Thumbs.db):
    no one's work, unlike other hidden files and folders (.git, notes)."""
    return path.is_file() and (path.name == ".DS_Store" or path.name.startswith("._")
                               or path.name.lower() in FILE_MANAGER_JUNK)


def unsupported_photo(path: str) -> str | None:
    """Why a photo in a camera's or phone's own format is left out (by its extension), or
    None for any other file, and for one whose bytes are an image read here."""
    kind = UNREADABLE_PHOTOS.get(os.path.splitext(path)[1].lower())
    if not kind or _photo_in_disguise(path):
        return None
    return f"a {kind} photo, which cannot be read here; ignored (convert it to JPEG)"


def is_image_name(name: str) -> bool:
    """A file a folder's search takes: an image's extension, not hidden, not junk."""
    return (not _hidden(name) and name.lower() not in FILE_MANAGER_JUNK
            and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)


def is_image_file(path: str) -> bool:
    """is_image_name, or a JPEG (PNG...) under a phone photo's name (x.heic), which some
    exports and converters keep: read by its bytes, as a CSV's row and serve read it (a
    folder skipped it, and predict called it a HEIC photo)."""
    name = os.path.basename(path)
    return is_image_name(name) or (
        not _hidden(name) and os.path.splitext(name)[1].lower() in UNREADABLE_PHOTOS
        and _photo_in_disguise(path))


def _photo_in_disguise(path: str) -> bool:
    from wingspan.data.images import signature_format  # (Pillow: not for every import)

    return signature_format(path) is not None


# Folders that systems, not users, put among photos: a Mac zip's copies, a Synology NAS's
# thumbnails of every photo (CLASS/@eaDir/IMG.jpg/SYNOPHOTO_THUMB_M.jpg: read, they tripled
# the demo and put each test photo's thumbnails in train), NAS and Windows recycle bins and
# snapshots. (Lower case: Windows and macOS names are case-blind.)
SYSTEM_FOLDERS = frozenset({"__macosx", "@eadir", "#recycle", "#snapshot", "@recycle",
                            "@recently-snapshot", "$recycle.bin", "system volume information",
                            "lost+found"})


def _hidden(name: str) -> bool:
    """Not the user's pictures: hidden files and folders (.DS_Store, ._IMG.jpg,
    .ipynb_checkpoints) and the folders of SYSTEM_FOLDERS."""
    return name.startswith(".") or name.lower() in SYSTEM_FOLDERS


def _top_folders(root: Path, problems: list[Problem]) -> list[Path]:
    """The class (or split) folders of `root`: not hidden, not wingspan's output."""
    folders = []
    for d in sorted(root.iterdir()):
        if _hidden(d.name):
            continue
        if not d.is_dir():
            if d.is_symlink() and not d.exists():  # an external disk not mounted, say
                problems.append(Problem("missing_file", f"a link to {os.readlink(d)}, which "
                                        "is not there: a class folder that cannot be read; "
                                        "ignored", str(d)))
            elif d.suffix.lower() in IMAGE_EXTENSIONS:
                problems.append(Problem("not_in_class_folder", "an image outside the class "
                                        "folders has no class; ignored", str(d)))
            continue
        if _is_output(d):
            problems.append(Problem("not_a_class", "holds wingspan's output, not a class; "
                                    "ignored (run commands outside DATA, or pass --out)",
                                    str(d)))
            continue
        folders.append(d)
    return _without_links_to_others(root, folders, problems)


def _without_links_to_others(root: Path, folders: list[Path], problems: list[Problem]
                             ) -> list[Path]:
    """`folders` less the links into another of them, to the data itself or above it, or to
    a folder an earlier link leads to: read as a class of their own, their photos took two
    labels ("the same picture in two class folders"), and the link was not named. A link to
    a folder elsewhere (or to a hidden one in the data, read as no class) is a class."""
    def inside(path: str, folder: str) -> bool:
        try:
            return os.path.commonpath([path, folder]) == folder
        except ValueError:  # (on Windows, another drive)
            return False

    if not any(d.is_symlink() for d in folders):  # (the usual case: nothing resolved)
        return folders
    classes = [os.path.realpath(d) for d in folders if not d.is_symlink()]
    data = os.path.realpath(root)
    kept, targets = [], []
    for d in folders:
        target = os.path.realpath(d)
        if d.is_symlink() and (any(inside(target, c) for c in classes) or inside(data, target)
                               or target in targets):
            problems.append(Problem("link_not_followed", f"a link to {target}, "
                                    + ("which another link leads to" if target in targets
                                       else "another class folder, or the data itself")
                                    + ": not read as a class of its own (its images would "
                                    "take two labels); delete the link", str(d)))
            continue
        targets += [target] if d.is_symlink() else []
        kept.append(d)
    return kept


def images_under(folder: Path, problems: list[Problem], within: Path | None = None
                 ) -> list[str]:
    """Every image below `folder`, in subfolders too; symlinked folders are followed (once),
    hidden files and folders (`_hidden`) and the junk of file managers skipped, anything
    else listed as a problem. A linked folder is not followed where it leads up the tree
    (above `folder`: every other class's photos would become this class's too) or, with
    `within` (the dataset's root), into another of its folders (another class's). A folder
    that cannot be listed (permissions) is listed as a problem, its images as lost."""
    found, seen = [], set()
    here = os.path.realpath(folder)
    root = os.path.realpath(within) if within is not None else None
    def unreadable(error: OSError) -> None:  # os.walk would skip it without a word
        problems.append(Problem("unreadable_folder", "a folder that cannot be listed "
                                f"({error.strerror or error}): its images are left out; "
                                "check its permissions", error.filename))

    for top, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not _hidden(d)
                   and not _link_elsewhere(os.path.join(top, d), here, root, problems)]
        for name in files:
            if _hidden(name) or name.lower() in FILE_MANAGER_JUNK:
                continue
            f = os.path.join(top, name)
            if not os.path.isfile(f):
                problems.append(
                    Problem("missing_file", f"{_dead_link(f)}; ignored", f) if os.path.islink(f)
                    else Problem("not_image", "not a regular file (a pipe, socket or device); "
                                 "ignored", f))
            elif is_image_name(name):
                found.append(f)
            elif why := unsupported_photo(f):  # (its bytes read once: 20k HEICs on a share)
                problems.append(Problem("unsupported_photo", why, f))
            elif os.path.splitext(name)[1].lower() in UNREADABLE_PHOTOS:
                found.append(f)  # a JPEG under a phone photo's name (see is_image_file)
            else:
                problems.append(Problem("not_image", "not an image file extension; ignored", f))
    return [str(p) for p in sorted(map(Path, found))]


def _dead_link(path: str) -> str:
    """What a link that leads to no file leads to: nothing, or itself (a loop of links, to
    mend by pointing one of them at a file, not by finding a missing one)."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a loop of links"
    return "a link to nothing"


def _link_elsewhere(path: str, folder: str, root: str | None,
                    problems: list[Problem]) -> bool:
    """Whether `path` is a link to a folder that images_under must not follow (said as a
    problem): one above `folder`, or another part of the dataset `root`."""
    if not os.path.islink(path):
        return False
    target = os.path.realpath(path)
    up = os.path.commonpath([target, folder]) == target != folder  # (itself: a loop, no harm)
    beside = root is not None and not up and os.path.commonpath([target, root]) == root \
        and os.path.commonpath([target, folder]) != folder
    if up or beside:
        problems.append(Problem("link_not_followed", f"a link to {target}, "
                                + ("a folder above it" if up else "another part of the data")
                                + ": not followed (its images would count for this class "
                                "too)", path))
    return up or beside


def _class_folders(root: Path, config: ReadConfig, problems: list[Problem]
                   ) -> tuple[list[str], list[str]]:
    """Paths and labels of `root/<class>/...`; images in nested folders count for their top
    class folder, whose name (in NFC) is the label."""
    paths, labels = [], []
    spelt: dict[str, str] = {}  # label -> the first folder name read as it
    for class_dir in _top_folders(root, problems):
        found = images_under(class_dir, problems, within=root)
        paths += found
        label = name_as_read(class_dir.name)  # as a CSV's labels: "monarch " is "monarch"
        other = spelt.setdefault(label, class_dir.name)
        if other.strip() != class_dir.name.strip():  # (spaces are said as label_stripped)
            # 'Bläuling' copied from a Mac (ä as a + umlaut) beside one typed here
            problems.append(Problem("classes_merged", f"the class folders '{other}' and "
                                    f"'{class_dir.name}' are one name in two Unicode spellings "
                                    f"(as macOS and others write accents): read as one class "
                                    f"'{label}'", str(class_dir)))
        if label != nfc(class_dir.name) and found:
            problems.append(Problem("label_stripped", f"class folder '{class_dir.name}' has "
                                    f"spaces at its ends; read as the class '{label}'",
                                    str(class_dir)))
        labels += [label] * len(found)
        _note_nested_classes(class_dir, label, found, problems)
        if not found:
            inside = str(class_dir) + os.sep
            photos = sum(p.kind == "unsupported_photo" and p.path.startswith(inside)
                         for p in problems)
            locked = any(p.kind == "unreadable_folder" and (p.path + os.sep).startswith(inside)
                         for p in problems)
            problems.append(Problem(
                "empty_class", f"class folder '{class_dir.name}' has no images"
                + (f" it can read ({counted(photos, 'photo')} in a format that cannot be read: "
                   "convert them to JPEG)" if photos else "")
                + (" it may list (check its permissions)" if locked and not photos else "")
                + "; the class is left out. Add images or remove the folder.", str(class_dir)))
            if config.strict:
                raise WingspanError(f"Class folder {class_dir} has no images (--strict).",
                                    hint="Add images or remove the folder; without --strict "
                                    "the class is left out and listed.")
    gone = [p.path for p in problems if p.kind == "missing_file"]
    if gone and config.strict:  # as a CSV's missing rows: the README's promise of --strict
        raise WingspanError(f"{counted(len(gone), 'link')} in the class folders of {root} "
                            f"{'leads' if len(gone) == 1 else 'lead'} to no image, e.g. "
                            f"{gone[0]} (--strict).",
                            hint="Mend or remove the links; without --strict they are "
                                 "skipped and listed.")
    # 'admiral' and 'Admiral' cannot sit side by side on macOS or Windows: two folders
    # merged from elsewhere, most likely one species.
    problems += [Problem("classes_differ_in_case", "the classes " + " and ".join(
        visible(n) for n in names) + f" differ only in {how_names_differ(names)}, and are read as "
        f"{len(names)} classes; rename the folders alike to make them one", str(root))
        for names in _case_twins(labels)]
    return paths, labels


def _case_twins(names) -> list[list[str]]:
    """The names that differ only in case ('admiral', 'Admiral') or in what hardly shows:
    spacing ('red  admiral', a copied web page's no-break or zero-width space), the width
    of CJK letters ('ｱｹﾞﾊ', 'アゲハ') or an invisible mark (the right-to-left mark a copy of
    Hebrew text may bring), in sets of two or more."""
    by_case: dict[str, set[str]] = {}
    for name in set(names):
        by_case.setdefault(name_look(name), set()).add(name)
    return sorted(sorted(n) for n in by_case.values() if len(n) > 1)


def name_look(name: str) -> str:
    """A name as it reads: compatibility forms folded (NFKC), format characters (Unicode
    category Cf: direction marks, zero-width spaces and joiners) and spacing dropped, and
    case folded. (Without spaces: two names one space apart are one species mistyped.)"""
    shown = "".join(c for c in unicodedata.normalize("NFKC", name)
                    if unicodedata.category(c) != "Cf" and not c.isspace())
    return shown.casefold()


def how_names_differ(names: list[str]) -> str:
    """How twins from _case_twins differ, for the message."""
    return ("case" if len({n.casefold() for n in names}) == 1
            else "case, spacing, width or invisible marks")


def visible(name: str) -> str:
    """A name quoted so that what does not show does: 'red\\u00a0admiral' for a no-break
    space, each invisible mark as its code point (two twins would otherwise read alike)."""
    return "'" + "".join(
        (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        if unicodedata.category(c) == "Cf" or (c.isspace() and c != " ")
        else c for c in name) + "'"


def _note_nested_classes(class_dir: Path, label: str, found: list[str],
                         problems: list[Problem]) -> None:
    """A class folder whose images all sit in several subfolders (family/species/...):
    they count as the top folder's class, which a user who sorted by species must know."""
    inside = [f[len(str(class_dir)) + 1:] for f in found]  # (strings: 48k Paths are slow)
    if any(os.sep not in f for f in inside):  # images of its own: the class is this folder
        return
    subs = {f.split(os.sep, 1)[0] for f in inside}
    if len(subs) > 1:
        problems.append(Problem(
            "nested_classes", f"class folder '{class_dir.name}' holds its images in "
            f"{len(subs)} subfolders (e.g. '{min(subs)}'), all read as the class '{label}'. "
            f"To tell the subfolders apart, give {class_dir} as DATA, or a CSV "
            "(path,label,<coarser level>).", str(class_dir)))


@register_reader("folder")
def read_folder(root: Path, config: ReadConfig) -> Dataset:
    """`root/<class>/<image>`; images in nested folders count for their top class folder."""
    if not root.is_dir():
        raise WingspanError(f"{root} is not a folder.", hint="Use --format csv for a CSV file.")
    problems: list[Problem] = []
    paths, labels = _class_folders(root, config, problems)
    groups, group_problems = _group_keys(paths, config.group_regex)
    problems += group_problems
    table = make_table(paths, {LABEL: labels}, groups)
    table, levels = _with_taxonomy(table, [LABEL], root, problems)
    if (root / SPLITS_FILE).is_file():
        table = _fixed_splits(table, root / SPLITS_FILE, problems, config.group_regex)
    return Dataset(table, levels, root, "folder", problems)


def _is_split_layout(root: Path) -> bool:
    """`train/` holding class folders, beside only val/valid/validation/test folders (a
    Kaggle test/ of unlabelled images, or an empty val/, included)."""
    folders = _top_folders(root, [])
    train = [d for d in folders if d.name.lower() == "train"]
    return (bool(train) and all(d.name.lower() in SPLIT_FOLDERS for d in folders)
            and _has_subfolders(train[0]))


def _has_subfolders(folder: Path) -> bool:
    return any(c.is_dir() and not _hidden(c.name) for c in folder.iterdir())


@register_reader("split-folders", detect=_is_split_layout)
def read_split_folders(root: Path, config: ReadConfig) -> Dataset:
    """`root/<train|val|test>/<class>/<image>`: each image's side is its top folder."""
    if not root.is_dir():
        raise WingspanError(f"{root} is not a folder.", hint="Use --format csv for a CSV file.")
    problems: list[Problem] = []
    paths, labels, sides = [], [], []
    classes: dict[str, set[str]] = {}  # a class -> the split folders that hold it
    for split_dir in _top_folders(root, problems):
        side = SPLIT_FOLDERS.get(split_dir.name.lower())
        if side is None:
            raise WingspanError(
                f"{split_dir} is not a split folder: in this layout every top folder is one "
                f"of {', '.join(SPLIT_FOLDERS)}.",
                hint="Move it, or read DATA as class folders with --format folder.")
        if side != "train" and not _has_subfolders(split_dir):
            loose = images_under(split_dir, [])
            if loose:  # Kaggle's test/: images to name, not to train or test on
                problems.append(Problem(
                    "unlabelled_split", f"{counted(len(loose), 'image')} with no class "
                    f"folder: unlabelled, so not read (`{command('predict', 'RUN', split_dir)}` "
                    "names them)", str(split_dir)))
            continue
        found, found_labels = _class_folders(split_dir, config, problems)
        paths += found
        labels += found_labels
        sides += [side] * len(found)
        for label in set(found_labels):
            classes.setdefault(label, set()).add(f"{split_dir.name}/")
    # Twins within one split folder are said by _class_folders; across two (train/monarch,
    # valid/Monarch) they would be two classes, one with no training image.
    problems += [Problem("classes_differ_in_case", "the classes " + " and ".join(
        f"{visible(n)} (in {', '.join(sorted(classes[n]))})" for n in names) + " differ only in "
        f"{how_names_differ(names)}, and are read as {len(names)} classes; rename the folders "
        "alike to make them one", str(root)) for names in _case_twins(classes)
        if not any(classes[a] & classes[b] for a, b in itertools.combinations(names, 2))]
    groups, group_problems = _group_keys(paths, config.group_regex)
    problems += group_problems
    table = make_table(paths, {LABEL: labels}, groups, sides)
    table, levels = _with_taxonomy(table, [LABEL], root, problems)
    return Dataset(table, levels, root, "split-folders", problems)


def _fixed_splits(table: pd.DataFrame, splits_csv: Path, problems: list[Problem],
                  group_regex: str | None = None) -> pd.DataFrame:
    """Take the split of each image (and its group, from a `group` column) from a
    `path,...,split` file beside the class folders. A file's class is its folder's: a
    `label` that says otherwise is reported, not used."""
    fixed = read_csv(splits_csv, key=PATH)
    if PATH not in fixed.columns or SPLIT not in fixed.columns:
        problems.append(Problem("splits_file_ignored", "has no path and split columns; ignored",
                                str(splits_csv)))
        return table
    fixed = _as_written(fixed, splits_csv.parent)
    _check_split_values(fixed, splits_csv)
    # Both sides resolved alike, so that a class folder reached through a symlink matches.
    root = splits_csv.parent
    fixed = fixed.assign(_key=real_paths(root / _native(p, root) for p in fixed[PATH]))
    keys = real_paths(table[PATH])  # in NFC, as the keys above
    read = set(keys)
    _check_splits_name_images(fixed, read, splits_csv)
    sides = fixed.groupby("_key")[SPLIT].nunique()
    torn = set(sides[sides > 1].index)  # listed twice, on two sides: neither is trusted
    problems += [Problem("conflicting_splits", f"listed in {splits_csv.name} on more than one "
                         "side; has no split", p) for p in sorted(torn)]
    # `data split --oversample-to` lists a rare class's images again; read as the folder's
    # split, each is one image (the CSV itself, read as data, trains on the repeats).
    repeated = int((fixed.duplicated("_key") & ~fixed["_key"].isin(torn)).sum())
    if repeated:
        problems.append(Problem(
            "repeated_rows", f"lists images more than once ({counted(repeated, 'repeat')}, "
            "as data split --oversample-to writes them): the folder's split takes each once. "
            f"To train on the repeats, train on {splits_csv} itself.", str(splits_csv)))
    rows = fixed.drop_duplicates("_key", keep="last").set_index("_key")
    column = {c: dict(zip(rows.index, rows[c], strict=True))  # (Series.get per row: slow)
              for c in (SPLIT, LABEL, GROUP) if c in rows.columns}
    table[SPLIT] = [("" if key in torn else column[SPLIT].get(key, "")) for key in keys]
    # (A row listed with its split left blank is no finding: train trains on it.)
    unlisted = [p for p, key in zip(table[PATH], keys, strict=True)
                if key not in column[SPLIT] and key not in torn]
    problems += [Problem("not_in_splits", f"not listed in {splits_csv.name}; has no split", p)
                 for p in unlisted]
    problems += [Problem("missing_file", f"listed in {splits_csv.name} but not found", key)
                 for key in rows.index if key not in read and not os.path.exists(key)]
    if LABEL in rows.columns:
        said = [(p, column[LABEL].get(key), label)
                for p, key, label in zip(table[PATH], keys, table[LABEL], strict=True)]
        problems += [Problem("label_not_folder", f"{splits_csv.name} labels it '{other}', its "
                             f"folder '{label}'; the folder's is used", p)
                     for p, other, label in said
                     if other and name_as_read(other) != label]
    if GROUP in rows.columns and not group_regex:  # as data split wrote it, or edited
        table[GROUP] = [column[GROUP].get(key) or group
                        for key, group in zip(keys, table[GROUP], strict=True)]
    elif GROUP in rows.columns:
        problems.append(Problem("group_column_replaced", "its 'group' column is not used: "
                                "--group-regex groups the files instead", str(splits_csv)))
    return table


def _check_splits_name_images(fixed: pd.DataFrame, images: set[str], splits_csv: Path) -> None:
    """A splits.csv none of whose paths is an image of the class folders (written relative
    to another folder, say) would leave every image unsplit, and a random split would be
    trained in its place without a word: that is an error, with what the paths should be."""
    if fixed.empty or not images or any(key in images for key in fixed["_key"]):
        return
    example = fixed[PATH].iloc[0]
    # The commonest slip: paths that start with the data folder's own name.
    written = _native(example, splits_csv.parent)
    inner, read_as = Path(written).parts[1:], splits_csv.parent / written
    hint = (f"Write each path relative to {splits_csv.parent} (e.g. {Path(*inner).as_posix()})"
            if inner and (splits_csv.parent / Path(*inner)).is_file() else
            f"Write each path relative to {splits_csv.parent}, as `wingspan data split` does")
    raise WingspanError(
        f"None of the {counted(len(fixed), 'path')} in {splits_csv} is an image of its class "
        f"folders (e.g. {example}, read as {read_as}), so it would "
        "split nothing.", hint=hint + ", or remove the file to split at random.")


def _as_written(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Paths, sides and groups as meant: without the spaces a "path, label, split" file
    puts after its commas (" val" is val, " obs1" the group obs1), and a side in any case or
    spelling the split folders take ("Valid" is val). A path keeps its spaces where a file
    is so named (a class folder " monarch", relative to `root`)."""
    fields = {c: table[c].str.strip() for c in (SPLIT, GROUP) if c in table.columns}
    fields[PATH] = [p if p == p.strip() or (root / _native(p, root)).exists() else p.strip()
                    for p in table[PATH]]
    if SPLIT in fields:
        fields[SPLIT] = fields[SPLIT].map(lambda s: SPLIT_FOLDERS.get(s.lower(), s))
    return table.assign(**fields)


def _check_split_values(table: pd.DataFrame, where: Path) -> None:
    bad = table.loc[~table[SPLIT].isin([*SPLITS, ""])]
    if len(bad):
        row = bad.index[0] + 2  # header is line 1
        raise WingspanError(
            f"{where}, line {row}: split '{bad[SPLIT].iloc[0]}' is not one of "
            f"{', '.join(SPLITS)}.",
            hint="Use train, val or test (or leave it empty).",
        )


@register_reader("csv")
def read_csv_table(csv_path: Path, config: ReadConfig) -> Dataset:
    """`path,label[,split][,group][,<level>...]`; extra columns are coarser label levels."""
    if not csv_path.is_file():
        raise WingspanError(f"{csv_path} is not a CSV file.")
    raw = read_csv(csv_path, key=PATH, blank_lines=True)  # (row i: line i + 2, as said)
    # "Path", "Label" as typed in a spreadsheet: the columns wingspan reads, in any case
    for name in (PATH, LABEL, SPLIT, GROUP):
        spelt = [c for c in raw.columns if c.lower() == name]
        if len(spelt) > 1:  # (else one would be read as a level, or two as the one)
            raise WingspanError(f"{csv_path} has {len(spelt)} '{name}' columns: "
                                f"{', '.join(map(repr, spelt))}.",
                                hint="Rename or delete all but one of them.")
    raw = raw.rename(columns={c: c.lower() for c in raw.columns
                              if c.lower() in (PATH, LABEL, SPLIT, GROUP)})
    missing = [c for c in (PATH, LABEL) if c not in raw.columns]
    if missing:
        raise WingspanError(
            f"{csv_path} has no {' or '.join(repr(c) for c in missing)} column "
            f"(its columns: {some(raw.columns)}).",
            hint="The first line must name the columns: path,label[,split][,group][,<level>...]",
        )
    # A spreadsheet's empty rows (",,,," under its table, or ",,train" where a split column
    # was filled down past it) and blank lines hold no record: no path, no label, nothing
    # to read, not "a row with an empty label" of no file. (The index stays the file's row.)
    raw = raw[(raw[[PATH, LABEL]].astype(str).apply(lambda cells: cells.str.strip()) != ""
               ).any(axis=1)]
    raw = _as_written(raw, csv_path.parent)
    # A row with no path was read as the CSV's own folder ("a folder, not an image file")
    nameless = (raw[PATH].astype(str).str.strip() == "").to_numpy()
    problems: list[Problem] = [
        Problem("no_path", f"line {i + 2} has no path (label '{label}'); skipped", str(csv_path))
        for i, label in zip(raw.index[nameless], raw.loc[nameless, LABEL], strict=True)]
    raw = raw[~nameless]
    # A column with values under an empty header (a note typed beside the table) was read
    # as a level named pandas' "Unnamed: 2", blank on every other row
    unnamed = [c for c in raw.columns if re.fullmatch(r"Unnamed: \d+", c)]
    problems += [Problem("unnamed_column", f"column {int(c.split()[-1]) + 1} has values but no "
                         "name in the header; not read (name it to read it as a coarser "
                         "level)", str(csv_path)) for c in unnamed]
    raw = raw.drop(columns=unnamed)
    if SPLIT in raw.columns:
        _check_split_values(raw, csv_path)
    # " monarch" and "monarch " are the class "monarch", not two more; one Unicode spelling.
    names = [c for c in raw.columns if c not in (PATH, SPLIT, GROUP)]
    stripped = raw.assign(**{c: raw[c].map(name_as_read) for c in names})
    # Said where a space ends a cell: one after the separator is how "a, b" is written.
    changed = {c: (stripped[c] != raw[c].map(nfc).str.lstrip(" ")).to_numpy() for c in names}
    for i in np.flatnonzero(np.logical_or.reduce(list(changed.values()))):  # once a row
        cells = [f"{c} {raw[c].iloc[i]!r}" for c in names if changed[c][i]]
        problems.append(Problem("label_stripped", ", ".join(cells) + (
            " has spaces at its ends" if len(cells) == 1 else " have spaces at their ends")
            + "; read without them", raw[PATH].iloc[i]))
    raw = stripped
    # One species typed 'pieris napi' on one row, 'Pieris napi' on another: two classes.
    problems += [Problem("classes_differ_in_case", f"the {c} values " + " and ".join(
        visible(n) for n in twins) + f" differ only in {how_names_differ(twins)}, and are read as "
        f"{len(twins)} classes; write them alike to make them one", str(csv_path))
        for c in names for twins in _case_twins(v for v in raw[c] if v)]
    unlabelled = raw[LABEL] == ""
    problems += [Problem("no_label", "row has an empty label; skipped", p)
                 for p in raw.loc[unlabelled, PATH]]
    raw = raw[~unlabelled]
    # "NaN" or "NA" where a label should be is usually a spreadsheet's empty cell; kept (a
    # class may be so named) but said.
    blank_like = raw[LABEL].str.lower().isin(["nan", "na", "n/a", "null", "none"])
    problems += [Problem("missing_like_label", f"label '{label}' reads like an empty cell; "
                         "kept as a class of that name", p)
                 for p, label in zip(raw.loc[blank_like, PATH], raw.loc[blank_like, LABEL],
                                     strict=True)]
    written = [_native(p, csv_path.parent) for p in raw[PATH]]
    paths = [p if os.path.isabs(p) else os.path.normpath(csv_path.parent / p) for p in written]
    if config.check_files:
        _check_relative_to_csv(written, paths, csv_path)
    keep, repeats = _repeated_paths(raw, paths)
    problems += repeats
    raw, paths = raw[keep], [p for p, k in zip(paths, keep, strict=True) if k]
    coarser = coarse_to_fine(raw, [c for c in raw.columns if c not in (PATH, LABEL, SPLIT, GROUP)])
    if GROUP not in raw.columns and not config.group_regex:
        problems += _finer_than_label(raw, coarser, csv_path)
    if GROUP in raw.columns and not config.group_regex:
        groups = [g or p for g, p in zip(raw[GROUP], paths, strict=True)]
    else:  # a regex given now wins over the column (a splits.csv written without one)
        groups, group_problems = _group_keys(paths, config.group_regex)
        problems += group_problems
        if GROUP in raw.columns:
            problems.append(Problem("group_column_replaced", "its 'group' column is not "
                                    "used: --group-regex groups the files instead",
                                    str(csv_path)))
    table = make_table(paths, {**{c: raw[c].tolist() for c in coarser}, LABEL: raw[LABEL].tolist()},
                       groups, raw[SPLIT].tolist() if SPLIT in raw.columns else None)
    levels = [*coarser, LABEL]
    if not coarser:
        table, levels = _with_taxonomy(table, levels, csv_path.parent, problems)
    elif (csv_path.parent / TAXONOMY_FILE).is_file():
        problems.append(Problem(
            "taxonomy_ignored", f"not read: the CSV's own columns {coarser} are the coarser "
            "levels. Drop them from the CSV to use the taxonomy file.",
            str(csv_path.parent / TAXONOMY_FILE)))
    table = _keep_existing(table, config, problems, csv_path.name)
    return Dataset(table, levels, csv_path, "csv", problems)


def _finer_than_label(raw: pd.DataFrame, columns: list[str], csv_path: Path
                        ) -> list[Problem]:
    """The extra columns finer than the label (each value of one class, several to a class,
    some on two rows or more): no coarser level, as such a column is read. Most likely
    specimen or observation ids under another name than 'group' (`specimen`, `Specimen
    ID`), which would let one specimen's photos sit on two sides of a split with no word
    said; or a finer rank (subspecies), which is no level either."""
    found = []
    for c in columns:
        rows = raw.loc[raw[c] != "", [c, LABEL]]
        if (len(rows) and rows.groupby(c)[LABEL].nunique().max() == 1
                and rows.groupby(LABEL)[c].nunique().max() > 1
                and (shared := int(rows[c].value_counts().max())) > 1):
            found.append(Problem("column_finer_than_label", (
                f"the column '{c}' is finer than the label ({rows[c].nunique()} values, each "
                f"of one class, up to {shared} rows each), yet is read as a coarser level, as "
                "every extra column is: if it names specimens or observations, name it "
                "'group' to keep each one's photos on one side of a split; if it is a finer "
                "rank (subspecies), make it the label or leave it out"), str(csv_path)))
    return found


def _check_relative_to_csv(written: list[str], paths: list[str], csv_path: Path) -> None:
    """Relative paths are read from the CSV's folder. Written from the folder the command
    runs in instead (museum/img/1.jpg in museum/specimens.csv), every one is missing:
    that is said, with the path to write, rather than 'all listed images are missing'."""
    relative = [(w, p) for w, p in zip(written, paths, strict=True) if not os.path.isabs(w)]
    if not relative or any(os.path.isfile(p) for _, p in relative):
        return
    found = next((w for w, _ in relative if os.path.isfile(w)), None)
    if found is not None:
        raise WingspanError(
            f"None of the {counted(len(relative), 'relative path')} in {csv_path} exists "
            f"from the CSV's folder ({csv_path.parent}), which they are read from; they "
            f"do from the current folder (e.g. {found}).",
            hint=f"Write them relative to the CSV's folder (e.g. "
            f"{os.path.relpath(os.path.abspath(found), csv_path.parent)}), or absolute.")


def _repeated_paths(raw: pd.DataFrame, paths: list[str]) -> tuple[np.ndarray, list[Problem]]:
    """Rows that list a file already listed. With another label, every row of the file is
    left out (which is right cannot be known); as a repeat in val or test, the repeats
    (the image would count twice in a score). Repeats in train stay: they weigh the image
    more, as `data split --oversample-to` writes them. Another split with the same label
    stays too, for the leak check to refuse. Whole-column work: an oversampled splits.csv
    repeats thousands of files."""
    labels = [c for c in raw.columns if c not in (PATH, SPLIT, GROUP)]
    frame = raw[labels].assign(_path=paths, _split=raw[SPLIT] if SPLIT in raw else "")
    frame = frame.reset_index(drop=True)
    keep, problems = np.ones(len(frame), dtype=bool), []
    repeated = frame[frame.duplicated("_path", keep=False)]
    if repeated.empty:
        return keep, problems
    by_path = repeated.groupby("_path", sort=False)
    times = by_path.size()
    conflicting = (by_path[labels].nunique() > 1).any(axis=1)
    splits = by_path["_split"].agg(["nunique", "first"])
    once = ~conflicting & (splits["nunique"] == 1) & (splits["first"] != "train")
    keep[frame["_path"].isin(conflicting.index[conflicting]).to_numpy()] = False
    keep[(frame["_path"].isin(once.index[once]) & frame.duplicated("_path")).to_numpy()] = False
    given = repeated[repeated["_path"].isin(conflicting.index[conflicting])].drop_duplicates()
    for path, rows in given.groupby("_path", sort=False):  # few: each said with its labels
        problems.append(Problem("conflicting_labels", f"listed {times[path]} times, with the "
                                "labels " + " and ".join("/".join(r) for r in rows[labels]
                                                         .drop_duplicates().itertuples(
                                                             index=False)) + ": left out", path))
    for path, split in splits.loc[once, "first"].items():
        where = f" in the {split} split" if split else ""
        problems.append(Problem("repeated_row", f"listed {times[path]} times{where}; counted "
                                "once", path))
    return keep, problems


def _native(path: str, root: Path) -> str:
    """A relative path written on Windows (`images\\monarch\\1.jpg`) as this system
    spells it: a backslash is a separator there. Unless the file is so named here (relative
    to `root`): a class folder "a\\b" is written so in the splits.csv wingspan writes, and
    read as "a/b" every image of the class was missing."""
    if os.sep != "/" or "\\" not in path or os.path.lexists(root / path):
        return path
    return path.replace("\\", "/")
