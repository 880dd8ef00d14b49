"""`wingspan export RUN --format onnx`: a model that runs without wingspan.

The exported graph takes what any image library gives: RGB pixels, uint8, already
resized and centre-cropped to the model's input size, as (N, size, size, 3). The
normalisation, the network and the temperature-scaled softmax are inside it, so it returns
calibrated probabilities per taxonomic level, and, for a model with unknown scores, each
level's score (`unknown.LEVEL`) to compare with its threshold. Everything needed to
prepare an image and name the outputs (input size, the resize before the crop and its
filter, class names, taxonomy, temperature, thresholds) rides along: in the ONNX file's
metadata, and in a JSON file beside it. Exporting checks the graph against PyTorch on
real images and refuses an export that does not agree.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wingspan.data.taxonomy import Taxonomy
from wingspan.errors import WingspanError
from wingspan.files import atomic_paths, remove_dead_leftovers
from wingspan.inference import find_bundle, output_home
from wingspan.models import load_bundle
from wingspan.models.bundle import read_manifest
from wingspan.models.runtime import export_onnx
from wingspan.models.unknown import level_thresholds
from wingspan.training.folder import SPLITS_FILE

INT8_MAX_DROP = 0.01  # int8 is written only when its val top-1 is within 1 point of fp32's
TOLERANCE = 1e-4  # largest |probability difference| the export may show against PyTorch
UNKNOWN_TOLERANCE = 1e-3  # the same for an unknown score (relative to 1 + |score|)
METADATA_KEY = "wingspan"
UNKNOWN_OUTPUT = "unknown.{}"  # a level's unknown score


class _Deployable(nn.Module):
    """uint8 RGB (N, H, W, 3) -> {level: calibrated probabilities} (and {unknown.level:
    score}): preprocessing, calibration and the unknown score folded into the graph. With
    a taxonomy each coarser level's probabilities are sums of the finest ones (what
    predict shows), not its own head's."""

    def __init__(self, model: nn.Module, mean, std, temperature: float,
                 unknown: nn.Module | None = None, taxonomy: Taxonomy | None = None):
        super().__init__()
        self.model, self.unknown = model, unknown
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)
        self.temperature = float(temperature)
        self.finest = taxonomy.finest if taxonomy else None
        # member[f, c] = 1 when finest class f lies under class c of the level
        self.members = nn.ParameterDict({
            lv: nn.Parameter(torch.eye(len(taxonomy.classes[lv]))[taxonomy.parents[lv]],
                             requires_grad=False)
            for lv in taxonomy.levels[:-1]} if taxonomy else {})

    def outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(pooled features, {level: logits}) of uint8 pixels."""
        features = self.model.features((pixels.permute(0, 3, 1, 2).float() - self.mean)
                                       / self.std)
        return features, self.model.head(features)

    def probabilities(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.finest is None:
            return {lv: torch.softmax(v / self.temperature, -1) for lv, v in logits.items()}
        fine = torch.softmax(logits[self.finest] / self.temperature, -1)
        return {**{lv: fine @ member for lv, member in self.members.items()},
                self.finest: fine}

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features, logits = self.outputs(pixels)
        out = self.probabilities(logits)
        if self.unknown is not None:
            out.update({UNKNOWN_OUTPUT.format(lv): score
                        for lv, score in self.unknown(features, logits).items()})
        return out


def _expected(deployable: _Deployable, detector, score: str | None, pixels: np.ndarray
              ) -> dict[str, torch.Tensor]:
    """What an export must give for `pixels`: PyTorch's probabilities, and the unknown
    scores of the bundle's own detector as predict computes them (in double precision
    where it does, e.g. Mahalanobis and the combined score), not the graph's."""
    with torch.inference_mode():
        features, logits = deployable.outputs(torch.from_numpy(pixels))
        out = deployable.probabilities(logits)
        if detector:
            out.update({UNKNOWN_OUTPUT.format(lv): torch.from_numpy(v)
                        for lv, v in detector.scores(features, logits, score).items()})
    return out


@dataclass(frozen=True)
class InputSpec:
    """What the exported graph takes: the shorter side resized to `resize` with
    `interpolation`, then the centre `size` square (`prepare_pixels`)."""

    size: int
    resize: int
    interpolation: str = "bicubic"


