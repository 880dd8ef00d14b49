"""The engine of the fine-tuning step: its forward pass in two parts (the frozen prefix on
the engine for frozen weights, the trained rest in PyTorch), and its precision, measured.

While fine-tuning, the stages in front of the unfrozen ones cannot change, so they run
on the policy's engine for frozen weights (ONNX Runtime, say), exported once; the rest
runs in PyTorch with gradients, in fp32 or bf16 autocast. Which of those two is faster
depends on the CPU and the model, so `choose_train` times a few steps of each on a copy
of the model, once per machine and model, as `choose_frozen` does for frozen passes.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import torch
from torch import nn

from wingspan.config import EngineConfig
from wingspan.models.backbone import Backbone
from wingspan.models.classifier import Classifier
from wingspan.models.engine import (
    Choice,
    CoreWait,
    EngineCache,
    cpu_wait,
    engine_key,
    engine_named,
    guard,
    measured_choice,
    own_random_stream,
    time_calls,
    timing_images,
    unless_shared,
)
from wingspan.models.engine import timing_batch as make_timing_batch
from wingspan.models.policy import Policy
from wingspan.models.runtime import OnnxRunner, TorchRunner, autocast
from wingspan.progress import status


class _Trained(nn.Module):
    """What fine-tuning trains when a frozen prefix runs elsewhere: the backbone's units
    after it, and the head."""

    def __init__(self, rest: nn.Module, backbone: Backbone, head: nn.Module):
        super().__init__()
        # The whole backbone is registered for its pooling's own parameters (ConvNeXt's
        # norm); its frozen prefix has no gradients, so DDP and the optimiser skip it.
        self.rest, self.backbone, self.head = rest, backbone, head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.backbone.pool(self.rest(x)))

    def features_and_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"features": pooled features, level: logits}, as `WithFeatures` returns them."""
        features = self.backbone.pool(self.rest(x))
        return {"features": features, **self.head(features)}


def finetune_parts(model: Classifier, policy: Policy, size: int, prefix_runner=None
                   ) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, nn.Module]:
    """(prefix, trained), with `trained(policy.prepare_batch(prefix(images)))` the model's
    outputs. Where the frozen-pass engine is not PyTorch, the frozen stages in front of the
    unfrozen ones run there, without autograd (a 1.5x faster step for EfficientNet-Lite2 on
    a 2-core CPU with ONNX Runtime); `prefix_runner` reuses one already made for them.
    Otherwise `prefix` is None and `trained` is the model."""
    split = _split(model, policy)
    if split is None:
        return None, model
    frozen, rest = split
    prefix = prefix_runner or policy.runner(frozen, size)
    if not isinstance(prefix, OnnxRunner):  # it could not be exported: all in PyTorch, as
        return None, model  # with --runtime torch (the fallback's output has no autograd)
    return prefix, _Trained(rest, model.backbone, model.head)


