import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import (
    PAUSED_CLI,
    broken_images,
    cli_killed_at,
    folder_dataset,
    kill_at_first_finetune_row,
    wait_for_finetune_epochs,
    write_image,
)
from PIL import Image

from wingspan.config import PRECISION_ENV, RUNTIME_ENV, SettingError, TrainConfig
from wingspan.data import read_dataset
from wingspan.data.images import open_rgb
from wingspan.errors import WingspanError
from wingspan.explain import explain_view
from wingspan.inference import Predictor
from wingspan.models import load_bundle
from wingspan.models.registry import BACKBONES, BackboneSpec
from wingspan.parallel import local_fabric
from wingspan.training import resume, train
from wingspan.training.checkpoint import load_checkpoint
from wingspan.training.run import start_run
from wingspan.training.stages import finetune, loss_fn, train_head

NUMBERS = ["train_loss", "train_acc", "train_macro_f1", "val_loss", "val_acc", "val_macro_f1"]


def tiny(tmp_path, **changes) -> TrainConfig:
    """A recipe small enough for CI: a 99k-parameter timm test network at 32 pixels."""
    settings = dict(backbone="test_efficientnet", weights="none", image_size=32, epochs_head=3,
                    epochs_finetune=2, batch_size=8, feature_views=1, workers=0,
                    cache_dir=str(tmp_path / "cache"), val_fraction=0.25, test_fraction=0.0,
                    patience=10, lr=3e-3)
    return TrainConfig(**{**settings, **changes})


def history(run_dir):
    return pd.read_csv(run_dir / "history.csv")


def test_config_yamls_line_to_train_again_pastes_into_a_shell_and_keeps_the_budget(
        demo_dir, tmp_path, monkeypatch):
    """A run named "ho run" gave an unquoted path, --holdout-classes a comment a shell
    could not read, and a run with --max-pixels was trained again at 50 MP."""
    import shlex

    from wingspan.data.images import call_budget
    from wingspan.training.run import _data_comment

    with call_budget(4000):
        said = _data_comment(read_dataset(demo_dir), tmp_path / "ho run", held_out=True)
    line = said.splitlines()[1].split("Again on the same split: ", 1)[1]
    assert shlex.split(line, comments=True) == [
        "wingspan", "train", str(tmp_path / "ho run" / "splits.csv"), "--config",
        str(tmp_path / "ho run" / "config.yaml"), "--max-pixels", "4000",
        "--holdout-classes", ""]
    # A run folder given relative (--runs-dir runs) is named whole: the line holds from
    # any folder, not only the one trained in.
    monkeypatch.chdir(tmp_path)
    said = _data_comment(read_dataset(demo_dir), Path("runs") / "r", held_out=False)
    assert f"wingspan train {tmp_path / 'runs' / 'r' / 'splits.csv'} --config" in said, said


def test_the_line_to_train_again_names_a_moved_runs_own_files(demo_dir, tmp_path):
    """A run copied or moved since it trained (an archive, another machine): its report's
    "to train it again" named the old folder's splits.csv and config.yaml, gone there or
    another run's by now."""
    import shlex

    from wingspan.data.images import call_budget
    from wingspan.training.folder import train_again
    from wingspan.training.run import _data_comment

    old, new = tmp_path / "ho run", tmp_path / "archive" / "ho run 2"
    new.mkdir(parents=True)
    with call_budget(4000):
        said = _data_comment(read_dataset(demo_dir), old, held_out=True)
    (new / "config.yaml").write_text(said + "lr: 0.01\n", encoding="utf-8")
    again = train_again(new)
    assert shlex.split(again, comments=True) == [
        "wingspan", "train", str(new / "splits.csv"), "--config", str(new / "config.yaml"),
        "--max-pixels", "4000", "--holdout-classes", ""], again
    assert again.endswith(said.splitlines()[1].split("   #", 1)[1])  # (its comment kept)
    old.mkdir()  # where it trained: the line as it was
    (old / "config.yaml").write_text(said + "lr: 0.01\n", encoding="utf-8")
    assert train_again(old) == said.splitlines()[1].split("Again on the same split: ", 1)[1]


@pytest.mark.policy
def test_train_writes_a_complete_run(demo_dir, tmp_path):
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path), tmp_path / "runs", "demo", quiet=True)
    for name in ["config.yaml", "splits.csv", "history.csv", "metrics.json", "train.log",
                 "checkpoints/best.pt", "checkpoints/last.pt", "model/manifest.json",
                 "model/model.safetensors"]:
        assert (run_dir / name).is_file(), name
    # The feature cache, which only a resume reads, is gone once the model is written (it
    # stayed, about 380 MB a run for Lite0 at ETHEC's size); a setting keeps it.
    assert not (run_dir / "cache").exists()
    assert "Removed the run's feature cache" in (run_dir / "train.log").read_text()
    h = history(run_dir)
    assert h["stage"].tolist() == ["head"] * 3 + ["finetune"] * 2
    assert "No test split was kept apart (--test-fraction 0)" in (
        run_dir / "train.log").read_text()  # the reason of this run, not another's
    assert set(h.columns) >= {"lr", "images_per_s", "seconds", *NUMBERS}
    # config.yaml says what it cannot hold: the data, how it was read, how to train again.
    said = (run_dir / "config.yaml").read_text()
    assert said.startswith(f"# Trained on {demo_dir}, read with --format folder.\n")
    assert f"wingspan train {run_dir / 'splits.csv'} --config {run_dir / 'config.yaml'}" in said
    # The top (head) rate, not an earlier layer's decayed share: half way down the cosine
    # after the first of 2 fine-tuning epochs, 0 after the last.
    top = tiny(tmp_path).lr * tiny(tmp_path).finetune_lr_scale
    assert h.loc[h["stage"] == "finetune", "lr"].tolist() == pytest.approx([top / 2, 0],
                                                                           abs=0.1 * top)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best"]["val_macro_f1"] == h["val_macro_f1"].max()
    model, manifest = load_bundle(run_dir / "model")
    assert manifest["classes"]["label"] == sorted(p.name for p in demo_dir.iterdir()
                                                  if p.is_dir())  # the class folders
    assert len(manifest["classes"]["label"]) == 4
    assert manifest["preprocessing"]["input_size"] == 32
    assert manifest["training"]["backbone"] == "test_efficientnet"
    # A second run with the same name gets its own folder.
    again = train(read_dataset(demo_dir), tiny(tmp_path, epochs_finetune=0), tmp_path / "runs",
                  "demo", quiet=True)
    assert again.name == "demo-2"
    assert f"{run_dir} is taken: this run is {again}" in (again / "train.log").read_text()


def test_a_wingspan_model_is_a_starting_point(demo_dir, tmp_path):
    """--weights RUN starts a new model from the backbone a run fine-tuned (e.g. museum
    specimens first, then field photos), with its architecture under --backbone auto."""
    from safetensors.torch import load_file

    data = read_dataset(demo_dir)
    # Another seed: another random backbone (fine-tuning a tiny run may keep a head epoch).
    first = train(data, tiny(tmp_path, epochs_head=1, epochs_finetune=1, seed=1),
                  tmp_path / "runs", "first", quiet=True)
    # Only the head trains (no fine-tuning): the backbone stays the first run's, exactly.
    second = train(data, tiny(tmp_path, backbone="auto", weights=str(first), epochs_head=1,
                              epochs_finetune=0, cache_dir=str(tmp_path / "c2")),
                   tmp_path / "runs", "second", quiet=True)
    manifest = json.loads((second / "model" / "manifest.json").read_text())
    assert manifest["model"]["backbone"] == "test_efficientnet"
    assert manifest["weights_source"] == f"wingspan-model: {first / 'model'}"
    a, b = (load_file(r / "model" / "model.safetensors") for r in (first, second))
    fresh = load_file(train(data, tiny(tmp_path, epochs_head=1, epochs_finetune=0,
                                       cache_dir=str(tmp_path / "c3")), tmp_path / "runs",
                            "fresh", quiet=True) / "model" / "model.safetensors")
    tuned = [k for k in a if k.startswith("backbone.net.") and k.endswith(".weight")
             and not torch.equal(a[k], fresh[k])]  # the first run's own
    assert tuned and all(torch.equal(a[k], b[k]) for k in tuned)
    # The bundle's file names it too; another architecture is refused with what to do.
    from wingspan.models import create_classifier

    create_classifier("test_efficientnet", {"label": 2},
                      weights=first / "model" / "model.safetensors")
    with pytest.raises(WingspanError, match="(?s)has the backbone test_efficientnet, not "
                                            "test_resnet.*--backbone test_efficientnet"):
        create_classifier("test_resnet", {"label": 2}, weights=first)
    # So does a checkpoint of the run (best.pt, which the model was made from): its backbone,
    # not the head, whose classes are the first run's.
    model, loaded = create_classifier("test_efficientnet", {"label": 2},
                                      weights=first / "checkpoints" / "best.pt")
    assert loaded.source == "wingspan-checkpoint"
    state = model.state_dict()
    assert tuned and all(torch.equal(a[k], state[k]) for k in tuned)
    with pytest.raises(WingspanError, match="(?s)do not fit.*config.yaml names its backbone"):
        create_classifier("test_resnet", {"label": 2}, weights=first / "checkpoints" / "last.pt")


def test_same_seed_same_history(demo_dir, tmp_path):
    # One engine for both: under auto the second run may time the engines again (the cache
    # is shared with the suite's other worker) and pick another, rounding otherwise.
    config = tiny(tmp_path, precision="fp32", runtime="torch")
    a = train(read_dataset(demo_dir), config, tmp_path / "a", quiet=True)
    b = train(read_dataset(demo_dir), config, tmp_path / "b", quiet=True)
    pd.testing.assert_frame_equal(history(a)[NUMBERS], history(b)[NUMBERS])


def _prepared_run(demo_dir, tmp_path, **changes):
    from wingspan.training.prepare import ensure_splits

    config = tiny(tmp_path, level="label", **changes)
    dataset = ensure_splits(read_dataset(demo_dir), "label", config, log=lambda _: None)
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    return start_run(run_dir, config, dataset, quiet=True, checkpoint=None,
                  fabric=local_fabric("cpu"))


def _changed(before, model):
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.policy
def test_each_stage_changes_what_it_should_and_nothing_else(demo_dir, tmp_path):
    run = _prepared_run(demo_dir, tmp_path, epochs_head=2, epochs_finetune=1, unfreeze=1)
    model = run.model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train_head(run)
    assert _changed(start, model) == {k for k in start if k.startswith("head.")}
    after_head = {k: v.clone() for k, v in model.state_dict().items()}
    run.state.epoch = 0
    finetune(run)
    last_stage = list(model.backbone.stages)[-1]
    allowed = {"backbone.net." + p for p in model.backbone.stages[last_stage]}
    changed = _changed(after_head, model)
    assert changed - {k for k in changed if k.startswith("head.")} <= allowed
    assert changed & allowed  # the unfrozen stage did learn
    assert not any("running_" in k for k in changed)  # BatchNorm statistics stay put


def test_the_head_stage_without_the_cache_augments_each_repeated_draw_afresh(demo_dir,
                                                                            tmp_path):
    """Without the feature cache, an image the weighted sampler drew again in a head
    epoch asked for the same (image, epoch, view), so it got the same augmented pixels
    (40 of 170 requests of a weighted demo run)."""
    run = _prepared_run(demo_dir, tmp_path, epochs_head=1, epochs_finetune=0,
                        feature_cache=False, feature_views=1, sampler="weighted")
    asked, get = [], type(run.data.train).__getitem__
    run.data.train.__class__ = type("Recorded", (type(run.data.train),), {
        "__getitem__": lambda self, request: asked.append(request) or get(self, request)})
    train_head(run)
    images = [i for i, _, _ in asked]
    assert len(images) > len(set(images))  # the weighted draw did repeat augmented images
    assert len(set(asked)) == len(asked)  # each repeat its own view


def test_fine_tunings_first_epoch_is_not_the_cached_views_pixels(demo_dir, tmp_path):
    """The feature cache's augmented view 1 and fine-tuning's first epoch asked for the
    same (image, epoch 0, view 1): the same crops, which the head had trained on in every
    epoch, so that epoch brought no new view of any image."""
    run = _prepared_run(demo_dir, tmp_path, epochs_head=1, epochs_finetune=1, unfreeze=1,
                        feature_views=1)
    asked, get = [], type(run.data.train).__getitem__
    run.data.train.__class__ = type("Recorded", (type(run.data.train),), {
        "__getitem__": lambda self, request: asked.append(request) or get(self, request)})
    train_head(run)
    cached = set(asked)
    run.state.epoch = 0
    asked.clear()
    finetune(run)
    assert cached and asked and not cached & set(asked)


def test_the_head_stage_checkpoints_when_due_and_keeps_the_same_best(demo_dir, tmp_path,
                                                                      monkeypatch):
    """Every head epoch wrote best.pt and last.pt, each the whole model: a ResNet-50's
    94 MB twice per epoch of milliseconds, 80% of the stage. Now the head stage writes once
    checkpoint_minutes have passed and at its end, and best.pt holds the same weights as
    when each epoch wrote it."""
    from wingspan.training import context

    written = []
    save = context.save_checkpoint
    monkeypatch.setattr(context, "save_checkpoint",
                        lambda path, payload: written.append(path.name) or save(path, payload))
    best = {}
    for minutes, cache in ((0, True), (5, True), (5, False)):
        written.clear()
        run = _prepared_run(demo_dir, tmp_path / f"{minutes}{cache}", epochs_head=6,
                            epochs_finetune=0, checkpoint_minutes=minutes, patience=10,
                            feature_cache=cache)
        train_head(run)
        best[minutes, cache] = load_checkpoint(run.checkpoints / "best.pt")
        assert best[minutes, cache]["epoch"] == run.state.best_epoch > 1
        assert load_checkpoint(run.checkpoints / "last.pt")["state"]["epoch"] == 6
        saves = written.count("last.pt")
        # (without the cache an epoch runs the backbone on every image: each one saved)
        assert saves == 6 if minutes == 0 or not cache else \
            (saves, written.count("best.pt")) == (1, 1)
    every, when_due = best[0, True], best[5, True]
    assert every["epoch"] == when_due["epoch"] and every["model"].keys() == when_due["model"].keys()
    for k, v in every["model"].items():
        assert torch.equal(v, when_due["model"][k]), k


def test_an_optimizer_state_of_other_parameter_groups_starts_afresh(demo_dir, tmp_path):
    """A checkpoint from a version that grouped the parameters otherwise (a ViT's position
    embedding now out of weight decay: one group more) stopped the resume at torch's
    ValueError; the weights and schedule are what count, and the optimizer starts afresh."""
    from wingspan.training.schedule import make_optimizer

    run = _prepared_run(demo_dir, tmp_path, epochs_head=0, epochs_finetune=1, unfreeze=1)
    other = torch.optim.AdamW(run.model.head.parameters())  # one group: make_optimizer's two
    run.resume_from = {"optimizer": other.state_dict()}
    optimizer = make_optimizer(run.model.head, 1e-3, 0.01)
    before = optimizer.state_dict()["param_groups"]
    run.restore_optimizer(optimizer)
    assert optimizer.state_dict()["param_groups"] == before and run.resume_from is None
    log = (run.dir / "train.log").read_text()
    assert "does not fit this version's parameter groups" in log and "starts afresh" in log


def test_fine_tuning_with_no_stage_unfrozen_trains_the_head_alone_and_says_so(demo_dir,
                                                                              tmp_path):
    run = _prepared_run(demo_dir, tmp_path, epochs_head=0, epochs_finetune=1, unfreeze=0)
    start = {k: v.clone() for k, v in run.model.state_dict().items()}
    finetune(run)
    changed = _changed(start, run.model)
    assert changed and changed <= {k for k in start if k.startswith("head.")}
    log = (run.dir / "train.log").read_text()
    assert "Fine-tuning the head alone (--unfreeze 0); top learning rate" in log, log


def test_an_unfreeze_beyond_the_backbones_stages_says_all_are_fine_tuned(demo_dir, tmp_path):
    run = _prepared_run(demo_dir, tmp_path, epochs_head=0, epochs_finetune=1, unfreeze=99)
    finetune(run)
    log = (run.dir / "train.log").read_text()
    stages = len(run.model.backbone.stages)
    assert f"(all {stages} stages: --unfreeze 99 asked for more)" in log, log


def test_fine_tuning_says_what_its_stages_hold(demo_dir, tmp_path):
    """A stage is a ViT's block, a ResNet's layer, a ConvNeXt's last only its final norm:
    the log named stage numbers alone ("Fine-tuning stage5 and the head" for 640 weights
    of a ConvNeXt's 3.37M). It says how many there are, the share of the backbone's
    weights that trains and the modules, as timm names them."""
    run = _prepared_run(demo_dir, tmp_path, epochs_head=0, epochs_finetune=1, unfreeze=1)
    finetune(run)
    backbone = run.model.backbone
    (stage,) = backbone.unfreeze_last(1)
    trained = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    share = trained / sum(p.numel() for p in backbone.parameters())
    line = next(x for x in (run.dir / "train.log").read_text().splitlines()
                if "Fine-tuning stage" in x)
    module = ".".join(backbone.stages[stage][0].split(".")[:-1][:2])
    assert (f"Fine-tuning {stage} (of {len(backbone.stages)}: "
            f"{'under 1%' if share < 0.01 else format(share, '.0%')} of the backbone's "
            f"weights, {module}") in line, line


@pytest.mark.policy
def test_feature_cache_matches_running_the_frozen_backbone(demo_dir, tmp_path):
    results = []
    for cached in (True, False):
        run = _prepared_run(demo_dir, tmp_path / str(cached), feature_views=0, epochs_head=3,
                            feature_cache=cached)
        train_head(run)
        results.append((pd.DataFrame(run.state.history)[NUMBERS],
                        {k: v.clone() for k, v in run.model.head.state_dict().items()}))
    (h1, w1), (h2, w2) = results
    # Equal up to float rounding: features are computed in batches of other sizes.
    pd.testing.assert_frame_equal(h1, h2, atol=1e-3, rtol=1e-3)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-3, rtol=1e-3)


