"""Runners for frozen weights: a module in, `runner(images) -> outputs` out.

Wherever the weights do not change while a pass runs (stage 1's feature cache, each
validation pass, evaluation, predict) the model can run in PyTorch (fp32 or bf16
autocast) or be exported to ONNX once and run by ONNX Runtime, which folds BatchNorm into
the convolutions, fuses the activations and picks its own CPU kernels: on a 2-core AVX2
CPU that ran ResNet-50 2.9x and EfficientNet-Lite0 5.7x faster than eager fp32 PyTorch at
batch 64. Which engine runs is measured (`wingspan.models.engine`). Gradients need
PyTorch, so training steps always stay there.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
Outputs = torch.Tensor | dict[str, torch.Tensor]


class _AsTuple(nn.Module):
    """ONNX graphs return tuples: unpack a dict-returning model in a fixed order."""

    def __init__(self, module: nn.Module, names: list[str] | None):
        super().__init__()
        self.module, self.names = module, names

    def forward(self, x: torch.Tensor):
        out = self.module(x)
        return tuple(out[n] for n in self.names) if self.names else out


def export_onnx(module: nn.Module, size: int, names: list[str] | None = None,
                example: torch.Tensor | None = None, input_name: str = "images") -> bytes:
    """The module as an ONNX graph taking (N, 3, size, size) float32 images (or inputs
    shaped and typed like `example`, named `input_name`), N free.

    The TorchScript exporter takes 1-2 s for a ResNet-50 where the torch.export one takes
    10-20 s on this class of CPU, so it is tried first; torch is dropping it, hence the
    fallback."""
    wrapped = _AsTuple(module, names)
    outputs = names or ["output"]
    buffer = io.BytesIO()
    # Traced in eval mode, and handed back in the mode it came in: the module may be the
    # live model of a training run (a validation pass exports it).
    modes = {m: m.training for m in module.modules()}
    wrapped.eval()
    # Callers may be inside inference_mode, which the exporters cannot trace.
    with _restored(modes), warnings.catch_warnings(), torch.inference_mode(False), \
            torch.no_grad():
        warnings.simplefilter("ignore")
        example = torch.zeros(2, 3, size, size) if example is None else example
        try:
            torch.onnx.export(wrapped, (example,), buffer, input_names=[input_name],
                              output_names=outputs,  # every output's first axis "batch" too
                              dynamic_axes={n: {0: "batch"} for n in [input_name, *outputs]},
                              opset_version=17, dynamo=False)
            return buffer.getvalue()
        except Exception as e:  # noqa: BLE001 - exporter gone or failed: try the new one
            log.info("TorchScript ONNX export failed (%s); using torch.export", e)
            program = torch.onnx.export(
                wrapped, (example,), input_names=[input_name], output_names=outputs,
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, dynamo=True,
                verbose=False)
            return program.model_proto.SerializeToString()


@contextlib.contextmanager
def _restored(modes: dict[nn.Module, bool]):
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


# The sessions of the last few graphs exported: a training run exports the same weights
# more than once (timing the engines, then the feature cache; the fine-tuning prefix when
# timing the step, then for training; the final features of train, then val), and an
# export costs 0.5-2 s. Two cover each of those pairs; a run forgets them when it ends.
_SESSIONS: OrderedDict[tuple, object] = OrderedDict()
_KEEP = 2
_LOCK = threading.Lock()


# The graphs the exporter could not make, by what an export depends on but the weights
# (an unsupported layer stays unsupported after a fine-tuning step): later passes of the
# run go straight to PyTorch fp32, without another try (0.5-2 s) or another warning.
_UNEXPORTABLE: dict[tuple, str] = {}
# What each export of the run took, with its session (same keys): what a pass that would
# export for itself alone weighs against running in PyTorch (`export_seconds`).
_EXPORTED: dict[tuple, float] = {}


def forget_sessions() -> None:
    """Drop the kept sessions (and the memory their weights take), and the graphs found
    unexportable: the end of a run."""
    with _LOCK:
        _SESSIONS.clear()
        _UNEXPORTABLE.clear()
        _EXPORTED.clear()


def keep_only_session(runner: object) -> None:
    """Drop every kept session but `runner`'s (an OnnxRunner; anything else: drop them
    all), keeping what the exports took. A session holds its arena of activations, about
    850 MB for EfficientNet-Lite0 at 224 px and batch 32: stage 1's session of the whole
    backbone, of weights that fine-tuning changes, kept through fine-tuning took a train's
    peak from 2.7 to 3.8 GB."""
    session = getattr(runner, "session", None)
    with _LOCK:
        for key in [k for k, s in _SESSIONS.items() if s is not session]:
            del _SESSIONS[key]


def _shape(module: nn.Module, size: int, names: list[str] | None) -> tuple:
    """What an export depends on but the weights."""
    return repr(module), size, tuple(names or ())


def export_seconds(module: nn.Module, size: int, names: list[str] | None = None
                   ) -> float | None:
    """Seconds an export of `module` (and its session) took in this run, or when a graph
    read from disk was kept: its own last one, else the last of any graph's (a backbone's;
    the first of a process also pays for the exporter's imports), else None (none yet)."""
    with _LOCK:
        own = _EXPORTED.get(_shape(module, size, names))
        return own if own is not None else next(reversed(_EXPORTED.values()), None)


