"""One factory for every model wingspan builds, with its weights resolved."""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from wingspan.models.classifier import Classifier
from wingspan.models.registry import get_spec
from wingspan.models.weights import LoadedWeights, load_into, resolve_weights


def create_classifier(backbone: str, outputs: dict[str, int], weights: str | Path | None = "auto",
                      hidden: int | None = None, dropout: float = 0.2
                      ) -> tuple[Classifier, LoadedWeights | None]:
    """A new classifier head on a pretrained backbone; returns the model and the weights'
    source (None for random initialisation)."""
    model = Classifier(backbone, outputs, hidden=hidden, dropout=dropout)
    loaded = resolve_weights(model.spec, weights)
    if loaded:
        load_into(model.backbone.net, loaded, classifier=_classifier_name(model.spec.timm_name))
    return model, loaded


def create_imagenet_model(backbone: str, weights: str | Path | None = "auto"
                          ) -> tuple[nn.Module, LoadedWeights | None]:
    """The backbone with its original 1000-class ImageNet classifier (to check weights)."""
    spec = get_spec(backbone)
    net = timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs)
    loaded = resolve_weights(spec, weights)
    if loaded:
        load_into(net, loaded)
    return net.eval(), loaded


def _classifier_name(timm_name: str) -> str:
    return timm.models.get_pretrained_cfg(timm_name).classifier or "fc"
