import json
import os
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wingspan.evaluate import plots
from wingspan.evaluate.calibration import (
    bound_warning,
    calibration_record,
    expected_calibration_error,
    fit_temperature,
    reliability,
    softmax,
)
from wingspan.evaluate.metrics import (
    classification_metrics,
    confidence_intervals,
    confusion,
    interval_text,
    most_confused,
    per_class_table,
    resampled_macro_f1,
    stratified_resamples,
)


def probs_for(pred, truth, n):
    """Predicted class 0.6, the true class (when wrong) 0.3, the rest share 0.1 unevenly."""
    probs = np.tile(np.linspace(0.06, 0.04, n), (len(pred), 1))
    probs[np.arange(len(pred)), truth] = 0.3
    probs[np.arange(len(pred)), pred] = 0.6
    return probs / probs.sum(1, keepdims=True)


def test_metrics_on_hand_made_predictions():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, probs_for(pred, y, 4), ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class (P, R, F1): a (1/2, 1/2, 1/2), b (2/3, 1, 4/5), c (1, 1/2, 2/3)
    assert m["macro"]["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["macro"]["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["macro"]["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert m["micro"]["f1"] == pytest.approx(4 / 6)
    assert m["weighted"]["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)  # equal supports
    # kappa: observed 2/3, chance (2*2 + 2*3 + 2*1) / 36 = 1/3 -> (2/3 - 1/3) / (2/3) = 1/2
    assert m["cohen_kappa"] == pytest.approx(0.5)
    assert m["top3_accuracy"] == pytest.approx(1.0)  # the true class is always in the top 3
    # The per-class table lists the classes the macro averages cover: d, neither true nor
    # predicted, is in neither.
    table = per_class_table(y, pred, ["a", "b", "c", "d"])
    assert table["class"].tolist() == ["a", "b", "c"] and table["support"].tolist() == [2, 2, 2]
    assert table["f1"].round(4).tolist() == [0.5, 0.8, 0.6667]
    assert m["macro"]["f1"] == pytest.approx(table["f1"].mean())
    # One class everywhere: no kappa to give, and null (not NaN) in metrics.json, without
    # scikit-learn's warning on the user's terminal ("-" in the summary says it).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = classification_metrics(np.zeros(4, int), probs_for(np.zeros(4, int),
                                                                 np.zeros(4, int), 2), ["a", "b"])
    assert one["cohen_kappa"] is None and json.dumps(one, allow_nan=False)
    # Over the classes of y_true (truth_only), micro still counts every mistake.
    mapped = classification_metrics(y, probs_for(np.array([0, 3, 1, 1, 2, 2]), y, 4),
                                    ["a", "b", "c", "d"], truth_only=True)
    assert mapped["micro"]["precision"] == pytest.approx(mapped["accuracy"]) == 5 / 6
    # d, predicted once but never true: in the table (precision 0) as in the macro
    # averages, unless they cover the true classes alone (other data's evaluation).
    wrong_d = np.array([0, 3, 1, 1, 2, 2])
    for truth_only, listed in ((False, ["a", "b", "c", "d"]), (True, ["a", "b", "c"])):
        table = per_class_table(y, wrong_d, ["a", "b", "c", "d"], truth_only)
        m = classification_metrics(y, probs_for(wrong_d, y, 4), ["a", "b", "c", "d"],
                                   truth_only=truth_only)
        assert table["class"].tolist() == listed
        assert m["macro"]["f1"] == pytest.approx(table["f1"].mean())
        assert m["macro"]["precision"] == pytest.approx(table["precision"].mean())


def noisy_predictions(n: int, classes: int, right: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return y, np.where(rng.random(n) < right, y, rng.integers(0, classes, n))


@pytest.mark.parametrize("truth_only", [False, True])
def test_batched_macro_f1_is_scikit_learns(truth_only):
    """The bootstrap's macro-F1, many resamples at once, is f1_score's on each resample
    (some resamples miss a class, or predict one the truth lacks)."""
    from sklearn.metrics import f1_score

    y, p = noisy_predictions(60, 9, 0.7)
    rows = np.random.default_rng(1).integers(0, 60, (20, 60))
    expected = [f1_score(y[r], p[r], average="macro", zero_division=0,
                         labels=np.unique(y[r]) if truth_only else None) for r in rows]
    np.testing.assert_allclose(resampled_macro_f1(y[rows], p[rows], 9, truth_only), expected)
    np.testing.assert_allclose(resampled_macro_f1(y[rows].T, p[rows].T, 9, truth_only, axis=0),
                               expected)
    assert np.isnan(resampled_macro_f1(np.zeros((3, 0), int), np.zeros((3, 0), int), 9)).all()


def test_intervals_hold_the_figure_and_narrow_with_more_images():
    y, p = noisy_predictions(200, 6, 0.85)
    m = classification_metrics(y, probs_for(p, y, 6), list("abcdef"))
    interval = m["interval"]
    assert interval["accuracy"][0] < m["accuracy"] < interval["accuracy"][1]
    assert interval["macro_f1"][0] < m["macro"]["f1"] < interval["macro_f1"][1]
    # Four times the images at the same error rate: about half as wide (1 / sqrt(4)).
    y4, p4 = noisy_predictions(800, 6, 0.85, seed=1)
    for name in ("accuracy", "macro_f1"):
        wide, narrow = (np.diff(confidence_intervals(a, b, 6)[name])[0]
                        for a, b in ((y, p), (y4, p4)))
        assert 0.35 < narrow / wide < 0.7, name
    # Right on every one of 33 images is no proof of 100%: accuracy's exact binomial
    # interval reaches down to 0.894 (a bootstrap stayed at 1.000-1.000); macro-F1's
    # bootstrap cannot move, and says so.
    all_right = classification_metrics(y[:33], probs_for(y[:33], y[:33], 6), list("abcdef"))
    low, high = all_right["interval"]["accuracy"]
    assert high == 1.0 and 0.88 < low < 0.9
    assert all_right["interval"]["macro_f1"] is None  # ([1.0, 1.0] read as certainty)
    assert "CI 0.894-1.000" in interval_text(all_right, "accuracy")
    assert "no resample of the images moves it" in interval_text(all_right, "macro_f1")
    # One image has an accuracy interval still (the README promises one), no macro-F1's.
    one = classification_metrics(y[:1], probs_for(y[:1], y[:1], 6), list("abcdef"))
    assert one["interval"]["accuracy"] == [pytest.approx(0.025), 1.0]
    assert "macro_f1" not in one["interval"] and interval_text(one, "macro_f1") == ""
    assert "CI 0.025-1.000" in interval_text(one, "accuracy")


def test_macro_f1_interval_is_centred_on_a_long_tail():
    """Classes of one image, each answered wrong, stay in every resample (images are drawn
    within their class): a resample of all images at once missed a third of them, and the
    figure sat at the bottom of its own interval (ETHEC's long tail)."""
    rng = np.random.default_rng(0)
    y = np.concatenate([np.repeat(np.arange(20), 30), np.arange(20, 40)])
    p = np.where((y < 20) & (rng.random(len(y)) < 0.9), y, rng.integers(0, 20, len(y)))
    p[y >= 20] = rng.integers(0, 20, 20)  # every rare image wrong
    m = classification_metrics(y, probs_for(p, y, 40), [str(c) for c in range(40)])
    low, high = m["interval"]["macro_f1"]
    assert 0.3 < (m["macro"]["f1"] - low) / (high - low) < 0.7, (low, m["macro"]["f1"], high)
    # One image a class, some wrong: no resample moves the figure, which is not certainty.
    few = classification_metrics(np.arange(20), probs_for(np.r_[np.arange(12), [0] * 8],
                                                          np.arange(20), 20),
                                 [str(c) for c in range(20)])
    assert "macro_f1" not in few["interval"] and few["interval"]["accuracy"][1] < 0.9
    rows = stratified_resamples(y, 50, rng)
    np.testing.assert_array_equal(np.sort(y[rows], axis=1), np.tile(np.sort(y), (50, 1)))


def test_a_macro_f1_with_no_interval_or_a_narrow_one_says_why():
    """A model that answers one class for every image, and 30 classes of one test image
    each: the macro-F1 came with no interval and no word; 5 of 8 classes of one image each
    gave "0.096-0.330", too narrow, unsaid."""
    y = np.repeat(np.arange(4), 10)
    one_answer = classification_metrics(y, probs_for(np.zeros(40, int), y, 4), list("abcd"))
    said = interval_text(one_answer, "macro_f1")
    assert "no resample of the images moves it: the model gave every image of a class the " \
        "same answer" in said and "1-2 images" not in said
    singles = classification_metrics(np.arange(30), probs_for(np.r_[np.arange(10), [0] * 20],
                                                              np.arange(30), 30),
                                     [str(c) for c in range(30)])
    assert "no resample" in interval_text(singles, "macro_f1")
    assert "30 of its 30 classes have 1-2 images here" in interval_text(singles, "macro_f1")
    rng = np.random.default_rng(0)
    y = np.r_[np.repeat(np.arange(3), 20), np.arange(3, 8)]
    p = np.where(rng.random(len(y)) < 0.7, y, rng.integers(0, 8, len(y)))
    mixed = classification_metrics(y, probs_for(p, y, 8), list("abcdefgh"))
    assert re.search(r"\(95% CI [\d.]+-[\d.]+; 5 of its \d classes have 1-2 images here, "
                     r"whose chance it leaves out: too few to judge them\)$",
                     interval_text(mixed, "macro_f1"))
    assert "1-2 images" not in interval_text(mixed, "accuracy")
    # A class only answered (no image here) is no class of 1-2 images
    y = np.repeat([0, 1, 2], 30)
    p = np.where(np.random.default_rng(0).random(90) < 0.25, 3, y)
    answered = classification_metrics(y, probs_for(p, y, 4), list("abcd"))
    assert "1-2 images" not in interval_text(answered, "macro_f1")


def test_per_level_macro_on_other_data_averages_the_classes_it_holds():
    """As the top-level figure does (`truth_only`): data holding only species a, predicted
    a, a, b, c, has a species macro-F1 of a's alone (2/3), not a's over three classes."""
    from wingspan.data.taxonomy import Taxonomy
    from wingspan.evaluate.hierarchy import hierarchical_metrics

    taxonomy = Taxonomy.from_table(pd.DataFrame({"path": ["1", "2", "3"],
                                                 "family": ["F1", "F1", "F2"],
                                                 "label": ["a", "b", "c"]}), ["family", "label"])
    probs = np.eye(3)[[0, 0, 1, 2]] * 0.9 + 0.1 / 3
    truth = {"family": np.zeros(4, int), "label": np.zeros(4, int)}
    for truth_only, want in ((True, 2 / 3), (False, 2 / 9)):
        levels = hierarchical_metrics(taxonomy, truth, probs, None, np.zeros(4, bool),
                                      truth_only, temperature=1.0)["levels"]
        assert levels["label"]["macro_f1"] == pytest.approx(want)
        flat = classification_metrics(truth["label"], probs, ["a", "b", "c"],
                                      truth_only=truth_only)
        assert flat["macro"]["f1"] == pytest.approx(want)


def test_top_k_and_confusion():
    y = np.array([0, 1, 2, 3])
    probs = np.array([[0.15, 0.5, 0.3, 0.05], [0.6, 0.3, 0.06, 0.04],
                      [0.1, 0.05, 0.15, 0.7], [0.7, 0.1, 0.15, 0.05]])
    m = classification_metrics(y, probs, list("abcd"))
    assert m["accuracy"] == 0.0
    assert m["top3_accuracy"] == pytest.approx(3 / 4)  # class 3 is last for the 4th image
    # An answer that is not the top class (a taxonomy's branch) ranks first: top-3 ranked
    # by the finest head alone came out below accuracy (1.0 against 0.0 here).
    branch = np.array([0, 1, 2, 3])
    m = classification_metrics(y, probs, list("abcd"), y_pred=branch)
    assert m["accuracy"] == 1.0 and m["top3_accuracy"] == 1.0
    m = classification_metrics(y, probs, list("abcd"), y_pred=np.array([3, 3, 3, 0]))
    assert m["top3_accuracy"] == pytest.approx(2 / 4)  # the answer, then the two likeliest
    cm = confusion(y, probs.argmax(1), 4)
    assert cm.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    with warnings.catch_warnings():  # a level of one class: its matrix, and no warning
        warnings.simplefilter("error")
        assert confusion(np.zeros(3, int), np.zeros(3, int), 1).tolist() == [[3]]
    pairs = most_confused(cm, list("abcd"))
    assert {(p["true"], p["predicted"]) for p in pairs} == {("a", "b"), ("b", "a"), ("c", "d"),
                                                            ("d", "a")}


def test_ece_by_hand():
    # Two bins used: confidence 0.9 (4 images, 3 right) and 0.6 (2 images, both right).
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    y = np.array([0, 0, 0, 1, 0, 0])
    expected = 4 / 6 * abs(0.75 - 0.9) + 2 / 6 * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, y) == pytest.approx(expected)
    # The class answered need not be the top one (a taxonomy's branch): its probability and
    # whether it is right are what is binned. Answering class 1 on the last two: 0.4, wrong.
    answered = np.array([0, 0, 0, 0, 1, 1])
    expected = 4 / 6 * abs(0.75 - 0.9) + 2 / 6 * abs(0.0 - 0.4)
    assert expected_calibration_error(probs, y, y_pred=answered) == pytest.approx(expected)
    diagram = reliability(probs, y, y_pred=answered)
    assert diagram["counts"].sum() == 6
    assert diagram["confidence"][diagram["counts"] == 2] == pytest.approx([0.4])


def test_temperature_scaling_fixes_an_overconfident_model():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4000, 5))
    y = np.array([rng.choice(5, p=p) for p in softmax(logits)])  # calibrated at T = 1
    overconfident = logits * 3
    before = expected_calibration_error(softmax(overconfident), y)
    t = fit_temperature(overconfident, y)
    after = expected_calibration_error(softmax(overconfident, t), y)
    assert t == pytest.approx(3, rel=0.15)
    assert after < before / 3
    assert (softmax(overconfident, t).argmax(1) == overconfident.argmax(1)).all()


