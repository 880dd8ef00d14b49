"""One factory for every model wingspan builds, with its weights resolved."""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from wingspan.config import DEFAULT_BACKBONE, OFFLINE_BACKBONES, TrainConfig
from wingspan.errors import WingspanError
from wingspan.models.classifier import Classifier
from wingspan.models.registry import get_spec
from wingspan.models.weights import (
    LoadedWeights,
    can_resolve,
    checkpoint_run_settings,
    find_offline,
    load_into,
    offline_reason,
    resolve_weights,
    wingspan_model,
)


def choose_backbone(backbone: str, weights: str | Path | None = "auto") -> tuple[str, str]:
    """(the backbone to build, a line saying why) for `--backbone auto`: DEFAULT_BACKBONE
    when its ImageNet weights resolve, else the best one whose weights are installed. Any
    other name is taken as given; with a wingspan model as the weights, its backbone."""
    if backbone != "auto":  # checked now: a run's folder is named after it ("--backbone
        get_spec(backbone)  # runs/x" was refused as "the run name 'demo-runs/x' is a path")
        return backbone, ""
    model = wingspan_model(weights) if weights and str(weights).lower() not in (
        "auto", "none") else None
    if model is not None:
        return model[1]["model"]["backbone"], ""
    run = checkpoint_run_settings(weights) if weights and str(weights).lower() not in (
        "auto", "none") else None
    if run and isinstance(run.get("backbone"), str):  # a run's checkpoints/best.pt: its own
        return run["backbone"], ""
    default = get_spec(DEFAULT_BACKBONE)
    if str(weights).lower() != "auto" or find_offline(default):
        return DEFAULT_BACKBONE, ""
    installed = next((n for n in OFFLINE_BACKBONES if find_offline(get_spec(n))), None)
    if installed is None:  # resolving the default will fail with the full story
        return DEFAULT_BACKBONE, ""
    why = offline_reason()
    if not why and can_resolve(default):
        # A host that answers may still refuse the file (a proxy's 403): fetch it now, into
        # the cache the run then reads, and fall back if that fails.
        try:
            resolve_weights(default, "auto")
            return DEFAULT_BACKBONE, ""
        except WingspanError:
            why = "downloading them failed"
    why = why or "not cached here, and no network to download them"
    return installed, (f"{DEFAULT_BACKBONE}'s ImageNet weights are unavailable ({why}): "
                       f"using {installed}, whose weights are installed.")


def create_classifier(backbone: str, outputs: dict[str, int], weights: str | Path | None = "auto",
                      hidden: int | None = None, dropout: float = TrainConfig.dropout
                      ) -> tuple[Classifier, LoadedWeights | None]:
    """A new classifier head on a pretrained backbone; returns the model and the weights'
    source (None for random initialisation). A wingspan model's resized backbone (a ViT
    trained with --image-size) is taken at its size, as its bundle rebuilds: the new model
    is at that size too until set_input_size changes it."""
    loaded = resolve_weights(get_spec(backbone), weights)
    model = Classifier(backbone, outputs, hidden=hidden, dropout=dropout,
                       input_size=loaded.input_size if loaded else None)
    if loaded:
        load_into(model.backbone.net, loaded,
                  classifiers=_classifier_names(model.spec.timm_name))
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


def _classifier_names(timm_name: str) -> tuple[str, ...]:
    """The ImageNet classifier's module names: one, or several for a distilled model
    (DeiT's ('head', 'head_dist'), LeViT's)."""
    named = timm.models.get_pretrained_cfg(timm_name).classifier or "fc"
    return (named,) if isinstance(named, str) else tuple(named)
