"""`wingspan adapt`: fit a trained model to unlabelled photos from where it will be used.

A model trained on web crops or museum specimens meets garden photos it was never shown:
the same species, another look. Their labels are what the user does not have, but the
photos themselves say a lot: the model is right about most of them, and photos of one
species lie near each other in feature space. So, self-training on the pooled features of
the fine-tuned backbone (which stays as it is), from two views of each photo's class that
must agree: the head's, and the one label spreading gives it (scikit-learn's
LabelSpreading over the k-nearest-neighbour graph of the run's labelled training images
and the photos: each photo takes the classes of its neighbours, photos passing them on to
photos). The photos on which both agree join the training images, and the head (a linear
layer per level) is fitted again on both, as a logistic regression.

Why two views: each alone lets through mistakes the other would catch. On Leeds -> iNat
(eight figures, docs/performance.md), the head's own confident photos in rounds scored
0.792 in the mean, label spreading's classes alone 0.800, the photos both agree on 0.814;
scikit-learn's SelfTrainingClassifier, which starts from a fit on the labelled images
alone rather than the run's head, scored 3 points less than the agreement.

The backbone, the class names and the preprocessing stay; the temperature and the unknown
scores are fitted again on the run's own val and training images, as training fits them.
One process does it all (like calibrate): it runs the backbone once per image.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.semi_supervised import LabelSpreading

from wingspan.config import AdaptConfig
from wingspan.data import read_dataset
from wingspan.data.leaks import content_hashes
from wingspan.data.samples import PATH, SPLIT
from wingspan.errors import WingspanError, none_read
from wingspan.evaluate.calibration import calibration_record, softmax
from wingspan.evaluate.fairness import same_bytes
from wingspan.evaluate.own_images import own_images, run_folder, trained_seed
from wingspan.files import (
    disk_spelling,
    put_back,
    real_paths,
    replace_folder,
    write_csv,
    write_text,
)
from wingspan.inference import Predictor
from wingspan.models import save_bundle
from wingspan.models.unknown import UnknownDetector
from wingspan.predict import expand_paths
from wingspan.training.folder import (
    ADAPT_PHOTOS_FILE,
    CONFIG_FILE,
    HISTORY_FILE,
    SPLITS_FILE,
    adapt_photo_rows,
    adapted_photos,
    hold_lock,
    release_lock,
)

# Files of the run folder that hold for the adapted run too: the data, the settings and
# the curves of the training that made its backbone (metrics.json and the evaluations
# describe the model before adapting, so they stay behind).
KEPT = (CONFIG_FILE, SPLITS_FILE, HISTORY_FILE)
SETTINGS = ("neighbours", "spreading", "confidence", "rounds", "c")  # kept in adapt.json
PURPOSE = "adapting refits the head on"  # (said where the run's own images are missing)
NEVER = -1e4  # the bias of a class the fit never saw: its logit never wins


def self_train(labelled: np.ndarray, labels: np.ndarray, photos: np.ndarray,
               logits: np.ndarray, classes: int, config: AdaptConfig | None = None,
               temperature: float = 1.0
               ) -> tuple[np.ndarray | None, np.ndarray | None, list[int]]:
    """`labelled` (N, C) features with `labels`, `photos` (M, C) unlabelled features with the
    run's head's `logits` (M, K). Returns the new linear layer's (weight (K, C), bias (K,)),
    or (None, None) when no photo was agreed on, and how many photos each refit used."""
    config = config or AdaptConfig()
    spread = spread_labels(labelled, labels, photos, config)
    weight = bias = None
    used = []
    for _ in range(config.rounds):
        # --confidence bars the probability a user sees: the head's calibrated one (its
        # logits over the run's temperature) in the first round, the refit's own after.
        probs = softmax(logits, temperature if weight is None else 1.0)
        keep = (probs.argmax(1) == spread) & (probs.max(1) >= config.confidence)
        used.append(int(keep.sum()))
        if not keep.any():  # nothing to learn from: a fit on the labelled images alone
            break           # would only lose what the head stage gave the head
        fit = LogisticRegression(C=config.c, max_iter=3000).fit(
            np.concatenate([labelled, photos[keep]]), np.concatenate([labels, spread[keep]]))
        weight, bias = _linear(fit, classes, labelled.shape[1])
        logits = photos @ weight.T + bias
    return weight, bias, used


def spread_labels(labelled: np.ndarray, labels: np.ndarray, photos: np.ndarray,
                  config: AdaptConfig) -> np.ndarray:
    """Each photo's class by label spreading (Zhou et al. 2004) over the k-nearest-neighbour
    graph of the labelled images and the photos, on L2-normalised features (the cosine
    neighbours that the unknown score's kNN uses too)."""
    x = np.concatenate([labelled, photos])
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = np.concatenate([labels, np.full(len(photos), -1)])  # -1: unlabelled
    fit = LabelSpreading(kernel="knn", n_neighbors=min(config.neighbours, len(x) - 1),
                         alpha=config.spreading, max_iter=1000).fit(x, y)
    return fit.transduction_[len(labelled):]


def _linear(fit: LogisticRegression, classes: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's fit as one logit per class, for every class of the head (a class that
    no image of the fit showed gets a logit that never wins)."""
    weight, bias = np.zeros((classes, width)), np.full(classes, NEVER)
    if len(fit.classes_) == 2:  # one decision function: logits (0, z) give the same softmax
        weight[fit.classes_[1]], bias[fit.classes_[1]] = fit.coef_[0], fit.intercept_[0]
        bias[fit.classes_[0]] = 0.0
    else:
        weight[fit.classes_], bias[fit.classes_] = fit.coef_, fit.intercept_
    return weight, bias


def adapt(model: str | Path, photos: list[str], out: str | Path | None = None,
          config: AdaptConfig | None = None, progress: bool = True,
          workers: int | None = None, seed: int | None = None) -> dict:
    """Self-train the head of the run `model` on unlabelled `photos` (files, folders,
    globs) and write the adapted run to `out` (default: `default_out`). `seed` draws the
    sample of a run's own images past MAX_FIT_IMAGES: by default the run's, as training and
    calibrate draw it. Returns what it did (also in OUT/adapt.json)."""
    config = config or AdaptConfig()
    predictor = Predictor(model, device=config.device, batch_size=config.batch_size,
                          workers=workers, progress=progress, precision=config.precision,
                          runtime=config.runtime)
    seed = trained_seed(predictor) if seed is None else seed
    run_dir = run_folder(predictor, PURPOSE)  # before anything is computed
    head = predictor.model.head
    if head.config.hidden:
        raise WingspanError("This model's head has a hidden layer; `wingspan adapt` refits "
                            "a linear head.",
                            hint="Train it again without `hidden` in its --config file (a "
                                 "linear head, the default) to adapt it.")
    if out:  # a wrong --out is said before the photos are looked for
        _check_out(Path(out), run_dir)
    # A path that is no image (a HEIC from a phone, a typo) is skipped and named, as
    # predict does; only when nothing is left is it an error.
    paths, missing = expand_paths([str(p) for p in photos])
    if not paths:
        # (not "Cannot read: photos (the folder holds no images)": nothing failed to read)
        raise WingspanError("No photos to adapt to: " + "; ".join(f"{p} ({why})"
                                                              for p, why in missing) + "."
                            if missing else f"No image files among {', '.join(photos)}.",
                            hint="Give image files, folders of images or globs.")
    out = _claim(Path(out) if out else None, run_dir)
    try:
        return _adapt_into(out, predictor, run_dir, paths, missing, config, progress, seed)
    finally:
        release_lock(out.parent, f".{out.name}.lock")


def _adapt_into(out: Path, predictor: Predictor, run_dir: Path, paths: list[str],
                missing: list[tuple[str, str]], config: AdaptConfig, progress: bool,
                seed: int) -> dict:

    manifest, levels = predictor.manifest, predictor.model.levels
    preds = list(predictor.run(paths, progress=progress, with_features=True))
    ok = [i for i, p in enumerate(preds) if not p.error]
    if not ok:
        raise WingspanError(none_read(len(paths), "photo",
                                      example=f"{preds[0].path}: {preds[0].error}"))
    x_photos = np.stack([preds[i].features for i in ok]).astype(np.float64)
    features = own_images(predictor, PURPOSE, per_class=True, seed=seed, progress=progress)
    train, val = features["train"], features["val"]
    x_train, x_val = train.features.astype(np.float64), val.features.astype(np.float64)

    fine = levels[-1]
    # The class answered, for probabilities at T 1: a taxonomy's top-down branch (chosen at
    # T 1 whatever the temperature), as training and evaluate score it.
    answer = ((lambda p: predictor.taxonomy.answer(p, temperature=1.0)) if predictor.taxonomy
              else (lambda p: p.argmax(1)))
    before, y_val = _logits(predictor, x_photos), val.labels[fine]
    val_before = float(np.mean(answer(softmax(_logits(predictor, x_val)[fine])) == y_val))
    used, unfitted = _refit_heads(predictor, x_train, train.labels, x_photos, before, config)
    after = _logits(predictor, x_photos)

    # Temperature and unknown scores, as training fits them (on the run's own images).
    val_logits = _logits(predictor, x_val)
    calibration = calibration_record(val_logits[fine], y_val, "val", answer=answer)
    temperature = calibration["temperature"]
    unknown = (_refit_unknown(predictor, x_train, train.labels, x_val, temperature, seed)
               if predictor.unknown is not None else None)

    names = manifest["classes"][fine]
    answered = {when: answer(softmax(logits[fine])) for when, logits in
                (("before", before), ("after", after))}
    given = set(real_paths(paths))
    # The run's own val and test images among the photos, as themselves or as copies of
    # their bytes under other names (evaluate finds those too, and called its figures
    # unfair where adapt had said nothing)
    own = {**dict.fromkeys(real_paths(val.paths), "val"),
           **dict.fromkeys(real_paths(_test_paths(run_dir)), "test")}
    among = Counter(own[p] for p in given if p in own)
    among.update(same_bytes(sorted(given - own.keys()), own))
    summary = {
        "adapted_from": str(run_dir), "photos": len(paths) + len(missing),
        # an adapted run adapted again: the other photos that shaped the head it began with
        "earlier_photos": len(set(adapted_photos(run_dir)) - given),
        "unreadable": len(paths) + len(missing) - len(ok),
        "unreadable_photos": [[p, why] for p, why in missing]
                             + [[p.path, p.error] for p in preds if p.error],
        **{k: getattr(config, k) for k in SETTINGS},
        "photos_used_per_round": used, "training_images": len(train.paths),
        "unreadable_training_images": train.unreadable,
        "classes_without_training_images": {lv: c for lv, c in unfitted.items() if c},
        # (predict's answers: a taxonomy's branch, not the finest head's top class)
        "changed": float(np.mean(answered["before"] != answered["after"])),
        "classes_before": _counts(answered["before"], names),
        "classes_after": _counts(answered["after"], names),
        # The run's own val images among the photos: the temperature, the unknown thresholds
        # and the val accuracy are then fitted or scored on images the head trained on.
        "val_images_among_photos": among["val"],
        # ... and its test images: a test evaluation of the adapted run is then not fair.
        "test_images_among_photos": among["test"],
        "val_accuracy_before": val_before,
        "val_accuracy": float(np.mean(answer(softmax(val_logits[fine])) == y_val)),
        "temperature": temperature,
        # A temperature the user fitted on other photos (`calibrate RUN DATA`) is for the
        # head as it was: refitted on val here, as training fits it, and said.
        "replaced_calibration": _own_calibration(predictor.manifest),
    }
    # Photos no refit took (none agreed on) left the head as trained: evaluations of the
    # adapted run do not count them as seen (as they did, calling test figures unfair).
    refitted = any(any(n) for n in used.values())
    replaced = _write_run(out, run_dir, predictor, summary, calibration, unknown,
                          [paths[i] for i in ok] if refitted else [])
    return {**summary, "out": str(out), "replaced": replaced}


def _own_calibration(manifest: dict) -> dict | None:
    """The run's temperature and what it was fitted on, where `calibrate` fitted it on
    other images than training's val split; else None."""
    fitted = manifest.get("calibration", {})
    if fitted.get("fitted_on", "val") == "val":
        return None
    return {"temperature": fitted["temperature"], "fitted_on": fitted["fitted_on"]}


def _refit_heads(predictor: Predictor, x_train: np.ndarray, labels: dict[str, np.ndarray],
                 x_photos: np.ndarray, before: dict[str, np.ndarray], config: AdaptConfig
                 ) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """Each level's linear layer self-trained on the photos (`self_train`), in place.
    Returns how many photos each level's refits used, and each level's classes that kept
    the run's own row (no image of the fit showed them)."""
    classes, fine = predictor.manifest["classes"], predictor.model.levels[-1]
    used, unfitted = {}, {}
    for lv in predictor.model.levels:
        used[lv], unfitted[lv] = [], []
        if len(classes[lv]) < 2:  # one class at this level (one family): nothing to fit
            continue
        weight, bias, used[lv] = self_train(x_train, labels[lv], x_photos, before[lv],
                                            len(classes[lv]), config,
                                            predictor.temperature if lv == fine else 1.0)
        if weight is None:  # no photo agreed on: the level keeps its head as trained
            continue
        layer = predictor.model.head.outputs[lv]
        # A class no image of the fit showed (none of its training images readable, none
        # of the photos) keeps the run's own row rather than one that never wins.
        keep = np.flatnonzero(bias <= NEVER)
        unfitted[lv] = [classes[lv][i] for i in keep]
        with torch.no_grad():
            weight[keep] = layer.weight[keep].double().cpu().numpy()
            bias[keep] = layer.bias[keep].double().cpu().numpy()
            layer.weight.copy_(torch.as_tensor(weight))
            layer.bias.copy_(torch.as_tensor(bias))
    return used, unfitted


def _refit_unknown(predictor: Predictor, x_train: np.ndarray, labels: dict[str, np.ndarray],
                   x_val: np.ndarray, temperature: float, seed: int) -> UnknownDetector:
    """The model's unknown scores fitted again with the refitted head, as training fits
    them: on the run's own training images, thresholded on its val images."""
    train, val = torch.as_tensor(x_train).float(), torch.as_tensor(x_val).float()
    return UnknownDetector.fit(
        train, predictor.heads(train), {lv: torch.as_tensor(y) for lv, y in labels.items()},
        val, predictor.heads(val), score=predictor.unknown.score, rate=predictor.unknown.rate,
        temperature=temperature, seed=seed,
        members=predictor.taxonomy.member if predictor.taxonomy else None)


def _write_run(out: Path, run_dir: Path, predictor: Predictor, summary: dict,
               calibration: dict, unknown: UnknownDetector | None, photos: list[str]) -> bool:
    """The adapted run: the run's kept files, the new bundle, adapt.json and the photos it
    adapted on. Written beside `out` and renamed into place, so that a killed adapt leaves
    no half a run; an earlier adapted run there is replaced whole, and stays until the
    new one takes its place (returns whether one was)."""
    manifest = predictor.manifest
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for name in KEPT:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, partial / name)
        training = {**manifest.get("training", {}), "adapted": {
            k: summary[k] for k in ("adapted_from", "photos", "earlier_photos",
                                    "test_images_among_photos", *SETTINGS)}}
        if not photos:  # (none refitted on: see _adapt_into)
            training["adapted"]["test_images_among_photos"] = 0
        save_bundle(predictor.model.cpu(), partial / "model", manifest["classes"],
                    taxonomy=manifest.get("taxonomy"), training=training,
                    weights_source=manifest.get("weights_source"), calibration=calibration,
                    unknown=unknown, inference=manifest.get("inference"))  # (the same backbone)
        write_text(partial / "adapt.json", json.dumps(summary, indent=2))
        # An adapted run adapted again: the first photos shaped it too (the first refit head
        # picked the classes of these), so its evaluations must not call them fair either.
        every = list(dict.fromkeys([*adapted_photos(run_dir), *real_paths(photos)]))
        # With each photo's size and bytes' sha256: evaluate finds copies of them by these.
        earlier = {row["path"]: (row.get("bytes") or "", row.get("sha256") or "")  # the first
                   for row in adapt_photo_rows(run_dir)}  # photos', should they be gone now
        # (NFC keys: a name from macOS is opened as the disk spells it)
        spelt = disk_spelling(every)
        sums = [(str(os.path.getsize(d)), h) if h else earlier.get(p, ("", ""))
                for p, d, h in zip(every, spelt, content_hashes(spelt), strict=True)]
        write_csv(pd.DataFrame({PATH: every, "bytes": [b for b, _ in sums],
                                "sha256": [h for _, h in sums]}), partial / ADAPT_PHOTOS_FILE)
        replaced = out.exists()  # an earlier adapted run (see _check_out)
        replace_folder(partial, out)
    except BaseException:  # a full disk, Ctrl-C: no half a run left beside the run
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return replaced


