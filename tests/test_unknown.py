"""The "unknown" answer: scores fitted at the end of training, stored in the bundle, used by
predict, evaluate and serve; --holdout-classes and evaluate --unknown."""

from __future__ import annotations

import contextlib
import csv
import html
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer.main
from PIL import Image

from wingspan.cli import app
from wingspan.config import UNKNOWN_SCORES, DemoConfig, TrainConfig
from wingspan.data import read_dataset
from wingspan.data.demo import generate_demo
from wingspan.errors import WingspanError
from wingspan.evaluate.openset import openset_metrics, separation
from wingspan.inference import Prediction, Predictor
from wingspan.models.unknown import KNN_K, UnknownDetector, deepest_known
from wingspan.training.run import train

HELD = "white_darktip"


def _clusters(n_per_class: int, centres: torch.Tensor, seed: int, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centres)).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), centres.shape[1], generator=g)
    return features, labels


class _Column(torch.nn.Module):
    """A part score that is a column of the features given: a combined score's graph fed
    chosen part scores."""

    def __init__(self, i):
        super().__init__()
        self.i = i

    def forward(self, features, logits):
        return features[:, self.i]


def _msp_knn() -> tuple[UnknownDetector, torch.nn.Linear, torch.Tensor]:
    """(the default score fitted on three clusters of 8-d features, the head, the training
    features), seeded."""
    torch.manual_seed(0)
    centres = 3 * torch.randn(3, 8)
    head = torch.nn.Linear(8, 3)
    x, y = _clusters(20, centres, seed=1)
    vx, vy = _clusters(10, centres, seed=2)
    with torch.no_grad():
        return (UnknownDetector.fit(x, {"label": head(x)}, {"label": y}, vx,
                                    {"label": head(vx)}, "msp+knn", 0.05), head, x)


def _fit(features, labels, val_features, val_labels, head: torch.nn.Linear, rate=0.05):
    with torch.no_grad():
        return UnknownDetector.fit(features, {"label": head(features)}, {"label": labels},
                                   val_features, {"label": head(val_features)}, "mahalanobis",
                                   rate)


def test_every_score_the_config_names_is_one_the_detector_has():
    # (the config keeps the names without importing the detectors: kept in step here)
    from wingspan.models.unknown import COMBINED, SCORES

    assert set(SCORES) | set(COMBINED) == set(UNKNOWN_SCORES)


def test_every_score_separates_far_images_and_the_threshold_keeps_its_rate():
    torch.manual_seed(0)
    centres = 3 * torch.randn(4, 16)
    head = torch.nn.Linear(16, 4)
    with torch.no_grad():  # a head that knows the classes: weights along the class means
        head.weight.copy_(0.05 * centres)  # (logits apart by a few units: softmax at 1.0
        head.bias.zero_()                  # for every image would leave MSP no rate to set)
    train_x, train_y = _clusters(60, centres, seed=1)
    val_x, val_y = _clusters(100, centres, seed=2)
    detector = _fit(train_x, train_y, val_x, val_y, head)
    # Far from every class: a cluster of its own, away from the others.
    far = 3 * torch.randn(1, 16, generator=torch.Generator().manual_seed(9)) + 6
    far_x = far + 0.3 * torch.randn(200, 16, generator=torch.Generator().manual_seed(3))
    test_x, _ = _clusters(100, centres, seed=4)
    with torch.no_grad():
        known = detector.scores(test_x, {"label": head(test_x)}, every=True)
        unseen = detector.scores(far_x, {"label": head(far_x)}, every=True)
    for name in ("mahalanobis", "knn", "msp+knn"):  # the feature scores see a far cluster
        assert separation(known[name]["label"], unseen[name]["label"])["auroc"] > 0.99, name
    # The threshold turns away `rate` of the val images it was set on (within one image),
    # and about as many known images from the same distribution (400: 20 +- 9).
    with torch.no_grad():
        val = detector.scores(val_x, {"label": head(val_x)}, every=True)
    for name in UNKNOWN_SCORES:
        threshold = detector.thresholds[name]["label"]
        on_val = (val[name]["label"] > threshold).mean()
        assert 0.05 - 1 / len(val_x) <= on_val <= 0.05, (name, on_val)  # never above
        away = (known[name]["label"] > threshold).mean()
        assert 0.02 <= away <= 0.12, (name, away)


def test_the_fitted_scores_survive_the_bundle_round_trip():
    torch.manual_seed(0)
    centres = 3 * torch.randn(3, 8)
    head = torch.nn.Linear(8, 3)
    x, y = _clusters(20, centres, seed=1)
    vx, vy = _clusters(10, centres, seed=2)
    detector = _fit(x, y, vx, vy, head)
    entry = json.loads(json.dumps(detector.manifest()))  # as the manifest stores it
    again = UnknownDetector.from_bundle(entry, detector.tensors())
    probe = torch.randn(30, 8) * 4
    with torch.no_grad():
        before = detector.scores(probe, {"label": head(probe)}, every=True)
        after = again.scores(probe, {"label": head(probe)}, every=True)
    for name in UNKNOWN_SCORES:
        tolerance = 1e-2 if "knn" in name else 1e-4  # the kNN bank is stored in fp16
        np.testing.assert_allclose(after[name]["label"], before[name]["label"], rtol=tolerance,
                                   atol=tolerance, err_msg=name)
    with pytest.raises(WingspanError, match="No unknown score 'odin'"):
        again.scores(probe, {"label": head(probe)}, score="odin")
    # The Mahalanobis precision is kept as its upper triangle; bundles written before that
    # hold the whole matrix, and still load.
    tensors = detector.tensors()
    triangle = tensors.pop("unknown.mahalanobis.label.precision_triu")
    assert triangle.numel() == 8 * 9 // 2
    tensors["unknown.mahalanobis.label.precision"] = detector.fitted["mahalanobis"][
        "label"].precision.float()
    old = UnknownDetector.from_bundle(entry, tensors)
    with torch.no_grad():
        np.testing.assert_allclose(
            old.scores(probe, {"label": head(probe)}, score="mahalanobis")["label"],
            after["mahalanobis"]["label"], rtol=1e-5)


def test_predict_says_a_threshold_set_on_few_val_images_turns_away_more():
    """On 2 val images predict said the threshold turns away "at most 5% of the known val
    images" where training had said to expect about 33% of new known images."""
    from wingspan.cli.predict import _few_val_images

    torch.manual_seed(0)
    centres = 3 * torch.randn(3, 8)
    head = torch.nn.Linear(8, 3)
    x, y = _clusters(20, centres, seed=1)
    for per_class, said in ((1, "; set on only 3 known val images, it turns away about 25% "
                                "of new known ones"), (30, "")):
        vx, vy = _clusters(per_class, centres, seed=2)
        detector = _fit(x, y, vx, vy, head)
        again = UnknownDetector.from_bundle(json.loads(json.dumps(detector.manifest())),
                                            detector.tensors())
        assert again.val_images == detector.val_images == len(vx)
        assert _few_val_images(again) == said
    entry = detector.manifest()
    del entry["val_images"]  # (a bundle written before it was kept: nothing said)
    assert _few_val_images(UnknownDetector.from_bundle(entry, detector.tensors())) == ""


@pytest.mark.parametrize("damage", [
    lambda e: e.update(temperature=0),  # every MSP score NaN
    lambda e: e.update(temperature="warm"),
    lambda e: e.update(thresholds={}),
    lambda e: e.pop("levels"),
    lambda e: e.update(levels=3)])
