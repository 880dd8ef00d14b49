"""Every file wingspan writes goes through here, so that a kill or a full disk never
leaves half of one: written to a temporary name beside the target, flushed to disk, then
renamed over it (readers see the old file or the new one, never a torn one)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import signal
import stat
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from wingspan.errors import WingspanError, first_line

if TYPE_CHECKING:
    import numpy as np  # (imported where an array is read or written: every command's
    # parse, `--help` too, imports this module, and numpy took 0.15-0.25 s of its 0.55 s)

WINDOWS = sys.platform == "win32"

# The mode a plain open() gives a new file here (0666 less the umask, read once while the
# process is still one thread). safetensors creates its files 0600, and a model one user
# trained is served or evaluated by others (a lab's shared machine): every file we write
# gets this mode.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """A temporary path to write `path` through: renamed onto `path` when the block ends,
    removed if it fails. `durable` flushes it to disk first (not needed for a cache, whose
    torn entries are detected and redone). A full disk becomes a WingspanError that names
    the folder."""
    with _temporary(Path(path)) as tmp:
        yield tmp
        if durable:
            _flush(tmp)
        os.chmod(tmp, _MODE)
        replace(tmp, path)


@contextlib.contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """atomic_path for files that belong together (an audit's tables and its page): all
    written and flushed to disk before the first is renamed, and an error renaming one
    (a file held open on Windows, say) puts back those renamed before it, so that an error
    or a kill while writing them leaves every previous version, never some of each.

    The limit: a kill in the microseconds between the renames still leaves some of each,
    until the command runs again. Files cannot be renamed together, and these share a
    folder with other outputs (so no new folder can replace the old one whole), and are
    read by people (so no marker written last is checked by a reader)."""
    paths = [Path(p) for p in paths]
    try:
        with contextlib.ExitStack() as stack:
            tmps = [stack.enter_context(_temporary(p, said_full=False)) for p in paths]
            yield tmps
            for tmp in tmps:
                _flush(tmp)
                os.chmod(tmp, _MODE)
            _replace_together(tmps, paths)
    except Exception as e:  # (any of them: the last one named itself, whichever it was)
        if _disk_full(e):
            raise _full(e, paths[0].parent, " and ".join(p.name for p in paths)) from e
        raise


@contextlib.contextmanager
def _temporary(path: Path, said_full: bool = True) -> Iterator[Path]:
    """A temporary name beside `path`, removed when the block ends unless renamed (and the
    folder made for it, left empty by a failure)."""
    made = not path.parent.is_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder (rename is atomic only within a file system), same suffix (np.save and
    # safetensors look at it), a leading dot and the pid (two processes never collide).
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # _TEMPORARY matches it
    try:
        yield tmp
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # first: the free space said is what is left then
        if made:
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # (only if empty: another writer's files stay)
        if said_full and isinstance(e, Exception) and _disk_full(e):
            raise _full(e, path.parent, path.name) from e
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _full(e: Exception, folder: Path, names: str) -> WingspanError:
    """A full disk (or quota) that stopped `names` being written into `folder`."""
    try:
        left = shutil.disk_usage(folder if folder.is_dir() else folder.parent).free
        free = f" ({left / 2**20:.0f} MiB free)"
    except OSError:
        free = ""
    full = (f"Your disk quota for {folder} is used up" if _quota(e) else
            f"The disk holding {folder} is full{free}")
    return WingspanError(f"{full}; {names} {'was' if ' and ' not in names else 'were'} not "
                         "written, and the previous version, if any, is intact.",
                         hint="Free some space or write elsewhere, then run the command again "
                              "(a training run continues with --resume).")


def _disk_full(e: Exception) -> bool:
    """Whether a write failed for want of space: an OSError says so by its number; torch.save
    and safetensors raise their own errors, torch's without naming the cause (a file
    position short of what it wrote)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    said = str(e)
    # (torch's words depend on where the write stopped: its last flush says "iostream
    # error", a file of the archive "file write failed")
    return "No space left on device" in said or "os error 28" in said or _quota(e) or (
        isinstance(e, RuntimeError) and any(words in said for words in (
            "unexpected pos", "iostream error", "file write failed")))