def _test_paths(run_dir: Path) -> list[str]:
    """The run's test images (its splits.csv, read as own_images reads it), if any."""
    table = read_dataset(run_dir / SPLITS_FILE).table
    return table.loc[table[SPLIT] == "test", PATH].tolist()


def default_out(run_dir: Path, taken: tuple[Path, ...] = ()) -> Path:
    """RUN-adapted, or RUN-adapted-2, -3... when taken, as train numbers a taken run name:
    adapting to a second place keeps the first adapted run (only an --out that names an
    earlier adapted run replaces it). `taken`: names another adapt is writing now."""
    base = run_dir.with_name(run_dir.name + "-adapted")
    path, n = base, 2
    while True:
        put_back(path)  # (an earlier adapted run a kill left moved aside: its name is taken)
        if path not in taken and (not path.exists()
                                  or path.is_dir() and not any(path.iterdir())):
            return path
        path, n = base.with_name(f"{base.name}-{n}"), n + 1


def _claim(out: Path | None, run_dir: Path) -> Path:
    """The adapted run's folder (`_check_out`), held by a lock file beside it until adapt
    ends: an adapt into a folder another one is writing is refused, and one into the
    default folder takes the next name (two at once each keep their own run)."""
    taken: tuple[Path, ...] = ()
    while True:
        candidate = out or default_out(run_dir, taken)
        path = _check_out(candidate, run_dir)  # (resolved: a link is where it leads)
        path.parent.mkdir(parents=True, exist_ok=True)
        if hold_lock(path.parent, f".{path.name}.lock", again=False):
            return path
        if out:
            raise WingspanError(f"Another `wingspan adapt` is writing {path} now.",
                                hint="Wait for it to finish, or give another --out.")
        taken += (candidate,)


