"""`wingspan demo`: the main job end to end on generated butterflies, offline."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from wingspan.cli.app import app
from wingspan.cli.common import make_config, out, plain
from wingspan.cli.data import print_split
from wingspan.cli.evaluate import print_evaluation
from wingspan.cli.options import Panel, Quiet, check_folder
from wingspan.cli.train import print_run
from wingspan.config import SERVE_HOST, SERVE_PORT, DemoConfig, SplitConfig, TrainConfig, to_dict
from wingspan.errors import WingspanError, counted, quoted


@app.command("demo")
def demo(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Option("--out", callback=check_folder,
                                          help="Where the demo writes everything.",
                                          rich_help_panel=Panel.OUTPUT)]
    = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Random seed of the generated data, its split, "
                                      "the preview and training.")]
    = DemoConfig.seed,
    image_size: Annotated[int, typer.Option(
        help="Pixels of the generated images and of training: 64 takes about half the "
             "time.")] = DemoConfig.image_size,
    epochs_finetune: Annotated[int, typer.Option(help="Fine-tuning epochs (0: the head only).")]
    = DemoConfig.epochs_finetune,
    quiet: Quiet = False,
) -> None:
    """Run the main job on built-in synthetic butterflies (offline, about a minute).

    Generates the data, inspects it, splits it, previews the augmentation, and trains a
    classifier on an offline ImageNet backbone.
    """
    import json
    import shutil

    from wingspan.data import read_dataset
    from wingspan.data.demo import generate_demo
    from wingspan.data.inspect import inspect_dataset, print_summary
    from wingspan.data.preview import write_preview
    from wingspan.data.readers import is_file_manager_file
    from wingspan.data.split import split_and_sample
    from wingspan.training import run as training

    config = make_config(ctx, DemoConfig, seed=seed, image_size=image_size,
                         epochs_finetune=epochs_finetune)
    # The demo replaces its own folders (data, train, ...) on a second run, so it writes
    # only into a new or empty folder, or one it made itself (its settings file, written
    # first, marks it: a killed demo runs again in the same place).
    marker = out_dir / "demo_config.json"
    if out_dir.is_dir() and any(not is_file_manager_file(p) for p in out_dir.iterdir()) \
            and not marker.is_file():  # (a Finder's .DS_Store is no one's work)
        raise WingspanError(f"{out_dir} holds files that the demo did not write, and the demo "
                            "would replace its data/ and train/ folders.",
                            hint="Give a new or empty folder: --out runs/demo.")
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(to_dict(config), indent=2))
    data_dir = generate_demo(out_dir / "data", config)
    out.rule("1. demo data")
    out.print(f"Generated {counted(sum(config.images_per_class), 'image')} of "
              f"{len(config.images_per_class)} species in {plain(data_dir)}")
    dataset = read_dataset(data_dir)
    out.rule("2. inspect")
    summary = inspect_dataset(dataset, out_dir / "inspect", progress=not quiet)
    print_summary(summary, out)
    out.rule("3. split")
    split = split_and_sample(dataset, out_dir, None, SplitConfig(seed=seed))
    print_split(split)
    out.rule("4. augmentation preview")
    preview = write_preview(dataset, out_dir / "preview.png", seed=seed)
    out.print(f"Wrote {plain(preview)}")
    out.rule("5. train")
    shutil.rmtree(out_dir / "train", ignore_errors=True)  # the demo owns its folder
    settings = TrainConfig(backbone=config.backbone, image_size=config.image_size,
                           epochs_head=config.epochs_head, epochs_finetune=config.epochs_finetune,
                           feature_views=config.feature_views, seed=seed)
    run_dir = training.train(read_dataset(split.splits_csv), settings, out_dir, "train", quiet)
    print_run(run_dir)
    out.rule("6. evaluate on the test split")
    from wingspan.evaluate.run import evaluate

    evaluation = evaluate(run_dir, progress=not quiet)
    print_evaluation(evaluation)
    out.rule("outputs")
    for name, path in [("data", data_dir), ("summary", out_dir / "inspect" / "summary.json"),
                       ("balance plots", out_dir / "inspect"), ("splits", split.splits_csv),
                       ("preview", preview), ("training run", run_dir),
                       ("model bundle", run_dir / "model"), ("report", evaluation.report)]:
        out.print(f"  {name:14s} {plain(path)}")
    out.rule("next")
    command, photo = _wingspan_command(), next(iter(sorted(data_dir.rglob("*.jpg"))), data_dir)
    run, photo = quoted(run_dir), quoted(photo)  # (pasted into a shell)
    page = quoted(out_dir / "predictions.html")
    for line, what in ((f"predict {run} {photo}", "a class and its probability per photo"),
                       (f"predict {run} {quoted(data_dir)} --output {page}",
                        "a page of every photo's answer, the least sure first"),
                       (f"serve {run}", f"a web page and an HTTP API at {SERVE_HOST}:{SERVE_PORT}"),
                       ("train PHOTOS", "your own photos, a folder per class")):
        out.print(f"  {plain(command)} {plain(line)}\n      ({what})")


def _wingspan_command() -> str:
    """How a new shell calls wingspan: `wingspan` where it is on the PATH, else the script
    running now (`make demo` runs .venv/bin/wingspan, which a new shell does not find:
    "wingspan: command not found"), or this Python with -m (`python -m wingspan demo`)."""
    running = Path(sys.argv[0])
    found = shutil.which("wingspan")
    if running.name == "__main__.py" and running.parent.name in ("wingspan", "cli"):
        return f"{quoted(sys.executable)} -m wingspan"
    if running.name != "wingspan" or (found and Path(found).resolve() == running.resolve()):
        return "wingspan"
    path = running.resolve()
    return quoted(os.path.relpath(path) if path.is_relative_to(Path.cwd().resolve())
                  else str(path))
