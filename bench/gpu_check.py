"""`make gpu-check`: every GPU path, on the GPUs this machine has, with the figures.

    python bench/gpu_check.py                       # make gpu-check (exits 1 without a GPU)
    python bench/gpu_check.py --device cpu --quick  # the same steps on the CPU, in seconds:
                                                    # the suite runs this so it cannot rot

For each training precision the GPU has (bf16 where native, fp16 with its grad scaler, and
fp32), it trains on generated butterflies with `wingspan train --device cuda`, then
evaluates and predicts on the GPU. Then it trains on 1 GPU and on every GPU (DDP, Fabric's
launcher) and on every GPU under torchrun. Every step is the CLI, in its own process, as
users run it. It prints:

- per precision: val macro-F1, fine-tuning images/s, and the share of each fine-tuning
  step spent waiting for the data loader (from the run's time profile; the target is at
  most 20%, i.e. real JPEGs at >= 80% of the images/s of batches already on the GPU);
- evaluate and predict images/s;
- DDP scaling: fine-tuning images/s on N GPUs over 1 GPU (target >= 1.8x for 2).

The figures are saved in WORK/gpu-check.json after every step, so a check stopped by a
time limit keeps what it measured. Generating the data takes about a minute on one core:
`--work DIR` keeps it, and a second call with the same DIR reuses it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from wingspan.config import DemoConfig
from wingspan.data.demo import generate_demo

console = Console()


def wingspan(*args, launcher: list[str] | None = None, env: dict | None = None) -> str:
    """Run the CLI in its own process; its stdout, or the error and exit 1."""
    cmd = [*(launcher or [sys.executable]), "-m", "wingspan", *map(str, args)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        console.print(f"[red]FAILED[/] ({time.perf_counter() - start:.0f}s): {' '.join(cmd)}")
        console.print(proc.stdout[-2000:], proc.stderr[-4000:], markup=False)
        sys.exit(1)
    return proc.stdout


def train(data: Path, runs: Path, name: str, settings: list[str], *extra: str,
          launcher: list[str] | None = None) -> dict:
    """Train; the run's figures: val macro-F1, fine-tuning images/s and data-wait share."""
    shutil.rmtree(runs / name, ignore_errors=True)  # a run of an earlier call: trained anew
    wingspan("train", data, "--runs-dir", runs, "--name", name, "--quiet", *settings, *extra,
             launcher=launcher)
    run = runs / name
    metrics = json.loads((run / "metrics.json").read_text())
    spent = metrics["profile"].get("finetune", {})
    busy = sum(spent.get(k, 0.0) for k in ("data", "forward", "backward"))
    history = (run / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in history[1:]]
    finetune = [float(r["images_per_s"]) for r in rows if r["stage"] == "finetune"]
    return {"run": run, "val_macro_f1": metrics["best"]["val_macro_f1"],
            "engine": metrics["engine"],
            # The first epoch includes warm-up (cuDNN autotuning, worker start): the best.
            "finetune_images_per_s": max(finetune) if finetune else None,
            "data_wait": spent.get("data", 0.0) / busy if busy else None,
            "stage_seconds": metrics["stage_seconds"]}