def graph_key(module: nn.Module, size: int, names: list[str] | None) -> tuple:
    """What an exported graph depends on: the layers and their settings (the module's
    repr), every parameter and buffer to the bit, the input size and the outputs; and the
    threads the session runs on. Weights that changed in any way (a fine-tuning step, a
    loaded checkpoint) give another key, so a graph is never run with stale weights."""
    digest = hashlib.sha256(repr(module).encode())
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())  # the bytes, not the values
    return digest.hexdigest(), size, tuple(names or ()), torch.get_num_threads()


# Graphs of weights that stay (a bundle's; a backbone's ImageNet weights, the same in every
# run) are kept on disk too, by what they depend on: the next process that runs the same
# weights (each `wingspan predict` of a model, each run of a backbone) skips the export,
# 0.5-2 s and, the first time in a process, 0.8 s of importing the exporter on a 2-core
# EPYC. No library keeps exports by content. The GRAPHS_KEPT last used stay, each with
# what its export took (NAME.json), which Policy._for_one_pass weighs as if just exported.
GRAPHS_KEPT = 4
_STORING = threading.Lock()  # a process's threads share a temporary name (files.atomic_path)


@functools.cache
def _code_digest() -> str:
    """What else a graph is made from: the versions of torch (its exporter) and timm, and
    wingspan's own modules' source (their forward methods), which a version number alone
    would not tell apart between two checkouts."""
    import timm

    digest = hashlib.sha256(f"{torch.__version__} {timm.__version__}".encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def graph_file(key: tuple) -> Path:
    """Where the graph of `graph_key` is kept (not by the threads a session runs on)."""
    from wingspan.config import default_cache_dir

    digest, size, names, _threads = key
    name = hashlib.sha256(repr((digest, size, names, _code_digest())).encode()).hexdigest()
    return default_cache_dir() / "graphs" / f"{name[:32]}.onnx"


def _stored_graph(path: Path) -> tuple[bytes, float] | None:
    """The graph kept at `path` and the seconds its export took, or None: also where its
    bytes are not those stored (a damaged file still loads, and trained every later run of
    the backbone on wrong features), or its record is of another graph (a kill between
    the two writes)."""
    try:
        graph = path.read_bytes()
        record = json.loads(path.with_suffix(".json").read_text())
        seconds = float(record["seconds"])
        if record["sha256"] != hashlib.sha256(graph).hexdigest():
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    with contextlib.suppress(OSError):  # (another user's file in a shared cache)
        os.utime(path)  # used now: kept the longest
    return graph, seconds


def _store_graph(path: Path, graph: bytes, seconds: float) -> None:
    """Write it whole (renamed into place), then drop all but the GRAPHS_KEPT last used,
    and what killed writers left. A read-only or full cache only costs an export next
    time."""
    from wingspan.errors import WingspanError
    from wingspan.files import atomic_path, shared_folder

    try:
        with _STORING:
            shared_folder(path.parent)  # (a lab's shared cache: the others' graphs too)
            with atomic_path(path, durable=False) as tmp:
                tmp.write_bytes(graph)
            with atomic_path(path.with_suffix(".json"), durable=False) as tmp:
                tmp.write_text(json.dumps({"seconds": round(seconds, 3),
                                           "sha256": hashlib.sha256(graph).hexdigest()}))
        now = time.time()
        for left in path.parent.glob(".*.tmp.*"):  # .NAME.PID.tmp.onnx: being written...
            if now - left.stat().st_mtime > 600:  # ...or not, ten minutes on
                left.unlink(missing_ok=True)
        kept = sorted((p for p in path.parent.glob("*.onnx") if not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime)
        for old in kept[:max(0, len(kept) - GRAPHS_KEPT)]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    except (OSError, WingspanError):
        pass


def onnx_session(module: nn.Module, size: int, names: list[str] | None = None,
                 keep: bool = False):
    """An ONNX Runtime session running `module` as it is now: one kept from an export of
    the same graph (`graph_key`), else a new export. `keep`: weights that stay, whose graph
    is kept on disk for other processes, and read from there when it is."""
    import onnxruntime as ort

    key = graph_key(module, size, names)
    with _LOCK:
        if key in _SESSIONS:
            _SESSIONS.move_to_end(key)
            return _SESSIONS[key]
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    # No spin-waiting between calls: idle threads would burn the cores that PyTorch and
    # the data loaders need next (a fine-tuning step was 1.2x slower with it).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session, path = None, graph_file(key) if keep else None
    stored = _stored_graph(path) if path else None
    if stored is not None:
        graph, seconds = stored
        try:
            session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - damaged (ONNX Runtime says how): export again
            log.info("The kept graph %s could not be read; exporting again", path)
    if session is None:
        start = time.perf_counter()
        graph = export_onnx(module, size, names)
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        seconds = time.perf_counter() - start
        if path:
            _store_graph(path, graph, seconds)
    with _LOCK:  # (ONNX Runtime lets several threads run one session)
        shape = _shape(module, size, names)
        _EXPORTED.pop(shape, None)  # (kept in the order made: the last one last)
        _EXPORTED[shape] = seconds  # what an export costs here, read from disk or not
        _SESSIONS[key] = session
        while len(_SESSIONS) > _KEEP:
            _SESSIONS.popitem(last=False)
    return session


class OnnxRunner:
    """Runs an exported copy of `module` with ONNX Runtime, on as many threads as torch."""

    def __init__(self, module: nn.Module, size: int, names: list[str] | None = None,
                 keep: bool = False):
        self.names = names
        self.session = onnx_session(module, size, names, keep)

    def __call__(self, images: torch.Tensor) -> Outputs:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        out = [torch.from_numpy(o) for o in self.session.run(None, {"images": x})]
        return dict(zip(self.names, out, strict=True)) if self.names else out[0]


class TorchRunner:
    """Eager PyTorch on a device, in a precision (autocast) and memory format."""

    def __init__(self, module: nn.Module, device: torch.device, dtype: torch.dtype | None,
                 channels_last: bool):
        self.module, self.device, self.dtype = module, device, dtype
        self.channels_last = channels_last

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> Outputs:
        self.module.eval()
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.dtype):
            out = self.module(x)
        if isinstance(out, dict):
            return {k: v.float().cpu() for k, v in out.items()}
        return out.float().cpu()


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast in `dtype`, or nothing for plain fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_runner(module: nn.Module, size: int, engine, device: torch.device,
                channels_last: bool, names: list[str] | None = None, fallback: bool = True,
                keep: bool = False) -> Callable[[torch.Tensor], Outputs]:
    """`module` with its current weights as `runner(images) -> outputs` (float32, on the
    CPU) on `engine`. `names`: the keys of a dict-returning module's outputs, in order.
    `keep`: weights that stay, whose ONNX graph is kept on disk (`onnx_session`).
    With `fallback`, a module ONNX cannot export runs in PyTorch fp32, with one warning,
    and later calls for the same layers do not try again (until `forget_sessions`)."""
    if engine.runtime == "onnx":
        module.eval()
        shape = _shape(module, size, names)
        if shape not in _UNEXPORTABLE:
            try:
                return OnnxRunner(module, size, names, keep)
            except Exception as e:  # noqa: BLE001 - an unexportable layer: PyTorch still works
                if not fallback:
                    raise
                _unexportable(shape, f"{type(e).__name__}: {str(e)[:200]}")
        return TorchRunner(module, device, None, channels_last)
    return TorchRunner(module, device, engine.dtype, channels_last)


def _unexportable(shape: tuple, why: str) -> None:
    """Remember a graph that could not be exported; warn once per reason."""
    with _LOCK:
        said = why in _UNEXPORTABLE.values()
        _UNEXPORTABLE[shape] = why
    if not said:
        warnings.warn(f"Could not run this model with ONNX Runtime ({why}); using PyTorch "
                      "instead. --runtime torch skips the attempt.", stacklevel=3)