def test_a_resumed_run_computes_the_features_of_an_edited_image_again(demo_dir, tmp_path):
    from helpers import write_image

    from wingspan.training.stages import extract_features

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    run = _prepared_run(data, tmp_path, feature_views=0)
    train, _ = extract_features(run, 0)
    assert extract_features(run, 0)[0].equal(train)  # unchanged images: the cache
    edited = run.data.train.paths[0]
    with open(edited, "rb") as f:
        fmt = Image.open(f).format
    write_image(Path(edited), size=(64, 48), seed=7, fmt=fmt)  # another picture, in place
    again = _prepared_run(data, tmp_path, feature_views=0)  # the resume: the same run folder
    features, _ = extract_features(again, 0)
    assert not features[0].equal(train[0]) and features[1:].allclose(train[1:], atol=1e-5)
    assert "the feature cache again: 1 image changed since it was made" in (
        again.dir / "train.log").read_text()
    # A resume in fine-tuning never reads the cache, but the final pass took the best head's
    # features from it for the temperature and the unknown score: an image edited since
    # kept its old ones there.
    from wingspan.training.finish import _cached_features

    again.state.best_stage = "head"  # (the best model a head on the frozen backbone)
    assert _cached_features(again) is not None
    write_image(Path(run.data.train.paths[1]), size=(64, 48), seed=8, fmt=fmt)
    resumed = _prepared_run(data, tmp_path, feature_views=0)
    resumed.state.best_stage = "head"
    assert _cached_features(resumed) is None


def test_class_weights_change_the_loss_as_computed_by_hand(demo_dir, tmp_path):
    run = _prepared_run(demo_dir, tmp_path, label_smoothing=0.0, class_weights="balanced")
    table = run.data.train.labels  # (images, levels): one level here
    labels = table[:, 0]
    counts = torch.bincount(labels).float()
    expected_w = len(labels) / (len(counts) * counts)  # scikit-learn's "balanced"
    torch.testing.assert_close(run.data.class_weights["label"], expected_w)
    logits = torch.randn(len(labels), len(counts))
    per_sample = -logits.log_softmax(1)[torch.arange(len(labels)), labels]
    by_hand = (expected_w[labels] * per_sample).sum() / expected_w[labels].sum()
    torch.testing.assert_close(loss_fn(run)({"label": logits}, table), by_hand)
    unweighted = _prepared_run(demo_dir, tmp_path / "u", label_smoothing=0.0,
                               class_weights="none")
    assert unweighted.data.class_weights["label"] is None
    assert not torch.isclose(loss_fn(unweighted)({"label": logits}, table), by_hand)


def test_class_weights_do_not_pull_a_smoothed_target_toward_the_rare_classes(demo_dir,
                                                                              tmp_path):
    """With label smoothing, torch's weight= weighed the smoothing's term for each other
    class by that class's weight: a common class's image was best answered with the rare
    classes (at 0.3 on imbalanced data training collapsed). Each image's whole smoothed
    loss is now weighed by its own class's weight: its best answer is the smoothed target,
    whatever the weights, and the loss is computed as by hand."""
    run = _prepared_run(demo_dir, tmp_path, label_smoothing=0.3, class_weights="balanced")
    table = run.data.train.labels
    labels, w = table[:, 0], run.data.class_weights["label"]
    k = len(w)
    assert w.max() > 1.5 * w.min()  # (the demo's classes are imbalanced)
    criterion = loss_fn(run)
    common = int(torch.argmin(w))  # an image of the most common class (lowest weight)
    target = torch.full((k,), 0.3 / k)
    target[common] += 0.7
    logits = target.log().clone().requires_grad_(True)
    criterion({"label": logits[None]}, torch.tensor([[common]])).backward()
    assert logits.grad.abs().max() < 1e-5, logits.grad  # the smoothed target is the optimum
    many = torch.randn(len(labels), k)
    smoothed = (1 - 0.3) * torch.nn.functional.one_hot(labels, k) + 0.3 / k
    per_image = -(smoothed * many.log_softmax(1)).sum(1)
    by_hand = (w[labels] * per_image).sum() / w[labels].sum()
    torch.testing.assert_close(criterion({"label": many}, table), by_hand)


def test_class_weights_count_only_the_images_that_can_be_read(demo_dir, tmp_path):
    run = _prepared_run(demo_dir, tmp_path, class_weights="balanced")
    labels = run.data.train.labels[:, 0]
    common = int(torch.bincount(labels).argmax())
    broken = [i for i in range(len(labels)) if labels[i] == common][:4]
    run.note_unreadable([(run.data.train.paths[i], "Cannot read image") for i in broken])
    readable = run.readable(run.data.train)
    counts = torch.bincount(labels[readable]).float()
    expected = readable.sum() / (len(counts) * counts)
    torch.testing.assert_close(loss_fn(run).class_weights["label"], expected)
    assert not torch.allclose(run.data.class_weights["label"], expected)
    # auto: on when the readable images are imbalanced, not all of them
    auto = _prepared_run(demo_dir, tmp_path / "a")
    assert auto.data.class_weights["label"] is not None  # 16:6 in all
    fewest, seen, beyond = int(torch.bincount(labels).min()), {}, []
    for i, c in enumerate(labels.tolist()):
        seen[c] = seen.get(c, 0) + 1
        if seen[c] > fewest:
            beyond.append((auto.data.train.paths[i], "Cannot read image"))
    auto.note_unreadable(beyond)
    assert loss_fn(auto).class_weights["label"] is None  # as many of each class readable
    loss_fn(auto)  # each epoch's loss: the change is said once
    said = [line for line in (auto.dir / "train.log").read_text().splitlines()
            if "Class-weighted loss now off: without the" in line]
    assert len(said) == 1 and f"{len(beyond)} unreadable training images" in said[0]


def test_the_weighted_sampler_counts_only_the_images_that_can_be_read(tmp_path, monkeypatch):
    from wingspan.training import stages
    from wingspan.training.data import EpochBatches

    data = folder_dataset(tmp_path / "data", {"a": 12, "b": 12})
    broken_images(data / "a", 9)  # 'a' lists 21 files, only 12 of which can be read
    seen, draws = {}, []  # (stage, the sampler's weights, the images the epoch may draw)
    every_class_readable, epoch_order = stages.every_class_readable, stages.epoch_order
    set_epoch = EpochBatches.set_epoch

    def readable(run):
        seen["run"] = run
        return every_class_readable(run)

    def head_order(n, seed, epoch, weights=None):
        draws.append(("head", weights, seen["run"].readable(seen["run"].data.train)))
        return epoch_order(n, seed, epoch, weights)

    def finetune_order(batches, epoch, start_batch=0):
        kept = torch.tensor([i not in batches.skip for i in range(batches.n)])
        draws.append(("finetune", batches.weights, kept))
        set_epoch(batches, epoch, start_batch)

    monkeypatch.setattr(stages, "every_class_readable", readable)
    monkeypatch.setattr(stages, "epoch_order", head_order)
    monkeypatch.setattr(EpochBatches, "set_epoch", finetune_order)
    # (balanced as well: the loss's weights are on too, to compare the sampler's with)
    train(read_dataset(data), tiny(tmp_path, sampler="weighted", class_weights="balanced",
                                   epochs_head=2, epochs_finetune=1), tmp_path / "runs",
          quiet=True)
    run = seen["run"]
    labels = run.data.train.labels[:, -1]
    loss = loss_fn(run, torch.device("cpu")).class_weights["label"]
    assert not run.readable(run.data.train).all()  # the feature cache found them at once
    assert [stage for stage, *_ in draws] == ["head", "head", "finetune"]
    for stage, weights, kept in draws:
        # each class as likely to be drawn, once its unreadable images are left out
        mass = [float(weights[kept & (labels == c)].sum()) for c in (0, 1)]
        assert mass[0] == pytest.approx(mass[1]), (stage, mass)
        # by the weights of the loss's count, not one of its own
        torch.testing.assert_close(weights[kept], loss[labels[kept]])


def test_class_weights_default_on_only_for_imbalanced_data(demo_dir, tmp_path):
    assert _prepared_run(demo_dir, tmp_path).data.class_weights["label"] is not None  # 16:6
    balanced = _prepared_run(demo_dir, tmp_path / "b", max_per_class=5)
    assert balanced.data.class_weights["label"] is None
    # The weighted sampler draws classes evenly already: weighting the loss too would
    # count the rare classes twice over, so auto leaves it off (balanced warns).
    sampled = _prepared_run(demo_dir, tmp_path / "s", sampler="weighted")
    assert sampled.data.class_weights["label"] is None
    assert "class-weighted loss: off (the weighted sampler" in (
        sampled.dir / "train.log").read_text()
    both = _prepared_run(demo_dir, tmp_path / "w", sampler="weighted", class_weights="balanced")
    assert both.data.class_weights["label"] is not None
    assert "corrects the imbalance twice" in (both.dir / "train.log").read_text()


def test_the_runs_splits_list_only_the_images_max_per_class_kept(demo_dir, tmp_path):
    """splits.csv listed the images undersampling left out as train: evaluate then called
    them trained on, and adapt refitted the head on all of them, past the cap."""
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, max_per_class=5, epochs_head=1,
                                                   epochs_finetune=0), tmp_path, quiet=True)
    splits = pd.read_csv(run_dir / "splits.csv")
    train_rows = splits[splits["split"] == "train"]
    assert train_rows["label"].value_counts().max() == 5
    assert len(train_rows) == json.loads((run_dir / "metrics.json").read_text())["train_images"]
    assert (splits["split"] == "val").sum() > 5  # val and test are not capped
    assert "Undersampled train to 5 per class: left out" in (run_dir / "train.log").read_text()


def test_train_and_resume_leave_the_callers_random_stream_as_it_was(demo_dir, tmp_path):
    """A notebook that seeds torch, trains, then draws: the draw is the one it would have
    had without the run in between (ws.train(seed=7) left torch seeded at 7)."""
    import torch

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=1, epochs_finetune=1,
                                                 seed=7), tmp_path, "r", quiet=True)
    assert torch.equal(torch.rand(4), expected)
    assert torch.initial_seed() == 123
    (run_dir / "metrics.json").unlink()  # a run left to finish
    torch.manual_seed(123)
    resume(run_dir, quiet=True)
    assert torch.equal(torch.rand(4), expected)


def test_a_gpu_machines_cuda_stream_gets_the_callers_seed_again(demo_dir, tmp_path,
                                                              monkeypatch):
    """Where CUDA has not started, torch seeds it lazily, with the last seed asked for: the
    run's took the place of the caller's torch.manual_seed(123) (seen here as the seeds
    torch.cuda.manual_seed_all is given, on a machine that says it has a GPU)."""
    import torch

    import wingspan.training.run as run_module

    seeds = []
    monkeypatch.setattr(run_module, "_gpus", lambda: 1)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeds.append)
    torch.manual_seed(123)
    train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=1, epochs_finetune=0, seed=7,
                                       device="cpu"), tmp_path, "r", quiet=True)
    assert 7 in seeds and seeds[-1] == 123


def test_early_stopping_stops(demo_dir, tmp_path, monkeypatch):
    config = tiny(tmp_path, lr=1e-12, epochs_head=20, patience=2, epochs_finetune=0)
    run_dir = train(read_dataset(demo_dir), config, tmp_path, quiet=True)
    assert len(history(run_dir)) == 3  # the first epoch, then two without improvement
    assert "stopped early" in (run_dir / "train.log").read_text()
    # Killed once the stage has stopped, before the next began: the resumed run stays stopped.
    import wingspan.training.run as run_module

    def killed(run, stage):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "_next_stage", killed)
    with pytest.raises(KeyboardInterrupt) as caught:
        train(read_dataset(demo_dir), config, tmp_path, "killed", quiet=True)
    monkeypatch.undo()
    # The run's folder comes with the interrupt: a notebook's only handle on a run stopped
    # there, ws.train having returned nothing (it had none: the name chosen was unknown).
    assert caught.value.run_dir == (tmp_path / "killed").absolute()
    resume(caught.value.run_dir, quiet=True)
    assert len(history(tmp_path / "killed")) == 3


# Killed, Ctrl-C, or SIGTERM (a scheduler's: it ended the run without a word). The
# forced-engine reruns (`make test`) take the kill alone: which engine ran changes what a
# checkpoint holds, not how the signal ends the process.
@pytest.mark.parametrize("how", [pytest.param(signal.SIGKILL, marks=pytest.mark.policy),
                                 signal.SIGINT, signal.SIGTERM])
def test_kill_and_resume_matches_an_uninterrupted_run(demo_dir, tmp_path, how):
    # One engine for both: the killed run is a process of its own, which under auto may
    # time the engines again (another thread count, a cache entry lost) and pick another.
    config = tiny(tmp_path, epochs_head=2, epochs_finetune=6, checkpoint_minutes=0.0,
                  **({} if os.environ.get(PRECISION_ENV) else {"precision": "fp32"}),
                  **({} if os.environ.get(RUNTIME_ENV) else {"runtime": "torch"}))
    ref = train(read_dataset(demo_dir), config, tmp_path / "ref", quiet=True)

    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(vars(config)))
    cmd = [sys.executable, "-c", PAUSED_CLI, "2", "train", str(demo_dir), "--config",
           str(config_file), "--runs-dir", str(tmp_path / "killed"), "--name", "r", "--quiet"]
    # Ctrl-C's default in the child: a suite started in the background (`pytest &`) passes
    # SIGINT down ignored, and Python then never turns it into KeyboardInterrupt.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_dir = tmp_path / "killed" / "r"
    wait_for_finetune_epochs(proc, run_dir, 2)
    proc.send_signal(how)
    # as a shell reads them: Ctrl-C's 130, SIGTERM's 143
    assert proc.wait() == {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130,
                           signal.SIGTERM: 143}[how]
    done = history(run_dir)
    assert len(done) < len(history(ref))  # it really was cut short
    assert (done["stage"] == "finetune").sum() in (2, 3)  # where PAUSED_CLI stops it
    if how != signal.SIGKILL:  # it says how to go on, in the log and (--quiet too) the terminal
        said = ("Interrupted." if how == signal.SIGINT else "Stopped by SIGTERM (a "
                "scheduler's or `kill`'s, or torchrun's once another process failed: see its "
                "output).") \
            + f" Continue from the last checkpoint with: wingspan train --resume {run_dir}"
        assert said in (run_dir / "train.log").read_text()
        assert said in " ".join(proc.stderr.read().decode().split())
        assert f"(in Python: ws.resume({str(run_dir)!r}))" in (run_dir / "train.log").read_text()

    resume(run_dir, quiet=True)
    assert "Resuming" in (run_dir / "train.log").read_text()
    pd.testing.assert_frame_equal(history(run_dir)[NUMBERS], history(ref)[NUMBERS],
                                  atol=1e-3, rtol=1e-3)
    with pytest.raises(WingspanError, match="finished"):
        resume(run_dir)
    # Killed after the last checkpoint but before the model was written: resume writes it.
    (run_dir / "model" / "manifest.json").unlink()  # killed with the weights written
    (run_dir / "metrics.json").unlink()
    resume(run_dir, quiet=True)
    assert (run_dir / "model" / "manifest.json").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["best"] == json.loads(
        (ref / "metrics.json").read_text())["best"]


@pytest.fixture(scope="module")
def uninterrupted(demo_dir, tmp_path_factory):
    """A run of a config that learns (its best epoch is fine-tuned) and checkpoints every
    step; (its folder, the config)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = tiny(tmp, epochs_head=2, epochs_finetune=2, lr=3e-2, checkpoint_minutes=0.0,
                  precision="fp32", runtime="torch")
    return train(read_dataset(demo_dir), config, tmp, "r", quiet=True), config


def test_cli_killed_at_runs_in_the_callers_environment_and_folder(tmp_path, monkeypatch):
    """The forkserver started once a session: its child takes the calling test's
    environment and working folder, not the server's."""
    folder_dataset(tmp_path / "flutter", {"monarch": 1, "admiral": 1}, (8, 8))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WINGSPAN_MAX_PIXELS", "lots")
    never = ("wingspan.cli.app:pixel_budget", 1, "never")
    said = cli_killed_at(["data", "inspect", "flutter", "--metadata-only"], *never)
    assert said.returncode != 0 and "$WINGSPAN_MAX_PIXELS is 'lots'" in said.stderr
    monkeypatch.delenv("WINGSPAN_MAX_PIXELS")
    said = cli_killed_at(["data", "inspect", "flutter", "--metadata-only"], *never)
    assert said.returncode == 0, said.stderr
    assert (tmp_path / "runs" / "data").is_dir()  # written under the caller's folder


@pytest.mark.parametrize("target, nth, match", [
    ("wingspan.files:_flush", 1, "features"),  # writing the head stage's feature cache
    ("wingspan.training.run:_next_stage", 1, ""),  # between the stages
    ("wingspan.files:_flush", 5, "last"),  # writing a checkpoint mid fine-tuning epoch
    ("wingspan.training.finish:_fit_unknown", 1, ""),  # fitting the unknown scores at the end
    ("wingspan.files:_flush", 1, "manifest"),  # writing the bundle, its weights written
])
def test_a_run_killed_anywhere_resumes_to_the_same_model(demo_dir, uninterrupted, tmp_path,
                                                         target, nth, match):
    """SIGKILL (no cleanup, no checkpoint) at each weak point: the resumed run ends as the
    uninterrupted one, with none of the killed writes' temporary files left."""
    ref, config = uninterrupted
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(vars(config)))
    run_dir = tmp_path / "runs" / "r"
    killed = cli_killed_at(["train", demo_dir, "--config", config_file, "--runs-dir",
                            run_dir.parent, "--name", "r", "--quiet"], target, nth, match)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "model" / "manifest.json").is_file()
    if match:  # killed mid-write
        assert list(run_dir.rglob(f".{match}.*.tmp*"))
    resume(run_dir, quiet=True)
    columns = ["stage", "epoch", *NUMBERS]
    pd.testing.assert_frame_equal(history(run_dir)[columns], history(ref)[columns], atol=1e-4,
                                  rtol=0)
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (run_dir, ref)]
    assert metrics[0]["best"] == metrics[1]["best"]
    assert metrics[1]["best"]["stage"] == "finetune"  # the final pass runs on the model
    (_, got), (_, want) = load_bundle(run_dir / "model"), load_bundle(ref / "model")
    assert got["calibration"]["temperature"] == pytest.approx(want["calibration"]["temperature"])
    thresholds = [{(score, lv): t for score, by in m["unknown"]["thresholds"].items()
                   for lv, t in by.items()} for m in (got, want)]
    assert thresholds[0] == pytest.approx(thresholds[1], rel=1e-4)
    assert not [p for p in run_dir.rglob(".*") if ".tmp" in p.name]
    if target.endswith("_next_stage"):  # killed past the head's last epoch: not "at head
        # epoch 4" of 3, nor "Stage 'head' took 0.0s since the resume"
        resumed = (run_dir / "train.log").read_text().split("Resuming")[-1]
        assert resumed.startswith(f" {run_dir}: its head stage's {config.epochs_head} epochs "
                                  "are done") and "Stage 'head' took" not in resumed, resumed
    if match == "last":  # (resumed inside fine-tuning: its time is not the stage's in all)
        log = (run_dir / "train.log").read_text()
        assert re.search(r"Stage 'finetune' took [\d.]+s since the resume; its epochs took "
                         r"[\d.]+s in all, with those before it", log), log[-2000:]


