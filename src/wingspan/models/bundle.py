"""The model bundle: what predict, evaluate, export and serve all load.

Weights as safetensors plus a JSON manifest (format version, backbone, head layout,
class names per level, taxonomy, preprocessing, training config, metrics, wingspan
version, a checksum of the weights). Either a directory holding `model.safetensors`
and `manifest.json`, or one `.safetensors` file with the manifest in its metadata.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from wingspan import __version__
from wingspan.errors import WingspanError, command, first_line
from wingspan.files import atomic_path, atomic_paths, remove_dead_leftovers
from wingspan.models.classifier import Classifier, Preprocessing
from wingspan.models.unknown import PREFIX as UNKNOWN_PREFIX
from wingspan.models.unknown import UnknownDetector

FORMAT = "wingspan-bundle"
# 2: the unknown scores' Mahalanobis precision is stored as its upper triangle, which a
# reader of format 1 would look for in vain; this reader reads both.
FORMAT_VERSION = 2
WEIGHTS, MANIFEST = "model.safetensors", "manifest.json"
METADATA_KEY = "wingspan_manifest"


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A checksum over names, dtypes, shapes and bytes: any change to a tensor shows."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# What a bundle's predictions mean, besides its weights: a checksum covers these too.
MEANING = ("model", "head", "classes", "taxonomy", "preprocessing")


def meaning_digest(manifest: dict) -> str:
    """A checksum over the manifest entries that decide what the outputs mean."""
    return hashlib.sha256(json.dumps({k: manifest.get(k) for k in MEANING},
                                     sort_keys=True).encode()).hexdigest()


def save_bundle(model: Classifier, path: str | Path, classes: dict[str, list[str]],
                taxonomy: dict | None = None, training: dict | None = None,
                metrics: dict | None = None, weights_source: str | None = None,
                calibration: dict | None = None, unknown: UnknownDetector | None = None,
                inference: dict | None = None) -> Path:
    """Write a bundle: a directory, or a single file when `path` ends in .safetensors. In a
    directory the manifest is written last, so a bundle with a manifest is complete."""
    for level, n in model.head.config.outputs.items():
        if len(classes.get(level, [])) != n:
            raise WingspanError(f"The head has {n} outputs for '{level}' but "
                                f"{len(classes.get(level, []))} class names were given.")
    if taxonomy is not None:
        # Predictions read the branch by index into the model's classes: a taxonomy whose
        # classes differ would name the wrong species without a word.
        for level, names in taxonomy["classes"].items():
            if level in classes and list(names) != list(classes[level]):
                raise WingspanError(f"The taxonomy's '{level}' classes are not the model's "
                                    f"({len(names)} against {len(classes[level])}, or in "
                                    "another order); the bundle would name wrong classes.")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if unknown is not None:  # beside the weights, under the checksum like them
        state.update(unknown.tensors())
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "wingspan_version": __version__,
        "model": model.construction(), "head": model.head.config.to_dict(),
        "timm_name": model.spec.timm_name, "classes": classes, "taxonomy": taxonomy,
        "preprocessing": model.preprocessing.to_dict(), "weights_source": weights_source,
        "training": training or {}, "metrics": metrics or {},
        **({"calibration": calibration} if calibration else {}),
        **({"unknown": unknown.manifest()} if unknown else {}),
        **({"inference": inference} if inference else {}),  # (training.lossy_check)
        "weights_sha256": weights_digest(state),
    }
    manifest["meaning_sha256"] = meaning_digest(manifest)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        # (not its folder's .tmpXXXXXX files: a user's folder, where another program may
        # write through such names too)
        _atomic(path, lambda tmp: save_file(state, tmp, metadata={
            METADATA_KEY: json.dumps(manifest)}))
    else:
        path.mkdir(exist_ok=True)
        remove_dead_leftovers(path / WEIGHTS, path / MANIFEST)  # (a killed calibrate's)
        # Both written before either is renamed, and put back together on an error or
        # Ctrl-C: one then the other (20 ms apart) left `calibrate --unknown`'s new weights
        # beside the old manifest's checksum when stopped, a bundle nothing would load.
        with atomic_paths(path / WEIGHTS, path / MANIFEST) as (weights, described):
            save_file(state, str(weights))
            described.write_text(json.dumps(manifest, indent=2))
    return path


def _atomic(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


def read_manifest(path: str | Path) -> dict:
    """The manifest of a bundle, checked for format and version."""
    path = Path(path)
    if path.is_dir():
        missing = [n for n in (MANIFEST, WEIGHTS) if not (path / n).is_file()]
        if len(missing) == 2:  # a data folder, say
            raise WingspanError(f"{path} is not a model: it holds no {MANIFEST} or {WEIGHTS}.",
                                hint="Give a run folder (runs/NAME) or a model bundle (a "
                                     "run's model/ folder).")
        if missing:
            raise WingspanError(f"{path} is not a complete model bundle: {missing[0]} missing.",
                                hint="Point to a bundle written by `wingspan train`.")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise WingspanError(f"{path / MANIFEST} is corrupt: {e}", hint=DAMAGED_HINT) from e
    elif path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            manifest = json.loads(meta[METADATA_KEY])
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
            exported = {".onnx": "ONNX Runtime", ".pt": "torch.jit.load"}.get(
                path.suffix.lower())
            why = ("no wingspan manifest in its metadata" if isinstance(e, KeyError) else
                   "not a safetensors file" if isinstance(e, SafetensorError) else first_line(e))
            from wingspan.training.folder import CHECKPOINTS_DIR

            run = path.parent.parent
            if path.parent.name == CHECKPOINTS_DIR and (run / "train.log").is_file():
                hint = (f"It is a training checkpoint of the run {run}: give the run folder, "
                        f"or continue the run with `{command('train', '--resume', run)}` "
                        "(ws.resume) if it did not finish.")
            elif exported:
                hint = (f"It is an exported model, for {exported} (the README's export "
                        "section); wingspan's commands take its run folder (runs/NAME) or "
                        "bundle.")
            else:
                hint = ("Give a run folder (runs/NAME) or a model bundle (a run's model/ "
                        "folder, or a .safetensors file wingspan wrote).")
            raise WingspanError(f"{path} is not a wingspan model bundle ({why}).",
                                hint=hint) from e
    else:
        raise WingspanError(f"No model bundle at {path}.")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise WingspanError(f"{path} is not a wingspan model bundle.")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise WingspanError(
            f"{path} was written in bundle format {version}, newer than this wingspan "
            f"({__version__}) reads (up to {FORMAT_VERSION}).",
            hint="Upgrade wingspan: pip install -U wingspan")
    calibration = manifest.get("calibration", {})
    _check_temperature(calibration.get("temperature", 1.0) if isinstance(calibration, dict)
                       else calibration, "calibration", path)
    return manifest


def _check_temperature(value, section: str, path: Path) -> None:
    """A temperature divides every logit: zero would answer NaN, a negative one the least
    likely class. The sections that hold one (calibration, unknown) are outside the
    manifest's checksums, as `wingspan calibrate` rewrites them, so they are checked here."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise WingspanError(
            f"{path}: the manifest's {section} temperature is {value!r}, not a positive "
            "number: the manifest was edited or damaged after the bundle was written.",
            hint="Use an intact copy of the bundle, or retrain.")


