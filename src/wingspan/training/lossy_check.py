"""How far the lossy engines (bf16, fp16) that `auto` may pick for a model's predictions
move its answers, measured on the run's own val images at the end of training.

The engine timing (wingspan.models.engine) guards each candidate on synthetic images and,
at a run's start, an untrained head: it cannot see that a trained model with many close
classes answers otherwise in bf16 (a weak 300-species model: 84 of 2,991 answers). Here,
with the best model and real images at hand, each lossy candidate's answers are compared
with fp32's; the bundle keeps the figures, and predict, evaluate and serve then leave out
an engine that moved too many of them (`avoided_engines`), so that they answer as the
fp32 export does. Only the engines `auto` may pick on the training machine are checked: a
model trained on a CPU without bf16 carries no figure, and runs bf16 unchecked elsewhere."""

from __future__ import annotations

import copy

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


def spread(rows: torch.Tensor, most: int) -> torch.Tensor:
    """At most `most` of `rows`, evenly spaced: a split listed class after class gives each
    class its share (the first 256 of ETHEC's val were 26 of its 561 species)."""
    return rows[torch.linspace(0, len(rows) - 1, min(most, len(rows))).round().long()]


def fp32_engine(device: torch.device, runtime: str = "auto"):
    """ONNX Runtime where it runs and `runtime` allows (fp32 either way, within 1e-6 of
    PyTorch's, and faster on CPUs), else PyTorch fp32."""
    fp32 = candidates(device, "fp32", runtime, False)[0]
    return next((e for e in fp32 if e.runtime == "onnx"), engine_named("torch-fp32"))


@torch.inference_mode()
def check_lossy_engines(run, passes: dict | None = None) -> dict | None:
    """{engine: {"images", "answers_changed"}} for each lossy candidate, on up to
    `EngineConfig.answer_check_images` readable val images spread over the split (which
    lists its classes one after another), the class predict answers (the top-down branch's
    with a taxonomy) compared; None where there is nothing to check. `passes` (a dict) is
    filled with each engine's pooled features and the val rows they are of ("rows"): the
    final val pass on one of these engines need not run again (finish._final_outputs)."""
    device = run.policy.device
    lossy = lossy_candidates(device)
    images = run.data.val
    rows = torch.arange(len(images))[run.readable(images)]
    if not lossy or not len(rows):
        return None
    rows = spread(rows, EngineConfig().answer_check_images)
    model = run.model.to(device).eval()
    extractor = model.feature_extractor()
    # The reference in PyTorch fp32: no export of its own (ONNX Runtime's fp32 is within
    # 1e-6 of it), whatever runtime the run was given.
    reference = engine_named("torch-fp32")
    runners = {e.name: make_runner(extractor, run.image_size, e, device,
                                   run.policy.channels_last)
               for e in (reference, *lossy)}
    head = copy.deepcopy(model.head).float().cpu()  # (the model's own stays on its device)
    taxonomy = run.data.taxonomy
    answers: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    features: dict[str, list[torch.Tensor]] = {name: [] for name in runners}
    index = []
    loader = make_loader(images, fixed_batches(rows.tolist(), run.config.batch_size),
                         run.workers)
    for x, _, idx, _ in loader:
        if not len(idx):
            continue
        index.append(idx)
        for name, runner in runners.items():
            features[name].append(runner(x).float())
            logits = head(features[name][-1])[run.data.level]
            probs = logits.softmax(1).numpy()
            answers[name].append(taxonomy.answer(probs, temperature=1.0) if taxonomy
                                 else probs.argmax(1))
    if not answers[reference.name]:  # (every image unreadable by now: a disk gone)
        return None
    if passes is not None:
        passes.update({name: torch.cat(f) for name, f in features.items()},
                      rows=torch.cat(index))
    truth = np.concatenate(answers.pop(reference.name))
    return {name: {"images": len(truth),
                   "answers_changed": int((np.concatenate(a) != truth).sum())}
            for name, a in answers.items()}


def avoided_engines(inference: dict | None) -> dict[str, str]:
    """{engine: why} for the lossy engines a bundle's check (its manifest's "inference",
    None before the check) found to move more of its val answers than EngineConfig allows
    (at least 2 images, so that one near tie does not)."""
    config = EngineConfig()
    avoided = {}
    for name, got in ((inference or {}).get("lossy_engines") or {}).items():
        changed, n = got.get("answers_changed", 0), got.get("images", 0)  # (a hand edit)
        if changed >= 2 and changed > config.max_answers_changed * n:
            avoided[name] = (f"it answered otherwise than fp32 on {changed} of this model's "
                             f"{n} val images")
    return avoided