def test_a_damaged_last_checkpoint_says_how_to_go_on(uninterrupted, tmp_path):
    ref, _ = uninterrupted
    run_dir = shutil.copytree(ref, tmp_path / "r")
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # cut short (a full disk, a bad copy)
    with pytest.raises(WingspanError, match="cannot be read") as e:
        resume(run_dir, quiet=True)  # finished: deleting it would not train again
    assert e.value.hint == ("It may be damaged; the run's finished model is in "
                            f"{run_dir / 'model'}.")
    from wingspan.run_table import DONE, FAILED, run_row

    assert run_row(run_dir)["status"] == DONE  # (a finished run is not marked failed)
    (run_dir / "model" / "manifest.json").unlink()  # killed before the model was written
    with pytest.raises(WingspanError, match="cannot be read") as e:
        resume(run_dir, quiet=True)
    assert e.value.hint.startswith("It may be damaged. Delete it to train this run again "
                                   f"from its start (`wingspan train --resume {run_dir}`)")
    # `wingspan runs` says that the resume failed, and why, not "stopped (resumable)".
    row = run_row(run_dir)
    assert row["status"] == FAILED and row["detail"].startswith(f"The checkpoint {last} cannot")
    last.unlink()  # as the hint says: the run is trained again, and train.log says why
    resume(run_dir, quiet=True)
    assert f"Resuming {run_dir} from the beginning: it has no checkpoint ({last}) to go on " \
           "from, so its epochs are trained again" in (run_dir / "train.log").read_text()
    assert run_row(run_dir)["status"] == DONE


def _resume_interrupted_at_start(run_dir, monkeypatch) -> None:
    """A resume of `run_dir` that Ctrl-C stops as it starts (reading the checkpoint,
    checking the data)."""
    import wingspan.training.resuming as resume_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(resume_module, "start_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resume(run_dir, quiet=True)


def test_ctrl_c_while_a_resume_starts_says_how_to_go_on(uninterrupted, tmp_path, monkeypatch,
                                                       capsys):
    """Interrupted before the recipe took up again (reading the checkpoint, checking the
    data): said in train.log and on the terminal, the run left as it was, resumable."""
    from wingspan.training import folder

    run_dir = shutil.copytree(uninterrupted[0], tmp_path / "r")
    (run_dir / "model" / "manifest.json").unlink()  # killed before its model was written
    (run_dir / "metrics.json").unlink()
    _resume_interrupted_at_start(run_dir, monkeypatch)
    said = (f"Interrupted as the resume of {run_dir} started, before any further training. "
            f"Continue from the last checkpoint with: wingspan train --resume {run_dir} (in "
            f"Python: ws.resume({str(run_dir)!r}))")
    assert said in capsys.readouterr().err and said in (run_dir / "train.log").read_text()
    assert str(run_dir.resolve() / ".lock") not in folder._HELD  # the lock was let go
    monkeypatch.undo()
    resume(run_dir, quiet=True)
    assert (run_dir / "model" / "manifest.json").is_file()
    assert (run_dir / "train.log").read_text().count("Interrupted") == 1  # said once


def test_ctrl_c_of_a_run_without_a_checkpoint_says_it_starts_again(uninterrupted, tmp_path,
                                                                  monkeypatch, capsys):
    """With no last.pt (killed before its first one, or deleted as a damaged one's hint
    says), a resume starts from the beginning: "continue from the last checkpoint" would
    promise what it cannot do."""
    run_dir = shutil.copytree(uninterrupted[0], tmp_path / "r")
    (run_dir / "model" / "manifest.json").unlink()
    (run_dir / "checkpoints" / "last.pt").unlink()
    _resume_interrupted_at_start(run_dir, monkeypatch)
    said = (f"It has no checkpoint yet; start it again from the beginning with: wingspan "
            f"train --resume {run_dir}")
    assert said in capsys.readouterr().err and said in (run_dir / "train.log").read_text()
    assert "Continue from the last checkpoint" not in (run_dir / "train.log").read_text()


def test_held_out_classes_that_share_photos_with_known_ones_are_scored_not_refused(
        demo_dir, tmp_path):
    """The same photo saved in a held-out class and a known one (which the split warns
    of), or a held-out 'Admiral' beside a known 'admiral': evaluate --unknown refuses such
    folders, and a run holding them out trained to the end, then failed scoring them."""
    data = shutil.copytree(demo_dir, tmp_path / "data")
    known = sorted(p for p in (data / "azure_spotwing").iterdir())[:12]
    for i, photo in enumerate(known):
        shutil.copy(photo, data / "white_darktip" / f"dup_{i}.jpg")
    shutil.copytree(data / "orange_veined", data / "Azure_Spotwing")  # a case twin
    run_dir = train(read_dataset(data), tiny(tmp_path, epochs_head=1, epochs_finetune=0,
                                             test_fraction=0.3, holdout_classes=[
                                                 "white_darktip", "Azure_Spotwing"]),
                    tmp_path / "runs", "r", quiet=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["unknown"]["unseen_images"] > 12 and not (run_dir / "error.txt").exists()
    # The report names the classes held out (it did nowhere but in paths), and its title
    # the folder (a run's test report and this one were alike in the browser's tabs)
    held = {c: len(list((data / c).iterdir())) for c in ("Azure_Spotwing", "white_darktip")}
    assert metrics["unknown"]["held_out_classes"] == held
    page = (run_dir / "evaluation-unknown" / "report.html").read_text()
    assert "classes held out of training (images)" in page
    assert f"Azure_Spotwing ({held['Azure_Spotwing']}), white_darktip (" in page
    assert "<title>wingspan report: r, evaluation-unknown</title>" in page


def test_last_pt_holds_the_best_weights_before_the_bundle_is_written(demo_dir, tmp_path,
                                                                    monkeypatch):
    """Killed between the bundle and the last checkpoint, a run read as finished (nothing
    to resume) with the last epoch's weights in last.pt, not the best's as the README says."""
    import torch

    import wingspan.training.finish as finish_module
    from wingspan.training.checkpoint import load_checkpoint

    save, held = finish_module.save_bundle, []

    def checked(model, folder, *args, **kwargs):
        last = load_checkpoint(folder.parent / "checkpoints" / "last.pt")["model"]
        held.append(all(torch.equal(last[k].cpu(), v.cpu())
                        for k, v in model.state_dict().items()))
        return save(model, folder, *args, **kwargs)

    monkeypatch.setattr(finish_module, "save_bundle", checked)
    # (fine-tuning at 50x the head's rate spoils the model, so that the best epoch is
    # mostly not the last, where the old order showed: on the AVX2 EPYC it was head 1)
    train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=2, epochs_finetune=1,
                                       finetune_lr_scale=50), tmp_path / "runs", "r", quiet=True)
    assert held == [True]


def test_the_held_out_classes_are_scored_on_the_runs_own_device_and_engines(
        demo_dir, tmp_path, monkeypatch):
    """The held-out classes were scored with every choice left to `auto`: a run trained
    with --device cpu (its GPU busy) or cuda:1 scored them on cuda:0."""
    import wingspan.evaluate.run as evaluate_module

    calls, real = [], evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=1, epochs_finetune=0,
                                       holdout_classes=["white_darktip"], device="cpu",
                                       precision="fp32", runtime="torch", batch_size=8),
          tmp_path / "runs", "r", quiet=True)
    (called,) = calls
    assert (called["device"], called["precision"], called["runtime"],
            called["batch_size"]) == ("cpu", "fp32", "torch", 8)


def test_ctrl_c_while_a_resume_scores_the_held_out_classes_says_how_to_go_on(
        demo_dir, tmp_path, monkeypatch):
    """Killed while scoring its held-out classes, a resumed run scores them again: a Ctrl-C
    there is the recipe's (the run went on), not one of the resume's start-up."""
    import wingspan.evaluate.run as evaluate_module

    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=1, epochs_finetune=0,
                                                  holdout_classes=["white_darktip"]),
                    tmp_path / "runs", "r", quiet=True)
    # No test split (tiny's --test-fraction 0): the known share turned away is of the val
    # images the threshold was set on, said so rather than passed off as measured.
    assert "of the known val images answered unknown too (as fitted: the threshold was set " \
           "on them)" in " ".join((run_dir / "train.log").read_text().split())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items()
                                                      if k != "unknown"}))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resume(run_dir, quiet=True)
    log = (run_dir / "train.log").read_text()
    assert "scoring the held-out classes" in log and "Interrupted. Continue from" in log
    assert "Interrupted as the resume" not in log


def test_a_resume_refuses_a_config_yaml_changed_since_the_checkpoint(uninterrupted, tmp_path):
    """Edited to train longer, or cut short (its missing settings would take their
    defaults), or its splits.csv changed: the rest of the run would follow other settings
    than its first part, and the bundle record settings the model was not trained with."""
    ref, _ = uninterrupted
    run_dir = shutil.copytree(ref, tmp_path / "r")
    (run_dir / "model" / "manifest.json").unlink()  # killed before the model was written
    config = run_dir / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("epochs_finetune: 2", "epochs_finetune: 3"))
    with pytest.raises(WingspanError, match=r"no longer holds the settings the run was "
                                            r"trained with: epochs_finetune: 3 \(trained with 2\)"
                       ) as e:
        resume(run_dir, quiet=True)
    # (its model is not written: the way on is its last checkpoint's backbone)
    assert e.value.hint.endswith(f"--weights {run_dir / 'checkpoints' / 'last.pt'} "
                                 "--backbone test_efficientnet")
    config.write_text("".join(line for line in original.splitlines(True)
                              if not line.startswith("batch_size:")))
    with pytest.raises(WingspanError, match=r"batch_size: 32 \(trained with 8\)"):
        resume(run_dir, quiet=True)
    config.write_text(original[:original.index("epochs_head")] + "epochs_head: [3\n")
    with pytest.raises(WingspanError, match=r"config.yaml is damaged: not valid YAML \(line"):
        resume(run_dir, quiet=True)
    # A blank weights (YAML's null): refused, not read as Python's None (random weights).
    assert "weights: none" in original
    config.write_text(original.replace("weights: none", "weights:"))
    with pytest.raises(WingspanError, match="config.yaml: 'weights' is empty"):
        resume(run_dir, quiet=True)
    # The machine's settings may change, and those that change nothing learnt.
    assert "checkpoint_minutes: 0.0" in original
    config.write_text(original.replace("workers: 0", "workers: 1").replace(
        "checkpoint_minutes: 0.0", "checkpoint_minutes: 5.0"))
    splits = run_dir / "splits.csv"  # (rows lost: the checkpoint's batches point elsewhere)
    rows = splits.read_text().splitlines(True)
    splits.write_text("".join(rows[:len(rows) * 9 // 10]))
    with pytest.raises(WingspanError, match="splits.csv has changed since the run began"):
        resume(run_dir, quiet=True)
    # The same rows with their paths rewritten (the data moved, say) are the same split.
    splits.write_text("".join(row.replace("/", "/./", 1) if i else row
                              for i, row in enumerate(rows)))
    resume(run_dir, quiet=True)
    assert (run_dir / "model" / "manifest.json").is_file()


def test_a_finished_run_with_a_damaged_metrics_json_resumes_to_write_it_again(
        uninterrupted, tmp_path):
    """metrics.json cut short (a full disk): the run is no longer finished, and its resume
    writes the same figures again from the checkpoints, as it does a damaged bundle."""
    ref, _ = uninterrupted
    run_dir = shutil.copytree(ref, tmp_path / "r")
    metrics = run_dir / "metrics.json"
    metrics.write_text(metrics.read_text()[:100])
    resume(run_dir, quiet=True)
    got, want = (json.loads((r / "metrics.json").read_text()) for r in (run_dir, ref))
    assert got["best"] == want["best"] and got["classes"] == want["classes"]


def test_a_resume_reads_images_with_the_pixel_budget_the_run_began_with(
        uninterrupted, tmp_path, monkeypatch):
    """A run begun with max_pixels=1e8 (config.yaml's comment says so) and resumed without
    it dropped its 64 MP image as over the default 50 MP, for the rest of the run. Now the
    resume takes the run's budget; one given to the resume itself wins."""
    import wingspan.training.resuming as resume_module
    from wingspan.data.images import call_budget, chosen_budget

    ref, _ = uninterrupted
    run_dir = shutil.copytree(ref, tmp_path / "r")
    (run_dir / "metrics.json").unlink()  # a run to finish
    config = run_dir / "config.yaml"
    first, rest = config.read_text().split("\n", 1)
    config.write_text(first.replace("--format folder", "--format folder --max-pixels "
                                    "100000000") + "\n" + rest)
    seen = []
    monkeypatch.setattr(resume_module, "interruptible", lambda run, **_: seen.append(
        chosen_budget()) or run.dir)
    resume(run_dir, quiet=True)
    with call_budget(7_000_000):
        resume(run_dir, quiet=True)
    assert seen == [100_000_000, 7_000_000]
    # and `train --resume --max-pixels`, which was refused as a setting a resume keeps
    from wingspan.cli import main

    monkeypatch.setenv("WINGSPAN_MAX_PIXELS", "50000000")  # (put back after: the option
    with pytest.raises(SystemExit):  # sets it) (exits: the stub run wrote no metrics to show)
        main(["train", "--resume", str(run_dir), "--max-pixels", "9000000", "--quiet"])
    assert seen[-1] == 9_000_000


def test_a_misspelt_machine_setting_of_a_resume_is_named_with_the_closest(uninterrupted):
    """ws.resume(run, worker=0) said only that a resumed run cannot change 'worker'; a
    setting it may not change (lr) is still refused as such."""
    ref, _ = uninterrupted
    with pytest.raises(WingspanError, match="Unknown setting 'worker'") as e:
        resume(ref, worker=0)
    assert "Did you mean 'workers'?" in e.value.hint
    with pytest.raises(WingspanError, match="A resumed run cannot change lr"):
        resume(ref, lr=0.1)


def test_a_damaged_best_checkpoint_still_lets_the_run_finish(uninterrupted, tmp_path):
    """Killed before its model was written, with best.pt damaged since: the resumed run
    finishes with the last epoch's model and says so, rather than failing for good."""
    ref, _ = uninterrupted
    run_dir = shutil.copytree(ref, tmp_path / "r")
    (run_dir / "model" / "manifest.json").unlink()
    (run_dir / "metrics.json").unlink()
    best = run_dir / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    resume(run_dir, quiet=True)
    last = history(run_dir).iloc[-1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["best"]["stage"], metrics["best"]["epoch"]) == (last["stage"], last["epoch"])
    assert load_bundle(run_dir / "model")[1]["metrics"]["best"]["epoch"] == last["epoch"]
    log = (run_dir / "train.log").read_text()
    assert f"{best} cannot be read" in log and "The model is the last epoch's (finetune " \
        f"epoch {last['epoch']})" in log


def test_a_damaged_best_checkpoint_of_a_head_only_run_keeps_its_best_epoch(demo_dir, tmp_path):
    """Without fine-tuning, the last checkpoint holds the best head (loaded as the head
    stage ended), so the model and the figures stay the best epoch's, not the last's."""
    config = tiny(tmp_path, epochs_head=6, epochs_finetune=0, lr=5e-2, precision="fp32",
                  runtime="torch")
    ref = train(read_dataset(demo_dir), config, tmp_path / "runs", "r", quiet=True)
    want = json.loads((ref / "metrics.json").read_text())["best"]
    run_dir = shutil.copytree(ref, tmp_path / "copy")
    (run_dir / "model" / "manifest.json").unlink()
    best = run_dir / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    resume(run_dir, quiet=True)
    assert json.loads((run_dir / "metrics.json").read_text())["best"] == want
    a, b = (load_bundle(r / "model")[0].state_dict() for r in (ref, run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert f"The model is the best one's all the same (head epoch {want['epoch']}" in \
        (run_dir / "train.log").read_text()


def test_a_damaged_feature_cache_at_the_end_is_computed_again(demo_dir, tmp_path):
    """A run whose best model is a head on the frozen backbone reads its final features from
    the cache; killed before its model was written and its cache damaged since, the resume
    computes them again (as stage 1 does) rather than stopping at every try."""
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_finetune=0, precision="fp32",
                                                 runtime="torch", keep_feature_cache=True),
                    tmp_path / "runs", "r", quiet=True)
    want = load_bundle(run_dir / "model")[1]
    (run_dir / "model" / "manifest.json").unlink()
    cache = run_dir / "cache" / "features.safetensors"
    cache.write_bytes(cache.read_bytes()[:1000])
    resume(run_dir, quiet=True)
    got = load_bundle(run_dir / "model")[1]
    assert got["metrics"]["best"] == want["metrics"]["best"]
    assert got["calibration"]["temperature"] == pytest.approx(
        want["calibration"]["temperature"], rel=1e-3)
    assert f"The feature cache {cache} cannot be read" in (run_dir / "train.log").read_text()


def test_best_pt_unreadable_as_the_head_stage_ends_is_written_again(demo_dir, tmp_path,
                                                                   monkeypatch):
    """The last head epoch replaces it (said once): the run's figures and best.pt then agree
    with the model, and the end reads it back rather than saying the same again."""
    import wingspan.training.finish as finish_module

    real, failed = finish_module.load_checkpoint, []

    def load_once_damaged(path):
        if path.name == "best.pt" and not failed:
            failed.append(path)
            raise WingspanError(f"The checkpoint {path} cannot be read: damaged.")
        return real(path)

    monkeypatch.setattr(finish_module, "load_checkpoint", load_once_damaged)
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=4, epochs_finetune=0),
                    tmp_path / "runs", "r", quiet=True)
    last = history(run_dir).iloc[-1]
    best = json.loads((run_dir / "metrics.json").read_text())["best"]
    assert (best["stage"], best["epoch"]) == ("head", last["epoch"])
    assert real(run_dir / "checkpoints" / "best.pt")["epoch"] == last["epoch"]
    log = (run_dir / "train.log").read_text()
    assert log.count("cannot be read") == 1 and "best one's all the same" not in log


def test_a_resumed_run_keeps_where_its_weights_came_from(demo_dir, tmp_path):
    """A resumed run loads no weights of its own (its checkpoint has them all): the model
    still says which file (or package, or download) the backbone started from."""
    from safetensors.torch import save_file

    from wingspan.models import create_classifier

    model, _ = create_classifier("test_efficientnet", {"label": 2}, weights="none")
    start = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.net.state_dict().items()}, start)
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, weights=str(start), epochs_head=1,
                                                 epochs_finetune=1), tmp_path / "runs",
                    quiet=True)
    said = lambda: json.loads((run_dir / "model" / "manifest.json").read_text())  # noqa: E731
    assert said()["weights_source"] == f"file: {start}"
    (run_dir / "model" / "manifest.json").unlink()  # killed before the model was written
    (run_dir / "metrics.json").unlink()
    # --workers typed for the resume is checked as train's; the run's saved one (from a
    # larger machine, say) is lowered to what this machine takes, and said.
    with pytest.raises(WingspanError, match=r"--workers 514 \(workers= in Python\) would start"):
        resume(run_dir, quiet=True, workers=514)
    settings = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**settings, "workers": 514}))
    resume(run_dir, quiet=True)
    assert "The run's --workers 514 is more than" in (run_dir / "train.log").read_text()
    assert said()["weights_source"] == f"file: {start}"
    assert json.loads((run_dir / "metrics.json").read_text())["weights"] == f"file: {start}"