# How an image becomes the pixels above, as training and predict decode it (the README's
# steps in Pillow): in the metadata for a port to another decoder, where each step it
# skips moves answers (on a small Lite0 run, 5-30% of top-1s for the resizes alone).
DECODE_RULES = {
    "jpeg": "decoded reduced (Pillow's draft: libjpeg's 1/2, 1/4 or 1/8 scale), by the "
            "largest of these whose shorter side, divided and rounded down, is still at "
            "least resize_shorter_side_to (511 px for 256: not reduced)",
    "orientation": "EXIF orientation applied (upright as the camera held it)",
    "transparency": "composited on white",
    "high_bit_depth": "16- or 32-bit greyscale stretched from its min..max to 0..255",
    "colour": "Pillow's convert('RGB'): an embedded ICC profile is not applied, and CMYK "
              "is converted by Pillow's plain formula (a browser's decoder does both "
              "otherwise)",
    "resize": "Pillow's resize with the interpolation named (antialiased: a shrink filters "
              "over the whole footprint; a canvas, OpenCV or GPU bilinear does not, and "
              "answers otherwise); the longer side truncated to an integer",
    "crop": "centre crop, its offsets (side - size) / 2 rounded half to even",
}


def prepare_pixels(image, size: int, resize: int, interpolation: str = "bicubic"
                   ) -> np.ndarray:
    """A PIL image as the exported model wants it: RGB, shorter side resized to `resize`
    with the model's `interpolation` (the metadata's, as in training), the centre `size`
    square, uint8 (size, size, 3). The README's example does the same in a few lines of
    Pillow."""
    from wingspan.data.images import pil_filter

    image = image.convert("RGB")
    w, h = image.size
    # The long side truncated, as torchvision's Resize (training's and predict's) has it.
    image = image.resize((resize, int(resize * h / w)) if w <= h else
                         (int(resize * w / h), resize), pil_filter(interpolation))
    # Rounded as torchvision's CenterCrop rounds (half to even), not floored: a side
    # 3 pixels over a multiple of 4 past `size` (any 16:9 photo at 224) otherwise moves.
    left, top = round((image.width - size) / 2), round((image.height - size) / 2)
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _parent_index(taxonomy: Taxonomy) -> dict[str, list[int]]:
    """Per level below the first, each class's parent at the level above: what a reader of
    the metadata needs to choose the branch top-down, as predict does."""
    return {lv: taxonomy.parent_of(lv, up).tolist()
            for up, lv in zip(taxonomy.levels[:-1], taxonomy.levels[1:], strict=True)}


