"""Is an ONNX export worth it for one pass on weights that change right after?

    python bench/oneoff_pass.py                                 # lite0 and lite2, 224 px
    python bench/oneoff_pass.py --backbones efficientnet_lite0 --size 224 --batch 32

Each fine-tuning epoch ends with a validation pass on new weights. With ONNX Runtime as
the frozen-pass engine that pass used to export the whole model first (once per epoch: the
graph is never run again). This times, side by side in one run (the candidates take turns,
each keeps its fastest batch), what that pass can cost:

- onnx-whole: export the whole model, then run it in ONNX Runtime;
- torch-fp32 / torch-bf16: the live model in PyTorch, eval mode, inference mode;
- prefix+torch-fp32 / -bf16: the fine-tuning prefix's ONNX session (already made for the
  training steps, so no export) and the unfrozen rest in PyTorch, as a fine-tuning
  validation pass now runs (`wingspan.training.finetune_engine.prefixed_pass`, in the
  training step's precision).

and prints each one's seconds for a pass over N images against onnx-whole's. Random
weights (timing does not depend on them); no data loading (the same for each).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from wingspan.models import create_classifier, resolve_policy
from wingspan.models.engine import cpu_name, native_bf16
from wingspan.models.runtime import OnnxRunner, TorchRunner, forget_sessions
from wingspan.training.finetune_engine import _Trained, prefixed_pass


def parts(name: str):
    model, _ = create_classifier(name, {"species": 100}, "none")
    model.backbone.unfreeze_last(model.spec.unfreeze)
    frozen, rest = model.backbone.split_frozen()
    model.eval()
    return model, frozen, _Trained(rest, model.backbone, model.head).eval()


def candidates(model, frozen, trained, size: int) -> dict:
    """name -> (setup seconds paid by each pass, call(images))."""
    cpu = torch.device("cpu")
    # Made once for the training steps, so no cost here; and the exporter's first call in
    # a process (imports) is out of the figure below, as a training run made it earlier.
    prefix = OnnxRunner(frozen, size)
    calls = {"onnx-whole": (_setup_seconds(model, size), OnnxRunner(model, size, model.levels))}
    bf16 = [("bf16", torch.bfloat16)] if native_bf16(cpu) else []
    for tag, dtype in [("fp32", None), *bf16]:
        calls[f"torch-{tag}"] = (0.0, TorchRunner(model, cpu, dtype, channels_last=True))
        policy = resolve_policy("cpu", "fp32", runtime="onnx")  # (its device and layout)
        calls[f"prefix+torch-{tag}"] = (0.0, prefixed_pass(prefix, trained, policy, dtype))
    return calls


def _setup_seconds(model, size: int) -> float:
    """Export and session creation for the whole model, as a validation pass paid it."""
    forget_sessions()
    start = time.perf_counter()
    OnnxRunner(model, size, model.levels)
    return time.perf_counter() - start


def per_image(calls: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Seconds per image of each candidate: warm-up, then turns; the fastest batch counts."""
    for _, call in calls.values():
        call(x)
    best = {}
    for _ in range(rounds):
        for name, (_, call) in calls.items():
            start = time.perf_counter()
            call(x)
            best[name] = min(best.get(name, 1e9), (time.perf_counter() - start) / len(x))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--images", type=int, nargs="+", default=[50, 200, 1000, 5000])
    args = ap.parse_args()
    print(f"{cpu_name()} ({platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}, {args.size} px")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    for name in args.backbones:
        model, frozen, trained = parts(name)
        model = model.to(memory_format=torch.channels_last)
        calls = candidates(model, frozen, trained, args.size)
        seconds = per_image(calls, x, args.rounds)
        print(f"\n{name}: onnx-whole setup (export + session) {calls['onnx-whole'][0]:.2f} s")
        head = " ".join(f"{'N=' + str(n):>9}" for n in args.images)
        print(f"{'engine':<20}{'img/s':>8}  pass seconds / onnx-whole's at {head}")
        whole = {n: calls["onnx-whole"][0] + n * seconds["onnx-whole"] for n in args.images}
        for engine, per in seconds.items():
            ratios = " ".join(f"{(calls[engine][0] + n * per) / whole[n]:>9.2f}"
                              for n in args.images)
            print(f"{engine:<20}{1 / per:>8.1f}  {ratios}")
        forget_sessions()


if __name__ == "__main__":
    main()
