"""The `wingspan` command: parses options, calls one library function, prints.

Every default comes from `wingspan.config`; all the work happens in the library.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from wingspan import __version__
from wingspan.config import (
    AUGMENT_POLICIES,
    MAX_PIXELS,
    MAX_PIXELS_ENV,
    RUNS_DIR,
    AdaptConfig,
    AuditConfig,
    AugmentConfig,
    DemoConfig,
    InspectConfig,
    ReadConfig,
    ServeLimits,
    SettingError,
    SplitConfig,
    TrainConfig,
    name_pairs,
    to_dict,
)
from wingspan.errors import WingspanError, counted

app = typer.Typer(
    help="Train, evaluate and explain butterfly image classifiers by transfer learning.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
data_app = typer.Typer(help="Read, check, split and preview datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
models_app = typer.Typer(help="Backbones and their pretrained weights.", no_args_is_help=True)
app.add_typer(models_app, name="models")
# Results on stdout; progress bars and errors on stderr. soft_wrap: a long line is left for
# the terminal to wrap, so a path printed in it copies whole (rich would break it in two).
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _q(text) -> str:
    """A path, class name or message as it is: `IMG [male].jpg` is not Rich markup."""
    return escape(str(text))


def _here(path) -> Path:
    """A resolved path shown as other commands show theirs: relative to the working folder
    when it lies inside it (runs/NAME), else as it is."""
    path = Path(path)
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path

# Options shared by every command that reads a dataset.
Data = Annotated[Path, typer.Argument(
    help="A folder of class folders, a CSV (path,label,...), or an ETHEC root.",
    show_default=False)]
Format = Annotated[str | None, typer.Option(
    "--format", help="folder | split-folders | csv | ethec (default: detected from DATA).")]
GroupRegex = Annotated[str | None, typer.Option(
    "--group-regex", help="Regex on the file name whose first group keeps images together in "
    r"splits, e.g. '_(\d+)_\d+\.jpg$' for iNaturalist observation ids.")]
Strict = Annotated[bool, typer.Option(
    "--strict", help="Stop at a missing or unreadable file instead of skipping and listing it.")]
SplitStrict = Annotated[bool, typer.Option(
    "--strict", help="Stop at a listed file that is missing instead of skipping and listing it "
    "(split opens no image: `data inspect` finds the unreadable ones).")]
Level = Annotated[str | None, typer.Option(
    "--level", help="Label level to use (default: the finest: the class folder's name, or "
    "the CSV's label column).")]


def _config(ctx: typer.Context, make, *args, **values):
    """`make(*args, **values)`: a config, whose errors name the options typed on the command
    line (--val-fraction) rather than the settings they set (val_fraction); a setting from
    a config file keeps its name. An option is found by its parameter's name, which is the
    setting's."""
    try:
        return make(*args, **values)
    except SettingError as e:
        typed = {p.name: max(p.opts, key=len) for p in ctx.command.params
                 if p.param_type_name == "option"
                 and ctx.get_parameter_source(p.name).name == "COMMANDLINE"}
        raise WingspanError(e.worded(typed), hint=e.hint) from None


def _folder(value: Path | None) -> Path | None:
    if value is not None and value.exists() and not value.is_dir():
        raise typer.BadParameter(f"{value} is a file; name a folder to write into.")
    return value


def _apart(a: float, b: float) -> tuple[str, str]:
    """Two numbers with as many significant digits as it takes (3 to 8) for them to read
    differently: a score just over its threshold must not print as "1 > 1"."""
    digits = next((d for d in range(3, 9) if f"{a:.{d}g}" != f"{b:.{d}g}"), 8)
    return f"{a:.{digits}g}", f"{b:.{digits}g}"


def _check_output_file(path: Path, suffixes: tuple[str, ...]) -> None:
    """Before any work: a file of a known kind, where one can be written (the results of a
    long prediction are not to be lost to a typo in --output)."""
    if path.is_dir():
        raise WingspanError(f"--output {path} is a folder.", hint="Name a file in it.")
    if path.suffix.lower() not in suffixes:
        raise WingspanError(f"--output {path}: the file must end in {' or '.join(suffixes)}.",
                            hint=f"e.g. --output predictions{suffixes[0]}")
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if existing != path.absolute() and not existing.is_dir():
        raise WingspanError(f"--output {path}: {existing} is a file, not a folder.")
    folder = existing if existing.is_dir() else existing.parent
    try:  # a file made and removed: os.access says yes to root in /proc or a read-only mount
        probe = folder / f".{path.name}.{os.getpid()}.probe"
        probe.open("w").close()
        probe.unlink()
    except OSError as e:
        raise WingspanError(f"--output {path}: {folder} cannot be written to "
                            f"({e.strerror or e}).",
                            hint="Write somewhere you have write access.") from e


OutDir = Annotated[Path | None, typer.Option(
    "--out", callback=_folder, help="Output folder (default: runs/data/<dataset name>).")]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress (bars, each epoch's line); what the figures lack is "
    "still said.")]
