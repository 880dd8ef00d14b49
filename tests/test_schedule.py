"""timm's optimizer groups and schedule, configured for the recipe."""

import math

import pytest

from wingspan.models import create_classifier
from wingspan.training.schedule import make_optimizer, make_scheduler


def test_layer_decay_per_unfrozen_stage_and_warmup_then_cosine():
    model, _ = create_classifier("test_resnet", {"label": 3}, "none")
    stages = model.backbone.unfreeze_last(2)
    optimizer = make_optimizer(model, 1e-3, 0.01, layer_decay=0.5)
    scheduler = make_scheduler(optimizer, total_steps=100, warmup_fraction=0.1)
    params = {id(p): n for n, p in model.named_parameters()}
    scale = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = params[id(p)]
            stage = "head" if name.startswith("head.") else next(
                s for s in stages if name.removeprefix("backbone.net.")
                in model.backbone.stages[s])
            scale.setdefault(stage, set()).add(group["lr_scale"])
            assert group["weight_decay"] == (0.0 if p.ndim <= 1 else 0.01)  # no decay on 1-D
    # Only the unfrozen stages and the head train; each stage at half the one above.
    assert scale == {"head": {1.0}, stages[-1]: {0.5}, stages[-2]: {0.25}}
    top = [g for g in optimizer.param_groups if g["lr_scale"] == 1.0][0]
    assert top["lr"] == pytest.approx(1e-3 / 11)  # the first of 10 warmup steps
    scheduler.step_update(10)
    assert top["lr"] == pytest.approx(1e-3)  # warmup done
    scheduler.step_update(55)
    assert top["lr"] == pytest.approx(0.5e-3)  # half way down the cosine
    scheduler.step_update(100)
    assert top["lr"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("layer_decay", [None, 0.5])
def test_the_networks_own_weight_decay_exemptions_hold(layer_decay):
    """timm keeps a ViT's position embedding and class token out of weight decay (the
    network's no_weight_decay()); the optimizer, given the classifier around it, decayed
    them as any weight."""
    model, _ = create_classifier("vit_tiny_patch16_224", {"label": 3}, "none")
    model.backbone.unfreeze_last(99)
    optimizer = make_optimizer(model, 1e-3, 0.01, layer_decay=layer_decay)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("backbone.net.pos_embed", "backbone.net.cls_token"):
        assert named[name].ndim > 1 and decay[id(named[name])] == 0.0, name
    assert decay[id(named["backbone.net.patch_embed.proj.weight"])] == 0.01


def test_a_stage_of_one_step_trains_at_the_top_rate_without_timm_warning(caplog):
    """One step after warmup leaves nothing to anneal: the step runs at the top rate, and
    timm's warning about it (meaningless to a user) stays off the terminal."""
    import logging

    import torch

    optimizer = make_optimizer(torch.nn.Linear(4, 2), lr=0.1, weight_decay=0.0)
    with caplog.at_level(logging.WARNING):
        scheduler = make_scheduler(optimizer, total_steps=1, warmup_fraction=0.0)
    assert not [r for r in caplog.records if r.name.startswith("timm")], caplog.text
    scheduler.step_update(0)
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert logging.getLogger("timm.scheduler.cosine_lr").level == logging.NOTSET


def test_a_shorter_epoch_takes_its_share_of_the_stage_and_the_last_batch_ends_at_zero():
    """Images found unreadable make later epochs shorter: each epoch still covers its
    1 / epochs of the schedule, so the stage ends at zero, not part way down."""
    import torch

    from wingspan.training.schedule import StageSchedule

    optimizer = make_optimizer(torch.nn.Linear(4, 2), lr=0.1, weight_decay=0.0)
    schedule = StageSchedule(optimizer, steps_per_epoch=4, epochs=2, warmup_fraction=0.0)
    rate = lambda: optimizer.param_groups[0]["lr"]  # noqa: E731
    schedule.at(0, 4, 4)
    assert rate() == pytest.approx(0.05)  # half way after the first (whole) epoch
    schedule.at(1, 1, 2)  # the second epoch has 2 batches
    assert rate() == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.75)))
    schedule.at(1, 2, 2)
    assert rate() == pytest.approx(0.0, abs=1e-12)
