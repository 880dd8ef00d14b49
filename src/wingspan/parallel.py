"""Processes, devices and the training step's precision: one Lightning Fabric per process.

A run may be one process on a laptop CPU or 64 on 8 machines. Fabric starts the processes
(its own launcher for `--devices N`; torchrun and SLURM start them themselves), gives each
its device, runs the training step in mixed precision (with a grad scaler for fp16) and
wraps the fine-tuned model in DistributedDataParallel. Who does what in a distributed run:

- every rank reads the data and the splits (they are deterministic), computes its shard of
  the feature cache and of each validation pass (gathered, so every rank holds all of it),
  trains the head on all the cached features (identically everywhere), and fine-tunes on
  its slice of each global batch;
- rank 0 alone times the engines (and broadcasts the choice), names the run folder, and
  writes logs, progress bars, checkpoints, the bundle and the report.

Every rank reads the checkpoints rank 0 writes, so on several machines the runs folder is
one they all share.

`--batch-size` is the global batch, split across the ranks, so a run means the same thing
on any number of processes and a checkpoint resumes on another number.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from wingspan.config import MAX_PROCESSES, RANK_WAIT_HOURS, STRATEGIES
from wingspan.errors import (
    LAUNCHER_PID_ENV,
    STARTED,
    WingspanError,
    die_with_launcher,
    end_started,
    first_line,
)

if TYPE_CHECKING:  # (Lightning is imported where a Fabric is made, `Processes.fabric`: one
    # process's predict and evaluate, which import this module, never make one)
    from lightning_fabric import Fabric

# Our precision names -> Fabric's for the training step.
FABRIC_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


class _Dropped(logging.Filter):
    """Drops the log records that hold `words`."""

    def __init__(self, words: str):
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        return self.words not in record.getMessage()


@dataclass(frozen=True)
class Processes:
    """Where a command runs: the device kind, processes per machine, machines, strategy."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    devices: int | None = None  # per machine; None: as torchrun / SLURM started, else 1
    nodes: int | None = None
    strategy: str = "auto"

    def __post_init__(self) -> None:  # predict's --devices, as train's
        for name in ("devices", "nodes"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= MAX_PROCESSES:
                raise WingspanError(f"--{name} {value}: must be 1 to {MAX_PROCESSES}.",
                                    hint=f"Leave --{name} out for one.")
        if self.strategy not in STRATEGIES:  # (said at once, on one process too)
            raise WingspanError(f"Unknown strategy '{self.strategy}'.",
                                hint=f"Use one of: {', '.join(STRATEGIES)}.")

    def fabric(self, precision: str = "fp32") -> Fabric:
        """This process's Fabric. The first call starts the other processes of this machine
        (with `--devices N`); in those, and on later calls, nothing more is started."""
        from lightning_fabric import Fabric
        from lightning_fabric.strategies.launchers import subprocess_script

        devices, nodes = self.world()
        accelerator, which = _accelerator(self.device)
        if which is not None:
            if devices != 1:
                raise WingspanError(f"--device {self.device} names one GPU, but --devices is "
                                    f"{devices}.", hint="Use --device cuda with --devices N.")
            devices = [which]
        said = logging.getLogger("lightning_fabric.utilities.rank_zero")
        amp = _Dropped("Automatic Mixed Precision")  # the run's engine line says it, -q too
        said.addFilter(amp)
        try:
            fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=nodes,
                            strategy=self.strategy, precision=FABRIC_PRECISION[precision])
        except (ValueError, RuntimeError) as e:  # e.g. more devices than the machine has
            raise WingspanError(f"Cannot run on {self.describe()}: {e}",
                                hint="Check --device, --devices and --nodes.") from e
        finally:
            said.removeFilter(amp)
        die_with_launcher()  # (a library call's processes: the command's did at its start)
        if not _starts_processes(fabric):
            fabric.launch()
            return fabric
        _check_launchable(fabric)
        # The processes it starts go in STARTED (a SIGTERM ends them even while they start)
        # and are watched by `_watch_started`, not by Lightning's watcher.
        # (Lightning's names are private: where they change, its own watcher stays.)
        launcher = fabric.strategy.launcher
        lightnings = getattr(subprocess_script, "_launch_process_observer", None)
        STARTED.clear()  # (an earlier call's, ended)
        launcher.procs = STARTED
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # (what they inherit)
        if lightnings is not None:
            subprocess_script._launch_process_observer = _watch_started
        try:
            fabric.launch()
        finally:
            if lightnings is not None:
                subprocess_script._launch_process_observer = lightnings
            os.environ.pop(LAUNCHER_PID_ENV, None)
        return fabric

    def world(self) -> tuple[int, int]:
        """(processes per machine, machines): as given, else as torchrun set them. Under
        SLURM give both (`--devices` = tasks per node); Fabric checks them against SLURM's."""
        local, world = torchrun_processes()
        if local and self.devices not in (None, local):  # each process would run it all
            raise WingspanError(
                f"torchrun started {local} processes on this machine, but --devices is "
                f"{self.devices}: each would run the whole command on its own.",
                hint="Leave --devices out under torchrun (it takes torchrun's), or make "
                     "them agree.", every_rank=True)
        if local:
            return local, self.nodes or world // local
        nodes = self.nodes or 1
        if nodes > 1 and not any(v in os.environ for v in LAUNCHERS_ENV):
            raise WingspanError(
                f"--nodes {nodes}, but nothing says where the other machines are (no "
                "MASTER_ADDR, torchrun or SLURM): this process would wait for them forever.",
                hint="Start it with torchrun or srun (README: GPUs and clusters), or run the "
                     "same command on each machine with MASTER_ADDR (the first machine's "
                     "address), MASTER_PORT and NODE_RANK (0, 1, ...) set; to resume a run "
                     "of several machines on this one alone, give --nodes 1.")
        return self.devices or 1, nodes

    def describe(self) -> str:
        devices, nodes = self.world()
        return f"{self.device} x {devices}" + (f" on {nodes} machines" if nodes > 1 else "")