def test_engines_forced_by_the_environment_are_the_runs_own_settings(demo_dir, tmp_path,
                                                                    monkeypatch):
    """$WINGSPAN_PRECISION / $WINGSPAN_RUNTIME go into config.yaml: a resumed run (in a
    shell without them, say) keeps the engines it began with."""
    monkeypatch.setenv("WINGSPAN_PRECISION", "fp32")
    monkeypatch.setenv("WINGSPAN_RUNTIME", "torch")
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=1, epochs_finetune=0),
                    tmp_path / "runs", quiet=True)
    settings = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (settings["precision"], settings["runtime"]) == ("fp32", "torch")


def _uninterrupted_and_resumed(demo_dir, tmp_path, monkeypatch, config, breaking) -> dict:
    """Two runs on copies of the demo data, with Run.save wrapped by `breaking(kill)`
    (which breaks images, and with kill raises KeyboardInterrupt): "ref" uninterrupted,
    "killed" cut short and then resumed. Their folders."""
    from wingspan.training.context import Run

    runs = {}
    for name, kill in (("ref", False), ("killed", True)):
        data = shutil.copytree(demo_dir, tmp_path / f"data-{name}")
        monkeypatch.setattr(Run, "save", breaking(kill))
        try:
            runs[name] = train(read_dataset(data), config, tmp_path / name, "r", quiet=True)
        except KeyboardInterrupt:
            runs[name] = tmp_path / name / "r"
        monkeypatch.undo()
    assert len(history(runs["killed"])) < len(history(runs["ref"]))  # it was cut short
    resume(runs["killed"], quiet=True)
    return runs


def test_a_kill_after_an_image_broke_mid_epoch_resumes_alike(demo_dir, tmp_path, monkeypatch):
    """An image that breaks during a fine-tuning epoch is left out from the next epoch on;
    a run killed after it was found, in that epoch, resumes on the same batches (leaving it
    out of the resumed epoch's order would shift every batch after it)."""
    from wingspan.training.context import Run
    from wingspan.training.data import epoch_order

    config = tiny(tmp_path, epochs_head=1, epochs_finetune=3, checkpoint_minutes=0.0,
                  precision="fp32", runtime="torch")
    save = Run.save

    def breaking(kill):
        def saved(run, optimizer=None):
            save(run, optimizer)
            state = run.state
            if state.stage != "finetune" or state.epoch != 1:
                return
            if state.step == 1:  # an image of the epoch's second batch breaks
                order = epoch_order(len(run.data.train), config.seed, 1)
                Path(run.data.train.paths[order[config.batch_size + 1]]).write_bytes(b"gone")
            elif state.step == 2 and kill:  # killed once that batch has found it
                assert len(state.skipped) == 1
                raise KeyboardInterrupt
        return saved

    runs = _uninterrupted_and_resumed(demo_dir, tmp_path, monkeypatch, config, breaking)
    pd.testing.assert_frame_equal(history(runs["killed"])[NUMBERS], history(runs["ref"])[NUMBERS],
                                  atol=1e-4, rtol=0)
    for run in runs.values():
        assert len(json.loads((run / "metrics.json").read_text())["unreadable"]) == 1


