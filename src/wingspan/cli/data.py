"""`wingspan data ...`: inspect, split, audit, download and preview a dataset."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from wingspan.cli.app import data_app
from wingspan.cli.common import (
    err,
    folded_table,
    here,
    make_config,
    out,
    plain,
    read_data,
    stopped_said,
)
from wingspan.cli.options import (
    Data,
    DeviceOpt,
    Format,
    GroupRegex,
    Level,
    MaxPixels,
    OutDir,
    Panel,
    Quiet,
    SplitStrict,
    Strict,
    Weights,
)
from wingspan.config import (
    AUGMENT_POLICIES,
    PREVIEW_ROWS,
    PREVIEW_VIEWS,
    AuditConfig,
    AugmentConfig,
    InspectConfig,
    SplitConfig,
    TrainConfig,
)
from wingspan.errors import WingspanError, command, counted, rounded, some


@data_app.command("inspect")
def data_inspect(
    ctx: typer.Context,
    data: Data, level: Level = None, format: Format = None, group_regex: GroupRegex = None,
    strict: Strict = False, out_dir: OutDir = None,
    metadata_only: Annotated[bool, typer.Option(
        "--metadata-only", help="Read labels only; do not open images (e.g. ETHEC split files "
        "without the images).", rich_help_panel=Panel.DATA)] = False,
    tiny_px: Annotated[int, typer.Option(help="Flag images whose shorter side is smaller.")]
    = InspectConfig.tiny_px,
    max_pixels: MaxPixels = None,
    quiet: Quiet = False,
) -> None:
    """Count classes per level and find broken, duplicate, odd and tiny images.

    Writes summary.json and a class-balance plot per level.
    """
    from wingspan.data.inspect import inspect_dataset, print_class_table, print_summary

    dataset = read_data(data, format, group_regex, strict, check_files=not metadata_only)
    level = dataset.resolve_level(level)
    target = out_dir or dataset.claim_out_dir()
    summary = inspect_dataset(dataset, target, make_config(ctx, InspectConfig, tiny_px=tiny_px),
                              check_images=not metadata_only, progress=not quiet)
    unreadable = summary.get("images", {}).get("unreadable", [])
    if strict and unreadable:
        raise WingspanError(f"{counted(len(unreadable), 'image')} cannot be read, e.g. "
                            f"{unreadable[0]['path']}: {unreadable[0]['error']}",
                            hint="Fix or delete them (all are listed in summary.json).")
    print_summary(summary, out)
    print_class_table(dataset, level, out)
    out.print(f"Wrote {plain(target / 'summary.json')} and "
              f"{counted(len(summary['plots']), 'balance plot')} in {plain(target)}")


@data_app.command("split")
def data_split(
    ctx: typer.Context,
    data: Data, level: Level = None,
    val_fraction: Annotated[float, typer.Option(
        "--val", "--val-fraction",  # (train's name for it)
        help="Fraction of groups for validation.",
        rich_help_panel=Panel.DATA)] = SplitConfig.val_fraction,
    test_fraction: Annotated[float, typer.Option(
        "--test", "--test-fraction",
        help="Fraction of groups for the test split.",
        rich_help_panel=Panel.DATA)] = SplitConfig.test_fraction,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same split).")]
    = SplitConfig.seed,
    max_per_class: Annotated[int | None, typer.Option(
        help="Undersample: keep at most N training images per class.",
        rich_help_panel=Panel.DATA)] = None,
    oversample_to: Annotated[int | None, typer.Option(
        help="Oversample: repeat rare training classes up to N images.",
        rich_help_panel=Panel.DATA)] = None,
    format: Format = None, group_regex: GroupRegex = None, strict: SplitStrict = False,
    out_dir: OutDir = None,
) -> None:
    """Split into train/val/test, stratified by LEVEL and grouped (no group on two sides).

    Writes splits.csv, which `wingspan` reads back as a dataset, and sampling.json with the
    class weights of the training split.
    """
    from wingspan.data.samples import groups_given, split_by
    from wingspan.data.split import split_and_sample

    config = make_config(ctx, SplitConfig, val_fraction=val_fraction, test_fraction=test_fraction,
                         seed=seed, max_per_class=max_per_class, oversample_to=oversample_to)
    dataset = read_data(data, format, group_regex, strict, report=True)
    if dataset.has_splits:  # its own split stays what `train DATA` uses
        sides = dataset.table["split"].value_counts()
        out.print("[yellow]DATA has a split of its own[/] ("
                  + ", ".join(f"{k} {v}" for k, v in sides.items() if k) + "): `wingspan train "
                  "DATA` keeps using it; train on the splits.csv written here to use this one.")
    # (splits.csv and sampling.json are replaced together: see split_and_sample)
    with stopped_said(lambda: "no split was written; an earlier splits.csv and "
                      "sampling.json there are as they were"):
        result = split_and_sample(dataset, out_dir or dataset.claim_out_dir(), level, config)
    print_split(result)
    if not groups_given(dataset.table):  # (as train says it when it splits)
        out.print(f"[yellow]Split {plain(split_by(dataset.table))}[/]")
    table = result.dataset.table
    if table.loc[table["split"] == "train", result.level].nunique() < 2:
        out.print("[yellow]Warning:[/] the split trains one class only, which `wingspan "
                  "train` refuses: give images of at least two classes.")
        return
    # (`train DATA` splits DATA afresh with its own settings: this split is trained on so)
    out.print(f"Train on this split: `{plain(command('train', result.splits_csv))}`")


def print_split(result) -> None:
    r = result.report
    sizes = ", ".join(f"{k} {v} ({r.fractions[k]:.0%})" for k, v in r.sizes.items())
    out.print(f"Split on '{plain(result.level)}': {sizes}")
    if r.repeats_dropped:
        out.print(f"{counted(r.repeats_dropped, 'image')} listed on more than one side: one "
                  "row each now")
    if r.mixed_labels:
        out.print(f"[yellow]{plain(r.mixed_labels_said(result.level))}[/]")
    if r.train_only:
        out.print(f"[yellow]{counted(len(r.train_only), 'class has', 'classes have')} too few "
                  "groups for every split; "
                  f"kept in train only:[/] {plain(some(r.train_only))}")
    for split, classes in r.missing.items():
        out.print(f"[yellow]{counted(len(classes), 'class has', 'classes have')} no images in "
                  f"{split}:[/] {plain(some(classes))}")
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
    capped = len(result.capped)
    out.print(f"Balanced class weights (train): {min(w.values()):.3g} to {max(w.values()):.3g} "
              f"over {counted(len(w), 'class', 'classes')}" + (
                  f" ({counted(capped, 'class')} capped at {TrainConfig.max_class_weight:g}x "
                  "the commonest's, as train does: --max-class-weight)" if capped else "")
              # (balanced weights are inversely as the counts: their ratio is the counts')
              + (f"; train leaves them off by default, its classes being within "
                 f"{TrainConfig.imbalance_threshold:g}x of each other (--class-weights "
                 "balanced)" if max(w.values()) <= TrainConfig.imbalance_threshold
                 * min(w.values()) else ""))
    out.print(f"Wrote {plain(result.splits_csv)} and {plain(result.sampling_json)}")


@data_app.command("audit")
def data_audit(
    ctx: typer.Context,
    data: Data, level: Level = None,
    backbone: Annotated[str, typer.Option(
        help="Frozen ImageNet features of this backbone, or of several side by side "
        "(comma-separated; auto: efficientnet_lite2,efficientnet_lite0, installed with "
        "wingspan, or a run's own with --weights RUN).", rich_help_panel=Panel.MODEL)]
    = AuditConfig.backbone,
    weights: Weights = AuditConfig.weights,
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

    Writes audit.csv (every readable image whose label could be checked, most suspect
    first; a class of one image is named apart), duplicates.csv and audit.html.
    """
    from wingspan.data.audit import audit_dataset, checker_said, weak_checker_said
    from wingspan.models.weights import check_weights

    config = make_config(ctx, AuditConfig, backbone=backbone, weights=weights, folds=folds,
                         duplicate_similarity=duplicate_similarity, gallery=gallery,
                         device=device, cache=cache)
    check_weights(config.weights)  # a typo: said now, not after reading the data
    dataset = read_data(data, format, group_regex, strict=strict, report=True)
    target, started = out_dir or dataset.claim_out_dir(), time.time()
    try:
        result = audit_dataset(dataset, target, level, config, progress=not quiet,
                               strict=strict)
    except KeyboardInterrupt:  # (Ctrl-C or SIGTERM: the earlier audit's files stay whole,
        # or this one's are all written: renamed in place together, Ctrl-C held back)
        if (target / "audit.csv").is_file() and \
                (target / "audit.csv").stat().st_mtime >= started:
            err.print(f"Stopped once this audit was written to {plain(target)}.",
                      highlight=False)
            raise
        kept = config.cache and config.weights != "none"  # (random weights: never kept)
        err.print("Stopped: this audit wrote nothing" + (
            "; the features computed so far are cached, and the same command goes on from "
            "them." if kept else " (with --no-cache or --weights none no features are kept: "
            "the next starts afresh)."), highlight=False)
        raise
    issues, dups = result.issues, result.duplicates
    # Paths under the data's folder, as the user gave it (absolute ones wrapped over 7 lines
    # of the table at ETHEC's depth); audit.csv keeps them whole.
    root = dataset.root if dataset.root.is_dir() else dataset.root.parent
    shown = [Path(p) for p in issues.head(15)["path"]]
    if shown and not any(p.is_relative_to(root) for p in shown):
        # a CSV that lists images elsewhere (a run's splits.csv: its photos' folder; none
        # shared by photos on two drives, or by relative and absolute paths)
        with contextlib.suppress(ValueError):
            root = Path(os.path.commonpath([p.parent for p in shown]))
    inside = root != Path(root.anchor) and any(p.is_relative_to(root) for p in shown)
    table = folded_table("rank", "image", "label", "looks like", "label quality",
                         title=f"Most suspect labels ({int(issues['flagged'].sum())} of "
                         f"{len(issues)} flagged by cleanlab)",
                         caption=f"images in {plain(here(root))}" if inside else None)
    for r in issues.head(15).itertuples():
        table.add_row(str(r.rank), plain(here(r.path, root)), plain(r.label),
                      # (a low quality alone, its label still the likeliest: as the gallery)
                      f"{plain(r.suspected)} ({r.suspected_probability:.2f})"
                      if r.suspected != r.label else
                      f"its own label ({r.suspected_probability:.2f})",
                      rounded(r.label_quality, 3))
    out.print(table)
    out.print(f"The head that checks the labels: {checker_said(result.checker)}")
    if result.checker["weak"]:
        said = weak_checker_said(result.checker, dataset.resolve_level(level))
        out.print(f"[yellow]Warning:[/] {plain(said)}")
    if result.single_image_classes:
        alone = result.single_image_classes
        out.print(f"{len(alone)} " + ("classes have a single image, so their labels were"
                                       if len(alone) > 1 else
                                       "class has a single image, so its label was")
                  + " not checked (no other image of the class to learn from out of fold): "
                  f"{plain(some(alone))}")
    out.print(f"{counted(len(dups), 'near-duplicate pair')} (similarity >= "
              f"{duplicate_similarity}, or perceptual hashes within {config.hash_distance} bits), "
              f"{int(dups['across_splits'].sum())} across splits, "
              f"{int(dups['labels_differ'].sum())} with different labels")
    if result.unreadable:  # left out of both searches
        path, why = next(iter(result.unreadable.items()))
        out.print(f"[yellow]Could not read {counted(len(result.unreadable), 'image')}[/], "
                  f"left out of the audit, e.g. {plain(path)}: {escape(why)} (all in audit.html; "
                  "--strict stops at them)")
    out.print(f"Wrote {plain(result.csv)}, {plain(result.duplicates_csv)} and {plain(result.html)}")


