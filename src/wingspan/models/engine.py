"""Engines, and choosing one by measuring it on this machine.

An engine is a runtime and a numeric precision: PyTorch fp32, PyTorch bf16 (autocast) or
ONNX Runtime fp32 for passes whose weights do not change; PyTorch fp32 or bf16 for the
training step. Which is fastest depends on the CPU *and* the model: on one AVX-512-bf16
EPYC bf16 was fastest for ResNet-50 but ONNX Runtime for EfficientNet-Lite2, and on an
AVX2 EPYC bf16 was 7x slower than fp32. So the CPU's flags only say what may run natively
(the candidates); a short timing on this machine says what runs. The timing is done once
per (pass, model, input size, batch size, device, CPU, library versions) and kept in
`engines.json` in the cache folder. Nothing here is in a library: timm and torch pick
kernels, not engines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from wingspan.config import (
    PRECISION_NAMES,
    EngineConfig,
    cpu_quota,
    default_cache_dir,
    usable_cores,
)
from wingspan.errors import WingspanError, first_line
from wingspan.files import atomic_path, shared_folder

PRECISIONS = dict(zip(PRECISION_NAMES, (None, torch.bfloat16, torch.float16), strict=True))


@dataclass(frozen=True)
class Engine:
    runtime: str  # torch | onnx
    precision: str  # fp32 | bf16 | fp16

    @property
    def name(self) -> str:
        return f"{self.runtime}-{self.precision}"

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for plain fp32."""
        return PRECISIONS[self.precision]


ENGINES = (Engine("torch", "fp32"), Engine("torch", "bf16"), Engine("torch", "fp16"),
           Engine("onnx", "fp32"))


def engine_named(name: str) -> Engine:
    return next(e for e in ENGINES if e.name == name)


# --- what may run here ------------------------------------------------------------------

