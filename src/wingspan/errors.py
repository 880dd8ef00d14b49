"""The one exception type users see: what is wrong, and what to do about it."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

# Set once a SIGTERM stops the command (as Ctrl-C does): it then exits 143, not 130.
TERMINATED = threading.Event()
# Set while a SIGTERM whose stop was dropped is sent again (redeliver_dropped_sigterm)
DROPPED = threading.Event()
# Set once a run's SIGTERM handler was called, for the run (training.run._Terminated)
RUN_SIGNALLED = threading.Event()
_FORKS_DIE_OF_SIGTERM = []  # (register_at_fork's hooks cannot be removed: added once)
_REDELIVERS = []  # (the unraisable hook: chained once)


def sigterm_handler(handler):
    """Marks a SIGTERM handler as wingspan's (see forks_die_of_sigterm)."""
    handler._wingspan_sigterm = True
    return handler


def stop_if_signalled() -> None:
    """At a run's safe points (an epoch's end, checkpointed; a stage's): a SIGTERM whose
    handler ran while the run went on stops it here. Its KeyboardInterrupt was swallowed
    without a trace where Python did not drop it either (once in 144 signals of a stress
    test, in start-up imports, after redeliver_dropped_sigterm's fix): the run trained to
    its end."""
    if RUN_SIGNALLED.is_set():
        raise KeyboardInterrupt("SIGTERM")


def is_ours(handler) -> bool:
    """Whether a SIGTERM handler (a function, or a bound method) is one of wingspan's."""
    return getattr(getattr(handler, "__func__", handler), "_wingspan_sigterm", False)


def redeliver_dropped_sigterm() -> None:
    """A SIGTERM handler's KeyboardInterrupt is raised in whatever Python code runs when the
    signal comes: in a __del__ (a DataLoader's, joining its workers), a weakref callback
    (the one every import runs) or an at-fork hook, Python prints "Exception ignored" and
    drops it, and the run went on to its end, into a scheduler's SIGKILL (3 in 117 signals
    at --workers 1). Python hands such an exception to sys.unraisablehook: there the signal
    is sent again, from another thread, so that it lands in ordinary code (and is sent
    again if it is dropped again). Installed once, before the handlers."""
    if _REDELIVERS:
        return
    _REDELIVERS.append(True)
    shown, in_hook = sys.unraisablehook, threading.Event()

    def send_again() -> None:
        # Once the hook has returned: a signal handled inside it would be dropped for good
        # ("Exception ignored in sys.unraisablehook"), and not handed to it again. Not once
        # a stop is under way (the signal killed a data worker or a peer, and the run
        # stopped at that: DROPPED is cleared), nor into another handler than ours (the
        # default's, put back as a run ends, would kill the process on the spot).
        while in_hook.is_set():
            time.sleep(0.005)
        time.sleep(0.005)
        if DROPPED.is_set() and is_ours(signal.getsignal(signal.SIGTERM)):
            signal.raise_signal(signal.SIGTERM)  # (os.kill would end a Windows process)

    def unraisable(what) -> None:
        if not (isinstance(what.exc_value, KeyboardInterrupt)
                and what.exc_value.args == ("SIGTERM",)):
            shown(what)
            return
        in_hook.set()
        DROPPED.set()  # (not a second SIGTERM, which stops a command at once)
        threading.Thread(target=send_again, name="wingspan-sigterm-again", daemon=True).start()
        in_hook.clear()

    sys.unraisablehook = unraisable