def test_resuming_without_every_image_of_a_class_says_which(demo_dir, tmp_path, monkeypatch):
    data = shutil.copytree(demo_dir, tmp_path / "data")
    kill_at_first_finetune_row(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(read_dataset(data), tiny(tmp_path), tmp_path / "runs", "r", quiet=True)
    monkeypatch.undo()
    from wingspan.inference import find_bundle  # predict, evaluate, export, serve...

    with pytest.raises(WingspanError, match="has no model yet: its training stopped"):
        find_bundle(tmp_path / "runs" / "r")
    # A run that another process is training (its lock held) is not resumed beside it.
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; "
                               "f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
                               "print('held', flush=True); time.sleep(120)",
                               str(tmp_path / "runs" / "r" / ".lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(WingspanError, match="being trained by another process"):
            resume(tmp_path / "runs" / "r", quiet=True)
        # predict, evaluate... on it: wait (a resume now would be refused, as above)
        with pytest.raises(WingspanError, match="no model yet: it is being trained now") as e:
            find_bundle(tmp_path / "runs" / "r")
        assert "Wait for it to finish" in e.value.hint and "--resume" not in e.value.hint
    finally:
        holder.kill()
        holder.wait()
    (data / "azure_spotwing").rename(tmp_path / "moved")
    with pytest.raises(WingspanError, match="Every training image of azure_spotwing is gone") \
            as e:
        resume(tmp_path / "runs" / "r", quiet=True)
    assert "if the data moved, write their new paths into" in e.value.hint  # as README says
    # Its config.yaml deleted: said so, not "not a wingspan run".
    config_file = tmp_path / "runs" / "r" / "config.yaml"
    config_file.rename(tmp_path / "config.yaml")
    with pytest.raises(WingspanError, match="has checkpoints but no config.yaml") as e:
        resume(tmp_path / "runs" / "r", quiet=True)
    assert "--weights" in e.value.hint
    (tmp_path / "config.yaml").rename(config_file)
    # One image gone, not a class: the run resumes without it, and says so.
    (tmp_path / "moved").rename(data / "azure_spotwing")
    splits = pd.read_csv(tmp_path / "runs" / "r" / "splits.csv")
    gone = splits.loc[splits["split"] == "train", "path"].iloc[0]
    Path(gone).unlink()
    run_dir = resume(tmp_path / "runs" / "r", quiet=True)
    assert f"{gone}: the file is gone since the run began" in (run_dir / "train.log").read_text()
    unreadable = json.loads((run_dir / "metrics.json").read_text())["unreadable"]
    assert [u["path"] for u in unreadable] == [gone]


def test_resuming_a_path_that_does_not_exist_says_so_and_names_close_runs(
        run_cli, tmp_path, monkeypatch):
    for name in ("leeds-lite2", "oxford"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.yaml").write_text("lr: 0.01\n")
    monkeypatch.chdir(tmp_path)
    for given, meant in [("runs/leeds-lite", "runs/leeds-lite2"),  # a typo
                         ("oxford", "runs/oxford"),  # the name without its runs folder
                         ("runs/cambridge", None)]:
        code, _, err = run_cli("train", "--resume", given)
        err = " ".join(err.split())
        assert code == 2 and f"{given} does not exist" in err and "not a wingspan run" not in err
        assert (f"Did you mean {meant}?" in err) if meant else "Did you mean" not in err, err


@pytest.mark.parametrize("written, said", [
    ("name: my-project\n", "is not a wingspan run"), ("- a\n- b\n", "is not a wingspan run"),
    ("epochs: [\n", "is not a wingspan run"),
    ("backbone: resnet50\nepochs_head: 3\nwarp: 9\n", "Another version of wingspan wrote it")])
def test_resuming_a_folder_whose_config_is_not_a_runs_says_so(tmp_path, written, said):
    (tmp_path / "config.yaml").write_text(written)
    (tmp_path / "splits.csv").write_text("path,label,split\n")
    with pytest.raises(WingspanError, match=said):
        resume(tmp_path, quiet=True)


def test_a_kill_between_the_best_and_the_last_checkpoint_resumes_alike(demo_dir, tmp_path,
                                                                       monkeypatch):
    """Killed once the first fine-tuned epoch has become best.pt, before the checkpoint
    after it: the resumed run fine-tunes from the best head again, not from best.pt (which
    by then holds the fine-tuned weights). The race the distributed resume test once hit."""
    config = tiny(tmp_path, dropout=0.0, epochs_finetune=12, lr=3e-2, precision="fp32",
                  runtime="torch")
    ref = train(read_dataset(demo_dir), config, tmp_path / "ref", quiet=True)
    kill_at_first_finetune_row(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(read_dataset(demo_dir), config, tmp_path / "killed", "r", quiet=True)
    monkeypatch.undo()
    run_dir = tmp_path / "killed" / "r"
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["stage"] == "finetune"
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["state"]["epoch"] == 0

    resume(run_dir, quiet=True)
    pd.testing.assert_frame_equal(history(run_dir)[NUMBERS], history(ref)[NUMBERS],
                                  atol=1e-4, rtol=0)


def test_the_command_of_a_stopped_run_again_says_how_to_resume_that_run(demo_dir, tmp_path,
                                                                        monkeypatch, capsys):
    """Ctrl-C, then the same command again: a new run beside the stopped one, which says
    that `--resume` would continue the stopped one instead of starting from nothing (even
    with --quiet: it may be what the user meant)."""
    config = tiny(tmp_path, epochs_head=1, epochs_finetune=1)
    kill_at_first_finetune_row(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(read_dataset(demo_dir), config, tmp_path / "runs", "r", quiet=True)
    monkeypatch.undo()
    stopped = tmp_path / "runs" / "r"
    again = train(read_dataset(demo_dir), config, tmp_path / "runs", "r", quiet=True)
    assert again.name == "r-2"
    log = " ".join((again / "train.log").read_text().split())
    assert (f"{stopped} holds a run that did not finish; this one starts afresh in {again}. "
            f"If that one was stopped, `wingspan train --resume {stopped}` continues it") in log
    assert f"`wingspan train --resume {stopped}` continues it" in " ".join(
        capsys.readouterr().err.split())


def test_quiet_hides_the_progress_not_what_the_figures_lack(demo_dir, tmp_path, run_cli):
    """--quiet (quiet=True): no epoch lines, but a caveat about the figures (here: no test
    split, so the val figure is the only one) still reaches the user, on stderr, as it
    reaches train.log; without --quiet it is printed among the other lines (on stderr
    too: stdout holds the results alone)."""
    config = tiny(tmp_path, epochs_head=1, epochs_finetune=1)  # (test_fraction 0)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(vars(config)))
    said = "No test split was kept apart (--test-fraction 0): the val figure is the only one"
    for quiet in (True, False):
        code, out, err = run_cli("train", demo_dir, "--config", path, "--runs-dir",
                                 tmp_path / "runs", "--name", str(quiet),
                                 *(["--quiet"] if quiet else []))
        assert code == 0, err
        out, err = " ".join(out.split()), " ".join(err.split())
        assert said in err and said not in out
        assert ("head 1:" in err) is not quiet  # the epoch lines: progress
        log = " ".join((tmp_path / "runs" / str(quiet) / "train.log").read_text().split())
        assert said in log and "head 1:" in log


@pytest.mark.parametrize("changes, message", [
    ({"lr": -1}, "'lr' setting must be a positive number"),
    ({"min_delta": -1e-3}, "'min_delta' setting must be 0 or more"),
    ({"patience": 0}, "'patience' setting must be at least 1"),
    ({"epochs_head": 0, "epochs_finetune": 0}, "must be at least 1"),
    ({"sampler": "random"}, "'sampler' setting must be shuffle or weighted"),
    ({"augment": "wild"}, "'augment' setting must be one of"),
    ({"val_fraction": 0.9, "test_fraction": 0.2}, "below 1"),
    ({"lr": "fast"}, r"'lr' = 'fast': Input should be a valid number"),
    ({"epochs_head": "two"}, r"'epochs_head' = 'two': Input should be a valid integer"),
    ({"epochs_head": 1.5}, "got a number with a fractional part"),
    ({"backbone": 5}, r"'backbone' = 5: Input should be a valid string"),
    ({"lr": float("inf")}, "Input should be a finite number"),
    ({"lr": float("nan"), "dropout": "high"}, r"'dropout' = 'high'.* \| 'lr' = nan"),
    ({"lr": 1e30}, "'lr' setting must be below 10"),
    ({"levels": 5}, "'levels' = 5: Input should be a valid list"),
    ({"hidden": -5}, "'hidden' setting must be at least 1 unit"),
    ({"checkpoint_minutes": -1}, "'checkpoint_minutes' setting must be 0 .after every"),
    ({"imbalance_threshold": -1}, "'imbalance_threshold' setting must be 1 or more"),
])
def test_bad_configs_fail_clearly(changes, message):
    with pytest.raises(WingspanError, match=message):
        TrainConfig(**changes)


def test_paths_are_settings_too(tmp_path):
    """A Path where a file or folder is asked for, as Python users pass one."""
    config = TrainConfig(weights=tmp_path / "w.pth", cache_dir=tmp_path / "cache")
    assert (config.weights, config.cache_dir) == (str(tmp_path / "w.pth"),
                                                  str(tmp_path / "cache"))
    with pytest.raises(SettingError, match="'epochs_head' = 'x'") as e:
        TrainConfig(epochs_head="x")
    assert "the keywords in Python" in e.value.hint


def test_config_file_and_command_line(tmp_path, run_cli, demo_dir):
    path = tmp_path / "c.yaml"
    path.write_text("epochs_head: 7\nlr: 0.01\n")
    config = TrainConfig.from_file(path, lr=0.5)
    assert (config.epochs_head, config.lr) == (7, 0.5)
    path.write_text("epochs_heads: 7\n")
    with pytest.raises(WingspanError, match="(?s)unknown setting 'epochs_heads'\\..*"
                                            "Did you mean 'epochs_heads' -> 'epochs_head'"):
        TrainConfig.from_file(path)
    # A key given twice (a copied line edited in one place): refused, not the last kept.
    path.write_text("epochs_head: 2\nlr: 0.01\nepochs_head: 3\n")
    with pytest.raises(WingspanError, match="epochs_head given twice"):
        TrainConfig.from_file(path)
    # Names other tools use, no spelling away from ours, still find ours.
    path.write_text("learning_rate: 0.01\nbs: 8\nmodel: resnet18\n")
    code, _, err = run_cli("train", demo_dir, "--config", path, "--quiet")
    assert code == 2 and "Did you mean 'bs' -> 'batch_size', 'learning_rate' -> 'lr', " \
                         "'model' -> 'backbone'?" in " ".join(err.split()), err
    # An option of the command in the file: where it goes, not a setting that sounds alike
    # (max_pixels is no max_per_class).
    path.write_text("max_pixels: 1000\nformat: csv\n")
    code, _, err = run_cli("train", demo_dir, "--config", path, "--quiet")
    said = " ".join(err.split())
    assert code == 2 and "'format', 'max_pixels' are options of the command, not a setting " \
        "a config file holds" in said and "Give --format, --max-pixels on the command line" \
        in said and "max_per_class" not in said, said
    # A device misspelt is refused with the other settings, before torch is imported.
    code, _, err = run_cli("train", demo_dir, "--device", "gpu", "--quiet")
    assert code == 2 and "--device must be auto, cpu, cuda or cuda:N" in err, err
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    code, _, err = run_cli("train", demo_dir, "--sampler", "random", "--quiet")
    assert code == 2 and "--sampler must be shuffle or weighted" in err
    for path_like in ("../elsewhere", "a/b"):  # a name, not a path out of --runs-dir
        code, _, err = run_cli("train", demo_dir, "--name", path_like, "--runs-dir",
                               tmp_path / "named", "--quiet")
        assert code == 2 and "is a path" in err
    assert not (tmp_path / "elsewhere").exists()
    # A blank name, and one longer than a folder may be (an OSError before).
    for name, said in [(" ", "is blank"),  # ("" took the default; now refused as any "")
                       ("", "An empty value was given after --name"),
                       ("x" * 300, "300 bytes long; a run's name takes at most 200")]:
        code, _, err = run_cli("train", demo_dir, "--name", name, "--runs-dir",
                               tmp_path / "named", "--quiet")
        assert code == 2 and said in " ".join(err.split()), err
    code, _, err = run_cli("train", demo_dir, "--rare-below", "3", "--quiet")
    assert code == 2 and "--rare-below must be 0 unless --levels names" in err
    assert TrainConfig(rare_below=3, levels=["family", "label"]).rare_below == 3
    # Level weights without levels: said so ("one weight per entry of 'levels'" named no
    # missing --levels), and a count that differs names the levels to weigh.
    code, _, err = run_cli("train", demo_dir, "--level-weights", "1,2", "--quiet")
    assert code == 2 and "--level-weights must be given with --levels, one" in err, err
    assert "Got 1,2 instead" in err, err  # as typed, not Python's [1.0, 2.0]
    with pytest.raises(SettingError, match=r"one weight per entry of 'levels' \(2: family, "
                                           r"label\). Got 1 instead"):
        TrainConfig(levels=["family", "label"], level_weights=[1.0])
    # The library as the CLI: a level the levels lack, or a coarser one, is not dropped in
    # silence (the run would have predicted the finest).
    with pytest.raises(SettingError, match="must be one of levels family, label "):
        TrainConfig(level="genus", levels=["family", "label"])
    with pytest.raises(WingspanError, match="'family' is not the finest of levels"):
        train(read_dataset(demo_dir), tiny(tmp_path, level="family", levels=["label", "family"]),
              tmp_path / "lv", "lv", quiet=True)
    assert not (tmp_path / "lv").exists()
    # A wrong type in the file: refused before any run folder or feature cache is made.
    path.write_text("epochs_head: true\n")  # a yes/no for a number: not read as 1 epoch
    with pytest.raises(SettingError, match="'epochs_head' = True: true or false, where a "
                                           "number or a name goes"):
        TrainConfig.from_file(path)
    path.write_text("weights:\n")  # Keras' None is no YAML blank
    with pytest.raises(WingspanError, match="'weights' is empty") as e:
        TrainConfig.from_file(path)
    assert "`weights: none` for random weights" in e.value.hint
    path.write_text("epochs_head: 1.5\nlr: fast\n")
    code, _, err = run_cli("train", demo_dir, "--config", path, "--runs-dir", tmp_path / "r")
    assert code == 2 and "'epochs_head' = 1.5" in err and "'lr' = 'fast'" in err
    # A value out of range in the file names the file, as an unknown key does; one typed
    # on the command line names its option alone.
    path.write_text("lr: -1\n")
    code, _, err = run_cli("train", demo_dir, "--config", path, "--runs-dir", tmp_path / "r")
    assert code == 2 and f"{path}: The 'lr' setting must be a positive" in " ".join(
        err.split()), err
    code, _, err = run_cli("train", demo_dir, "--config", path, "--lr", "0.01",
                           "--epochs-head", "-1", "--runs-dir", tmp_path / "r")
    assert code == 2 and "--epochs-head must be 0 or more" in err and str(path) not in err
    with pytest.raises(SettingError, match="c.yaml: The 'lr' setting"):
        TrainConfig.from_file(path)
    assert not (tmp_path / "r").exists()


def test_command_line_split_and_level_options_win_over_the_file(tmp_path, run_cli, demo_dir,
                                                                 monkeypatch):
    from wingspan.training import run as run_module

    given = []

    def capture(dataset, settings, *args):
        given.append(settings)
        raise WingspanError("captured")

    monkeypatch.setattr(run_module, "train", capture)
    path = tmp_path / "c.yaml"
    path.write_text("levels: [family, label]\nlevel_weights: [1, 2]\n")
    code, _, err = run_cli("train", demo_dir, "--config", path, "--level", "family",
                           "--val-fraction", "0.3", "--test-fraction", "0")
    assert "captured" in err
    assert (given[0].level, given[0].levels, given[0].level_weights) == ("family", None, None)
    assert (given[0].val_fraction, given[0].test_fraction) == (0.3, 0)
    # And --levels over a run's config.yaml (which names its level): the file's level and
    # weights were for its own levels, not an error in levels the user never gave.
    path.write_text("level: label\nlevels: [family, label]\nlevel_weights: [1, 2]\n")
    run_cli("train", demo_dir, "--config", path, "--levels", "family,genus")
    assert (given[-1].level, given[-1].levels, given[-1].level_weights) == (
        None, ["family", "genus"], None)  # (the finest, when the run resolves it)
    run_cli("train", demo_dir, "--config", path, "--levels", "genus,label")
    assert (given[-1].level, given[-1].levels, given[-1].level_weights) == (
        "label", ["genus", "label"], None)
    run_cli("train", demo_dir, "--config", path, "--epochs-head", "2")  # the file's own
    assert (given[-1].level, given[-1].levels, given[-1].level_weights) == (
        "label", ["family", "label"], [1, 2])
    # --holdout-classes '' holds none out, over a file's (a held-out run's config.yaml
    # says so: its splits.csv has none of their images).
    path.write_text("holdout_classes: [white_darktip]\n")
    run_cli("train", demo_dir, "--config", path, "--holdout-classes", "")
    assert given[-1].holdout_classes == []
    code, _, err = run_cli("train", demo_dir, "--levels", "family,label", "--level", "genus")
    assert code == 2 and "--level genus is not one of --levels family,label" in err
    # strict in the file stops the reading too, as --strict does: an empty class folder.
    data = Path(shutil.copytree(demo_dir, tmp_path / "data"))
    (data / "empty_species").mkdir()
    path.write_text("strict: true\n")
    code, _, err = run_cli("train", data, "--config", path, "--runs-dir", tmp_path / "r")
    assert code == 2 and "has no images (--strict)" in " ".join(err.split())


def test_data_split_into_train_only_still_keeps_a_test_split(demo_dir, tmp_path):
    from wingspan.training.prepare import ensure_splits

    data = read_dataset(demo_dir)
    data.table["split"] = "train"
    said = []
    split = ensure_splits(data, "label", tiny(tmp_path, test_fraction=0.2), log=said.append)
    assert set(split.table["split"]) == {"train", "val", "test"}
    assert any("train only" in line for line in said)


def test_images_the_data_gives_no_split_train_beside_its_marked_test_images(demo_dir,
                                                                             tmp_path):
    """A CSV that marks only its test images, the rest left blank: the blank ones train
    (and val is carved from them). They were dropped, and with nothing left to train on,
    the run stopped saying the classes had too few images."""
    from wingspan.training.prepare import ensure_splits

    data = read_dataset(demo_dir)
    marked = np.arange(len(data.table)) % 4 == 0
    data.table["split"] = np.where(marked, "test", "")
    said = []
    split = ensure_splits(data, "label", tiny(tmp_path), log=said.append)
    table = split.table.set_index("path")["split"]
    assert len(table) == len(data.table)  # none left out
    assert (table[data.table["path"][marked]] == "test").all()  # as marked
    assert set(table[data.table["path"][~marked]]) == {"train", "val"}
    assert f"{(~marked).sum()} images have a blank split in the data: trained on" in \
        " ".join(said)
    # A folder's splits.csv that does not list a photo (added since): the reader's finding,
    # and the photo stays out, as before, rather than training (a copy of a test image
    # would then be a leak, and refuse a run that used to go).
    folder = Path(shutil.copytree(demo_dir, tmp_path / "data"))
    photos = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg"))
    # A row listed with its split left blank is no finding, and trains, as in a CSV.
    pd.DataFrame({"path": photos[1:], "split": ["test" if i % 4 == 0 else "train" if i % 4 == 1
                                                else "" for i in range(len(photos) - 1)]}
                 ).to_csv(folder / "splits.csv", index=False)
    data = read_dataset(folder)
    assert [p.kind for p in data.problems] == ["not_in_splits"]
    said = []
    split = ensure_splits(data, "label", tiny(tmp_path), log=said.append)
    assert str(folder / photos[0]) not in set(split.table["path"])
    assert len(split.table) == len(photos) - 1
    assert "1 image has no split (see `wingspan data inspect`) and will not be used" in said
    assert any("a blank split in the data: trained on" in line for line in said)


def test_val_fraction_0_on_data_without_a_val_split_names_the_setting(demo_dir, tmp_path):
    with pytest.raises(WingspanError, match="The validation split is empty") as e:
        train(read_dataset(demo_dir), tiny(tmp_path, val_fraction=0.0), tmp_path / "runs", "r",
              quiet=True)
    assert e.value.hint.startswith("Give --val-fraction above 0")


def test_a_diverging_run_stops_with_a_clear_error_and_writes_no_model(demo_dir, tmp_path):
    # Stage 2 at 1e8: the weights overflow within a few steps.
    config = tiny(tmp_path, lr=1.0, finetune_lr_scale=1e8)
    with pytest.raises(WingspanError, match="Training diverged.*finetune epoch 1") as e:
        train(read_dataset(demo_dir), config, tmp_path / "runs", "nan", quiet=True)
    # the rate that diverged, not the head's
    assert "(top learning rate 1e+08: --lr 1 x finetune_lr_scale 1e+08)" in e.value.message
    assert "lower --lr" in e.value.hint
    run_dir = tmp_path / "runs" / "nan"
    assert "from before this" in e.value.message  # the head stage's checkpoint is kept
    assert not (run_dir / "model").exists() and not (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("selection, side", [("val", "val"), ("holdout", "test")])
def test_a_class_missing_from_train_is_refused(tmp_path, demo_dir, selection, side):
    """(With holdout, the data's val is kept apart as test: the class is only in test.)"""
    ds = read_dataset(demo_dir)
    rows = ds.table.assign(split="train")
    rows.loc[rows.index[::4], "split"] = "val"
    rows.loc[rows["label"] == "white_darktip", "split"] = "val"
    rows[["path", "label", "split"]].to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(WingspanError, match=f"white_darktip \\(only in {side}\\)"):
        train(read_dataset(tmp_path / "d.csv"), tiny(tmp_path, selection=selection),
              tmp_path / "runs", quiet=True)
    assert not any((tmp_path / "runs").iterdir())  # a failed start leaves no empty run


def test_train_bn_reaches_the_model(tmp_path, demo_dir, monkeypatch):
    """--train-bn: the unfrozen BatchNorm layers learn batch statistics while fine-tuning."""
    from wingspan.training import run as run_module

    stats, real = {}, run_module.finetune

    def finetune_then_look(run):
        real(run)
        stats[run.config.train_bn] = {n: t.clone() for n, t in run.model.state_dict().items()
                                      if n.endswith("num_batches_tracked")}

    monkeypatch.setattr(run_module, "finetune", finetune_then_look)
    for train_bn in (False, True):
        config = tiny(tmp_path, epochs_head=1, epochs_finetune=1, train_bn=train_bn)
        train(read_dataset(demo_dir), config, tmp_path / str(train_bn), quiet=True)
    moved = [n for n in stats[True] if not torch.equal(stats[True][n], stats[False][n])]
    assert moved and len(moved) < len(stats[True])  # the last stages only


def test_cli_train_and_resume_of_a_finished_run(run_cli, demo_dir, tmp_path):
    code, out, err = run_cli("train", demo_dir, "--backbone", "test_efficientnet", "--weights",
                             "none", "--image-size", "32", "--epochs-head", "2",
                             "--epochs-finetune", "1", "--batch-size", "8", "--workers", "0",
                             "--runs-dir", tmp_path, "--name", "cli", "--quiet")
    assert code == 0, err
    assert "val macro-F1" in out and str(tmp_path / "cli") in out
    code, _, err = run_cli("train", "--resume", tmp_path / "cli")
    assert code == 2 and "finished" in err
    # Settings a resumed run cannot take are refused by name, not silently dropped.
    code, _, err = run_cli("train", demo_dir, "--resume", tmp_path / "cli", "--lr", "0.5",
                           "--epochs-finetune", "6", "--workers", "0")
    err = " ".join(err.split())
    assert code == 2 and "DATA, --epochs-finetune, --lr cannot change them" in err, err
    # `--resume NAME --runs-dir DIR`, a natural guess, is told the path to give (it was
    # refused as if --runs-dir were a setting)
    code, _, err = run_cli("train", "--resume", "cli", "--runs-dir", tmp_path)
    err = " ".join(err.split())
    assert code == 2 and "--resume takes the run's folder itself" in err, err
    assert f"`wingspan train --resume {tmp_path / 'cli'}`" in err, err
    # Without its checkpoints (deleted to save space) the run would start again from
    # nothing and overwrite its model: refused.
    model = (tmp_path / "cli" / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "cli" / "checkpoints")
    code, _, err = run_cli("train", "--resume", tmp_path / "cli")
    assert code == 2 and "no checkpoint" in err
    assert (tmp_path / "cli" / "model" / "model.safetensors").read_bytes() == model


def test_profile_writes_a_torch_profiler_trace_and_the_time_profile(demo_dir, tmp_path):
    # Batches of 16: a first fine-tuning epoch of 2 steps, fewer than the profiler takes
    # (it wrote nothing then, and said nothing).
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, profile=True, epochs_head=1,
                                                 epochs_finetune=1, batch_size=16),
                    tmp_path, quiet=True)
    assert re.search(r"Profiled [1-3] fine-tuning steps?: ", (run_dir / "train.log").read_text())
    trace = json.loads((run_dir / "profile" / "trace.json").read_text())
    assert trace["traceEvents"]  # chrome://tracing / Perfetto format
    assert "aten::" in (run_dir / "profile" / "operators.txt").read_text()
    # On a GPU the trace records its kernels too, not the launches alone
    from torch.profiler import ProfilerActivity

    from wingspan.training.stages import _Profiler
    assert ProfilerActivity.CUDA in _Profiler.activities(torch.device("cuda", 0))
    assert _Profiler.activities(torch.device("cpu")) == [ProfilerActivity.CPU]
    profile = json.loads((run_dir / "metrics.json").read_text())["profile"]
    assert {"feature_cache", "data", "forward", "backward", "eval"} <= set(profile["head"])
    assert {"data", "forward", "backward", "eval"} <= set(profile["finetune"])
    assert profile["finetune"]["train_images_per_s"] > 0


def test_a_damaged_feature_cache_is_computed_again(demo_dir, tmp_path):
    from wingspan.training.stages import extract_features

    run = _prepared_run(demo_dir, tmp_path)
    train_feats, val_feats = extract_features(run, 1)
    path = run.dir / "cache" / "features.safetensors"
    path.write_bytes(path.read_bytes()[:1000])  # cut short, as by a full disk or a kill
    again, again_val = extract_features(run, 1)
    torch.testing.assert_close(again, train_feats)
    torch.testing.assert_close(again_val, val_feats)
    assert "cannot be read" in (run.dir / "train.log").read_text()


def _with_broken_files(demo_dir, tmp_path):
    """A copy of the demo data with a zero-byte, a text and a truncated 'JPEG' in a class."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    folder = sorted(p for p in data.iterdir() if p.is_dir())[0]
    good = sorted(folder.glob("*.jpg"))[0].read_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all\n")
    (folder / "cut.jpg").write_bytes(good[: len(good) // 3])
    return data


@pytest.mark.parametrize("feature_cache", [True, False])
def test_unreadable_images_are_skipped_listed_and_training_goes_on(demo_dir, tmp_path,
                                                                   monkeypatch, feature_cache):
    from wingspan.training import run as run_module

    data = _with_broken_files(demo_dir, tmp_path)
    dataset = read_dataset(data)
    # One more file goes bad after stage 1, as a photo edited or cut mid-run.
    victim = next(p for p in dataset.table["path"] if p.endswith("_0001.jpg"))
    original = run_module.train_head

    def then_break_a_file(run):
        original(run)
        with open(victim, "r+b") as f:
            f.truncate(200)

    monkeypatch.setattr(run_module, "train_head", then_break_a_file)
    config = tiny(tmp_path, feature_cache=feature_cache, val_fraction=0.3)
    run_dir = train(dataset, config, tmp_path / "runs", "broken", quiet=True)
    assert (run_dir / "model" / "manifest.json").is_file()
    unreadable = json.loads((run_dir / "metrics.json").read_text())["unreadable"]
    names = {os.path.basename(u["path"]) for u in unreadable}
    in_train_or_val = {os.path.basename(p) for p in pd.read_csv(run_dir / "splits.csv")["path"]}
    expected = {"zero.jpg", "text.jpg", "cut.jpg", os.path.basename(victim)}
    assert expected <= in_train_or_val and names == expected  # (no test split in `tiny`)
    counted = json.loads((run_dir / "metrics.json").read_text())
    assert counted["train_images"] + counted["val_images"] == len(in_train_or_val) - len(names)
    assert all("Cannot read image" in u["reason"] for u in unreadable)
    log = (run_dir / "train.log").read_text()
    assert log.count("Skipping an unreadable image") == len(expected)  # each once
    with pytest.raises(WingspanError, match="Cannot read image"):
        train(read_dataset(data), tiny(tmp_path, strict=True), tmp_path / "strict",
              quiet=True)


@pytest.mark.parametrize("feature_cache", [True, False])
def test_a_val_split_of_unreadable_images_is_said_not_a_traceback(tmp_path, feature_cache):
    """Every val image broken (a few bad files, and the split put them all in val): an
    IndexError from the head stage's first scoring, once the features were computed."""
    data = folder_dataset(tmp_path / "data", {"a": 6, "b": 6})
    rows = [(str(p), p.parent.name, "train") for p in sorted(data.rglob("*.jpg"))]
    rows += [(str(p), c, "val") for c in "ab" for p in broken_images(data / c, 2)]
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(tmp_path / "d.csv",
                                                                  index=False)
    with pytest.raises(WingspanError, match="No validation image could be read") as e:
        train(read_dataset(tmp_path / "d.csv"),
              tiny(tmp_path, feature_cache=feature_cache, epochs_head=1, epochs_finetune=1,
                   selection="val"),
              tmp_path / "runs", "r", quiet=True)
    assert "train.log" in e.value.hint


@pytest.mark.parametrize("feature_cache", [True, False])
def test_the_training_image_count_is_said_of_the_images_that_can_be_read(tmp_path,
                                                                         feature_cache):
    data = folder_dataset(tmp_path / "data", {"a": 12, "b": 12})
    broken_images(data / "a", 6)
    run_dir = train(read_dataset(data), tiny(tmp_path, feature_cache=feature_cache,
                                             epochs_head=2, epochs_finetune=0),
                    tmp_path / "runs", quiet=True)
    split = pd.read_csv(run_dir / "splits.csv")["split"]
    listed, listed_val = int((split == "train").sum()), int((split == "val").sum())
    read = json.loads((run_dir / "metrics.json").read_text())
    assert read["train_images"] < listed and read["val_images"] < listed_val
    log = (run_dir / "train.log").read_text()
    assert f"{listed} training and {listed_val} validation images;" in log  # as listed
    # Once read (the feature cache, else the first epoch), the counts of what it reads
    said = [line for line in log.splitlines() if "(left out: 6 unreadable images," in line]
    assert len(said) == 1, log
    assert (f"Training on {read['train_images']} of the {listed} training images and "
            f"validating on {read['val_images']} of the {listed_val} validation images") in said[0]
    if feature_cache:
        assert (f"Cached features of {read['train_images']} training images x 2 views and "
                f"{read['val_images']} validation images") in log


def test_train_reports_what_reading_left_out(demo_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    (data / "empty_species").mkdir()
    (data / next(p.name for p in data.iterdir() if p.is_dir()) / "notes.txt").write_text("x")
    run_dir = train(read_dataset(data), tiny(tmp_path, epochs_finetune=0), tmp_path / "runs",
                    "r", quiet=True)
    log = (run_dir / "train.log").read_text()
    assert "While reading the data: 1 x empty class" in log and "empty_species" in log
    assert "While reading the data: 1 x not image" in log and "notes.txt" in log


@pytest.mark.parametrize("feature_cache", [True, False])
def test_a_class_with_no_readable_image_is_refused_not_learned(demo_dir, tmp_path,
                                                             feature_cache):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    (data / "broken").mkdir()
    for i in range(6):
        (data / "broken" / f"{i}.jpg").write_text(f"not an image {i}\n")
    with pytest.raises(WingspanError, match="No training image of 'broken' could be read"):
        train(read_dataset(data), tiny(tmp_path, feature_cache=feature_cache), tmp_path / "r",
              "x", quiet=True)
    # A failed run, with the error in its train.log (which the hint sends the user to), not
    # a "stopped (resumable)" one that the next run of the command says to --resume.
    from wingspan.run_table import FAILED, run_row

    row = run_row(tmp_path / "r" / "x")
    assert row["status"] == FAILED and "No training image of 'broken'" in row["detail"]
    assert "Stopped: No training image of 'broken'" in (tmp_path / "r" / "x" / "train.log"
                                                          ).read_text()
    if feature_cache:
        with pytest.raises(WingspanError):
            train(read_dataset(data), tiny(tmp_path), tmp_path / "r", "x", quiet=True)
        log = (tmp_path / "r" / "x-2" / "train.log").read_text()
        assert "--resume" not in log and "is taken" in log


def test_a_single_class_is_refused(demo_dir, tmp_path):
    import shutil

    one = sorted(p for p in demo_dir.iterdir() if p.is_dir())[0]
    shutil.copytree(one, tmp_path / "data" / one.name)
    with pytest.raises(WingspanError, match=f"one 'label' class only \\({one.name}\\)"):
        train(read_dataset(tmp_path / "data"), tiny(tmp_path), tmp_path / "r", quiet=True)
    # The class folders inside one folder (photos/Butterflies/<species>/): that folder named.
    wrapped = tmp_path / "photos" / "Butterflies"
    for folder in sorted(p for p in demo_dir.iterdir() if p.is_dir())[:2]:
        shutil.copytree(folder, wrapped / folder.name)
    with pytest.raises(WingspanError) as caught:
        train(read_dataset(tmp_path / "photos"), tiny(tmp_path), tmp_path / "r2", quiet=True)
    assert caught.value.hint == (f"Its images sit in subfolders: give {wrapped} as DATA to "
                                 "learn them as the classes.")


# A 2-stage Swin small enough for tests (timm has no test_swin).
TEST_SWIN = BackboneSpec(
    "test_swin", "swin_tiny_patch4_window7_224", description="a 2-stage Swin for tests",
    timm_kwargs=dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)))


@pytest.mark.parametrize("backbone", ["test_vit", "test_swin", "test_convnext", "test_mambaout"])
def test_non_cnn_timm_backbones_train_predict_and_explain(backbone, demo_dir, tmp_path,
                                                          monkeypatch):
    """Beyond CNNs: a ViT (tokens, class-token pooling), a Swin (an NHWC map, fixed
    windows), a ConvNeXt (a norm in its head) and a MambaOut (NHWC, a head wider than its
    last map)."""
    monkeypatch.setitem(BACKBONES, "test_swin", TEST_SWIN)
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, backbone=backbone, image_size=None,
                                                 epochs_head=1, epochs_finetune=1),
                    tmp_path / "runs", backbone, quiet=True)
    assert history(run_dir)["stage"].tolist() == ["head", "finetune"]
    predictor = Predictor(run_dir, device="cpu", workers=0)
    photo = str(next(demo_dir.rglob("*.jpg")))
    (p,) = list(predictor.run([photo], progress=False))
    assert p.probs.shape == (4,) and abs(p.probs.sum() - 1) < 1e-5
    x = predictor.views(tta=False)[0](open_rgb(photo))
    explained, _ = explain_view(predictor, x)
    heatmap = explained.heatmap
    assert explained.label in predictor.classes and heatmap.shape == x.shape[-2:]
    assert 0 <= heatmap.min() and heatmap.max() <= 1


def test_a_vit_trains_at_another_size_and_its_bundle_rebuilds_at_it(demo_dir, tmp_path):
    """A ViT is built for one size: --image-size resizes its position embeddings, and the
    bundle records the size so that loading rebuilds the same shapes."""
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, backbone="test_vit", image_size=64,
                                                 epochs_head=1, epochs_finetune=1),
                    tmp_path / "runs", "vit64", quiet=True)
    model, manifest = load_bundle(run_dir / "model")
    assert manifest["model"]["input_size"] == 64 == manifest["preprocessing"]["input_size"]
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64))["label"].shape == (2, 4)
    # --weights RUN: the new model is built at the run's size to take its weights, then
    # resized as asked (here, to 32); without --image-size it stays at the run's size.
    for size, expected in ((32, 32), (None, 64)):
        again = train(read_dataset(demo_dir), tiny(
            tmp_path, backbone="auto", weights=str(run_dir), image_size=size, epochs_head=1,
            epochs_finetune=0, cache_dir=str(tmp_path / f"c{size}")),
            tmp_path / "runs", f"from-vit64-{size}", quiet=True)
        manifest = load_bundle(again / "model")[1]
        assert manifest["preprocessing"]["input_size"] == expected
    # A resume loads no weights but its checkpoint's: it builds the model at that size again
    # (as a run that was killed before its bundle was written).
    (again / "model" / "manifest.json").unlink()
    (again / "metrics.json").unlink()
    resume(again, quiet=True)
    assert load_bundle(again / "model")[1]["preprocessing"]["input_size"] == 64
    # Its checkpoint too, at its size, under --backbone auto.
    from wingspan.models import create_classifier
    from wingspan.models.factory import choose_backbone

    best = run_dir / "checkpoints" / "best.pt"
    assert choose_backbone("auto", best)[0] == "test_vit"
    model, _ = create_classifier("test_vit", {"label": 2}, weights=best)
    assert model.preprocessing.input_size == 64
    # ... and out of its run (no config.yaml beside it): the checkpoint says its size.
    shutil.copy(best, tmp_path / "best.pt")
    model, _ = create_classifier("test_vit", {"label": 2}, weights=tmp_path / "best.pt")
    assert model.preprocessing.input_size == 64
    # data audit --weights RUN: the run's backbone, at its size.
    from wingspan.config import AuditConfig
    from wingspan.data.audit import image_features

    photos = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))[:2]]
    features, _, name, failed, _ = image_features(
        photos, AuditConfig("auto", str(run_dir), folds=2, cache=False, device="cpu"), False)
    assert name == "test_vit" and len(features) == 1 and features[0].shape[0] == 2
    assert not failed


