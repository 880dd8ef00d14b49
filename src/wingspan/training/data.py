"""Batches for training: labelled images through the decode cache and a transform.

Augmentation randomness is seeded per (seed, epoch, image, view), not drawn from a
worker's stream, so a run gives the same batches whatever the number of workers and
whether or not it was interrupted and resumed.
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import sys
import threading
import tokenize
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import tv_tensors

from wingspan.config import usable_cores
from wingspan.data.images import skip_reason
from wingspan.errors import WingspanError
from wingspan.training.decode_cache import DecodeCache

# An item request: (sample index, epoch, view); the seed mixes all three.
Request = tuple[int, int, int]


# Stand-ins for an image index when seeding per-epoch draws rather than one image.
ORDER, VIEW_CHOICE, HEAD_DROPOUT, REPEAT_VIEW_CHOICE = (2**32 - 1, 2**32 - 2, 2**32 - 3,
                                                     2**32 - 4)


def item_seed(seed: int, epoch: int, index: int, view: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, view]).generate_state(1)[0])


class LabelledImages(Dataset):
    """Labelled image files through the decode cache and a transform to `size` pixels. A
    file that cannot be read (broken, truncated, a decompression bomb, changed since the
    data was read) is not a crash: its item carries the reason, and `collate` leaves it out
    of the batch, so training goes on and reports it (wingspan.training.stages)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform: Callable,
                 cache: DecodeCache, seed: int, size: int):
        self.paths, self.labels = list(paths), torch.as_tensor(labels, dtype=torch.long)
        self.transform, self.cache, self.seed, self.size = transform, cache, seed, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, request: Request):
        """(image, labels, index, ""), or (None, labels, index, why) for a file that cannot
        be read."""
        index, epoch, view = request
        try:
            array = self.cache.load(self.paths[index])
        except WingspanError as e:
            return None, self.labels[index], index, skip_reason(e)
        except OSError as e:  # e.g. deleted or moved since the data was read
            return None, self.labels[index], index, f"Cannot read image {self.paths[index]}: {e}"
        image = tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))
        # Leave the caller's random stream alone. Only the CPU generator is seeded: the
        # transforms draw from it, and torch.manual_seed would reseed every GPU's too.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(item_seed(self.seed, epoch, index, view))
            return self.transform(image), self.labels[index], index, ""

    def collate(self, items: list) -> Batch:
        """The readable items as a batch (possibly empty), and the others' reasons."""
        ok = [item for item in items if item[0] is not None]
        failed = [(self.paths[item[2]], item[3]) for item in items if item[0] is None]
        if not ok:
            return Batch(torch.empty(0, 3, self.size, self.size),
                         torch.empty(0, self.labels.shape[1], dtype=torch.long),
                         torch.empty(0, dtype=torch.long), failed)
        # default_collate stacks a worker's images straight into shared memory, so a full
        # /dev/shm raises here, in the worker, and the loader passes the error on; stacked
        # in private memory, the copy into /dev/shm failed in the worker's queue thread and
        # training waited for that batch without end.
        return Batch(default_collate([item[0] for item in ok]),
                     default_collate([item[1] for item in ok]),
                     torch.tensor([item[2] for item in ok]), failed)


class Batch(NamedTuple):
    images: torch.Tensor  # (N, 3, size, size)
    labels: torch.Tensor  # (N, levels)
    index: torch.Tensor  # (N,) the items' indices in the dataset
    failed: list[tuple[str, str]]  # (path, why) of the requested items that could not be read


def epoch_order(n: int, seed: int, epoch: int, weights: torch.Tensor | None = None
                ) -> list[int]:
    """One epoch's order of the n training items: a seeded permutation, or a weighted draw
    with replacement (`--sampler weighted`) of as many as have a weight (an unreadable
    image has none). The same on every rank."""
    g = torch.Generator().manual_seed(item_seed(seed, epoch, ORDER))
    if weights is not None:
        draws = int(weights.count_nonzero())
        return torch.multinomial(weights, draws, replacement=True, generator=g).tolist()
    return torch.randperm(n, generator=g).tolist()