# Set where a launcher (or the user, for a machine of several) says how the processes meet.
LAUNCHERS_ENV = ("MASTER_ADDR", "TORCHELASTIC_RUN_ID", "SLURM_PROCID")


def torchrun_processes() -> tuple[int, int]:
    """(this machine's processes, all of them) that torchrun started; (0, 0) without it."""
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE")
    if local and world and "TORCHELASTIC_RUN_ID" in os.environ:
        return int(local), int(world)
    return 0, 0


def check_one_process(command: str) -> None:
    """A command that runs in one process (evaluate, export...) started by torchrun in
    several: each would do all of it, racing for the same files. Refused on every rank."""
    _, world = torchrun_processes()
    if world > 1:
        raise WingspanError(
            f"`wingspan {command}` runs in one process, but torchrun started {world}: each "
            "would do all of it, writing the same files at once.",
            hint=f"Run it without torchrun (a plain `wingspan {command} ...`); only train "
                 "and predict share their work across processes.", every_rank=True)


# How long this process has to see, in a collective, that a process it started failed
# (it then says so in a line), before a SIGTERM stops it; as long again before a SIGKILL.
STARTED_FAILED_GRACE_S = 5.0


def _watch_started(started: list) -> None:
    """Watches the processes this one started (`STARTED`), in place of Lightning's launcher:
    once one failed, that watcher killed this one with SIGKILL within 5 s (exit 137, train.log
    not saying that the run had stopped, nor how to go on). This one is given
    `STARTED_FAILED_GRACE_S` to see the loss in a collective (it then says so itself); else
    a line names the process that ended and how, and a SIGTERM stops this one as `kill`
    does (train's stop line, how to resume), then a SIGKILL, should that not land (this one
    held in C++: a collective stuck in NCCL, or waiting for that process to join)."""

    def watch() -> None:
        while started:  # (end_started empties it: this process is stopping already)
            codes = [p.poll() for p in list(started)]
            if any(code not in (None, 0) for code in codes):
                break
            if all(code == 0 for code in codes):
                return
            time.sleep(1)
        else:
            return
        time.sleep(STARTED_FAILED_GRACE_S)
        ended = next((p for p in list(started) if p.poll() not in (None, 0)), None)
        if ended is None:  # (end_started took them: this process is stopping already)
            return
        code = ended.poll()
        how = f"exit code {code}"
        if code < 0:
            with contextlib.suppress(ValueError):
                how = f"killed by {signal.Signals(-code).name}"
        print(f"Another process of this run (pid {ended.pid}) ended ({how}): stopping this "
              "one.", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # (its handler ends the others too)
        time.sleep(STARTED_FAILED_GRACE_S)
        end_started()  # (Linux ends them with this one anyway: die_with_launcher)
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # (Windows: none)

    threading.Thread(target=watch, name="wingspan-started", daemon=True).start()


def _starts_processes(fabric: Fabric) -> bool:
    """Whether this process's Fabric starts the machine's other processes when launched (not
    torchrun, SLURM, or a process Fabric itself started)."""
    launcher = fabric.strategy.launcher
    here = getattr(launcher, "num_processes", 1)  # this machine's (each machine starts its own)
    environment = getattr(launcher, "cluster_environment", None)
    return launcher is not None and here > 1 and not (
        environment is not None and environment.creates_processes_externally)


def _check_launchable(fabric: Fabric) -> None:
    """Fabric starts a machine's other processes by running this program again: from a
    script file that works; from `python -c`, standard input or a notebook it would kill
    the process (or fail deep in Lightning), so that is said first."""
    import __main__

    launcher = fabric.strategy.launcher
    here = launcher.num_processes
    rerunnable = (getattr(__main__, "__spec__", None) is not None  # python -m module
                  or os.path.isfile(sys.argv[0] if sys.argv else ""))
    # Lightning's launchers by name (they are private): the script one runs the program
    # again; the multiprocessing one (a notebook's) needs a function wingspan does not give.
    # Any other is left to Fabric.
    kind = type(launcher).__name__
    if (kind == "_SubprocessScriptLauncher" and rerunnable) or kind not in (
            "_SubprocessScriptLauncher", "_MultiProcessingLauncher"):
        return
    raise WingspanError(
        f"{here} processes are started here by running this program again, and it is no "
        "script file (python -c, standard input or a notebook).",
        hint="Put the code in a file and run it (python my_script.py), use the command "
        "(wingspan ... --devices N), or start the processes with torchrun; in a notebook, "
        "leave devices out.")


def _accelerator(device: str) -> tuple[str, int | None]:
    """Fabric's accelerator for our --device, and the GPU index if one is named."""
    from wingspan.models.policy import torch_device

    if device == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu"), None
    dev = torch_device(device)
    return dev.type, dev.index


def long_wait(fabric: Fabric) -> Callable[[], None]:
    """A barrier for the ranks that wait while rank 0 alone ends a run (the lossy check,
    the final passes, the bundle), with RANK_WAIT_HOURS as its timeout, not the process
    group's (torch's 30 minutes, which ETHEC's final passes on a CPU can pass: the waiting
    ranks then failed, and so did each resume on as many processes). The other collectives
    keep the group's, so that a rank hung elsewhere is not waited for for hours. Every
    rank calls this first (it makes a process group: gloo, which waits on the CPU), then
    the returned barrier once its part is done."""
    if fabric.world_size == 1 or not dist.is_initialized():
        return fabric.barrier  # (one process: nothing to wait for)
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=RANK_WAIT_HOURS))
    return lambda: dist.barrier(group=group)


