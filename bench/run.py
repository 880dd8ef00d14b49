"""`make bench`: wingspan against the plain recipe, side by side in one run, as ratios.

    python bench/run.py            # make bench: both photo sets with Lite0 (~26 min, 2 cores)
    python bench/run.py --backbones efficientnet_lite0 efficientnet_lite2   # make bench-full
    python bench/run.py --smoke    # tiny sizes, seconds: keeps this script from rotting
    python bench/run.py --only training --datasets inat-butterflies --backbones efficientnet_lite2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from baseline import best, plain_recipe, stage_end, time_to_reach  # noqa: E402

from wingspan.config import DemoConfig, TrainConfig, shared_data_dir  # noqa: E402
from wingspan.data import read_dataset  # noqa: E402
from wingspan.data.demo import generate_demo  # noqa: E402
from wingspan.models import create_classifier, resolve_policy  # noqa: E402
from wingspan.models.engine import Engine, cpu_flags, cpu_name  # noqa: E402
from wingspan.models.runtime import make_runner  # noqa: E402
from wingspan.training import train  # noqa: E402
from wingspan.training.finetune_engine import choose_train, time_steps  # noqa: E402
from wingspan.training.prepare import ensure_splits  # noqa: E402

console = Console()


def machine() -> dict:
    isa = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "sse4")))
    candidates = resolve_policy("cpu").frozen_candidates
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "isa": " ".join(isa), "torch_isa": torch.backends.cpu.get_cpu_capability(),
            "candidates": ", ".join(e.name for e in candidates)}


# --- training: wingspan's default recipe against the plain one --------------------------

def compare_training(data: Path, backbone: str, work: Path, smoke: bool) -> dict:
    dataset = read_dataset(data)
    level = dataset.default_level
    overrides = dict(backbone=backbone)
    if smoke:
        # (a test split too: without one, train keeps val as test and carves another val
        # out of train, and the two recipes would be scored on different splits)
        overrides.update(weights="none", image_size=32, epochs_head=2, epochs_finetune=1,
                         feature_views=1, val_fraction=0.25)
    config = TrainConfig(level=level, **overrides)
    dataset = ensure_splits(dataset, level, config, log=lambda _: None)
    table = dataset.table
    classes = sorted(set(table.loc[table["split"] == "train", level]))
    index = {c: i for i, c in enumerate(classes)}

    def part(split):
        rows = table[(table["split"] == split) & table[level].isin(classes)]
        return rows["path"].tolist(), rows[level].map(index).tolist()

    console.print(f"[bold]{data.name} / {backbone}[/]: plain recipe")
    base = plain_recipe(part("train"), part("val"), classes, backbone,
                        weights=config.weights, epochs=(1, 1) if smoke else (5, 5),
                        image_size=config.image_size, log=console.print)
    console.print(f"[bold]{data.name} / {backbone}[/]: wingspan")
    start = time.perf_counter()
    run_dir = train(dataset, config, work / "runs", f"{data.name}-{backbone}", quiet=True)
    wall = time.perf_counter() - start
    history = pd.read_csv(run_dir / "history.csv")
    ours = history[["stage", "epoch", "val_macro_f1", "seconds", "elapsed"]].to_dict("records")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    n_train = len(part("train")[0])

    def stage_summary(rows, seconds_of):
        out = {}
        for stage in ("head", "finetune"):
            picked = [r for r in rows if r["stage"] == stage]
            if picked:
                secs = seconds_of(stage, picked)
                out[stage] = {"seconds": round(secs, 1), "epochs": len(picked),
                              "train_images_per_s": round(n_train * len(picked) / secs, 1),
                              "val_macro_f1": picked[-1]["val_macro_f1"]}
        return out

    base_stages = stage_summary(base, lambda s, rows: sum(r["seconds"] for r in rows))
    our_stages = stage_summary(ours, lambda s, rows: metrics["stage_seconds"][s])
    target1 = stage_end(base, "head")["val_macro_f1"]
    target = best(base)
    base_best_time = time_to_reach(base, target)
    result = {
        "dataset": data.name, "backbone": backbone, "train_images": n_train,
        # (the same split for both recipes: the run's own splits.csv, checked by the smoke)
        "wingspan_train_images": int((pd.read_csv(run_dir / "splits.csv")["split"]
                                      == "train").sum()),
        "baseline": {"stages": base_stages, "best_val_macro_f1": target, "history": base},
        "wingspan": {"stages": our_stages, "best_val_macro_f1": best(ours), "history": ours,
                     "wall_seconds": round(wall, 1), "run": str(run_dir)},
        "stage1": {"target": target1, "baseline_s": base_stages["head"]["seconds"],
                   "wingspan_s": time_to_reach(ours, target1)},
        "whole": {"target": target, "baseline_s": base_best_time,
                  "wingspan_s": time_to_reach(ours, target)},
    }
    for key in ("stage1", "whole"):
        r = result[key]
        r["speedup"] = (round(r["baseline_s"] / r["wingspan_s"], 2)
                        if r["wingspan_s"] else None)
    return result


# --- inference and the training step: every candidate engine, auto's pick marked -------

def _speed(runners: list, size: int, batch: int, rounds: int) -> list[tuple[float, float]]:
    """(images/s at `batch`, milliseconds at batch 1) per runner. The runners take turns,
    round after round, and each keeps its median: on a shared machine a slow spell then
    hits every mode alike instead of one."""
    def one(forward, n: int) -> float:
        x = torch.randn(n, 3, size, size)
        t = time.perf_counter()
        forward(x)
        return time.perf_counter() - t

    for forward in runners:  # warm-up: first-call allocations and kernel choices
        one(forward, batch), one(forward, 1)
    big = [[one(f, batch) for f in runners] for _ in range(rounds)]
    small = [[one(f, 1) for f in runners] for _ in range(5)]
    return [(batch / statistics.median(r[i] for r in big),
             1000 * statistics.median(r[i] for r in small)) for i in range(len(runners))]


def inference(backbones: list[str], smoke: bool) -> tuple[list[dict], list[dict]]:
    """For frozen passes: the plain recipe's way (fp32, eager, NCHW) and every candidate
    engine of this machine, timed carefully at batch 64, beside `auto`'s pick (measured
    afresh, on fewer images, as a run would). Then the same for the training step."""
    rows, steps = [], []
    device = torch.device("cpu")
    for name in backbones:
        model, _ = create_classifier(name, {"y": 10}, weights="none")
        model.eval()
        size = 32 if smoke else model.preprocessing.input_size
        batch = 8 if smoke else 64
        policy = resolve_policy("cpu")
        prepared = policy.prepare_model(copy.deepcopy(model))
        start = time.perf_counter()
        auto = policy.choose_frozen(prepared, size, batch, remeasure=True)
        choice_s = time.perf_counter() - start
        modes, runners, setups = [], [], []
        for engine in [None, *policy.frozen_candidates]:  # None: the plain recipe's way
            start = time.perf_counter()
            if engine is None:
                runners.append(make_runner(copy.deepcopy(model), size, Engine("torch", "fp32"),
                                           device, channels_last=False))
            else:
                runners.append(make_runner(policy.prepare_model(copy.deepcopy(model)), size,
                                           engine, device, policy.channels_last,
                                           fallback=False))  # never time torch as onnx
            setups.append(time.perf_counter() - start)
            modes.append(engine)
        speeds = _speed(runners, size, batch, 1 if smoke else 3)
        for engine, (throughput, latency), setup in zip(modes, speeds, setups, strict=True):
            rows.append({"backbone": name, "engine": engine.name if engine else
                         "fp32 eager NCHW (plain recipe)", "size": size,
                         f"images_per_s_batch{batch}": round(throughput, 1),
                         "speedup": round(throughput / speeds[0][0], 2),
                         "latency_ms_batch1": round(latency, 1), "setup_s": round(setup, 1),
                         "auto": bool(engine and engine == auto.frozen.engine),
                         "auto_choice_s": round(choice_s, 1)})
            console.print(rows[-1])
        for engine, why in policy.left_out.items():
            rows.append({"backbone": name, "engine": engine, "size": size, "left_out": why})
        steps += training_step(name, prepared, auto, size, smoke)
    return rows, steps


def training_step(name: str, model, policy, size: int, smoke: bool) -> list[dict]:
    """Fine-tuning steps (the default stages unfrozen, the frozen prefix on the frozen-pass
    engine auto picked) in each candidate precision, at the default batch size."""
    batch = 4 if smoke else TrainConfig().batch_size
    stages = model.spec.unfreeze
    start = time.perf_counter()
    picked = choose_train(policy, model, stages, size, batch, remeasure=True).train
    choice_s = time.perf_counter() - start
    seconds = time_steps(policy, model, stages, size, policy.train_candidates, batch,
                         thorough=True)
    fp32 = seconds.get("torch-fp32", max(seconds.values()))
    rows = [{"backbone": name, "engine": engine, "size": size, "batch": batch,
             "images_per_s": round(batch / s, 1), "speedup": round(fp32 / s, 2),
             "auto": engine == picked.engine.name, "auto_choice_s": round(choice_s, 1)}
            for engine, s in seconds.items()]
    for row in rows:
        console.print(row)
    return rows


# --- scaling: a head-stage run on growing data, in a fresh process each -----------------

# Runs the CLI, then reports the process's own peak resident memory on stderr. VmHWM, not
# getrusage: Linux carries ru_maxrss across fork + exec, so a child would report this
# (large) benchmark process's peak instead of its own.
PEAK = ("import sys\nfrom wingspan.cli import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\nhwm = next(line for line in open('/proc/self/status') "
        "if line.startswith('VmHWM'))\nprint('PEAK_RSS_KB', hwm.split()[1], file=sys.stderr)")


def scaling(sizes: list[int], work: Path, smoke: bool) -> list[dict]:
    """Time of the head stage (feature caching + head epochs, from the run's metrics) and
    the peak memory of the training process, on 1k to 16k generated images."""
    rows = []
    # One generated set; each size trains on the first n/8 images of every class.
    images = generate_demo(work / "scale", DemoConfig(image_size=64,
                                                      images_per_class=(max(sizes) // 8,) * 8))
    for n in sizes:
        per_class = n // 8
        data = images / f"first-{n}.csv"
        pd.DataFrame([(f"{folder.name}/{path.name}", folder.name)
                      for folder in sorted(p for p in images.iterdir() if p.is_dir())
                      for path in sorted(folder.glob("*.jpg"))[:per_class]],
                     columns=["path", "label"]).to_csv(data, index=False)
        args = [sys.executable, "-c", PEAK, "train", str(data), "--epochs-finetune", "0",
                "--epochs-head", "3", "--feature-views", "0", "--image-size", "64",
                "--runs-dir", str(work / "scale-runs"), "--name", str(n), "--quiet"]
        args += (["--backbone", "test_efficientnet", "--weights", "none"] if smoke
                 else ["--backbone", "efficientnet_lite0"])
        env = {**os.environ, "WINGSPAN_CACHE": str(work / f"cache-{n}")}
        proc = subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        peak_kb = int(proc.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
        metrics = json.loads((work / "scale-runs" / str(n) / "metrics.json").read_text())
        seconds = metrics["stage_seconds"]["head"]
        rows.append({"images": 8 * per_class, "head_stage_seconds": round(seconds, 1),
                     "ms_per_image": round(1000 * seconds / (8 * per_class), 2),
                     "peak_rss_mb": round(peak_kb / 1024, 1)})
        console.print(rows[-1])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; seconds")
    parser.add_argument("--only", choices=["training", "inference", "scaling"], action="append")
    parser.add_argument("--datasets", nargs="*", default=["leeds-butterflies",
                                                           "inat-butterflies"])
    # Lite0 only by default: the plain recipe alone needs ~20 min for iNat / Lite2 on a
    # 2-core CPU, so the full matrix (--backbones efficientnet_lite0 efficientnet_lite2,
    # `make bench-full`) takes about an hour there.
    parser.add_argument("--backbones", nargs="*", default=["efficientnet_lite0"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    parts = args.only or ["training", "inference", "scaling"]
    start = time.perf_counter()
    command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {"machine": machine(), "smoke": args.smoke, "command": command.strip()}
    console.print(results["machine"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("WINGSPAN_CACHE", str(work / "cache"))
        if "training" in parts:
            if args.smoke:
                pairs = [(generate_demo(work / "demo", DemoConfig(
                    image_size=48, images_per_class=(12, 10, 8, 6))), "test_efficientnet")]
            else:
                pairs = [(shared_data_dir() / d, b) for d in args.datasets
                         for b in args.backbones]
            results["training"] = []
            for d, b in pairs:  # each from a cold cache of its own: its engine timing and
                saved_cache = os.environ["WINGSPAN_CACHE"]  # decodes counted in (a second
                os.environ["WINGSPAN_CACHE"] = str(work / f"cache-{d.name}-{b}")  # dataset
                try:  # found the first's engine choice cached: 7.2x read for about 5.9x)
                    results["training"].append(compare_training(d, b, work, args.smoke))
                finally:
                    os.environ["WINGSPAN_CACHE"] = saved_cache
        if "inference" in parts:
            # Its own engine cache: these choices are timed on random weights and must not
            # replace the ones a user's runs made (the decoded-image cache stays shared).
            saved_cache = os.environ["WINGSPAN_CACHE"]
            os.environ["WINGSPAN_CACHE"] = str(work / "engine-cache")
            results["inference"], results["training_step"] = inference(
                ["test_efficientnet"] if args.smoke else
                ["resnet50", "efficientnet_lite0", "efficientnet_lite2"], args.smoke)
            os.environ["WINGSPAN_CACHE"] = saved_cache
        if "scaling" in parts:
            results["scaling"] = scaling([48, 96] if args.smoke else [1000, 4000, 16000],
                                         work, args.smoke)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}{'-smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    path.with_suffix(".md").write_text(markdown(results))
    print_tables(results)
    console.print(f"Saved {path} and {path.with_suffix('.md').name}")


def fmt(s: dict | None) -> str:
    return f"{s['seconds']} / {s['train_images_per_s']} / {s['val_macro_f1']:.3f}" if s else "-"


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The results as (title, header, rows), for the terminal and for Markdown alike."""
    out = []
    if results.get("training"):
        rows = []
        for r in results["training"]:
            for stage in ("head", "finetune"):
                b, w = r["baseline"]["stages"].get(stage), r["wingspan"]["stages"].get(stage)
                rows.append([f"{r['dataset']} / {r['backbone']}", stage, fmt(b), fmt(w)])
        out.append(("Training: wall s / train images per s / val macro-F1 at the stage's end",
                    ["data / backbone", "stage", "plain recipe", "wingspan"], rows))
        rows = []
        for r in results["training"]:
            for key, what in (("stage1", "end of stage 1"), ("whole", "best")):
                x = r[key]
                rows.append([f"{r['dataset']} / {r['backbone']}", f"{what}: {x['target']:.3f}",
                             str(x["baseline_s"]), str(x["wingspan_s"] or "never"),
                             f"{x['speedup']}x" if x["speedup"] else "-"])
            rows.append(["", "best (plain / wingspan)", f"{r['baseline']['best_val_macro_f1']:.3f}",
                         f"{r['wingspan']['best_val_macro_f1']:.3f}", ""])
        out.append(("Time to reach the plain recipe's val macro-F1",
                    ["data / backbone", "target", "plain s", "wingspan s", "speed-up"], rows))
    if results.get("inference"):
        key = next(k for k in results["inference"][0] if k.startswith("images_per_s"))
        out.append(("Frozen passes: every candidate engine (random weights; setup = export "
                    "or layout change, once; auto = the engine auto picked, measured afresh)",
                    ["backbone", "engine", "px", key.replace("_", " "), "speed-up",
                     "batch 1 ms", "setup s", "auto"],
                    [[r["backbone"], r["engine"], str(r["size"]), str(r[key]),
                      f"{r['speedup']}x", str(r["latency_ms_batch1"]), str(r["setup_s"]),
                      f"picked ({r['auto_choice_s']} s to measure)" if r["auto"] else ""]
                     if "left_out" not in r else
                     [r["backbone"], r["engine"], str(r["size"]), "-", "-", "-", "-",
                      f"not a candidate: {r['left_out']}"]
                     for r in results["inference"]]))
    if results.get("training_step"):
        out.append(("Training step: fine-tuning the default stages, frozen prefix on the "
                    "picked frozen-pass engine",
                    ["backbone", "engine", "px", "batch", "images per s", "vs fp32", "auto"],
                    [[r["backbone"], r["engine"], str(r["size"]), str(r["batch"]),
                      str(r["images_per_s"]), f"{r['speedup']}x",
                      f"picked ({r['auto_choice_s']} s to measure)" if r["auto"] else ""]
                     for r in results["training_step"]]))
        out.append(("Auto against the fastest candidate (1.00 = auto picked the fastest)",
                    ["backbone", "frozen passes", "training step"], auto_ratios(results)))
    if results.get("scaling"):
        out.append(("Scaling: head stage (features cached once, 3 head epochs)",
                    ["images", "head-stage s", "ms/image", "peak RSS MB"],
                    [[str(v) for v in r.values()] for r in results["scaling"]]))
    return out


def auto_ratios(results: dict) -> list[list[str]]:
    """Per backbone: the picked engine's speed over the fastest candidate's, as the bench
    measured them (the target: within 10%)."""
    key = next(k for k in results["inference"][0] if k.startswith("images_per_s"))
    out = []
    for name in dict.fromkeys(r["backbone"] for r in results["inference"]):
        ratios = []
        for part, speed in (("inference", key), ("training_step", "images_per_s")):
            rows = [r for r in results[part] if r["backbone"] == name and speed in r
                    and not r["engine"].startswith("fp32 eager")]
            picked = next(r[speed] for r in rows if r["auto"])
            ratios.append(f"{picked / max(r[speed] for r in rows):.2f}")
        out.append([name, *ratios])
    return out


def print_tables(results: dict) -> None:
    console.print(f"Machine: {results['machine']}")
    for title, header, rows in tables(results):
        t = Table(*header, title=title)
        for row in rows:
            t.add_row(*row)
        console.print(t)
    console.print(f"Benchmark wall time: {results['wall_seconds'] / 60:.1f} min")


def markdown(results: dict) -> str:
    """The same tables in Markdown, for the README."""
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, ISA {m['isa']} "
             f"(torch: {m['torch_isa']}); candidates: {m['candidates']}. "
             f"Command: `{results['command']}`, {results['wall_seconds'] / 60:.1f} min.", ""]
    for title, header, rows in tables(results):
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