def metadata_path(model_file: str | Path) -> Path:
    """The JSON beside an exported file, named after the whole file name (model.onnx.json,
    model.pt.json): exports in two formats side by side each keep their own."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + ".json")


def export_model(run: str | Path, out: str | Path | None = None, fmt: str = "onnx",
                 check_images: list[str] | None = None, quantize: str | None = None,
                 unknown_score: str | None = None) -> Path:
    """Write the model as `out` (default RUN/export/model.onnx, or model.pt for
    TorchScript) and its metadata beside it as `out`.json (model.onnx.json); returns the
    model file. `check_images`: images to compare the export with PyTorch on (default: up
    to 16 of the run's val split). `quantize` "int8" (ONNX only): static int8 calibrated
    on training images, written only when its val top-1 stays within a point of fp32's.
    `unknown_score`: the unknown score the graph computes (default: the model's own; a
    model without scores has none)."""
    if fmt not in FORMATS:
        raise WingspanError(f"Unknown export format '{fmt}'.",
                            hint=f"Available: {', '.join(FORMATS)}.")
    if quantize not in (None, "int8") or (quantize and fmt != "onnx"):
        raise WingspanError(f"--quantize {quantize} with --format {fmt} is not available.",
                            hint="Use --format onnx --quantize int8 (in Python: "
                                 "format=\"onnx\", quantize=\"int8\").")
    bundle = find_bundle(run)
    model, manifest, detector = load_bundle(bundle, with_unknown=True)
    pre = manifest["preprocessing"]
    size, resize = int(pre["input_size"]), round(int(pre["input_size"]) / pre["crop_pct"])
    spec = InputSpec(size, resize, pre.get("interpolation", "bicubic"))
    temperature = float(manifest.get("calibration", {}).get("temperature", 1.0))
    levels = list(manifest["classes"])
    if unknown_score and detector is None:
        raise WingspanError(f"The model {bundle} has no unknown scores to export.",
                            hint="Fit them first: `wingspan calibrate RUN --unknown` "
                                 "(run.calibrate(unknown=True) in Python).")
    unknown = detector.graph(unknown_score) if detector else None
    taxonomy = Taxonomy.from_dict(manifest["taxonomy"]) if manifest.get("taxonomy") else None
    deployable = _Deployable(model.float().eval(), pre["mean"], pre["std"], temperature,
                             unknown, taxonomy).eval().requires_grad_(False)
    reference = functools.partial(_expected, deployable, detector, unknown_score)
    outputs = levels + ([UNKNOWN_OUTPUT.format(lv) for lv in levels] if unknown else [])
    meta = {
        "format": f"wingspan-{fmt}", "input": {
            "name": "pixels", "layout": "NHWC", "dtype": "uint8", "size": size,
            "resize_shorter_side_to": resize, "interpolation": spec.interpolation,
            "then": f"centre crop {size}x{size}",
            "channels": "RGB", "decode": DECODE_RULES},
        "outputs": outputs, "levels": levels, "classes": manifest["classes"],
        # Finest classes that are a genus's rare species merged (`--rare-below`): no species
        # to name, so predict gives the answer at the level above.
        "merged_classes": sorted(set(
            (manifest.get("training", {}).get("rare_classes") or {}).values())),
        "taxonomy": {**taxonomy.to_dict(), "parent_index": _parent_index(taxonomy)}
        if taxonomy else None, "temperature": temperature,
        "backbone": manifest["model"]["backbone"],
        # What timm builds: the Lite backbones are its tf_ variants ("same" padding), and
        # its efficientnet_lite0 takes the same weights without a word, answering otherwise.
        "timm_name": manifest.get("timm_name"),
        "metrics": manifest.get("metrics", {}).get("best"),
    }
    if unknown:
        score = detector.check_score(unknown_score or detector.score)
        meta["unknown"] = {
            "score": score, "rate": detector.rate,
            "outputs": {lv: UNKNOWN_OUTPUT.format(lv) for lv in levels},
            "thresholds": detector.thresholds[score],
            "rule": "a level is known when its score is at most its threshold; the answer "
                    "is the class at the finest level that is known, with every coarser "
                    "level known too, else unknown"}
    form = FORMATS[fmt]
    out = Path(out) if out else output_home(bundle) / "export"
    # A name ending in the format's suffix is the file; anything else is a folder to put
    # it in (`--out exports/v1.2` is a folder, not a file called "v1.2"). A file named for
    # the other format is a slip, refused.
    if any(out.suffix.lower() in f.suffixes for name, f in FORMATS.items() if name != fmt):
        raise WingspanError(f"--out {out} (out= in Python): a {out.suffix} file for a {fmt} "
                            "export.",
                            hint=f"End it in {form.suffixes[0]}, or give a folder.")
    if out.is_dir() or out.suffix.lower() not in form.suffixes:
        if out.exists() and not out.is_dir():
            raise WingspanError(f"--out {out} (out= in Python) is a file, not a "
                                f"{form.suffixes[0]} model.",
                                hint=f"Give a folder, or a name ending in {form.suffixes[0]}.")
        out = out / ("model.int8.onnx" if quantize else form.file)
    job = _Job(deployable, spec, outputs, check_images or _val_images(bundle, 16), meta,
               reference, bundle, levels, quantize)
    written = _write(out, form.export(job), meta)
    for caveat in int8_caveats(meta["int8"]) if quantize else []:
        warnings.warn(caveat, stacklevel=2)  # (the CLI shows it as "Warning: ...")
    if stale := _older_metadata(out, meta["format"]):
        warnings.warn(f"{stale} beside it is an earlier wingspan's metadata for this file "
                      f"(named so before 2026-12-01), now out of date: "
                      f"{metadata_path(out).name} is this export's. Delete {stale.name}, or "
                      "read the new one where a script reads it.", stacklevel=2)
    return written


def _older_metadata(out: Path, form: str) -> Path | None:
    """model.json beside model.onnx, of the same format (`form`): what exports wrote before
    `metadata_path` named the metadata after the whole file; a re-export left it,
    unchanged, for a deployment to read the old temperature and thresholds from. (One of
    model.pt's, beside a new model.onnx, belongs to that file.)"""
    old = out.with_suffix(".json")
    try:
        return old if json.loads(old.read_bytes()).get("format") == form else None
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class _Job:
    """What an exporter needs: the module to export, its input and outputs, the images
    to check it on with PyTorch's answers for them (`reference`), and the metadata it
    completes (`checked`, `int8`)."""
    deployable: nn.Module
    spec: InputSpec
    outputs: list[str]
    images: list
    meta: dict
    reference: Callable
    bundle: Path
    levels: list[str]
    quantize: str | None


def _export_onnx(job: _Job) -> bytes:
    """An ONNX graph (ONNX Runtime and others run it), checked against PyTorch; with
    --quantize int8 quantized then, if it keeps val top-1 within INT8_MAX_DROP. The
    metadata goes in the graph too."""
    meta = job.meta
    graph = _onnx_graph(job.deployable, job.spec.size, job.outputs)
    meta["checked"] = _check(graph, job.spec, job.outputs, job.images, job.reference,
                             job.deployable.unknown)
    if job.quantize:
        graph, meta["int8"], thresholds = _quantize(graph, job.bundle, job.spec, job.levels,
                                                    _answers(meta), meta.get("unknown"))
        # int8 cannot agree with PyTorch to 1e-4: that check was the graph before it
        # (`int8` holds how the int8 one compares, on val top-1 and unknown shares).
        meta["checked"]["graph"] = "fp32, before quantizing"
        if thresholds:
            meta["unknown"]["thresholds"] = thresholds
        # The graph's own copy leaves out the timing, which the JSON beside it keeps: a
        # time measured under this machine's load made each export's bytes differ (a new
        # model to a content hash, DVC or git-lfs).
        return _with_metadata(graph, {**meta, "int8": {
            k: v for k, v in meta["int8"].items() if k != "seconds_int8_vs_fp32"}})
    return _with_metadata(graph, meta)


class _CheckedInput(nn.Module):
    """The traced model behind a check of its input, which ONNX Runtime makes from the
    graph's declared input and a trace does not keep: float pixels (0-1, a torch habit), an
    image resized but not cropped, or NCHW were answered without a word."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if pixels.dtype != torch.uint8:
            raise ValueError("pixels: expected uint8 values 0-255 (the decoded image, not "
                             "normalised: the model normalises); got another dtype")
        if pixels.dim() != 4 or pixels.shape[1] != self.size or pixels.shape[2] != self.size \
                or pixels.shape[3] != 3:
            raise ValueError("pixels: expected uint8 RGB (N, " + str(self.size) + ", "
                             + str(self.size) + ", 3), resized and centre-cropped as the "
                             "metadata's input says; got " + str(list(pixels.shape)))
        return self.model(pixels)


def _export_torchscript(job: _Job) -> bytes:
    """A traced TorchScript model behind a scripted check of its input (torch alone runs
    it), metadata in its extra files."""
    size = job.spec.size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with torch.no_grad(), _torchscript():
        traced = torch.jit.script(_CheckedInput(
            torch.jit.trace(job.deployable, example, strict=False), size))
    pixels, generated = _check_pixels(job.images, job.spec)
    with torch.no_grad():
        got = {k: v.numpy() for k, v in traced(torch.from_numpy(pixels)).items()}
    job.meta["checked"] = {**_compare(got, job.reference(pixels), job.outputs,
                                      job.deployable.unknown, "TorchScript export",
                                      len(pixels)), "generated": generated}
    buffer = io.BytesIO()
    with _torchscript():
        torch.jit.save(traced, buffer, _extra_files={"wingspan.json": json.dumps(job.meta)})
    return buffer.getvalue()


@dataclass(frozen=True)
class _Format:
    file: str  # its name in an --out folder
    suffixes: tuple[str, ...]  # the names that are a file of it
    export: Callable[[_Job], bytes]


# The export formats: --format's choices, each with its exporter.
FORMATS = {"onnx": _Format("model.onnx", (".onnx",), _export_onnx),
           "torchscript": _Format("model.pt", (".pt", ".pth"), _export_torchscript)}


@contextlib.contextmanager
def _torchscript():
    """Without torch's FutureWarning that TorchScript is deprecated for torch.export (on
    trace and on save): a C++ or mobile app loads a .pt with libtorch's torch::jit::load,
    which a torch.export .pt2 does not replace, so the format is still offered, and the
    user exporting can do nothing about the warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _write(out: Path, model: bytes, meta: dict) -> Path:
    """The model file and its metadata beside it, replaced together (atomic_paths): an
    error or a kill while writing leaves the previous export's pair, never a model beside
    another export's thresholds, nor a model without its JSON."""
    remove_dead_leftovers(out, metadata_path(out))  # (a killed export's: 14 MB for Lite0)
    with atomic_paths(out, metadata_path(out)) as (model_tmp, meta_tmp):
        model_tmp.write_bytes(model)
        meta_tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


def _answers(meta: dict) -> Callable[[np.ndarray], np.ndarray]:
    """The finest class predict answers, from the graph's finest probabilities: the
    top-down branch of a taxonomy (chosen at T 1, as the README's steps do), else the
    argmax. Not the finest argmax for a taxonomy: that is a class predict need not name."""
    if not meta.get("taxonomy"):
        return lambda probs: probs.argmax(1)
    taxonomy = Taxonomy.from_dict(meta["taxonomy"])
    return lambda probs: taxonomy.answer(probs, temperature=meta["temperature"])


def _quantize(graph: bytes, bundle: Path, spec: InputSpec, levels: list[str],
              answers: Callable[[np.ndarray], np.ndarray], unknown: dict | None = None
              ) -> tuple[bytes, dict, dict[str, float] | None]:
    """ONNX Runtime's static int8 (int8_graph), calibrated on up to 64 training images;
    refused (nothing written) when val top-1 (of `answers`, the classes predict would
    name) drops by more than int8_allowed_drop. `unknown`: the metadata's unknown entry,
    when the graph has unknown scores; the int8 model's own thresholds are returned, set
    on its val scores so that it turns away the stated share of known images, as the fp32
    model does."""
    import onnx

    calibration = _pixels(_split_images(bundle, "train", 64)[0], spec)
    val_paths, val_labels = _split_images(bundle, "val", 1000, level=levels[-1])
    if calibration is None or not val_paths:
        raise WingspanError("int8 needs the run's training and val images to calibrate and "
                            "check it; they were not found.", hint="Export from the run folder.")
    # The network is quantized, the unknown score kept in fp32 (its kNN distances and
    # shares are not what int8 is for); it sees the int8 network's features, so the share
    # of known val images it turns away is measured again below.
    keep = _nodes_only_for(onnx.load_from_string(graph).graph,
                           [UNKNOWN_OUTPUT.format(lv) for lv in levels] if unknown else [],
                           levels)
    finest = levels[-1]
    manifest = read_manifest(bundle)
    classes = list(manifest["classes"][finest])
    # splits.csv names a species that `--rare-below` merged under its genus as itself: the
    # model's class for it is the merged one (else no answer counted right on it, and with
    # every species merged the check found no class the model knows).
    rare = manifest.get("training", {}).get("rare_classes") or {}
    val_labels = [rare.get(c, c) for c in val_labels]
    pixels, kept = _readable_pixels(val_paths, spec)
    truth = np.array([classes.index(c) if c in classes else -1 for c in val_labels])[kept]
    if not len(truth) or (truth < 0).all():  # else both top-1s are 0 and any int8 passes
        raise WingspanError(f"int8 cannot be checked: none of the run's val images could be "
                            f"read with a '{finest}' class the model knows.",
                            hint="Export from the run folder, with its data where it was.")
    wanted = [finest] + ([UNKNOWN_OUTPUT.format(lv) for lv in levels] if unknown else [])

    def run(model: bytes) -> tuple[float, dict[str, np.ndarray], float, np.ndarray]:
        """(val top-1, unknown scores per level, seconds, finest probabilities) of a graph
        on the val images."""
        session = _ort_session(model)
        session.run(wanted, {"pixels": pixels[:1]})  # warmed up: the time is the pass's
        start = time.perf_counter()
        out = [session.run(wanted, {"pixels": pixels[i:i + 32]})
               for i in range(0, len(pixels), 32)]
        seconds = time.perf_counter() - start
        probs = np.concatenate([o[0] for o in out])
        return float((answers(probs) == truth).mean()), {
            lv: np.concatenate([o[1 + i] for o in out]) for i, lv in enumerate(levels)
            if unknown}, seconds, probs

    figures = {"val_images": len(pixels), "calibration_images": len(calibration)}
    fp32_thresholds = unknown["thresholds"] if unknown else {}
    figures["val_top1_fp32"], scores, fp32_seconds, fp32_probs = run(graph)
    if unknown:
        figures["val_unknown_share_fp32"] = float(
            (scores[finest] > fp32_thresholds[finest]).mean())
    lowest = figures["val_top1_fp32"] - int8_allowed_drop(len(pixels))
    tried = {}
    for weights in INT8_WEIGHTS:  # the fast one first; the exact one if it costs accuracy
        quantized = int8_graph(graph, calibration, keep, weights)
        tried[weights], scores, seconds, probs = run(quantized)
        if tried[weights] >= lowest:
            break
    else:
        raise WingspanError(
            "int8 refused: val top-1 " + " and ".join(f"{v:.4f} ({k} weights)"
                                                        for k, v in tried.items())
            + f" against fp32's {figures['val_top1_fp32']:.4f} on {len(pixels)} images "
            "(lower by more than 1 point, or than 1 image on fewer than 100); nothing was "
            "written.", hint="Use the fp32 export (without --quantize).")
    figures.update(val_top1_int8=tried[weights], weights=weights,
                   val_answers_changed=float((answers(probs) != answers(fp32_probs)).mean()),
                   refused={k: v for k, v in tried.items() if k != weights},
                   # (the fp32 graph's agreement with PyTorch is `checked`'s, before it)
                   max_abs_probability_difference_vs_fp32=float(
                       np.abs(probs - fp32_probs).max()),
                   # on the exporting machine: another CPU may differ (VNNI, say)
                   seconds_int8_vs_fp32=round(seconds / fp32_seconds, 2))
    thresholds = None
    if unknown:
        figures["val_unknown_share_int8"] = float(
            (scores[finest] > fp32_thresholds[finest]).mean())
        # int8 moves the features a little, and with them every score: a threshold kept
        # from fp32 turned away 6.6% instead of 5% (README). Set it again, as training
        # does, on these val images' int8 scores.
        thresholds = level_thresholds(scores, unknown["rate"])
        figures["unknown_thresholds_fp32"] = fp32_thresholds
    return quantized, figures, thresholds


# int8 that names another class than fp32 for more val images than this (and 2 or more:
# one near tie may flip) is said (the README's iNat Lite2 run: 2 of 106).
INT8_CHANGED_WARNING = 0.05


def int8_caveats(int8: dict) -> list[str]:
    """What to say of an int8 export's check: too few val images to see a small drop; many
    answers moved though top-1 held (a weak or many-class model's near ties, each moved
    either way: a 300-class one, 59 of 299)."""
    caveats, n = [], int8.get("val_images", 0)
    if n < 100:  # one image is the allowance there (README)
        caveats.append(f"int8 was checked on {n} val images only, where one answer is "
                       f"{1 / max(n, 1):.1%}: a smaller drop goes unseen. Compare it with "
                       "fp32 on photos of your own before relying on it.")
    share = int8.get("val_answers_changed", 0)
    if round(share * n) >= 2 and share > INT8_CHANGED_WARNING:
        caveats.append(f"int8 answers otherwise than fp32 on {share:.0%} of the val images, "
                       "though its top-1 held: the same photo may get another class from "
                       "each. Keep the fp32 export where answers must match predict's.")
    return caveats


# The weights int8 tries, in turn. "int8-7bit": int8 weights in 7 bits, which ONNX Runtime
# runs as integer convolutions, faster than fp32 where the CPU has VNNI, and (7 bits) with
# no saturation where it has not (AVX2: uint8 x int8 pairs sum in 16 bits; full int8
# weights changed 29% of a Lite0 bundle's val top-1s there). "uint8": exact where those
# cost accuracy, but run as fp32 convolutions between quantize steps: on a 2-core AVX2 EPYC,
# Lite0 at 224 px took 4.8x fp32's time (7-bit: 1.1x), its features within cosine 0.984
# of fp32's (7-bit: 0.927).
INT8_WEIGHTS = ("int8-7bit", "uint8")


def int8_graph(graph: bytes, calibration: np.ndarray, keep: list[str] = (),
               weights: str = "uint8") -> bytes:
    """`graph` (input "pixels") as ONNX Runtime's static int8: QDQ, per-channel `weights`
    (INT8_WEIGHTS), activations calibrated on `calibration`; the nodes named in `keep` and
    the size arithmetic stay in fp32."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"pixels": calibration[i:i + 8]}
                                 for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    exclude = [*keep, *_size_arithmetic(onnx.load_from_string(graph).graph)]
    # The quantizer's advice ("consider pre-processing", via the root logger) and ONNX
    # Runtime's notes on each unused initializer would bury the result: errors only.
    try:
        with tempfile.TemporaryDirectory() as tmp, _quiet_logs():
            source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            source.write_bytes(graph)
            quantize_static(str(source), str(target), Batches(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QUInt8 if weights == "uint8"
                            else QuantType.QInt8,
                            reduce_range=weights == "int8-7bit", nodes_to_exclude=exclude)
            return target.read_bytes()
    except OSError as e:
        if e.filename is None:  # a write's error names no file: "The disk is full." sent users
            # to check the output's disk, which had room
            e.filename = f"{tempfile.gettempdir()} (the temporary folder; $TMPDIR moves it)"
        raise


@contextlib.contextmanager
def _quiet_logs():
    """Errors only, from the root logger and ONNX Runtime's default one, for the block."""
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)  # ONNX Runtime's default (it has no getter)