def images_per_s(output: str) -> float:
    found = re.search(r"at ([\d.]+) images/s", output)
    return float(found.group(1)) if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) | cpu (a dry run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds, not minutes")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the data and runs here (the data is reused)")
    parser.add_argument("--precisions", nargs="+", choices=("bf16", "fp16", "fp32"),
                        help="only these (default: every one the GPU has)")
    args = parser.parse_args()

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        console.print("[yellow]No CUDA GPU here: nothing was checked.[/] Run this on a GPU "
                      "machine, or `--device cpu --quick` for a dry run of the same steps.")
        sys.exit(1)
    gpus = torch.cuda.device_count() if cuda else 2  # the dry run: 2 CPU processes
    work = args.work or Path(tempfile.mkdtemp(prefix="wingspan-gpu-check-"))
    quick = args.quick
    demo = DemoConfig(image_size=48 if quick else 256,
                      images_per_class=(8, 8, 6, 6) if quick else (400,) * 6)
    # Written last, with the settings: a killed generation or other sizes start afresh.
    data, ready = work / "data", work / "data.json"
    if not ready.is_file() or ready.read_text() != repr(demo):
        shutil.rmtree(data, ignore_errors=True)
        start = time.perf_counter()
        data = generate_demo(data, demo)
        ready.write_text(repr(demo))
        console.print(f"Generated the data in {time.perf_counter() - start:.0f}s")
    # The data workers wingspan picks for itself (cores less one, up to 16), as users get.
    settings = ["--device", args.device, *(["--workers", "0"] if quick else [])]
    # The dry run runs PyTorch alone, as a GPU does (ONNX Runtime runs on the CPU only),
    # and evaluates without drawing plots: seconds of each of its processes' time.
    torch_only = ["--runtime", "torch"] if quick else []
    settings += torch_only
    settings += (["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32",
                  "--epochs-head", "2", "--epochs-finetune", "2", "--batch-size", "8"]
                 if quick else
                 ["--backbone", "efficientnet_lite0", "--epochs-head", "5",
                  "--epochs-finetune", "3", "--batch-size", "128"])
    if cuda:
        name = torch.cuda.get_device_name(0)
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        precisions = (["bf16"] if native_bf16 else []) + ["fp16", "fp32"]
    else:
        name, precisions = "CPU (dry run)", ["fp32"]
    precisions = [p for p in precisions if p in (args.precisions or precisions)]
    if not precisions:
        console.print(f"[red]None of --precisions {' '.join(args.precisions)} runs here[/] "
                      f"({name}).")
        sys.exit(1)
    console.print(f"{gpus} x {name}; torch {torch.__version__}; work in {work}")

    table = Table("precision", "val macro-F1", "fine-tune img/s", "waiting for data",
                  "evaluate img/s", "predict img/s", title=f"One device: {name}")
    saved = work / "gpu-check.json"
    results = {"device": name, "count": gpus, "torch": torch.__version__, "precisions": {}}
    if saved.is_file():  # an earlier call on this --work (other precisions, or cut short)
        earlier = json.loads(saved.read_text())
        if (earlier.get("device"), earlier.get("count")) == (name, gpus):
            results["precisions"] = earlier.get("precisions", {})

    def save() -> None:
        saved.write_text(json.dumps(results, indent=2, default=str))

    for precision in precisions:
        run = train(data, work / "runs", precision, settings, "--precision", precision)
        wingspan("evaluate", run["run"], "--device", args.device, "--quiet", *torch_only,
                 *(["--no-plots"] if quick else []), "--out", work / f"evaluation-{precision}")
        evaluation = json.loads((work / f"evaluation-{precision}" / "metrics.json").read_text())
        predicted = wingspan("predict", run["run"], data, "--device", args.device, "--quiet",
                             *torch_only, "--output", work / f"pred-{precision}.csv")
        run.update(evaluate_images_per_s=evaluation["images_per_second"],
                   predict_images_per_s=images_per_s(predicted))
        results["precisions"][precision] = {k: v for k, v in run.items() if k != "run"}
        save()
        console.print(f"{precision} done: {results['precisions'][precision]}", highlight=False)
        table.add_row(precision, f"{run['val_macro_f1']:.3f}",
                      f"{run['finetune_images_per_s']:.0f}", f"{run['data_wait']:.0%}",
                      f"{run['evaluate_images_per_s']:.0f}",
                      f"{run['predict_images_per_s']:.0f}")
    console.print(table)
    for precision, run in results["precisions"].items():
        console.print(f"{precision}: {run['engine']}", highlight=False)

    best = precisions[0]
    scaling = Table("processes", "launcher", "fine-tune img/s", "x one device",
                    "val macro-F1", title="Distributed fine-tuning (DDP)")
    one = results["precisions"][best]
    scaling.add_row("1", "-", f"{one['finetune_images_per_s']:.0f}", "1.00",
                    f"{one['val_macro_f1']:.3f}")
    results["ddp"] = []
    if gpus > 1:
        for launcher, extra, how in (
                (None, ["--devices", str(gpus)], "Fabric"),
                ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", str(gpus)],  # (--standalone: a free port, not 29500)
                 [], "torchrun")):
            run = train(data, work / "runs", f"ddp-{how}", settings, "--precision", best,
                        *extra, launcher=launcher)
            ratio = run["finetune_images_per_s"] / one["finetune_images_per_s"]
            results["ddp"].append({"launcher": how, "processes": gpus, "ratio": ratio,
                                   **{k: v for k, v in run.items() if k != "run"}})
            save()
            scaling.add_row(str(gpus), how, f"{run['finetune_images_per_s']:.0f}",
                            f"{ratio:.2f}", f"{run['val_macro_f1']:.3f}")
    console.print(scaling)
    if gpus < 2:
        console.print("One GPU: DDP was not run.")
    save()
    console.print(f"Figures: {saved}")
    if not args.work and not quick:
        shutil.rmtree(work / "data", ignore_errors=True)


if __name__ == "__main__":
    main()