def test_a_val_split_with_no_mistake_gets_the_rule_of_successions_confidence():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 98)
    logits = rng.normal(0, 1, (98, 4))
    logits[np.arange(98), y] += 5
    assert (logits.argmax(1) == y).all()  # every image right
    t = fit_temperature(logits, y)
    # Not the bound the likelihood runs off to, but the T that makes the mean top
    # probability 99 / 100 (98 right of 98).
    assert 0.25 < t < 10
    assert softmax(logits, t).max(1).mean() == pytest.approx(99 / 100, abs=1e-6)
    record = calibration_record(logits, y, "val")
    assert record["temperature"] == t and record["method"].startswith("rule of succession")
    logits[0] = 0
    logits[0, (y[0] + 1) % 4] = 1  # one mistake: the likelihood has its own optimum
    assert fit_temperature(logits, y) != pytest.approx(t, abs=1e-3)
    assert calibration_record(logits, y, "val")["method"] == "likelihood"


def test_a_temperature_stopped_at_its_bound_is_said():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    calibrated = calibration_record(rng.normal(0, 2, (400, 5)) + 3 * np.eye(5)[y], y, "val")
    assert not calibrated["at_bound"] and bound_warning(calibrated) is None
    # Sure of itself and right by chance only: the likelihood wants T far past 10.
    guessing = calibration_record(rng.normal(0, 60, (400, 5)), y, "val")
    assert guessing["temperature"] == 10.0 and guessing["at_bound"]
    assert "upper bound" in bound_warning(guessing) and "too sure" in bound_warning(guessing)
    timid = calibration_record(0.01 * (np.eye(5)[y] - 0.5), y, "val")  # right, barely sure
    assert timid["temperature"] == 0.25 and "lower bound" in bound_warning(timid)
    # What to paste: other labelled photos (`calibrate RUN` alone refits on the same val,
    # stops at the same bound, and said the same again).
    said = " ".join(bound_warning(timid).split())
    assert "`wingspan calibrate RUN DATA` (run.calibrate(data) in Python) fits it again on " \
        "other labelled photos" in said


