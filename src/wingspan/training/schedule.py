"""Optimizers and learning-rate schedules of both stages: timm's, configured for the recipe.

- AdamW (or another of timm's: TrainConfig.optimizer), no weight decay on biases and
  norm layers (timm's `filter_bias_and_bn`);
- stage 2's layer-wise decay: timm's `param_groups_layer_decay`, over the stages the
  Classifier exposes (`Classifier.group_matcher`): the head at the top rate, each unfrozen
  stage below it `layer_decay` times the one above (early features are general and
  should move least);
- a linear warmup, then cosine decay to zero, stepped once per batch; sized at a stage's
  start by the batches of the images it can read, and positioned by the share of each
  epoch done, so that the last batch of the stage ends at zero even when images found
  unreadable on the way make later epochs shorter (see StageSchedule).
"""

from __future__ import annotations

import logging

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW kernel runs
FUSED_OPTIMIZERS = ("adamw", "adam")  # (timm's names of torch's own, which have it)


def make_optimizer(module: nn.Module, lr: float, weight_decay: float,
                   layer_decay: float | None = None, name: str = "adamw"
                   ) -> torch.optim.Optimizer:
    """timm's optimizer `name` over the trainable parameters of `module`; torch's fused
    AdamW kernel where the parameters are (one pass over them for the whole update). On a
    CPU the default for-loop update of a 1280 x 711 head took 10 ms a step, the fused one
    1.2 ms: the update, not the head's forward and backward, was most of a cached-feature
    head step."""
    devices = {p.device.type for p in module.parameters() if p.requires_grad}
    fused = name in FUSED_OPTIMIZERS and bool(devices) and devices <= set(FUSED_DEVICES)
    return create_optimizer_v2(module, name, lr=lr, weight_decay=weight_decay,
                               layer_decay=layer_decay, **({"fused": True} if fused else {}))


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


class StageSchedule:
    """A stage's schedule over `epochs` of `steps_per_epoch` batches. Each epoch takes its
    1 / epochs of it whatever its own count of batches (fewer, once more images are known
    to be unreadable): the rate reaches zero at the stage's last batch, and where a run is
    on it depends only on (epoch, batch), as a resumed run needs."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
                 warmup_fraction: float):
        self.steps_per_epoch = steps_per_epoch
        self.scheduler = make_scheduler(optimizer, steps_per_epoch * epochs, warmup_fraction)

    def at(self, epoch: int, step: int, steps: int) -> None:
        """Set the rate for after `step` of the `steps` batches of `epoch` (from 0)."""
        # (step * S / steps, not step / steps * S: exact when the epoch has S batches)
        self.scheduler.step_update(epoch * self.steps_per_epoch
                                   + step * self.steps_per_epoch / max(steps, 1))
