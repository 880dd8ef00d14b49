"""`wingspan doctor`: this machine, what every engine measures on it for a backbone, what
`auto` picks, where that is kept, and which ImageNet weights are here offline. The first
thing to run when something is slow."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from wingspan.config import BATCH_SIZE, default_cache_dir, usable_cores
from wingspan.files import shared_folder
from wingspan.models import create_classifier, resolve_policy
from wingspan.models.engine import EngineCache, cpu_flags, cpu_name, native_bf16
from wingspan.models.factory import choose_backbone
from wingspan.models.policy import Policy
from wingspan.models.registry import BACKBONES, get_spec
from wingspan.models.weights import find_offline
from wingspan.training.finetune_engine import choose_train

VERSIONS = ("wingspan", "torch", "torchvision", "onnxruntime", "timm", "numpy")
ISA = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
       "amx_tile", "amx_bf16", "amx_int8")


@dataclass
class Diagnosis:
    machine: dict
    backbone: str
    weights: str  # what the timed model carried
    size: int
    batch_size: int
    policy: Policy  # every candidate measured, the choices made
    cache: str
    offline_weights: dict[str, str | None]  # registered backbone -> where, or None
    cache_use: list[tuple[str, int, int]]  # (folder or file, bytes, files) in the cache
    cache_writable: bool = True


# What each folder of the cache holds (cache_use), as doctor names it.
CACHE_PARTS = {"decoded": "images decoded at a working size",
               "graphs": "ONNX graphs of backbones' ImageNet weights",
               "audit-features": "`data audit`'s features and hashes",
               "features": "training and val images' backbone features, for later runs",
               "datasets": "downloaded datasets (`data download`)",
               "engines.json": "the engines measured"}


def human_bytes(n: float) -> str:
    """1234567 -> "1.2 MB" (decimal units, as file managers give them)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cache_writable(root: Path) -> bool:
    """Can this user keep anything in the cache folder? A read-only or unset HOME (a
    container's, a service account's) kept nothing, said by nothing but the engines' line:
    every run decoded, exported and timed again."""
    import tempfile

    try:
        shared_folder(root)
        with tempfile.TemporaryFile(dir=root):
            return True
    except OSError:
        return False


def cache_use(root: Path) -> list[tuple[str, int, int]]:
    """(name, bytes, files) of each file and folder at the top of the cache, largest first:
    it only grows (a decoded image or feature stays after its photo is edited), and no other
    command says how much it holds. One walk: a second or so at ETHEC's 48k decodes."""
    found = []
    with contextlib.suppress(OSError), os.scandir(root) as top:
        for entry in top:
            size = files = 0
            for folder, _, names in (os.walk(entry.path) if entry.is_dir() else
                                     [(root, [], [entry.name])]):
                for name in names:
                    with contextlib.suppress(OSError):
                        size += os.stat(os.path.join(folder, name)).st_size
                        files += 1
            found.append((entry.name, size, files))
    return sorted(found, key=lambda f: -f[1])


def machine() -> dict:
    """The CPU, its instruction sets, the GPUs and the library versions."""
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    gpus = [f"{torch.cuda.get_device_name(i)} (compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    flags = cpu_flags()
    return {
        "cpu": cpu_name(), "cores": usable_cores(), "machine_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": " ".join(f for f in ISA if f in flags) or platform.machine(),
        "torch_isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": native_bf16(torch.device("cpu")), "cuda": gpus,
        "python": platform.python_version(), "versions": versions,
    }


def diagnose(backbone: str = "auto", image_size: int | None = None, batch_size: int = BATCH_SIZE,
             device: str = "auto", precision: str = "auto", runtime: str = "auto",
             train: bool = True) -> Diagnosis:
    """Time every candidate engine for `backbone` (ImageNet weights where they are here
    offline, else random ones: the speed is the same) on frozen passes and, with `train`,
    on the fine-tuning step; store the choices in the engine cache as a run would."""
    backbone, _ = choose_backbone(backbone)
    spec = get_spec(backbone)
    source = find_offline(spec)
    model, _ = create_classifier(backbone, {"class": 10}, "auto" if source else "none")
    if image_size:  # as a run at this size builds it (a ViT's position embedding, say)
        model.set_input_size(image_size, check=True)
    size = image_size or model.preprocessing.input_size
    policy = resolve_policy(device, precision, runtime=runtime)
    policy.prepare_model(model)
    policy = policy.choose_frozen(model, size, batch_size, remeasure=True, thorough=True)
    if train:
        policy = choose_train(policy, model, spec.unfreeze, size, batch_size, remeasure=True,
                              thorough=True)
    return Diagnosis(machine(), spec.name, source or "random (none offline)", size, batch_size,
                     policy, str(EngineCache().path),
                     {name: find_offline(s) for name, s in BACKBONES.items()},
                     cache_use(default_cache_dir()), cache_writable(default_cache_dir()))
