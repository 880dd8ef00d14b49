"""Where a model runs and on which engine: one policy per run, forced or measured.

- the device: CUDA when present, else the CPU (`--device`);
- channels_last memory format for convolutional networks;
- for passes whose weights do not change (stage 1's feature cache, validation, evaluate,
  predict, the frozen stages in front of the fine-tuned ones): the fastest of PyTorch
  fp32, PyTorch bf16 (where the hardware has bf16) and ONNX Runtime fp32, timed on this
  machine the first time a model is used (`wingspan.models.engine`);
- for the training step: PyTorch fp32, bf16 or (on GPUs) fp16 mixed precision, timed the
  same way (`wingspan.training.finetune_engine`) and run by Lightning Fabric (`wingspan.parallel`).
`--precision` and `--runtime`, else $WINGSPAN_PRECISION and $WINGSPAN_RUNTIME, narrow the
candidates; where one is left it is used without timing ("forced").
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from wingspan.config import (
    PRECISION_ENV,
    RUNTIME_ENV,
    RUNTIMES,
    EngineConfig,
    cpu_quota,
    usable_cores,
)
from wingspan.errors import WingspanError, counted
from wingspan.models import engine
from wingspan.models.engine import (
    ENGINES,
    PRECISIONS,
    Choice,
    CoreWait,
    Engine,
    EngineCache,
    auto_leaves_out,
    candidates,
    cannot_run,
    cpu_wait,
    engine_key,
    engine_named,
    guard,
    measured_choice,
    own_random_stream,
    time_calls,
    timing_batch,
    timing_images,
    unless_shared,
)
from wingspan.models.runtime import autocast, export_seconds, make_runner
from wingspan.progress import status


@dataclass(frozen=True)
class Policy:
    device: torch.device
    channels_last: bool
    frozen_candidates: tuple[Engine, ...]  # for passes with frozen weights
    train_candidates: tuple[Engine, ...]  # for the training step
    left_out: dict[str, str] = field(default_factory=dict)  # engine -> why not a candidate
    train_left_out: dict[str, str] = field(default_factory=dict)
    frozen: Choice | None = None  # None until measured (or read from the cache)
    train: Choice | None = None
    # Lossy engines left out of this model's frozen passes (training.lossy_check): why
    avoided: dict[str, str] = field(default_factory=dict)
    # A lossy frozen engine that this model's check never measured (a Predictor's: trained
    # where it was no candidate, or before the check), said with the choice
    unchecked: bool = False

    # -- running -------------------------------------------------------------------------

    @property
    def train_precision(self) -> str:
        """fp32 | bf16 | fp16: the training step's, which Lightning Fabric applies (with a
        grad scaler for fp16)."""
        return self._chosen("train").engine.precision if self.train else "fp32"

    @property
    def train_dtype(self) -> torch.dtype | None:
        """The training step's autocast dtype, None for fp32 (as `train_precision`): what
        a fine-tuning validation pass runs the unfrozen stages in."""
        return self.train.engine.dtype if self.train else None

    def autocast(self):
        """The training step's precision, for timing it (training runs under Fabric)."""
        return autocast(self.device, self._chosen("train").engine.dtype)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_batch(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if (
            self.channels_last and images.dim() == 4) else images

    def runner(self, module: nn.Module, size: int, names: list[str] | None = None,
               once: int = 0, keep: bool | None = None):
        """`module` with its current weights as a fast `runner(images) -> outputs` for a
        pass that changes no weights (outputs as float32 on the CPU). `once`: the images of
        a single pass on weights that change right after it (a validation pass while
        training), for which an ONNX export is made only where it pays for itself. `keep`:
        an ONNX graph kept on disk for other processes (default: unless `once`)."""
        engine = self._chosen("frozen").engine
        if once and engine.runtime == "onnx":
            engine = self._for_one_pass(module, size, names, once)
        return make_runner(module, size, engine, self.device, self.channels_last, names,
                           keep=not once if keep is None else keep)

    def _for_one_pass(self, module: nn.Module, size: int, names: list[str] | None,
                      images: int) -> Engine:
        """ONNX Runtime, or the fastest eligible PyTorch engine where that runs `images`
        images sooner than an export (its seconds as measured in this run) and ONNX Runtime
        together, by the images/s measured on this machine. No rule of thumb holds: for
        EfficientNet-Lite0 on one thread of an AMX Xeon (bench/oneoff_pass.py, twice) an
        export took 1.4-1.7 s, and ONNX Runtime ran 32-54 images/s against PyTorch bf16's
        31-46 and fp32's 14-21: bf16 won a pass of up to 450 images or more, fp32 one of up
        to about 45; on an AVX2 CPU, where ONNX Runtime ran 3-4x as fast as fp32 (README),
        the export pays from a few dozen. A forced choice has no figures: ONNX Runtime."""
        choice = self._chosen("frozen")
        speeds = {k: v for k, v in choice.images_per_s.items()
                  if k not in choice.rejected and v > 0}
        fastest = max((k for k in speeds if k.startswith("torch-")), key=speeds.get,
                      default=None)
        export = export_seconds(module, size, names)
        if fastest is None or choice.engine.name not in speeds or export is None:
            return choice.engine  # nothing to weigh (an export measures one for next time)
        onnx = export + images / speeds[choice.engine.name]
        return engine_named(fastest) if images / speeds[fastest] < onnx else choice.engine

    def _chosen(self, kind: str) -> Choice:
        choice = getattr(self, kind)
        if choice is None:  # a programming error, not a user's
            raise RuntimeError(f"The {kind} engine is not chosen yet: call choose_{kind}.")
        return choice

    def describe(self) -> str:
        def one(choice: Choice | None, engines) -> str:
            return choice.describe() if choice else (
                "(to measure: " + ", ".join(e.name for e in engines) + ")")

        layout = ", channels_last" if self.channels_last else ""
        frozen = one(self.frozen, self.frozen_candidates) + "".join(
            f"; not {name} for this model: {why}" for name, why in self.avoided.items())
        if self.unchecked and self.frozen:
            frozen += (f"; {self.frozen.engine.name} never checked against fp32 on this "
                       "model's val images (trained where it was no candidate, before the "
                       "check, or where the check failed): --precision fp32 (precision="
                       "\"fp32\" in Python) answers as the export does")
        text = f"{self.device.type}{layout}; frozen passes {frozen}"
        return text + (f"; training step {self.train.describe()}" if self.train else "")

    def records(self) -> dict:
        """The choices as JSON (run metrics, checkpoints)."""
        return {k: c.to_record() for k, c in (("frozen", self.frozen), ("train", self.train)) if c}

    # -- choosing ------------------------------------------------------------------------

    def choose_frozen(self, model: nn.Module, size: int, batch_size: int,
                      remeasure: bool = False, thorough: bool = False,
                      progress: bool = False, job_images: int | None = None) -> Policy:
        """This policy with the engine for frozen passes of `model` (a Classifier) chosen:
        forced, cached, or measured now and cached. `remeasure` ignores the cache;
        `thorough` times every candidate fully (no early drop, one more round); `progress`
        shows a message while timing. `job_images`: the images the passes are for, where
        known; fewer than one round of the timing passes run in PyTorch fp32 untimed."""
        if self.frozen and not remeasure:
            return self
        engines = list(self.frozen_candidates)
        n = timing_images(batch_size)
        key = engine_key("frozen", model.spec.name, size, batch_size, self.device, engines,
                         timing_images=n)
        cache = EngineCache()
        record = None if remeasure else cache.get(key)
        if record and record.get("engine") in {e.name for e in engines}:
            return self.with_choice("frozen", Choice.from_record(record, "cached"))
        # A few photos to predict: the timing (a warm-up, rounds and a check of n images on
        # each candidate) would cost many times the job. A timing beside other work is not
        # kept, so on a busy machine a predict of one photo timed every call (18-32 s for a
        # Lite0 at 224 px on a busy 2-core Xeon) before a pass of tens of milliseconds.
        reference = engine_named("torch-fp32")
        if job_images is not None and job_images < n * len(engines) and reference in engines \
                and not remeasure:
            return self.with_choice("frozen", Choice(reference, (
                f"untimed: {counted(job_images, 'image')}, fewer than timing the "
                f"{len(engines)} candidates takes; a larger job times them once")))
        with status(f"Timing {', '.join(e.name for e in engines)} for {model.spec.name} "
                    "(once per model and machine)", progress):
            choice = self._measure_frozen(model, size, n, engines, thorough)
        return self.with_choice("frozen", unless_shared(choice, cache, key))

    def _measure_frozen(self, model: nn.Module, size: int, n: int, engines: list[Engine],
                        thorough: bool) -> Choice:
        """Time each candidate on the feature extractor (where the time goes), then guard
        each one's features against PyTorch fp32's. The model is left as it was."""
        config = EngineConfig()
        start = time.perf_counter()
        pre = model.preprocessing
        x = timing_batch(size, n, pre.mean, pre.std)
        features = model.feature_extractor()
        was_training = model.training
        runners, failed = {}, {}
        with own_random_stream(self.device):
            for engine in engines:
                try:
                    runners[engine.name] = make_runner(features, size, engine, self.device,
                                                       self.channels_last, fallback=False,
                                                       keep=True)
                except Exception as e:  # noqa: BLE001 - e.g. a layer ONNX cannot export
                    failed[engine.name] = f"cannot run this model: {str(e)[:120]}"
            with CoreWait() as wait:
                seconds, outputs = time_calls(runners, x, config.rounds + thorough,
                                              None if thorough else config.near_tie)
            changed, rejected = guard(model, outputs, self.device)
        model.train(was_training)
        return measured_choice(seconds, n, {**failed, **rejected}, changed,
                               time.perf_counter() - start, cpu_wait(wait, self.device))

    def with_choice(self, kind: str, choice: Choice) -> Policy:
        return dataclasses.replace(self, **{kind: choice})

    def adopt(self, records: dict, how: str = "as the run began") -> Policy:
        """This policy with the choices in `records` (`records()` of another): a resumed run
        keeps the engines it started with, and the ranks of a distributed run use rank 0's,
        where they run here."""
        policy = self
        for kind in ("frozen", "train"):
            record = records.get(kind)
            names = {e.name for e in getattr(self, f"{kind}_candidates")}
            if record and record["engine"] in names:
                policy = policy.with_choice(kind, Choice.from_record(record, how))
        return policy


def check_engine_settings(precision: str = "auto", runtime: str = "auto") -> tuple[
        tuple[str, str], tuple[str, str]]:
    """(precision, what set it) and (runtime, what set it), from the arguments or else
    $WINGSPAN_PRECISION / $WINGSPAN_RUNTIME, refused when no engine has them. `train` checks
    them before a run's set-up: a resume that found one there was recorded as failed."""
    precision, by_precision = _setting(precision, PRECISION_ENV, "precision")
    runtime, by_runtime = _setting(runtime, RUNTIME_ENV, "runtime")
    if precision != "auto" and precision not in PRECISIONS:
        raise WingspanError(f"Unknown precision '{precision}'{_set_by(by_precision)}.",
                            hint=f"Use auto or one of: {', '.join(PRECISIONS)}.")
    if runtime != "auto" and runtime not in RUNTIMES:
        raise WingspanError(f"Unknown runtime '{runtime}'{_set_by(by_runtime)}.",
                            hint=f"Use auto or one of: {', '.join(RUNTIMES)}.")
    return (precision, by_precision), (runtime, by_runtime)


def torch_device(device: str) -> torch.device:
    """--device (auto, cpu, cuda, cuda:N) as torch's device, refused with a clear error where
    it is not there or not one wingspan runs on (an Apple GPU's mps passed predict's and
    evaluate's settings, then failed in torch with a traceback)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise WingspanError(f"Unknown device '{device}'.",
                            hint="Use auto, cpu, cuda or cuda:N (the Nth GPU).") from e
    if dev.type not in ("cpu", "cuda"):
        raise WingspanError(f"--device {device}: wingspan runs on the CPU or a CUDA GPU; "
                            + ("an Apple GPU (mps) is" if dev.type == "mps" else
                               f"{dev.type} devices are") + " not supported yet.",
                            hint="Use --device cpu, or auto (device=\"cpu\" in Python).")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WingspanError(f"--device {device} was asked for, but no CUDA GPU is available.",
                            hint="Use --device cpu (or auto; device=\"cpu\" in Python).")
    if dev.type == "cuda" and dev.index is not None and \
            dev.index >= (count := torch.cuda.device_count()):
        raise WingspanError(f"--device {device}: this machine has {counted(count, 'GPU')} "
                            f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}).",
                            hint="Name one of them, or cuda (the first); nvidia-smi lists "
                                 "them.")
    return dev


def resolve_policy(device: str = "auto", precision: str = "auto",
                   convolutional: bool = True, runtime: str = "auto",
                   avoid: dict[str, str] | None = None) -> Policy:
    """The device and the candidate engines. Where a setting leaves one candidate it is
    chosen; otherwise `choose_frozen` (and `wingspan.training.finetune_engine.choose_train`)
    measure.
    `avoid`: {engine: why} left out of the frozen passes' candidates where precision is
    auto (a bundle's lossy engines that moved its answers, training.lossy_check)."""
    (precision, by_precision), (runtime, by_runtime) = check_engine_settings(precision,
                                                                             runtime)
    dev = torch_device(device)
    if dev.type == "cpu" and cpu_quota() and torch.get_num_threads() > (cores := usable_cores()):
        # torch takes a thread per core it may run on, blind to a container's CPU quota
        # (`docker run --cpus 2` on a 64-core host: 64 threads sharing 2 cores' time).
        # (Only under a quota: more threads than cores otherwise is the user's own choice.)
        torch.set_num_threads(cores)
    if precision == "fp16" and dev.type == "cpu":
        # (not bf16 alone: emulated, on a CPU without it, it runs several times slower)
        raise WingspanError(f"fp16 is not supported on the CPU{_set_by(by_precision)}.",
                            hint="Use fp32, or auto: it measures bf16 beside fp32 where the "
                                 "CPU has bf16 (AVX-512 bf16, AMX) and keeps the faster.")
    if runtime == "onnx" and dev.type == "cpu" and not engine.onnx_available():
        raise WingspanError("--runtime onnx was asked for, but onnxruntime is not installed.",
                            hint="pip install onnxruntime, or use --runtime torch.")
    try:
        frozen, left_out = candidates(dev, precision, runtime, train=False)
        train, train_left_out = candidates(dev, precision, runtime, train=True)
        avoid = {e.name: avoid[e.name] for e in frozen if e.name in (avoid or {})}
        # A precision forced is used, but what the model's check found of it is said.
        risks = avoid if precision != "auto" else {}
        if precision != "auto" or len(avoid) == len(frozen):  # (forced; or the last one)
            avoid = {}
        frozen = [e for e in frozen if e.name not in avoid]
    except WingspanError as e:  # say where a setting the user did not type came from
        given = [f for f in (by_precision, by_runtime) if f]
        raise WingspanError(f"{e.message} (set by {' and '.join(given)})", hint=e.hint
                            ) from e
    policy = Policy(dev, convolutional, tuple(frozen), tuple(train), {**left_out, **avoid},
                    train_left_out, avoided=avoid)
    # What narrowed each kind to one: a training step runs in PyTorch whatever the runtime.
    for kind, engines, others, forced in (
            ("frozen", frozen, left_out, [f for f in (by_precision, by_runtime) if f]),
            ("train", train, train_left_out, [by_precision] if by_precision else [])):
        if len(engines) == 1:
            # Name what auto left out (emulated bf16), not what cannot run here at all.
            skipped = [f"not {e.name}: {others[e.name]}" for e in ENGINES
                       if e.name in others and not cannot_run(e, dev, kind == "train")
                       and auto_leaves_out(e, dev)]
            why = (f"forced by {', '.join(forced)}" + _slow_note(engines[0], dev, kind)
                   + (f"; though {risks[engines[0].name]}" if kind == "frozen"
                      and engines[0].name in risks else "")
                   if forced and not (kind == "frozen" and avoid)  # (said as avoided)
                   else "; ".join(["the only candidate", *skipped]))
            policy = policy.with_choice(kind, Choice(engines[0], why))
    return policy


def _slow_note(forced: Engine, device: torch.device, kind: str) -> str:
    """A forced engine is used as asked, but where auto would leave it out as slow here
    (emulated bf16; never timed, so the flags are all there is to go by) say so."""
    why = auto_leaves_out(forced, device)
    return f"; likely slower than fp32: {why}" if why else ""


def settings_with_environment(precision: str, runtime: str) -> tuple[str, str]:
    """`precision` and `runtime` as the environment resolves an "auto": what a run records
    as its own settings, so that resuming it (maybe in another shell) keeps them."""
    return (_setting(precision, PRECISION_ENV, "precision")[0],
            _setting(runtime, RUNTIME_ENV, "runtime")[0])


def _set_by(by: str) -> str:
    """" (WINGSPAN_PRECISION=fp16)" where a value came from the environment, which the
    user may not know is set; nothing for an argument, which the message names already
    (it said "Unknown precision 'fp64' (precision fp64)")."""
    return f" ({by})" if "=" in by else ""


def _setting(value: str, env: str, name: str) -> tuple[str, str]:
    """An argument, else the environment variable, else auto; and what forced it, if any."""
    if value != "auto":
        return value, f"{name} {value}"
    from_env = os.environ.get(env, "").strip().lower()  # (ONNX, as ' onnx ' was, taken)
    if from_env and from_env != "auto":
        return from_env, f"{env}={from_env}"
    return "auto", ""
