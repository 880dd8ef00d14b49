"""Classifier heads on pooled backbone features: one linear output per label level."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from wingspan.config import TrainConfig


@dataclass
class HeadConfig:
    in_features: int
    outputs: dict[str, int]  # level -> number of classes (one level now; more for taxonomy)
    hidden: int | None = None  # an optional hidden layer before the outputs
    dropout: float = TrainConfig.dropout

    def to_dict(self) -> dict:
        return asdict(self)


class ClassifierHead(nn.Module):
    """Pooled features -> dropout, optional hidden layer, a linear layer per level. (The
    pooling is the backbone's own: `Backbone.pool`.)"""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        width = config.in_features
        layers: list[nn.Module] = [nn.Dropout(config.dropout)]
        if config.hidden:
            layers += [nn.Linear(width, config.hidden), nn.GELU(), nn.Dropout(config.dropout)]
            width = config.hidden
        self.trunk = nn.Sequential(*layers)
        self.outputs = nn.ModuleDict({level: nn.Linear(width, n)
                                      for level, n in config.outputs.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled features (N, C) -> logits per level."""
        hidden = self.trunk(features)
        return {level: layer(hidden) for level, layer in self.outputs.items()}
