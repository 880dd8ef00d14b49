"""The end of a run: the best model's results, its temperature and unknown answer fitted
on its own images, the bundle written (rank 0), and with --holdout-classes their images
scored as unknowns."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from wingspan.config import ReadConfig
from wingspan.data import read_dataset
from wingspan.errors import WingspanError, command, counted, first_line
from wingspan.evaluate.calibration import MIN_CALIBRATION_IMAGES, bound_warning, calibration_record
from wingspan.evaluate.fairness import photo_sums
from wingspan.models import save_bundle
from wingspan.models.engine import Choice
from wingspan.models.policy import settings_with_environment
from wingspan.models.unknown import UnknownDetector, fit_subset, new_known_rate
from wingspan.parallel import long_wait
from wingspan.progress import Bar
from wingspan.training.checkpoint import load_checkpoint
from wingspan.training.context import Run
from wingspan.training.data import fixed_batches, make_loader
from wingspan.training.folder import (
    HOLDOUT_FILE,
    SEEN_SUMS_FILE,
    SPLITS_FILE,
    best_checkpoint_file,
    feature_cache_file,
)
from wingspan.training.lossy_check import avoided_engines, check_lossy_engines, fp32_engine
from wingspan.training.stages import image_stamps, same_images, say_what_is_read


def score_held_out(run_dir: Path, run: Run) -> Path:
    """With --holdout-classes: rank 0 evaluates the model with their images as unknowns
    (RUN/evaluation-unknown) and adds the figures to metrics.json."""
    held = run_dir / HOLDOUT_FILE
    if not (run.config.holdout_classes and run.is_main and held.is_file()):
        return run_dir
    from wingspan.evaluate.run import evaluate
    from wingspan.evaluate.wording import away_wording

    # On the run's own device and engines (left to choose, they took cuda:0 for a run
    # trained with --device cpu or cuda:1)
    result = evaluate(run_dir, out=run_dir / "evaluation-unknown",
                      progress=run.show_progress, workers=run.workers,
                      unknown=pd.read_csv(held)["path"].tolist(), device=str(run.device),
                      precision=run.config.precision, runtime=run.config.runtime,
                      batch_size=run.config.batch_size)
    u = result.metrics["unknown"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run.write_json("metrics.json", {**metrics, "unknown": u})
    away = away_wording(u)[0]
    run.log(f"Held-out classes as unknowns ({u['unseen_images']} images, score '{u['score']}'): "
            f"AUROC {u['auroc']:.3f}, FPR95 {u['fpr95']:.3f}; {u['unseen_flagged']:.1%} of them "
            f"{away}, the other {1 - u['unseen_flagged']:.1%} named as a known class; "
            f"{u['known_turned_away']:.1%} of the known {result.metrics['split']} images "
            f"{away} too"
            # (without a test split, val: the images the threshold was set on, so the share
            # is the rate asked, not a measure of it on new images)
            + (" (as fitted: the threshold was set on them)"
               if result.metrics["split"] == "val" else "") + f"; report {result.report}"
            + (f" ({len(u['unreadable'])} of their images could not be read and "
               + ("was" if len(u["unreadable"]) == 1 else "were")
               + " not scored: listed in metrics.json)" if u.get("unreadable") else ""),
            caveat=True)  # (figures asked for: said with --quiet too)
    return run_dir


def finish(run: Run) -> Path:
    """Load the best model, write metrics.json and the bundle (rank 0; the others wait, so
    that the bundle exists wherever `train` returns)."""
    wait = long_wait(run.fabric)
    if run.is_main:
        _write_results(run)
    wait()
    return run.dir


def _write_results(run: Run) -> None:
    state = run.state
    say_what_is_read(run)  # what the last epoch found too
    best = best_checkpoint(run)
    run.model.load_state_dict(best["model"])
    # last.pt holds the best weights before the bundle is written (README: both checkpoints
    # hold them once the run is done): killed between the two, the run read as finished
    # with the last epoch's weights in last.pt, which `--weights RUN/.../last.pt` trains on.
    run.save()
    best_row = next(r for r in state.history
                    if r["stage"] == best["stage"] and r["epoch"] == best["epoch"])
    test_gone = _test_images_gone(run)
    metrics = {
        "level": run.data.level, "levels": run.data.levels,
        "classes": {lv: len(c) for lv, c in run.data.level_classes.items()},
        "best": {"stage": best["stage"], "epoch": best["epoch"], "val_acc": best_row["val_acc"],
                 "val_macro_f1": best_row["val_macro_f1"], "val_loss": best_row["val_loss"]},
        "stage_seconds": {k: round(v, 1) for k, v in state.stage_seconds.items()},
        "epochs": {s: sum(r["stage"] == s for r in state.history) for s in ("head", "finetune")},
        "profile": _profile_table(state.profile),
        "weights": run.weights_source, "engine": run.policy.describe(),
        "engines": run.policy.records(),
        # The images it could read (the others are listed under "unreadable")
        "train_images": int(run.readable(run.data.train).sum()),
        "val_images": int(run.readable(run.data.val).sum()),
        "test_images": run.data.test_images - test_gone,  # (gone since the run began: left)
        # Which figure is fair: the best epoch was chosen on val, so its score is optimistic.
        "selection": {"chosen_on": "val", "unbiased_split": "test" if run.data.test_images
                      else None},
        "unreadable": [{"path": p, "reason": why} for p, why in state.skipped.items()],
        "splits_digest": run.splits_digest,  # evaluate checks its splits.csv against it
    }
    taxonomy = run.data.taxonomy.to_dict() if run.data.taxonomy else None
    training = json.loads(json.dumps(dataclasses.asdict(run.config)))
    training["rare_classes"] = run.data.rare
    if run.state.started_from:  # (--weights RUN: its images are no fair test of this one)
        training["started_from"] = run.state.started_from
    training["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    run.model.eval()
    checked: dict = {}  # the check's features of val, per engine (_final_outputs)
    inference = _check_lossy(run, checked)
    # (read and checked once, for both splits)
    switched = _in_fp32_from_here(run, avoided_engines(inference))
    if switched:  # (the engine line is the epochs'; the last passes' is added)
        metrics["engine"] += (f"; final passes {run.policy.frozen.engine.name}, as this "
                              "model's predictions")
    run.write_json("metrics.json", metrics)
    if run.is_main:  # (an evaluated file with these bytes is one it saw, under any name)
        run.write_json(SEEN_SUMS_FILE, {"train": photo_sums(run.data.train.paths),
                                        "val": photo_sums(run.data.val.paths)})
    cached = None if switched else _cached_features(run)
    val = _final_outputs(run, "val", cached, checked)
    calibration = _fit_calibration(run, val)
    metrics["calibration"] = calibration
    unknown = _fit_unknown(run, val, calibration["temperature"], cached)
    save_bundle(run.model.cpu(), run.dir / "model", run.data.level_classes, taxonomy=taxonomy,
                training=training, metrics=metrics, weights_source=run.weights_source,
                calibration=calibration, unknown=unknown, inference=inference)
    drop_feature_cache(run)
    run.log(f"Best val macro-F1 {best_row['val_macro_f1']:.4f} (acc {best_row['val_acc']:.4f}) "
            f"at {best['stage']} epoch {best['epoch']}; model in {run.dir / 'model'}")
    if run.data.test_images:
        left = run.data.test_images - test_gone
        run.log(f"That val figure is optimistic (the epoch was chosen on it). For a fair one: "
                f"`{command('evaluate', run.dir)}` (run.evaluate() in Python) scores the "
                f"{left} test images"
                + (f" left ({test_gone} of the {run.data.test_images} are gone since the run "
                   "began)" if test_gone else "") + ", never trained or chosen on.",
                caveat=True)
    else:
        why = ("--test-fraction 0" if not run.config.test_fraction else
               "--selection val on data with its own val" if run.config.selection == "val"
               else "the split kept no test image that could be read")
        run.log(f"No test split was kept apart ({why}): the val figure is the only one, and "
                "optimistic (the epoch was chosen on it).", caveat=True)


def drop_feature_cache(run: Run) -> None:
    """RUN/cache once the model is written (last: a kill before it resumes from the cache),
    unless `keep_feature_cache`: a done run is not resumed, and nothing else reads it."""
    folder = feature_cache_file(run.dir).parent
    if run.config.keep_feature_cache or not folder.is_dir():
        return
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    shutil.rmtree(folder, ignore_errors=True)
    run.log(f"Removed the run's feature cache, {size / 1e6:.1f} MB: the model is written "
            "(keep_feature_cache: true in a --config file keeps it)", shown=False)


def _check_lossy(run: Run, passes: dict) -> dict | None:
    """The lossy engines' answers on val against fp32's (training.lossy_check), said in
    train.log, for the bundle. A check that fails is said and skipped: it only advises,
    and the run is done."""
    try:
        checked = check_lossy_engines(run, passes)
    except Exception as e:  # noqa: BLE001 - whatever it is (out of memory), the run stands
        run.log(f"The lossy engines' answers could not be checked ({first_line(e)}): this "
                "model's predictions may run them.", caveat=True)
        return None
    if not checked:
        return None
    inference = {"lossy_engines": checked}
    avoided = avoided_engines(inference)
    for name, got in checked.items():
        run.log(f"{name} answered otherwise than fp32 on {got['answers_changed']} of "
                f"{got['images']} val images: " + (
                    "left out of this model's predictions" if name in avoided else
                    "kept among the engines its predictions may run"))
    return inference


def _in_fp32_from_here(run: Run, avoided: dict[str, str]) -> bool:
    """Where the frozen passes' engine is one the check left out of the model's
    predictions, the final passes (the temperature, the unknown scores and their
    thresholds) run fp32 too, as its predictions will, not on the head stage's cache."""
    engine = run.policy.frozen.engine if run.policy.frozen else None
    precision, runtime = settings_with_environment(run.config.precision, run.config.runtime)
    if engine is None or precision != "auto" or (  # (bf16 forced: as asked)
            engine.name not in avoided):
        return False
    fp32 = fp32_engine(run.policy.device, runtime)
    run.policy = run.policy.with_choice("frozen", Choice(fp32, "fp32 for this model"))
    run.log(f"The final passes run {fp32.name}, as this model's predictions will "
            f"({engine.name} left out)")
    return True