Runtime = Annotated[str, typer.Option(
    help="Engine for passes with frozen weights: auto (the fastest, measured once per model "
    "and machine; see `wingspan doctor`) | torch | onnx. $WINGSPAN_RUNTIME sets auto.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="auto (a GPU when there is one) | cpu | cuda | cuda:N.")]
Devices = Annotated[int | None, typer.Option(
    help="Processes on this machine, one per GPU (or CPU processes): Lightning Fabric starts "
    "them (default: as torchrun started them, else 1).", show_default=False)]
Nodes = Annotated[int | None, typer.Option(
    help="Machines in the run (run the same command on each, or under SLURM / torchrun).",
    show_default=False)]
Strategy = Annotated[str, typer.Option(help="auto | ddp.")]


def _set_max_pixels(value: int | None) -> int | None:
    if value is not None:  # the environment reaches the data-loading worker processes too
        os.environ[MAX_PIXELS_ENV] = str(value)
    return value


MaxPixels = Annotated[int | None, typer.Option(
    "--max-pixels", min=1, callback=_set_max_pixels, show_default=False,
    help=f"Pixel budget of one image (default {MAX_PIXELS / 1e6:.0f} MP): larger JPEGs are "
    "decoded reduced, other images refused.")]
UnknownScoreOpt = Annotated[str | None, typer.Option(
    help="The unknown score to use, of those the model holds: msp | energy | mahalanobis | "
    "knn | msp+knn (default: the one chosen at training).", show_default=False)]
Precision = Annotated[str, typer.Option(
    help="auto (measured, like --runtime) | fp32 | bf16 | fp16. $WINGSPAN_PRECISION sets "
    "auto.")]
# Every command that reads images through a data loader; checked by resolve_workers.
Workers = Annotated[int | None, typer.Option(
    help="Data workers (0: read the images in this process; default: per machine).",
    show_default=False)]


def _read(data: Path, format: str | None, group_regex: str | None, strict: bool,
          check_files: bool = True, report: bool = False):
    """DATA read; with `report`, what reading left out or flagged said first, as train says
    it (inspect lists every case itself)."""
    from wingspan.data import read_dataset
    from wingspan.data.samples import report_reading

    dataset = read_dataset(data, ReadConfig(format=format, group_regex=group_regex,
                                            strict=strict, check_files=check_files))
    if report:
        report_reading(dataset, lambda line: err.print(f"[yellow]{escape(line)}[/]",
                                                       highlight=False))
    return dataset


def _pixel_budget(text: str) -> int | None:
    from wingspan.data.images import pixel_budget  # (Pillow: not for --help)

    return pixel_budget(text)


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Show the version.")] = False):
    if version:
        out.print(f"wingspan {__version__}")
        raise typer.Exit()
    budget = os.environ.get(MAX_PIXELS_ENV)
    if budget is not None and _pixel_budget(budget) is None:
        raise WingspanError(f"${MAX_PIXELS_ENV} is {budget!r}, not a number of pixels.",
                            hint=f"Set it to a whole number, e.g. {MAX_PIXELS_ENV}=100000000 "
                                 "(100 MP), or unset it.")


@data_app.command("inspect")
def data_inspect(
    ctx: typer.Context,
    data: Data, level: Level = None, format: Format = None, group_regex: GroupRegex = None,
    strict: Strict = False, out_dir: OutDir = None,
    metadata_only: Annotated[bool, typer.Option(
        "--metadata-only", help="Read labels only; do not open images (e.g. ETHEC split files "
        "without the images).")] = False,
    tiny_px: Annotated[int, typer.Option(help="Flag images whose shorter side is smaller.")]
    = InspectConfig.tiny_px,
    max_pixels: MaxPixels = None,
    quiet: Quiet = False,
) -> None:
    """Count classes per level and find broken, duplicate, odd and tiny images.

    Writes summary.json and a class-balance plot per level.
    """
    from wingspan.data.inspect import inspect_dataset, print_class_table, print_summary

    dataset = _read(data, format, group_regex, strict, check_files=not metadata_only)
    level = dataset.resolve_level(level)
    target = out_dir or dataset.claim_out_dir()
    summary = inspect_dataset(dataset, target, _config(ctx, InspectConfig, tiny_px=tiny_px),
                              check_images=not metadata_only, progress=not quiet)
    unreadable = summary.get("images", {}).get("unreadable", [])
    if strict and unreadable:
        raise WingspanError(f"{counted(len(unreadable), 'image')} cannot be read, e.g. "
                            f"{unreadable[0]['path']}: {unreadable[0]['error']}",
                            hint="Fix or delete them (all are listed in summary.json).")
    print_summary(summary, out)
    print_class_table(dataset, level, out)
    out.print(f"Wrote {_q(target / 'summary.json')} and "
              f"{counted(len(summary['plots']), 'balance plot')} in {_q(target)}")


@data_app.command("split")
def data_split(
    ctx: typer.Context,
    data: Data, level: Level = None,
    val_fraction: Annotated[float, typer.Option(
        "--val", help="Fraction of groups for validation.")] = SplitConfig.val_fraction,
    test_fraction: Annotated[float, typer.Option(
        "--test", help="Fraction of groups for the test split.")] = SplitConfig.test_fraction,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same split).")]
    = SplitConfig.seed,
    max_per_class: Annotated[int | None, typer.Option(
        help="Undersample: keep at most N training images per class.")] = None,
    oversample_to: Annotated[int | None, typer.Option(
        help="Oversample: repeat rare training classes up to N images.")] = None,
    format: Format = None, group_regex: GroupRegex = None, strict: SplitStrict = False,
    out_dir: OutDir = None,
) -> None:
    """Split into train/val/test, stratified by LEVEL and grouped (no group on two sides).

    Writes splits.csv, which `wingspan` reads back as a dataset, and sampling.json with the
    class weights of the training split.
    """
    from wingspan.data.split import split_and_sample

    config = _config(ctx, SplitConfig, val_fraction=val_fraction, test_fraction=test_fraction,
                     seed=seed, max_per_class=max_per_class, oversample_to=oversample_to)
    dataset = _read(data, format, group_regex, strict, report=True)
    if dataset.has_splits:  # its own split stays what `train DATA` uses
        sides = dataset.table["split"].value_counts()
        out.print("[yellow]DATA has a split of its own[/] ("
                  + ", ".join(f"{k} {v}" for k, v in sides.items() if k) + "): `wingspan train "
                  "DATA` keeps using it; train on the splits.csv written here to use this one.")
    result = split_and_sample(dataset, out_dir or dataset.claim_out_dir(), level, config)
    _print_split(result)


def _print_split(result) -> None:
    r = result.report
    sizes = ", ".join(f"{k} {v} ({r.fractions[k]:.0%})" for k, v in r.sizes.items())
    out.print(f"Split on '{_q(result.level)}': {sizes}")
    if r.repeats_dropped:
        out.print(f"{counted(r.repeats_dropped, 'image')} listed on more than one side: one "
                  "row each now")
    if r.train_only:
        out.print(f"[yellow]{counted(len(r.train_only), 'class has', 'classes have')} too few "
                  "groups for every split; "
                  f"kept in train only:[/] {_q(_some(r.train_only))}")
    for split, classes in r.missing.items():
        out.print(f"[yellow]{counted(len(classes), 'class has', 'classes have')} no images in "
                  f"{split}:[/] {_q(_some(classes))}")
    if result.undersampled:
        out.print(f"--max-per-class left out "
                  f"{counted(sum(result.undersampled.values()), 'training image')} of "
                  f"{counted(len(result.undersampled), 'class', 'classes')} (listed in "
                  "sampling.json)")
    if result.oversampled:
        out.print(f"--oversample-to added "
                  f"{counted(sum(result.oversampled.values()), 'repeated training image')} to "
                  f"{counted(len(result.oversampled), 'class', 'classes')}")
    if result.undersampled or result.oversampled:  # the sizes above are the split's
        rows = result.dataset.table["split"].value_counts()
        out.print("So splits.csv holds " + ", ".join(
            f"{k} {rows.get(k, 0)}" for k in r.sizes) + " rows")
    w = result.class_weights
    out.print(f"Balanced class weights (train): {min(w.values()):.3g} to {max(w.values()):.3g} "
              f"over {counted(len(w), 'class', 'classes')}")
    out.print(f"Wrote {_q(result.splits_csv)} and {_q(result.sampling_json)}")


def _some(items, n: int = 8) -> str:
    """The first n names, comma-separated; names that hold a comma themselves quoted
    ("Danaus plexippus, Monarch" is one class, not two)."""
    items = [f"'{i}'" if "," in str(i) else str(i) for i in items]
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n})" if len(items) > n else "")


@data_app.command("audit")
def data_audit(
    ctx: typer.Context,
    data: Data, level: Level = None,
    backbone: Annotated[str, typer.Option(
        help="Frozen ImageNet features from this backbone (auto: as train).")]
    = AuditConfig.backbone,
    weights: Annotated[str, typer.Option(
        help="auto (offline first) | none | a weights file | a wingspan run or model (its "
        "fine-tuned backbone; --backbone auto takes its architecture).")]
    = AuditConfig.weights,
    folds: Annotated[int, typer.Option(help="Folds of the out-of-fold probabilities.")]
    = AuditConfig.folds,
    duplicate_similarity: Annotated[float, typer.Option(
        "--similarity",
        help="Cosine similarity of features at which two images are near-duplicates.")]
    = AuditConfig.duplicate_similarity,
    gallery: Annotated[int, typer.Option(help="Suspect images shown in audit.html.")]
    = AuditConfig.gallery,
    device: DeviceOpt = AuditConfig.device,
    cache: Annotated[bool, typer.Option(
        help="Keep each image's features in the cache folder, so that the next audit "
        "computes only new or edited images.")] = AuditConfig.cache,
    format: Format = None, group_regex: GroupRegex = None, strict: Strict = False,
    max_pixels: MaxPixels = None, out_dir: OutDir = None, quiet: Quiet = False,
) -> None:
    """Find likely label errors (confident learning on out-of-fold probabilities, with
    cleanlab) and near-duplicate images within and across splits.

    Writes audit.csv (every image, most suspect first), duplicates.csv and audit.html.
    """
    from rich.table import Table

    from wingspan.data.audit import audit_dataset
    from wingspan.models.weights import check_weights

    config = _config(ctx, AuditConfig, backbone=backbone, weights=weights, folds=folds,
                     duplicate_similarity=duplicate_similarity, gallery=gallery,
                     device=device, cache=cache)
    check_weights(config.weights)  # a typo: said now, not after reading the data
    dataset = _read(data, format, group_regex, strict=strict, report=True)
    result = audit_dataset(dataset, out_dir or dataset.claim_out_dir(), level, config,
                           progress=not quiet, strict=strict)
    issues, dups = result.issues, result.duplicates
    table = Table("rank", _folding("image"), "label", "looks like", "label quality",
                  title=f"Most suspect labels ({int(issues['flagged'].sum())} of {len(issues)} "
                  "flagged by cleanlab)")
    for r in issues.head(15).itertuples():
        table.add_row(str(r.rank), _q(r.path), _q(r.label),
                      f"{_q(r.suspected)} ({r.suspected_probability:.2f})",
                      f"{r.label_quality:.3f}")
    out.print(table)
    if result.single_image_classes:
        alone = result.single_image_classes
        out.print(f"{len(alone)} " + ("classes have a single image, so their labels were"
                                       if len(alone) > 1 else
                                       "class has a single image, so its label was")
                  + " not checked (no other image of the class to learn from out of fold): "
                  f"{_q(_some(alone))}")
    out.print(f"{counted(len(dups), 'near-duplicate pair')} (similarity >= "
              f"{duplicate_similarity}, or perceptual hashes within {config.hash_distance} bits), "
              f"{int(dups['across_splits'].sum())} across splits, "
              f"{int(dups['labels_differ'].sum())} with different labels")
    if result.unreadable:  # left out of both searches
        path, why = next(iter(result.unreadable.items()))
        out.print(f"[yellow]Could not read {counted(len(result.unreadable), 'image')}[/], "
                  f"left out of the audit, e.g. {_q(path)}: {escape(why)} (all in audit.html; "
                  "--strict stops at them)")
    out.print(f"Wrote {_q(result.csv)}, {_q(result.duplicates_csv)} and {_q(result.html)}")