def _nodes_only_for(graph, wanted: list[str], others: list[str]) -> list[str]:
    """Names of the nodes that compute some of the outputs `wanted` and none of `others`
    (found through the graph's edges, whatever the exporter named them)."""
    producer = {name: node for node in graph.node for name in node.output}

    def ancestors(outputs: list[str]) -> dict[int, str]:
        seen, stack = {}, list(outputs)
        while stack:
            node = producer.get(stack.pop())
            if node is not None and id(node) not in seen:
                seen[id(node)] = node.name
                stack.extend(node.input)
        return seen

    mine, theirs = ancestors(wanted), ancestors(others)
    return sorted(name for key, name in mine.items() if key not in theirs)


def _size_arithmetic(graph) -> list[str]:
    """Names of the nodes that work out sizes from the input's shape: the pads of timm's
    TF "same" padding (tf_efficientnet_lite*), a Reshape's or a Slice's arguments. Int8
    would round these integers to nonsense (every Pad then pads wrongly, and the features
    of the offline Lite backbones came out near zero). The walk stops at Shape, whose
    input is the network's own data."""
    producer = {name: node for node in graph.node for name in node.output}
    found, stack = {}, [node.input[i] for node in graph.node
                        for i in _SIZES.get(node.op_type, ()) if i < len(node.input)]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in found:
            found[node.name] = node
            if node.op_type != "Shape":
                stack.extend(node.input)
    return sorted(found)


