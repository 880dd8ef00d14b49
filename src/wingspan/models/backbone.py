"""A pretrained CNN as ordered stages that can be frozen and unfrozen the same way for all.

timm names each network's stages (`group_matcher`: stem, then blocks); we turn that
into `stages`, so "freeze everything, unfreeze the last N" needs no per-architecture
index surgery.
"""

from __future__ import annotations

import timm
import torch
from timm.models import group_parameters
from torch import nn

from wingspan.models.registry import BackboneSpec


class Backbone(nn.Module):
    """A timm network without its classifier: image batch -> feature map (N, C, H, W)."""

    def __init__(self, spec: BackboneSpec, train_bn: bool = False):
        super().__init__()
        self.spec = spec
        self.train_bn = train_bn
        self.net = timm.create_model(spec.timm_name, pretrained=False, num_classes=0,
                                     global_pool="", **spec.timm_kwargs)
        self.num_features: int = self.net.num_features
        groups = group_parameters(self.net, self.net.group_matcher(coarse=True))
        names = ["stem"] + [f"stage{i}" for i in range(1, len(groups))]
        # stage name -> parameter names, in order from input to output
        self.stages: dict[str, list[str]] = dict(zip(names, groups.values(), strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        params = dict(self.net.named_parameters())
        return [params[n] for n in self.stages[stage]]

    def freeze(self) -> None:
        """No gradients anywhere; BatchNorm statistics frozen too (see `train`)."""
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def unfreeze_last(self, n: int) -> list[str]:
        """Make the last `n` stages trainable (everything else frozen); returns their names."""
        self.freeze()
        chosen = list(self.stages)[len(self.stages) - n:] if n > 0 else []
        for stage in chosen:
            for p in self.stage_parameters(stage):
                p.requires_grad_(True)
        self.train(self.training)
        return chosen

    def train(self, mode: bool = True) -> Backbone:
        """BatchNorm layers stay in eval mode unless `train_bn` is set and they are trainable.

        Frozen ones must keep their statistics (Keras' classic fine-tuning pitfall), and even
        unfrozen ones do better on their ImageNet statistics than on those of small batches:
        switching them to batch statistics at the start of fine-tuning jolts the features
        the head was trained on. Their scale and shift still learn.
        """
        super().train(mode)
        if mode:
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    trainable = any(p.requires_grad for p in module.parameters(recurse=False))
                    module.train(self.train_bn and trainable)
        return self