# (a run's bundle is written from its best checkpoint, which a resume reads again)
DAMAGED_HINT = ("Use an intact copy of the bundle, or retrain; a run folder that still has "
                "its checkpoints writes its model again with `wingspan train --resume RUN` "
                "(as trained: a `wingspan calibrate` since is to be run again).")


def checked_weights(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """A bundle's weights, read and checked against its manifest's checksum."""
    weights = path / WEIGHTS if path.is_dir() else path
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise WingspanError(f"The weights in {weights} are corrupt: {e}",
                            hint=DAMAGED_HINT) from e
    if weights_digest(state) != manifest.get("weights_sha256"):
        raise WingspanError(
            f"The weights in {weights} do not match the checksum in its manifest: the "
            "bundle was changed or damaged after it was written.", hint=DAMAGED_HINT)
    return state


def load_bundle(path: str | Path, with_unknown: bool = False):
    """Rebuild the model a bundle describes and load its weights, after checking them:
    (model, manifest), and with `with_unknown` its fitted unknown scores too (None when
    the bundle has none)."""
    path = Path(path)
    manifest = read_manifest(path)
    state = checked_weights(path, manifest)
    weights = path / WEIGHTS if path.is_dir() else path
    expected = manifest.get("meaning_sha256")  # absent from bundles written before it was
    if expected and meaning_digest(manifest) != expected:
        raise WingspanError(
            f"The class names, taxonomy, preprocessing or model description in {path} do not "
            "match their checksum: the manifest was edited after the bundle was written, and "
            "its predictions would be named or prepared wrongly.",
            hint=DAMAGED_HINT)
    try:
        # (its random first weights are replaced below: drawn from a generator of their
        # own, so that loading a model leaves a seeded caller's numbers as they were)
        with torch.random.fork_rng(devices=[]):
            model = Classifier(**manifest["model"])
    except WingspanError as e:
        raise WingspanError(f"The bundle's backbone cannot be built: {e.message}",
                            hint=e.hint) from e
    except (KeyError, TypeError) as e:
        raise WingspanError(f"{path}: the manifest's model description is invalid ({e}).") from e
    extra = {k: state.pop(k) for k in [k for k in state if k.startswith(UNKNOWN_PREFIX)]}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WingspanError(f"The weights in {weights} do not fit the model its manifest "
                            f"describes: {first_line(e)}") from e
    for level, n in model.head.config.outputs.items():
        names = manifest.get("classes", {}).get(level) or []
        if len(names) != n:
            raise WingspanError(f"{path}: the model has {n} '{level}' classes but its manifest "
                                f"names {len(names)}.", hint="Use an intact copy of the "
                                "bundle, or retrain.")
    # The manifest says how images were prepared (a CNN trained at another size records it
    # there only), so a bundle saved again from this model keeps it.
    pre = manifest.get("preprocessing")
    if pre:
        model.preprocessing = Preprocessing.from_dict(pre)
    model.eval()
    if not with_unknown:
        return model, manifest
    unknown = None
    if "unknown" in manifest:
        entry = manifest["unknown"]
        try:
            _check_temperature(entry["temperature"], "unknown scores'", path)
            if not entry["thresholds"]:
                raise ValueError("no thresholds")
            unknown = UnknownDetector.from_bundle(entry, extra)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise WingspanError(f"{path}: the manifest's unknown scores are damaged ({e!r}).",
                                hint="Use an intact copy of the bundle, or retrain.") from e
    return model, manifest, unknown


def update_manifest(path: str | Path, **changes) -> dict:
    """Add or replace manifest entries (e.g. a fitted temperature); weights are untouched."""
    path = Path(path)
    manifest = {**read_manifest(path), **changes}
    if path.is_dir():
        remove_dead_leftovers(path / MANIFEST)
        _atomic(path / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest,
                                                                             indent=2)))
    else:
        state = load_file(str(path))
        _atomic(path, lambda tmp: save_file(state, tmp, metadata={
            METADATA_KEY: json.dumps(manifest)}))
    return manifest


def is_complete(path: Path, intact: bool = False) -> bool:
    """Whether training wrote its bundle to the end (the manifest comes last), and with
    `intact` whether its weights match their checksum (a resume writes a damaged one again
    from the checkpoint; reading them costs a second or two for a ResNet-50)."""
    try:
        manifest = read_manifest(path)
        return "calibration" in manifest and (not intact or bool(checked_weights(path,
                                                                                manifest)))
    except WingspanError:
        return False
