"""`wingspan export RUN --format onnx`: a model that runs without wingspan.

The exported graph takes what any image library gives: RGB pixels, uint8, already
resized and centre-cropped to the model's input size, as (N, size, size, 3). The
normalisation, the network and the temperature-scaled softmax are inside it, so it returns
calibrated probabilities per taxonomic level. Everything needed to prepare an image and
name the outputs (input size, the resize before the crop, class names, taxonomy,
temperature) rides along: in the ONNX file's metadata, and in a JSON file beside it.
Exporting checks the graph against PyTorch on real images and refuses an export that
does not agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wingspan.errors import WingspanError
from wingspan.files import atomic_path, write_text
from wingspan.inference import find_bundle
from wingspan.models import load_bundle
from wingspan.models.runtime import export_onnx

FORMATS = ("onnx",)
TOLERANCE = 1e-4  # largest |probability difference| the export may show against PyTorch
METADATA_KEY = "wingspan"


class _Deployable(nn.Module):
    """uint8 RGB (N, H, W, 3) -> {level: calibrated probabilities}: preprocessing and
    calibration folded into the graph."""

    def __init__(self, model: nn.Module, mean, std, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)
        self.temperature = float(temperature)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return {lv: torch.softmax(logits / self.temperature, -1)
                for lv, logits in self.model(x).items()}


def prepare_pixels(image, size: int, resize: int) -> np.ndarray:
    """A PIL image as the exported model wants it: RGB, shorter side resized to `resize`
    (bicubic), the centre `size` square, uint8 (size, size, 3). The README's example does
    the same in a few lines of Pillow."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def export_model(run: str | Path, out: str | Path | None = None, fmt: str = "onnx",
                 check_images: list[str] | None = None) -> Path:
    """Write the model as `out` (default RUN/export/model.onnx) plus `out`.json; returns
    the model file. `check_images`: images to compare the export with PyTorch on
    (default: up to 16 of the run's val split)."""
    if fmt not in FORMATS:
        raise WingspanError(f"Unknown export format '{fmt}'.",
                            hint=f"Available: {', '.join(FORMATS)}.")
    bundle = find_bundle(run)
    model, manifest = load_bundle(bundle)
    pre = manifest["preprocessing"]
    size, resize = int(pre["input_size"]), round(int(pre["input_size"]) / pre["crop_pct"])
    temperature = float(manifest.get("calibration", {}).get("temperature", 1.0))
    levels = list(manifest["classes"])
    deployable = _Deployable(model.float().eval(), pre["mean"], pre["std"], temperature).eval()
    meta = {
        "format": "wingspan-onnx", "input": {
            "name": "pixels", "layout": "NHWC", "dtype": "uint8", "size": size,
            "resize_shorter_side_to": resize, "then": f"centre crop {size}x{size}",
            "channels": "RGB"},
        "outputs": levels, "classes": manifest["classes"], "taxonomy": manifest.get("taxonomy"),
        "temperature": temperature, "backbone": manifest["model"]["backbone"],
        "metrics": manifest.get("metrics", {}).get("best"),
    }
    out = Path(out) if out else bundle.parent / "export" / "model.onnx"
    graph = _onnx_graph(deployable, size, levels, meta)
    worst = _check(deployable, graph, size, resize, levels,
                   check_images or _val_images(bundle, 16))
    meta["checked"] = {"images": len(check_images or _val_images(bundle, 16)),
                       "max_abs_probability_difference": worst, "tolerance": TOLERANCE}
    graph = _with_metadata(graph, meta)
    with atomic_path(out) as tmp:
        tmp.write_bytes(graph)
    write_text(out.with_suffix(".json"), json.dumps(meta, indent=2))
    return out


def _onnx_graph(deployable: nn.Module, size: int, levels: list[str], meta: dict) -> bytes:
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
    splits = bundle.parent / "splits.csv"
    if not splits.is_file():
        return []
    import pandas as pd

    table = pd.read_csv(splits, dtype=str, keep_default_na=False)
    return table.loc[table["split"] == "val", "path"].head(n).tolist()


def _check(deployable: nn.Module, graph: bytes, size: int, resize: int, levels: list[str],
           images: list[str]) -> float:
    """The largest |probability difference| between ONNX Runtime and PyTorch on `images`
    (refused above TOLERANCE); 0 when there is no image to check on."""
    import onnxruntime as ort
    from PIL import Image

    pixels = []
    for path in images:
        try:
            with Image.open(path) as im:
                pixels.append(prepare_pixels(im, size, resize))
        except OSError:
            continue
    if not pixels:
        return 0.0
    batch = np.stack(pixels)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    exported = dict(zip(levels, session.run(None, {"pixels": batch}), strict=True))
    with torch.inference_mode():
        reference = deployable(torch.from_numpy(batch))
    worst = max(float(np.abs(exported[lv] - reference[lv].numpy()).max()) for lv in levels)
    if worst > TOLERANCE:
        raise WingspanError(
            f"The exported model disagrees with PyTorch by {worst:.2g} in probability on "
            f"{len(pixels)} images (tolerance {TOLERANCE:g}); nothing was written.",
            hint="Report this with the backbone's name: an operator may export wrongly.")
    return worst