def test_the_calibration_record_bins_the_class_answered_as_evaluate_does():
    from wingspan.data.taxonomy import Taxonomy

    # Genus A holds a1-a3, genus B b1 alone: b1 can be the top species while A is the
    # likelier genus, and then the answer (top-down) is an A species.
    tree = Taxonomy(["genus", "species"], {"genus": ["A", "B"],
                                           "species": ["a1", "a2", "a3", "b1"]},
                    {"genus": [0, 0, 0, 1], "species": [0, 1, 2, 3]})

    def answer(probs, t=1.0):  # for probabilities at temperature t
        return tree.predict(probs, temperature=t)[tree.finest]

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, (300, 4)) + np.array([0, 0, 0, 1.2])
    y = rng.integers(0, 4, 300)
    assert (answer(softmax(logits)) != softmax(logits).argmax(1)).any()
    record = calibration_record(logits, y, "val", answer=answer)
    assert record["temperature"] != pytest.approx(1.0, abs=0.05)
    for key, t in (("val_ece_before", 1.0), ("val_ece_after", record["temperature"])):
        probs = softmax(logits, t)
        assert record[key] == pytest.approx(
            expected_calibration_error(probs, y, y_pred=answer(probs, t)))
    assert record["val_ece_before"] != pytest.approx(
        calibration_record(logits, y, "val")["val_ece_before"])


