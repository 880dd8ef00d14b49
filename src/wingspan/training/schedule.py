"""Optimizers and learning-rate schedules of both stages: timm's, configured for the recipe.

- AdamW, no weight decay on biases and norm layers (timm's `filter_bias_and_bn`);
- stage 2's layer-wise decay: timm's `param_groups_layer_decay`, over the stages the
  Classifier exposes (`Classifier.group_matcher`): the head at the top rate, each unfrozen
  stage below it `layer_decay` times the one above (early features are general and
  should move least);
- a linear warmup, then cosine decay to zero, stepped once per batch.
"""

from __future__ import annotations

import logging

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn


def make_optimizer(module: nn.Module, lr: float, weight_decay: float,
                   layer_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of `module`."""
    return create_optimizer_v2(module, "adamw", lr=lr, weight_decay=weight_decay,
                               layer_decay=layer_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                   warmup_fraction: float) -> CosineLRScheduler:
    """Call `step_update(steps_done)` after each optimizer step. The first warmup step runs
    at 1 / (warmup + 1) of the rate, not at zero."""
    warmup = int(total_steps * warmup_fraction)
    top = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    # A stage of one step after warmup (a tiny dataset, --epochs-head 1) has nothing to
    # anneal, which is right; timm's warning of it on stderr would only puzzle a user.
    timm_log = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup),
                                 lr_min=0.0, warmup_t=warmup,
                                 warmup_lr_init=top / (warmup + 1), warmup_prefix=True,
                                 t_in_epochs=False)
    finally:
        timm_log.setLevel(level)