def best_checkpoint(run: Run) -> dict:
    """best.pt; when it cannot be read (a damaged disk or copy), the model as it stands,
    said so: the run still finishes rather than stopping for good. That model is the best
    head where the head stage is over and no fine-tuned epoch followed (run._recipe loaded
    it before the checkpoint it was resumed from), else the last epoch's."""
    try:
        return load_checkpoint(best_checkpoint_file(run.dir))
    except WingspanError as e:
        state, last = run.state, run.state.history[-1]
        if state.stage != "head" and last["stage"] == "head" == state.best_stage:
            run.log(f"{e.message} The model is the best one's all the same (head epoch "
                    f"{state.best_epoch}, kept in the last checkpoint).", caveat=True)
        else:
            run.log(f"{e.message} The model is the last epoch's ({last['stage']} epoch "
                    f"{last['epoch']}), not the best one's ({state.best_stage} epoch "
                    f"{state.best_epoch}).", caveat=True)
            # That epoch is the best from here on, and best.pt is written again with it.
            run.keep_best(last["val_macro_f1"], last["stage"], last["epoch"], last["val_loss"])
        return {"model": run.model.state_dict(), "stage": state.best_stage,
                "epoch": state.best_epoch}


def _test_images_gone(run: Run) -> int:
    """How many of the run's test images are gone since it began (deleted or moved while
    it was stopped): what evaluate then cannot score."""
    if not run.data.test_images:
        return 0
    table = read_dataset(run.dir / SPLITS_FILE, ReadConfig(check_files=False)).table
    return sum(not os.path.isfile(p) for p in table.loc[table["split"] == "test", "path"])


