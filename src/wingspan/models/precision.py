"""One policy for device and numeric precision, chosen from the hardware.

- CUDA when present, with autocast (bf16 where supported, else fp16 + grad scaling);
- on CPUs with AMX or AVX-512 bf16, bf16 autocast (4x faster than fp32 for ResNet-50 on
  such CPUs); on other CPUs fp32, because emulated bf16 is several times *slower*;
- channels_last memory format for convolutional networks;
- for passes with frozen weights (feature cache, validation, evaluate, predict), ONNX
  Runtime where it beats PyTorch: fp32 on a CPU (see `runtime`).
`--device`, `--precision` and `--runtime` override the choice.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from wingspan.errors import WingspanError
from wingspan.models.runtime import make_runner, resolve_runtime

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def cpu_has_fast_bf16() -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


@dataclass(frozen=True)
class PrecisionPolicy:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype; None = plain fp32
    channels_last: bool
    reason: str = ""
    runtime: str = "torch"  # for frozen-weight passes: torch | onnx

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16 and self.device.type == "cuda"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_batch(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if (
            self.channels_last and images.dim() == 4) else images

    def runner(self, module: nn.Module, size: int, names: list[str] | None = None):
        """`module` with its current weights as a fast `runner(images) -> outputs` for a
        pass that changes no weights (outputs as float32 on the CPU)."""
        return make_runner(module, size, self, names)

    def describe(self) -> str:
        layout = ", channels_last" if self.channels_last else ""
        engine = ", ONNX Runtime for inference" if self.runtime == "onnx" else ""
        return f"{self.device.type}, {self.precision}{layout}{engine}" + (
            f" ({self.reason})" if self.reason else "")


def resolve_policy(device: str = "auto", precision: str = "auto",
                   convolutional: bool = True, runtime: str = "auto") -> PrecisionPolicy:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise WingspanError(f"Unknown device '{device}'.", hint="Use auto, cpu or cuda.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WingspanError("--device cuda was asked for, but no CUDA GPU is available.",
                            hint="Use --device cpu (or auto).")
    if precision == "auto":
        if dev.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            precision, reason = ("bf16" if bf16 else "fp16"), "CUDA autocast"
        elif cpu_has_fast_bf16():
            precision, reason = "bf16", "CPU has AMX/AVX-512 bf16"
        else:
            precision, reason = "fp32", "CPU has no fast bf16"
    else:
        reason = "asked for"
    if precision not in PRECISIONS:
        raise WingspanError(f"Unknown precision '{precision}'.",
                            hint=f"Use auto or one of: {', '.join(PRECISIONS)}.")
    if precision == "fp16" and dev.type == "cpu":
        raise WingspanError("fp16 is not supported on the CPU.", hint="Use bf16 or fp32.")
    engine = resolve_runtime(runtime, dev, PRECISIONS[precision])
    return PrecisionPolicy(dev, PRECISIONS[precision], convolutional, reason, engine)