@pytest.mark.parametrize("n", [6, 45, 500])
def test_confusion_plot_for_few_and_many_classes(tmp_path, n, monkeypatch):
    rng = np.random.default_rng(0)
    y = rng.integers(0, n, 3000)
    pred = np.where(rng.random(3000) < 0.7, y, rng.integers(0, n, 3000))
    drawn = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    names = [f"species {i}" for i in range(n)]
    path = plots.plot_confusion(confusion(y, pred, n), names, tmp_path / "cm.png")
    with Image.open(path) as im:
        assert 400 < im.width < 1500 and 300 < im.height < 1500
    ax = drawn[0].axes[0]
    # Named up to 60 classes (a student's 40 species could not be told apart unnamed),
    # counted in the cells up to 30; unnamed above, sorted by size where sizes differ.
    assert [t.get_text() for t in ax.get_yticklabels()] == (names if n <= 60 else [])
    assert bool(ax.texts) == (n <= 30)
    assert ("sorted by number of images" in ax.get_title()) == (n > 60)
    equal = np.repeat(np.arange(70), 3)
    plots.plot_confusion(confusion(equal, equal, 70), [str(i) for i in range(70)],
                         tmp_path / "eq.png")
    assert drawn[-1].axes[0].get_title() == "70 classes, in confusion.csv's order"
    # Classes neither in the data nor answered are no blank rows of the picture: said.
    cm = confusion(equal, equal, 80)
    plots.plot_confusion(cm, [str(i) for i in range(80)], tmp_path / "some.png")
    assert drawn[-1].axes[0].get_title() == ("70 classes, in confusion.csv's order\n(10 more "
                                             "with no images here and no answers left out)")
    assert drawn[-1].axes[0].images[0].get_array().shape == (70, 70)


def test_a_taxonomys_confusion_plot_keeps_each_family_together(tmp_path, monkeypatch):
    """300 species of 6 families: sorted by frequency, a genus's species lay scattered over
    the matrix and a family's confusions made no block; down the tree, each family is one
    run of rows, named at its middle, lines between."""
    from wingspan.data.taxonomy import Taxonomy
    from wingspan.evaluate.hierarchy import confusion_tree

    rng = np.random.default_rng(0)
    n = 300
    species = [f"G{i % 50} s{i}" for i in range(n)]  # (a genus's species far apart by name)
    table = pd.DataFrame({"path": species, "family": [f"F{i % 50 % 6}" for i in range(n)],
                          "genus": [f"G{i % 50}" for i in range(n)], "species": species})
    taxonomy = Taxonomy.from_table(table, ["family", "genus", "species"])
    y = rng.integers(0, n, 3000) ** 2 // n  # (sizes differ: the frequency order applied)
    drawn = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    cm = confusion(y, y, n)
    plots.plot_confusion(cm, taxonomy.classes["species"], tmp_path / "cm.png",
                         tree=confusion_tree(taxonomy, "species"))
    ax = drawn[-1].axes[0]
    assert "grouped by family" in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == taxonomy.classes["family"]
    # The same order both ways (the diagonal is the diagonal), each family one run of
    # rows: the lines lie where the families' sizes add up.
    kept = np.flatnonzero(cm.sum(1))
    assert np.allclose(np.asarray(ax.images[0].get_array()), np.eye(len(kept)))
    sizes = np.bincount(taxonomy.parents["family"][kept], minlength=6)
    edges = sorted({line.get_ydata()[0] for line in ax.lines if line.get_ydata()[0]
                    == line.get_ydata()[1]})
    assert edges == list(np.cumsum(sizes)[:-1] - 0.5) and len(ax.lines) == 2 * 5
    assert confusion_tree(taxonomy, "family") is None