# The inputs that are sizes, indices or pads, not data (Pad's third, the value it pads
# with, is data: the quantizer gives it the input's scale).
_SIZES = {"Pad": (1, 3), "Reshape": (1,), "Slice": (1, 2, 3, 4), "Expand": (1,),
          "Resize": (1, 2, 3), "Tile": (1,)}


def _onnx_graph(deployable: nn.Module, size: int, levels: list[str]) -> bytes:
    """The ONNX graph, by the same exporter the engines use, fed uint8 NHWC pixels."""
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    return export_onnx(deployable, size, levels, example=example, input_name="pixels")


def _with_metadata(graph: bytes, meta: dict) -> bytes:
    import onnx

    proto = onnx.load_from_string(graph)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    return proto.SerializeToString()


def _val_images(bundle: Path, n: int) -> list[str]:
    """Up to n images of the run's own val split (the run folder's splits.csv)."""
    return _split_images(bundle, "val", n)[0]


def _split_images(bundle: Path, split: str, n: int, level: str = "label"
                  ) -> tuple[list[str], list[str]]:
    """Up to n (paths, labels at `level`) of a split of the run that wrote `bundle`. Its
    splits.csv holds the data's finest level as `label` and every level under its name."""
    splits = bundle.parent / SPLITS_FILE
    if not splits.is_file():
        return [], []
    import pandas as pd

    table = pd.read_csv(splits, dtype=str, keep_default_na=False)
    rows = table[table["split"] == split]
    if len(rows) > n:  # splits.csv is sorted by class: a head would hold the first few only
        rows = rows.sample(n, random_state=0).sort_index()
    return rows["path"].tolist(), rows[level if level in rows.columns else "label"].tolist()