def test_damaged_unknown_scores_in_a_manifest_are_refused(tmp_path, damage):
    """The unknown section is outside the manifest's checksums (calibrate rewrites it)."""
    from wingspan.models import create_classifier, load_bundle, save_bundle

    torch.manual_seed(0)
    centres = 3 * torch.randn(3, 8)
    x, y = _clusters(20, centres, seed=1)
    vx, vy = _clusters(10, centres, seed=2)
    detector = _fit(x, y, vx, vy, torch.nn.Linear(8, 3))
    model, _ = create_classifier("resnet18", {"label": 3}, weights="none", hidden=16)
    path = save_bundle(model, tmp_path / "b", {"label": ["a", "b", "c"]}, unknown=detector)
    assert load_bundle(path, with_unknown=True)[2].thresholds
    manifest = json.loads((path / "manifest.json").read_text())
    damage(manifest["unknown"])
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WingspanError, match="unknown scores"):
        load_bundle(path, with_unknown=True)


def test_a_combined_score_stays_a_share_in_0_1_and_old_thresholds_keep_their_answers():
    """msp+knn is the share of known val images a score exceeds: images beyond every val
    image (far away, or closer than any) stay within [0, 1], in the graph too."""
    detector, head, x = _msp_knn()
    with torch.no_grad():
        probe = torch.cat([x[:10], 20 * torch.randn(20, 8)])  # training images, far ones
        scores = detector.scores(probe, {"label": head(probe)})["label"]
        graph = detector.graph()(probe, {"label": head(probe)})["label"].numpy()
    for got in (scores, graph):
        assert got.min() >= 0.0 and got.max() <= 1.0, (got.min(), got.max())
    assert scores.max() > 0.998  # the far images: beyond every val image
    # A bundle written before the scaling holds an unscaled threshold (share + 1e-3 *
    # tanh(z / 10)); it is read in today's units, so it turns away the same images.
    entry = json.loads(json.dumps(detector.manifest()))
    del entry["combined_range"]
    want = detector.thresholds["msp+knn"]["label"]
    entry["thresholds"]["msp+knn"]["label"] = want * 1.002 - 1e-3
    old = UnknownDetector.from_bundle(entry, detector.tensors())
    assert old.thresholds["msp+knn"]["label"] == pytest.approx(want, abs=1e-9)
    assert old.thresholds["msp"] == detector.thresholds["msp"]


def test_a_single_val_image_still_sets_a_finite_threshold():
    """One val image: the combined score's spread was torch's unbiased std of one value,
    NaN, and with it every score and the threshold: "unknown" was never answered, and
    evaluate --unknown crashed on the NaN."""
    torch.manual_seed(0)
    centres = 3 * torch.randn(3, 8)
    head = torch.nn.Linear(8, 3)
    x, y = _clusters(20, centres, seed=1)
    vx, vy = _clusters(1, centres[:1], seed=2)
    with torch.no_grad():
        detector = UnknownDetector.fit(x, {"label": head(x)}, {"label": y}, vx,
                                       {"label": head(vx)}, "msp+knn", 0.05)
        far = 20 * torch.randn(5, 8)
        scores = detector.scores(far, {"label": head(far)})["label"]
        graph = detector.graph()(far, {"label": head(far)})["label"].numpy()
    threshold = detector.thresholds["msp+knn"]["label"]
    assert np.isfinite(threshold) and np.isfinite(scores).all() and np.isfinite(graph).all()
    assert (scores > threshold).all() and (graph > threshold).all()  # far: unknown
    np.testing.assert_allclose(graph, scores, atol=1e-5)


def test_an_old_bundles_combined_scores_keep_their_distance_from_the_threshold(monkeypatch):
    """A bundle fitted before combined scores were scaled (share + 1e-3 * tanh(z / 10),
    its threshold in those units): read today, each image's score minus its threshold is
    the old one over 1.002, so the same images are turned away at any threshold."""
    import wingspan.models.unknown as unknown

    torch.manual_seed(0)
    centres = 3 * torch.randn(3, 8)
    head = torch.nn.Linear(8, 3)
    x, y = _clusters(20, centres, seed=1)
    vx, vy = _clusters(10, centres, seed=2)
    # New known images and far ones (not val's own: those tie with the val scores, which the
    # bundle keeps in float32)
    probe = torch.cat([_clusters(10, centres, seed=3)[0], 20 * torch.randn(20, 8)])
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(unknown, "_in_unit", lambda share, z: share + 1e-3 * torch.tanh(z / 10))
        old = UnknownDetector.fit(x, {"label": head(x)}, {"label": y}, vx,
                                  {"label": head(vx)}, "msp+knn", 0.05)
        entry = json.loads(json.dumps(old.manifest()))
        del entry["combined_range"]  # as written then
        was = old.scores(probe, {"label": head(probe)})["label"].astype(np.float64)
    with torch.no_grad():
        now = UnknownDetector.from_bundle(entry, old.tensors())
        got = now.scores(probe, {"label": head(probe)})["label"].astype(np.float64)
    before = was - entry["thresholds"]["msp+knn"]["label"]
    after = got - now.thresholds["msp+knn"]["label"]
    assert (before > 0).any() and (before < 0).any()  # some turned away, some not
    assert after == pytest.approx(before / 1.002, abs=1e-6)


def test_a_bundle_from_before_the_stepped_shares_answers_as_it_did():
    """Combined shares step up just below each val score since 2026-12-06. A bundle
    written before keeps its thresholds, set under the rule of its day (the step at each
    val score); today's code read it with the new rule, and a score a few millionths
    below a val score gained that image's share: an image of an older holdout demo run
    went from its class to "unknown", silently, and away from the run's own export. Read
    without the mark, a bundle keeps its rule, in the graph too, and written again keeps
    it."""
    from wingspan.models.unknown import STEPPED

    new = _msp_knn()[0]
    entry = json.loads(json.dumps(new.manifest()))
    assert all(entry[k] == v for k, v in STEPPED.items())
    for k in STEPPED:
        del entry[k]  # as written before
    old = UnknownDetector.from_bundle(entry, new.tensors())
    assert not old.stepped and not any(k in old.manifest() for k in STEPPED)
    fresh = UnknownDetector.from_bundle(json.loads(json.dumps(new.manifest())), new.tensors())
    # Scores just below each val MSP (the kNN part far below every val score)
    val = fresh.fitted["msp+knn"]["label"].val["msp"]
    parts = {"msp": val[1:] - 1e-7, "knn": torch.full((len(val) - 1,), -1e3).double()}
    n = len(val)
    shares = {}
    for name, detector in (("old", old), ("new", fresh)):
        combined = detector.fitted["msp+knn"]["label"]
        shares[name] = combined.combine(parts).double().numpy()
        graph = combined.graph({"msp": _Column(0), "knn": _Column(1)})
        with torch.no_grad():
            got = graph(torch.stack([parts["msp"], parts["knn"]], 1).float(), None)
        np.testing.assert_allclose(got.numpy(), shares[name], atol=2e-6)
    # One val image's share apart (scaled into [0, 1] as every combined score is)
    gap = shares["new"] - shares["old"]
    assert gap.min() > 0.5 / n and gap.max() < 1.5 / n, (gap, n)


def test_a_bundle_keeps_the_k_its_knn_threshold_was_set_for(monkeypatch):
    import wingspan.models.unknown as unknown

    centres = 3 * torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    head = torch.nn.Linear(8, 3)
    x, y = _clusters(20, centres, seed=1)
    vx, vy = _clusters(10, centres, seed=2)
    monkeypatch.setattr(unknown, "KNN_K", 5)
    detector = _fit(x, y, vx, vy, head)
    assert detector.fitted["knn"]["label"].k == 5
    tensors, entry = detector.tensors(), json.loads(json.dumps(detector.manifest()))
    monkeypatch.setattr(unknown, "KNN_K", 2)  # a later wingspan with another default
    assert UnknownDetector.from_bundle(entry, tensors).fitted["knn"]["label"].k == 5
    # A bundle written before k was stored was fitted with 10 (of its 60 images).
    del tensors["unknown.knn.k"]
    assert UnknownDetector.from_bundle(entry, tensors).fitted["knn"]["label"].k == 10


