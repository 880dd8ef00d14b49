"""Runners for frozen weights: a module in, `runner(images) -> outputs` out.

Wherever the weights do not change while a pass runs (stage 1's feature cache, each
validation pass, evaluation, predict) the model can be exported to ONNX once and run by
ONNX Runtime, which folds BatchNorm into the convolutions, fuses the activations and
picks its own CPU kernels. On the 2-core AVX2 CPU this was measured on, that ran
ResNet-50 2.9x and EfficientNet-Lite0 5.7x faster than eager fp32 PyTorch at batch 64
(`python bench/run.py --only inference`). Gradients need PyTorch, so training steps
always stay there; so do GPUs and CPUs with fast bf16, where PyTorch's autocast wins.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from wingspan.errors import WingspanError

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "torch", "onnx")
Outputs = torch.Tensor | dict[str, torch.Tensor]


@lru_cache(maxsize=1)
def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _AsTuple(nn.Module):
    """ONNX graphs return tuples: unpack a dict-returning model in a fixed order."""

    def __init__(self, module: nn.Module, names: list[str] | None):
        super().__init__()
        self.module, self.names = module, names

    def forward(self, x: torch.Tensor):
        out = self.module(x)
        return tuple(out[n] for n in self.names) if self.names else out


def export_onnx(module: nn.Module, size: int, names: list[str] | None = None) -> bytes:
    """The module as an ONNX graph taking (N, 3, size, size) float32 images, N free.

    The TorchScript exporter takes 1-2 s for a ResNet-50 where the torch.export one takes
    10-20 s on this class of CPU, so it is tried first; torch is dropping it, hence the
    fallback."""
    wrapped = _AsTuple(module, names).eval()
    outputs = names or ["output"]
    buffer = io.BytesIO()
    # Callers may be inside inference_mode, which the exporters cannot trace.
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        example = torch.zeros(2, 3, size, size)
        try:
            torch.onnx.export(wrapped, (example,), buffer, input_names=["images"],
                              output_names=outputs, dynamic_axes={"images": {0: "batch"}},
                              opset_version=17, dynamo=False)
            return buffer.getvalue()
        except Exception as e:  # noqa: BLE001 - exporter gone or failed: try the new one
            log.info("TorchScript ONNX export failed (%s); using torch.export", e)
            program = torch.onnx.export(
                wrapped, (example,), input_names=["images"], output_names=outputs,
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, dynamo=True,
                verbose=False)
            return program.model_proto.SerializeToString()


class OnnxRunner:
    """Runs an exported copy of `module` with ONNX Runtime, on as many threads as torch."""

    def __init__(self, module: nn.Module, size: int, names: list[str] | None = None):
        import onnxruntime as ort

        self.names = names
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        # No spin-waiting between calls: idle threads would burn the cores that PyTorch and
        # the data loaders need next (a fine-tuning step was 1.2x slower with it).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(export_onnx(module, size, names), options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> Outputs:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        out = [torch.from_numpy(o) for o in self.session.run(None, {"images": x})]
        return dict(zip(self.names, out, strict=True)) if self.names else out[0]


class TorchRunner:
    """Eager PyTorch under the precision policy (device, autocast, memory format)."""

    def __init__(self, module: nn.Module, policy):
        self.module, self.policy = module, policy

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> Outputs:
        self.module.eval()
        with self.policy.autocast():
            out = self.module(self.policy.prepare_batch(images))
        if isinstance(out, dict):
            return {k: v.float().cpu() for k, v in out.items()}
        return out.float().cpu()


def make_runner(module: nn.Module, size: int, policy, names: list[str] | None = None
                ) -> Callable[[torch.Tensor], Outputs]:
    """The policy's runner for `module` with its current weights. `names`: the keys of a
    dict-returning module's outputs, in order."""
    if policy.runtime == "onnx":
        module.eval()
        try:
            return OnnxRunner(module, size, names)
        except Exception as e:  # noqa: BLE001 - an unexportable layer: PyTorch still works
            warnings.warn(f"Could not run this model with ONNX Runtime ({type(e).__name__}: "
                          f"{str(e)[:200]}); using PyTorch instead. --runtime torch skips "
                          "the attempt.", stacklevel=2)
    return TorchRunner(module, policy)


def resolve_runtime(runtime: str, device: torch.device, amp_dtype) -> str:
    """The runtime for frozen-weight passes: onnx where it beats PyTorch (fp32 on a CPU)."""
    if runtime not in RUNTIMES:
        raise WingspanError(f"Unknown runtime '{runtime}'.",
                            hint=f"Use one of: {', '.join(RUNTIMES)}.")
    if runtime == "onnx":
        if not onnx_available():
            raise WingspanError("--runtime onnx was asked for, but onnxruntime is not "
                                "installed.", hint="pip install onnxruntime, or use "
                                "--runtime torch.")
        if device.type != "cpu":
            raise WingspanError("--runtime onnx runs on the CPU only.",
                                hint="Use --device cpu, or --runtime torch on a GPU.")
        return "onnx"
    if runtime == "torch":
        return "torch"
    fast = device.type == "cpu" and amp_dtype is None and onnx_available()
    return "onnx" if fast else "torch"