@data_app.command("download")
def download_command(
    name: Annotated[str, typer.Argument(help="The dataset: ethec.", show_default=False)],
    to: Annotated[Path | None, typer.Option(
        help="Folder to keep it in (default: the cache folder's datasets/).")] = None,
    url: Annotated[str | None, typer.Option(help="A mirror of the published archive.")]
    = None,
    quiet: Quiet = False,
) -> None:
    """Download a public dataset: resumable (run it again after a cut), checked against
    its published md5, unpacked; prints the folder to train on."""
    from wingspan.config import default_cache_dir
    from wingspan.data.download import SOURCES, download_dataset

    if name in SOURCES and not quiet:
        err.print(f"{SOURCES[name].description}", highlight=False)
    root = download_dataset(name, to or default_cache_dir() / "datasets", url=url,
                            progress=not quiet)
    out.print(f"Dataset ready: {_q(root)}\nTrain on it with: wingspan train {_q(root)} "
              "--levels family,subfamily,genus,species")


@data_app.command("preview")
def data_preview(
    ctx: typer.Context,
    data: Data, level: Level = None,
    policy: Annotated[str, typer.Option(
        "--augment", help=f"Policy: {' | '.join(AUGMENT_POLICIES)}.")] = AugmentConfig.policy,
    image_size: Annotated[int, typer.Option(help="Training resolution in pixels.")]
    = AugmentConfig.image_size,
    rows: Annotated[int, typer.Option(help="Classes shown (one image each).")] = 6,
    views: Annotated[int, typer.Option(help="Augmented versions per image.")] = 5,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    format: Format = None, group_regex: GroupRegex = None, out_dir: OutDir = None,
) -> None:
    """Write a grid PNG: originals beside several augmented versions."""
    from wingspan.data.preview import write_preview

    config = _config(ctx, AugmentConfig, policy=policy, image_size=image_size)
    dataset = _read(data, format, group_regex, strict=False, report=True)
    target = out_dir or dataset.claim_out_dir()
    path = write_preview(dataset, target / "preview.png", config, level, rows=rows,
                         augmented=views, seed=seed,
                         log=lambda line: out.print(f"[yellow]{_q(line)}[/]"))
    classes = dataset.table[dataset.resolve_level(level)].nunique()
    shown = f" ({min(rows, classes)} of {classes} classes; --rows {classes} for all)" \
        if classes > rows else ""
    out.print(f"Wrote {_q(path)}{shown}")


T = TrainConfig  # defaults shown in --help come from the one config
S = ServeLimits


@app.command("train")
def train_command(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Argument(
        help="A folder of class folders, a CSV, or an ETHEC root (not needed with --resume).",
        show_default=False)] = None,
    level: Level = None,
    levels: Annotated[str | None, typer.Option(
        help="Train several taxonomic levels at once, e.g. family,subfamily,genus,species "
        "(one head each; predictions are made consistent).")] = None,
    level_weights: Annotated[str | None, typer.Option(
        help="Loss weight per level in --levels, e.g. 1,1,1,2.")] = None,
    rare_below: Annotated[int, typer.Option(
        help="With --levels: finest classes with fewer training images learn their parent "
        "level only.")] = T.rare_below,
    backbone: Annotated[str, typer.Option(
        help="auto (resnet50 when its weights resolve, else the best one installed offline), "
        "a name from `wingspan models list`, or any timm model.")] = T.backbone,
    weights: Annotated[str, typer.Option(
        help="auto (offline first) | none | a weights file | a wingspan run or model (its "
        "fine-tuned backbone; --backbone auto takes its architecture).")]
    = T.weights,
    epochs_head: Annotated[int, typer.Option(help="Stage 1 epochs (frozen backbone).")]
    = T.epochs_head,
    epochs_finetune: Annotated[int, typer.Option(help="Stage 2 epochs (fine-tuning).")]
    = T.epochs_finetune,
    unfreeze: Annotated[int | None, typer.Option(
        help="Stages to fine-tune in stage 2 (default: per backbone).")] = None,
    lr: Annotated[float, typer.Option(
        help="Head learning rate; stage 2 uses lr x finetune_lr_scale (a config-file "
        "setting) with layer-wise decay.")] = T.lr,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = T.batch_size,
    image_size: Annotated[int | None, typer.Option(
        help="Training resolution (default: the backbone's).")] = None,
    val_fraction: Annotated[float, typer.Option(
        help="Share of the images for val, when the data has no split of its own.")]
    = T.val_fraction,
    test_fraction: Annotated[float, typer.Option(
        help="Share kept apart for test (nothing is chosen on it), when the data has no "
        "split of its own; 0 keeps none.")] = T.test_fraction,
    max_per_class: Annotated[int | None, typer.Option(
        help="Undersample: at most N training images per class.")] = None,
    allow_leaky_splits: Annotated[bool, typer.Option(
        help="Train on given splits even where one group, file or identical copy is on two sides "
        "(refused by default; ETHEC's published splits are repaired).")]
    = T.allow_leaky_splits,
    selection: Annotated[str, typer.Option(
        help="holdout (data with its own val but no test: that val becomes the test split, "
        "scored fairly, and epochs are chosen on a part of train) | val (choose on the "
        "data's val; its score is then optimistic).")] = T.selection,
    holdout_classes: Annotated[str | None, typer.Option(
        help="Leave these classes out of training (comma-separated) and score their images "
        "as unknowns at the end: the open-set check without a second dataset.")] = None,
    unknown_score: Annotated[str, typer.Option(
        help="The default score for \"unknown\": msp | energy | mahalanobis | knn | msp+knn "
        "(all are fitted; predict --unknown-score picks another).")] = T.unknown_score,
    unknown_rate: Annotated[float, typer.Option(
        help="Share of known images the unknown threshold may turn away (set on val).")]
    = T.unknown_rate,
    class_weights: Annotated[str, typer.Option(
        help="auto (balanced when imbalanced) | balanced | none.")] = T.class_weights,
    max_class_weight: Annotated[float, typer.Option(
        help="Cap on a class's weight, as a multiple of the commonest class's (0: none).")]
    = T.max_class_weight,
    sampler: Annotated[str, typer.Option(help="shuffle | weighted.")] = T.sampler,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.")]
    = T.label_smoothing,
    augment: Annotated[str, typer.Option(
        help="light | standard | strong | field (standard, plus the photo small and off-centre "
        "on a blurred copy of itself half the time: for close crops meeting field photos)."
    )] = T.augment,
    train_bn: Annotated[bool, typer.Option(
        help="Let unfrozen BatchNorm layers use batch statistics while fine-tuning (off: "
        "they keep ImageNet's, which did better on small batches).")] = T.train_bn,
    feature_views: Annotated[int, typer.Option(
        help="Augmented views per image in stage 1's feature cache.")] = T.feature_views,
    patience: Annotated[int, typer.Option(help="Early stopping patience (epochs).")]
    = T.patience,
    seed: Annotated[int, typer.Option(help="Random seed.")] = T.seed,
    device: DeviceOpt = T.device,
    devices: Devices = None,
    nodes: Nodes = None,
    strategy: Strategy = T.strategy,
    compile: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the fine-tuned layers (slow to start; pays on long "
        "runs on a GPU).")] = T.compile,
    precision: Precision = T.precision,
    runtime: Runtime = T.runtime,
    workers: Workers = None,
    profile: Annotated[bool, typer.Option(
        help="Write a torch.profiler trace of a few fine-tuning steps (runs/NAME/profile).")]
    = False,
    name: Annotated[str | None, typer.Option(help="Run name (runs/NAME).")] = None,
    runs_dir: Annotated[Path, typer.Option(callback=_folder, help="Where runs are written.")]
    = Path(RUNS_DIR),
    config: Annotated[Path | None, typer.Option(
        help="YAML file of settings; options given on the command line win.")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the run in this folder from its last checkpoint.")] = None,
    format: Format = None, group_regex: GroupRegex = None, strict: Strict = False,
    max_pixels: MaxPixels = None,
    quiet: Quiet = False,
) -> None:
    """Train a classifier: a new head on a frozen pretrained backbone, then fine-tuning.

    Writes runs/NAME with config.yaml, history.csv, metrics.json, checkpoints and the
    model bundle (runs/NAME/model).
    """
    from wingspan.models.weights import check_weights
    from wingspan.training import run as training

    if resume:  # only where it runs may change
        with _same_on_every_rank():
            given = {k: v for k, v in ctx.params.items()
                     if ctx.get_parameter_source(k).name == "COMMANDLINE"}
            ignored = sorted(set(given) - {"resume", "quiet", *training.MACHINE_SETTINGS})
            if ignored:  # refused, not dropped: the user would believe they took effect
                names = ", ".join("DATA" if k == "data" else "--" + k.replace("_", "-")
                                  for k in ignored)
                raise WingspanError(
                    f"--resume continues {resume} with the settings it began with; {names} "
                    "cannot change them.",
                    hint="Leave them out; a resumed run may change only "
                         f"{', '.join('--' + k for k in training.MACHINE_SETTINGS)}. To train "
                         "with other settings, start a new run.")
        machine = {k: v for k, v in given.items() if k in training.MACHINE_SETTINGS}
        run_dir = training.resume(resume, quiet=quiet, **machine)
    else:
        with _same_on_every_rank():
            if data is None:
                raise WingspanError("Give DATA to train on (or --resume RUN).")
            # Only options set on the command line override the config file.
            params = dict(ctx.params)
            if levels:
                params["levels"] = [lv.strip() for lv in levels.split(",") if lv.strip()]
            if holdout_classes is not None:  # "" holds none out (over a config file's)
                params["holdout_classes"] = [c.strip() for c in holdout_classes.split(",")
                                             if c.strip()]
            if level_weights:
                try:
                    params["level_weights"] = [float(w) for w in level_weights.split(",")]
                except ValueError as e:
                    raise WingspanError(f"--level-weights must be numbers: {level_weights}") from e
            given = {k: v for k, v in params.items() if k in TrainConfig.__dataclass_fields__
                     and ctx.get_parameter_source(k).name == "COMMANDLINE"}
            if "level" in given and "levels" in given and given["level"] not in given["levels"]:
                raise WingspanError(
                    f"--level {level} is not one of --levels {levels}.",
                    hint="--levels trains every level named and predicts the finest; --level "
                    "trains one. Give one of them.")
            if "level" in given and "levels" not in given:  # one level: not the file's several
                given.update(levels=None, level_weights=None)
            settings = (_config(ctx, TrainConfig.from_file, config, **given) if config else
                        _config(ctx, TrainConfig, **{k: v for k, v in params.items()
                                                if k in TrainConfig.__dataclass_fields__}))
            check_weights(settings.weights)  # a typo: said now, not after reading the data
        # strict: set here or in the config file (where it also stops training at a
        # broken image), it stops the reading at a missing or unreadable file too.
        dataset = _read(data, format, group_regex, settings.strict)
        run_dir = training.train(dataset, settings, runs_dir, name, quiet)
    if _is_main_process():
        _print_run(run_dir)