# "branch": a taxonomy model's MSP scores the class predict names at each level; "shares"
# (a bundle written before it): the likeliest class's share; "heads" (before that): each
# level's own head at T 1.
@pytest.mark.parametrize("msp", ["branch", "shares", "heads"])
def test_each_score_in_tensor_operations_matches_the_detector(msp):
    """What `wingspan export` puts in the graph (no pytorch-ood, no scikit-learn index)
    gives the scores predict gives, for every score and two levels; kNN is what
    pytorch-ood's detector (scikit-learn's index) finds."""
    from wingspan.data.taxonomy import Taxonomy

    torch.manual_seed(0)
    centres = 3 * torch.randn(4, 8)
    heads = {"family": torch.nn.Linear(8, 2), "label": torch.nn.Linear(8, 4)}
    x, y = _clusters(30, centres, seed=1)
    vx, _ = _clusters(15, centres, seed=2)
    member = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])  # species 0, 1 in family 0
    with torch.no_grad():
        logits = {lv: h(x) for lv, h in heads.items()}
        detector = UnknownDetector.fit(x, logits, {"family": y // 2, "label": y}, vx,
                                       {lv: h(vx) for lv, h in heads.items()}, "msp+knn",
                                       0.05, temperature=1.7,
                                       members=None if msp == "heads" else {"family": member})
        # As `wingspan export` has it: from a bundle (which keeps the kNN bank in fp16).
        entry = json.loads(json.dumps(detector.manifest()))
        assert (entry.get("msp") == "branch") == (msp != "heads")
        if msp == "shares":
            del entry["msp"]
        detector = UnknownDetector.from_bundle(entry, detector.tensors())
        probe = torch.cat([_clusters(10, centres, seed=3)[0], 4 * torch.randn(20, 8)])
        probe_logits = {lv: h(probe) for lv, h in heads.items()}
        want = detector.scores(probe, probe_logits, every=True)
        calibrated = torch.softmax(probe_logits["label"] / 1.7, -1).numpy()
        if msp == "branch":  # 1 - the calibrated probability of the branch's class
            tree = Taxonomy(["family", "label"], {"family": ["F0", "F1"],
                                                  "label": ["a", "b", "c", "d"]},
                            {"family": [0, 0, 1, 1], "label": [0, 1, 2, 3]})
            chosen = tree.predict(calibrated, temperature=1.7)
            shares = tree.marginals(calibrated)
            likeliest = 0
            for lv in ("family", "label"):
                picked = shares[lv][np.arange(len(probe)), chosen[lv]]
                np.testing.assert_allclose(want["msp"][lv], 1 - picked, atol=1e-5)
                likeliest += (~np.isclose(picked, shares[lv].max(1))).sum()
            assert likeliest > 0  # where the likeliest class's share would have vouched
        else:  # a family's: its likeliest class's share of the calibrated species, or
            # (before) the family head's own at T 1
            shown = (calibrated @ member if msp == "shares"
                     else torch.softmax(probe_logits["family"], -1).numpy())
            np.testing.assert_allclose(want["msp"]["family"], 1 - shown.max(1), atol=1e-5)
        # kNN as pytorch-ood's detector finds it, with scikit-learn's index on unit vectors
        # (the bank as the bundle keeps it, in fp16): what the matrix product must give.
        from sklearn.neighbors import NearestNeighbors

        unit = torch.nn.functional.normalize
        index = NearestNeighbors(n_neighbors=KNN_K).fit(unit(x.half().float()).numpy())
        kth = index.kneighbors(unit(probe).numpy())[0][:, -1]
        for lv in heads:
            np.testing.assert_allclose(want["knn"][lv], kth, rtol=1e-4, atol=1e-4)
        for name in UNKNOWN_SCORES:
            got = detector.graph(name)(probe, probe_logits)
            for lv in heads:
                np.testing.assert_allclose(got[lv].numpy(), want[name][lv], rtol=1e-4,
                                           atol=1e-4, err_msg=(name, lv))
    graph = detector.graph()  # the default score, msp+knn: one kNN bank for both levels
    assert sum(b.numel() for b in graph.buffers() if b.dim() == 2) == x.numel()


def test_deepest_known_level_stops_at_the_first_level_that_fails():
    levels = ["family", "genus", "species"]
    limits = dict.fromkeys(levels, 1.0)
    assert deepest_known(levels, {"family": 0.5, "genus": 0.9, "species": 0.2}, limits) \
        == "species"
    assert deepest_known(levels, {"family": 0.5, "genus": 0.9, "species": 1.5}, limits) \
        == "genus"
    assert deepest_known(levels, {"family": 0.5, "genus": 1.9, "species": 0.2}, limits) \
        == "family"
    assert deepest_known(levels, {"family": 2.0, "genus": 0.1, "species": 0.1}, limits) is None
    # A NaN score (NaN logits: a broken forward pass) passes no threshold: it passed every
    # one, naming the first class of each level as known
    nan = float("nan")
    assert deepest_known(levels, {"family": 0.5, "genus": nan, "species": 0.1}, limits) \
        == "family"
    assert deepest_known(levels, dict.fromkeys(levels, nan), limits) is None


def test_the_open_set_figures_name_the_class_predict_names():
    """With a taxonomy, predict names the top-down branch's class, which can differ from
    the flat argmax: species a (family F1) at 0.4 loses to family F2's 0.6, so b."""
    from types import SimpleNamespace

    import pandas as pd

    from wingspan.data.taxonomy import Taxonomy
    from wingspan.evaluate.answers import _finest_answer

    taxonomy = Taxonomy.from_table(pd.DataFrame({"path": ["1", "2", "3"],
                                                 "family": ["F1", "F2", "F2"],
                                                 "species": ["a", "b", "c"]}),
                                   ["family", "species"])
    preds = [SimpleNamespace(probs=np.array(p)) for p in ([0.4, 0.35, 0.25], [0.7, 0.2, 0.1])]
    flat = SimpleNamespace(taxonomy=None, temperature=1.0)
    assert _finest_answer(flat, preds).tolist() == [0, 0]
    assert _finest_answer(SimpleNamespace(taxonomy=taxonomy, temperature=1.0),
                          preds).tolist() == [1, 0]


@pytest.mark.parametrize("n", [10, 20, 27, 30, 195])
def test_fpr95_is_read_where_at_least_95_percent_of_the_known_images_are_kept(n):
    """As scikit-learn's ROC curve reads it at the first cut with TPR >= 0.95: the cut
    fell between two known scores and kept 25 of 27, so the FPR95 read too low."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(n)
    known, unseen = rng.normal(0, 1, n), rng.normal(1, 1, 40)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(n), np.zeros(40)], -np.r_[known, unseen])
    assert separation(known, unseen)["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)])


def test_openset_metrics_count_a_turned_away_known_image_as_a_miss():
    known = np.array([0.1, 0.2, 0.3, 2.0])  # the last known image is turned away
    unseen = np.array([3.0, 0.5])  # the second unseen image is taken for class 1
    y, y_pred = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])
    m = openset_metrics(known, unseen, 1.0, y, y_pred, np.array([1, 1]), np.arange(2))
    assert m["known_turned_away"] == 0.25 and m["unseen_flagged"] == 0.5
    assert m["known_accuracy"] == 1.0 and m["known_accuracy_with_unknown"] == 0.75
    assert m["known_macro_f1"] == 1.0
    # class 1: recall 1/2, precision 1 on known images only -> F1 2/3; class 0 stays 1.
    assert m["known_macro_f1_with_unknown"] == pytest.approx((1 + 2 / 3) / 2)
    # open set: class 1 also gets the accepted unseen image -> precision 1/2, recall 1/2.
    assert m["open_macro_f1"] == pytest.approx((1 + 0.5) / 2)
    assert m["auroc"] == pytest.approx(separation(known, unseen)["auroc"])
    # Given which images the answer turns away (a taxonomy can turn away one that passes
    # the finest threshold), those count, not the threshold.
    away = np.array([True, False, False, False])
    m = openset_metrics(known, unseen, 1.0, y, y_pred, np.array([1, 1]), np.arange(2),
                        known_away=away, unknown_away=np.array([False, False]))
    assert m["known_turned_away"] == 0.25 and m["unseen_flagged"] == 0.0
    assert m["known_accuracy_with_unknown"] == 0.75 and m["threshold"] == 1.0
    assert m["known_macro_f1_with_unknown"] == pytest.approx((2 / 3 + 1) / 2)


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory):
    """The demo (6 species) trained with one species held out, on ImageNet weights that
    install offline (EfficientNet-Lite0)."""
    root = tmp_path_factory.mktemp("unknown")
    demo = generate_demo(root / "demo", DemoConfig())
    config = TrainConfig(backbone="efficientnet_lite0", image_size=96, epochs_head=20,
                         epochs_finetune=2, workers=0, holdout_classes=[HELD])
    said = io.StringIO()  # what --quiet leaves on stderr (see the test below)
    with contextlib.redirect_stderr(said):
        run_dir = train(read_dataset(demo), config, root / "runs", "held", quiet=True)
    (root / "stderr.txt").write_text(said.getvalue())
    return run_dir, demo


def test_the_bench_of_other_unknown_scores_scores_a_held_out_run(held_out_run, tmp_path):
    """bench/unknown_scores.py (the README's GradNorm, norm and ODIN rows) on the demo's
    held-out run: a row per score, the bundle's own msp+knn at the figure training gave."""
    import subprocess
    import sys

    run_dir, demo = held_out_run
    others = tmp_path / "others"
    others.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 96, 3), np.uint8)
                        ).save(others / f"noise_{i}.jpg")
    bench = Path(__file__).parents[1] / "bench" / "unknown_scores.py"
    rows = {}
    for mode in ([], ["--odin"]):
        done = subprocess.run([sys.executable, bench, others, run_dir, *mode],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        for line in done.stdout.splitlines()[1:]:
            name, rest = line.split("AUROC", 1)
            rows[name.strip()] = float(rest.split()[0])
    assert {"msp+knn", "gradnorm", "feature_l1", "odin T1 eps0.0005"} <= set(rows)
    # The bundle's own score as evaluate measures it on the same images and engine (the
    # bench runs PyTorch fp32; training's figure is of the machine's auto engine, bf16 on
    # some CPUs).
    from wingspan.evaluate.run import evaluate

    same = evaluate(run_dir, out=tmp_path / "ev", progress=False, plots=False,
                    runtime="torch", precision="fp32", unknown=str(demo / HELD))
    assert rows["msp+knn"] == pytest.approx(same.metrics["unknown"]["auroc"], abs=2e-3)


def test_unknown_csv_names_the_images_wherever_it_is_read_from(held_out_run, tmp_path,
                                                                monkeypatch):
    """--unknown given relative to the current folder kept its paths so in unknown.csv,
    which then named no file once read from elsewhere (predictions.csv's are absolute)."""
    from wingspan.evaluate.run import evaluate

    run_dir, demo = held_out_run
    monkeypatch.chdir(demo)
    metrics = evaluate(run_dir, out=tmp_path / "ev", progress=False, plots=False,
                       unknown=HELD).metrics
    rows = list(csv.DictReader(open(tmp_path / "ev" / "unknown.csv")))
    assert len(rows) == len(list((demo / HELD).glob("*.jpg")))
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in rows)
    assert all(Path(n["path"]).is_absolute() for n in metrics["unknown"]["unseen_named"])


