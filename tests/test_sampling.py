import numpy as np
import pytest
from test_split import synthetic

from wingspan.data.sampling import class_weights, oversample, undersample
from wingspan.data.split import split_dataset


@pytest.fixture
def split_ds():
    return split_dataset(synthetic({"a": 40, "b": 12, "c": 6}, per_group=2))[0]


def test_undersample_caps_train_only(split_ds):
    before = split_ds.table
    capped, dropped = undersample(split_ds, "label", 10, seed=0)
    train = capped.table[capped.table["split"] == "train"]["label"].value_counts()
    assert train.max() == 10
    assert dropped == {k: v - 10 for k, v in
                       before[before["split"] == "train"]["label"].value_counts().items()
                       if v > 10}
    for split in ("val", "test"):
        assert (capped.table["split"] == split).sum() == (before["split"] == split).sum()
    again, _ = undersample(split_ds, "label", 10, seed=0)
    assert capped.table.equals(again.table)


def test_oversample_repeats_rare_training_classes(split_ds):
    grown, added = oversample(split_ds, "label", 30, seed=0)
    train = grown.table[grown.table["split"] == "train"]
    counts = train["label"].value_counts()
    assert counts.min() == 30
    assert set(added) == {k for k, v in split_ds.table[split_ds.table["split"] == "train"]
                          ["label"].value_counts().items() if v < 30}
    # Only repeats: no new files appear.
    assert set(grown.table["path"]) == set(split_ds.table["path"])


def test_balanced_class_weights_match_the_formula():
    labels = ["a"] * 6 + ["b"] * 3 + ["c"] * 1
    weights = class_weights(labels)
    n, k = len(labels), 3
    assert weights == pytest.approx({"a": n / (k * 6), "b": n / (k * 3), "c": n / (k * 1)})
    # Weighted, every class contributes the same total.
    totals = {c: w * labels.count(c) for c, w in weights.items()}
    assert np.ptp(list(totals.values())) == pytest.approx(0)


def test_data_split_caps_the_weights_as_train_does(tmp_path):
    """data split wrote a rare class's weight as 10.5 where train weighs it 5.0 (capped at
    10x the commonest's): sampling.json holds train's figure, and the uncapped one beside."""
    import json

    from helpers import folder_dataset

    from wingspan.config import SplitConfig, TrainConfig
    from wingspan.data import read_dataset
    from wingspan.data.split import split_and_sample

    labels = ["a"] * 60 + ["c"] * 2
    capped = class_weights(labels, cap=10)
    assert capped["c"] == pytest.approx(10 * capped["a"])
    assert capped["c"] < class_weights(labels)["c"]
    folder_dataset(tmp_path / "d", {"a": 60, "c": 2})
    result = split_and_sample(read_dataset(tmp_path / "d"), tmp_path / "out",
                              config=SplitConfig(seed=0))
    written = json.loads(result.sampling_json.read_text())
    w, raw = written["class_weights"], written["class_weights_uncapped"]
    assert written["class_weight_cap"] == TrainConfig.max_class_weight == 10
    assert w["c"] == pytest.approx(10 * w["a"]) and raw["c"] > w["c"]
    assert result.capped == ["c"]



def test_a_class_exactly_at_the_weight_cap_is_not_counted_capped(tmp_path):
    """Trained on 30, 5, 3 and 2 images: the class of 3 is exactly at the 10x cap, its
    weight lowered only by a float rounding step, and data split said '2 classes capped'.
    Counted on whole counts, as train's log counts them, it is the one class of 2."""
    import pandas as pd
    from helpers import folder_dataset

    from wingspan.config import SplitConfig
    from wingspan.data import read_dataset
    from wingspan.data.split import split_and_sample

    trained = {"a": 30, "d": 5, "e": 3, "f": 2}
    folder_dataset(tmp_path / "d", trained)
    result = split_and_sample(read_dataset(tmp_path / "d"), tmp_path / "out",  # all trained on
                              config=SplitConfig(val_fraction=0, test_fraction=0, seed=0))
    assert (result.dataset.table["split"] == "train").sum() == 40
    assert result.capped == ["f"]
    from wingspan.data.sampling import capped_classes

    labels = pd.Series([c for c, n in trained.items() for _ in range(n)])
    assert capped_classes(labels, 10) == ["f"] and capped_classes(labels, 0) == []
    assert capped_classes(pd.Series(["a"] * 60 + ["e"] * 5), 10) == ["e"]


def test_undersample_caps_a_class_one_image_over_the_cap():
    from wingspan.data.sampling import undersample

    capped, dropped = undersample(synthetic({"a": 4, "b": 2}, per_group=1), "label", 3,
                                  split=None)
    assert capped.table["label"].value_counts().to_dict() == {"a": 3, "b": 2}
    assert dropped == {"a": 1}
