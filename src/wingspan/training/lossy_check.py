"""How far the lossy engines (bf16, fp16) that `auto` may pick for a model's predictions
move its answers, measured on the run's own val images at the end of training.

The engine timing (wingspan.models.engine) guards each candidate on synthetic images and,
at a run's start, an untrained head: it cannot see that a trained model with many close
classes answers otherwise in bf16 (a weak 300-species model: 84 of 2,991 answers). Here,
with the best model and real images at hand, each lossy candidate's answers are compared
with fp32's; the bundle keeps the figures, and predict, evaluate and serve then leave out
an engine that moved too many of them (`avoided_engines`), so that they answer as the
fp32 export does."""

from __future__ import annotations

import numpy as np
import torch

from wingspan.config import EngineConfig
from wingspan.models.engine import candidates, engine_named
from wingspan.models.runtime import make_runner
from wingspan.training.data import fixed_batches, make_loader


def lossy_candidates(device: torch.device) -> list:
    """The engines `auto` may pick for a bundle's predictions on `device` that are not fp32."""
    return [e for e in candidates(device, "auto", "auto", train=False)[0]
            if e.precision != "fp32"]


@torch.inference_mode()
def check_lossy_engines(run) -> dict | None:
    """{engine: {"images", "answers_changed"}} for each lossy candidate, on up to
    `EngineConfig.answer_check_images` readable val images (the class predict answers: the
    top-down branch's with a taxonomy), or None where there is none to check."""
    device = run.policy.device
    lossy = lossy_candidates(device)
    images = run.data.val
    rows = torch.arange(len(images))[run.readable(images)]
    if not lossy or not len(rows):
        return None
    rows = rows[:EngineConfig().answer_check_images]
    model = run.model.to(device).eval()
    extractor = model.feature_extractor()
    # The fp32 reference on ONNX Runtime where it runs (fp32 either way, within 1e-6 of
    # PyTorch's, and faster on CPUs); the runners' graphs are not kept (weights just made).
    reference = next(engine_named(n) for n in ("onnx-fp32", "torch-fp32")
                      if engine_named(n) in candidates(device, "fp32", "auto", False)[0])
    runners = {e.name: make_runner(extractor, run.image_size, e, device,
                                   run.policy.channels_last)
               for e in (reference, *lossy)}
    head = model.head.float().cpu()
    taxonomy = run.data.taxonomy
    answers: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    loader = make_loader(images, fixed_batches(rows.tolist(), run.config.batch_size),
                         run.workers)
    for x, _, idx, _ in loader:
        if not len(idx):
            continue
        for name, runner in runners.items():
            logits = head(runner(x).float())[run.data.level]
            probs = logits.softmax(1).numpy()
            answers[name].append(taxonomy.answer(probs, temperature=1.0) if taxonomy
                                 else probs.argmax(1))
    fp32 = np.concatenate(answers.pop(reference.name))
    return {name: {"images": len(fp32),
                   "answers_changed": int((np.concatenate(a) != fp32).sum())}
            for name, a in answers.items()}


def avoided_engines(manifest: dict) -> dict[str, str]:
    """{engine: why} for the lossy engines a bundle's check found to move more of its val
    answers than EngineConfig allows (at least 2 images, so that one near tie does not)."""
    config = EngineConfig()
    avoided = {}
    for name, got in (manifest.get("inference", {}).get("lossy_engines") or {}).items():
        changed, n = got["answers_changed"], got["images"]
        if changed >= 2 and changed > config.max_answers_changed * n:
            avoided[name] = (f"it answered otherwise than fp32 on {changed} of this model's "
                             f"{n} val images")
    return avoided