def prefixed_pass(prefix: Callable[[torch.Tensor], torch.Tensor], trained: _Trained,
                  policy: Policy, dtype: torch.dtype | None
                  ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """images -> {"features", level: logits} (float32, on the CPU) for a pass that changes
    no weights: the fine-tuning prefix's runner (its weights are frozen, so its graph stays
    valid: no export) and the rest in PyTorch, in eval mode, under autocast in `dtype`.
    For a validation pass that beats exporting the whole model again, whose weights change
    every epoch (bench/oneoff_pass.py: 0.5-0.9x of its time for EfficientNet-Lite0/2 at
    50-1000 images in the training step's bf16; about the same at 1000 in fp32)."""

    @torch.inference_mode()
    def run(images: torch.Tensor) -> dict[str, torch.Tensor]:
        trained.eval()  # (the model's own modules: its BatchNorm and dropout)
        x = policy.prepare_batch(prefix(images))
        with autocast(policy.device, dtype):
            out = trained.features_and_outputs(x)
        return {k: v.float().cpu() for k, v in out.items()}

    return run


def finetune_forward(model: Classifier, policy: Policy, size: int, prefix_runner=None
                     ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """images -> outputs with gradients for the unfrozen stages, in the policy's training
    precision: the step that `choose_train` times. (Training itself runs `trained` under
    Lightning Fabric, which applies the precision and, in a distributed run, DDP.)"""
    prefix, trained = finetune_parts(model, policy, size, prefix_runner)

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        if prefix is not None:
            x = prefix(x)
        with policy.autocast():
            return trained(policy.prepare_batch(x))

    return forward


def _split(model: Classifier, policy: Policy):
    """(frozen prefix, rest) where the prefix runs on another engine than PyTorch."""
    if policy.frozen.engine.runtime == "torch":
        return None
    return model.backbone.split_frozen()


def choose_train(policy: Policy, model: Classifier, stages: int, size: int, batch_size: int,
                 remeasure: bool = False, thorough: bool = False, progress: bool = False
                 ) -> Policy:
    """`policy` with the training step's engine chosen for fine-tuning the last `stages`
    stages of `model`: forced, cached, or timed now on a copy of the model and cached. A
    precision the accuracy guard rejects (bf16 changing too many images) is not chosen."""
    if policy.train and not remeasure:
        return policy
    frozen = policy.frozen
    if frozen is None:  # a programming error: the prefix's engine must be known first
        raise RuntimeError("Choose the frozen-pass engine before the training step's.")
    engines = list(policy.train_candidates)
    n = timing_images(batch_size)
    key = engine_key("train", model.spec.name, size, batch_size, policy.device, engines,
                     timing_images=n, stages=stages, train_bn=model.backbone.train_bn,
                     frozen=frozen.engine.name)
    cache = EngineCache()
    record = None if remeasure else cache.get(key)
    if record and record.get("engine") in {e.name for e in engines}:
        return policy.with_choice("train", Choice.from_record(record, "cached"))
    if len(engines) == 1 and not remeasure:
        return policy.with_choice("train", Choice(engines[0], "the only candidate"))
    with status(f"Timing the training step in {', '.join(e.name for e in engines)} "
                "(once per model and machine)", progress):
        choice = _measure(policy, model, stages, size, n, engines, thorough)
    return policy.with_choice("train", unless_shared(choice, cache, key))


def _measure(policy: Policy, model: Classifier, stages: int, size: int, n: int,
             engines, thorough: bool) -> Choice:
    """Time the step in each precision; guard each precision as frozen passes are guarded
    (features against fp32's), unless the frozen-pass measurement already did."""
    start = time.perf_counter()
    with CoreWait() as wait:
        seconds = time_steps(policy, model, stages, size, engines, n, thorough)
    changed = {k: v for k, v in policy.frozen.changed.items()
               if k in {e.name for e in engines}}
    rejected = {k: v for k, v in policy.frozen.rejected.items() if k in changed}
    unguarded = [e for e in engines if e.name not in changed]
    if unguarded and len(engines) > 1:
        more_changed, more_rejected = _guard_precisions(policy, model, size, n, engines)
        changed.update(more_changed)
        rejected.update({k: v for k, v in more_rejected.items() if k not in rejected})
    return measured_choice(seconds, n, rejected, changed, time.perf_counter() - start,
                           cpu_wait(wait, policy.device))


def _guard_precisions(policy: Policy, model: Classifier, size: int, n: int, engines):
    """Features of the timing images in each precision, against fp32's."""
    pre = model.preprocessing
    x = make_timing_batch(size, n, pre.mean, pre.std)
    features = model.feature_extractor()
    was_training = model.training
    outputs = {e.name: TorchRunner(features, policy.device, e.dtype, policy.channels_last)(x)
               for e in {*engines, engine_named("torch-fp32")}}
    model.train(was_training)
    return guard(model, outputs, policy.device)


def time_steps(policy: Policy, model: Classifier, stages: int, size: int, engines,
               images: int, thorough: bool = False) -> dict[str, float]:
    """Seconds per step of `images` images for each engine: forward, loss and backward on
    a copy of the model, so the run's own weights, BatchNorm statistics and random stream
    stay as they were."""
    config = EngineConfig()
    pre = model.preprocessing
    x = make_timing_batch(size, images, pre.mean, pre.std)
    with own_random_stream(policy.device):
        trial = copy.deepcopy(model)
        trial.backbone.unfreeze_last(stages)
        trial.train()
        split = _split(trial, policy)
        prefix = policy.runner(split[0], size) if split else None  # one export for all
        steps = {}
        for engine in engines:
            candidate = dataclasses.replace(policy, train=Choice(engine, "timing"))
            steps[engine.name] = _step(trial, finetune_forward(trial, candidate, size, prefix))
        seconds, _ = time_calls(steps, x, config.rounds + thorough,
                                None if thorough else config.near_tie)
    return seconds


def _step(model: Classifier, forward) -> Callable[[torch.Tensor], None]:
    def step(x: torch.Tensor) -> None:
        outputs = forward(x)
        loss = sum(o.float().square().mean() for o in outputs.values())
        loss.backward()  # the cost of a real step's backward; the loss itself is arbitrary
        if loss.is_cuda:  # kernels run asynchronously: time them, not their launch
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)

    return step