def forks_die_of_sigterm() -> None:
    """Where wingspan puts a SIGTERM handler of its own: a child forked while it is in
    place (a multiprocessing Pool's worker, cleanlab's say) dies of SIGTERM, as by default,
    and the pool that ends it with one does not wait for it for good. A handler that did so
    itself raced the fork: a SIGTERM in the child before Python reset its signal state was
    lost, and `Pool.terminate` hung (1 pool in a few hundred). So SIGTERM is held back in
    the forking thread, the child's is set to the default, and then it lands. Another
    handler (the embedding program's) is left to its children."""
    if _FORKS_DIE_OF_SIGTERM or not hasattr(os, "register_at_fork"):  # (Windows: no fork)
        return
    _FORKS_DIE_OF_SIGTERM.append(True)
    term, forking = {signal.SIGTERM}, threading.local()

    def before() -> None:  # (what the forking thread blocked is put back after: a program
        # that blocks SIGTERM itself, to sigwait for it, keeps it blocked)
        forking.mask = signal.pthread_sigmask(signal.SIG_BLOCK, term)

    def parent() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, forking.mask)

    def child() -> None:
        if is_ours(signal.getsignal(signal.SIGTERM)):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (the child's one thread: main)
        signal.pthread_sigmask(signal.SIG_SETMASK, forking.mask)

    os.register_at_fork(before=before, after_in_parent=parent, after_in_child=child)


# The pid of the process whose Fabric launcher starts this machine's other processes
# (`--devices N`): set in its environment only while it starts them.
LAUNCHER_PID_ENV = "WINGSPAN_LAUNCHER_PID"


def die_with_launcher() -> None:
    """A process that `--devices N`'s launcher started ends the moment the launcher does
    (Linux). The launcher is rank 0, the only one that writes; the others have nothing to
    keep. Left alone they went on (a SIGKILL, the out-of-memory killer's, or a SIGTERM sent
    to the launcher alone, as `docker stop` and Kubernetes send it) until a collective
    failed, 10-20 s later, and printed a gloo traceback after the shell's prompt. (The
    kernel ties this to the launcher's thread that started them: the main one for the CLI;
    a library call from another thread has them end when that thread does.)"""
    launcher = os.environ.pop(LAUNCHER_PID_ENV, None)  # (not for this process's own children)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    if str(os.getppid()) != launcher:  # a process one of the run's processes started
        if not _alive(int(launcher)):  # (or the launcher ended before this line)
            os._exit(1)
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != launcher:  # it ended before the line above
        os._exit(1)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (Linux): not gone, nor ended and not yet reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


# The processes this one started for `--devices N` (rank 0's), while they run.
STARTED: list = []


def end_started() -> None:
    """Ends the processes this one started, where a SIGTERM stops it (sent to it alone, as
    `docker stop` and Kubernetes send it). They write nothing (rank 0 writes everything),
    and left to themselves printed a traceback as this one's stop closed the connections."""
    started = list(STARTED)
    STARTED.clear()  # (first: their ends are then no failure to react to; see parallel)
    for process in started:
        with contextlib.suppress(OSError):
            process.kill()


class WingspanError(Exception):
    """A problem with the user's input or environment, with a hint on how to fix it.

    The CLI prints these without a traceback; library users can catch them.
    """

    def __init__(self, message: str, hint: str | None = None, every_rank: bool = False):
        super().__init__(message)
        self.message = message
        self.hint = hint
        # Raised alike by every process of a distributed run: only rank 0 need print it.
        self.every_rank = every_rank

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  Hint: {self.hint}"


# What a Windows program (Excel's plain "CSV", Notepad's "ANSI") saves text in, by the
# language Windows runs in: for the iconv line of a hint on a file that is not UTF-8.
CODE_PAGES = ("with the code page it was saved in: cp1252 Western European, cp1250 Central "
              "European, cp1251 Cyrillic, cp1253 Greek, cp1254 Turkish, cp1255 Hebrew, "
              "cp1256 Arabic, cp932 Japanese, gbk Chinese (simplified), big5 Chinese "
              "(traditional), cp949 Korean")


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """'1 image', '2 images', '2 classes': a count in a message, its noun agreeing."""
    regular = noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{n} {noun if n == 1 else plural or regular}"


def apart(a: float, b: float) -> tuple[str, str]:
    """Two numbers with as many significant digits as it takes (3 to 8) for them to read
    differently, neither rounded up to the next whole number: a score just over its
    threshold must not print as "1 > 1", nor 0.99977 as "1" (the highest score)."""
    def reads(d: int) -> bool:
        said = f"{a:.{d}g}", f"{b:.{d}g}"
        return said[0] != said[1] and all(math.floor(float(t)) == math.floor(v)
                                          for t, v in zip(said, (a, b), strict=True))

    digits = next((d for d in range(3, 9) if reads(d)), 8)
    return f"{a:.{digits}g}", f"{b:.{digits}g}"


def rounded(value: float, digits: int) -> str:
    """A share or probability as shown to a reader, to `digits` decimals; one too small
    for them is "< 0.01", not "0.00", which read as none at all (a weak model's mistake
    at 0.003, an audit's label quality of 2e-5). The CSVs and JSON keep the numbers."""
    least = 10.0 ** -digits
    return f"< {least:.{digits}f}" if 0 < value < least / 2 else f"{value:.{digits}f}"


def none_read(n: int, noun: str, where: str = "", of: str = "the", example: str = "") -> str:
    """'None of the 3 images in X could be read, e.g. WHY', 'The only image in X could not
    be read: WHY': that none of n things could be read, said naturally for one."""
    if n == 1:
        said = f"{of} only {noun}{where} could not be read" + (f": {example}" if example else "")
    else:
        said = (f"none of {of} {counted(n, noun)}{where} could be read"
                + (f", e.g. {example}" if example else ""))
    return said[0].upper() + said[1:]


def some(names, n: int = 10) -> str:
    """'a, b and 3 more': the first n names in a message, and how many it leaves out. A name
    that holds a comma itself is quoted ("Danaus plexippus, Monarch" is one class)."""
    names = list(names)
    shown = [f"'{name}'" if "," in str(name) else str(name) for name in names[:n]]
    return ", ".join(shown) + (f" and {len(names) - n} more" if len(names) > n else "")


def quoted(word) -> str:
    """One word of a command line in a message, quoted where it needs it (a run folder with
    a space in its name was two arguments), as the shell reads it: POSIX single quotes, or
    on Windows double quotes, and only around a word with a space (cmd.exe keeps single
    quotes, and shlex quotes every path with a backslash); a placeholder (RUN) stays."""
    return (subprocess.list2cmdline([str(word)]) if sys.platform == "win32"
            else shlex.quote(str(word)))


def command(*words) -> str:
    """A wingspan command line for a message, to paste into a shell (see `quoted`)."""
    return "wingspan " + " ".join(map(quoted, words))


def first_line(error: BaseException) -> str:
    """An exception's first line for a message, its type's name when it says nothing (an
    empty file's EOFError)."""
    return next(iter(str(error).splitlines()), "") or type(error).__name__


def out_of_memory_said(error: BaseException, batch_size: int | None = None,
                       training: bool = False) -> WingspanError | None:
    """torch's out-of-memory errors (a GPU's, the CPU allocator's) in words, with what to
    change; None for any other error. (They were a traceback ending in torch's allocator
    statistics, and said nothing of --batch-size.) `batch_size`: the one in use, if known."""
    said = str(error)
    if "unable to allocate shared memory" in said:  # (a data worker's, through /dev/shm)
        return WingspanError(
            "Out of shared memory: a data worker could not hand its batch over through "
            "/dev/shm (" + re.sub(r"\s+", " ", said[said.index("unable"):])[:160].strip() + ").",
            hint="Use fewer --workers (0 reads in the process itself), or give /dev/shm room: "
                 "a container's is 64 MB unless given more (`docker run --shm-size 1g`, or in "
                 "Kubernetes an emptyDir of medium Memory at /dev/shm).")
    if type(error).__name__ == "OutOfMemoryError" or "out of memory" in said[:200]:
        where = "GPU"  # (torch.OutOfMemoryError: CUDA's, or "MPS backend out of memory")
    elif "DefaultCPUAllocator" in said or isinstance(error, MemoryError):
        where = "CPU"
    else:
        return None
    # torch's first sentence or two say how much was asked and what the device had free;
    # then come its allocator's statistics and advice on its own settings.
    detail = re.sub(r"^(\[enforce fail[^\]]*\][^.]*\.\s*)", "", first_line(error)).strip()
    detail = re.split(r"(?<=free)\.|(?<=bytes)\.(?=\s*Error code)"
                      r"|[.)]\s+(?=Use |If |Including |Process |See |Please )",
                      detail)[0].strip().rstrip(".")
    detail += ")" if detail.count("(") > detail.count(")") else ""  # (cut after its ")")
    detail = detail if detail and detail != type(error).__name__ else "no memory left"
    batch = f" at --batch-size {batch_size}" if batch_size else ""
    smaller = (f"a smaller --batch-size (e.g. {batch_size // 2})" if batch_size and batch_size > 1
               else "a smaller --image-size" if training and batch_size else
               "a smaller --batch-size" if training else "")
    hint = ("Train again (a resumed run keeps its batch size) with "
            + (f"{smaller} or --image-size. " if "batch" in smaller else f"{smaller}. ")
            if training and smaller else f"{smaller[0].upper()}{smaller[1:]} needs less memory. "
            if smaller else "")
    hint += ("Other programs may hold the GPU's memory too: nvidia-smi lists them."
             if "CUDA" in said[:200] else "Other programs may hold the memory too.")
    return WingspanError(f"Out of {where} memory{batch}: {detail}.", hint=hint)