def _classes(bundle: Path) -> dict:
    return read_manifest(bundle)["classes"]


def int8_allowed_drop(images: int) -> float:
    """How much lower int8's val top-1 may be than fp32's: 1 point, or one image where
    there are fewer than 100 (on 25 val images one image is 4 points, and no int8 would
    ever pass on a small data set)."""
    return max(INT8_MAX_DROP, 1 / max(images, 1))


def _pixels(images: list[str], spec: InputSpec) -> np.ndarray | None:
    """The readable ones of `images` as the exported model's input, or None."""
    return _readable_pixels(images, spec)[0]


def _readable_pixels(images: list[str], spec: InputSpec
                     ) -> tuple[np.ndarray | None, list[int]]:
    """(the readable ones of `images` as the model's input or None, their positions),
    each opened as training and predict open it (upright, alpha on white, 16-bit
    stretched, within the pixel budget, and a large JPEG decoded reduced to the resize:
    decoded in full, 9 of 147 val photos got another class than predict gives them, and
    int8's check and thresholds were set on pixels a deployed model never sees)."""
    from wingspan.data.images import open_rgb

    pixels, kept = [], []
    for i, path in enumerate(images):
        try:
            pixels.append(prepare_pixels(open_rgb(path, draft=spec.resize), spec.size,
                                         spec.resize, spec.interpolation))
            kept.append(i)
        except WingspanError:  # unreadable, gone or over the budget: not checked on
            continue
    return (np.stack(pixels) if pixels else None), kept


