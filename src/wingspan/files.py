"""Every file wingspan writes goes through here, so that a kill or a full disk never
leaves half of one: written to a temporary name beside the target, flushed to disk, then
renamed over it (readers see the old file or the new one, never a torn one)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from wingspan.errors import WingspanError


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """A temporary path to write `path` through: renamed onto `path` when the block ends,
    removed if it fails. `durable` flushes it to disk first (not needed for a cache, whose
    torn entries are detected and redone). A full disk becomes a WingspanError that names
    the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder (rename is atomic only within a file system), same suffix (np.save and
    # safetensors look at it), a leading dot and the pid (two processes never collide).
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            raise WingspanError(
                f"The disk holding {path.parent} is full ({free / 2**20:.0f} MiB free); "
                f"{path.name} was not written, and the previous version, if any, is intact.",
                hint="Free some space or write elsewhere, then run the command again "
                "(a training run continues with --resume).") from e
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
