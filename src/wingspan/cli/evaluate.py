"""`wingspan evaluate`, `calibrate` and `adapt`: score a model, fit its temperature or
unknown scores again, or fit its head to unlabelled photos."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from wingspan.cli.app import app
from wingspan.cli.common import (
    err,
    find_model,
    folded_table,
    here,
    make_config,
    out,
    plain,
    run_first,
    skipped,
    stopped_said,
    strict_exit,
)
from wingspan.cli.options import (
    BatchSize,
    DeviceOpt,
    MaxPixels,
    Model,
    Panel,
    Precision,
    Quiet,
    Runtime,
    UnknownScoreOpt,
    Workers,
    check_folder,
)
from wingspan.config import AdaptConfig, TrainConfig, name_pairs
from wingspan.errors import command, counted, some

T = TrainConfig  # defaults shown in --help come from the one config


@app.command("evaluate")
def evaluate_command(
    model: Model,
    data: Annotated[Path | None, typer.Argument(metavar="DATA",
        help="Data to evaluate on (default: the run's own split).", show_default=False)] = None,
    split: Annotated[str | None, typer.Option(
        help="train | val | test | all (default: test, else val; all of DATA when it has "
        "no split).", rich_help_panel=Panel.DATA)] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", callback=check_folder,
        help="Output folder (default: RUN/evaluation-SPLIT; other DATA: "
        "RUN/evaluation-NAME-SPLIT; then -unknown with --unknown, -SCORE with another "
        "--unknown-score than the model's, -tta with --tta).",
        rich_help_panel=Panel.OUTPUT)] = None,
    batch_size: BatchSize = T.batch_size,
    device: DeviceOpt = T.device,
    precision: Precision = T.precision,
    runtime: Runtime = T.runtime,
    workers: Workers = None,
    max_pixels: MaxPixels = None,
    class_map: Annotated[list[str] | None, typer.Option(
        "--map", help="MODEL_CLASS=DATA_CLASS (repeat, or separate with commas): evaluate on "
        "data that names classes differently; the report shows each class's drop.",
        rich_help_panel=Panel.DATA)] = None,
    unknown: Annotated[Path | None, typer.Option(
        help="A folder of images of classes the model never saw: how well it answers "
        "\"unknown\" (AUROC, FPR at 95% TPR, the cost to known classes).",
        show_default=False, rich_help_panel=Panel.UNKNOWN)] = None,
    unknown_score: UnknownScoreOpt = None,
    tta: Annotated[bool, typer.Option(help="Test-time augmentation: average flips and crops, "
                                      "as predict --tta.")] = False,
    plots: Annotated[bool, typer.Option(help="Draw the plots (PNGs, and in the report). "
                                        "--no-plots: the metrics and tables alone, seconds "
                                        "sooner for a small evaluation.")] = True,
    strict: Annotated[bool, typer.Option(
        "--strict", help="A file DATA lists that is missing stops it as DATA is read (as "
        "train's --strict); images that cannot be decoded (here or among --unknown's) are "
        "left out, the evaluation written, then exit 2.", rich_help_panel=Panel.DATA)] = False,
    quiet: Quiet = False,
) -> None:
    """Metrics, confusion matrix, curves, mistakes, calibration and an HTML report. The
    model is not changed (see `wingspan calibrate`)."""
    find_model("evaluate", model, [data] if data else [])
    from wingspan.evaluate.run import evaluate

    # (its folder is written aside and moved in place at the end: see evaluate.folder)
    with stopped_said(lambda: "this evaluation wrote nothing; any earlier one in its folder "
                      "is as it was"), run_first("evaluate", model, [data] if data else []):
        result = evaluate(model, data, split, out_dir, progress=not quiet,
                          batch_size=batch_size, workers=workers, runtime=runtime,
                          precision=precision, device=device,
                          class_map=name_pairs(class_map or [], "--map"), unknown=unknown,
                          unknown_score=unknown_score, tta=tta, plots=plots, strict=strict)
    if not quiet:  # as predict says it: whether --precision and --runtime took effect
        err.print(f"Engine: {result.metrics['engine']}", highlight=False)
    print_evaluation(result)
    if strict:  # (a file DATA lists that is gone: refused as DATA was read)
        m = result.metrics
        strict_exit(len(m.get("unreadable") or [])
                    + len((m.get("unknown") or {}).get("unreadable") or []))


def _print_unknown(u: dict) -> None:
    from wingspan.evaluate.wording import INVERTED, at_threshold

    table = folded_table("score", "AUROC", "FPR at 95% TPR", title=f"Unknown images: "
                         f"{u['unseen_images']} of unseen classes against the known ones")
    for name, v in u["scores"].items():
        mark = (" (in use)" if name == u["score"] else "") + INVERTED * (v["auroc"] < 0.5)
        table.add_row(name + mark, f"{v['auroc']:.4f}", f"{v['fpr95']:.4f}")
    out.print(table)
    out.print(at_threshold(u))
    if u.get("unreadable"):  # not scored: the figures above are of the rest
        n = len(u["unreadable"])
        out.print(f"[yellow]{n} of the --unknown images could not be read[/] and "
                  + ("was" if n == 1 else "were") + f" not scored, e.g. "
                  f"{plain(u['unreadable'][0][0])}: "
                  f"{escape(u['unreadable'][0][1])} (all in metrics.json)")


def print_evaluation(result) -> None:
    from wingspan.evaluate.hierarchy import level_table
    from wingspan.evaluate.metrics import ece_row, summary_rows
    from wingspan.evaluate.wording import (
        answer_rows,
        fairness,
        left_out_wording,
        tree_wording,
        unreadable_wording,
    )

    m = result.metrics
    table = folded_table("metric", "value",
                         title=f"{m['split']} split, level '{plain(m['level'])}': "
                         + counted(m["images"], "image")
                         + (", test-time augmentation" if m.get("tta") else ""))
    for label, value in summary_rows(m):
        table.add_row(label, value)
    table.add_row(*ece_row(m))
    worse = m["ece"] > m["ece_uncalibrated"] + 0.01
    # The metrics above name a class for every image; the answer may not.
    for label, value in answer_rows(m.get("answers")):
        table.add_row(label, value)
    out.print(table)
    if fairness(m.get("fair", "yes"))[0] != "yes":  # images trained or chosen on (or maybe)
        out.print(f"[yellow]Are these figures fair?[/] {escape(m['fair'])}.")
    if m.get("tta_note"):
        out.print(f"Test-time augmentation: {escape(m['tta_note'])}.")
    if worse:  # fitted on the run's own val, the temperature may not carry to other photos
        out.print("[yellow]The temperature makes these probabilities less calibrated (ECE "
                  f"{m['ece_uncalibrated']:.3f} -> {m['ece']:.3f}).[/] `wingspan calibrate RUN "
                  "DATA` fits one on labelled photos like these"
                  + (" (with the same " + " ".join(
                      f"--map {shlex.quote(f'{a}={b}')}" for a, b in m["class_map"].items())
                     + ")" if m.get("class_map") else "")
                  + ("; it fits on single views, so compare without --tta."
                     if m.get("tta_note") else "."))
    for line in m.get("reading", []):  # files DATA lists or holds that were not read
        out.print(f"[yellow]{plain(line)}[/]")
    if said := unreadable_wording(m):
        out.print(f"[yellow]{plain(said)}.[/]")
    if said := tree_wording(m):
        out.print(f"[yellow]{plain(said)}.[/]")
    if said := left_out_wording(m, some(m.get("unknown_classes", [])),
                                "--map MODEL_CLASS=DATA_CLASS"):
        out.print(f"[yellow]{plain(said)}[/]")
    if m.get("absent_classes"):
        absent = len(m["absent_classes"])
        out.print(f"{counted(absent, 'class', 'classes')} of the model's "
                  f"{'has' if absent == 1 else 'have'} no images here and "
                  f"{'is' if absent == 1 else 'are'} left out of "
                  "the per-class table and the macro averages: "
                  f"{plain(some(m['absent_classes']))}"
                  + (f". {counted(m['answered_absent'], 'image')} here "
                     f"({m['answered_absent'] / m['images']:.0%}) "
                     f"{'was' if m['answered_absent'] == 1 else 'were'} answered with one of "
                     "them: wrong, counted in recall, in no averaged class's precision"
                     if m.get("answered_absent") else ""))
    if m.get("answered_only_classes"):
        only = m["answered_only_classes"]
        out.print(f"{counted(len(only), 'class', 'classes')} of the model's "
                  f"{'has' if len(only) == 1 else 'have'} no images here but "
                  f"{'was' if len(only) == 1 else 'were'} answered: in the per-class table "
                  f"and the macro averages, each with F1 0: {plain(some(only))}")
    if m.get("transfer"):
        named = "named here" in m["transfer"][0]
        own = m.get("transfer_own")
        title = "Transfer per class" + (
            f" (own data: its {own['split']} split"
            + (f"; {own['unreadable']} of its {own['images']} images could not be read, gone "
               "since" if own["unreadable"] else "") + ")" if own else "")
        transfer = folded_table("model class", "data class", "recall on own data", "recall here",
                                "drop", "images here", *(["named here"] if named else []),
                                title=title)
        def figure(value, spec: str) -> str:  # none: no images to measure it on
            return "-" if value is None or value != value else format(value, spec)

        for r in m["transfer"]:
            transfer.add_row(plain(r["model class"]), plain(r["data class"]),
                             *(figure(r[k], ".3f") for k in ("recall on own data",
                                                              "recall here", "drop")),
                             str(r["images here"]),
                             *([figure(r["named here"], ".1%")] if named else []))
        out.print(transfer)
    if m.get("unknown"):
        _print_unknown(m["unknown"])
    if m.get("hierarchy"):
        h = m["hierarchy"]
        levels = folded_table("method", *map(plain, h["levels"]), title="F1 per level")
        for row in level_table(h, list(h["levels"])).itertuples(index=False):
            levels.add_row(row[0], *[f"{v:.4f}" for v in row[1:]])  # (as the report)
        out.print(levels)
        for lv, v in h["levels"].items():
            if n := v.get("no_truth"):
                out.print(f"[yellow]{counted(n, 'image')} with no {plain(lv)} the model knows "
                          f"(blank, or a name its tree lacks) {'is' if n == 1 else 'are'} "
                          f"left out of the {plain(lv)} figures.[/]")
        heads = h["consistency"]["heads"]
        out.print(f"Consistent predictions: {h['consistency']['marginalised']:.1%} marginalised"
                  + (f", {heads:.1%} from the per-level heads" if heads is not None else "")
                  + f"; mean mistake depth {h['mean_mistake_depth']:.2f}")
    out.print(f"Report: {plain(result.report)}")  # (the unreadable images: said above)


@app.command("calibrate")
def calibrate_command(
    model: Model,
    data: Annotated[Path | None, typer.Argument(metavar="DATA",
        help="Labelled data to fit on (default: the run's own).", show_default=False)] = None,
    split: Annotated[str | None, typer.Option(
        help="train | val | test | all (default: val; all of DATA when it has no split).",
        show_default=False, rich_help_panel=Panel.DATA)] = None,
    batch_size: BatchSize = T.batch_size,
    device: DeviceOpt = T.device,
    workers: Workers = None,
    max_pixels: MaxPixels = None,
    class_map: Annotated[list[str] | None, typer.Option(
        "--map", help="MODEL_CLASS=DATA_CLASS (repeat, or separate with commas): fit on data "
        "that names classes differently, as evaluate's --map.", rich_help_panel=Panel.DATA)] = None,
    unknown: Annotated[bool, typer.Option(
        "--unknown", help="Instead: fit the unknown scores again on the run's own train and "
        "val images (e.g. with another --unknown-rate or --unknown-score).",
        rich_help_panel=Panel.UNKNOWN)] = False,
    unknown_rate: Annotated[float | None, typer.Option(
        help="With --unknown: the share of known val images it may turn away (default: "
        "the model's own).",
        show_default=False, rich_help_panel=Panel.UNKNOWN)] = None,
    unknown_score: UnknownScoreOpt = None,
    precision: Precision = T.precision,
    runtime: Runtime = T.runtime,
    quiet: Quiet = False,
) -> None:
    """Fit the model's temperature again (training fits it on its val split) and store it
    in the bundle, e.g. on labelled photos from where the model will be used; or, with
    --unknown, its unknown scores and thresholds."""
    find_model("calibrate", model, [data] if data else [])
    from wingspan.evaluate.calibrate import calibrate, check_calibrate_settings, fit_unknown
    from wingspan.evaluate.calibration import calibrate_warnings
    from wingspan.evaluate.wording import left_out_wording

    check_calibrate_settings(unknown, data, split, class_map, unknown_rate, unknown_score)
    # (the bundle is rewritten at the end, its manifest last: a Ctrl-C before leaves it whole)
    if unknown:
        with stopped_said(lambda: "the model's unknown scores and thresholds are as they were"):
            u = fit_unknown(model, unknown_rate, unknown_score, progress=not quiet,
                            batch_size=batch_size, workers=workers, device=device,
                            precision=precision, runtime=runtime)
        out.print(f"Unknown scores fitted on {u['train_images']} training images; thresholds "
                  f"set on {u['val_images']} val images to turn away {u['rate']:.0%} of known "
                  f"ones; default score '{u['score']}'")
        _say_what_keeps_the_old(model, "unknown scores and thresholds")
        return
    with stopped_said(lambda: "the model's temperature is as it was"):
        c = calibrate(model, data, split, progress=not quiet, batch_size=batch_size,
                      workers=workers, device=device,
                      class_map=name_pairs(class_map or [], "--map"),
                      precision=precision, runtime=runtime)
    out.print(f"Temperature {c['previous_temperature']:.3f} -> {c['temperature']:.3f}, fitted "
              f"on {counted(c['images'], 'image')} ({plain(c['fitted_on'])}); ECE "
              f"{c['val_ece_previous']:.4f} -> {c['val_ece_after']:.4f} "
              f"({c['val_ece_before']:.4f} without a temperature)"
              + (f"; by the {c['method']}" if c["method"] != "likelihood" else ""))
    if said := left_out_wording(c, some(c.get("unknown_classes", [])),
                                "--map MODEL_CLASS=DATA_CLASS"):
        out.print(f"[yellow]{plain(said)}[/]")
    if unreadable := c.get("unreadable"):
        path, why = c["unreadable_examples"][0]
        out.print(f"[yellow]{counted(unreadable, 'image')} could not be read and "
                  f"{'was' if unreadable == 1 else 'were'} left out, e.g. {plain(path)}: "
                  f"{plain(why)}[/]")
    for note in calibrate_warnings(c):
        out.print(f"[yellow]Warning:[/] {escape(note)}")
    _say_what_keeps_the_old(model, "temperature")


def _among(n: int, split: str) -> str:
    """"2 of the photos are the run's own val images (or copies of them)", or of one."""
    return (f"1 of the photos is one of the run's own {split} images (or a copy of one)"
            if n == 1 else f"{n} of the photos are the run's own {split} images (or copies "
            "of them)")


def _say_what_keeps_the_old(model: Path, what: str) -> None:
    """An export holds the calibration it was made with, and a running server the one it
    loaded: neither follows the bundle, and nothing else would tell the user."""
    from wingspan.export import metadata_path
    from wingspan.inference import find_bundle, output_home

    folder = output_home(find_bundle(model)) / "export"
    made = sorted(p for p in folder.glob("model*") if metadata_path(p).is_file()) \
        if folder.is_dir() else []
    exports = f"the exports in {plain(str(folder))} ({', '.join(p.name for p in made)}) and " \
        if made else ""
    out.print(f"Note: {exports}a `wingspan serve` already running "
              f"{'keep' if made else 'keeps'} the old {what}: "
              + ("export again, and " if made else "") + "restart the server.")


A = AdaptConfig


@app.command("adapt")
def adapt_command(
    ctx: typer.Context,
    model: Model,
    photos: Annotated[list[str], typer.Argument(metavar="PHOTOS",
        help="Unlabelled photos from where the model will be used: files, folders, globs.",
        show_default=False)],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", callback=check_folder,
        help="The adapted run's folder (default: RUN-adapted, or RUN-adapted-2... "
        "when taken). An earlier adapted run there is replaced.",
        show_default=False, rich_help_panel=Panel.OUTPUT)] = None,
    neighbours: Annotated[int, typer.Option(
        help="Neighbours per image in the graph that label spreading passes classes over.",
        rich_help_panel=Panel.TRAINING
    )] = A.neighbours,
    confidence: Annotated[float, typer.Option(
        help="The head's calibrated probability (as predict shows it) a photo also needs "
        "to be trained on (0: the head and its neighbours agreeing is enough).",
        rich_help_panel=Panel.TRAINING)] = A.confidence,
    rounds: Annotated[int, typer.Option(
        help="Refits, the head's class taken afresh from each.",
        rich_help_panel=Panel.TRAINING)] = A.rounds,
    batch_size: BatchSize = A.batch_size,
    device: DeviceOpt = A.device,
    precision: Precision = A.precision,
    runtime: Runtime = A.runtime,
    workers: Workers = None,
    max_pixels: MaxPixels = None,
    quiet: Quiet = False,
) -> None:
    """Fit a trained model to unlabelled photos of the place it will be used (e.g. a model
    trained on web or museum images, for garden photos): its head learns from the photos
    whose class it and their nearest neighbours agree on (self-training). Writes a new run;
    the run itself stays as it is."""
    find_model("adapt", model, photos)
    from wingspan.training.adapt import adapt

    config = make_config(ctx, AdaptConfig, neighbours=neighbours, confidence=confidence,
                         rounds=rounds, batch_size=batch_size, device=device,
                         precision=precision, runtime=runtime)
    # (written beside its folder and moved in at the end: see adapt._write_run)
    with stopped_said(lambda: "no adapted run was written; an earlier one in its folder is "
                      "as it was"):
        a = adapt(model, photos, out_dir, config, progress=not quiet, workers=workers)
    for path, why in a["unreadable_photos"]:  # as predict says them
        err.print(skipped(path, why), highlight=False)
    used = list(a["photos_used_per_round"].values())[-1]  # the finest level's
    fits = f" in {len(used)} refits" if len(used) > 1 else ""
    out.print(f"{counted(a['photos'], 'photo')} ({a['unreadable']} unreadable); trained on "
              f"{' / '.join(map(str, used))} of them{fits}; the answer "
              f"changed for {a['changed']:.1%}")
    out.print("Photos per class before -> after: " + ", ".join(
        f"{plain(c)} {n} -> {a['classes_after'][c]}" for c, n in a["classes_before"].items()))
    out.print(f"On the run's own val images: accuracy {a['val_accuracy_before']:.4f} -> "
              f"{a['val_accuracy']:.4f}, temperature {a['temperature']:.3f}")
    if own := a["replaced_calibration"]:
        out.print(f"[yellow]The run's temperature {own['temperature']:.3f}, fitted on "
                  f"{plain(own['fitted_on'])}, is for its head as it was:[/] the adapted run's "
                  "is fitted on val. Fit it again on those photos with "
                  f"`{plain(command('calibrate', a['out'], 'DATA'))}`.")
    if not any(used):
        bar = f" at p >= {confidence}" if confidence else ""
        out.print(f"[yellow]No photo's class was agreed on by the head and its neighbours"
                  f"{bar}:[/] the head stays as trained. Give photos of the species the "
                  "model knows" + (", or a lower --confidence." if confidence else "."))
    # (a head refitted on no photo is the run's own: its val and test figures hold)
    refitted = any(any(n) for n in a["photos_used_per_round"].values())
    if a["val_images_among_photos"] and refitted:
        out.print(f"[yellow]{_among(a['val_images_among_photos'], 'val')}[/]: the val "
                  "accuracy, temperature and unknown thresholds above may be fitted or scored "
                  "on images the head has now trained on (those whose class it and their "
                  "neighbours agreed on).")
    if a["test_images_among_photos"] and refitted:
        out.print(f"[yellow]{_among(a['test_images_among_photos'], 'test')}[/]: its test "
                  "figures are no longer fair (evaluate says so).")
    for level, missing in a["classes_without_training_images"].items():
        out.print(f"[yellow]{len(missing)} '{plain(level)}' classes had no readable training "
                  f"image[/] and keep the run's own weights: {plain(', '.join(missing[:5]))}")
    out.print(("Replaced the earlier adapted run: " if a["replaced"] else "Adapted run: ")
              + f"{plain(here(a['out']))}   (evaluate it like any run; its labels were never "
              "seen, so only labelled photos from there can say how much it gained)")