def _check_pixels(images: list[str], spec: InputSpec) -> tuple[np.ndarray, bool]:
    """What an export is checked on: the readable ones of `images`, else (a bundle moved
    out of its run folder, the data gone) generated pictures, so that no export goes
    unchecked; and whether they were generated."""
    pixels = _pixels(images, spec)
    if pixels is not None:
        return pixels, False
    # Smooth colour fields with noise: the graph's arithmetic on pixels of every kind.
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (8, 4, 4, 3)).astype(np.float32)
    fields = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(0, 3, 1, 2),
                                             size=(spec.size, spec.size), mode="bilinear")
    noise = rng.normal(0, 12, (8, spec.size, spec.size, 3))
    pixels = fields.permute(0, 2, 3, 1).numpy() + noise
    return np.clip(pixels, 0, 255).astype(np.uint8), True


def _ort_session(graph: bytes):
    """An ONNX Runtime session for checking an export, printing errors only: its warnings
    (an initializer it removes, say) are about the graph, not for the user's terminal."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _check(graph: bytes, spec: InputSpec, outputs: list[str], images: list[str],
           reference, unknown: nn.Module | None) -> dict:
    """ONNX Runtime against `reference` on `images` (see `_compare`)."""

    batch, generated = _check_pixels(images, spec)
    session = _ort_session(graph)
    exported = dict(zip(outputs, session.run(None, {"pixels": batch}), strict=True))
    return {**_compare(exported, reference(batch), outputs, unknown, "exported model",
                       len(batch)), "generated": generated}


def _compare(got: dict, want: dict, outputs: list[str], unknown: nn.Module | None, what: str,
             images: int) -> dict:
    """The largest differences between an export's outputs (numpy) and the reference's: in
    probability (refused above TOLERANCE) and in unknown score (refused above
    UNKNOWN_TOLERANCE x (1 + |score|), plus one val image's share for a combined score)."""
    worst = {"probability": 0.0, "unknown": 0.0}
    for name in outputs if images else []:
        kind = "unknown" if unknown is not None and name.startswith("unknown.") else "probability"
        reference = want[name].numpy()
        if not (np.isfinite(got[name]).all() and np.isfinite(reference).all()):
            raise WingspanError(  # (a NaN gap would pass the tolerance below unseen)
                f"The {what} or PyTorch answers NaN or infinity for '{name}' on {images} "
                "images; nothing was written.",
                hint="The bundle's weights or manifest are damaged: use an intact copy of "
                "the bundle, or retrain.")
        gap = np.abs(got[name] - reference)
        if kind == "unknown":
            gap = np.maximum(gap - unknown.step, 0.0) / (1.0 + np.abs(reference))
        worst[kind] = max(worst[kind], float(gap.max()))
    for kind, limit in (("probability", TOLERANCE), ("unknown", UNKNOWN_TOLERANCE)):
        if worst[kind] > limit:
            # The unknown score alone: a model whose features are alike for every image (a
            # random or collapsed one, --weights none) has tied scores that float noise
            # reorders, which no operator is to blame for.
            report = "report this with the backbone's name: an operator may export wrongly."
            raise WingspanError(
                f"The {what} disagrees with PyTorch by {worst[kind]:.2g} in "
                f"{'unknown score' if kind == 'unknown' else kind} on {images} images "
                f"(tolerance {limit:g}); nothing was written.",
                hint=(f"The probabilities agree (within {worst['probability']:.2g}): the "
                      "unknown score alone differs where the model's features are nearly "
                      "alike for every image (an untrained or collapsed model: see its val "
                      f"macro-F1), which ties its scores. Otherwise, {report}"
                      if kind == "unknown" else report[0].upper() + report[1:]))
    checked = {"images": images, "max_abs_probability_difference": worst["probability"],
               "tolerance": TOLERANCE}
    if unknown is not None:
        checked["max_unknown_score_difference"] = worst["unknown"]
    return checked
