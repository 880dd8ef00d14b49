"""Learning-rate schedules and the per-stage parameter groups of fine-tuning."""

from __future__ import annotations

import math

import torch

from wingspan.models.classifier import Classifier


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Factor for LambdaLR: linear warmup, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def finetune_groups(model: Classifier, stages: list[str], top_lr: float, decay: float,
                    weight_decay: float) -> list[dict]:
    """The head at `top_lr`; each unfrozen stage below it `decay` times the one above
    (layer-wise decay: early features are general and should move least)."""
    groups = [{"params": list(model.head.parameters()), "lr": top_lr, "name": "head",
               "weight_decay": weight_decay}]
    for depth, stage in enumerate(reversed(stages), start=1):
        groups.append({"params": model.backbone.stage_parameters(stage), "name": stage,
                       "lr": top_lr * decay ** depth, "weight_decay": weight_decay})
    return groups


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    warmup = int(total_steps * warmup_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))
