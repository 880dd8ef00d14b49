"""What a run folder holds and who trains it, without the training stack (no torch), so
that `wingspan runs` and predict's checks read it in a blink: the file names, the lock
that rank 0 holds while it trains, and the folder a run killed while set up leaves."""

from __future__ import annotations

import csv
import difflib
import errno
import hashlib
import os
import shlex
import sys
from pathlib import Path

from wingspan.errors import WingspanError, command, first_line, quoted
from wingspan.files import is_leftover

CONFIG_FILE, SPLITS_FILE, HISTORY_FILE = "config.yaml", "splits.csv", "history.csv"
# What the curves draw of history.csv (it has more: accuracy, learning rate, speed).
HISTORY_COLUMNS = ("stage", "epoch", *(f"{side}_{metric}" for side in ("train", "val")
                                        for metric in ("loss", "acc", "macro_f1")))
HOLDOUT_FILE = "holdout.csv"  # --holdout-classes: their images, scored as unknowns at the end
# Why a run stopped at an error (bad data, say), for `wingspan runs` to show it as failed
# rather than resumable; a resume that gets going again removes it.
ERROR_FILE = "error.txt"
# `wingspan adapt`: the photos its head was refitted on (unlabelled), which an evaluation
# of the adapted run must not call fair.
ADAPT_PHOTOS_FILE = "adapt-photos.csv"
# The sizes and sha256 prefixes of the train and val images as the run trained on them: an
# evaluated file with those bytes is one it saw, under any name (renamed, moved, swapped).
SEEN_SUMS_FILE = "seen-sums.json"
# The checkpoints: last.pt, which a run resumes from, and best.pt, its best model so far.
CHECKPOINTS_DIR = "checkpoints"


def scored(metrics: dict, holdout_classes) -> bool:
    """metrics.json written and, with --holdout-classes, those classes scored as unknowns
    (written after the bundle): with a whole bundle, what `train --resume` calls finished
    and `wingspan runs` done."""
    return bool(metrics) and (not holdout_classes or "unknown" in metrics)


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR / "last.pt"


def best_checkpoint_file(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR / "best.pt"


def feature_cache_file(run_dir: Path) -> Path:
    """Stage 1's cached features of the frozen backbone (see training.stages)."""
    return run_dir / "cache" / "features.safetensors"


def read_history(run_dir: Path):
    """history.csv as a DataFrame (a row per epoch); a file cut short or garbled (a full
    disk, a copy interrupted) is a WingspanError, not pandas' own."""
    import pandas as pd

    path = run_dir / HISTORY_FILE
    try:
        history = pd.read_csv(path)
        # Zeros a crash left, or a header cut short, read without an error.
        lacking = [c for c in HISTORY_COLUMNS if c not in history.columns]
        if lacking:
            raise ValueError(f"no {', '.join(lacking)} column")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError,
            ValueError) as e:
        raise WingspanError(f"{path} is damaged ({first_line(str(e))}): the training curves "
                            "are lost.", hint="The model and its figures (metrics.json) do "
                            "not depend on it.") from e
    return history


