"""`wingspan train`: a new run, or `--resume` of a stopped one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wingspan.cli.app import app
from wingspan.cli.common import (
    is_main_process,
    make_config,
    out,
    plain,
    read_data,
    same_on_every_rank,
)
from wingspan.cli.options import (
    DeviceOpt,
    Devices,
    Format,
    GroupRegex,
    Level,
    MaxPixels,
    Nodes,
    Panel,
    Precision,
    Quiet,
    Runtime,
    Strategy,
    Strict,
    Weights,
    Workers,
    check_folder,
)
from wingspan.config import RUNS_DIR, TrainConfig, comma_list
from wingspan.errors import WingspanError, command

T = TrainConfig  # defaults shown in --help come from the one config


@app.command("train")
def train_command(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Argument(metavar="DATA",
        help="A folder of class folders, a CSV, or an ETHEC root (not needed with --resume).",
        show_default=False)] = None,
    level: Level = None,
    levels: Annotated[str | None, typer.Option(
        help="Train several taxonomic levels at once, e.g. family,subfamily,genus,species "
        "(one head each; predictions are made consistent).", rich_help_panel=Panel.MODEL)] = None,
    level_weights: Annotated[str | None, typer.Option(
        help="Loss weight per level in --levels, e.g. 1,1,1,2.",
        rich_help_panel=Panel.MODEL)] = None,
    rare_below: Annotated[int, typer.Option(
        help="With --levels: finest classes with fewer training images learn their parent "
        "level only.", rich_help_panel=Panel.MODEL)] = T.rare_below,
    backbone: Annotated[str, typer.Option(
        help="auto (resnet50 when its weights resolve, else the best one installed offline), "
        "a name from `wingspan models list`, or any timm model.",
        rich_help_panel=Panel.MODEL)] = T.backbone,
    weights: Weights = T.weights,
    epochs_head: Annotated[int, typer.Option(help="Stage 1 epochs (frozen backbone).",
                                             rich_help_panel=Panel.TRAINING)]
    = T.epochs_head,
    epochs_finetune: Annotated[int, typer.Option(help="Stage 2 epochs (fine-tuning).",
                                                 rich_help_panel=Panel.TRAINING)]
    = T.epochs_finetune,
    unfreeze: Annotated[int | None, typer.Option(
        help="Stages to fine-tune in stage 2 (default: per backbone).",
        rich_help_panel=Panel.TRAINING)] = None,
    lr: Annotated[float, typer.Option(
        help="Head learning rate; stage 2 uses lr x finetune_lr_scale (a config-file "
        "setting) with layer-wise decay.", rich_help_panel=Panel.TRAINING)] = T.lr,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.",
                                            rich_help_panel=Panel.TRAINING)] = T.batch_size,
    image_size: Annotated[int | None, typer.Option(
        help="Training resolution (default: the backbone's).", rich_help_panel=Panel.MODEL)] = None,
    val_fraction: Annotated[float, typer.Option(
        help="Share of the images for val (the images epochs are chosen on) where the data "
        "has none: no split of its own, a split without val, or (--selection holdout) "
        "train and val without test, where it is taken from train.", rich_help_panel=Panel.DATA)]
    = T.val_fraction,
    test_fraction: Annotated[float, typer.Option(
        help="Share kept apart for test (nothing is chosen on it), when the data has no "
        "split of its own; 0 keeps none.", rich_help_panel=Panel.DATA)] = T.test_fraction,
    max_per_class: Annotated[int | None, typer.Option(
        help="Undersample: at most N training images per class.",
        rich_help_panel=Panel.DATA)] = None,
    allow_leaky_splits: Annotated[bool, typer.Option(
        help="Train on given splits even where one group, file or identical copy is on two sides "
        "(refused by default; ETHEC's published splits are repaired).", rich_help_panel=Panel.DATA)]
    = T.allow_leaky_splits,
    selection: Annotated[str, typer.Option(
        help="holdout (data with its own val but no test: that val becomes the test split, "
        "scored fairly, and epochs are chosen on a part of train) | val (choose on the "
        "data's val; its score is then optimistic).", rich_help_panel=Panel.DATA)] = T.selection,
    holdout_classes: Annotated[str | None, typer.Option(
        help="Leave these classes out of training (comma-separated) and score their images "
        "as unknowns at the end: the open-set check without a second dataset.",
        rich_help_panel=Panel.UNKNOWN)] = None,
    unknown_score: Annotated[str, typer.Option(
        help="The default score for \"unknown\": msp | energy | mahalanobis | knn | msp+knn "
        "(all are fitted; predict --unknown-score picks another).",
        rich_help_panel=Panel.UNKNOWN)] = T.unknown_score,
    unknown_rate: Annotated[float, typer.Option(
        help="Share of known images the unknown threshold may turn away (set on val).",
        rich_help_panel=Panel.UNKNOWN)]
    = T.unknown_rate,
    class_weights: Annotated[str, typer.Option(
        help="auto (balanced when imbalanced) | balanced | none.",
        rich_help_panel=Panel.TRAINING)] = T.class_weights,
    max_class_weight: Annotated[float, typer.Option(
        help="Cap on a class's weight, as a multiple of the commonest class's (0: none).",
        rich_help_panel=Panel.TRAINING)]
    = T.max_class_weight,
    sampler: Annotated[str, typer.Option(help="shuffle | weighted.",
                                         rich_help_panel=Panel.TRAINING)] = T.sampler,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.",
                                                   rich_help_panel=Panel.TRAINING)]
    = T.label_smoothing,
    augment: Annotated[str, typer.Option(
        help="light | standard | strong | field (standard, plus the photo small and off-centre "
        "on a blurred copy of itself half the time: for close crops meeting field photos).",
        rich_help_panel=Panel.TRAINING
    )] = T.augment,
    train_bn: Annotated[bool, typer.Option(
        help="Let unfrozen BatchNorm layers use batch statistics while fine-tuning (off: "
        "they keep ImageNet's, which did better on small batches).",
        rich_help_panel=Panel.TRAINING)] = T.train_bn,
    feature_views: Annotated[int, typer.Option(
        help="Augmented views per image in stage 1's feature cache.",
        rich_help_panel=Panel.TRAINING)] = T.feature_views,
    patience: Annotated[int, typer.Option(help="Early stopping patience (epochs).",
                                          rich_help_panel=Panel.TRAINING)]
    = T.patience,
    seed: Annotated[int, typer.Option(help="Random seed: of the head's start, the crops and "
                                      "the order, and of the split where the data has none "
                                      "of its own (train on RUN/splits.csv to keep a run's).",
                                      rich_help_panel=Panel.TRAINING)] = T.seed,
    device: DeviceOpt = T.device,
    devices: Devices = None,
    nodes: Nodes = None,
    strategy: Strategy = T.strategy,
    compile: Annotated[bool, typer.Option(
        "--compile/--no-compile", help="torch.compile the fine-tuned layers (slow to start; "
        "pays on long runs on a GPU).", rich_help_panel=Panel.ENGINES)] = T.compile,
    precision: Precision = T.precision,
    runtime: Runtime = T.runtime,
    workers: Workers = None,
    profile: Annotated[bool, typer.Option(
        help="Write a torch.profiler trace of a few fine-tuning steps (runs/NAME/profile).",
        rich_help_panel=Panel.ENGINES)]
    = T.profile,
    name: Annotated[str | None, typer.Option(help="Run name (runs/NAME).",
                                             rich_help_panel=Panel.OUTPUT)] = None,
    runs_dir: Annotated[Path, typer.Option(callback=check_folder, help="Where runs are written.",
                                           rich_help_panel=Panel.OUTPUT)]
    = Path(RUNS_DIR),
    config: Annotated[Path | None, typer.Option(
        help="YAML file of settings; options given on the command line win.")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the run in this folder from its last checkpoint.")] = None,
    format: Format = None, group_regex: GroupRegex = None, strict: Strict = T.strict,
    max_pixels: MaxPixels = None,
    quiet: Quiet = False,
) -> None:
    """Train a classifier: a new head on a frozen pretrained backbone, then fine-tuning.

    Writes runs/NAME with config.yaml, history.csv, metrics.json, checkpoints and the
    model bundle (runs/NAME/model).
    """
    # (torch and timm, 5-10 s to import: after the settings are checked, so that a wrong
    # one is said at once)
    if resume:  # only where it runs may change
        from wingspan import training

        with same_on_every_rank():
            given = {k: v for k, v in ctx.params.items()
                     if ctx.get_parameter_source(k).name == "COMMANDLINE"}
            # (--max-pixels: set in the environment as it is parsed, which a resume reads,
            # as ws.resume(max_pixels=) and $WINGSPAN_MAX_PIXELS change it)
            ignored = sorted(set(given) - {"resume", "quiet", "max_pixels",
                                           *training.MACHINE_SETTINGS})
            if set(ignored) & {"runs_dir", "name"} and not Path(resume).is_dir():
                # (`--resume NAME --runs-dir runs`: a place, not a setting)
                where = Path(given.get("runs_dir") or "runs") / str(given.get("name") or resume)
                raise WingspanError(
                    "--resume takes the run's folder itself; --runs-dir and --name do not "
                    "say where it is.",
                    hint=f"Give its path: `{command('train', '--resume', where)}`.")
            if ignored:  # refused, not dropped: the user would believe they took effect
                names = ", ".join("DATA" if k == "data" else "--" + k.replace("_", "-")
                                  for k in ignored)
                raise WingspanError(
                    f"--resume continues {resume} with the settings it began with; {names} "
                    "cannot change them.",
                    hint="Leave them out; a resumed run may change only "
                         f"{', '.join('--' + k for k in training.MACHINE_SETTINGS)} and "
                         "--max-pixels. To train with other settings, start a new run.")
        machine = {k: v for k, v in given.items() if k in training.MACHINE_SETTINGS}
        run_dir = training.resume(resume, quiet=quiet, **machine)
    else:
        with same_on_every_rank():
            if data is None:
                raise WingspanError("Give DATA to train on (or --resume RUN).")
            # Only options set on the command line override the config file.
            # (Comma lists, --levels a,b, are the config's to read, as from a file; "" for
            # --holdout-classes holds none out, over a config file's.)
            params = dict(ctx.params)
            given = {k: v for k, v in params.items() if k in TrainConfig.__dataclass_fields__
                     and ctx.get_parameter_source(k).name == "COMMANDLINE"}
            if "level" in given and "levels" in given and level not in comma_list(levels):
                raise WingspanError(
                    f"--level {level} is not one of --levels {levels}.",
                    hint="--levels trains every level named and predicts the finest; --level "
                    "trains one. Give one of them.")
            if "level" in given and "levels" not in given:  # one level: not the file's several
                given.update(levels=None, level_weights=None)
            settings = (make_config(ctx, TrainConfig.from_file, config, **given) if config else
                        make_config(ctx, TrainConfig, **{k: v for k, v in params.items()
                                                if k in TrainConfig.__dataclass_fields__}))
            from wingspan.models.weights import check_weights

            check_weights(settings.weights)  # a typo: said now, not after reading the data
        # strict: set here or in the config file (where it also stops training at a
        # broken image), it stops the reading at a missing or unreadable file too.
        dataset = read_data(data, format, group_regex, settings.strict)
        from wingspan.training import run as training

        run_dir = training.train(dataset, settings, runs_dir, name, quiet)
    if is_main_process():
        print_run(run_dir)


def print_run(run_dir: Path) -> None:
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = metrics["best"]
    # The seconds of the epochs (the stage lines of the log are wall time, with checkpoints
    # and set-up), with the engine timing that the stage lines leave out.
    timed = sum(c.get("seconds", 0) for c in (metrics.get("engines") or {}).values()
                if c and c.get("how") == "measured")
    seconds = ", ".join(f"{stage} {s:.1f}" for stage, s in metrics["stage_seconds"].items())
    out.print(f"val macro-F1 {best['val_macro_f1']:.4f}, accuracy {best['val_acc']:.4f} "
              f"({best['stage']} epoch {best['epoch']}); seconds in epochs: {seconds}"
              + (f" (timing the engines included: {timed:.1f})" if timed else ""))
    out.print(f"Run: {plain(run_dir)}   model: {plain(run_dir / 'model')}")