def _folding(header: str):
    """A column whose long values (a path, a timm name) fold onto more lines in a narrow
    terminal or a pipe (80 columns), instead of losing their ends to an ellipsis."""
    from rich.table import Column

    return Column(header, overflow="fold")


def _is_main_process() -> bool:
    """False in the ranks above 0 of a distributed run: they print nothing."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _print_run(run_dir: Path) -> None:
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = metrics["best"]
    # The stage lines of the log leave out the engine timing that the totals count in.
    timed = sum(c.get("seconds", 0) for c in (metrics.get("engines") or {}).values()
                if c and c.get("how") == "measured")
    seconds = ", ".join(f"{stage} {s:.1f}" for stage, s in metrics["stage_seconds"].items())
    out.print(f"val macro-F1 {best['val_macro_f1']:.4f}, accuracy {best['val_acc']:.4f} "
              f"({best['stage']} epoch {best['epoch']}); seconds: {seconds}"
              + (f" (timing the engines included: {timed:.1f})" if timed else ""))
    out.print(f"Run: {_q(run_dir)}   model: {_q(run_dir / 'model')}")


@app.command("runs")
def runs_command(
    runs_dir: Annotated[Path, typer.Argument(
        help="The folder `wingspan train` wrote its runs into (its --runs-dir).")]
    = Path(RUNS_DIR),
    sort: Annotated[str | None, typer.Option(
        help="Order by this column (of the CSV: name, status, val_macro_f1, "
        "held_out_macro_f1, train_seconds, seed...); scores best first, the rest ascending "
        "(default: created, oldest first).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        help="Write every column to a .csv or .json file.")] = None,
) -> None:
    """List the runs in RUNS_DIR side by side: status, data, backbone, seed, the val figure
    the best epoch was chosen on and the fair held-out one, training time."""
    from wingspan.run_table import (
        LOCK_UNREADABLE,
        SET_UP,
        STOPPED,
        run_table,
        write_run_table,
    )

    if output:
        _check_output_file(output, (".csv", ".json"))
    frame = run_table(runs_dir, sort)
    if output:
        write_run_table(frame, output)
    if frame.empty:
        out.print(f"No runs in {_q(runs_dir)}.")
    else:
        out.print(_runs_table(frame))
        if (frame["status"] == STOPPED).any():
            out.print(f"A stopped run continues with `wingspan train --resume "
                      f"{_q(runs_dir)}/NAME`.")
        if (frame["status"] == SET_UP).any():
            out.print("A run killed while set up trained nothing: delete its folder.")
        if (frame["status"] == LOCK_UNREADABLE).any():
            out.print("A run whose .lock cannot be read may or may not be training now: "
                      "ask its owner (or for read access to its .lock).")
    if output:
        out.print(f"Wrote {_q(output)}")


# `wingspan runs`' columns: header, the cell of a row, and whether it is shown in a narrow
# terminal (80 columns, or a pipe) too, where the others would squeeze every cell to "0.…".
_RUN_COLUMNS = [
    ("run", lambda r: r["name"], True),
    ("status", lambda r: _status_cell(r), True),
    ("data", lambda r: _here(r["data"]) if _given(r["data"]) else "", False),
    ("backbone", lambda r: _cell(r["backbone"]), True),
    ("levels", lambda r: _cell(r["levels"]), False),
    ("size", lambda r: _cell(r["image_size"]), False),
    ("seed", lambda r: _cell(r["seed"]), True),
    ("selection", lambda r: _cell(r["selection"]), False),
    ("val F1", lambda r: _cell(r["val_macro_f1"]), True),
    ("held-out F1", lambda r: _held_out(r), True),
    ("best", lambda r: f"{r['best_stage']} {r['best_epoch']}" if _given(r["best_stage"])
     else "", True),
    ("seconds", lambda r: f"{r['train_seconds']:.1f}" if _given(r["train_seconds"]) else "",
     False),
    ("created", lambda r: str(r["created"])[:16], False),
]


def _runs_table(frame):
    from rich import box
    from rich.table import Table

    from wingspan.run_table import (
        ADAPTED,
        DONE,
        LOCK_UNREADABLE,
        SET_UP,
        STOPPED,
        TRAINING,
    )

    wide = out.width >= 150
    shown = [c for c in _RUN_COLUMNS if wide or c[2]]
    table = Table(*(_folding(header) for header, _, _ in shown), box=box.SIMPLE_HEAD)
    colours = {DONE: "green", ADAPTED: "green", TRAINING: "cyan", STOPPED: "yellow",
               SET_UP: "yellow", LOCK_UNREADABLE: "yellow"}  # and red: damaged
    for r in frame.to_dict("records"):
        cells = [_q(cell(r)) for _, cell, _ in shown]
        cells[1] = f"[{colours.get(r['status'], 'red')}]{cells[1]}[/]"
        table.add_row(*cells)
    table.caption = ("val F1: the macro-F1 the best epoch was chosen on (optimistic); "
                     "held-out F1: on the split nothing was chosen on, once `wingspan "
                     "evaluate RUN` has scored it"
                     + ("" if wide else "; data, size, selection, seconds and created in a "
                        "wider terminal or with --output"))
    return table


def _given(value) -> bool:
    import pandas as pd

    return value is not None and not pd.isna(value)


def _cell(value) -> str:
    if not _given(value):
        return ""
    return f"{value:.4f}" if isinstance(value, float) and not value.is_integer() else str(value)


def _status_cell(row: dict) -> str:
    from wingspan.run_table import status_text

    return status_text(row["status"], row["detail"] if _given(row["detail"]) else None)


def _held_out(row: dict) -> str:
    from wingspan.run_table import ADAPTED, DONE

    if _given(row["held_out_macro_f1"]):
        return f"{row['held_out_macro_f1']:.4f}"
    if row["status"] not in (DONE, ADAPTED):
        return ""
    return "not evaluated" if _given(row["held_out_split"]) else "none kept"


Model = Annotated[Path, typer.Argument(help="A run folder (runs/NAME) or a model bundle.",
                                        show_default=False)]


@app.command("evaluate")
def evaluate_command(
    model: Model,
    data: Annotated[Path | None, typer.Argument(
        help="Data to evaluate on (default: the run's own split).", show_default=False)] = None,
    split: Annotated[str | None, typer.Option(
        help="train | val | test | all (default: test, else val).")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Output folder (default: RUN/evaluation-SPLIT; other DATA: "
        "RUN/evaluation-NAME-SPLIT; then -unknown with --unknown, -SCORE with another "
        "--unknown-score than the model's, -tta with --tta).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = T.batch_size,
    device: DeviceOpt = T.device,
    precision: Precision = T.precision,
    runtime: Runtime = T.runtime,
    workers: Workers = None,
    max_pixels: MaxPixels = None,
    class_map: Annotated[list[str] | None, typer.Option(
        "--map", help="MODEL_CLASS=DATA_CLASS (repeat, or separate with commas): evaluate on "
        "data that names classes differently; the report shows each class's drop.")] = None,
    unknown: Annotated[Path | None, typer.Option(
        help="A folder of images of classes the model never saw: how well it answers "
        "\"unknown\" (AUROC, FPR at 95% TPR, the cost to known classes).",
        show_default=False)] = None,
    unknown_score: UnknownScoreOpt = None,
    tta: Annotated[bool, typer.Option(help="Test-time augmentation: average flips and crops, "
                                      "as predict --tta.")] = False,
    plots: Annotated[bool, typer.Option(help="Draw the plots (PNGs, and in the report). "
                                        "--no-plots: the metrics and tables alone, seconds "
                                        "sooner for a small evaluation.")] = True,
    quiet: Quiet = False,
) -> None:
    """Metrics, confusion matrix, curves, mistakes, calibration and an HTML report. The
    model is not changed (see `wingspan calibrate`)."""
    from wingspan.evaluate.run import evaluate

    result = evaluate(model, data, split, out_dir, progress=not quiet,
                      batch_size=batch_size, workers=workers, runtime=runtime,
                      precision=precision, device=device,
                      class_map=name_pairs(class_map or [], "--map"), unknown=unknown,
                      unknown_score=unknown_score, tta=tta, plots=plots)
    _print_evaluation(result)


def _print_unknown(u: dict) -> None:
    from rich.table import Table

    from wingspan.evaluate.run import at_threshold

    table = Table("score", "AUROC", "FPR at 95% TPR", title=f"Unknown images: "
                  f"{u['unseen_images']} of unseen classes against the known ones")
    for name, v in u["scores"].items():
        mark = " (in use)" if name == u["score"] else ""
        table.add_row(name + mark, f"{v['auroc']:.4f}", f"{v['fpr95']:.4f}")
    out.print(table)
    out.print(at_threshold(u))
    if u.get("unreadable"):  # not scored: the figures above are of the rest
        out.print(f"[yellow]{len(u['unreadable'])} of the --unknown images could not be read[/]"
                  f" and were not scored, e.g. {_q(u['unreadable'][0][0])}: "
                  f"{escape(u['unreadable'][0][1])} (all in metrics.json)")


@app.command("calibrate")
def calibrate_command(
    model: Model,
    data: Annotated[Path | None, typer.Argument(
        help="Labelled data to fit on (default: the run's own).", show_default=False)] = None,
    split: Annotated[str | None, typer.Option(
        help="train | val | test | all (default: val; all of DATA when it has no split).",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = T.batch_size,
    device: DeviceOpt = T.device,
    workers: Workers = None,
    max_pixels: MaxPixels = None,
    class_map: Annotated[list[str] | None, typer.Option(
        "--map", help="MODEL_CLASS=DATA_CLASS (repeat, or separate with commas): fit on data "
        "that names classes differently, as evaluate's --map.")] = None,
    unknown: Annotated[bool, typer.Option(
        "--unknown", help="Instead: fit the unknown scores again on the run's own train and "
        "val images (e.g. with another --unknown-rate or --unknown-score).")] = False,
    unknown_rate: Annotated[float | None, typer.Option(
        help="With --unknown: the share of known val images it may turn away (default: "
        "the model's own).",
        show_default=False)] = None,
    unknown_score: UnknownScoreOpt = None,
    quiet: Quiet = False,
) -> None:
    """Fit the model's temperature again (training fits it on its val split) and store it
    in the bundle, e.g. on labelled photos from where the model will be used; or, with
    --unknown, its unknown scores and thresholds."""
    from wingspan.evaluate.calibration import calibrate_warnings
    from wingspan.evaluate.run import calibrate, fit_unknown

    if unknown:
        if data is not None or split is not None or class_map:
            raise WingspanError("calibrate --unknown fits the unknown scores on the run's own "
                                "train and val images: it takes no DATA, --split or --map.",
                                hint="Leave DATA, --split and --map out (without --unknown "
                                     "they choose what the temperature is fitted on).")
        u = fit_unknown(model, unknown_rate, unknown_score, progress=not quiet,
                        batch_size=batch_size, workers=workers, device=device)
        out.print(f"Unknown scores fitted on {u['train_images']} training images; thresholds "
                  f"set on {u['val_images']} val images to turn away {u['rate']:.0%} of known "
                  f"ones; default score '{u['score']}'")
        return
    if unknown_rate is not None or unknown_score is not None:
        raise WingspanError("--unknown-rate and --unknown-score set the unknown answer, which "
                            "`calibrate` fits again only with --unknown.",
                            hint="Add --unknown (the temperature is then left as it is).")
    c = calibrate(model, data, split, progress=not quiet, batch_size=batch_size,
                  workers=workers, device=device, class_map=name_pairs(class_map or [], "--map"))
    out.print(f"Temperature {c['previous_temperature']:.3f} -> {c['temperature']:.3f}, fitted "
              f"on {counted(c['images'], 'image')} ({_q(c['fitted_on'])}); ECE "
              f"{c['val_ece_previous']:.4f} -> {c['val_ece_after']:.4f} "
              f"({c['val_ece_before']:.4f} without a temperature)"
              + (f"; by the {c['method']}" if c["method"] != "likelihood" else ""))
    for note in calibrate_warnings(c):
        out.print(f"[yellow]Warning:[/] {escape(note)}")


A = AdaptConfig


@app.command("adapt")
def adapt_command(
    ctx: typer.Context,
    model: Model,
    photos: Annotated[list[str], typer.Argument(
        help="Unlabelled photos from where the model will be used: files, folders, globs.",
        show_default=False)],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="The adapted run's folder (default: RUN-adapted).",
        show_default=False)] = None,
    neighbours: Annotated[int, typer.Option(
        help="Neighbours per image in the graph that label spreading passes classes over."
    )] = A.neighbours,
    confidence: Annotated[float, typer.Option(
        help="The head's calibrated probability (as predict shows it) a photo also needs "
        "to be trained on (0: the head and its neighbours agreeing is enough).")] = A.confidence,
    rounds: Annotated[int, typer.Option(
        help="Refits, the head's class taken afresh from each.")] = A.rounds,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = A.batch_size,
    device: DeviceOpt = A.device,
    workers: Workers = None,
    max_pixels: MaxPixels = None,
    quiet: Quiet = False,
) -> None:
    """Fit a trained model to unlabelled photos of the place it will be used (e.g. a model
    trained on web or museum images, for garden photos): its head learns from the photos
    whose class it and their nearest neighbours agree on (self-training). Writes a new run;
    the run itself stays as it is."""
    from wingspan.training.adapt import adapt

    config = _config(ctx, AdaptConfig, neighbours=neighbours, confidence=confidence, rounds=rounds,
                     batch_size=batch_size, device=device)
    a = adapt(model, photos, out_dir, config, progress=not quiet, workers=workers)
    used = list(a["photos_used_per_round"].values())[-1]  # the finest level's
    fits = f" in {len(used)} refits" if len(used) > 1 else ""
    out.print(f"{counted(a['photos'], 'photo')} ({a['unreadable']} unreadable); trained on "
              f"{' / '.join(map(str, used))} of them{fits}; the answer "
              f"changed for {a['changed']:.1%}")
    out.print("Photos per class before -> after: " + ", ".join(
        f"{_q(c)} {n} -> {a['classes_after'][c]}" for c, n in a["classes_before"].items()))
    out.print(f"On the run's own val images: accuracy {a['val_accuracy_before']:.4f} -> "
              f"{a['val_accuracy']:.4f}, temperature {a['temperature']:.3f}")
    if not any(used):
        bar = f" at p >= {confidence}" if confidence else ""
        out.print(f"[yellow]No photo's class was agreed on by the head and its neighbours"
                  f"{bar}:[/] the head stays as trained. Give photos of the species the "
                  "model knows" + (", or a lower --confidence." if confidence else "."))
    if a["val_images_among_photos"]:
        out.print(f"[yellow]{a['val_images_among_photos']} of the photos are the run's own val "
                  "images[/]: the val accuracy, temperature and unknown thresholds above are "
                  "fitted or scored on images the head has now trained on.")
    if a["test_images_among_photos"]:
        out.print(f"[yellow]{a['test_images_among_photos']} of the photos are the run's own test "
                  "images[/]: its test figures are no longer fair (evaluate says so).")
    for level, missing in a["classes_without_training_images"].items():
        out.print(f"[yellow]{len(missing)} '{_q(level)}' classes had no readable training "
                  f"image[/] and keep the run's own weights: {_q(', '.join(missing[:5]))}")
    out.print(("Replaced the earlier adapted run: " if a["replaced"] else "Adapted run: ")
              + f"{_q(_here(a['out']))}   (evaluate it like any run; its labels were never "
              "seen, so only labelled photos from there can say how much it gained)")


def _print_evaluation(result) -> None:
    from rich.table import Table

    from wingspan.evaluate.metrics import summary_rows
    from wingspan.evaluate.run import answer_rows, left_out_wording, unreadable_wording

    m = result.metrics
    table = Table("metric", "value", title=f"{m['split']} split, level '{_q(m['level'])}': "
                  + counted(m["images"], "image")
                  + (", test-time augmentation" if m.get("tta") else ""))
    for label, value in summary_rows(m):
        table.add_row(label, value)
    table.add_row("ECE (temperature)", f"{m['ece_uncalibrated']:.4f} -> {m['ece']:.4f} "
                  f"(T = {m['temperature']:.2f})")
    worse = m["ece"] > m["ece_uncalibrated"] + 0.01
    # The metrics above name a class for every image; the answer may not.
    for label, value in answer_rows(m.get("answers")):
        table.add_row(label, value)
    out.print(table)
    if m.get("fair", "").startswith("no"):  # evaluated on images trained or chosen on
        out.print(f"[yellow]Are these figures fair?[/] {escape(m['fair'])}.")
    if m.get("tta_note"):
        out.print(f"Test-time augmentation: {escape(m['tta_note'])}.")
    if worse:  # fitted on the run's own val, the temperature may not carry to other photos
        out.print("[yellow]The temperature makes these probabilities less calibrated (ECE "
                  f"{m['ece_uncalibrated']:.3f} -> {m['ece']:.3f}).[/] `wingspan calibrate RUN "
                  "DATA` fits one on labelled photos like these"
                  + (", named as the model names its classes" if m.get("transfer") else "")
                  + ("; it fits on single views, so compare without --tta."
                     if m.get("tta_note") else "."))
    if said := unreadable_wording(m):
        out.print(f"[yellow]{_q(said)}.[/]")
    if said := left_out_wording(m, _some(m.get("unknown_classes", [])),
                                "--map MODEL_CLASS=DATA_CLASS"):
        out.print(f"[yellow]{_q(said)}[/]")
    if m.get("absent_classes"):
        absent = len(m["absent_classes"])
        out.print(f"{counted(absent, 'class', 'classes')} of the model's "
                  f"{'has' if absent == 1 else 'have'} no images here and "
                  f"{'is' if absent == 1 else 'are'} left out of "
                  "the per-class table and the macro averages: "
                  f"{_q(_some(m['absent_classes']))}")
    if m.get("transfer"):
        named = "named here" in m["transfer"][0]
        transfer = Table("model class", "data class", "recall on own data", "recall here",
                         "drop", "images here", *(["named here"] if named else []),
                         title="Transfer per class")
        def figure(value, spec: str) -> str:  # none: no images to measure it on
            return "-" if value is None or value != value else format(value, spec)

        for r in m["transfer"]:
            transfer.add_row(_q(r["model class"]), _q(r["data class"]),
                             *(figure(r[k], ".3f") for k in ("recall on own data",
                                                              "recall here", "drop")),
                             str(r["images here"]),
                             *([figure(r["named here"], ".1%")] if named else []))
        out.print(transfer)
    if m.get("unknown"):
        _print_unknown(m["unknown"])
    if m.get("hierarchy"):
        h = m["hierarchy"]
        levels = Table("method", *map(_q, h["levels"]), title="Micro-F1 per level")
        levels.add_row("marginalisation (consistent)",
                       *[f"{v['micro_f1']:.3f}" for v in h["levels"].values()])
        if "heads" in next(iter(h["levels"].values())):
            levels.add_row("per-level heads",
                           *[f"{v['heads']['micro_f1']:.3f}" for v in h["levels"].values()])
        out.print(levels)
        for lv, v in h["levels"].items():
            if n := v.get("no_truth"):
                out.print(f"[yellow]{counted(n, 'image')} with no {_q(lv)} the model knows "
                          f"(blank, or a name its tree lacks) {'is' if n == 1 else 'are'} "
                          f"left out of the {_q(lv)} figures.[/]")
        heads = h["consistency"]["heads"]
        out.print(f"Consistent predictions: {h['consistency']['marginalised']:.1%} marginalised"
                  + (f", {heads:.1%} from the per-level heads" if heads is not None else "")
                  + f"; mean mistake depth {h['mean_mistake_depth']:.2f}")
    if m["unreadable"]:
        out.print(f"[yellow]{counted(len(m['unreadable']), 'image')} could not be read[/] "
                  "(in metrics.json)")
    out.print(f"Report: {_q(result.report)}")


@app.command("predict")
def predict_command(
    model: Model,
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (searched "
                                               "recursively) or globs.", show_default=False)],
    top_k: Annotated[int, typer.Option(min=1, help="Classes to show per image.")] = 3,
    output: Annotated[Path | None, typer.Option(
        help="Write all predictions to a .csv or .json file.")] = None,
    tta: Annotated[bool, typer.Option(help="Test-time augmentation: average flips and "
                                      "crops.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = T.batch_size,
    device: DeviceOpt = T.device,
    devices: Devices = None,
    nodes: Nodes = None,
    strategy: Strategy = T.strategy,
    precision: Precision = T.precision,
    runtime: Runtime = T.runtime,
    workers: Workers = None,
    max_pixels: MaxPixels = None,
    unknown_score: UnknownScoreOpt = None,
    quiet: Quiet = False,
) -> None:
    """Predict the classes of images, with calibrated probabilities; an image unlike
    every class the model knows is answered "unknown" (its closest class stays in the
    output). With --devices N (or under torchrun) the images are shared among the
    processes; one merged, ordered output."""
    from rich.table import Table

    from wingspan.inference import Predictor
    from wingspan.predict import predict, predict_fabric, write_predictions

    if output:
        _check_output_file(output, (".csv", ".json"))
    fabric = predict_fabric(device, devices, nodes, strategy, workers)
    main = fabric is None or fabric.is_global_zero
    quiet = quiet or not main
    predictor = Predictor(model, device=device, batch_size=batch_size, workers=workers,
                          runtime=runtime, precision=precision, progress=not quiet,
                          fabric=fabric, unknown_score=unknown_score)
    if not quiet:
        err.print(f"Engine: {predictor.policy.describe()}"
                  + (f"; {fabric.world_size} processes" if fabric else ""), highlight=False)
    result = predict(predictor, paths, top_k, tta, progress=not quiet, fabric=fabric)
    if not main:
        return
    hierarchical = predictor.taxonomy is not None
    # The classes after the prediction: --top-k 3 shows the next 2, and --top-k 10 of a
    # 3-class model the next 2 as well; the header says what is shown (with --top-k 1, an
    # unknown answer's closest class alone).
    k = min(top_k, len(predictor.classes))
    table = Table(_folding("image"), "prediction", "probability",
                  "taxonomy (probability per level)" if hierarchical else
                  f"next {k - 1}" if k > 1 else "")
    for row in result.rows[:50]:
        (best, p), rest = row["top"][0], row["top"][1:]
        if hierarchical:  # the consistent branch is the prediction
            _, best, p = row["taxonomy"][-1]
            detail = " > ".join(f"{c} {q:.2f}" for _, c, q in row["taxonomy"])
        else:
            detail = ", ".join(f"{c} {q:.2f}" for c, q in rest)
        if row["answer"] != best:  # unknown here, or known only at a coarser level
            level = f" ({_q(row['known_level'])})" if row["known_level"] else ""
            at = f" at {row['score_level']}" if hierarchical else ""
            if row["known_level"]:  # the probability of the class answered, at its level
                p = next(q for lv, _, q in row["taxonomy"] if lv == row["known_level"])
            score, limit = _apart(row["unknown_score"], row["threshold"])
            detail = f"closest: {best}; unknown score {score} > {limit}{at}; " + detail
            best = f"[yellow]{_q(row['answer'])}[/]{level}"
        else:
            best = _q(best)
        table.add_row(_q(row["path"]), best, f"{p:.3f}", _q(detail))
    if len(result.rows) > 50:
        table.caption = f"first 50 of {len(result.rows)}; " + (
            f"all in {_q(output)}" if output else "--output FILE writes all")
    if output:  # first: nothing printed after can lose it
        write_predictions(result, output)
    if result.rows:  # not an empty table above the skipped files
        out.print(table)
    for path, reason in result.failed:
        err.print(f"[yellow]skipped[/] {_q(path)}: {_q(reason)}", highlight=False)
    out.print(f"{counted(len(result.rows), 'image')} predicted at "
              f"{result.images_per_second:.1f} images/s"
              + (f"; {len(result.failed)} skipped" if result.failed else ""))
    if output:
        out.print(f"Wrote {_q(output)}")
    # (by the level known, not the answer's text: a class may be named "unknown")
    unknown = sum(r["known_level"] is None for r in result.rows)
    coarser = sum(r.get("known_level") not in (None, predictor.level) for r in result.rows)
    if unknown or coarser:
        out.print(f"{counted(unknown, 'image is', 'images are')} unlike the classes the "
                  "model knows"
                  + (f", {coarser} known at a coarser level only" if coarser else "")
                  + f" (unknown score '{predictor.unknown_score}' above the threshold that "
                  f"turns away {predictor.unknown.rate:.0%} of known val images)")
    if not result.rows:
        raise WingspanError("No image could be predicted.", hint="Check the paths given.")


@app.command("explain")
def explain_command(
    model: Model,
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.",
                                                show_default=False)],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Folder for the overlays (default: RUN/explain).")] = None,
    device: DeviceOpt = T.device,
) -> None:
    """Grad-CAM overlays: where the model looked for the class it predicted, one PNG per
    image."""
    from wingspan.explain import explain
    from wingspan.inference import find_bundle, output_home
    from wingspan.predict import expand_paths

    paths, missing = expand_paths(images)
    for item, why in missing:
        err.print(f"[yellow]skipped[/] {_q(item)}: {_q(why)}", highlight=False)
    if not paths:
        raise WingspanError("No image to explain.", hint="Check the paths given.")
    out_dir = out_dir or output_home(find_bundle(model)) / "explain"
    explained = 0
    for e in explain(model, paths, out_dir, device=device):
        if e.error:
            err.print(f"[yellow]skipped[/] {_q(e.path)}: {_q(e.error)}", highlight=False)
        else:
            explained += 1
            said = "" if e.answer == e.label else f" (answer: {e.answer})"
            out.print(f"{_q(e.path)}: {_q(e.label)} {e.probability:.3f}{_q(said)} -> {_q(e.png)}",
                      highlight=False)
    if not explained:
        raise WingspanError("No image could be explained.", hint="Check the files given.")


@app.command("serve")
def serve_command(
    ctx: typer.Context,
    model: Model,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine "
                                      "only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8000,
    device: DeviceOpt = T.device,
    top_k: Annotated[int, typer.Option(help="Classes per level in an answer.")] = S.top_k,
    max_upload_mb: Annotated[float, typer.Option(
        min=0.001, help="Largest file taken (413 above).")] = S.max_bytes / 2**20,
    max_files: Annotated[int, typer.Option(
        help="Most images in one request (413 above).")] = S.max_files,
    max_in_flight: Annotated[int, typer.Option(
        min=1, help="Most requests served at once (429 above).")] = S.max_in_flight,
    timeout: Annotated[float, typer.Option(
        min=0.001, help="Seconds a request may take (504 after).")] = S.timeout_s,
) -> None:
    """A web page (drop a photo: its classes and where the model looked) and an HTTP API:
    POST /predict with image files, POST /explain with one; /health, /model, /docs."""
    from wingspan.serve import serve

    limits = _config(ctx, ServeLimits, top_k=top_k, max_bytes=round(max_upload_mb * 2**20),
                     max_files=max_files, max_in_flight=max_in_flight, timeout_s=timeout)
    serve(model, host=host, port=port, device=device, limits=limits)


@app.command("export")
def export_command(
    model: Model,
    format: Annotated[str, typer.Option("--format", help="onnx | torchscript.")] = "onnx",
    quantize: Annotated[str | None, typer.Option(
        help="int8 (ONNX): static quantisation calibrated on training images, written only "
        "when its val top-1 stays within 1 point of fp32's.")] = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="The model file (ending in .onnx, or .pt for TorchScript), or "
        "else a folder to write it in (default: RUN/export/model.onnx, model.int8.onnx with "
        "--quantize int8, model.pt for TorchScript); its metadata goes beside it as "
        "FILE.json.")] = None,
    unknown_score: UnknownScoreOpt = None,
) -> None:
    """A model that runs without wingspan (ONNX Runtime alone): RGB pixels in, calibrated
    probabilities per level out, and each level's unknown score with its threshold in the
    metadata; checked against PyTorch before it is written."""
    import json

    from wingspan.export import export_model, metadata_path

    path = export_model(model, out_path, format, quantize=quantize, unknown_score=unknown_score)
    meta = json.loads(metadata_path(path).read_text())
    check = meta["checked"]
    unknown = meta.get("unknown")
    out.print(f"Wrote {_q(path)} and {_q(metadata_path(path))}: input uint8 RGB "
              f"(N, {meta['input']['size']}, {meta['input']['size']}, 3); agrees with PyTorch "
              f"within {check['max_abs_probability_difference']:.1e} on {check['images']} "
              + ("generated pictures (the run's val images were not found)."
                 if check.get("generated") else "images.")
              + (f" int8 val top-1 {meta['int8']['val_top1_int8']:.4f} (fp32 "
                           f"{meta['int8']['val_top1_fp32']:.4f})" if "int8" in meta else ""))
    int8 = meta.get("int8", {})
    own = ("; the int8 model's own, set again on its val scores (fp32's would turn away "
           f"{int8['val_unknown_share_int8']:.1%} of known val images, not "
           f"{unknown['rate']:.0%})" if "unknown_thresholds_fp32" in int8 else "")
    out.print(f"Unknown score '{unknown['score']}' in the outputs "
              f"{', '.join(unknown['outputs'].values())}, thresholds in the metadata{own}."
              if unknown else "No unknown score (the model has none): it always names a class."
              " `wingspan calibrate RUN --unknown` fits them.")


@models_app.command("list")
def models_list() -> None:
    """Show the registered backbones and whether ImageNet weights are available offline here.

    Any other timm model name can be passed to --backbone too.
    """
    from rich.table import Table

    from wingspan.models import BACKBONES
    from wingspan.models.weights import find_offline

    table = Table("backbone", _folding("timm model"), "input", "unfreeze", "offline weights",
                  title="Backbones")
    for name, spec in BACKBONES.items():
        source = find_offline(spec)
        table.add_row(name, spec.timm_name, str(_input_size(spec.timm_name)), str(spec.unfreeze),
                      f"[green]yes ({source})[/]" if source else "[yellow]no[/]")
        if not source:  # said for the backbones that lack them, not for every table
            table.caption = ("A backbone without offline weights: pass --weights PATH, or "
                             "run once with a network (the download is cached).")
    out.print(table)


def _input_size(timm_name: str) -> int:
    import timm

    return timm.models.get_pretrained_cfg(timm_name).input_size[-1]


@app.command("doctor")
def doctor_command(
    backbone: Annotated[str, typer.Option(help="The backbone to time the engines on.")]
    = T.backbone,
    image_size: Annotated[int | None, typer.Option(
        min=16, help="Input size (default: the backbone's).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size the runs will use.")]
    = T.batch_size,
    device: DeviceOpt = T.device,
    precision: Precision = T.precision,
    runtime: Runtime = T.runtime,
    train_step: Annotated[bool, typer.Option(
        "--train-step/--no-train-step", help="Also time the fine-tuning step.")] = True,
) -> None:
    """Show this machine, what every engine measures on it for a backbone, what `auto`
    picks (and stores for later runs), and which ImageNet weights are here offline.

    Run it first when something is slow. It measures afresh and updates the cached choice.
    """
    from rich.table import Table

    from wingspan.doctor import diagnose

    with err.status(f"Timing every engine on {backbone}..."):
        d = diagnose(backbone, image_size, batch_size, device, precision, runtime, train_step)
    m = d.machine
    table = Table(show_header=False, title="Machine", title_justify="left", box=None)
    table.add_row("CPU", f"{m['cpu']}, {m['cores']} cores; torch uses {m['torch_threads']} "
                  "threads")
    table.add_row("ISA", f"{m['isa']} (torch kernels: {m['torch_isa']})")
    table.add_row("bf16 on the CPU", "native" if m["cpu_bf16"] else
                  "emulated (no AMX / AVX-512 bf16): not a candidate unless forced")
    table.add_row("CUDA", ", ".join(m["cuda"]) or "no GPU")
    table.add_row("versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items())
                  + f", python {m['python']}")
    out.print(table)
    policy = d.policy
    for title, choice, engines, left_out in (
            ("Frozen passes (feature cache, validation, evaluate, predict)", policy.frozen,
             policy.frozen_candidates, policy.left_out),
            ("Training step (fine-tuning the default stages)", policy.train,
             policy.train_candidates, policy.train_left_out)):
        if choice is None:
            continue
        t = Table("engine", "images/s", "vs torch-fp32", "images changed", "",
                  title=f"{title}: {d.backbone} at {d.size} px, batch {d.batch_size}",
                  title_justify="left")
        fp32 = choice.images_per_s.get("torch-fp32")
        for e in engines:
            speed = choice.images_per_s.get(e.name)
            status = ("[green]picked[/]" if e == choice.engine else
                      f"[yellow]rejected: {choice.rejected[e.name]}[/]"
                      if e.name in choice.rejected else "")
            change = choice.changed.get(e.name)
            t.add_row(e.name, f"{speed:.1f}" if speed else "-",
                      f"{speed / fp32:.2f}x" if speed and fp32 else "-",
                      f"{change:.0%}" if change is not None else "-", status)
        for name, why in left_out.items():
            t.add_row(f"[dim]{name}[/]", "-", "-", "-", f"[dim]not a candidate: {why}[/]")
        out.print(t)
    out.print(f"Picked: {policy.describe()}")
    out.print(f"Kept in {_q(d.cache)}: runs of {d.backbone} at {d.size} px, batch {d.batch_size} "
              "on this machine use it without timing again. Timed with weights: "
              f"{d.weights}.")
    weights = Table("backbone", "ImageNet weights offline", title="Offline weights",
                    title_justify="left")
    for name, source in d.offline_weights.items():
        weights.add_row(name, f"[green]{source}[/]" if source else "[yellow]no[/] (--weights "
                        "PATH, or one run with a network)")
    out.print(weights)


@app.command("demo")
def demo(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the demo writes everything.")]
    = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Random seed of the generated data.")]
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
    from wingspan.data.split import split_and_sample
    from wingspan.training import run as training

    config = _config(ctx, DemoConfig, seed=seed, image_size=image_size,
                     epochs_finetune=epochs_finetune)
    # The demo replaces its own folders (data, train, ...) on a second run, so it writes
    # only into a new or empty folder, or one it made itself (its settings file, written
    # first, marks it: a killed demo runs again in the same place).
    marker = out_dir / "demo_config.json"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not marker.is_file():
        raise WingspanError(f"{out_dir} holds files that the demo did not write, and the demo "
                            "would replace its data/ and train/ folders.",
                            hint="Give a new or empty folder: --out runs/demo.")
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(to_dict(config), indent=2))
    data_dir = generate_demo(out_dir / "data", config)
    out.rule("1. demo data")
    out.print(f"Generated {counted(sum(config.images_per_class), 'image')} of "
              f"{len(config.images_per_class)} species in {_q(data_dir)}")
    dataset = read_dataset(data_dir)
    out.rule("2. inspect")
    summary = inspect_dataset(dataset, out_dir / "inspect", progress=not quiet)
    print_summary(summary, out)
    out.rule("3. split")
    split = split_and_sample(dataset, out_dir, None, SplitConfig(seed=seed))
    _print_split(split)
    out.rule("4. augmentation preview")
    preview = write_preview(dataset, out_dir / "preview.png", seed=seed)
    out.print(f"Wrote {_q(preview)}")
    out.rule("5. train")
    shutil.rmtree(out_dir / "train", ignore_errors=True)  # the demo owns its folder
    settings = TrainConfig(backbone=config.backbone, image_size=config.image_size,
                           epochs_head=config.epochs_head, epochs_finetune=config.epochs_finetune,
                           feature_views=config.feature_views, seed=seed)
    run_dir = training.train(read_dataset(split.splits_csv), settings, out_dir, "train", quiet)
    _print_run(run_dir)
    out.rule("6. evaluate on the test split")
    from wingspan.evaluate.run import evaluate

    evaluation = evaluate(run_dir, progress=not quiet)
    _print_evaluation(evaluation)
    out.rule("outputs")
    for name, path in [("data", data_dir), ("summary", out_dir / "inspect" / "summary.json"),
                       ("balance plots", out_dir / "inspect"), ("splits", split.splits_csv),
                       ("preview", preview), ("training run", run_dir),
                       ("model bundle", run_dir / "model"), ("report", evaluation.report)]:
        out.print(f"  {name:14s} {_q(path)}")


def _rank() -> int:
    """This process's rank: the process group's, or before it exists the launcher's
    (torchrun sets RANK in every process it starts)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def _same_on_every_rank():
    """Errors in the options themselves: under torchrun every process finds the same one
    before training starts, and rank 0 alone says it (not once per process)."""
    try:
        yield
    except WingspanError as e:
        e.every_rank = True
        raise


