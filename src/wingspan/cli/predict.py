"""`wingspan predict`, `explain`, `serve` and `export`: a trained model put to use."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from wingspan.cli.app import app
from wingspan.cli.common import (
    check_output_file,
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
    Devices,
    MaxPixels,
    Model,
    Nodes,
    Panel,
    Precision,
    Quiet,
    Runtime,
    Strategy,
    StrictAfter,
    UnknownScoreOpt,
    Workers,
    check_folder,
    check_not_stdout,
)
from wingspan.config import (
    PREDICT_PAGE_IMAGES,
    PREDICT_ROWS,
    PREDICT_ROWS_TAXONOMY,
    SERVE_HOST,
    SERVE_PORT,
    TOP_K,
    UNKNOWN_SHARE_SAID,
    ServeLimits,
    TrainConfig,
)
from wingspan.errors import WingspanError, command, counted

T = TrainConfig  # defaults shown in --help come from the one config
S = ServeLimits


@app.command("predict")
def predict_command(
    model: Model,
    paths: Annotated[list[str], typer.Argument(
        metavar="PATH", help="Image files, folders (searched recursively) or globs.",
        show_default=False)],
    top_k: Annotated[int, typer.Option(min=1, help="Classes to show per image.")] = TOP_K,
    output: Annotated[list[Path] | None, typer.Option(
        help="Write all predictions to a .csv or .json file, or a page of them to look "
             "through, .html (each image's thumbnail and answer, the least sure first); - "
             "writes the CSV to standard output (for a pipe), the rest to standard error. "
             "Repeat it for several (--output preds.csv --output preds.html).",
             rich_help_panel=Panel.OUTPUT)] = None,
    tta: Annotated[bool, typer.Option(help="Test-time augmentation: average flips and "
                                      "crops.")] = False,
    batch_size: BatchSize = T.batch_size,
    device: DeviceOpt = T.device,
    devices: Devices = None,
    nodes: Nodes = None,
    strategy: Strategy = T.strategy,
    precision: Precision = T.precision,
    runtime: Runtime = T.runtime,
    workers: Workers = None,
    max_pixels: MaxPixels = None,
    unknown_score: UnknownScoreOpt = None,
    strict: StrictAfter = False,
    quiet: Quiet = False,
) -> None:
    """Predict the classes of images, with calibrated probabilities; an image unlike
    every class the model knows is answered "unknown" (its closest class stays in the
    output). With --devices N (or under torchrun) the images are shared among the
    processes; one merged, ordered output."""
    find_model("predict", model, paths)
    # --output -: the CSV is all that standard output holds (a table's paths were cut,
    # and its first 50 rows alone shown); what is said goes to standard error.
    output = list(dict.fromkeys(output or []))  # (one given twice: written once)
    to_stdout = any(str(o) == "-" for o in output)
    files = [o for o in output if str(o) != "-"]
    say = err if to_stdout else out
    for file in files:
        check_output_file(file, (".csv", ".json", ".html"))
    from wingspan.inference import Predictor
    from wingspan.predict import (
        expand_paths,
        not_images_said,
        others_header,
        predict,
        predict_fabric,
        row_words,
        stopped_by_score,
        write_predictions,
    )

    fabric = predict_fabric(device, devices, nodes, strategy, workers)
    main = fabric is None or fabric.is_global_zero
    quiet = quiet or not main
    # (the table and --output come once every image is predicted: a stop before, nothing)
    there = [plain(f) for f in files if f.is_file()]
    kept = "no prediction was shown or written" + (
        f"; {', '.join(there)} " + ("is as it was" if len(there) == 1 else "are as they were")
        if there else "")
    with stopped_said(lambda: kept) if main else contextlib.nullcontext():
        with run_first("predict", model, paths):
            predictor = Predictor(model, device=device, batch_size=batch_size,
                                  workers=workers, runtime=runtime, precision=precision,
                                  progress=not quiet, fabric=fabric,
                                  unknown_score=unknown_score,
                                  images=len(expand_paths(paths)[0]))  # (a few: no timing)
        if not quiet:
            err.print(f"Engine: {predictor.policy.describe()}"
                      + (f"; {fabric.world_size} processes" if fabric else ""),
                      highlight=False)
        result = predict(predictor, paths, top_k, tta, progress=not quiet, fabric=fabric)
    if not main:
        return
    hierarchical = predictor.taxonomy is not None
    # The classes after the prediction: --top-k 3 shows the next 2, and --top-k 10 of a
    # 3-class model the next 2 as well; the header says what is shown (with --top-k 1, an
    # unknown answer's closest class alone).
    # (the answer folds too: at 40 columns it read "azure_…")
    nexts = others_header(result)
    table = folded_table("image", "prediction", "probability",
                         "taxonomy (probability per level)"
                         + (f"; {plain(nexts)}" if nexts else "") if hierarchical else nexts)
    rows = PREDICT_ROWS_TAXONOMY if hierarchical else PREDICT_ROWS
    for row in result.rows[:rows]:
        said = row_words(row, result)
        best = (f"[yellow]{plain(said.answer)}[/]{plain(said.at_level)}" if said.flagged
                else plain(said.answer))
        table.add_row(plain(row["path"]), best, said.probability, plain(said.detail))
    if len(result.rows) > rows:
        # (a page holds the least sure PREDICT_PAGE_IMAGES alone)
        whole = [str(f) for f in files if f.suffix.lower() != ".html"
                 or len(result.rows) <= PREDICT_PAGE_IMAGES]
        table.caption = f"first {rows} of {len(result.rows)}; " + (
            f"all in {plain(', '.join(whole))}" if whole else
            f"--output FILE{'.csv' if files else ''} writes all")
    for file in output:  # first: nothing printed after can lose it
        write_predictions(result, file)
    if result.rows and not to_stdout:  # not an empty table above the skipped files
        out.print(table)
    for path, reason in result.failed:
        err.print(skipped(path, reason), highlight=False)
    say.print(f"{counted(len(result.rows), 'image')} predicted at "
              f"{result.images_per_second:.1f} images/s"
              + (f"; {len(result.failed)} skipped" if result.failed else ""))
    if result.not_images:  # (named, or a folder of raw photos' sidecars reads as lost)
        say.print(plain(not_images_said(result.not_images)), highlight=False)
    for file in files:  # (with --output -, standard output is the CSV's alone)
        say.print(f"Wrote {plain(file)}")
    # (by the level known, not the answer's text: a class may be named "unknown")
    unknown = sum(r["known_level"] is None for r in result.rows)
    coarser = sum(r.get("known_level") not in (None, predictor.level) and stopped_by_score(r)
                  for r in result.rows)
    if unknown or coarser:
        say.print(f"{counted(unknown, 'image is', 'images are')} unlike the classes the "
                  "model knows"
                  + (f", {coarser} known at a coarser level only" if coarser else "")
                  # ("at most": on 20 val images or fewer, at 5%, it turns none away)
                  + f" (unknown score '{predictor.unknown_score}' above its threshold, set to "
                  f"turn away at most {predictor.unknown.rate:.0%} of the known val images"
                  + _few_val_images(predictor.unknown) + ")")
        if unknown > UNKNOWN_SHARE_SAID * len(result.rows):  # (half of iNat's field photos
            # of species a Leeds model knows: what is a user to do?)
            say.print("If they show the classes the model knows, they are unlike its "
                      "training images (a different camera, setting or background): `"
                      + plain(command("adapt", model, "PHOTOS")) + "` fits the model to such "
                      "photos, and `" + plain(command("evaluate", model, "DATA"))
                      + "` on labelled ones says how it does there.")
    if not result.rows:
        raise WingspanError("No image could be predicted.", hint="Check the paths given.")
    if strict:  # (the others' predictions are written and shown above)
        strict_exit(len(result.failed))


def _few_val_images(unknown) -> str:
    """Where the threshold was set on so few val images that new known images are turned
    away well over its rate: how many (training's log says it; predict said the rate)."""
    expected = unknown.expected
    if expected is None or expected <= 1.5 * unknown.rate:
        return ""
    return (f"; set on only {counted(unknown.val_images, 'known val image')}, it turns away "
            f"about {expected:.0%} of new known ones")


@app.command("explain")
def explain_command(
    model: Model,
    images: Annotated[list[str], typer.Argument(metavar="IMAGE",
                                                help="Image files, folders or globs.",
                                                show_default=False)],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", callback=check_folder,
        help="Folder for the overlays (default: RUN/explain).",
        rich_help_panel=Panel.OUTPUT)] = None,
    device: DeviceOpt = T.device,
    strict: StrictAfter = False,
    quiet: Quiet = False,
) -> None:
    """Grad-CAM overlays: where the model looked for the class it predicted, one PNG per
    image."""
    find_model("explain", model, images)
    from wingspan.explain import explain_each
    from wingspan.inference import find_bundle, output_home
    from wingspan.predict import expand_paths

    with run_first("explain", model, images):
        paths, missing = expand_paths(images)
        for item, why in missing:
            err.print(skipped(item, why), highlight=False)
        if not paths:
            raise WingspanError("No image to explain.", hint="Check the paths given.")
        out_dir = out_dir or output_home(find_bundle(model)) / "explain"
    explained, failed, replaced = 0, len(missing), 0
    # (stopped before the first overlay, OUT_DIR may not have been made: "kept in" it read
    # as if it held them)
    with stopped_said(lambda: f"{counted(explained, 'overlay')} of {len(paths)} written"
                      + (f", kept in {plain(here(out_dir))}" if explained else "")):
        for e in explain_each(model, paths, out_dir, device=device, progress=not quiet):
            if e.error:
                failed += 1
                err.print(skipped(e.path, e.error), highlight=False)
            else:
                explained += 1
                replaced += e.replaced
                said = f" (answer: {e.answer})" if e.otherwise else ""
                if not quiet:  # (a line per image)
                    out.print(f"{plain(e.path)}: {plain(e.label)} {e.probability:.3f}"
                              f"{plain(said)} -> {plain(e.png)}", highlight=False)
    if not explained:
        raise WingspanError("No image could be explained.", hint="Check the files given.")
    # The folder (RUN/explain by default) gathers every call's overlays: a photo named as
    # one explained before (IMG_0001.jpg of another trip) took its overlay's place unsaid.
    over = (counted(replaced, "overlay replaced an earlier one", "overlays replaced earlier "
                    "ones") + " of the same name" if replaced else "")
    if quiet:
        out.print(f"{counted(explained, 'overlay')} in {plain(here(out_dir))}"
                  + (f" ({over})" if over else ""), highlight=False)
    elif over:
        out.print(f"{over} in {plain(here(out_dir))}", highlight=False)
    if strict:
        strict_exit(failed)