def _check_out(out: Path, run_dir: Path) -> Path:
    """The adapted run's folder, resolved: new, empty, or an earlier adapted run (which is
    replaced whole); never the run itself, a folder holding it or one inside it (the run
    is not changed)."""
    out = out.resolve()
    if out == run_dir or out in run_dir.parents:
        raise WingspanError(f"{out} holds the run itself; the adapted run needs a folder of "
                            "its own.", hint="Give --out a new folder.")
    if run_dir.resolve() in out.parents:
        raise WingspanError(f"{out} is inside the run {run_dir}, which adapting does not "
                            "change.", hint="Give --out a folder outside it, e.g. beside it.")
    if out.exists() and not out.is_dir():
        raise WingspanError(f"{out} is a file.", hint="Give --out a new folder.")
    if out.is_dir() and any(out.iterdir()) and not _adapted(out):
        raise WingspanError(f"{out} holds other things than an adapted run; they would be "
                            "overwritten.", hint="Give --out a new folder.")
    return out


def _adapted(folder: Path) -> bool:
    """Whether `folder` is a run that `adapt` wrote."""
    try:
        manifest = json.loads((folder / "model" / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (folder / "adapt.json").is_file() and "adapted" in manifest.get("training", {})


def _logits(predictor: Predictor, x: np.ndarray) -> dict[str, np.ndarray]:
    return {lv: v.numpy().astype(np.float64)
            for lv, v in predictor.heads(torch.as_tensor(x).float()).items()}


def _counts(answers: np.ndarray, names: list[str]) -> dict[str, int]:
    counts = np.bincount(answers, minlength=len(names))
    return {name: int(n) for name, n in zip(names, counts, strict=True)}