def test_a_held_out_species_comes_out_unknown(held_out_run):
    run_dir, demo = held_out_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((run_dir / "model" / "manifest.json").read_text())
    assert HELD not in manifest["classes"]["label"] and len(manifest["classes"]["label"]) == 5
    u = metrics["unknown"]
    assert u["unseen_images"] == len(list((demo / HELD).glob("*.jpg")))
    print(f"held-out {HELD}: AUROC {u['auroc']:.3f}, {u['unseen_flagged']:.0%} unknown")
    assert u["unseen_flagged"] > 0.5, u  # most of the held-out species is "unknown"
    assert u["auroc"] >= 0.85, u
    # Said with --quiet too: the figures asked for (they were in train.log alone).
    said = (run_dir.parents[1] / "stderr.txt").read_text()
    assert f"AUROC {u['auroc']:.3f}" in said, said
    assert set(u["scores"]) == set(UNKNOWN_SCORES)
    # A score below 0.5 ranks these unseen images as the more known: said, not left to be
    # read as a weak one (energy on noise)
    from wingspan.evaluate.wording import unknown_section

    inverted = {**u, "scores": {**u["scores"], "energy": {"auroc": 0.09, "fpr95": 1.0}}}
    table = unknown_section(inverted, "test")["scores"].set_index("auroc")["score"]
    assert table[0.09] == "energy (inverted: ranks these unseen images as the more known)"
    assert not any("inverted" in s for a, s in table.items() if a >= 0.5)
    report = (run_dir / "evaluation-unknown" / "report.html").read_text()
    assert "Unknown images" in report and "unknown score histogram" in report
    # The images called unknown are the ones whose score is above the bundle's threshold.
    rows = list(csv.DictReader(open(run_dir / "evaluation-unknown" / "unknown.csv")))
    threshold = manifest["unknown"]["thresholds"][manifest["unknown"]["score"]]["label"]
    for r in rows:
        assert (r["answer"] == "unknown") == (float(r["unknown_score"]) > threshold)
        # ... with the threshold and level beside, as predict writes them
        assert float(r["threshold"]) == pytest.approx(threshold) and r["score_level"] == "label"
    # The held-out images given a class are listed, surest (lowest score) first, in the
    # report too: what a user would have been told wrongly.
    given = sorted((r for r in rows if r["answer"] != "unknown"),
                   key=lambda r: float(r["unknown_score"]))
    assert [n["path"] for n in u["unseen_named"]] == [r["path"] for r in given][:20]
    assert ("Unseen images given a class" in report) == bool(given)
    assert f"{u['score']} (in use)" in report
    # A threshold set on few val images says how loosely its rate holds.
    n_val = sum(1 for r in csv.DictReader(open(run_dir / "splits.csv")) if r["split"] == "val")
    log = " ".join((run_dir / "train.log").read_text().split())
    from wingspan.models.unknown import new_known_rate

    said = (f"is just above all {n_val} known val images (on so few, the 5% asked turns none "
            "of them away)"
            if n_val <= 20 else f"turns away at most 5% of the {n_val} known val images")
    expected = new_known_rate(n_val, 0.05)  # 1 / (n + 1) on 20 or fewer: 1 in 4 on 3
    assert (f"{said}; on new known images expect about {expected:.0%} (from 0% to ") in log
    # The summary's words are the report's: a one-level model answers "unknown".
    assert f"{u['unseen_flagged']:.1%} of them answered unknown, the other " \
           f"{1 - u['unseen_flagged']:.1%} named as a known class; " \
           f"{u['known_turned_away']:.1%} of the known test images answered unknown too" in log