@app.command("serve")
def serve_command(
    ctx: typer.Context,
    model: Model,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine "
                                      "only).", rich_help_panel=Panel.SERVER)] = SERVE_HOST,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.",
                                      rich_help_panel=Panel.SERVER)] = SERVE_PORT,
    device: DeviceOpt = T.device,
    precision: Precision = T.precision,
    runtime: Runtime = T.runtime,
    top_k: Annotated[int, typer.Option(help="Classes per level in an answer.",
                                       rich_help_panel=Panel.SERVER)] = S.top_k,
    max_upload_mb: Annotated[float, typer.Option(
        min=0.001, max=1e6, help="Largest file taken (413 above).",
        rich_help_panel=Panel.SERVER)] = S.max_bytes / 2**20,
    max_files: Annotated[int, typer.Option(
        help="Most images in one request (413 above).",
        rich_help_panel=Panel.SERVER)] = S.max_files,
    max_in_flight: Annotated[int, typer.Option(
        min=1, help="Most requests served at once (429 above).",
        rich_help_panel=Panel.SERVER)] = S.max_in_flight,
    timeout: Annotated[float, typer.Option(
        min=0.001, help="Seconds a request may take (504 after).",
        rich_help_panel=Panel.SERVER)] = S.timeout_s,
    max_pixels: MaxPixels = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No line per request (uvicorn's access log); the start and "
        "errors are still said.")] = False,
) -> None:
    """A web page (drop a photo: its classes and where the model looked) and an HTTP API:
    POST /predict with image files, POST /explain with one; /health, /model, /docs."""
    find_model("serve", model)
    from wingspan.serve import serve

    limits = make_config(ctx, ServeLimits, top_k=top_k, max_bytes=round(max_upload_mb * 2**20),
                         max_files=max_files, max_in_flight=max_in_flight, timeout_s=timeout,
                         renamed={"timeout_s": "timeout", "max_bytes": "max_upload_mb"})
    serve(model, host=host, port=port, device=device, limits=limits, precision=precision,
          runtime=runtime, access_log=not quiet)