def test_class_names_with_dollars_are_drawn_as_written(tmp_path, monkeypatch):
    """matplotlib reads "$...$" as mathematics: a folder "$\\foo$" stopped `data inspect`
    and `evaluate` with a parse error, and "price $5-$10" was drawn as "price 5 - 10". The
    user's own figures keep mathematics."""
    import matplotlib

    from wingspan.data.plots import plot_class_balance
    from wingspan.explain import save_overlay

    names = ["$\\foo$", "price $5-$10", "plain"]
    drawn = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    cm = confusion(np.arange(3).repeat(4), np.arange(3).repeat(4), 3)
    plots.plot_confusion(cm, names, tmp_path / "cm.png")
    assert [t.get_text() for t in drawn[0].axes[0].get_yticklabels()] == names
    plot_class_balance(pd.Series([5, 4, 3], index=names), "label", tmp_path / "b.png")
    assert save_overlay(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), names[0], None)
    assert matplotlib.rcParams["text.parse_math"]


def test_drawing_leaves_the_users_backend_and_figures_alone(tmp_path):
    """Importing wingspan chose the Agg backend for the whole process: a script's own
    `plt.show()` windows stopped opening, and its plots went nowhere. Drawing now neither
    changes the backend nor adds to, or closes, the user's pyplot figures."""
    import subprocess
    import sys

    script = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
mine = plt.figure()
from pathlib import Path
import numpy as np, pandas as pd, wingspan, wingspan.explain
from wingspan.data.plots import plot_class_balance
from wingspan.evaluate import plots
plots.plot_confusion(np.eye(3, dtype=int), list("abc"), Path(r"{tmp_path}") / "cm.png")
plot_class_balance(pd.Series([3, 2], index=["a", "b"]), "label", Path(r"{tmp_path}") / "b.png")
print(matplotlib.get_backend(), plt.get_fignums(), plt.fignum_exists(mine.number))
"""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "[1]", "True"]
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_long_class_names_leave_the_confusion_matrix_its_room(tmp_path, monkeypatch):
    """Full names of ~50 characters as tick labels left the matrix ~70 px wide: they are
    cut in the middle, as the mistakes' captions are, and the matrix keeps its size."""
    drawn = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    names = [f"Aglais urticae (Linnaeus, 1758) - small tortoiseshell {i}" for i in range(4)]
    cm = confusion(np.arange(4).repeat(5), np.arange(4).repeat(5), 4)
    plots.plot_confusion(cm, names, tmp_path / "long.png")
    plots.plot_confusion(cm, [str(i) for i in range(4)], tmp_path / "short.png")
    ticks = [t.get_text() for t in drawn[0].axes[0].get_yticklabels()]
    assert all(len(t) <= 34 for t in ticks) and ticks[0].endswith("shell 0")
    assert len(set(ticks)) == 4  # still told apart (by their ends)
    (long_box, short_box) = (f.axes[0].get_position().width for f in drawn)
    assert long_box > 0.6 * short_box


def test_names_alike_but_for_their_middle_stay_apart_in_every_figure(tmp_path, monkeypatch):
    """Three subspecies of one genus and subgenus, cut in the middle, all read 'Polyommatus
    (Lysa… ssp. punctifera': one label for three rows of the matrix, for three captions
    of the gallery, and for three bars of the balance chart."""
    from wingspan.data.plots import plot_class_balance

    drawn = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    names = [f"Polyommatus (Lysandra) {s} ssp. punctifera" for s in
             ("bellargus", "icarus", "dorylas")] + ["Vanessa cardui"]
    cm = confusion(np.arange(4).repeat(3), np.roll(np.arange(4).repeat(3), 1), 4)
    plots.plot_confusion(cm, names, tmp_path / "cm.png")
    ticks = [t.get_text() for t in drawn[0].axes[0].get_yticklabels()]
    assert len(set(ticks)) == 4 and ticks[3] == "Vanessa cardui", ticks
    for name, tick in zip(names, ticks, strict=True):  # each its own name, cut
        start, _, end = tick.partition("…")
        assert name.startswith(start) and name.endswith(end) and len(tick) < len(name) + 1
    mistakes = [{"path": str(tmp_path / "gone.jpg"), "true": t, "predicted": p,
                 "probability": 0.9} for t, p in zip(names, names[1:] + names[:1], strict=True)]
    plots.plot_mistakes(mistakes, tmp_path / "m.png")
    titles = [ax.get_title() for ax in drawn[1].axes if ax.get_title()]
    assert len({t.split("\n")[0] for t in titles}) == 4, titles
    balance = plot_class_balance(pd.Series([5, 4, 3, 2], index=names), "label",
                                 tmp_path / "b.png")
    assert balance.is_file()


def test_a_matrix_of_classes_left_out_below_the_name_limit_is_named(tmp_path, monkeypatch):
    """62 classes, 7 of them with no images and no answers: the 55 drawn were unnamed, the
    choice made on the 62 before the empty ones were dropped."""
    drawn = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    seen = np.arange(55).repeat(2)
    names = [f"species {i}" for i in range(62)]
    plots.plot_confusion(confusion(seen, seen, 62), names, tmp_path / "cm.png")
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == names[:55]
    assert ax.get_title() == "(7 more with no images here and no answers left out)"