def test_predict_answers_unknown_and_keeps_the_closest_class(held_out_run, run_cli, tmp_path):
    run_dir, demo = held_out_run
    out = tmp_path / "p.csv"
    code, stdout, err = run_cli("predict", run_dir, demo / HELD, demo / "azure_spotwing",
                                "--output", out, "--quiet")
    assert code == 0, err
    rows = list(csv.DictReader(open(out)))
    held = [r for r in rows if f"/{HELD}/" in r["path"]]
    known = [r for r in rows if "/azure_spotwing/" in r["path"]]
    assert sum(r["answer"] == "unknown" for r in held) > len(held) / 2
    assert sum(r["answer"] == "azure_spotwing" for r in known) > 0.8 * len(known)
    assert all(r["predicted"] and r["predicted"] == r["class_1"] for r in held)  # the
    # closest class is still there
    said = " ".join(stdout.split())
    assert "unlike the classes the model knows" in said
    # Where many are, what may be done (half of the iNat field photos of species a Leeds
    # model knows were answered unknown, and nothing said what next).
    unknown = sum(r["answer"] == "unknown" for r in rows)
    assert ("fits the model to such photos" in said) == (unknown > 0.25 * len(rows)), said
    code, alone, err = run_cli("predict", run_dir, demo / HELD, "--quiet")
    assert code == 0 and f"`wingspan adapt {run_dir} PHOTOS` fits the model to such photos" \
        in " ".join(alone.split()), alone
    # The rate asked, as the most it turns away (on a demo's few val images, none).
    assert "above its threshold, set to turn away at most 5% of the known val images" in said
    # explain draws the map for predict's closest class and titles it with its answer.
    from wingspan.explain import explain
    from wingspan.predict import predict

    paths = [r["path"] for r in held[:4] + known[:2]]
    said = predict(Predictor(run_dir, "cpu", "fp32", runtime="torch", workers=0), paths,
                   progress=False).rows
    shown = explain(run_dir, paths, tmp_path / "explain")
    assert [e.answer for e in shown] == [r["answer"] for r in said]
    assert [e.label for e in shown] == [r["top"][0][0] for r in said]
    assert "unknown" in [e.answer for e in shown]
    # Another score of those the bundle holds, chosen at predict time.
    code, _, err = run_cli("predict", run_dir, demo / HELD, "--unknown-score", "knn",
                           "--output", out, "--quiet")
    assert code == 0, err
    code, _, err = run_cli("predict", run_dir, demo / HELD, "--unknown-score", "odin")
    assert code != 0 and "No unknown score 'odin'" in err
    # A typo: the closest named, as calibrate and export name it.
    code, _, err = run_cli("predict", run_dir, demo / HELD, "--unknown-score", "maha")
    said = " ".join(err.split())
    assert code == 2 and "No unknown score 'maha'. Hint: Did you mean 'mahalanobis'? " \
        "Choose one of:" in said, err


def test_evaluate_unknown_folder_of_non_butterflies(held_out_run, run_cli, tmp_path):
    """Photos with no butterfly at all (scikit-image's samples) are far from every class."""
    from skimage import data as skdata

    run_dir, _ = held_out_run
    folder = tmp_path / "not-butterflies"
    folder.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field",
                 "immunohistochemistry", "retina", "camera", "colorwheel"):
        Image.fromarray(getattr(skdata, name)()).convert("RGB").save(folder / f"{name}.jpg")
    code, stdout, err = run_cli("evaluate", "--no-plots", run_dir, "--unknown", folder, "--out",
                                tmp_path / "ev", "--quiet")
    assert code == 0, err
    assert "FPR at 95% TPR" in stdout and "msp+knn (in use)" in stdout
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    u = m["unknown"]
    assert u["unseen_images"] == 10 and u["unseen_flagged"] >= 0.9, u
    # Without the unknown answer, the known images' macro-F1 is the evaluation's own.
    assert u["known_macro_f1"] == pytest.approx(m["macro"]["f1"])
    assert "scored against the known images of the 'test' split" in html.unescape(
        (tmp_path / "ev" / "report.html").read_text())
    code, _, err = run_cli("evaluate", run_dir, "--unknown", tmp_path / "nothing-here")
    assert code != 0 and "No images of unseen classes" in err
    assert not list(run_dir.glob(".*partial"))  # refused before anything was done
    # A folder of a class the model knows (DATA given as --unknown, say) is refused too:
    # its right answers would count against the unknown answer.
    _, demo = held_out_run
    known = sorted(p for p in demo.iterdir() if p.is_dir() and p.name != HELD)[0]
    code, _, err = run_cli("evaluate", "--no-plots", run_dir, "--unknown", known, "--quiet")
    assert code != 0 and f"named after classes the model knows: {known.name}." in err
    code, _, err = run_cli("evaluate", "--no-plots", run_dir, "--unknown", demo, "--quiet")
    assert code != 0 and "named after classes the model knows" in err
    # The API takes a list of folders, files or globs, as predict does.
    from wingspan.evaluate.run import evaluate

    listed = evaluate(run_dir, unknown=[folder], out=tmp_path / "ev2", progress=False,
                      workers=0).metrics["unknown"]
    assert listed["unseen_images"] == 10


def test_a_held_out_run_says_how_to_train_again_on_its_split(held_out_run):
    said = (held_out_run[0] / "config.yaml").read_text().splitlines()[1]
    assert said.endswith("holdout.csv: to score them as unknowns again, train on the data "
                         "above with this config")
    assert "--config" in said and "--holdout-classes ''" in said


def test_a_run_killed_while_scoring_its_held_out_classes_resumes_to_score_them(
        held_out_run, tmp_path):
    import shutil

    from wingspan.training import resume

    run_dir, _ = held_out_run
    with pytest.raises(WingspanError, match="is finished; there is nothing to resume"):
        resume(run_dir, quiet=True)
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    # As a kill during the scoring leaves it: the model written, no figures yet.
    metrics = json.loads((copy / "metrics.json").read_text())
    want = metrics.pop("unknown")
    (copy / "metrics.json").write_text(json.dumps(metrics))
    shutil.rmtree(copy / "evaluation-unknown")
    from wingspan.run_table import STOPPED, run_row

    row = run_row(copy)  # its model is there: not "stopped after finetune epoch N"
    assert (row["status"], row["detail"]) == (
        STOPPED, "model written; its held-out classes not scored yet")
    assert resume(copy, quiet=True) == copy
    got = json.loads((copy / "metrics.json").read_text())["unknown"]
    assert got["auroc"] == pytest.approx(want["auroc"], abs=1e-6)
    assert (copy / "evaluation-unknown" / "report.html").is_file()
    assert "scoring the held-out classes" in (copy / "train.log").read_text()


def test_holdout_classes_must_exist(tmp_path):
    from wingspan.training.run import hold_out

    demo = read_dataset(generate_demo(tmp_path, DemoConfig(image_size=32,
                                                           images_per_class=(4, 4, 4, 4))))
    with pytest.raises(WingspanError, match="did you mean 'white_darktip'"):
        hold_out(demo, "label", ["white_darktp"])
    with pytest.raises(WingspanError, match="fewer than 2 classes"):
        hold_out(demo, "label", sorted(set(demo.table.label))[1:])
    rest, held = hold_out(demo, "label", [HELD])
    assert HELD not in set(rest.table.label) and set(held.label) == {HELD}
    # A family named (a plausible hold-out with --levels): what holding it out takes.
    family = demo.table.loc[demo.table.label == HELD, "family"].iloc[0]
    species = sorted(set(demo.table.loc[demo.table.family == family, "label"]))
    with pytest.raises(WingspanError) as e:
        hold_out(demo, "label", [family])
    assert e.value.hint.startswith(f"{family!r} is a family: hold out its label classes, "
                                   f"--holdout-classes {','.join(species)}."), e.value.hint


def test_a_missing_holdout_class_lists_the_classes_and_says_how_many_more(tmp_path):
    """Of 25 classes the hint showed 20 as if they were all (the one meant may be past
    them)."""
    from helpers import folder_dataset

    from wingspan.training.run import hold_out

    names = [f"class_{i:02}" for i in range(25)]
    data = read_dataset(folder_dataset(tmp_path, dict.fromkeys(names, 1), size=(8, 8)))
    with pytest.raises(WingspanError) as e:
        hold_out(data, "label", ["nothing_alike"])
    assert e.value.hint == f"The classes: {', '.join(names[:20])} and 5 more.", e.value.hint