@torch.inference_mode()
def _final_outputs(run: Run, split: str, cached: dict[str, torch.Tensor] | None,
                   checked: dict | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The best model's pooled features, logits per level and labels (N, levels) of the
    readable images of `train` (clean views; at most MAX_FIT_IMAGES, those the unknown
    scores are fitted on) or `val`. From the feature cache (`cached`, see
    _cached_features) where it holds them, or from the lossy check's pass on the final
    passes' engine (`checked`, see check_lossy_engines) where it ran on these very rows;
    else one pass with the final weights."""
    images = run.data.train_clean if split == "train" else run.data.val
    rows = torch.arange(len(images))[run.readable(images)]
    # Of the training images, those the unknown scores are fitted on, drawn first: past
    # MAX_FIT_IMAGES the rest would be a pass for nothing (28k of 33k images on ETHEC).
    if split == "train" and (keep := fit_subset(len(rows), run.config.seed)) is not None:
        rows = rows[keep]
    feats = cached[split] if cached is not None else None
    # The check ran the same weights on the same batches of these images: in PyTorch, on
    # the engine the final pass would run (bf16 where it won the frozen passes; torch-fp32,
    # its reference, where that did), the same features (an ONNX one exports its own graph)
    engine = run.policy.frozen.engine
    again = (checked or {}).get(engine.name) if engine.runtime == "torch" else None
    if feats is not None:
        feats = (feats[:, 0] if split == "train" else feats)[rows]
        labels = images.labels[rows]
    elif split == "val" and again is not None and torch.equal(checked["rows"], rows):
        feats, labels = again, images.labels[rows]
    else:
        run_model = _final_pass(run)
        parts, index = [], []
        loader = make_loader(images, fixed_batches(rows.tolist(), run.config.batch_size),
                             run.workers)
        with Bar(len(rows), f"Final {split} features", run.show_progress) as bar:
            for x, _, idx, failed in loader:
                if len(idx):
                    parts.append(run_model(x)["features"])
                    index.append(idx)
                bar.advance(len(idx) + len(failed))
        feats, labels = torch.cat(parts), images.labels[torch.cat(index)]
    # A copy: .float() and .cpu() move a module in place, and the live head, moved to the
    # CPU while the backbone stayed on the GPU, broke the next pass (train's, after val's)
    head = copy.deepcopy(run.model.head).float().cpu()
    logits = {lv: v.float() for lv, v in head(feats.float()).items()}
    return feats.float(), logits, labels


def _cached_features(run: Run) -> dict[str, torch.Tensor] | None:
    """The head stage's cached features of train and val, where the best model is a head
    on the frozen backbone (which never moved) and the cache holds these very images;
    else None (computed again): the file damaged (as stage 1 takes it), of other images,
    or an image edited while the run was stopped and resumed in fine-tuning, which never
    looks at the cache (its old features would fit the temperature and unknown score)."""
    cache = feature_cache_file(run.dir)
    if run.state.best_stage != "head" or not cache.is_file():
        return None
    try:
        saved = load_file(cache)
        sizes = len(saved["train"]), len(saved["val"])
    except Exception as e:  # noqa: BLE001 - safetensors raises many types for a bad file
        run.log(f"The feature cache {cache} cannot be read ({type(e).__name__}); computing "
                "the final features again")
        return None
    now = image_stamps(run.data.train.paths + run.data.val.paths)
    same = sizes == (len(run.data.train_clean), len(run.data.val))
    return saved if same and same_images(run, saved.get("stamps"), now) else None


def _final_pass(run: Run):
    """images -> {"features", ...} of the best model, as it is now, in fp32 on the frozen
    passes' engine: with ONNX Runtime, one export of the whole model for both final passes
    (val, then train: a thousand images or more, where the export's second pays for itself;
    the fine-tuning prefix with the rest in PyTorch fp32 ran them no faster on an AMX Xeon,
    bench/oneoff_pass.py, and PyTorch fp32 is 3-4x slower than ONNX Runtime on an AVX2 EPYC),
    or the last validation pass's graph when that was of these weights. The logits are the
    head's (_final_outputs). Its graph is not kept on disk: predict runs the bundle's
    feature extractor, another graph."""
    module, names = run.model.with_features()
    return run.policy.runner(module, run.image_size, names, keep=False)


def _fit_calibration(run: Run, val: tuple) -> dict:
    """The temperature that makes the best model's probabilities honest on the run's own
    val split (fitted here, once, so that evaluating never changes the model;
    `wingspan calibrate` fits it again on purpose). Rank 0 alone: no collectives."""
    _, logits, labels = val
    taxonomy = run.data.taxonomy  # the class answered is its top-down branch's, as evaluate's
    answer = (lambda probs: taxonomy.answer(probs, temperature=1.0)) if taxonomy else None
    record = calibration_record(logits[run.data.level].numpy(), labels[:, -1].numpy(), "val",
                                answer=answer)
    if bound_warning(record):
        run.log(f"Warning: {bound_warning(record)}", caveat=True)
    if record["images"] < MIN_CALIBRATION_IMAGES:  # still fitted: the run must finish
        run.log(f"Warning: the temperature ({record['temperature']:.3f}) rests on "
                f"{counted(record['images'], 'val image')}, too few to say much (`wingspan "
                f"calibrate` asks for {MIN_CALIBRATION_IMAGES}). Fit it again on more labelled "
                f"images of these classes: `{command('calibrate', run.dir, 'DATA')}`.",
                caveat=True)
    if record["method"] != "likelihood":
        aim = f"{record['images'] + 1} / {record['images'] + 2}"
        # (the finest head's top class, on which T is fitted: with a taxonomy the answer is
        # the top-down branch's, which can miss where that class is right)
        right = ("Every val image is right" if not taxonomy else
                 f"Every val image's top {run.data.level} class of its own head is right")
        run.log(f"{right}: the temperature ({record['temperature']:.3f}) is "
                f"set by the {record['method']}, so that the mean top probability on val is "
                + (f"{aim}." if not record["at_bound"] else
                   f"as near {aim} as the bound lets it (see the warning above)."))
    return record


def _fit_unknown(run: Run, val: tuple, temperature: float,
                 cached: dict[str, torch.Tensor] | None) -> UnknownDetector:
    """Every unknown score, fitted on the training images' features with the best model,
    and thresholded on val (see wingspan.models.unknown)."""
    feats, logits, labels = _final_outputs(run, "train", cached)
    levels = run.data.levels
    rate, n = run.config.unknown_rate, len(val[0])
    # On few val images the threshold's rate on new known images is well over `rate`,
    # and loose: +- 2 binomial standard deviations.
    expected = new_known_rate(n, rate)
    spread = 2 * (expected * (1 - expected) / max(n, 1)) ** 0.5
    few = spread > rate / 2 or expected > 1.5 * rate
    # On 20 val images or fewer (at 5%) the threshold is above them all: none turned away.
    above_all = n and math.ceil((1 - rate) * (n - 1)) == n - 1
    run.log(f"Unknown answer ('{run.config.unknown_score}'): the threshold "
            + (f"is just above all {n} known val images (on so few, the {rate:.0%} asked "
               "turns none of them away)" if above_all else
               f"turns away at most {rate:.0%} of the {n} known val images")
            + (f"; on new known images expect about {expected:.0%} (from "
               f"{max(expected - spread, 0):.0%} to {min(expected + spread, 1):.0%}) with so "
               "few (more val images narrow it: --val-fraction, or the data's own val "
               "split, where it has one)" if few else ""),
            caveat=expected > 2 * rate)
    return UnknownDetector.fit(
        feats, logits, {lv: labels[:, i] for i, lv in enumerate(levels)}, val[0], val[1],
        score=run.config.unknown_score, rate=rate, temperature=temperature,
        seed=run.config.seed, members=run.data.taxonomy.member if run.data.taxonomy else None)


def _profile_table(profile: dict) -> dict:
    """Seconds per kind of work and training images/s, per stage. Every stage has every
    kind (0 where it did none, as stage 2 builds no feature cache): a table of the stages
    then shows a figure in each cell, not a NaN."""
    kinds = list(dict.fromkeys(k for spent in profile.values() for k in spent if k != "images"))
    table = {}
    for stage, spent in profile.items():
        row = {k: round(spent.get(k, 0.0), 2) for k in kinds}
        busy = sum(spent.get(k, 0.0) for k in ("data", "forward", "backward"))
        row["train_images_per_s"] = round(spent.get("images", 0) / busy, 1) if busy else None
        table[stage] = row
    return table