def test_the_unknown_histogram_splits_its_bars_at_the_threshold(tmp_path, monkeypatch):
    """Scores right of the threshold drew in a bar that lay mostly left of the line: the
    threshold is a bin edge now, so every bar is on the side its images' answer is."""
    drawn = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    rng = np.random.default_rng(0)
    known = np.concatenate([rng.uniform(0.2, 0.99, 60), [0.9995, 0.9996]])
    unseen = rng.uniform(0.9996, 0.9998, 8)
    threshold = 0.99921
    plots.plot_unknown_scores(known, unseen, threshold, "msp+knn", tmp_path / "u.png")
    for bar in drawn[0].axes[0].patches:
        if bar.get_height() > 0:
            left, right = bar.get_x(), bar.get_x() + bar.get_width()
            assert right <= threshold + 1e-12 or left >= threshold - 1e-12, (left, right)
    # and what lies right of it is seen: a bar of an ordinary bin's width at least (the 10
    # images there drew a bar 0.0001 wide, under the line), the counts in the legend
    ax = drawn[0].axes[0]
    right = [b for b in ax.patches if b.get_height() > 0 and b.get_x() >= threshold - 1e-12]
    span = ax.get_xlim()[1] - ax.get_xlim()[0]
    assert right and max(b.get_width() for b in right) > span / 60
    assert sum(b.get_height() for b in right) == 10
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["known classes (62; 2 right of the line)",
                          "unseen classes (8; 8 right of the line)"], legend
    # a threshold above the top quantile kept them left of it, clipped there
    drawn.clear()
    plots.plot_unknown_scores(known, np.full(3, 0.99999), 0.99998, "msp+knn", tmp_path / "v.png")
    bars = [b for b in drawn[0].axes[0].patches if b.get_height() > 0]
    assert sum(b.get_height() for b in bars if b.get_x() >= 0.99998 - 1e-12) == 3


def test_curves_mistakes_and_reliability_plots(tmp_path, demo_dir):
    history = pd.DataFrame({
        "stage": ["head"] * 3 + ["finetune"] * 2, "epoch": [1, 2, 3, 1, 2],
        **{f"{s}_{m}": np.linspace(0.5, 0.9, 5) for s in ("train", "val")
           for m in ("loss", "acc", "macro_f1")}})
    curves = plots.plot_curves(history, tmp_path / "curves.png")
    # The epoch the model was kept from is marked; an epoch the history lacks marks nothing.
    marked = plots.plot_curves(history, tmp_path / "kept.png", {"stage": "head", "epoch": 2})
    none = plots.plot_curves(history, tmp_path / "none.png", {"stage": "head", "epoch": 9})
    assert marked.read_bytes() != curves.read_bytes() == none.read_bytes()
    images = sorted(demo_dir.rglob("*.jpg"))[:7]
    mistakes = plots.plot_mistakes([{"path": str(p), "true": "a", "predicted": "b",
                                     "probability": 0.9} for p in images], tmp_path / "m.png")
    # With the model's view and its Grad-CAM: the view in its own colours, and beside it
    # the same under the heat map.
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    heat = np.linspace(0, 1, 1600).reshape(40, 40)
    pair = plots._side_by_side(pixels, heat)
    assert pair.shape[0] == 40 and pair.shape[1] > 80
    np.testing.assert_allclose(pair[:, :40], pixels / 255.0)
    assert not np.allclose(pair[:, -40:], pixels / 255.0)
    plots.plot_mistakes([{"path": "gone.jpg", "true": "a", "predicted": "b",
                          "probability": 0.9, "pixels": pixels, "heatmap": heat}],
                        tmp_path / "pair.png")
    told = {"true": "a", "predicted": "b", "probability": 0.9}
    assert "answered" not in plots.mistake_title(told)
    assert "answered" not in plots.mistake_title({**told, "answer": None})  # b was told
    # (given only where predict answered otherwise: a class may be named "unknown")
    assert plots.mistake_title({**told, "predicted": "unknown", "answer": "unknown"}
                               ).endswith("answered unknown")
    # Long names that differ at their end stay told apart.
    long = {"true": "class_with_a_longish_name_00", "predicted": "class_with_a_very_long"
            "ish_name_that_goes_on_35", "probability": 0.9}
    title = plots.mistake_title(long)
    assert "class_with_a_longish_name_00" in title and title.split("\n")[1].endswith("on_35")
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(0, 2, (200, 4)))
    y = rng.integers(0, 4, 200)
    rel = plots.plot_reliability(reliability(probs, y), reliability(probs, y), (0.1, 0.05),
                                 tmp_path / "r.png")
    for path, min_w in [(curves, 1000), (mistakes, 800), (rel, 600)]:
        with Image.open(path) as im:
            assert im.width >= min_w and im.height >= 250
            assert np.asarray(im.convert("L")).std() > 5  # something is drawn