def _one_line_summaries(*apps: typer.Typer) -> None:
    """`wingspan --help` lists each command by its docstring's first paragraph, which in
    rich mode would keep the source's line breaks mid-sentence: join them."""
    import inspect

    for each in apps:
        for info in each.registered_commands:
            if info.short_help is None and info.callback is not None:
                first = (inspect.getdoc(info.callback) or "").split("\n\n")[0]
                info.short_help = " ".join(first.split())


_one_line_summaries(app, data_app, models_app)


def _home_expanded(argv: list[str]) -> list[str]:
    """A quoted "~/runs" (or --out=~/runs), which the shell passes as it is, is the user's
    home as every other tool reads it: never a folder named "~" made in the current one
    (which a user may later clean up with `rm -rf ~`)."""
    expanded = []
    for arg in argv:
        option, eq, value = arg.partition("=")
        if arg.startswith("~"):
            arg = os.path.expanduser(arg)
        elif arg.startswith("--") and eq and value.startswith("~"):
            arg = f"{option}={os.path.expanduser(value)}"
        expanded.append(arg)
    return expanded


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; user errors print as a message and a hint, exit code 2."""
    try:
        app(args=_home_expanded(sys.argv[1:] if argv is None else list(argv)),
            prog_name="wingspan")
    except WingspanError as e:
        if e.every_rank and _rank() != 0:  # rank 0 says it once for all
            sys.exit(2)
        err.print(f"[bold red]Error:[/] {_q(e.message)}", highlight=False)
        if e.hint:
            err.print(f"[cyan]Hint:[/] {_q(e.hint)}", highlight=False)
        sys.exit(2)
    except (FileExistsError, NotADirectoryError) as e:  # a file named where a folder goes
        from wingspan.files import not_a_folder

        err.print(f"[bold red]Error:[/] {_q(not_a_folder(e.filename or '?').message)}",
                  highlight=False)
        err.print("[cyan]Hint:[/] Name another folder, or move the file.", highlight=False)
        sys.exit(2)
    except PermissionError as e:  # a folder or file this user may not read or write
        err.print(f"[bold red]Error:[/] Permission denied: {_q(e.filename or str(e))}.",
                  highlight=False)
        err.print("[cyan]Hint:[/] Check its permissions (ls -l), or name a file or folder "
                  "you may use.", highlight=False)
        sys.exit(2)
    except OSError as e:
        if e.errno == errno.EROFS:
            err.print(f"[bold red]Error:[/] {_q(e.filename or str(e))} is on a read-only file "
                      "system.", highlight=False)
            err.print("[cyan]Hint:[/] Write elsewhere (--runs-dir or --out), or mount it "
                      "writable.", highlight=False)
            sys.exit(2)
        if e.errno != errno.ENOSPC:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        err.print(f"[bold red]Error:[/] The disk is full{where}.", highlight=False)
        err.print("[cyan]Hint:[/] Free some space and run the command again (a training run "
                  "continues with --resume).", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