@pytest.mark.parametrize("selection", ["holdout", "val"])
def test_data_with_its_own_val_keeps_it_apart_for_a_fair_score(demo_dir, tmp_path, selection):
    """The best epoch is chosen on val, so val's score is optimistic. With holdout (the
    default) data that brings train and val but no test keeps its val as the test split,
    untouched, and the run chooses on a part of train; with val it chooses on that val."""
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    paths = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))
    given = {p: "val" if i % 3 == 0 else "train" for i, p in enumerate(paths)}
    pd.DataFrame({"path": paths, "label": [p.split("/")[0] for p in paths],
                  "split": [given[p] for p in paths]}).to_csv(data / "splits.csv", index=False)
    run_dir = train(read_dataset(data), tiny(tmp_path, epochs_head=1, epochs_finetune=0,
                                             selection=selection), tmp_path / "runs", "r",
                    quiet=True)
    used = pd.read_csv(run_dir / "splits.csv")
    used["path"] = [Path(p).relative_to(data.resolve()).as_posix() for p in used["path"]]
    side = dict(zip(used["path"], used["split"], strict=True))
    given_val = {p for p, s in given.items() if s == "val"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log = (run_dir / "train.log").read_text()
    if selection == "holdout":
        assert {p for p, s in side.items() if s == "test"} == given_val
        chosen_on = {p for p, s in side.items() if s == "val"}
        assert chosen_on and all(given[p] == "train" for p in chosen_on)
        assert metrics["selection"] == {"chosen_on": "val", "unbiased_split": "test"}
        assert metrics["test_images"] == len(given_val) and "never trained or chosen on" in log
    else:
        assert {p for p, s in side.items() if s == "val"} == given_val
        assert "test" not in set(side.values())
        assert metrics["selection"]["unbiased_split"] is None and "No test split" in log


def test_an_equal_val_macro_f1_with_a_clearly_lower_val_loss_is_kept(demo_dir, tmp_path):
    """A saturated val split (macro-F1 1.0 early) must not pin the best model to the first
    epoch that reached it; a loss change within noise still counts against patience."""
    run = _prepared_run(demo_dir, tmp_path)
    assert run.consider_best(1.0, "head", 3, loss=0.60)
    assert not run.consider_best(1.0, "head", 4, loss=0.60 - run.config.min_delta / 2)
    assert run.state.bad_epochs == 1
    assert run.consider_best(1.0, "finetune", 1, loss=0.55)
    assert (run.state.best_stage, run.state.best_epoch, run.state.bad_epochs) == ("finetune", 1, 0)
    assert not run.consider_best(0.9, "finetune", 2, loss=0.10)  # macro-F1 comes first
    assert load_checkpoint(run.checkpoints / "best.pt")["stage"] == "finetune"


def test_why_the_backbone_was_chosen_comes_before_the_run_line(demo_dir, tmp_path,
                                                                monkeypatch):
    from wingspan.training import run as run_module

    monkeypatch.setattr(run_module, "choose_backbone",
                        lambda name, weights: ("test_efficientnet", "resnet50 is not here"))
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_finetune=0), tmp_path,
                    quiet=True)
    lines = (run_dir / "train.log").read_text().splitlines()
    assert lines[0].endswith("resnet50 is not here") and " Run " in lines[1]


def test_a_temperature_fitted_on_few_val_images_is_fitted_and_said_to_be_shaky(tmp_path):
    """Training fits its temperature on val however small (a run must finish), but below
    calibrate's minimum train.log says so and how to refit it."""
    from types import SimpleNamespace

    from wingspan.evaluate.calibration import MIN_CALIBRATION_IMAGES
    from wingspan.training.finish import _fit_calibration

    said, caveats = [], []

    def log(line, caveat=False):
        said.append(line)
        if caveat:  # shown even with --quiet
            caveats.append(line)

    run = SimpleNamespace(dir=tmp_path / "runs/few", log=log,
                          data=SimpleNamespace(taxonomy=None, level="label"))
    generator = torch.Generator().manual_seed(0)
    for n in (MIN_CALIBRATION_IMAGES - 1, MIN_CALIBRATION_IMAGES):
        said.clear()
        logits = torch.randn(n, 3, generator=generator)
        labels = torch.randint(0, 3, (n, 1), generator=generator)
        record = _fit_calibration(run, (None, {"label": logits}, labels))
        assert record["images"] == n and record["temperature"] > 0
        shaky = [line for line in said if "rests on" in line]
        if n < MIN_CALIBRATION_IMAGES:
            assert len(shaky) == 1 and f"{n} val images" in shaky[0] and shaky[0] in caveats
            assert f"wingspan calibrate {run.dir} DATA" in shaky[0]
        else:
            assert not shaky


def test_the_sampler_and_loss_weights_have_one_source_before_and_after_images_break(
        tmp_path, monkeypatch):
    """The start's weights and those recounted once images are unreadable come from one
    function: a change to how classes are weighed (a square-root weighting stands in for
    one here) reaches both, so the two can never drift apart."""
    from wingspan.training import prepare
    from wingspan.training.stages import weighting

    weigh = prepare.weigh_classes

    def square_root(labels, levels, classes, config):
        weights, use = weigh(labels, levels, classes, config)
        return {lv: w.sqrt() for lv, w in weights.items()}, use

    monkeypatch.setattr(prepare, "weigh_classes", square_root)
    data = folder_dataset(tmp_path / "data", {"a": 18, "b": 6})
    run = _prepared_run(data, tmp_path, sampler="weighted", class_weights="balanced")
    labels = run.data.train.labels[:, -1]

    def expected(readable):
        counts = torch.bincount(labels[readable], minlength=2).double()
        return (int(readable.sum()) / (2 * counts)).sqrt().float()[labels] * readable

    everything = torch.ones(len(labels), dtype=torch.bool)
    torch.testing.assert_close(run.data.sample_weights, expected(everything))
    common = [i for i in range(len(labels)) if labels[i] == 0][:5]
    run.note_unreadable([(run.data.train.paths[i], "Cannot read image") for i in common])
    readable = run.readable(run.data.train)
    balance = weighting(run, readable)
    torch.testing.assert_close(balance.sample, expected(readable))
    torch.testing.assert_close(balance.loss["label"],
                               (int(readable.sum()) / (2 * torch.bincount(
                                   labels[readable]).double())).sqrt().float())