class EpochBatches(Sampler[list[Request]]):
    """This rank's part of each global batch of an epoch, for a DataLoader's batch_sampler.

    The global batches are the epoch's order cut into `batch_size` items, as a single
    process would take them; rank r of w takes the r-th of w near-equal slices of each, so
    the ranks together see exactly what one process would (class weighting and weighted
    sampling included), and a checkpoint taken after k batches resumes on any number of
    ranks. A last batch smaller than w is padded with its own items, so that every rank
    takes the same number of steps. `set_epoch` moves it on, so one loader (and its
    persistent workers) serves every epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, view: int = 1,
                 weights: torch.Tensor | None = None, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.view = n, batch_size, seed, view
        self.weights, self.rank, self.world = weights, rank, world
        self.epoch, self.start, self.size = 0, 0, n
        self.skip: set[int] = set()  # items that could not be read: left out of the order

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def _order(self) -> list[int]:
        order = epoch_order(self.n, self.seed, self.epoch, self.weights)
        return [i for i in order if i not in self.skip] if self.skip else order

    def __iter__(self) -> Iterator[list[Request]]:
        order = self._order()
        self.size = len(order)  # this epoch's, for `real`
        # An image drawn again in the epoch (the weighted sampler's rare classes) is another
        # view of it, augmented afresh: its same request gave it the same pixels each time
        # (38% of a weighted demo epoch were copies). A first draw keeps the plain view.
        views = [self.view + REPEAT_VIEWS * k for k in repeat_counts(order)]
        for b in range(self.start * self.batch_size, len(order), self.batch_size):
            batch = list(zip(order[b:b + self.batch_size], views[b:b + self.batch_size],
                             strict=True))
            batch = (batch * self.world)[:max(len(batch), self.world)]
            mine = [batch[j] for j in np.array_split(np.arange(len(batch)), self.world)[
                self.rank]]
            yield [(int(i), self.epoch, int(v)) for i, v in mine]

    def __len__(self) -> int:  # (a weighted draw's length is its count of weighted images)
        return -(-len(self._order()) // self.batch_size) - self.start

    def real(self, step: int) -> tuple[int, int]:
        """(items in global batch `step` of this epoch, how many of this rank's slice are
        not padding): an epoch's figures count each image once, as one process counts them
        (a last batch of 1 on 2 ranks had its image counted twice)."""
        items = min(self.batch_size, self.size - step * self.batch_size)
        return items, items // self.world + (self.rank < items % self.world)


# The view of an image's k-th repeat in an epoch is its view + k * REPEAT_VIEWS: apart
# from every view the feature cache draws (1 to feature_views).
REPEAT_VIEWS = 1 << 16
# Fine-tuning's views: apart from the head stage's (1 to feature_views, epoch 0), which
# view 1 of fine-tuning's first epoch repeated pixel for pixel (the head had already
# trained on each of those crops in every epoch).
FINETUNE_VIEW = REPEAT_VIEWS - 1


def repeat_counts(order: Sequence[int]) -> list[int]:
    """For each place in an epoch's order, how many times its image came before."""
    seen: dict[int, int] = {}
    counts = []
    for i in order:
        counts.append(seen.get(i, 0))
        seen[i] = counts[-1] + 1
    return counts


def fixed_batches(indices: Sequence[int], batch_size: int, view: int = 0
                  ) -> list[list[Request]]:
    """`indices` in order, `batch_size` at a time: a pass without augmentation."""
    requests = [(int(i), 0, view) for i in indices]
    return [requests[b:b + batch_size] for b in range(0, len(requests), batch_size)]


MAX_WORKERS = 16  # each worker holds its own copy of the loader's state
# More workers than cores only time-share them; a few per core can hide slow reads (a
# network drive), so 4 per core is generous. Past it, `--workers` is a typo (514 for 4).
WORKERS_PER_CORE = 4