@app.command("export")
def export_command(
    model: Model,
    format: Annotated[str, typer.Option("--format", help="onnx | torchscript.")] = "onnx",
    quantize: Annotated[str | None, typer.Option(
        help="int8 (ONNX): static quantisation calibrated on training images, written only "
        "when its val top-1 stays within 1 point of fp32's (or 1 image, on fewer than 100 "
        "val images: warned).")] = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", callback=check_not_stdout,
        help="The model file (ending in .onnx, or .pt for TorchScript), or "
        "else a folder to write it in (default: RUN/export/model.onnx, model.int8.onnx with "
        "--quantize int8, model.pt for TorchScript); its metadata goes beside it as "
        "FILE.json.", rich_help_panel=Panel.OUTPUT)] = None,
    unknown_score: UnknownScoreOpt = None,
    quiet: Quiet = False,
) -> None:
    """A model that runs without wingspan (ONNX Runtime alone): RGB pixels in, calibrated
    probabilities per level out, and each level's unknown score with its threshold in the
    metadata; checked against PyTorch before it is written."""
    find_model("export", model)
    import json

    from wingspan.export import export_model, metadata_path
    from wingspan.progress import status

    # (tracing, checking and, for int8, calibrating take a while: say what is going on)
    doing = (f"Exporting {plain(here(model))} ({format}"
             + (f", {quantize}: calibrating and checking on its images" if quantize else "")
             + ")...")
    # (the model file and its metadata are replaced together at the end: atomic_paths)
    with stopped_said(lambda: "nothing was exported; an earlier export there is as it was"), \
            status(doing, enabled=not quiet):  # (drawn where a bar would be)
        path = export_model(model, out_path, format, quantize=quantize,
                            unknown_score=unknown_score)
    meta = json.loads(metadata_path(path).read_text())
    check = meta["checked"]
    unknown = meta.get("unknown")
    int8 = meta.get("int8", {})
    out.print(f"Wrote {plain(path)} and {plain(metadata_path(path))}: input uint8 RGB "
              f"(N, {meta['input']['size']}, {meta['input']['size']}, 3); "
              + ("the fp32 graph, before quantizing, " if int8 else "")
              + f"agrees with PyTorch within {check['max_abs_probability_difference']:.1e} on "
              f"{check['images']} "
              + ("generated pictures (the run's val images were not found)."
                 if check.get("generated") else "images.")
              + (f" int8 ({int8['weights']} weights) val top-1 {int8['val_top1_int8']:.4f} "
                 f"(fp32 {int8['val_top1_fp32']:.4f}), another answer than fp32's on "
                 f"{round(int8.get('val_answers_changed', 0) * int8['val_images'])} of "
                 f"{int8['val_images']} val images, probabilities within "
                 f"{int8['max_abs_probability_difference_vs_fp32']:.1e} of fp32's, "
                 f"{int8['seconds_int8_vs_fp32']:.2f}x fp32's time here"
                 + (" (slower: int8 pays on CPUs with VNNI or AMX)"
                    if int8['seconds_int8_vs_fp32'] > 1 else "")
                 + (" (7-bit weights cost accuracy: uint8 ones, stored whole, keep more "
                    "of it, slower)" if int8['refused'] else "") if int8 else ""))
    own = ("; the int8 model's own, set again on its val scores (fp32's would turn away "
           f"{int8['val_unknown_share_int8']:.1%} of known val images, against the "
           f"{unknown['rate']:.1%} asked)" if "unknown_thresholds_fp32" in int8 else "")
    out.print(f"Unknown score '{unknown['score']}' in the outputs "
              f"{', '.join(unknown['outputs'].values())}, thresholds in the metadata{own}."
              if unknown else "No unknown score (the model has none): it always names a class."
              " `wingspan calibrate RUN --unknown` fits them.")