@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def processor(device: torch.device) -> str:
    """What runs the kernels on `device`: the GPU's name, or the CPU's with the instruction
    sets that pick its kernels. The CPU's name alone is not enough: VMs here report "AMD
    EPYC" for an AVX2-only part and for one with AVX-512 bf16, where the fastest engines
    differ (and bf16 computes otherwise)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    fast = sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16"} & cpu_flags())
    return (f"{cpu_name()} ({' '.join(fast)}; torch "
            f"{torch.backends.cpu.get_cpu_capability()})")


def own_random_stream(device: torch.device):
    """A context in which random draws (dropout while timing) leave the run's streams as
    they were: the CPU's and, on a GPU, that GPU's."""
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    return torch.random.fork_rng(devices=gpus)


@lru_cache(maxsize=1)
def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: AMX or AVX-512 bf16 on a CPU, Ampere or newer on a GPU. Elsewhere
    bf16 is emulated and several times slower than fp32, so not worth timing."""
    if device.type == "cuda":
        return _gpu_has_bf16(device)
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def _gpu_has_bf16(device: torch.device) -> bool:
    """bf16 on this GPU (compute capability 8.0, Ampere, or later): asked of `device`, as
    torch.cuda.is_bf16_supported asks of the current GPU (cuda:0 for --device cuda:1 on
    a machine of an A100 and a T4)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cannot_run(engine: Engine, device: torch.device, train: bool) -> str:
    """Why `engine` cannot run on `device` (for a training step if `train`), or ''."""
    if engine.runtime == "onnx":
        if train:
            return "training needs gradients, which only PyTorch computes"
        if device.type != "cpu":
            return "wingspan runs ONNX Runtime on the CPU only"
        if not onnx_available():
            return "onnxruntime is not installed"
    if engine.precision == "fp16" and device.type == "cpu":
        return "fp16 is not supported on the CPU"
    if engine.precision == "bf16" and device.type == "cuda" and not _gpu_has_bf16(device):
        return "this GPU has no bf16"
    return ""


def auto_leaves_out(engine: Engine, device: torch.device) -> str:
    """Why `auto` leaves out an engine that could run, or ''."""
    if engine.precision == "bf16" and not native_bf16(device):
        return "bf16 is emulated here (no AMX / AVX-512 bf16), several times slower"
    return ""


def candidates(device: torch.device, precision: str, runtime: str, train: bool
               ) -> tuple[list[Engine], dict[str, str]]:
    """The engines `auto` chooses among, and why each other engine is left out.

    `precision` and `runtime` ('auto' or a forced value) narrow the list; for a training
    step the runtime is always PyTorch. An empty list is an error that says why."""
    chosen, left_out = [], {}
    for engine in ENGINES:
        why = cannot_run(engine, device, train)
        if not why and precision != "auto" and engine.precision != precision:
            why = f"precision {precision} was asked for"
        if not why and not train and runtime != "auto" and engine.runtime != runtime:
            why = f"runtime {runtime} was asked for"
        if not why and precision == "auto":
            why = auto_leaves_out(engine, device)
        if why:
            left_out[engine.name] = why
        else:
            chosen.append(engine)
    if not chosen:
        asked = [e for e in ENGINES if (precision in ("auto", e.precision)) and
                 (train or runtime in ("auto", e.runtime))]
        reasons = "; ".join(sorted({cannot_run(e, device, train) for e in asked} - {""}))
        raise WingspanError(
            f"Nothing can run precision {precision} with runtime {runtime} on {device.type}"
            + (f": {reasons}." if reasons else "."),
            hint="ONNX Runtime runs fp32 on the CPU; bf16 and fp16 need --runtime torch. "
            "Use auto for either to let wingspan choose.")
    return chosen, left_out


# --- a choice and where it is kept -------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """The engine for one kind of pass, and why: forced, measured now, or cached."""

    engine: Engine
    how: str  # forced by ... | the only candidate... | measured | cached | as the run began
    images_per_s: dict[str, float] = field(default_factory=dict)  # per candidate measured
    rejected: dict[str, str] = field(default_factory=dict)  # candidate -> why not eligible
    changed: dict[str, float] = field(default_factory=dict)  # share against PyTorch fp32
    seconds: float = 0.0  # what measuring cost (0 when cached or forced)
    measured_on: str = ""  # date of the measurement
    # The share of the timing its threads spent waiting for a core that other work held
    # (None where the system does not say): over EngineConfig.max_core_wait, not kept;
    # `stays`: then the choice stored before, which later runs keep ("" where none was).
    core_wait: float | None = None
    stays: str = ""

    @property
    def cores_shared(self) -> bool:
        limit = max_core_wait()  # (1 keeps every choice)
        return self.how == "measured" and limit < 1 and (self.core_wait or 0.0) > limit

    def describe(self) -> str:
        chosen = self.images_per_s.get(self.engine.name, math.inf)

        def why_not(name: str, speed: float) -> str:
            if name in self.rejected:
                return " (rejected)"
            # (a lossy engine a little faster, not taken: see measured_choice)
            return f" (lossy, not {EngineConfig().lossy_gain:g}x as fast)" if speed > chosen else ""

        figures = ", ".join(f"{n} {v:.1f}" + why_not(n, v)
                            for n, v in sorted(self.images_per_s.items(), key=lambda kv: -kv[1]))
        how = self.how + (f" {self.seconds:.1f}s" if self.how == "measured" else "")
        if self.cores_shared:
            how += (f" while other work held the cores, its threads waiting "
                    f"{self.core_wait:.0%} of the time: not kept, "
                    + (f"runs keep the choice stored before ({self.stays})" if self.stays
                       else "timed again next time"))
        return f"{self.engine.name} ({how}" + (f"; images/s {figures}" if figures else "") + ")"

    def to_record(self) -> dict:
        record = asdict(self)
        record["engine"] = self.engine.name
        return record

    @classmethod
    def from_record(cls, record: dict, how: str) -> Choice:
        values = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        return cls(**{**values, "engine": engine_named(record["engine"]), "how": how})


# How measured_choice picks, in the cache's key: choices made by an older rule (the
# fastest, lossy or not, before lossy_gain) are measured again.
CHOICE_RULE = 2


def engine_key(kind: str, model: str, size: int, batch_size: int, device: torch.device,
               engines: list[Engine], **extra) -> dict:
    """Everything a measurement depends on. A change in any of it measures again."""
    import timm

    ort = "-"
    if onnx_available():
        import onnxruntime

        ort = onnxruntime.__version__
    where = processor(device) + ("" if device.type == "cuda" else
                                 f" x{usable_cores()}, {torch.get_num_threads()} threads")
    return {"kind": kind, "model": model, "size": size, "batch_size": batch_size,
            "rule": CHOICE_RULE,
            "device": f"{device.type}: {where}", "torch": torch.__version__,
            "onnxruntime": ort, "timm": timm.__version__,
            "candidates": [e.name for e in engines], **extra}


class EngineCache:
    """Measured choices in one JSON file: key (as sorted JSON) -> Choice record."""

    def __init__(self, path: Path | None = None):
        self.path = path or default_cache_dir() / EngineConfig.cache_file

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or damaged: measure again
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: dict) -> dict | None:
        return self._read().get(json.dumps(key, sort_keys=True))

    def put(self, key: dict, record: dict) -> bool:
        """Read, add, write to a temporary file and rename: a reader never sees half a
        file. Two processes writing at once may lose one entry, which is measured again."""
        data = self._read()
        data[json.dumps(key, sort_keys=True)] = record
        try:
            shared_folder(self.path.parent)  # (often the first thing a new cache holds)
            with atomic_path(self.path, durable=False) as tmp:
                tmp.write_text(json.dumps(data, indent=1))
        except (OSError, WingspanError) as e:  # a read-only or full cache only costs a
            # measurement next time: said once (doctor said "Kept in" it regardless)
            if not NOT_KEPT:
                NOT_KEPT.append(self.path)
                # (the error's first line: a full disk's hint is to resume a training run)
                file = next((p for p in self.path.parents if p.is_file()), None)
                why = f"{file} is a file, not a folder" if file else first_line(e)
                warnings.warn(f"Could not keep the engines' timings in {self.path} ({why}): "
                              "each run times them again. Set $WINGSPAN_CACHE to a folder "
                              "you may write, on a disk with room.", stacklevel=2)
            return False
        return True


NOT_KEPT: list[Path] = []  # the cache put could not write, once said


# --- measuring ----------------------------------------------------------------------------

class CoreWait:
    """Over a `with` block, the share of its wall time this process's threads spent ready
    to run but waiting for a core that other work held (`share`; None where the system
    does not say). Hand-written: Linux's per-thread schedstat says it exactly, where the
    CPU time a process got mixes the load in with its own idle threads (ONNX Runtime's
    pool sleeps between calls). Under a CPU quota of fewer cores than threads (Docker's
    cpus option, a Kubernetes limit) the time the quota holds the threads back counts as
    waiting too, whatever else runs (25-60% measured), so there it says nothing."""

    def __enter__(self) -> CoreWait:
        self.share: float | None = None
        quota = cpu_quota()  # (one of as many cores as threads, or more, holds none back)
        held = quota is not None and quota < torch.get_num_threads()
        self._start = time.perf_counter(), None if held else waiting_seconds()
        return self

    def __exit__(self, *exc) -> None:
        if self._start[1] is None:  # (nothing said at the start: nothing to compare)
            return
        wall, waited = time.perf_counter() - self._start[0], waiting_seconds()
        if waited is not None and wall > 0:
            self.share = round(max(waited - self._start[1], 0.0)
                               / (wall * max(torch.get_num_threads(), 1)), 3)


CORE_WAIT_ENV = "WINGSPAN_MAX_CORE_WAIT"


def max_core_wait() -> float:
    """EngineConfig.max_core_wait, or $WINGSPAN_MAX_CORE_WAIT (a share from 0 to 1; 1 keeps
    every choice: a machine always shared, or a test suite whose workers share it)."""
    given = os.environ.get(CORE_WAIT_ENV, "").strip()
    if not given:
        return EngineConfig().max_core_wait
    try:
        share = float(given)
    except ValueError:
        share = -1.0
    if not 0 <= share <= 1:
        raise WingspanError(f"${CORE_WAIT_ENV} is {given!r}: a share of the timing from 0 to "
                            "1 is wanted.", hint=f"Unset it (default "
                            f"{EngineConfig().max_core_wait:g}), or 1 to keep every choice.")
    return share


def unless_shared(choice: Choice, cache: EngineCache, key: dict) -> Choice:
    """Store `choice` under `key`, unless it was timed while other work held the cores:
    then the one stored before (if any) stays, and `choice` says which."""
    if not choice.cores_shared:
        cache.put(key, choice.to_record())
        return choice
    before = cache.get(key)
    return dataclasses.replace(choice, stays=(
        f"{before['engine']}, timed {before.get('measured_on') or 'earlier'}" if before
        and before.get("engine") else ""))


def cpu_wait(wait: CoreWait, device: torch.device) -> float | None:
    """A timing's core wait where it times the CPU (a GPU's timing waits on the GPU)."""
    return wait.share if device.type == "cpu" else None


def waiting_seconds() -> float | None:
    """Seconds this process's threads have waited for a core, runnable but not running
    (the second field of /proc/self/task/*/schedstat; a thread that has ended takes its
    own with it), or None off Linux."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    total, read = 0, False
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
            read = True
        except (OSError, ValueError, IndexError):  # (a thread that ended meanwhile)
            continue
    return total / 1e9 if read else None


def time_calls(calls: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor,
               rounds: int, near_tie: float | None) -> tuple[dict[str, float], dict]:
    """Seconds per call of `x` for each candidate, and each one's output.

    Each candidate first runs once on `x` itself: the first call at a new batch shape sets
    up memory and kernels (ONNX Runtime's first call on 64 images was 1.4-2x slower than
    the next), and one on fewer images left that set-up in round 1 and picked the slower
    engine. That first call was at most 2x slower than the next in every case measured,
    so a candidate whose warm-up took over twice the fastest warm-up is not timed further
    (its figure is that warm-up). Then the candidates take turns, round after round, so
    that a slow spell on a shared machine hits each alike; each keeps its fastest call.
    After round 1, only the candidates within `near_tie` of the best are timed again;
    alone, the best is done. Without `near_tie` every candidate runs every round."""
    warm, outputs = {}, {}
    for name, call in calls.items():
        start = time.perf_counter()
        outputs[name] = call(x)
        warm[name] = time.perf_counter() - start
    best: dict[str, float] = {}
    alive = list(calls)
    if near_tie:  # a warm-up over twice the fastest one's cannot win: go on without it
        alive = [n for n in alive if warm[n] <= 2 * min(warm.values())]
        best.update({n: warm[n] for n in calls if n not in alive})
    for _ in range(rounds):
        for name in alive:
            start = time.perf_counter()
            calls[name](x)
            seconds = time.perf_counter() - start
            best[name] = min(best.get(name, seconds), seconds)
        if near_tie:
            fastest = min(best[n] for n in alive)
            alive = [n for n in alive if best[n] <= near_tie * fastest]
            if len(alive) == 1:
                break
    return best, outputs


@torch.inference_mode()
def guard(model, outputs: dict[str, torch.Tensor], device: torch.device,
          reference: str = "torch-fp32") -> tuple[dict[str, float], dict[str, str]]:
    """Each candidate's pooled features against the reference's, on the same images: the
    share of images that changed (see EngineConfig), and why a candidate is rejected."""
    config = EngineConfig()
    changed, rejected = {}, {}
    for name, out in outputs.items():
        if not torch.isfinite(out).all():
            rejected[name] = "gives NaN or infinite features"
    if reference not in outputs:
        return changed, rejected
    was_training = model.head.training
    model.head.eval()
    finest = model.levels[-1]

    def probs(features: torch.Tensor) -> torch.Tensor:
        return model.head(features.to(device).float())[finest].float().softmax(1).cpu()

    ref = outputs[reference].float()
    ref_probs = probs(ref)
    top2 = ref_probs.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > config.top1_margin
    for name, out in outputs.items():
        cosine = torch.nn.functional.cosine_similarity(out.float(), ref, dim=1)
        flipped = decided & (probs(out).argmax(1) != ref_probs.argmax(1))
        changed[name] = float(((cosine < config.min_feature_cosine) | flipped).float().mean())
        if name not in rejected and changed[name] > config.max_changed:
            rejected[name] = (f"changes {changed[name]:.0%} of the timing images against "
                              f"{reference} (features or top-1; at most "
                              f"{config.max_changed:.0%} allowed)")
    model.head.train(was_training)
    return changed, rejected


@lru_cache(maxsize=4)
def _butterflies(size: int, n: int) -> torch.Tensor:
    """`n` synthetic butterfly photos as float (n, 3, size, size) in [0, 1]: image-like and
    the same everywhere, so a measurement needs no data and its guard sees real structure.
    16 distinct ones at most, drawn at up to 128 px and repeated (drawing 32 at 224 px took
    1.3 s, a sizeable part of what the timing may cost)."""
    from wingspan.data.demo import SPECIES, draw_butterfly

    rng = np.random.default_rng(0)
    drawn = min(n, 16)
    images = [np.asarray(draw_butterfly(SPECIES[i % len(SPECIES)], min(size, 128), rng))
              for i in range(drawn)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                        align_corners=False)
    return x.repeat((n + drawn - 1) // drawn, 1, 1, 1)[:n].contiguous()


def timing_images(batch_size: int) -> int:
    """Images per timed call: the batch size, at most EngineConfig.timing_images."""
    return max(2, min(batch_size, EngineConfig().timing_images))


def timing_batch(size: int, n: int, mean, std) -> torch.Tensor:
    """The timing images, normalised as the model expects."""
    x = _butterflies(size, n)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def measured_choice(seconds: dict[str, float], n: int, rejected: dict[str, str],
                    changes: dict[str, float], cost: float,
                    core_wait: float | None = None) -> Choice:
    """The fastest eligible candidate, with every figure (`n` images per timed call); a
    lossy one (bf16, fp16) only where it is EngineConfig.lossy_gain times as fast as the
    fastest fp32 one. If every one is rejected, the model itself is broken: take the
    fastest, the run shows it. `core_wait`: see CoreWait."""
    eligible = {k: v for k, v in seconds.items() if k not in rejected} or seconds
    name = min(eligible, key=eligible.get)
    exact = [k for k in eligible if engine_named(k).precision == "fp32"]
    if engine_named(name).precision != "fp32" and exact:
        best_exact = min(exact, key=eligible.get)
        if eligible[best_exact] < eligible[name] * EngineConfig().lossy_gain:
            name = best_exact
    return Choice(engine_named(name), "measured",
                  images_per_s={k: round(n / v, 1) for k, v in seconds.items()},
                  rejected=rejected, changed={k: round(v, 3) for k, v in changes.items()},
                  seconds=round(cost, 2), measured_on=time.strftime("%Y-%m-%d %H:%M"),
                  core_wait=core_wait)