def test_holdout_classes_read_as_folder_names_are_read(tmp_path):
    """A name pasted from macOS (decomposed, NFD) was refused with "no class 'Pieris
    napí' (did you mean 'Pieris napí'?)", and one with a comma of its own ("Vanessa
    atalanta (Linnaeus, 1758)") could not be given on the command line, which splits at
    commas."""
    import unicodedata

    from wingspan.training.run import hold_out

    root = generate_demo(tmp_path, DemoConfig(image_size=32, images_per_class=(4, 4, 4, 4)))
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    accented, cited = "Pieris napí", "Vanessa atalanta (Linnaeus, 1758)"
    (root / names[0]).rename(root / accented)
    (root / names[1]).rename(root / cited)
    demo = read_dataset(root)
    decomposed = unicodedata.normalize("NFD", accented)
    assert decomposed != accented
    rest, held = hold_out(demo, "label", [decomposed])
    assert set(held.label) == {accented} and accented not in set(rest.table.label)
    as_split = [c.strip() for c in f"{cited},{names[2]}".split(",")]  # as the CLI splits
    rest, held = hold_out(demo, "label", as_split)
    assert set(held.label) == {cited, names[2]}


def test_a_held_out_class_with_commas_is_recorded_whole(tmp_path):
    """The command line splits --holdout-classes at commas; the run records the class as
    named, so that a resume does not take it for a class added to the data since."""
    from test_train import tiny

    from wingspan.training import resume

    root = generate_demo(tmp_path, DemoConfig(image_size=32, images_per_class=(8, 8, 8, 8)))
    first = sorted(p for p in root.iterdir() if p.is_dir())[0]
    cited = "Vanessa atalanta (Linnaeus, 1758)"
    first.rename(root / cited)
    as_split = [c.strip() for c in cited.split(",")]  # as the CLI gives it
    run_dir = train(read_dataset(root), tiny(tmp_path, epochs_head=1, epochs_finetune=0,
                                             holdout_classes=as_split),
                    tmp_path / "runs", "r", quiet=True)
    assert TrainConfig.from_file(run_dir / "config.yaml").holdout_classes == [cited]
    (run_dir / "metrics.json").unlink()  # a run left to finish
    resume(run_dir, quiet=True)
    assert "does not train on" not in (run_dir / "train.log").read_text()


def test_a_class_named_unknown_is_pointed_out(tmp_path):
    """Training says when a class has the name predict answers for unseen photos."""
    from wingspan.training.run import _say_if_a_class_is_named_unknown

    root = generate_demo(tmp_path, DemoConfig(image_size=32, images_per_class=(4, 4, 4, 4)))
    said: list[str] = []
    _say_if_a_class_is_named_unknown(read_dataset(root), ["label"], said.append)
    assert said == []
    (root / HELD).rename(root / "Unknown")
    (root / "taxonomy.csv").unlink()
    _say_if_a_class_is_named_unknown(read_dataset(root), ["label"], said.append)
    assert len(said) == 1 and "'Unknown'" in said[0] and "known_level" in said[0]
    (root / "Unknown").rename(root / "unknown_")  # (two folders differing by case alone)
    (root / "unknown_").rename(root / "unknown")
    shutil.copytree(root / "unknown", root / "UNKNOWN")
    _say_if_a_class_is_named_unknown(read_dataset(root), ["label"], said.append)
    assert "classes 'UNKNOWN' and 'unknown' have" in said[-1], said[-1]


@pytest.fixture(scope="module")
def unknown_named_run(tmp_path_factory):
    """A tiny run with a class named "unknown", and its data."""
    from test_train import tiny

    tmp = tmp_path_factory.mktemp("named")
    root = generate_demo(tmp / "demo", DemoConfig(image_size=32,
                                                  images_per_class=(12, 12, 12, 12)))
    (root / HELD).rename(root / "unknown")
    (root / "taxonomy.csv").unlink()
    with pytest.MonkeyPatch.context() as m:
        m.setenv("WINGSPAN_PRECISION", "fp32")  # the same tiny model on every CPU
        return train(read_dataset(root), tiny(tmp), tmp / "runs", quiet=True), root


def test_predict_counts_the_turned_away_not_a_class_named_unknown(unknown_named_run, tmp_path,
                                                                 run_cli):
    """predict's count of images "unlike the classes the model knows" is of those no level
    passes (known_level empty), not of answers that read "unknown": a class may be named so."""
    run_dir, root = unknown_named_run
    out = tmp_path / "p.csv"
    code, stdout, err = run_cli("predict", run_dir, root, "--output", out, "--quiet")
    assert code == 0, err
    rows = list(csv.DictReader(open(out)))
    named = sum(r["answer"] == "unknown" and bool(r["known_level"]) for r in rows)
    turned_away = sum(not r["known_level"] for r in rows)
    assert named > 0  # the class "unknown" is answered
    said = " ".join(stdout.split())
    if turned_away:
        assert re.search(rf"(?<!\d){turned_away} images? (is|are) unlike the classes", said)
    else:
        assert "unlike the classes" not in said


@pytest.mark.parametrize("turned_away", [True, False])
def test_a_class_named_unknown_is_told_from_the_unknown_answer_where_people_read(
        unknown_named_run, run_cli, monkeypatch, tmp_path, turned_away):
    """predict's table, explain and evaluate's mistakes compared the answer's text with
    the top class: a photo turned away whose closest class is named "unknown" read as a
    plain answer (its score and closest class unsaid), and one known as that class showed
    "-" for its probability. They go by the level known."""
    from wingspan.evaluate.answers import said_otherwise
    from wingspan.explain import explain
    from wingspan.predict import predict

    run_dir, root = unknown_named_run
    photos = sorted(str(p) for p in (root / "unknown").glob("*.jpg"))
    predictor = Predictor(run_dir, workers=0)
    tops = {r["path"]: r["top"][0][0] for r in predict(predictor, photos, progress=False).rows}
    photos = [p for p in photos if tops[p] == "unknown"][:3]
    assert photos  # (the tiny model names its own class for some of them)
    level = None if turned_away else "label"
    monkeypatch.setattr(Predictor, "known_level", lambda self, scores: level)
    code, out, err = run_cli("predict", run_dir, *photos, "--top-k", "2")
    assert code == 0, err
    rows = [line for line in out.splitlines()  # (a row's first line: its long path wraps)
            if line.count("│") == 5 and line.split("│")[2].strip()]
    assert len(rows) == len(photos), out
    for line in rows:
        probability = line.split("│")[3].strip()
        assert (probability == "-") == turned_away, line
        assert ("closest: unknown" in line) == turned_away, line
    for e in explain(run_dir, photos[:1], tmp_path / "explain"):
        assert (e.answer, e.otherwise) == ("unknown", turned_away)
    # evaluate's mistakes gallery captions what predict answered only where it is not the
    # class named.
    probs = np.eye(len(predictor.classes))[predictor.classes.index("unknown")]
    said = said_otherwise(predictor, Prediction("x.jpg", probs, probs, known_level=level))
    assert said == ("unknown" if turned_away else None)