def resolve_workers(workers: int | None, processes: int = 1, log=None) -> int:
    """The data workers per process: `workers` as given (`--workers`), else
    default_workers. Refuses a negative number, and more than WORKERS_PER_CORE per usable
    core shared by the machine's `processes`, before a loader forks them. With `log` (a
    resumed run, whose saved setting may come from a larger machine) it says so there and
    takes the most allowed instead."""
    if workers is None:
        return default_workers(processes)
    if workers < 0:  # train's config refuses it first; predict, evaluate... come here
        raise WingspanError(f"--workers (workers= in Python) must be 0 or more. Got "
                            f"{workers} instead.",
                            hint=f"0 reads the images in this process; leave it out for "
                                 f"{default_workers(processes)} (sized to this machine).")
    if workers and (line := unguarded_script_line()):
        why = (f"each worker process would run this script again from the top (Python "
               f"starts them by '{_start_method()}' here), and with it line {line}, whose "
               "call started them")
        if log is not None:  # (a resumed run's saved setting, not given now)
            log(f"The run's --workers {workers}: {why}. Reading the images in this process "
                f"instead. {GUARD_HINT}")
            return 0
        raise WingspanError(f"workers={workers}: {why}.", hint=GUARD_HINT)
    cores = usable_cores()
    most = max(1, WORKERS_PER_CORE * cores // processes)
    if workers > most:
        per = f" in each of {processes} processes" if processes > 1 else ""
        if log is not None:
            log(f"The run's --workers {workers} is more than this machine's {cores} CPU cores "
                f"take ({most}{per}, {WORKERS_PER_CORE} per core): resuming with {most}.")
            return most
        raise WingspanError(
            f"--workers {workers} (workers= in Python) would start {workers * processes} "
            "data-loading processes "
            f"on {cores} CPU cores; at most {most}{per} ({WORKERS_PER_CORE} per core) are "
            "allowed.",
            hint=f"Give a smaller --workers, or leave it out for {default_workers(processes)} "
                 "(sized to this machine).")
    return workers


def default_workers(processes: int = 1) -> int:
    """Data workers per process: the cores this process may use (a container or `taskset`
    may allow fewer than the machine has) shared by its `processes`, less one for the
    process itself, at most MAX_WORKERS. On 2 cores one worker keeps decoding off the main
    thread; a fast GPU needs all it can get (on a 16-core H200 machine, 8 workers left
    Lite2's fine-tuning waiting for augmented images).

    0 (images read in this process) when called off the main thread or in a daemonic
    process: a worker forked while another thread holds torch's locks hangs for good (a
    FastAPI app's predict calls, a thread pool's), and a daemonic process (a
    multiprocessing.Pool's) may not start any."""
    if threading.current_thread() is not threading.main_thread() or \
            multiprocessing.current_process().daemon:
        return 0
    workers = max(0, min(MAX_WORKERS, usable_cores() // processes - 1))
    if workers and (line := unguarded_script_line()):
        warnings.warn(f"Reading the images in this process, not in {workers} worker "
                      f"processes: each would run this script again from the top (Python "
                      f"starts them by '{_start_method()}' here), and with it line {line}, "
                      f"whose call started them. {GUARD_HINT}", stacklevel=2)
        return 0
    return workers


GUARD_HINT = ('Put the script\'s calls under `if __name__ == "__main__":`, as Python asks of '
              "scripts that start processes (on macOS and Windows, say).")


def _start_method() -> str:
    """How Python starts processes here, read without fixing it (the first of the list is
    the default: spawn on macOS and Windows, fork on Linux before Python 3.14)."""
    return (multiprocessing.get_start_method(allow_none=True)
            or multiprocessing.get_all_start_methods()[0])


def unguarded_script_line() -> int | None:
    """The line of the main script, run as `python script.py`, whose call is running now,
    where that line is not under `if __name__ == "__main__":` and processes start by spawn
    or forkserver: each worker process imports the script as multiprocessing does, runs
    that call again and fails (a train made a second run folder first). None where workers
    are safe: fork, no such script (a notebook, `python -c`, `python -m pkg` whose
    __main__ multiprocessing leaves alone), or a script that cannot be read."""
    if _start_method() == "fork":
        return None
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    path = getattr(main, "__file__", None)
    if main is None or not path or (name and (name == "__main__" or name.endswith(".__main__"))
                                    or Path(path).stem == "ipython"):
        return None  # (as multiprocessing.spawn's _fixup_main_from_* skip them)
    # Hand-written: no library says which line of a script is guarded. The script's own
    # frame at its top level holds the line (a call inside its functions comes from it).
    frame = sys._getframe()
    while frame is not None and not (frame.f_globals is vars(main)
                                     and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:
        return None
    line = frame.f_lineno
    try:
        with tokenize.open(path) as f:
            tree = ast.parse(f.read())
        if compile(tree, path, "exec", dont_inherit=True).co_code != frame.f_code.co_code:
            return None  # edited since it started: its lines are not the ones running
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and node.lineno <= line <= (node.end_lineno or 0) \
                and line not in _lines(node.orelse) and _is_main_test(node.test):
            return None
    return line


def _is_main_test(test: ast.expr) -> bool:
    """`__name__ == "__main__"`, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = {ast.dump(test.left), ast.dump(test.comparators[0])}
    return sides == {ast.dump(ast.Name("__name__", ast.Load())),
                     ast.dump(ast.Constant("__main__"))}


def _lines(statements: list[ast.stmt]) -> set[int]:
    return {n for s in statements for n in range(s.lineno, (s.end_lineno or s.lineno) + 1)}


class Loader(DataLoader):
    """torch's DataLoader without its advice on the worker count, which resolve_workers has
    checked against the cores already (torch gave it 6 times a train at --workers 3 on 2
    cores, where wingspan allows 4 a core)."""

    def check_worker_number_rationality(self) -> None:
        pass


SHARED_MEMORY = "/dev/shm"
SHM_SAID: list[int] = []  # the worker counts a small /dev/shm cut, each said once


def room_for_workers(workers: int, batch_images: int, size: int, views: int = 1,
                     processes: int = 1) -> int:
    """The data workers (of each of this machine's `processes`) whose batches fit in
    /dev/shm, where each hands its batches over: up to 2 in flight (DataLoader's
    prefetch), of float32 pixels, with half again to spare. Docker gives a container 64 MB
    there: at 224 px, 4 workers of 32-image batches filled it, and each worker then hung
    (its queue's feeder thread failed, the worker lived on, and training waited for it
    without end). Fewer workers, and said; `workers` where the system has no /dev/shm to
    measure (Windows has no statvfs; macOS no /dev/shm)."""
    statvfs = getattr(os, "statvfs", None)
    if workers == 0 or statvfs is None:
        return workers
    try:
        st = statvfs(SHARED_MEMORY)
    except OSError:
        return workers
    free = st.f_bavail * st.f_frsize // max(processes, 1)  # (each process's share)
    each = 1.5 * 2 * batch_images * views * 3 * size * size * 4
    fits = min(workers, int(free // each))
    if fits < workers and fits not in SHM_SAID:
        SHM_SAID.append(fits)
        warnings.warn(
            f"{SHARED_MEMORY} has {free / 2**20:.0f} MB free"
            + (f" for each of {processes} processes" if processes > 1 else "")
            + ", and each data worker keeps "
            f"about {each / 2**20:.0f} MB of batches there: {fits} worker"
            f"{'' if fits == 1 else 's'} instead of {workers} (in the process itself at 0: "
            "slower). A container's is 64 MB unless given more: `docker run --shm-size 1g`, "
            "or in Kubernetes an emptyDir of medium Memory at /dev/shm.", stacklevel=2)
    return fits


def make_loader(dataset: LabelledImages, batches, workers: int, persistent: bool = False,
                pin: bool = False) -> DataLoader:
    """A loader over `batches` (lists of requests, e.g. EpochBatches). `persistent` keeps
    its workers alive between passes, for a loader that is used once per epoch; `pin`
    (for a GPU) lets batches be copied to it without blocking. (`workers`: a run's, which
    start_run fitted to /dev/shm.)"""
    # Its own generator: a loader must not draw from the global random stream, or dropout
    # masks would depend on how many loaders ran before (and a resumed run would differ).
    return Loader(dataset, batch_sampler=batches, num_workers=workers,
                  collate_fn=dataset.collate, pin_memory=pin,
                  persistent_workers=persistent and workers > 0,
                  generator=torch.Generator().manual_seed(0))