def splits_digest(run_dir: Path) -> str | None:
    """The run's splits.csv, written once as the run began, as a checkpoint records it: a
    resume's batches are positions in its rows, so they must not have changed since. The
    paths are left out: data moved, its paths rewritten, is the same rows. (None without
    one: a Run made in Python around data of its own.)"""
    if not (run_dir / SPLITS_FILE).is_file():
        return None
    digest = hashlib.sha256()
    with open(run_dir / SPLITS_FILE, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        keep = [i for i, name in enumerate(header) if name != "path"]
        for row in [header, *rows]:
            digest.update(repr([row[i] if i < len(row) else None for i in keep]).encode())
    return digest.hexdigest()


def stopped_by(run_dir: Path) -> str | None:
    """The error a run stopped at (its first line), or None."""
    try:
        return (run_dir / ERROR_FILE).read_text(encoding="utf-8").splitlines()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return None


def adapted_photos(run_dir: Path | None) -> list[str]:
    """The photos `wingspan adapt` refitted this run's head on, as real paths (none for a
    run not adapted, or adapted before the list was kept)."""
    return [row["path"] for row in adapt_photo_rows(run_dir)]


def data_moved_hint(run_dir: Path, verb: str = "run the command") -> str:
    """What to do when a run's images are not where its splits.csv says (the data moved
    since it trained): evaluate's, calibrate's and adapt's hint alike."""
    return (f"The run's images are not where {run_dir / SPLITS_FILE} says: if the data "
            "moved, write its new place into that file's paths (they are absolute; e.g. "
            f"sed 's|/old/place|/new/place|'), and {verb} again.")


def adapted_sums(run_dir: Path | None) -> dict[int, set[str]]:
    """The sizes of those photos, each with the sha256 of the photos of that size: a copy
    of one (sorted into class folders to label them, say) is found by its bytes. None for
    photos listed before these were kept, or gone when adapt ran again."""
    sums: dict[int, set[str]] = {}
    for row in adapt_photo_rows(run_dir):
        if row.get("sha256") and (row.get("bytes") or "").isdigit():
            sums.setdefault(int(row["bytes"]), set()).add(row["sha256"])
    return sums


def adapt_photo_rows(run_dir: Path | None) -> list[dict[str, str]]:
    """adapt-photos.csv's rows (path, and bytes and sha256 where kept); none if unreadable."""
    photos = run_dir / ADAPT_PHOTOS_FILE if run_dir else None
    if not photos or not photos.is_file():
        return []
    try:
        with open(photos, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return rows if all("path" in row for row in rows) else []
    except (OSError, ValueError, csv.Error):  # damaged: taken as none
        return []


_HELD: dict[str, object] = {}  # lock file -> it, open, while this process holds it


def _let_go_in_child() -> None:
    """A forked child (a data loader's worker) shares the lock with the trainer, and kept
    it held for the seconds it outlives a trainer killed with SIGKILL: `wingspan runs` said
    "training now" and `--resume` refused. Its copy is closed (not unlocked: the trainer's
    stays locked)."""
    for handle in _HELD.values():
        handle.close()
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_let_go_in_child)


def _key(folder: Path, lock: str) -> str:
    return str(Path(folder).resolve() / lock)


def hold_lock(run_dir: Path, lock: str = ".lock", again: bool = True) -> bool:
    """Rank 0 holds the run's lock while it trains: a second process training the same
    folder (a --resume of a run still going) would write the same checkpoints and model.
    The OS drops the lock when the process ends, however it ends. False: another holds
    it. (POSIX only; elsewhere nothing is locked.) `lock`: another lock file in the
    folder, for another writer (an evaluation's); `again`: whether this process may take
    it again while it holds it (not a writer's: two threads would write as one)."""
    try:
        import fcntl
    except ImportError:
        return True
    key = _key(run_dir, lock)
    if key in _HELD:
        return again
    denied = None
    try:
        handle = open(run_dir / lock, "w")  # noqa: SIM115 - held open for the whole run
    except PermissionError as e:  # another user's lock in a folder we share (a group's
        # run, umask 002, that they evaluated): the run's owner could never evaluate it
        # again. flock(2) takes a lock on a file opened to read. (None there: a folder we
        # may not write, which the error says.)
        if not (run_dir / lock).is_file():
            raise
        denied, handle = e, open(run_dir / lock)  # noqa: SIM115 - as above
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.close()
        if denied and e.errno == errno.EBADF:  # (NFS locks only a file open to write: not
            raise denied from None  # "another one holds it", which would never clear)
        return False
    _HELD[key] = handle
    return True


FREE, HELD, UNREADABLE = "free", "held", "unreadable"  # the states of a run's lock


def being_trained(run_dir: Path) -> bool:
    """Whether another process holds the run's lock (trains it now), tested without
    keeping the lock; a lock that cannot be read counts as held, so that `train` never
    trains a run twice at once. (POSIX only; elsewhere False.)"""
    return lock_state(run_dir) != FREE


def lock_state(run_dir: Path) -> str:
    """FREE (nobody trains the run, or this process does), HELD (another process does),
    or UNREADABLE (its .lock cannot be opened: no telling)."""
    try:
        import fcntl
    except ImportError:
        return FREE
    if _key(run_dir, ".lock") in _HELD:
        return FREE  # this process trains it
    lock = Path(run_dir) / ".lock"
    try:  # opened to read: a run folder without a lock is left so (`wingspan runs` lists
        # without writing), and one we may not write is tested too.
        handle = open(lock)  # noqa: SIM115 - closed below, once tested
    except FileNotFoundError:
        return FREE  # never locked
    except OSError:  # e.g. another user's run we may not read
        return UNREADABLE if lock.is_file() else FREE
    with handle:  # A shared lock: NFS refuses an exclusive one on a file opened to read
        # (flock(2)), and two tests at once must not see each other as a run being trained.
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released as it closes
        except OSError:
            return HELD
    return FREE


def release_lock(run_dir: Path, lock: str = ".lock") -> None:
    handle = _HELD.pop(_key(run_dir, lock), None)
    if handle is not None:
        handle.close()


def stopped_while_set_up(run_dir: Path) -> bool:
    """A folder holding only what `train` writes before config.yaml (its lock, the files
    written with config.yaml, or their temporary files), or nothing: a run killed then."""
    before = {".lock", SPLITS_FILE, HOLDOUT_FILE}
    return run_dir.is_dir() and all(p.name in before or is_leftover(p.name)
                                    for p in run_dir.iterdir())


def trained_on(run_dir: Path) -> str | None:
    """The data a run was trained on, from the comment its config.yaml opens with
    ("# Trained on DATA, read with ...")."""
    try:
        with open(run_dir / CONFIG_FILE, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError:
        return None
    if first.startswith("# Trained on ") and ", read with " in first:
        return first[len("# Trained on "):].rpartition(", read with ")[0]
    return None


TRAIN_AGAIN = "# Again on the same split: "  # config.yaml's second line, then the command


def train_again(run_dir: Path) -> str | None:
    """The command that trains the run again on the same split, from the comment its
    config.yaml opens with ("# Again on the same split: ..."); None without it, or where
    config.yaml is damaged (no mapping of settings: the command would be refused)."""
    import yaml

    try:
        text = (run_dir / CONFIG_FILE).read_text(encoding="utf-8")
        settings = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    lines = [line for line in text.splitlines()[:3] if line.startswith(TRAIN_AGAIN)]
    if not lines or not isinstance(settings, dict):
        return None
    again = lines[0][len(TRAIN_AGAIN):].strip()
    # A run moved or copied since (to an archive, another machine) named the folder it was
    # trained in, gone or another run's by now: its own files instead.
    try:
        words = shlex.split(again, comments=True) if sys.platform != "win32" else []
    except ValueError:
        words = []
    if len(words) >= 5 and words[:2] == ["wingspan", "train"] and words[3] == "--config":
        here = Path(os.path.abspath(run_dir))
        for old, new in ((words[2], here / SPLITS_FILE), (words[4], here / CONFIG_FILE)):
            again = again.replace(quoted(old), quoted(new), 1)
    return again


def close_runs(path: Path) -> list[str]:
    """The runs beside a path that is no run (a typo, or a run's name without its runs
    folder), or in the runs folder there, whose names are closest to its name."""
    runs = []
    for folder in dict.fromkeys([path.parent, path.parent / "runs"]):
        try:
            runs += [d for d in sorted(folder.iterdir()) if (d / CONFIG_FILE).is_file()]
        except OSError:  # no such folder, or one we may not read: nothing to suggest
            pass
    close = difflib.get_close_matches(path.name, [d.name for d in runs], n=3)
    return [str(d) for name in close for d in runs if d.name == name]


def find_bundle(model: str | Path) -> Path:
    """A bundle directory or file, or a run directory holding one in `model/`. (Here, not
    in wingspan.inference, which loads torch: `wingspan predict runs/typo` says so in a
    tenth of a second, not after the 3-4 s of torch, torchvision and timm.)"""
    path = Path(model)
    if (path / "model" / "manifest.json").is_file():
        return path / "model"
    if path.name == "model.safetensors" and (path.parent / "manifest.json").is_file():
        return path.parent  # a bundle folder's tensors, as --weights takes them
    if (path / CONFIG_FILE).is_file() and (path / SPLITS_FILE).is_file():
        if being_trained(path):  # resuming it now would be refused
            raise WingspanError(f"The run {path} has no model yet: it is being trained now.",
                                hint=f"Wait for it to finish; {path / 'train.log'} shows "
                                     "how far it is.")
        raise WingspanError(f"The run {path} has no model yet: its training stopped before "
                            "it finished.",
                            hint=f"Continue it with `{command('train', '--resume', path)}` "
                                 "(in Python: "
                                 f"ws.resume({str(path)!r})).")
    if path.exists():
        return path
    meant = close_runs(path)
    raise WingspanError(f"No model at {path}: the path does not exist.",
                        hint=f"Did you mean {' or '.join(meant)}?" if meant else
                        "Give a run folder (runs/NAME) or a model bundle.")