def _quota(e: Exception) -> bool:
    """Whether a write failed on a user's disk quota (a cluster's usual 'full disk'): the
    disk itself may have room."""
    if isinstance(e, OSError):
        return e.errno == errno.EDQUOT
    return "Disk quota exceeded" in str(e) or "os error 122" in str(e)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back while the block runs, then delivered as they came: for
    renames that belong together. One landing after the last rename (while the previous
    versions were let go) left their copies beside them, and the command said it had
    written nothing. Python's own handlers only (those it can put back), in the main
    thread (the only one that may set them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    held = {s: h for s in (signal.SIGINT, signal.SIGTERM)
            if (h := signal.getsignal(s)) is not None}
    for s in held:
        signal.signal(s, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        if sys.exc_info()[0] is None:  # (an error in the block is said, not a Ctrl-C's stop)
            for s in dict.fromkeys(came):
                signal.raise_signal(s)


def _replace_together(tmps: list[Path], paths: list[Path]) -> None:
    """Each temporary file renamed onto its path, Ctrl-C held back; if one fails, those
    renamed before it get their previous version back, kept until the end as a hard link
    (or a copy)."""
    with interrupts_held():
        _renamed_together(tmps, paths)


def _renamed_together(tmps: list[Path], paths: list[Path]) -> None:
    def kept(path: Path) -> Path:
        return path.with_name(f".{path.stem}.{os.getpid()}.old{path.suffix}")

    done: dict[Path, bool] = {}  # each path renamed onto: whether it had a version before
    stranded: list[Path] = []  # previous versions that could not be put back: never deleted
    try:
        for tmp, path in zip(tmps, paths, strict=True):
            had = path.is_file()
            if had:
                try:
                    os.link(path, kept(path))
                except OSError:  # a file system without hard links
                    shutil.copy2(path, kept(path))
            replace(tmp, path)
            done[path] = had
    except BaseException as error:
        for path, had in done.items():
            try:
                if had:
                    os.replace(kept(path), path)
                else:
                    path.unlink()
            except OSError:
                if had:
                    stranded.append(path)
        if stranded:
            raise _not_put_back(paths, stranded, kept, error) from error
        raise
    finally:
        for path in paths:
            if path not in stranded:
                with contextlib.suppress(OSError):
                    kept(path).unlink()


def _not_put_back(paths: list[Path], stranded: list[Path], kept: Callable[[Path], Path],
                  error: BaseException) -> WingspanError:
    """The error for previous versions a failed write could not put back: where they are."""
    where = "; ".join(f"{p.name}'s is kept as {kept(p)}" for p in stranded)
    return WingspanError(
        f"Writing {', '.join(p.name for p in paths)} failed ({first_line(error)}), and a "
        f"previous version could not be put back: {where}.",
        hint="Rename it back to its name once nothing holds the file open, or remove it "
        "and run the command again.")


# The name atomic_path writes through, which a process killed mid-write leaves behind.
_TEMPORARY = re.compile(r"\..+\.\d+\.tmp(\.[^.]+)?")
# safetensors (0.8) writes a file through one of its own, beside it, and renames that
# onto the name it is given: a kill left a whole model's or feature cache's worth there.
_SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def is_leftover(name: str) -> bool:
    """Whether a file's name is that of a temporary file a killed write left behind."""
    return bool(_TEMPORARY.fullmatch(name) or _SAFETENSORS_TEMPORARY.fullmatch(name))


def remove_leftovers(folder: str | Path) -> None:
    """Remove the temporary files that writers killed mid-write left in `folder` (a
    checkpoint's can be hundreds of MB). Only for a folder no other process writes now."""
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.iterdir():
            if is_leftover(path.name) and path.is_file():
                path.unlink(missing_ok=True)


def remove_dead_leftovers(*paths: str | Path, quiet_seconds: float = 60.0) -> None:
    """Remove what writers of `paths` left beside them when they were killed (a temporary
    file, or a previous version kept while files were replaced together: an export's 14 MB
    graph, an audit's page, each kill another), where other processes may be writing too:
    only files named for one of `paths` (.NAME.PID.tmp.EXT, .NAME.PID.old.EXT: never a
    user's own file) whose process is gone, untouched for `quiet_seconds` (on a folder
    shared between machines, another's process is not seen here, but its write is recent)."""
    now = time.time()
    for path in map(Path, paths):
        pattern = re.compile(re.escape(f".{path.stem}.") + r"(\d+)\.(?:tmp|old)"
                             + re.escape(path.suffix))
        with contextlib.suppress(OSError):
            for entry in os.scandir(path.parent):
                found = pattern.fullmatch(entry.name)
                # safetensors' own (see above) names no process: its age alone tells
                # (only where wingspan writes: a bundle's folder, a run's)
                theirs = path.suffix == ".safetensors" and \
                    _SAFETENSORS_TEMPORARY.fullmatch(entry.name)
                if not (found or theirs) or not entry.is_file(follow_symlinks=False):
                    continue
                if _dead(entry, None if theirs else int(found[1]), now, quiet_seconds):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


def _dead(entry: os.DirEntry, pid: int | None, now: float, quiet_seconds: float) -> bool:
    """A temporary file whose writer is gone: its process (`pid`, where its name has one),
    and no write for a while (on a folder shared between machines, another's process is
    not seen here, but its write is recent)."""
    try:
        return now - entry.stat().st_mtime > quiet_seconds and (pid is None or not _alive(pid))
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if WINDOWS:  # signal 0 is CTRL_C_EVENT there: os.kill would interrupt the console
        try:
            import psutil  # (a dependency on Windows alone)
        except ImportError:  # (installed without it): kept, the safe side
            return True
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's (alive), or no pid at all
        return True
    return True


def _flush(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# Files of paths that wingspan writes and reads back: UTF-8 whatever the locale (Windows'
# cp1252 cannot write "Árvíztűrő"), a name that is not UTF-8 kept as its bytes.
PATH_TEXT = {"encoding": "utf-8", "errors": "surrogateescape"}


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def frame_to_csv(frame, path: str | Path, **options) -> None:
    """A pandas table as CSV (no index unless asked): UTF-8 whatever the locale, and a
    name in bytes that are not UTF-8 (b'caf\\xe9.jpg', from a zip made on Windows) spelt
    out ('caf\\udce9.jpg'), where it was a UnicodeEncodeError once the work was done.
    To a temporary path of atomic_paths; write_csv for a file on its own."""
    frame.to_csv(path, **{"index": False, **options}, encoding="utf-8",
                 errors="backslashreplace", lineterminator="\n")  # ("\r\n" on Windows)


def write_csv(frame, path: str | Path, **options) -> None:
    """frame_to_csv through atomic_path: a kill or a full disk leaves the previous file."""
    with atomic_path(path) as tmp:
        frame_to_csv(frame, tmp, **options)


def file_stamp(path: str) -> tuple[int, int, int]:
    """What changes when a file's content does, at the cost of one stat: its size,
    modification time and change time (a copy that keeps the old modification time, as
    `cp -p` or `rsync -a` make, still gets a new change time). OSError if it is gone."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


class FileArrays:
    """One .npy array per source file, worked out from it once (a decoded image, a feature
    vector) and kept on disk. Keyed by the file's absolute path and `file_stamp` plus `key`
    (how the array was made), so an edited file or another way of making it misses.
    Hand-written: no library keys a cache by a file's state. A damaged or empty entry (a
    killed write) reads as missing, and a full or read-only cache costs only the work
    again. `directory` None keeps nothing."""

    def __init__(self, directory: str | Path | None, key: str):
        self.directory = Path(directory) if directory else None
        self.key = key
        if self.directory:
            try:
                shared_folder(self.directory)
            except OSError:  # read-only, say: the command goes on, keeping nothing
                self.directory = None
        self._remove_dead_writes()

    def _remove_dead_writes(self, quiet_seconds: float = 60.0) -> None:
        """The temporary files of writers killed mid-write (a data worker SIGKILLed left
        .<sha1>.<pid>.tmp.npy), which nothing would read or remove: the cache is shared by
        every run, so only those whose process is gone (one scan: 40 ms at 48k entries on a
        2-core EPYC)."""
        if self.directory is None:
            return
        written = re.compile(r"\.[0-9a-f]{40}\.(\d+)\.tmp\.npy")
        now = time.time()
        with contextlib.suppress(OSError), os.scandir(self.directory) as entries:
            for entry in entries:
                if (found := written.fullmatch(entry.name)) and \
                        _dead(entry, int(found[1]), now, quiet_seconds):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def entry(self, path: str, made: str = "") -> Path | None:
        """Where `path`'s array is kept, as the file is now (OSError if it is gone).
        `made`: how this array was made, where it differs from file to file."""
        if self.directory is None:
            return None
        size, mtime, ctime = file_stamp(path)
        key = f"{os.path.abspath(path)}|{size}|{mtime}|{ctime}|{self.key}" + \
            (f"|{made}" if made else "")
        return self.directory / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"

    @staticmethod
    def get(entry: Path | None) -> np.ndarray | None:
        if entry is None or not entry.is_file():
            return None
        import numpy as np

        try:
            return np.load(entry, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None

    @staticmethod
    def put(entry: Path | None, array: np.ndarray) -> None:
        if entry is None:
            return
        import numpy as np

        try:
            with atomic_path(entry, durable=False) as tmp:
                np.save(tmp, array, allow_pickle=False)
        except (OSError, WingspanError):
            pass


def real_paths(paths) -> list[str]:
    """Each file's path with every symlink resolved, as Path.resolve() gives it, to tell
    whether two lists name the same files: each folder is resolved once, and a file only if
    it is a link (resolving 48k images one by one took seconds). In NFC, as the readers
    key paths: a run's splits.csv written on macOS spells 'é' in two characters."""
    folders: dict[str, str] = {}
    real = []
    for path in map(str, paths):
        head, tail = os.path.split(path)
        if head not in folders:
            folders[head] = os.path.realpath(head or os.curdir)
        full = os.path.join(folders[head], tail)
        real.append(os.path.realpath(full) if os.path.islink(full) else full)
    return [unicodedata.normalize("NFC", p) for p in real]


def name_part(text: str) -> str:
    """`text` (a level's name, from a CSV's header or taxonomy.csv) as part of a file
    name: letters, digits, '_' and '-' as they are, any other run of characters '_', and
    then 6 hex digits of its sha1, so that two names stay apart. A stranger's level
    "x/../../../x" wrote its plot outside --out."""
    safe = re.sub(r"[^\w-]+", "_", text).strip("_") or "level"
    return safe if safe == text else f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def disk_spelling(paths, any_case: bool = False) -> list[str]:
    """Each path (a key from real_paths, in NFC) as the disk spells it, to open the file:
    a name copied from macOS keeps 'é' in two characters (NFD), which Linux does not take
    for its one-character NFC spelling. `any_case`: a name in another case too ('IMG_1.JPG'
    for 'img_1.jpg', as Windows and macOS read it), where the folder holds only one such.
    A path found as it is stays so; only the others' folders are listed (once each), and a
    path found in no spelling stays as given."""
    listed: dict[str, dict[str, str | None]] = {}

    def key(name: str) -> str:
        name = unicodedata.normalize("NFC", name)
        return name.casefold() if any_case else name

    def spelt(path: str) -> str:
        if os.path.lexists(path):
            return path
        head, tail = os.path.split(path)
        if not tail or head == path:
            return path
        head = spelt(head) if head else head  # ("": a relative path's first name, here)
        if head not in listed:
            names: dict[str, str | None] = {}
            try:
                for n in os.listdir(head or os.curdir):  # (two of one key: neither)
                    names[key(n)] = n if key(n) not in names else None
            except OSError:
                pass
            listed[head] = names
        return os.path.join(head, listed[head].get(key(tail)) or tail)

    return [spelt(str(p)) for p in paths]


def replace_folder(partial: Path, final: Path) -> None:
    """`partial`, written whole, takes the place of `final` (renames, not copies): the
    earlier is moved aside, the later in, and only then the earlier removed. Stopped
    between the two renames (Ctrl-C), the earlier is put back at once; killed there, by
    the next call (or `put_back`), before anything is removed."""
    old = put_back(final)
    shutil.rmtree(old, ignore_errors=True)
    try:
        if final.exists():
            replace(final, old, final)
        os.replace(partial, final)
    except BaseException:
        put_back(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def put_back(final: Path) -> Path:
    """The folder that replace_folder moved aside from `final` (`.NAME.old`), put back
    where a kill between its renames left `final` missing; returns that aside name."""
    old = final.with_name(f".{final.name}.old")
    if old.exists() and not final.exists():
        os.replace(old, final)
    return old


def replace(source: Path, target: Path, held: Path | None = None) -> None:
    """os.replace, where Windows refuses to replace a file (or move a folder holding one)
    that another program has open (a CSV in Excel): said as such, naming it, not as
    "Permission denied" on the temporary file (`held`: what is open, default `target`)."""
    try:
        os.replace(source, target)
    except PermissionError as e:
        held = Path(held or target)
        if not (WINDOWS and held.exists()):
            raise
        if getattr(held.stat(), "st_file_attributes", 0) & stat.FILE_ATTRIBUTE_READONLY:
            raise WingspanError(f"Cannot replace {held}: it is read-only.",
                                hint="Clear its read-only box (Properties), or write "
                                     "elsewhere (--out, or out= in Python).") from e
        what = "a file in the folder" if held.is_dir() else "it"
        raise WingspanError(f"Cannot replace {held}: another program may have {what} open.",
                            hint="Close it there (a spreadsheet, a viewer, a window on the "
                                 "folder, say), or wait for a virus scan to let go, then run "
                                 "the command again.") from e


def make_folder(path: str | Path) -> Path:
    """`mkdir -p`, or a WingspanError naming the file that stands where a folder must go
    (not a FileExistsError or NotADirectoryError from deep inside)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise not_a_folder(path) from e
    return path


def shared_folder(path: str | Path) -> Path:
    """`mkdir -p` for the cache, whose folders are made by whichever user comes first: each
    folder made in a group-writable one takes its group's access (and setgid). A lab's
    cache ($WINGSPAN_CACHE at a folder of its group) got decoded-*, features and graphs
    made 0755 by the first user (umask 022), or 0700 (umask 077), and every other user's
    entries were not kept there, unsaid."""
    path = Path(path)
    missing, above = [], path
    while not os.path.isdir(above) and above.parent != above:
        missing.append(above)
        above = above.parent
    path.mkdir(parents=True, exist_ok=True)
    for folder in reversed(missing):  # (the top first: each takes what the one above has)
        with contextlib.suppress(OSError):  # (made by another process at once: its own)
            mode = os.stat(folder.parent).st_mode
            group = mode & (stat.S_IRWXG | stat.S_ISGID)
            # (not below a folder open to all, /tmp: a private cache made there, say
            # $XDG_CACHE_HOME=/tmp/me, went writable by the user's group, often everyone's)
            if group & stat.S_IWGRP and not mode & (stat.S_IWOTH | stat.S_ISVTX):
                os.chmod(folder, stat.S_IMODE(os.stat(folder).st_mode) | group)
    return path


def not_a_folder(path: str | Path) -> WingspanError:
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
    return WingspanError(f"{blocker} is a file, where a folder is needed ({path}).",
                         hint="Name another folder, or move the file.")


def os_error_said(e: OSError) -> WingspanError | None:
    """An OSError in words and with a hint, as the CLI prints it and the library raises it
    (a folder that is a file, a permission, a read-only or full disk, a path refused); None
    for another OSError, which stays as it is."""
    if isinstance(e, FileExistsError | NotADirectoryError):  # a file named where a folder goes
        return not_a_folder(e.filename or "?")
    if isinstance(e, PermissionError):  # a folder or file this user may not read or write
        return WingspanError(f"Permission denied: {e.filename or e}.",
                             hint="Check its permissions (ls -l), or name a file or folder "
                                  "you may use: to write elsewhere, the command's --out or "
                                  "--runs-dir (out= in Python).")
    if e.errno == errno.EROFS:
        return WingspanError(f"{e.filename or e} is on a read-only file system.",
                             hint="Write elsewhere (the command's --runs-dir or --out; out= in "
                                  "Python), or mount it writable; to resume a run there, copy "
                                  "its folder somewhere writable and resume the copy.")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        # (a copy's error names its source first: the file written is the second)
        where = f" writing {e.filename2 or e.filename}" if e.filename else ""
        return WingspanError(("Your disk quota is used up" if e.errno == errno.EDQUOT else
                              "The disk is full") + f"{where}.",
                             hint="Free some space and run the command again (a training run "
                                  "continues with --resume).")
    if e.filename and e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG,
                                  errno.ELOOP):  # a path refused (under /proc, say)
        return WingspanError(f"{e.strerror}: {e.filename}.",
                             hint="Check the path, or name another file or folder.")
    return None


def check_writable(folder: str | Path, what: str, hint: str) -> None:
    """Before work whose result goes into `folder` (which exists): a WingspanError now if
    nothing can be written there, not after the work, naming a temporary file. A file is
    made and removed: os.access says yes to root on a read-only mount or in /proc."""
    probe = Path(folder) / f".wingspan.{os.getpid()}.probe"
    try:
        probe.open("w").close()
        probe.unlink()
    except OSError as e:
        raise WingspanError(f"{folder} cannot be written to ({e.strerror or e}): {what}.",
                            hint=hint) from e


def check_folder_writable(folder: str | Path, what: str, hint: str) -> None:
    """Before work whose results go into `folder` (made only then, with its parents): an
    error now if a file stands in its way or its nearest existing folder cannot be written."""
    folder = Path(folder).absolute()
    try:  # (a link to nothing is in the way too; 3.10 and 3.11 raise for an unreadable one)
        existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    except OSError as e:
        raise WingspanError(f"{folder} cannot be looked at ({e.strerror or e}): {what}.",
                            hint=hint) from e
    if not existing.is_dir():
        raise WingspanError(f"{existing} is not a folder: {what}.", hint=hint)
    check_writable(existing, what, hint)


def stdout_gone() -> None:
    """stdout to /dev/null: what is left to print (Python's own flush at exit too) goes
    nowhere, instead of a BrokenPipeError."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextlib.contextmanager
def csv_on_stdout() -> Iterator:
    """stdout for `--output -`'s CSV: UTF-8, as the file would be, whatever the terminal's
    encoding (a Windows pipe's cp1252 cut a CSV of Greek or CJK names short, and wrote
    accents in cp1252); and its reader gone (`| head`) is no failure: the rest goes
    nowhere, as the tables' console does."""
    sys.stdout.flush()
    binary = getattr(sys.stdout, "buffer", None)
    stream = io.TextIOWrapper(binary, encoding="utf-8", newline="",  # (a name of other
                              errors="backslashreplace") if binary else sys.stdout  # bytes)
    try:
        yield stream
        stream.flush()
    except BrokenPipeError:
        stdout_gone()
    finally:
        if binary:
            with contextlib.suppress(ValueError, OSError):
                stream.detach()  # (sys.stdout keeps its buffer open)


def fitting_name(name: str, most: int = 200) -> str:
    """`name`, or where its UTF-8 is over `most` bytes (a photo's or a folder's own name may
    use up to 255, and what is made from it adds a suffix, a temporary name), its start and
    8 hex digits of its sha1, so that two long names that share the start stay apart."""
    raw = name.encode(errors="surrogateescape")  # a name not UTF-8 on disk, as Python holds it
    if len(raw) <= most:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:8]
    return raw[:most - 9].decode(errors="ignore") + "-" + digest
