"""Stage 1's backbone features of each image, kept under the cache folder for later runs.

A user iterating on a recipe trains on the same images again and again, changing the head
stage's learning rate, its epochs, the label smoothing or the fine-tuning: the frozen
backbone's features of those images are the same each time, and computing them took a
third of a Leeds run (42.8 s of 132 s for Lite2 on a 2-core AMX Xeon: 27 images/s, so
about 50 minutes for ETHEC's ~38k training images x 2 views and 5.3k val). The run's own
cache (RUN/cache) serves only its resume, and goes when it is done. Hand-written over
files.FileArrays (an array per image, keyed by the file's path and state): no library
keys a feature cache by how the features were made.

An image's entry is keyed by everything its features depend on: the backbone's weights
(their content), how the image is decoded and transformed, the engine that ran the
backbone and the processor it ran on (bf16 features are not fp32's, AMX's not AVX-512's),
the libraries' versions and the source of wingspan's code on that path, and for an
augmented view the seed its crop was drawn with (so the same split, seed and augmentation
find it, and any other does not). Random weights (`--weights none`) are not kept: nobody
repeats such a run for its features, and the test suite's tiny runs keep their own work.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch

from wingspan.config import default_cache_dir
from wingspan.data.images import budget_key
from wingspan.files import FileArrays
from wingspan.models.engine import processor
from wingspan.models.weights import weights_digest
from wingspan.training.data import LabelledImages, item_seed

FOLDER = "features"  # under the cache folder (doctor lists it)
# The modules whose code turns a file into its features: an edit to any of them (a new
# augmentation, another pooling) must not be handed the features of the old one.
CODE = ("wingspan.data.images", "wingspan.data.transforms", "wingspan.training.decode_cache",
        "wingspan.training.data", "wingspan.models.backbone", "wingspan.models.classifier",
        "wingspan.models.engine", "wingspan.models.runtime",
        # (a name's timm architecture and its arguments: the same weights, other features)
        "wingspan.models.registry")


def code_digest(modules: tuple[str, ...] = CODE) -> str:
    digest = hashlib.sha1()
    for name in modules:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()[:16]


class SharedFeatures:
    """Each image's features under `directory`, for a model made as `how` says."""

    def __init__(self, directory: Path | None, how: str, width: int):
        self.arrays, self.width = FileArrays(directory, how), width

    @classmethod
    def for_run(cls, run) -> SharedFeatures | None:
        """The store a run's feature cache reads and adds to; None where it keeps nothing:
        random weights, `reuse_features: false`, or no engine chosen yet."""
        config, choice = run.config, run.policy.frozen
        # (any case: resolve_weights takes "None", a YAML file's or Python's spelling)
        if str(config.weights).lower() == "none" or not config.reuse_features or \
                choice is None:
            return None
        import PIL
        import timm
        import torchvision

        model = run.model
        # timm builds and runs the backbone, Pillow decodes (a release of either computes
        # otherwise from the same weights and files), and the kernels are the machine's: an
        # A100 convolves "fp32" in TF32 where a V100 does not, AMX's bf16 is not AVX-512's.
        # A cache folder in a cluster's shared home is read by all of them.
        how = (f"{config.backbone}|{weights_digest(model.backbone.state_dict())}"
               f"|{choice.engine.name}|{run.device.type}: {processor(run.device)}"
               f"|cl{int(run.policy.channels_last)}|torch {torch.__version__}"
               f"|tv {torchvision.__version__}|timm {timm.__version__}|pil {PIL.__version__}"
               f"|{code_digest()}")
        if choice.engine.runtime == "onnx":
            import onnxruntime

            how += f"|ort {onnxruntime.__version__}"
        root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
        store = cls(root / FOLDER, how, model.backbone.num_features)
        # (a cache folder that cannot be made, read-only or under a file: nothing is kept,
        # and the log said "kept in None")
        return store if store.arrays.directory is not None else None

    def entries(self, images: LabelledImages, indices: list[int], view: int
                ) -> dict[int, Path | None]:
        """Where each image `indices` of `images` seen in `view` (0: clean, as `images`'s
        own transform makes it) is kept; None for a file gone (reading it says so)."""
        made = (f"{images.transform!r}|{images.size}|{images.cache.short_side}|"
                f"{images.cache.interpolation}{budget_key(images.cache.budget)}")
        found = {}
        for i in indices:  # (an augmented crop: the one its seed draws)
            seed = f"|seed {item_seed(images.seed, 0, i, view)}" if view else ""
            try:
                found[i] = self.arrays.entry(images.paths[i], made + seed)
            except OSError:
                found[i] = None
        return found

    def get(self, entry: Path | None) -> torch.Tensor | None:
        array = self.arrays.get(entry)
        # (an entry written over, or of a backbone of another width: a miss)
        if array is None or array.shape != (self.width,) or array.dtype.name != "float32":
            return None
        return torch.from_numpy(array)

    def put(self, entry: Path | None, features: torch.Tensor) -> None:
        self.arrays.put(entry, features.float().numpy())