def test_calibrate_unknown_refits_the_threshold_and_keeps_the_model(held_out_run, run_cli,
                                                                    tmp_path):
    import shutil

    run_dir, demo = held_out_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = json.loads((copy / "model" / "manifest.json").read_text())
    code, stdout, err = run_cli("calibrate", copy, "--unknown", "--unknown-rate", "0.3",
                                "--unknown-score", "msp+knn", "--quiet")
    assert code == 0, err
    after = json.loads((copy / "model" / "manifest.json").read_text())
    assert after["unknown"]["rate"] == 0.3 and after["unknown"]["score"] == "msp+knn"
    # The model and how it reads images are untouched (a CNN trained at 96 px keeps 96).
    assert after["preprocessing"] == before["preprocessing"]
    assert after["model"] == before["model"] and after["classes"] == before["classes"]
    known = Predictor(copy)
    assert known.unknown_score == "msp+knn"
    original = Predictor(run_dir)
    paths = sorted(str(p) for p in (demo / "azure_spotwing").glob("*.jpg"))[:12]
    a, b = list(known.run(paths, progress=False)), list(original.run(paths, progress=False))
    np.testing.assert_allclose([p.probs for p in a], [p.probs for p in b], atol=1e-5)
    # A higher rate turns away more known images than the default 5%.
    assert sum(p.known_level is None for p in a) >= sum(p.known_level is None for p in b)
    # Settings that cannot apply are refused before any image is read.
    for args, message in ((["--unknown", "--unknown-rate", "0"], "above 0 and below 1"),
                          (["--unknown", "--unknown-score", "mahalanobi"],
                           "No unknown score 'mahalanobi'. Hint: Did you mean 'mahalanobis'?"),
                          (["--unknown-rate", "0.3"], "only with --unknown"),
                          ([str(demo), "--unknown"], "it takes no DATA, --split or --map"),
                          (["--unknown", "--split", "test"], "it takes no DATA, --split or --map"),
                          (["--unknown", "--map", "a=b"], "it takes no DATA, --split or --map")):
        code, _, err = run_cli("calibrate", copy, *args, "--quiet")
        assert code == 2 and message in " ".join(err.split()), err
    assert json.loads((copy / "model" / "manifest.json").read_text()) == after
    # Without --unknown-rate the model keeps its own rate, as --help says.
    code, _, err = run_cli("calibrate", copy, "--unknown", "--unknown-score", "knn", "--quiet")
    assert code == 0, err
    refitted = json.loads((copy / "model" / "manifest.json").read_text())["unknown"]
    assert (refitted["rate"], refitted["score"]) == (0.3, "knn")
    rate = next(p for p in typer.main.get_command(app).commands["calibrate"].params
                if p.name == "unknown_rate")
    assert "(default: the model's own)" in rate.help


def test_the_rate_is_the_share_not_named_down_to_the_finest_level():
    """Levels cut each at 5% turn away nearly 4 x 5% of known images when their scores
    disagree; set together, 5% in all, and equal scores at two levels get one threshold."""
    from wingspan.models.unknown import level_thresholds

    rng = np.random.default_rng(0)
    same = rng.random(400)
    val = {"family": rng.random(400), "subfamily": same, "genus": same.copy(),
           "species": rng.random(400)}
    thresholds = level_thresholds(val, 0.05)
    turned_away = np.any([s > thresholds[lv] for lv, s in val.items()], axis=0).mean()
    assert 0.04 <= turned_away <= 0.05
    assert thresholds["subfamily"] == thresholds["genus"]
    each = {lv: np.quantile(s, 0.95) for lv, s in val.items()}
    assert np.any([s > each[lv] for lv, s in val.items()], axis=0).mean() > 0.1
    # On 11 val images (or 3) one would be 9% (33%): at 5%, none is turned away; at 10%
    # of 11, one level alone turns one away, and levels set together one at most.
    few = {"genus": rng.random(11), "species": rng.random(11)}
    for rate, most in ((0.05, 0), (0.1, 1)):
        thresholds = level_thresholds(few, rate)
        assert np.any([s > thresholds[lv] for lv, s in few.items()], axis=0).sum() <= most
        alone = level_thresholds({"species": few["species"]}, rate)["species"]
        assert (few["species"] > alone).sum() == most
    three = rng.random(3)
    assert level_thresholds({"label": three}, 0.05) == {"label": three.max() + 1e-6}
    # What train.log says to expect on new known images, from the same cut: 1 in 4 above
    # the highest of 3; on 400, the 381st of 400 sorted (19 val scores above it), 20 in 401.
    from wingspan.models.unknown import new_known_rate

    assert new_known_rate(3, 0.05) == 0.25 and new_known_rate(400, 0.05) == 20 / 401
    assert (same > level_thresholds({"label": same}, 0.05)["label"]).sum() == 19
    # One level: halfway from the val score at its 95th percentile to the next, at most 5%
    # above it; the val images either side of it keep their verdict when float rounding
    # (another engine, bf16) moves their scores by a millionth.
    cut = np.quantile(same, 0.95, method="higher")
    threshold = level_thresholds({"label": same}, 0.05)["label"]
    assert threshold == pytest.approx((cut + same[same > cut].min()) / 2)
    assert (same > threshold).mean() <= 0.05
    for nudge in (1 - 1e-6, 1 + 1e-6):
        assert ((same * nudge) > threshold).sum() == (same > threshold).sum()


def test_a_level_of_one_class_is_certain_exactly_so_no_rounding_decides():
    """`--levels order,family,species` with one order: its class holds every species, and
    the sum of their probabilities is 1 only to rounding (-1.2e-7 to 1.2e-7 of MSP over a
    run's val images). The combined score ranked that noise by its share of val, and the
    exported graph's rounding then disagreed with PyTorch's by 0.42 (export refused), and
    one photo was unknown on one engine and named on another."""
    from wingspan.models.unknown import _marginal_logits, branch_shares

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g) * 4
    members = {"order": torch.ones(7, 1), "family": torch.tensor(
        [[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1], [0, 1]], dtype=torch.float32)}
    for temperature in (1.0, 0.7):
        shares = branch_shares(logits, ["order", "family", "species"], members, temperature)
        assert torch.equal(shares["order"], torch.ones(500))
        assert (shares["family"] < 1).any()  # a level of more classes is as it was
        marginal = _marginal_logits({"order": None, "family": None, "species": logits},
                                    "species", members, temperature)
        assert torch.equal(marginal["order"], torch.zeros(500, 1))


def test_a_part_whose_val_scores_are_all_equal_leaves_the_combination_to_the_others():
    """MSP at a level of one class is exactly 0 for every image (see above). Counted as
    exceeding every val image (share 1), it made msp+knn a constant there, and that level
    turned away only images beyond every val image; it is now kNN's alone, in the bundle's
    PyTorch scores and the exported graph alike."""

    from wingspan.models.unknown import Combined

    g = torch.Generator().manual_seed(0)
    val_knn, new_knn = torch.rand(60, generator=g), torch.rand(40, generator=g) * 1.2
    both = Combined(("msp", "knn")).fit_val({"msp": np.zeros(60), "knn": val_knn.numpy()})
    alone = Combined(("knn",)).fit_val({"knn": val_knn.numpy()})
    scores = both.combine({"msp": torch.zeros(40), "knn": new_knn})
    assert torch.allclose(scores, alone.combine({"knn": new_knn}), atol=0.003)
    assert (scores > 0.95).float().mean() > 0.1  # the far ones stand out, as kNN's do
    graph = both.graph({"msp": _Column(0), "knn": _Column(1)})
    exported = graph(torch.stack([torch.zeros(40), new_knn], 1), None)
    assert torch.allclose(exported, scores, atol=1e-5)


def test_an_unknown_answer_is_not_shown_beside_the_closest_class_probability(held_out_run,
                                                                             run_cli):
    """predict's table read "unknown 1.000": the closest class's probability beside the
    answer unknown, as if surely unknown. It goes beside the closest class instead."""
    run_dir, demo = held_out_run
    code, out, err = run_cli("predict", run_dir, *sorted((demo / HELD).glob("*.jpg"))[:4])
    assert code == 0, err
    rows = [line.split("│") for line in out.splitlines() if "│ unknown " in line]
    assert rows and all(r[3].strip() == "-" for r in rows), out
    assert re.search(r"closest: \S+\s+[\d.]{5};", " ".join(out.split())) or \
        "closest:" in out, out  # (a narrow table wraps the name and its probability apart)