def test_rows_without_a_truth_at_a_level_are_left_out_of_its_figures_only():
    """A blank genus (truth -1) is no class of its own that drags the genus macro-F1 down
    and counts as a genus mistake: that level leaves the row out and says how many; the
    other levels still score it."""
    from wingspan.data.taxonomy import Taxonomy
    from wingspan.evaluate.hierarchy import hierarchical_metrics

    taxonomy = Taxonomy.from_table(pd.DataFrame({"path": ["1", "2", "3"],
                                                 "genus": ["G1", "G1", "G2"],
                                                 "label": ["a", "b", "c"]}), ["genus", "label"])
    probs = np.eye(3)[[0, 1, 2, 2]] * 0.9 + 0.1 / 3  # right on every image
    truth = {"genus": np.array([0, 0, 1, -1]), "label": np.array([0, 1, 2, 2])}
    result = hierarchical_metrics(taxonomy, truth, probs, None, np.zeros(4, bool),
                                  temperature=1.0)
    genus, label = result["levels"]["genus"], result["levels"]["label"]
    assert genus["macro_f1"] == genus["accuracy"] == 1.0 and genus["no_truth"] == 1
    assert label["macro_f1"] == 1.0 and "no_truth" not in label
    assert result["mistake_depth"] == {"0": 4}  # as metrics.json has it
    # Marginals stay probabilities however float sums round.
    assert taxonomy.marginals(np.array([[0.5, 0.5 + 1e-9, 0.0]]))["genus"].max() == 1.0


def test_ece_counts_images_answered_with_probability_exactly_1():
    """float32 softmax of a confident model is 1.0 exactly: such an image, wrong, is the
    worst miscalibration there is, not one left out of every bin."""
    from wingspan.evaluate.calibration import expected_calibration_error

    probs = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert expected_calibration_error(probs, np.array([1, 0])) == pytest.approx(0.5)


def test_reliability_bins_an_edge_as_the_ece_does():
    """(lo, hi] bins in both: the diagram and the ECE beside it count the same images."""
    from wingspan.evaluate.calibration import reliability

    counts = reliability(np.array([[0.5, 0.5]]), np.array([0]), bins=10)["counts"]
    assert counts[4] == 1  # (0.4, 0.5]


def test_stratified_resamples_can_draw_every_image_of_a_class():
    from wingspan.evaluate.metrics import stratified_resamples

    y = np.array([0, 0, 0, 1, 1])
    rows = stratified_resamples(y, 200, np.random.default_rng(0))
    assert set(rows.ravel().tolist()) == {0, 1, 2, 3, 4}
    assert (y[rows] == y).all()  # each slot stays in its class


def test_the_macro_f1_interval_is_the_central_95_percent_of_its_bootstrap():
    from wingspan.evaluate.metrics import (
        confidence_intervals,
        resampled_macro_f1,
        stratified_resamples,
    )

    y = np.repeat([0, 1, 2], 10)
    p = y.copy()
    p[[0, 1, 12, 25]] = [1, 2, 0, 1]
    ci = confidence_intervals(y, p, 3, seed=0)
    rows = stratified_resamples(y, 1000, np.random.default_rng(0))
    f1 = resampled_macro_f1(y[rows], p[rows], 3, counted=np.ones(3, bool))
    assert ci["macro_f1"] == pytest.approx(list(np.quantile(f1, [0.025, 0.975])))


def test_most_confused_share_is_of_the_true_class():
    from wingspan.evaluate.metrics import most_confused

    pairs = most_confused(np.array([[8, 2], [0, 5]]), ["a", "b"])
    assert pairs == [{"true": "a", "predicted": "b", "count": 2, "share_of_true": 0.2}]


def test_most_confused_orders_its_ties_and_the_report_says_how_many_it_shows(tmp_path):
    """47 pairs of one image each: 15 listed in no order, as if the most confused, and
    a 0.40 share before a 0.50 one."""
    from wingspan.evaluate.metrics import confused_pairs, most_confused
    from wingspan.evaluate.report import write_report

    # a: 5 images, 2 taken for b; b: 4, 2 taken for c; c: 2, 1 for a and 1 for b
    cm = np.array([[3, 2, 0], [0, 2, 2], [1, 1, 0]])
    pairs = most_confused(cm, list("abc"))
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("b", "c", 2), ("a", "b", 2), ("c", "a", 1), ("c", "b", 1)]  # (0.5 before 0.4)
    assert [p["true"] for p in most_confused(cm, list("abc"), n=2)] == ["b", "a"]
    assert confused_pairs(cm) == 4
    page = write_report(tmp_path / "r.html", "t", {
        "confused": pd.DataFrame(most_confused(cm, list("abc"), n=2)), "confused_pairs": 4})
    assert "<h3>Most confused (2 of 4 pairs; all in confusion.csv)</h3>" in page.read_text()


def test_most_confused_names_the_deepest_level_each_pair_shares(tmp_path):
    """With a taxonomy a pair of one genus (a near miss) and one across families read
    alike: which it is, a taxonomist's first question, was nowhere in the table."""
    from wingspan.evaluate.metrics import most_confused
    from wingspan.evaluate.report import write_report

    classes = ["A a1", "A a2", "B b1", "C c1"]  # A and B in one family, C in another
    ancestors = np.array([[0, 0], [0, 0], [0, 1], [1, 2]])  # (family, genus) of each
    cm = np.array([[1, 3, 2, 0], [0, 2, 0, 0], [0, 0, 1, 1], [0, 0, 0, 2]])
    pairs = most_confused(cm, classes, tree=(ancestors, ["family", "genus"]))
    assert [(p["true"], p["predicted"], p["shared_level"]) for p in pairs] == [
        ("A a1", "A a2", "genus"), ("A a1", "B b1", "family"), ("B b1", "C c1", "none")]
    assert "shared_level" not in most_confused(cm, classes)[0]  # (no taxonomy: no column)
    page = write_report(tmp_path / "r.html", "t", {"confused": pd.DataFrame(pairs)})
    assert "<th>shared level</th>" in page.read_text()
    assert "<td>genus</td>" in page.read_text()