@pytest.mark.parametrize("feature_cache", [True, False])
def test_the_head_schedule_ends_at_zero_when_images_cannot_be_read(tmp_path, feature_cache):
    """The head stage's rate is annealed over the batches it trains, not the files listed:
    unreadable images make fewer batches, and the last one still ends the cosine at 0."""
    data = folder_dataset(tmp_path / "data", {"a": 12, "b": 12})
    broken_images(data / "a", 8)
    config = tiny(tmp_path, batch_size=4, epochs_head=2, epochs_finetune=0,
                  feature_cache=feature_cache)
    run_dir = train(read_dataset(data), config, tmp_path / "runs", quiet=True)
    listed = int((pd.read_csv(run_dir / "splits.csv")["split"] == "train").sum())
    read = json.loads((run_dir / "metrics.json").read_text())["train_images"]
    assert -(-read // 4) < -(-listed // 4)  # fewer batches than the files listed make
    lr = history(run_dir)["lr"].tolist()
    assert lr[-1] == pytest.approx(0.0, abs=1e-9), lr
    if feature_cache:  # every image read before the first epoch: half way down after it
        assert lr[0] == pytest.approx(config.lr / 2, rel=1e-3), lr


def test_a_run_resumed_after_images_broke_mid_fine_tuning_ends_alike(demo_dir, tmp_path,
                                                                     monkeypatch):
    """Images that break during a fine-tuning epoch make the next epochs shorter: the rate
    still ends at 0, and a run killed at that epoch's end resumes on the schedule the
    uninterrupted one follows (not one sized again from the shorter epochs)."""
    from wingspan.training.context import Run

    config = tiny(tmp_path, epochs_head=1, epochs_finetune=3, precision="fp32",
                  runtime="torch")
    save = Run.save

    def breaking(kill):
        def saved(run, optimizer=None):
            save(run, optimizer)
            state = run.state
            if state.stage != "finetune" or state.step:
                return
            if state.epoch == 1:  # enough images break to make a batch fewer
                n, bs = len(run.data.train), config.batch_size
                labels = run.data.train.labels[:, -1]
                common = int(torch.bincount(labels).argmax())
                k = n - bs * (-(-n // bs) - 1)
                for i in [i for i in range(n) if labels[i] == common][:k]:
                    Path(run.data.train.paths[i]).write_bytes(b"gone")
            elif state.epoch == 2 and kill:  # killed at the end of the epoch that found them
                raise KeyboardInterrupt
        return saved

    runs = _uninterrupted_and_resumed(demo_dir, tmp_path, monkeypatch, config, breaking)
    got, ref = history(runs["killed"]), history(runs["ref"])
    assert got["lr"].tolist() == pytest.approx(ref["lr"].tolist(), rel=1e-6, abs=1e-12)
    assert ref["lr"].iloc[-1] == pytest.approx(0.0, abs=1e-9)
    pd.testing.assert_frame_equal(got[NUMBERS], ref[NUMBERS], atol=1e-4, rtol=0)


def _stopped_in_finetune(tmp_path, monkeypatch, data, **changes) -> Path:
    """A tiny run of `data` (1 head epoch, 1 fine-tuning one) stopped by a Ctrl-C as its
    fine-tuning epoch ends: runs/r, to resume."""
    kill_at_first_finetune_row(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(read_dataset(data), tiny(tmp_path, epochs_head=1, epochs_finetune=1, **changes),
              tmp_path / "runs", "r", quiet=True)
    monkeypatch.undo()
    return tmp_path / "runs" / "r"


def test_a_resumed_run_says_a_label_fixed_in_its_csv_since_is_not_taken(tmp_path,
                                                                         monkeypatch):
    """A label mended in the labels CSV between a kill and the resume: the resumed run
    trained on the old one without a word."""
    data = folder_dataset(tmp_path / "data", {"a": 8, "b": 8})
    table = pd.DataFrame({"path": sorted(str(p) for p in data.rglob("*.jpg"))})
    table["label"] = table["path"].map(lambda p: Path(p).parent.name)
    table.to_csv(tmp_path / "labels.csv", index=False)
    _stopped_in_finetune(tmp_path, monkeypatch, tmp_path / "labels.csv")
    table.loc[0, "label"] = "b"  # (an a, fixed)
    table.to_csv(tmp_path / "labels.csv", index=False)
    resume(tmp_path / "runs" / "r", quiet=True)
    log = (tmp_path / "runs" / "r" / "train.log").read_text()
    assert f"has changed since this run began: 1 image has another label (e.g. " \
           f"{table['path'][0]}: a -> b): a resumed run keeps the labels and split it began " \
           "with. Train a new run to use them." in log, log


def test_a_resumed_run_says_an_image_written_again_since_it_began(tmp_path, monkeypatch):
    """A training photo edited (or exported again) under its name between a kill and the
    resume: the resumed run trained on its new bytes after the old without a word."""
    data = folder_dataset(tmp_path / "data", {"a": 8, "b": 8})
    run_dir = _stopped_in_finetune(tmp_path, monkeypatch, data)
    splits = pd.read_csv(run_dir / "splits.csv")
    edited = splits.loc[splits["split"] == "train", "path"].iloc[0]
    moved = splits.loc[splits["split"] == "val", "path"].iloc[0]
    write_image(Path(edited), seed=99)
    os.rename(moved, f"{moved}.tmp")  # (moved away and back: the same bytes, no news)
    os.rename(f"{moved}.tmp", moved)
    resume(run_dir, quiet=True)
    log = (run_dir / "train.log").read_text()
    assert f"1 image this run trains or chooses on was written again since it began (e.g. " \
           f"{edited}): its epochs before this trained on the old bytes, those after train " \
           "on the new." in log, log
    assert "has changed since this run began" not in log, log


def test_a_resume_says_no_change_of_images_its_split_left_out(tmp_path, monkeypatch):
    """A --max-per-class run resumed on its untouched data said "50 new images of its
    classes": those --max-per-class left out of its splits.csv."""
    data = folder_dataset(tmp_path / "data", {"a": 14, "b": 8})
    _stopped_in_finetune(tmp_path, monkeypatch, data, max_per_class=6)
    resume(tmp_path / "runs" / "r", quiet=True)
    log = (tmp_path / "runs" / "r" / "train.log").read_text()
    assert "Resuming" in log and "has changed since this run began" not in log, log


def test_a_resumed_run_says_so_and_does_not_repeat_what_it_said_once(tmp_path, monkeypatch):
    """train.log reads top to bottom: after "Resuming ...", the lines said once at the
    start (the image counts, the class weighting) are not said again as if new."""
    data = folder_dataset(tmp_path / "data", {"a": 12, "b": 12})
    broken_images(data / "a", 9)  # 21:12 listed turns auto's class weights on; 12:12 off
    run_dir = _stopped_in_finetune(tmp_path, monkeypatch, data)
    folder_dataset(data / "c_added", {"": 5})  # a species added to the data since
    for i in range(2):  # and photos of a class it trains on (said neither, once)
        write_image(data / "b" / f"new_{i}.jpg", seed=40 + i)
    resume(run_dir, quiet=True)
    lines = [line.partition(" ")[2] for line in (run_dir / "train.log").read_text()
             .splitlines()]
    assert f"{data} now holds 1 class this run does not train on (c_added: 5 images): a " \
           "resumed run keeps the classes and split it began with." in "\n".join(lines)
    assert f"{data} has changed since this run began: 2 new images of its classes: a " \
           "resumed run keeps the labels and split it began with." in "\n".join(lines)
    for once in ("training and", "Training on", "Class-weighted loss now off",
                 "Resuming"):
        assert sum(line.startswith(once) or f" {once} " in f" {line}" for line in lines) == 1, (
            once, lines)
    resumed = next(i for i, line in enumerate(lines) if line.startswith("Resuming"))
    assert lines[resumed - 1].startswith("Interrupted")  # the first line the resume says
    assert f"Resuming {run_dir} at finetune epoch 1, on " in lines[resumed]


def test_train_log_says_the_set_up_in_the_order_it_happened(tmp_path):
    """The split made of data without one was logged after the image counts it gave (the
    set-up's lines were held until the run began): the run's line, then the name taken,
    the split, and the counts."""
    data = folder_dataset(tmp_path / "data", {"a": 12, "b": 12})
    config = tiny(tmp_path, epochs_head=1, epochs_finetune=0)
    (tmp_path / "runs" / "r").mkdir(parents=True)  # taken: this run is r-2
    run_dir = train(read_dataset(data), config, tmp_path / "runs", "r", quiet=True)
    lines = [line.partition(" ")[2] for line in (run_dir / "train.log").read_text()
             .splitlines()]
    at = {what: next(i for i, line in enumerate(lines) if line.startswith(what))
          for what in ("Run ", f"{tmp_path / 'runs' / 'r'} is an empty folder",
                       "The data has no split", "18 training and")}
    assert list(at.values()) == sorted(at.values()) and at["Run "] == 0, lines


def test_a_test_photo_deleted_while_a_run_was_stopped_is_counted_out(tmp_path, monkeypatch):
    """train.log's last line and metrics.json count the test images evaluate can score."""
    data = folder_dataset(tmp_path / "data", {"a": 15, "b": 15})
    run_dir = _stopped_in_finetune(tmp_path, monkeypatch, data, test_fraction=0.2)
    splits = pd.read_csv(run_dir / "splits.csv")
    tests = splits.loc[splits["split"] == "test", "path"].tolist()
    os.remove(tests[0])
    resume(run_dir, quiet=True)
    last = (run_dir / "train.log").read_text().splitlines()[-1]
    assert f"scores the {len(tests) - 1} test images left (1 of the {len(tests)} are gone " \
           "since the run began)" in last
    assert json.loads((run_dir / "metrics.json").read_text())["test_images"] == len(tests) - 1


@pytest.mark.parametrize("target, match, said", [
    # config.yaml being written, splits.csv before it
    ("wingspan.files:_flush", "config", "stopped while it was being set up"),
    ("wingspan.files:_flush", "splits", "stopped while it was being set up"),
    ("wingspan.training.run:hold_lock", "", "is empty"),  # the run's folder just made
])
def test_a_run_killed_while_it_is_set_up_says_what_to_do(demo_dir, tmp_path, target, match,
                                                         said):
    """Killed before config.yaml and splits.csv are both written: nothing was trained, and
    resuming says so and what to do, not that the folder is no run."""
    run_dir = tmp_path / "runs" / "r"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(vars(tiny(tmp_path))))
    killed = cli_killed_at(["train", demo_dir, "--config", config_file, "--runs-dir",
                            run_dir.parent, "--name", "r", "--quiet"], target, 1, match)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "config.yaml").is_file() and not (run_dir / "splits.csv").is_file()
    with pytest.raises(WingspanError, match=said) as e:
        resume(run_dir, quiet=True)
    assert "delete" in e.value.hint.lower() and "train" in e.value.hint
    if said != "is empty":
        assert "Nothing was trained" in str(e.value)


def test_the_command_again_after_a_kill_in_set_up_says_the_folder_is_a_leftover(
        demo_dir, tmp_path):
    """Killed before config.yaml: the same command again trains in r-2, and says that r is
    what the killed set-up left (nothing to resume) and to delete it, not only "taken"."""
    run_dir = tmp_path / "runs" / "r"
    config_file = tmp_path / "config.yaml"
    config = tiny(tmp_path, epochs_head=1, epochs_finetune=0)
    config_file.write_text(yaml.safe_dump(vars(config)))
    killed = cli_killed_at(["train", demo_dir, "--config", config_file, "--runs-dir",
                            run_dir.parent, "--name", "r", "--quiet"],
                           "wingspan.files:_flush", 1, "config")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    again = train(read_dataset(demo_dir), config, run_dir.parent, "r", quiet=True)
    assert again.name == "r-2"
    line = next(x for x in (again / "train.log").read_text().splitlines()
                if f"{run_dir} " in x)  # one line, whatever its length
    assert (f"{run_dir} is left from a run killed while it was being set up, before it "
            f"trained anything: this run is {again}. Delete {run_dir} (there is nothing in "
            "it to resume) to give a run that name again.") in line


def test_a_folder_set_up_now_by_another_train_is_not_called_a_leftover(tmp_path):
    """A taken name's folder that holds only a lock is a leftover when no process holds
    the lock, but a run being set up now when one does (two trains started at once):
    that one is not to be deleted."""
    import fcntl

    from wingspan.training.run import _name_taken

    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    (runs / "r" / ".lock").touch()
    with open(runs / "r" / ".lock", "a") as held:  # as another train's hold_lock holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        said = _name_taken(runs / "r-2", "r")
        # ... and once it has written its config.yaml, it is no stopped run to resume (the
        # advice to `--resume` it was refused: "is being trained by another process").
        (runs / "r" / "config.yaml").write_text("seed: 0\n")
        training = _name_taken(runs / "r-2", "r")
        (runs / "r" / "config.yaml").unlink()
    assert said == training == f"{runs / 'r'} is being trained now: this run is {runs / 'r-2'}"
    assert _name_taken(runs / "r-2", "r").startswith(
        f"{runs / 'r'} is left from a run killed while it was being set up")
    (runs / "r" / ".lock").unlink()  # a folder the user made: not called a killed run's
    assert _name_taken(runs / "r-2", "r") == (
        f"{runs / 'r'} is an empty folder: this run is {runs / 'r-2'}. Delete {runs / 'r'} "
        "(there is nothing in it to resume) to give a run that name again.")


def test_a_name_taken_by_a_run_we_may_not_read_is_only_taken(tmp_path, monkeypatch):
    """Another user's run (umask 077) in a shared runs folder: every `train` of the others
    with that name (the default one, on the same data) stopped with "Permission denied:
    runs/r/.lock", and left an empty r-2. (Simulated: CI runs as root, for whom chmod 000
    changes nothing.)"""
    import errno
    import os

    from wingspan.training.run import _name_taken

    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    (runs / "r" / "config.yaml").write_text("seed: 0\n")
    stat = os.stat

    def entered(path, *args, **kwargs):  # what is inside a folder we may not enter
        if os.path.dirname(os.fspath(path)) == str(runs / "r"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", entered)
    assert _name_taken(runs / "r-2", "r") == f"{runs / 'r'} is taken: this run is {runs / 'r-2'}"


def test_two_runs_that_take_one_name_at_once_are_numbered(tmp_path, monkeypatch):
    """Another process made the folder between the look and the mkdir: the later one
    stopped with "is a file, where a folder is needed" (6 of 30 tries, 4 at once)."""
    from pathlib import Path

    from wingspan.training.run import _new_run_dir

    made = Path.mkdir

    def raced(self, *args, **kwargs):
        if self.name == "same" and not self.exists():
            made(self)  # the other process's
        return made(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", raced)
    assert _new_run_dir(tmp_path, "same") == tmp_path / "same-2"


def test_a_run_killed_once_set_up_resumes(demo_dir, tmp_path):
    """Killed with config.yaml and splits.csv written, before a checkpoint: it resumes."""
    run_dir = tmp_path / "runs" / "r"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(vars(tiny(tmp_path, epochs_head=1,
                                                    epochs_finetune=0))))
    killed = cli_killed_at(["train", demo_dir, "--config", config_file, "--runs-dir",
                            run_dir.parent, "--name", "r", "--quiet"],
                           "wingspan.training.run:start_run")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resume(run_dir, quiet=True)
    assert (run_dir / "model" / "manifest.json").is_file()


def test_the_run_files_are_utf8_whatever_the_locale(tmp_path):
    """holdout.csv and config.yaml, written with splits.csv, are UTF-8 as their readers
    expect, also where the locale's encoding is another (ASCII in a bare C locale; a Windows
    code page cannot hold every class name either)."""
    folder_dataset(tmp_path / "img", {"a": 4, "b": 6, "c": 6})
    names = {"a": "Pieris napi (Linné)", "b": "b", "c": "c"}
    (tmp_path / "data.csv").write_text("path,label\n" + "".join(
        f"{p.relative_to(tmp_path)},{names[p.parent.name]}\n"
        for p in sorted((tmp_path / "img").rglob("*.jpg"))), encoding="utf-8")
    code = """if True:
        import sys
        from pathlib import Path
        from wingspan.config import TrainConfig
        from wingspan.data import read_dataset
        from wingspan.data.split import split_dataset
        from wingspan.training.run import _write_run_files, hold_out
        config = TrainConfig(level="label", holdout_classes=["Pieris napi (Linn\\u00e9)"])
        data, held = hold_out(read_dataset(sys.argv[1]), "label", config.holdout_classes)
        _write_run_files(Path(sys.argv[2]), split_dataset(data)[0], held, config)"""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", code, tmp_path / "data.csv", run_dir],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Pieris napi (Linné)" in (run_dir / "holdout.csv").read_text(encoding="utf-8")
    assert TrainConfig.from_file(run_dir / "config.yaml").holdout_classes == [
        "Pieris napi (Linné)"]


def test_a_config_file_is_read_as_yaml_says_whatever_the_locale(tmp_path):
    """config.yaml is UTF-8 (its comment names the data's folder, 'Łódź' say), read so in
    an ASCII locale too; a file in another encoding is a clear error, not a traceback."""
    path = tmp_path / "config.yaml"
    path.write_text("# Trained on /data/Łódź\nlevel: Linné\n", encoding="utf-8")
    code = ("import sys; from wingspan.config import TrainConfig; "
            "print(ascii(TrainConfig.from_file(sys.argv[1]).level))")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout.strip() == ascii("Linné"), done.stderr[-3000:]
    path.write_bytes("level: Linné\n".encode("latin-1"))
    with pytest.raises(WingspanError, match="Cannot read the config file") as e:
        TrainConfig.from_file(path)
    assert "Save it as UTF-8" in e.value.hint  # (said only "unacceptable character #x00e9")
    assert "cp1253 Greek" in e.value.hint  # (not cp1252 alone: a Greek file became mojibake)
    for slip in ("level: [Linné\n", "level: Linné\x07\n"):  # a YAML slip, a control
        path.write_text(slip, encoding="utf-8")  # character: UTF-8 already, no such hint
        with pytest.raises(WingspanError, match="Cannot read the config file") as e:
            TrainConfig.from_file(path)
        assert "UTF-8" not in e.value.hint and "Mend it" in e.value.hint, slip
        # the file named where YAML says where, not "<byte string>"
        assert f'in "{path}"' in e.value.message, e.value.message
    # A missing file: its reason in words, not "[Errno 2] No such file or directory: '...'"
    with pytest.raises(WingspanError,
                       match="config file .*typo.yaml: No such file or directory\\.") as e:
        TrainConfig.from_file(tmp_path / "typo.yaml")
    assert "Errno" not in str(e.value) and "--config" in e.value.hint


def test_compile_fine_tunes_through_the_compiled_module_and_the_bundle_loads(demo_dir,
                                                                            tmp_path,
                                                                            monkeypatch):
    """--compile: the fine-tuned part runs as torch.compile's module (TorchDynamo traces
    it; the eager backend here, as inductor's C++ build takes minutes on a CPU), and what
    is saved is the model's own weights, which load as any bundle's."""
    real, compiled = torch.compile, []

    def eager(module, **options):
        compiled.append(real(module, backend="eager"))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", eager)
    config = tiny(tmp_path, epochs_head=1, epochs_finetune=1, compile=True, precision="fp32",
                  runtime="torch")
    run_dir = train(read_dataset(demo_dir), config, tmp_path / "runs", "r", quiet=True)
    assert compiled and all(type(m).__name__ == "OptimizedModule" for m in compiled)
    h = history(run_dir)
    assert h["stage"].tolist() == ["head", "finetune"]
    net, manifest = load_bundle(run_dir / "model")
    assert manifest["classes"] and not any("_orig_mod" in k for k in net.state_dict())
    [answer] = Predictor(run_dir, workers=0).run([str(next(demo_dir.rglob("*.jpg")))],
                         progress=False)
    assert not answer.error and answer.probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_list_settings_take_the_commands_comma_separated_form():
    """levels="family,species" (as --levels takes it, and as a config file may write it)
    is the list of them; one name is a list of one."""
    config = TrainConfig(levels="family, species", level_weights="1,2",
                         holdout_classes="monarch")
    assert config.levels == ["family", "species"] and config.level_weights == [1.0, 2.0]
    assert config.holdout_classes == ["monarch"]
    with pytest.raises(SettingError, match="'level_weights' = 1,x: "):  # (as typed)
        TrainConfig(levels="family,species", level_weights="1,x")


def test_a_temperature_at_its_bound_is_not_said_to_reach_the_rule_of_successions_aim(
        tmp_path):
    """Every val image right, and sure enough that T stops at its lower bound: train.log
    warned "still too unsure", then said the mean top probability was 101 / 102, which the
    bound had kept it from reaching (0.9869 measured)."""
    from types import SimpleNamespace

    from wingspan.training.finish import _fit_calibration

    lines = []
    logits = torch.zeros(100, 2)
    logits[:, 0] = 1.0  # every image class 0, right, and unsure: T must fall below 0.25
    run = SimpleNamespace(data=SimpleNamespace(taxonomy=None, level="label"),
                          log=lambda message, **_: lines.append(message))
    record = _fit_calibration(run, (None, {"label": logits}, torch.zeros(100, 1).long()))
    assert record["at_bound"] and record["method"].startswith("rule of succession")
    said = " ".join(lines)
    assert "as near 101 / 102 as the bound lets it" in said and "is 101 / 102." not in said


def test_with_a_taxonomy_every_val_image_right_says_of_which_answer():
    """train.log said "Every val image is right" beside a val accuracy of 0.9697: the fit
    looks at the finest head's own top class, and a taxonomy answers with the top-down
    branch's, which missed one image. It says which it means."""
    from types import SimpleNamespace

    from wingspan.data.taxonomy import Taxonomy
    from wingspan.training.finish import _fit_calibration

    tree = Taxonomy(["genus", "species"], {"genus": ["A", "B"],
                                           "species": ["a1", "a2", "a3", "b1"]},
                    {"genus": [0, 0, 0, 1], "species": [0, 1, 2, 3]})
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.5]] * 10 + [[3.0, 0.0, 0.0, 0.0]] * 10)
    labels = torch.tensor([3] * 10 + [0] * 10).unsqueeze(1)  # each top species right
    assert (tree.answer(torch.softmax(logits, 1).numpy(), temperature=1.0)[:10] != 3).all()
    for taxonomy, said in ((None, "Every val image is right: "), (tree, (
            "Every val image's top species class of its own head is right: "))):
        lines: list[str] = []
        run = SimpleNamespace(data=SimpleNamespace(taxonomy=taxonomy, level="species"),
                              log=lambda message, lines=lines, **_: lines.append(message))
        _fit_calibration(run, (None, {"species": logits}, labels))
        assert [line for line in lines if line.startswith(said)], lines


def test_data_without_training_images_says_where_they_are_and_what_to_give():
    """ETHEC without its train.json (or a CSV marking val and test only) said "The
    training split is empty." and no more."""
    from wingspan.training.prepare import check_classes

    table = pd.DataFrame({"path": ["a", "b", "c"], "label": ["x", "y", "x"],
                          "split": ["val", "test", "test"]})
    with pytest.raises(WingspanError, match=r"puts its images in test \(2\), val \(1\)") as e:
        check_classes(table, "label")
    assert "train.json" in e.value.hint


def test_classes_without_training_images_are_all_counted():
    """The refusal named the first 10 such classes and no total (17 on a fake ETHEC), so a
    user who mended those 10 met it again."""
    from wingspan.training.prepare import check_classes

    names = [f"s{i:02d}" for i in range(12)]
    table = pd.DataFrame({"path": [f"{n}.jpg" for n in names] + ["t.jpg"],
                          "label": [*names, "kept"], "split": ["val"] * 12 + ["train"]})
    with pytest.raises(WingspanError, match=r"^12 'label' classes have no training images: "
                       r"s00 \(only in val\), .* and 2 more"):
        check_classes(table, "label")
    with pytest.raises(WingspanError, match=r"^1 'label' class has no training images: s00 "):
        check_classes(table.iloc[[0, 12]], "label")


def test_grad_mode_and_default_dtype_left_by_a_notebook(demo_dir, tmp_path):
    """A notebook's torch.set_grad_enabled(False) stopped the head's first step with torch's
    "does not require grad", after the features were cached, and the run was listed as
    resumable, its error nowhere; torch.set_default_dtype(torch.float64) failed the same
    way. Training turns grad on for itself; float64 is refused at once; any error that stops
    a run makes it failed, with the error."""
    import wingspan as ws
    import wingspan.training.run as run_module

    data = read_dataset(demo_dir)
    with torch.no_grad():
        run = train(data, tiny(tmp_path, epochs_head=1, epochs_finetune=1), tmp_path, "nograd",
                    quiet=True)
    assert (run / "model" / "manifest.json").is_file()
    with torch.inference_mode():
        run = train(data, tiny(tmp_path, epochs_head=1, epochs_finetune=1), tmp_path,
                    "inference", quiet=True)
    assert (run / "model" / "manifest.json").is_file()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(WingspanError, match="default dtype is torch.float64") as e:
            train(data, tiny(tmp_path), tmp_path, "f64", quiet=True)
        assert "set_default_dtype(torch.float32)" in e.value.hint
        with pytest.raises(WingspanError, match="default dtype"):
            ws.load(run).predict([str(data.table["path"].iloc[0])])
    finally:
        torch.set_default_dtype(torch.float32)
    assert not (tmp_path / "f64").exists()

    def fault(run):
        raise ValueError("a fault of ours")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(run_module, "_recipe", fault)
        with pytest.raises(ValueError):
            train(data, tiny(tmp_path), tmp_path, "fault", quiet=True)
    listed = ws.runs(tmp_path).set_index("name")
    assert listed.loc["fault", "status"] == "failed"
    assert "ValueError: a fault of ours" in listed.loc["fault", "detail"]