def test_a_val_image_scored_a_few_rounding_units_off_keeps_its_combined_score():
    """An image scored on a val score itself (a val image, scored again) counted that val
    image as exceeded; ONNX Runtime, whose softmax comes out a few rounding units lower,
    did not: its share fell by one val image, and a val image near the top went from
    "unknown" to a class. The share now steps halfway between val scores, in PyTorch and
    in the exported graph alike, so rounding either way leaves it where it was."""
    from torch import nn

    from wingspan.models.unknown import Combined

    g = torch.Generator().manual_seed(0)
    val = torch.rand(33, generator=g).float()
    val[5] = val[6]  # ties too (a saturated MSP)
    val[[0, 1]] = 0.0
    combined = Combined(("msp",)).fit_val({"msp": val.numpy()})
    exact = combined.combine({"msp": val})
    for off in (torch.nextafter(val, torch.full_like(val, -1.0)),
                torch.nextafter(val, torch.full_like(val, 2.0)), val * (1 - 3e-7)):
        assert torch.equal(combined.combine({"msp": off}), exact)

    class Column(nn.Module):
        def forward(self, features, logits):
            return features[:, 0]

    graph = combined.graph({"msp": Column()})
    for x in (val, torch.nextafter(val, torch.full_like(val, -1.0))):
        assert torch.allclose(graph(x[:, None], None), exact, atol=1e-6)
    # Crowded val scores, some a float32 step apart: each val image's share the same in
    # PyTorch (float64) and in the graph (float32), and as it was set.
    from wingspan.models.unknown import _steps

    for _ in range(20):
        crowded = (0.6 + 0.4 * torch.rand(5000, generator=g, dtype=torch.float64)).float()
        crowded = crowded.sort().values.double()
        steps = _steps(crowded)
        ours = torch.searchsorted(steps, crowded, right=True)
        assert torch.equal(ours, torch.searchsorted(crowded, crowded, right=True))
        graphs = (steps.float()[None, :] <= crowded.float()[:, None]).sum(-1)
        assert torch.equal(ours, graphs) and (steps.diff() >= 0).all()
    # A new image's share is as before, the val images at or below it, unless it lies
    # within STEP_SLACK of a val score (halfway throughout raised new images' shares by
    # half a val image on average, and the known images turned away with them).
    from wingspan.models.unknown import STEP_SLACK

    new = torch.rand(2000, generator=g, dtype=torch.float64)
    near = (new[:, None] - val.double()[None, :]).abs().min(1).values < 3 * STEP_SLACK
    steps = _steps(val.double().sort().values)
    assert torch.equal(torch.searchsorted(steps, new, right=True)[~near],
                       torch.searchsorted(val.double().sort().values, new, right=True)[~near])
    # Scores away from the val ones keep their order, and the extremes their share.
    probe = torch.linspace(-0.5, 1.5, 200)
    scores = combined.combine({"msp": probe})
    assert (scores.diff() >= 0).all() and scores[0] < 0.01 and scores[-1] > 0.99


def test_the_end_of_a_run_never_moves_the_live_models_head(demo_dir, tmp_path, monkeypatch):
    """The end of a run moved the model's own head to the CPU (.float().cpu() move a
    module in place) between the val and train passes with the final weights: on a GPU
    the train pass then met a head on the CPU and a backbone on the GPU, and every run
    whose best epoch was fine-tuned failed at its end (a resume too). Checked here through
    the modules .cpu() is called on, as this machine has one device."""
    from test_train import tiny

    import wingspan.training.finish as finish_module
    from wingspan.data import read_dataset
    from wingspan.training import train

    heads, moved, real_pass, real_cpu = [], [], finish_module._final_pass, torch.nn.Module.cpu
    monkeypatch.setattr(finish_module, "_final_pass",
                        lambda run: heads.append(run.model.head) or real_pass(run))
    monkeypatch.setattr(torch.nn.Module, "cpu",
                        lambda module, *a, **k: moved.append(module) or real_cpu(module, *a, **k))
    # (no head stage: the best model is fine-tuned, and the final passes run it afresh)
    train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=0, epochs_finetune=1), tmp_path
          / "runs", "r", quiet=True)
    assert len(heads) == 2  # val's pass and train's
    assert not any(m is heads[0] for m in moved)


def test_the_final_pass_for_the_unknown_scores_stops_at_the_images_they_are_fitted_on(
        demo_dir, tmp_path, monkeypatch):
    """The scores are fitted on MAX_FIT_IMAGES training images at most, drawn at random;
    training computed the features of every training image first, then kept that many (on
    ETHEC's 33k training images, a pass of which 85% was thrown away). The same images
    are drawn before the pass now, and only theirs computed."""
    import pandas as pd
    from test_train import tiny

    import wingspan.models.unknown as unknown
    import wingspan.training.finish as finish_module
    from wingspan.data import read_dataset
    from wingspan.models import load_bundle
    from wingspan.training import train

    monkeypatch.setattr(unknown, "MAX_FIT_IMAGES", 20)
    passes, real = [], finish_module.fixed_batches
    monkeypatch.setattr(finish_module, "fixed_batches",
                        lambda rows, *a, **k: passes.append(list(rows)) or real(rows, *a, **k))
    # (no head stage: the best model is fine-tuned, and the cached features cannot serve)
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=0, epochs_finetune=1,
                                                  seed=3), tmp_path / "runs", "r", quiet=True)
    _, _, detector = load_bundle(run_dir / "model", with_unknown=True)
    train_rows = [rows for rows in passes if len(rows) == 20]
    assert len(passes) == 2 and len(train_rows) == 1, [len(r) for r in passes]  # val, train
    split = pd.read_csv(run_dir / "splits.csv")
    assert (split["split"] == "train").sum() > 20
    # The 20 are the detector's own draw over the training images, and its bank theirs.
    assert train_rows[0] == unknown.fit_subset((split["split"] == "train").sum(), 3).tolist()
    assert len(detector.fitted["knn"]["label"].bank) == 20
    # `calibrate --unknown` fits again on the same images (it drew its own with pandas,
    # then training's draw with seed 0, whatever the run's).
    from wingspan.evaluate.own_images import own_images
    from wingspan.inference import Predictor

    again = own_images(Predictor(run_dir, workers=0), "fit", progress=False)["train"]
    trained = split.loc[split["split"] == "train", "path"].to_numpy()[train_rows[0]]
    assert [os.path.basename(p) for p in again.paths] == [os.path.basename(p) for p in trained]


def test_fpr95_counts_an_unseen_image_tied_with_the_cut_as_taken_for_known():
    """MSP saturates: float32 softmax gives exactly 0.0 to many confident images, known and
    unseen alike. The ROC curve keeps the unseen ones tied with the cut as known."""
    from sklearn.metrics import roc_curve

    from wingspan.evaluate.openset import separation

    known, unseen = np.r_[np.zeros(19), 1.0], np.array([0.0, 0.0, 1.0, 1.0])
    fpr, tpr, _ = roc_curve(np.r_[np.ones(20), np.zeros(4)], -np.r_[known, unseen])
    assert separation(known, unseen)["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    assert separation(known, unseen)["fpr95"] == 0.5


def test_levels_set_together_turn_away_as_many_as_the_rate_allows():
    """The search takes the largest share whose images stay within the target: not one
    that turns away fewer known images than some other share allowed."""
    from wingspan.models.unknown import level_thresholds

    rng = np.random.default_rng(1)
    val, rate = {"genus": rng.random(40), "species": rng.random(40)}, 0.1

    def away(t):
        return int(np.any([s > t[lv] for lv, s in val.items()], axis=0).sum())

    def alone(share):
        return {lv: level_thresholds({lv: s}, share)[lv] for lv, s in val.items()}

    target = max(int((s > alone(rate)[lv]).sum()) for lv, s in val.items())
    best = max(a for share in np.linspace(0, rate, 401) if (a := away(alone(share))) <= target)
    assert away(level_thresholds(val, rate)) == best