def test_a_report_of_many_classes_folds_its_per_class_tables(tmp_path):
    """300 classes (ETHEC has 561): the data table and the per-class table were 300 rows
    each, 8,000 px apiece, the metrics 10,600 px down the page. The data table folds whole,
    the per-class one after its 20 lowest F1; every class stays in the page. 8 classes:
    both whole, as before."""
    from wingspan.evaluate.report import write_report

    for n in (8, 300):
        names = [f"Genus{i // 3} species{i}" for i in range(n)]
        data = pd.DataFrame({"class": names, "train": 6, "val": 2, "test": 2})
        per_class = pd.DataFrame({"class": names, "precision": 0.5, "recall": 0.5,
                                  "f1": np.linspace(0, 1, n), "support": 2})
        page = write_report(tmp_path / f"{n}.html", "t", {
            "data": data, "per_class": per_class, "summary": [("accuracy", 0.5)]}).read_text()
        data_part = page.split("<h2>Data</h2>")[1].split("<h2>")[0]
        worst = page.split(">Per class (lowest F1 first)<")[1]
        first = worst.split("</table>")[0]
        assert ("<details>" in data_part) == (n > 30)
        assert len(re.findall(r"<tr>\s*<td>", first)) == min(n, 20)
        assert f"<td>{names[0]}</td>" in first  # (the lowest F1 first)
        assert all(f"<td>{c}</td>" in worst for c in names), n
        if n > 30:
            assert "The other 280 classes (all in per_class.csv)" in worst


def test_top_k_is_not_reported_where_k_covers_every_class():
    from wingspan.evaluate.metrics import classification_metrics

    probs = np.array([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
    m = classification_metrics(np.array([0, 1, 2]), probs, ["a", "b", "c"])
    assert "top3_accuracy" not in m and "top5_accuracy" not in m


def test_a_reports_overview_with_a_long_path_fits_a_phone_and_the_keyboard(tmp_path):
    """The overview and metrics tables (name: value) scrolled sideways on a phone where a
    value is long (the weights' path, an ETHEC run's), every row's end hidden: axe found
    the scrolling box out of the keyboard's reach (scrollable-region-focusable). Their
    values now break within a path to fit, in a focusable region all the same."""
    from helpers import accessibility_problems, chromium_path
    from playwright.sync_api import sync_playwright

    from wingspan.evaluate.report import write_report

    long = "/data/" + "Pseudochazara_telephassa_" * 6 + "/model"
    page_file = write_report(tmp_path / "r.html", "t", {
        "overview": [("model", long), ("images", 12)], "summary": [("accuracy", 0.5)]})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path())
        page = browser.new_page(viewport={"width": 375, "height": 800})
        page.goto(page_file.resolve().as_uri())
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        assert page.evaluate("""[...document.querySelectorAll('.scroll')].every(
            box => box.scrollWidth <= box.clientWidth)""")  # (nothing hidden to scroll to)
        assert accessibility_problems(page) == []
        browser.close()


def test_figures_too_small_to_show_are_not_shown_as_zero(tmp_path):
    """A weak 500-class model's most confident mistake at p 0.003 was captioned "p = 0.00",
    an audit's label quality of 2e-5 "quality 0.000": as if none at all. The files keep the
    numbers; only what a reader sees says "< 0.01"."""
    from wingspan.config import AuditConfig
    from wingspan.data.audit import gallery
    from wingspan.errors import rounded

    assert rounded(0.003, 2) == "< 0.01" and rounded(0.006, 2) == "0.01"
    assert rounded(0.0, 2) == "0.00" and rounded(0.35, 2) == "0.35"
    assert rounded(2e-5, 3) == "< 0.001" and rounded(0.0006, 3) == "0.001"
    told = {"true": "a", "predicted": "b", "probability": 0.003}
    assert plots.mistake_title(told).endswith("p < 0.01")
    assert plots.mistake_title({**told, "probability": 0.35}).endswith("p = 0.35")
    image = tmp_path / "a.jpg"
    Image.new("RGB", (32, 32), (90, 120, 200)).save(image)
    issues = pd.DataFrame({"rank": [1], "path": [str(image)], "split": "-", "label": ["a"],
                           "suspected": ["b"], "label_quality": [2e-5],
                           "suspected_probability": [0.9], "flagged": [True]})
    duplicates = pd.DataFrame(columns=["path_a", "path_b", "label_a", "label_b", "split_a",
                                       "split_b", "similarity", "hash_distance",
                                       "across_splits", "labels_differ", "group",
                                       "group_size"])
    page = gallery(issues, duplicates, "label", AuditConfig(), "x", {})
    assert "quality &lt; 0.001" in page and "quality 0.000" not in page