@data_app.command("download")
def download_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The dataset: ethec.",
                                        show_default=False)],
    to: Annotated[Path | None, typer.Option(
        help="Folder to keep it in (default: the cache folder's datasets/).",
        rich_help_panel=Panel.OUTPUT)] = None,
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
    out.print(f"Dataset ready: {plain(root)}\nTrain on it with: "
              f"{plain(command('train', root, '--levels', 'family,subfamily,genus,species'))}")


@data_app.command("preview")
def data_preview(
    ctx: typer.Context,
    data: Data, level: Level = None,
    policy: Annotated[str, typer.Option(
        "--augment", help=f"Policy: {' | '.join(AUGMENT_POLICIES)}.")] = AugmentConfig.policy,
    image_size: Annotated[int, typer.Option(
        help="Resolution in pixels; training takes its backbone's own (`wingspan models "
             "list`: 224 for ResNet-50, 260 for EfficientNet-Lite2) unless given.")]
    = AugmentConfig.image_size,
    rows: Annotated[int, typer.Option(help="Classes shown (one image each).")] = PREVIEW_ROWS,
    views: Annotated[int, typer.Option(help="Augmented versions per image.")] = PREVIEW_VIEWS,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    format: Format = None, group_regex: GroupRegex = None, out_dir: OutDir = None,
) -> None:
    """Write a grid PNG: originals beside several augmented versions."""
    from wingspan.data.preview import write_preview

    config = make_config(ctx, AugmentConfig, policy=policy, image_size=image_size)
    dataset = read_data(data, format, group_regex, strict=False, report=True)
    target = out_dir or dataset.claim_out_dir()
    path = write_preview(dataset, target / "preview.png", config, level, rows=rows,
                         augmented=views, seed=seed,
                         log=lambda line: out.print(f"[yellow]{plain(line)}[/]"))
    classes = dataset.table[dataset.resolve_level(level)].nunique()
    shown = f" ({min(rows, classes)} of {classes} classes; --rows {classes} for all)" \
        if classes > rows else ""
    out.print(f"Wrote {plain(path)}{shown}")