def test_a_warning_before_training_is_said_with_quiet(demo_dir, tmp_path, capsys):
    """--val-fraction on data with a split of its own is left unused: with quiet=True (a
    notebook's ws.train) that was said in train.log alone, though config.yaml records it."""
    import wingspan as ws

    split = ws.read(demo_dir).split(val=0.2, test=0.2, out=tmp_path / "split")
    capsys.readouterr()
    train(read_dataset(tmp_path / "split" / "splits.csv"),
          tiny(tmp_path, val_fraction=0.4, epochs_head=1, epochs_finetune=0), tmp_path, "r",
          quiet=True)
    assert split.split_report and "--val-fraction 0.4 and" in capsys.readouterr().err


def test_a_full_disk_that_stops_a_run_is_the_error_said(demo_dir, tmp_path, monkeypatch):
    """A checkpoint refused by a full disk stops the run; error.txt, which says why for
    `wingspan runs`, is refused too, and that second error was the one shown ('error.txt was
    not written'), naming a file the user never heard of."""
    import wingspan.training.run as run_module

    def full(run):
        raise WingspanError("The disk holding checkpoints is full; last.pt was not written.")

    written = run_module.write_text

    def refuse_error_file(path, text):
        if Path(path).name == "error.txt":
            raise WingspanError("The disk is full; error.txt was not written.")
        return written(path, text)

    monkeypatch.setattr(run_module, "_recipe", full)
    monkeypatch.setattr(run_module, "write_text", refuse_error_file)
    with pytest.raises(WingspanError, match="last.pt was not written"):
        train(read_dataset(demo_dir), tiny(tmp_path), tmp_path, "full", quiet=True)
    assert "Stopped: The disk holding checkpoints is full" in (
        tmp_path / "full" / "train.log").read_text()
    # The log line, written first, may be refused as well (a full disk refuses an append).
    import errno

    from wingspan.training.context import Run

    logged = Run.log

    def refuse_stop_line(self, text, *args, **kwargs):
        if text.startswith("Stopped:"):
            raise OSError(errno.ENOSPC, "No space left on device", "train.log")
        return logged(self, text, *args, **kwargs)

    monkeypatch.setattr(Run, "log", refuse_stop_line)
    with pytest.raises(WingspanError, match="last.pt was not written"):
        train(read_dataset(demo_dir), tiny(tmp_path), tmp_path, "full2", quiet=True)


def test_out_of_memory_fails_the_run_with_the_batch_size_to_try(demo_dir, tmp_path,
                                                                monkeypatch):
    """A GPU out of memory was a traceback ending in torch's allocator statistics; now it is
    a message with the batch size to try, and error.txt says the same for `wingspan runs`."""
    import wingspan.training.run as run_module

    def out_of_memory(run):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 98.00 MiB. GPU 0 has a total capacity of "
            "3.81 GiB of which 12.06 MiB is free. Including non-PyTorch memory, this process "
            "has 3.79 GiB memory in use. Of the allocated memory 3.52 GiB is allocated by "
            "PyTorch, and 150.12 MiB is reserved by PyTorch but unallocated.")

    monkeypatch.setattr(run_module, "_recipe", out_of_memory)
    with pytest.raises(WingspanError) as e:
        train(read_dataset(demo_dir), tiny(tmp_path, batch_size=8), tmp_path, "oom", quiet=True)
    assert e.value.message == ("Out of GPU memory at --batch-size 8: CUDA out of memory. Tried "
                               "to allocate 98.00 MiB. GPU 0 has a total capacity of 3.81 GiB "
                               "of which 12.06 MiB is free.")
    assert "--batch-size (e.g. 4)" in e.value.hint and "nvidia-smi" in e.value.hint
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    assert (tmp_path / "oom" / "error.txt").read_text() == e.value.message + "\n"


@pytest.mark.parametrize("said", [  # (torch words a worker's SIGKILL either way)
    "DataLoader worker (pid 4242) is killed by signal: Killed. ",
    "DataLoader worker (pid(s) 4242) exited unexpectedly"])
def test_a_data_worker_killed_for_memory_stops_the_run_to_resume_with_a_hint(demo_dir,
                                                                             tmp_path,
                                                                             monkeypatch,
                                                                             said):
    """The kernel's out-of-memory killer ends a data worker with SIGKILL: a 55-line
    traceback, and train.log never said the run had stopped. Now: a message with what to
    change, the stop in train.log, and the run resumable (not failed)."""
    from wingspan.training import run as runs

    def killed(run):
        raise RuntimeError(said)

    monkeypatch.setattr(runs, "finetune", killed)
    with pytest.raises(WingspanError, match="a data worker process was killed") as e:
        train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=1, epochs_finetune=1),
              tmp_path / "runs", "r", quiet=True)
    run_dir = tmp_path / "runs" / "r"
    assert "--workers" in e.value.hint and f"--resume {run_dir}" in e.value.hint
    assert "a data worker process was killed" in (run_dir / "train.log").read_text()
    assert not (run_dir / "error.txt").exists()
    with pytest.raises(WingspanError, match="a data worker process was killed"):
        resume(run_dir, quiet=True)  # the same again while resumed: still not failed (the
    assert not (run_dir / "error.txt").exists()  # resume's catch-all wrote error.txt)
    monkeypatch.undo()
    resume(run_dir, quiet=True)
    assert (run_dir / "model" / "manifest.json").is_file()


def test_a_stray_file_named_in_other_bytes_is_logged_not_a_traceback(demo_dir, tmp_path):
    """notes\\xe9.txt in a class folder: its "not an image" line stopped train.log's write
    with a UnicodeEncodeError; it is logged with its odd byte spelt out."""
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    folder = next(p for p in sorted(data.iterdir()) if p.is_dir())
    (folder / os.fsdecode(b"notes\xe9.txt")).write_text("field notes")
    run_dir = train(read_dataset(data), tiny(tmp_path, epochs_head=1, epochs_finetune=0),
                    tmp_path / "runs", "r", quiet=True)
    assert "notes\\udce9.txt" in (run_dir / "train.log").read_text(encoding="utf-8")


def test_the_resume_line_of_a_stage_that_had_ended():
    """Killed after a stage's end, before the next stage's checkpoint: not "at head epoch 4"
    of 3 (nor of a stage that early stopping ended)."""
    from wingspan.training.resuming import _resuming

    def line(epoch, bad_epochs=0, step=0):
        state = {"stage": "head", "epoch": epoch, "step": step, "bad_epochs": bad_epochs}
        return _resuming(Path("r"), {"state": state, "settings": {"epochs_head": 30,
                                                                  "patience": 8}}, False)

    assert line(30) == "Resuming r: its head stage's 30 epochs are done"
    assert line(12, bad_epochs=8) == "Resuming r: its head stage stopped early, after 12 epochs"
    assert line(12, bad_epochs=3) == "Resuming r at head epoch 13"
    assert line(12, bad_epochs=8, step=5) == "Resuming r at head epoch 13, batch 6"


def test_commands_in_messages_are_quoted_for_the_shell(demo_dir, tmp_path, monkeypatch):
    """Every `wingspan ...` line a message gives is pasted into a shell as it is: a run
    folder with a space in its name was two arguments in train's "For a fair one:
    `wingspan evaluate RUN`" (and calibrate's, adapt's and evaluate's own lines)."""
    from wingspan.errors import command

    runs = tmp_path / "my runs"
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, test_fraction=0.2), runs, "r",
                    quiet=True)
    log = (run_dir / "train.log").read_text()
    assert f"For a fair one: `wingspan evaluate '{run_dir}'`" in log, log
    assert command("evaluate", run_dir, "--split", "test") == \
        f"wingspan evaluate '{run_dir}' --split test"
    assert command("calibrate", "RUN", "DATA") == "wingspan calibrate RUN DATA"
    # As cmd.exe and PowerShell read it: double quotes, and only around a word with a space
    # (cmd.exe keeps single quotes; shlex quoted every path with a backslash)
    import sys

    monkeypatch.setattr(sys, "platform", "win32")
    assert command("evaluate", r"C:\Users\me\my runs\r", "--split", "test") == \
        r'wingspan evaluate "C:\Users\me\my runs\r" --split test'
    assert command("evaluate", r"C:\runs\r") == r"wingspan evaluate C:\runs\r"
    from wingspan.errors import quoted  # (demo's "next" lines: `python.exe -m wingspan`)

    assert quoted(r"C:\Program Files\Python\python.exe") == \
        r'"C:\Program Files\Python\python.exe"'


def test_any_of_timms_optimizers_trains_both_stages_and_is_kept_with_the_run(tmp_path,
                                                                           demo_dir,
                                                                           monkeypatch):
    """AdamW was written into the code, and no run's config.yaml said what trained it."""
    import wingspan.training.stages as stages

    made, real = [], stages.make_optimizer
    monkeypatch.setattr(stages, "make_optimizer",
                        lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, optimizer="sgd", epochs_head=2,
                                                 epochs_finetune=1), tmp_path / "runs", "r",
                    quiet=True)
    assert [type(o).__name__ for o in made] == ["SGD", "SGD"]  # (the head's, fine-tuning's)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"] == "sgd"
    for name in ("adamw2", "fusedadamw", "bnbadamw", "adahessian"):  # (none runs here: the
        # last three failed with a traceback once the feature cache was built)
        with pytest.raises(SettingError, match="'optimizer' .*one of timm's optimizers"):
            TrainConfig(optimizer=name)
    assert TrainConfig(optimizer="AdamW").optimizer == "adamw"


def test_the_epoch_is_chosen_on_the_classes_val_holds():
    """A class with no val image (a rare one) named once on val added an F1 of 0 to the
    val macro-F1: an epoch right on 5 of 6 scored 0.600, below one right on 4 (0.625), and
    the epochs kept were those that never named the rare classes."""
    from sklearn.metrics import f1_score

    from wingspan.training.stages import epoch_f1

    truth = [0, 0, 0, 1, 1, 1]  # (class 2 has no val image)
    five_right, four_right = [0, 0, 0, 1, 1, 2], [0, 0, 0, 1, 0, 0]
    assert epoch_f1(truth, five_right) > epoch_f1(truth, four_right)
    assert epoch_f1(truth, five_right) == pytest.approx(
        f1_score(truth, five_right, labels=[0, 1], average="macro"))


def test_a_data_workers_batch_is_stacked_in_shared_memory(tmp_path, monkeypatch):
    """A training worker's batch, stacked in its own memory, was copied into /dev/shm by its
    queue's thread: where that copy failed (/dev/shm full), the worker lived on and training
    waited for the batch without end. Stacked in shared memory, the worker itself raises."""
    from wingspan.training.data import LabelledImages
    from wingspan.training.decode_cache import DecodeCache

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    images = LabelledImages([str(tmp_path / "a.png")] * 2, [[0], [0]],
                            lambda image: image.float(), DecodeCache(None, 8), 0, 8)
    items = [images[(i, 0, 0)] for i in range(2)]
    assert not images.collate(items).images.is_shared()  # (in the process itself)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # (a worker)
    batch = images.collate(items)
    assert batch.images.is_shared() and batch.images.shape == (2, 3, 8, 8)
    assert batch.labels.tolist() == [[0], [0]] and batch.index.tolist() == [0, 1]


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("unshare") is None
                    or subprocess.run(["unshare", "-m", "true"], capture_output=True
                                      ).returncode != 0,
                    reason="needs a mount namespace of its own (Linux, as root)")
def test_a_full_shared_memory_stops_the_loader_instead_of_hanging_it(tmp_path):
    """/dev/shm filled after the workers were counted (by another process): the loader
    raises what the worker met, which the CLI says with what to change."""
    script = tmp_path / "load.py"
    script.write_text(f"""
import torch
from PIL import Image
from wingspan.training.data import LabelledImages, make_loader
from wingspan.training.decode_cache import DecodeCache
Image.new("RGB", (8, 8)).save({str(tmp_path / "a.png")!r})
images = LabelledImages([{str(tmp_path / "a.png")!r}] * 8, [[0]] * 8,
                        lambda image: torch.zeros(3, 256, 256), DecodeCache(None, 8), 0, 256)
try:
    next(iter(make_loader(images, [[(i, 0, 0) for i in range(8)]], workers=1)))
except RuntimeError as e:
    print("raised:", "unable to allocate shared memory" in str(e))
""")
    # 8 images of 256 px are 6 MB, in a /dev/shm of 2 MB
    shell = f"mount -t tmpfs -o size=2m tmpfs /dev/shm && {sys.executable} {script}"
    loading = subprocess.Popen(["unshare", "-m", "sh", "-c", shell], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        said, told = loading.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # (waiting without end: its whole group is ended)
        os.killpg(loading.pid, signal.SIGKILL)
        said, told = loading.communicate()
    assert said.strip() == "raised: True", said + told[-2000:]


def test_data_workers_fit_the_shared_memory_they_hand_batches_over_in(tmp_path, demo_dir,
                                                                      monkeypatch):
    """Docker's 64 MB /dev/shm, at 224 px and 4 workers of 32 images: each worker's batch
    failed to fit, the worker lived on, and training waited for it without end. As many
    workers as fit, said once, down to none."""
    from types import SimpleNamespace

    from wingspan.training import data as data_module

    def free(mb):
        return lambda path: SimpleNamespace(f_bavail=mb * 2**20 // 4096, f_frsize=4096)

    monkeypatch.setattr(data_module, "SHM_SAID", [])
    monkeypatch.setattr(data_module.os, "statvfs", free(64))
    with pytest.warns(UserWarning, match=r"/dev/shm has 64 MB free, and each data worker "
                      r"keeps about 55 MB of batches there: 1 worker instead of 4") as said:
        assert data_module.room_for_workers(4, 32, 224) == 1
    assert "docker run --shm-size 1g" in str(said[0].message)
    assert data_module.room_for_workers(4, 32, 64) == 4  # (small images fit)
    assert data_module.room_for_workers(0, 32, 224) == 0
    # Each of a machine's processes (--devices 2) has its share: each sized to the whole
    # still hung the run
    monkeypatch.setattr(data_module.os, "statvfs", free(240))
    assert data_module.room_for_workers(4, 32, 224) == 4
    with pytest.warns(UserWarning, match="120 MB free for each of 2 processes"):
        assert data_module.room_for_workers(4, 32, 224, processes=2) == 2
    # A run whose workers do not fit trains in the process itself, and ends
    monkeypatch.setattr(data_module.os, "statvfs", free(0))
    with pytest.warns(UserWarning, match="0 workers instead of 2"):
        run_dir = train(read_dataset(demo_dir), tiny(tmp_path, workers=2, epochs_head=1,
                                                     epochs_finetune=1),
                        tmp_path / "runs", "r", quiet=True)
    assert (run_dir / "model" / "manifest.json").is_file()
    assert "0 data workers" in (run_dir / "train.log").read_text().splitlines()[0]
    # Windows has no statvfs: its workers as asked, not an AttributeError
    monkeypatch.delattr(data_module.os, "statvfs")
    assert data_module.room_for_workers(4, 32, 224) == 4


def test_fine_tuning_keeps_no_onnx_session_of_stage_1s_backbone(demo_dir, tmp_path, monkeypatch):
    """Stage 1's ONNX Runtime session of the whole backbone is never run once fine-tuning
    changes its weights, but was kept with its arena of activations through fine-tuning
    (about 1 GB for EfficientNet-Lite0 at 224 px: a train's peak 3.8 GB, 2.7 without).
    Only the frozen prefix's session stays."""
    from wingspan.models import runtime
    from wingspan.training import stages

    kept = []

    def counting(loader, description, **kwargs):
        if description.startswith("Fine-tune"):
            kept.append(len(runtime._SESSIONS))
        return track(loader, description, **kwargs)

    track = stages.track
    monkeypatch.setattr(stages, "track", counting)
    train(read_dataset(demo_dir), tiny(tmp_path, runtime="onnx", precision="fp32", device="cpu",
                                       epochs_head=1, epochs_finetune=1),
          tmp_path / "runs", "sessions", quiet=True)
    assert kept == [1]


def test_a_run_stopped_after_its_model_is_written_says_it_finished(demo_dir, tmp_path,
                                                                    monkeypatch):
    """Ctrl-C or SIGTERM in the run's last lines (its feature cache's removal) said to
    resume it, and that resume said there was nothing to resume: it says the run finished,
    and removes the cache that the stop left."""
    import wingspan.training.finish
    from wingspan.training.folder import feature_cache_file
    from wingspan.training.run import Interrupted

    def stopped(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(wingspan.training.finish, "drop_feature_cache", stopped)
    with pytest.raises(Interrupted) as e:
        train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=1, epochs_finetune=0),
              tmp_path / "runs", "r", quiet=True)
    run_dir = e.value.run_dir
    log = (run_dir / "train.log").read_text()
    assert f"Interrupted. The run had finished: its model is in {run_dir / 'model'}." in log
    assert "Continue" not in log and not feature_cache_file(run_dir).parent.exists()
    with pytest.raises(WingspanError, match="is finished; there is nothing to resume"):
        resume(run_dir, quiet=True)


def test_a_resume_of_a_run_killed_after_its_model_removes_its_feature_cache(demo_dir, tmp_path):
    """Killed between the bundle and the feature cache's removal: the resume says the run is
    finished, and removes the cache that nothing else would (a kill at model/manifest.json)."""
    from wingspan.training.folder import feature_cache_file

    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=1, epochs_finetune=0),
                    tmp_path / "runs", "r", quiet=True)
    left = feature_cache_file(run_dir)
    left.parent.mkdir()
    left.write_bytes(b"features")
    with pytest.raises(WingspanError, match="is finished; there is nothing to resume"):
        resume(run_dir, quiet=True)
    assert not left.parent.exists()
