"""`wingspan explain RUN IMAGE...`: where the model looked, as Grad-CAM overlays.

Grad-CAM weights the backbone's last feature map (for a CNN that runs as a chain of
units, a finer one where it is a few cells a side: MIN_MAP_SIDE) by the gradient of the
predicted class's score and keeps the positive part: the regions that argued for that
class. One PNG per image: the model's own view of it (resized and centre-cropped as the
bundle says) with the map over it, titled with the class and its calibrated probability.
The class is predict's (a taxonomy model's top-down branch), and where predict answers
otherwise ("unknown", or only a coarser class) the title says so.
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wingspan.data.images import open_rgb, skip_reason
from wingspan.errors import WingspanError
from wingspan.files import atomic_path, fitting_name
from wingspan.inference import Predictor
from wingspan.progress import track


@dataclass
class Explanation:
    path: str
    label: str
    probability: float
    heatmap: np.ndarray  # (size, size) in [0, 1]
    png: Path | None = None
    error: str = ""
    answer: str = ""  # what `wingspan predict` answers: `label`, a coarser class or "unknown"
    otherwise: bool = False  # that answer is not `label` (told by its level: a class may be
    #                          named "unknown")
    replaced: bool = False  # `png` was there before, an earlier call's (of the same name)


def grad_cam(predictor: Predictor, image: torch.Tensor, target: int) -> np.ndarray:
    """The Grad-CAM map of class `target` for one preprocessed image (3, size, size),
    upsampled to the image and scaled to [0, 1] (all zeros when nothing argues for it).

    Written out rather than captum's LayerGradCam, which needs the layer's output to be a
    channels-first map: the backbone's features are laid out as one first
    (`Backbone.spatial`: a ViT's patch tokens on their grid, a Swin's NHWC permuted)."""
    model = predictor.model.float().eval()
    backbone = model.backbone
    with _tokens_into_last_block(backbone) as taken, torch.enable_grad():
        # A gradient to the input makes one reach the features, frozen weights or not.
        x = image[None].to(next(model.parameters()).device).requires_grad_(True)
        features, mapped = _features_and_map(backbone, x)
        if not isinstance(features, torch.Tensor):  # (CrossViT: a map per branch)
            raise WingspanError(f"{backbone.spec.name} gives {len(features)} feature maps, "
                                "not one: Grad-CAM cannot draw it.")
        score = model.head(backbone.pool(features))[predictor.level][0, target]
        prefix = None
        if taken:  # its class and register tokens before the patches, if any (CaiT: none)
            prefix = taken[0].shape[1] - (features.shape[1]
                                          - getattr(backbone.net, "num_prefix_tokens", 0))
            mapped, prefix = (taken[0], prefix) if prefix >= 0 else (features, None)
        # The gradient to the features alone: .backward() would also fill (and, call after
        # call, add up) a gradient for every weight, a second copy of the model kept in a
        # server for nothing.
        (grad,) = torch.autograd.grad(score, mapped)
        maps = backbone.spatial(mapped.detach(), prefix)
        grads = backbone.spatial(grad, prefix)
    weights = grads.mean((2, 3), keepdim=True)  # each channel's importance for the class
    cam = torch.relu((weights * maps).sum(1, keepdim=True))
    cam = F.interpolate(cam, tuple(image.shape[-2:]), mode="bilinear", align_corners=False)
    cam = cam[0, 0].float().cpu().numpy()
    top = cam.max()
    return cam / top if top > 0 else np.zeros_like(cam)


# A CNN's last map coarser than this many cells a side (3 x 3 at the demo's 96 px) is
# drawn from the map one stride before it instead, where the network runs as a chain
# of units (Backbone.units: most CNNs; not GhostNetV2, MobileNetV4 or StarNet).
# Measured on a Lite0 at 96 px, right on 64 of 64 demo butterflies placed anywhere in
# the frame: the last map's peak fell in the butterfly's box on 20% of them (chance:
# the box is 19% of the image; a centre blob, 59%), the 6 x 6 map's on 70%, as
# covering patches of the image (what the model uses) on 67%.
MIN_MAP_SIDE = 6


def _features_and_map(backbone, x: torch.Tensor):
    """(the backbone's features, the map Grad-CAM draws): the features themselves, or for a
    CNN that is a chain of units and whose last map is coarser than MIN_MAP_SIDE, the
    deepest map of the grid one stride finer (the chain run unit by unit, keeping each
    output). At 224-260 px the
    default backbones' last maps are 7 x 7 to 9 x 9: drawn as they are."""
    units = backbone.units()
    if units is None:
        features = backbone(x)
        return features, features
    outputs = [x]
    for unit in units:
        outputs.append(unit(outputs[-1]))
    features = outputs[-1]
    channels_last = getattr(backbone.net, "output_fmt", "NCHW") == "NHWC"
    if features.dim() != 4 or channels_last or min(features.shape[-2:]) >= MIN_MAP_SIDE:
        return features, features
    finer = [o for o in outputs[1:-1] if isinstance(o, torch.Tensor) and o.dim() == 4
             and min(o.shape[-2:]) > min(features.shape[-2:])]
    return features, (finer[-1] if finer else features)


@contextmanager
def _tokens_into_last_block(backbone):
    """The tokens into the last block of a ViT that answers from its class token alone (a
    list, filled by the block's first forward in this thread): its tokens out reach the
    answer only through that token, so their gradient is 0 and every map was blank
    (pytorch-grad-cam's recipe for ViTs maps these instead). Empty for other networks.
    This thread's own forward only: a server explains in several threads at once."""
    net = getattr(backbone, "net", None)
    blocks = getattr(net, "blocks", None)
    if getattr(net, "global_pool", None) != "token" or not isinstance(
            blocks, torch.nn.Sequential | torch.nn.ModuleList) or not len(blocks):
        yield []
        return
    me, taken = threading.get_ident(), []

    def keep(_, args):
        if threading.get_ident() == me and not taken:
            taken.append(args[0])

    hook = blocks[-1].register_forward_pre_hook(keep)
    try:
        yield taken
    finally:
        hook.remove()


def explain(model: str | Path, images: list[str], out: str | Path,
            device: str = "auto", progress: bool = True) -> list[Explanation]:
    """An overlay PNG per image in `out`; unreadable images are reported, not fatal.
    `progress`: a bar while they are drawn (about a second each on a laptop CPU)."""
    return list(explain_each(model, images, out, device=device, progress=progress))


def explain_each(model: str | Path, images: list[str], out: str | Path,
                 device: str = "auto", progress: bool = True) -> Iterator[Explanation]:
    """`explain`, each image's explanation given as soon as its overlay is written (the
    command's line per image then comes as it is drawn, not all at the end)."""
    out = Path(out)
    if out.exists() and not out.is_dir():  # before any work
        raise WingspanError(f"--out {out} is a file, not a folder for the overlays.",
                            hint="Give a folder (it is made if missing).")
    predictor = Predictor(model, device=device, runtime="torch", precision="fp32")
    view = predictor.views(tta=False)[0]
    taken = set()
    stems = Counter(Path(p).stem for p in images)
    shared = {stem for stem, n in stems.items() if n > 1}
    for path in track(images, "Explaining", enabled=progress):
        try:
            picture = open_rgb(path, draft=predictor.draft)  # decoded as predict decodes it
        except WingspanError as e:
            yield Explanation(path, "", 0.0, np.zeros(0), error=skip_reason(e))
            continue
        x = view(picture)
        e, title = explain_view(predictor, x)
        e.path, e.png = path, out / f"{_unique_name(Path(path), taken, shared)}.gradcam.png"
        e.replaced = e.png.exists()
        save_overlay(model_view(x, predictor), e.heatmap, title, e.png)
        yield e


def explain_view(predictor: Predictor, x: torch.Tensor, target: str | None = None
                 ) -> tuple[Explanation, str]:
    """The explanation (class, probability, Grad-CAM map, predict's answer) of one
    preprocessed image, and its title: the map of `target`, else of the class predict
    names; `wingspan explain` and the server's /explain draw the same."""
    said, top, level, probs = _answer(predictor, x)
    # (the probability from the pass predict makes, on its engine: a second pass in fp32
    # cost time, and in a server its last digits differed from /predict's)
    index = predictor.classes.index(target or top)
    label, probability = predictor.classes[index], float(probs[index])
    heatmap = grad_cam(predictor, x, index)
    otherwise = not (said == label and level == predictor.level)  # (a class may be "unknown")
    # (a percentage with a decimal, as predict and the served page show it: "1.00" beside
    # the page's 99.8% read as certainty)
    title = f"{label}  {probability:.1%}" + (f"  (says: {said})" if otherwise else "")
    return Explanation("", label, probability, heatmap, answer=said, otherwise=otherwise), title


def _answer(predictor: Predictor, x: torch.Tensor
            ) -> tuple[str, str, str | None, np.ndarray]:
    """(what predict answers for this view, the finest class the map is drawn for, the
    level the answer is given at, None for unknown, the finest level's calibrated
    probabilities): the
    top-down branch's class for a taxonomy model, and "unknown" or a coarser class where
    the unknown scores say so, as `wingspan predict` does."""
    from wingspan.predict import answer_for

    outputs, scores = predictor.forward_with_scores(x[None])
    probs = torch.softmax(outputs[predictor.level][0] / predictor.temperature, 0).numpy()
    known = predictor.known_level({lv: float(s[0]) for lv, s in scores.items()}
                                  if scores else None)
    branch, level, said = answer_for(predictor, probs, known)
    top = branch[-1][1] if branch else predictor.classes[int(probs.argmax())]
    return said, top, level, probs


def _unique_name(path: Path, taken: set[str], shared: set[str] = frozenset()) -> str:
    """The file's stem, or with its folder's name before it when images of the call share
    that stem (`shared`; class folders often reuse 0001.jpg): every one of them, so that no
    name is left to mean either; then a number. No overlay is written over another."""
    name = path.stem
    if name in shared or name in taken:
        name = f"{path.parent.name}-{path.stem}"
    name = fitting_name(name)  # (with its temporary name: within a file name's 255 bytes)
    base, n = name, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def model_view(x: torch.Tensor, predictor: Predictor) -> np.ndarray:
    """A preprocessed image back as uint8 RGB pixels (what the model saw)."""
    mean = torch.tensor(predictor.norm["mean"]).view(3, 1, 1)
    std = torch.tensor(predictor.norm["std"]).view(3, 1, 1)
    return ((x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def save_overlay(pixels: np.ndarray, heatmap: np.ndarray, title: str,
                 path: Path | None) -> bytes | None:
    """The overlay as a PNG at `path`, or its bytes when `path` is None."""
    from wingspan.plotting import literal_text

    with literal_text():
        return _overlay(pixels, heatmap, title, path)


def _overlay(pixels: np.ndarray, heatmap: np.ndarray, title: str, path: Path | None
             ) -> bytes | None:
    from wingspan.plotting import GRADCAM_COLORS, flat_note, subplots

    if note := flat_note(heatmap):
        title += f"\n({note})"
    fig, ax = subplots(figsize=(4, 4.3), dpi=100)
    ax.imshow(pixels)
    shown = ax.imshow(heatmap, cmap=GRADCAM_COLORS, alpha=0.45, vmin=0, vmax=1)
    key = fig.colorbar(shown, ax=ax, orientation="horizontal", fraction=0.04, pad=0.02,
                       ticks=[0, 1])  # (what the colours mean, said on the image itself)
    key.ax.set_xticklabels(["least evidence", "most"], fontsize=9)
    ax.set_title(title, fontsize=11)
    ax.axis("off")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    if path is None:
        return buffer.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return None