def local_fabric(device: str = "auto") -> Fabric:
    """One process on one device, for a caller that has no run to take its processes from
    (tests, a notebook that calls a stage directly)."""
    return Processes(device=device, devices=1, nodes=1).fabric()


# --- sharding: every rank takes every world_size-th item ---------------------------------

def shard(n: int, fabric: Fabric) -> list[int]:
    """This rank's items of 0..n-1 (strided, so the shards differ in size by one at most)."""
    return list(range(fabric.global_rank, n, fabric.world_size))


def gather_shards(fabric: Fabric, part: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's rows for its `shard(n)` -> all n rows in order, on every rank (CPU)."""
    world = fabric.world_size
    if world == 1:
        return part
    rows = -(-n // world)
    padded = part.new_zeros((rows, *part.shape[1:]))
    padded[:len(part)] = part
    padded = padded.to(fabric.device)
    # torch's own collective: Fabric's all_gather goes through the autograd-aware one,
    # which warns of its deprecation on every call, and nothing here needs gradients.
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    # Rank r's row i is item i * world + r.
    return (torch.stack(gathered, 1).cpu()
            .reshape(world * rows, *part.shape[1:])[:n])


def rank_seed(seed: int, rank: int, *where: int) -> int:
    """A seed for `rank`'s own random stream (dropout), distinct per rank and place."""
    return int(np.random.SeedSequence([seed, rank, *where]).generate_state(1)[0])


def gather_to_main(fabric: Fabric, items: list) -> list | None:
    """Each rank's list of picklable items -> the lists of all ranks, by rank, on rank 0
    only (None elsewhere): for results only rank 0 writes, so no rank holds them all but
    the one that must."""
    if fabric.world_size == 1:
        return [items]
    out = [None] * fabric.world_size if fabric.is_global_zero else None
    torch.distributed.gather_object(items, out, dst=0)
    return out


def gather_objects(fabric: Fabric, items: list) -> list:
    """Each rank's list of picklable items -> the lists of all ranks, by rank (every rank).
    Used between our own processes only, never on anything read from a file."""
    if fabric.world_size == 1:
        return [items]
    out = [None] * fabric.world_size
    torch.distributed.all_gather_object(out, items)
    return out


def every_rank(fabric: Fabric, flag: bool) -> bool:
    """True on every rank if `flag` is true on every rank (a collective: every rank calls
    it): a choice each rank makes from its own reading, such as a cache file it can use,
    taken by all or none."""
    return all(gather_objects(fabric, [bool(flag)])[r][0] for r in range(fabric.world_size))


def interleave(parts: list[list]) -> list:
    """Undo `shard`: the per-rank lists of a strided split back in item order."""
    return [parts[i % len(parts)][i // len(parts)]
            for i in range(sum(len(p) for p in parts))]


def check_default_dtype() -> None:
    """Refuse at once where torch's default dtype is not float32 (a notebook's
    `torch.set_default_dtype(torch.float64)`): models built so hold float64 weights, and
    training or predicting failed after the slow part with "Input type (torch.FloatTensor)
    and weight type (torch.DoubleTensor) should be the same"."""
    if torch.get_default_dtype() != torch.float32:
        raise WingspanError(f"torch's default dtype is {torch.get_default_dtype()}; wingspan "
                            "builds its models in float32.",
                            hint="Call torch.set_default_dtype(torch.float32) first.")


def peer_lost(error: BaseException) -> bool:
    """Whether a distributed run's error is a collective that failed because another process
    ended (gloo: "Connection closed by peer"; NCCL: "remote process exited"), not this one's
    own fault (an out-of-memory inside NCCL, a watchdog's timeout: their words stay)."""
    said = str(error)
    return isinstance(error, RuntimeError) and any(
        word in said for word in ("closed by peer", "reset by peer", "remote process exited",
                                  "Broken pipe"))


def lost_peer_said(fabric: Fabric, error: BaseException) -> str:
    """What a process says when another of its run ended (see `peer_lost`): gloo's "[.../
    pair.cc:561] Connection closed by peer [127.0.0.1]:3973. This is typically caused
    by..." shortened to "Connection closed by peer [127.0.0.1]:3973"."""
    cause = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error)).split(". ")[0].rstrip(".")
    return (f"Process {fabric.global_rank} of {fabric.world_size} stopped: another process "
            f"of the run ended, so this one could not go on: {cause}. The other process's "
            "output says why, unless it was killed outright (as the out-of-memory killer "
            "does).")
