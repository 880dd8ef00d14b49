"""Backbone + head: the model every stage of wingspan trains, saves and runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from timm.data import resolve_model_data_config
from torch import nn

from wingspan.models.backbone import Backbone
from wingspan.models.heads import ClassifierHead, HeadConfig
from wingspan.models.registry import BackboneSpec, get_spec


@dataclass
class Preprocessing:
    """What an image must look like on the way in; saved in every bundle."""

    input_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float

    def to_dict(self) -> dict:
        return asdict(self)


def preprocessing_for(spec: BackboneSpec, net: nn.Module) -> Preprocessing:
    cfg = resolve_model_data_config(net)
    return Preprocessing(
        input_size=int(cfg["input_size"][-1]), interpolation=cfg["interpolation"],
        mean=tuple(spec.mean or cfg["mean"]), std=tuple(spec.std or cfg["std"]),
        crop_pct=float(cfg["crop_pct"]),
    )


class Classifier(nn.Module):
    """images -> {level: logits}. `features` and `head` are exposed separately so that a
    frozen backbone's output can be computed once and cached."""

    def __init__(self, backbone: str, outputs: dict[str, int], hidden: int | None = None,
                 dropout: float = 0.2):
        super().__init__()
        self.spec = get_spec(backbone)
        self.backbone = Backbone(self.spec)
        self.head = ClassifierHead(HeadConfig(self.backbone.num_features, dict(outputs), hidden,
                                              dropout))
        self.preprocessing = preprocessing_for(self.spec, self.backbone.net)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (N, C)."""
        return self.head.pool(self.backbone(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.backbone(images))

    def feature_extractor(self) -> nn.Module:
        """images -> pooled features, as a module of its own (shares the weights)."""
        return nn.Sequential(self.backbone, self.head.pool)

    def group_matcher(self, coarse: bool = False):
        """timm's interface for layer-wise learning-rate decay: a parameter's name -> its
        stage's ordinal (stem 0, ..., the head last). Stages whatever `coarse`, as the
        recipe decays per stage."""
        stage_of = {f"backbone.net.{name}": i
                    for i, names in enumerate(self.backbone.stages.values()) for name in names}
        head = len(self.backbone.stages)
        return lambda name: stage_of.get(name, head)

    @property
    def levels(self) -> list[str]:
        """Output names, coarse to fine."""
        return list(self.head.config.outputs)

    def construction(self) -> dict:
        """The arguments that rebuild this model (saved in bundles and checkpoints)."""
        c = self.head.config
        return {"backbone": self.spec.name, "outputs": dict(c.outputs), "hidden": c.hidden,
                "dropout": c.dropout}
