"""Backbone + head: the model every stage of wingspan trains, saves and runs."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import torch
from timm.data import resolve_model_data_config
from torch import nn

from wingspan.config import TrainConfig
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

    @classmethod
    def from_dict(cls, saved: dict) -> Preprocessing:
        """As `to_dict` wrote it (JSON's lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def preprocessing_for(spec: BackboneSpec, net: nn.Module) -> Preprocessing:
    cfg = resolve_model_data_config(net)
    return Preprocessing(
        input_size=int(cfg["input_size"][-1]), interpolation=cfg["interpolation"],
        mean=tuple(spec.mean or cfg["mean"]), std=tuple(spec.std or cfg["std"]),
        crop_pct=float(cfg["crop_pct"]),
    )


class PooledFeatures(nn.Module):
    """images -> the backbone's pooled features: what the feature cache stores and the
    frozen pass runs (exported to ONNX Runtime as one graph)."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.pool(self.backbone(images))


class WithFeatures(nn.Module):
    """images -> {"features": pooled features, level: logits}: one graph for a validation
    pass (which reads the logits) and the final pass over the best model (which needs the
    features), so that, where no frozen prefix runs apart (`training.finetune_engine.prefixed_pass`)
    and the best model is the last one validated, the ONNX export made for its validation
    serves the final pass too."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.model.features(images)
        return {"features": features, **self.model.head(features)}


class Classifier(nn.Module):
    """images -> {level: logits}. `features` and `head` are exposed separately so that a
    frozen backbone's output can be computed once and cached."""

    def __init__(self, backbone: str, outputs: dict[str, int], hidden: int | None = None,
                 dropout: float = TrainConfig.dropout, input_size: int | None = None):
        super().__init__()
        self.spec = get_spec(backbone)
        self.backbone = Backbone(self.spec)
        self.head = ClassifierHead(HeadConfig(self.backbone.num_features, dict(outputs), hidden,
                                              dropout))
        self.preprocessing = dataclasses.replace(preprocessing_for(self.spec, self.backbone.net),
                                                 input_size=self.backbone.input_size)
        if input_size:  # rebuilt from a bundle or checkpoint trained at this size
            self.set_input_size(input_size)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (N, C)."""
        return self.backbone.pool(self.backbone(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.features(images))

    def feature_extractor(self) -> nn.Module:
        """images -> pooled features, as a module of its own (shares the weights)."""
        return PooledFeatures(self.backbone)

    def with_features(self) -> tuple[nn.Module, list[str]]:
        """The model returning its pooled features too (`WithFeatures`), and its outputs'
        names in order."""
        return WithFeatures(self), ["features", *self.levels]

    def set_input_size(self, size: int, check: bool = False) -> None:
        """Train and predict at `size` px: the preprocessing says so, and a network built
        for one size (ViT, Swin) is resized to it. After loading ImageNet weights, which
        are for the native size. `check`: a size the user asked for, tried once first."""
        self.backbone.set_input_size(size)
        if check and size != self.backbone.built_size:
            self.backbone.check_input_size(size)
        self.preprocessing = dataclasses.replace(self.preprocessing, input_size=size)

    def group_matcher(self, coarse: bool = False):
        """timm's interface for layer-wise learning-rate decay: a parameter's name -> its
        stage's ordinal (stem 0, ..., the head last). Stages whatever `coarse`, as the
        recipe decays per stage."""
        stage_of = {f"backbone.net.{name}": i
                    for i, names in enumerate(self.backbone.stages.values()) for name in names}
        head = len(self.backbone.stages)
        return lambda name: stage_of.get(name, head)

    def no_weight_decay(self) -> set[str]:
        """timm's interface for the parameters kept out of weight decay: the network's own
        (a ViT's position embedding and class token, a Swin's relative position tables),
        under their names here. Besides these, timm's optimizer exempts biases and norms."""
        net = self.backbone.net
        own = net.no_weight_decay() if hasattr(net, "no_weight_decay") else ()
        return {f"backbone.net.{name}" for name in own}

    @property
    def levels(self) -> list[str]:
        """Output names, coarse to fine."""
        return list(self.head.config.outputs)

    def construction(self) -> dict:
        """The arguments that rebuild this model (saved in bundles and checkpoints)."""
        c = self.head.config
        built = {"backbone": self.spec.name, "outputs": dict(c.outputs), "hidden": c.hidden,
                 "dropout": c.dropout}
        if self.backbone.input_size != self.backbone.built_size:  # resized: rebuild so
            built["input_size"] = self.backbone.input_size
        return built
