import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import bench_module

from wingspan.config import ReadConfig, SplitConfig
from wingspan.data import read_dataset
from wingspan.data.samples import Dataset, make_table
from wingspan.data.split import (
    leaked_groups,
    split_and_sample,
    split_dataset,
    stratified_group_folds,
)
from wingspan.errors import WingspanError

# The fold of each sample by scikit-learn's StratifiedGroupKFold itself, as the bench
# times it.
sklearn_folds = bench_module("split_speed").sklearn_folds


def synthetic(n_groups_per_class: dict[str, int], per_group: int = 3) -> Dataset:
    """Samples in groups of `per_group` (photos of one specimen), no files needed."""
    paths, labels, groups = [], [], []
    for label, n_groups in n_groups_per_class.items():
        for g in range(n_groups):
            for i in range(per_group):
                paths.append(f"/x/{label}/{g}_{i}.jpg")
                labels.append(label)
                groups.append(f"{label}-{g}")
    table = make_table(paths, {"label": labels}, groups)
    return Dataset(table, ["label"], Path("/x"), "csv")


def test_grouped_stratified_split_has_no_leak_and_every_class_everywhere():
    ds = synthetic({"a": 40, "b": 30, "c": 20, "d": 10})
    result, report = split_dataset(ds, config=SplitConfig(val_fraction=0.2, test_fraction=0.2))
    table = result.table
    assert leaked_groups(table) == []
    assert set(table["split"]) == {"train", "val", "test"}
    assert not report.missing and not report.train_only
    for split in ("val", "test"):
        assert abs(report.fractions[split] - 0.2) < 0.05
        # Stratified: each class keeps roughly its share in every split.
        share = table[table["split"] == split]["label"].value_counts(normalize=True)
        overall = table["label"].value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.06


@pytest.mark.parametrize(("val", "test"), [(0.4, 0.0), (0.7, 0.0), (0.5, 0.3), (0.2, 0.4),
                                          (0.15, 0.15), (0.95, 0.0), (0.0, 0.96)])
def test_the_split_makes_the_fractions_asked_not_one_fold_of_round_1_over_them(val, test):
    """One fold of round(1 / fraction) made 0.5 of 0.4 and of 0.7, and 0.33 of a val of 0.5
    after a test of 0.3 (train 0.33 in place of 0.2). A share of 0.95 or more fell to the
    fallback for small ones: 0.1, unsaid."""
    ds = synthetic({"a": 50, "b": 50, "c": 50}, per_group=1)
    result, report = split_dataset(ds, config=SplitConfig(val_fraction=val, test_fraction=test))
    assert leaked_groups(result.table) == []
    for split, asked in (("val", val), ("test", test), ("train", 1 - val - test)):
        assert report.fractions[split] == pytest.approx(asked, abs=0.02), split


def test_split_is_deterministic_for_a_seed():
    ds = synthetic({"a": 30, "b": 20})
    first = split_dataset(ds, config=SplitConfig(seed=3))[0].table["split"]
    again = split_dataset(ds, config=SplitConfig(seed=3))[0].table["split"]
    other = split_dataset(ds, config=SplitConfig(seed=4))[0].table["split"]
    assert first.equals(again)
    assert not first.equals(other)


def test_classes_too_small_for_every_split_are_reported_and_kept_in_train():
    ds = synthetic({"common": 30, "rare": 2, "single": 1})
    result, report = split_dataset(ds)
    assert report.train_only == {"rare": 2, "single": 1}
    rare = result.table[result.table["label"].isin(["rare", "single"])]
    assert set(rare["split"]) == {"train"} and len(rare) == 9  # nothing dropped


def test_training_warns_of_the_classes_with_no_val_image():
    from wingspan.config import TrainConfig
    from wingspan.training.prepare import plan_labels

    split = split_dataset(synthetic({"common": 30, "other": 20, "rare": 2}))[0]
    logs: list[str] = []
    plan_labels(split, ["label"], TrainConfig(), log=logs.append)
    warned = [line for line in logs if "no val image" in line]
    assert len(warned) == 1 and "1 of 3 'label' classes" in warned[0]
    assert ": rare." in warned[0] and "--val-fraction" in warned[0]
    assert "--rare-below" not in warned[0]  # one level: nothing coarser to learn it at
    # With a coarser level, the way to name such classes there is said.
    split.table["genus"] = split.table["label"].map({"common": "G1", "other": "G1",
                                                     "rare": "G2"})
    logs.clear()
    plan_labels(split, ["genus", "label"], TrainConfig(levels=["genus", "label"]),
                log=logs.append)
    warned = [line for line in logs if "no val image" in line]
    assert "named at their genus only (--rare-below N" in warned[0], warned
    logs.clear()
    plan_labels(split_dataset(synthetic({"a": 30, "b": 20}))[0], ["label"], TrainConfig(),
                log=logs.append)
    assert not any("no val image" in line for line in logs)


def test_training_says_the_shares_its_split_made_where_they_differ_from_those_asked():
    """30 classes of 4 photos: train split off 50% (one photo of each class on each side)
    and logged "val 0.15, test 0.15"; classes left with no test image went unsaid."""
    from wingspan.config import TrainConfig
    from wingspan.training.prepare import ensure_splits

    logs: list[str] = []
    ensure_splits(synthetic({f"c{i}": 4 for i in range(30)}, per_group=1), "label",
                  TrainConfig(), log=logs.append)
    warned = [line for line in logs if line.startswith("Warning:")]
    assert len(warned) == 1 and "holds out 50% of the images, not the 30% asked (train 60 " \
        "(50%), val 30 (25%), test 30 (25%))" in warned[0] and "--test-fraction 0" in warned[0]
    logs.clear()
    ensure_splits(synthetic({f"c{i}": 4 for i in range(30)}), "label", TrainConfig(),
                  log=logs.append)
    warned = [line for line in logs if line.startswith("Warning:")]
    assert len(warned) == 1 and "12 classes have no test image" in warned[0]
    logs.clear()  # (a class kept in train only is said as such, not again here)
    ensure_splits(synthetic({"a": 30, "b": 20, "rare": 1}), "label", TrainConfig(),
                  log=logs.append)
    assert not [line for line in logs if line.startswith("Warning:")], logs
    assert any("kept in train only" in line for line in logs)


def test_a_run_from_another_runs_weights_keeps_that_runs_groups_out_of_test(tmp_path):
    """--weights RUN: the images that run trained on went from test to train one by one,
    leaving a photo of the same observation in test (and the split's report told of the
    split before the move)."""
    from wingspan.config import TrainConfig
    from wingspan.training.prepare import ensure_splits

    data = synthetic({"a": 10, "b": 10}, per_group=2)
    source = tmp_path / "runs" / "first"
    source.mkdir(parents=True)
    (source / "config.yaml").write_text("backbone: x\n")
    first = data.table.assign(split="train")
    first = first[first["path"].str.endswith("_0.jpg")]  # one photo of each observation
    first.to_csv(source / "splits.csv", index=False)
    logs: list[str] = []
    split = ensure_splits(data, "label", TrainConfig(weights=str(source), test_fraction=0.3,
                                                     val_fraction=0.2), log=logs.append)
    table = split.table
    assert (table["split"] != "test").all()  # (every group had a photo the run saw)
    assert any("no test image is left, every one was seen by that run" in line
               for line in logs), logs
    # ... and what is said of the split is of the split after the move
    assert any(line.startswith("Warning: 2 classes have no test image") for line in logs), logs


def test_a_picture_in_a_train_only_class_and_a_common_one_stays_in_train():
    """One picture saved in two class folders (one group), one of them a class with that
    picture alone: whichever side the common class's fold would take it to, it trains."""
    ds = synthetic({"common": 30, "other": 30})
    table = ds.table.copy()
    table.loc[len(table)] = {**table.iloc[0].to_dict(), "path": "/x/single/0.jpg",
                             "label": "single"}  # the same group as common's first picture
    ds = Dataset(table, ["label"], Path("/x"), "csv")
    shared = table.iloc[0]["group"]
    for seed in range(6):
        result, report = split_dataset(ds, config=SplitConfig(seed=seed))
        assert set(result.table[result.table["group"] == shared]["split"]) == {"train"}
        assert report.train_only == {"single": 1} and "train" not in report.missing
        assert leaked_groups(result.table) == []


def test_few_groups_take_fewer_larger_folds():
    """6 observations of 2 species: the default fractions need 7 folds, 6 groups make 6;
    the split takes a fold of each group count it has rather than refusing."""
    ds = synthetic({"a": 3, "b": 3}, per_group=2)
    result, report = split_dataset(ds)
    assert leaked_groups(result.table) == [] and report.sizes["train"] > 0
    assert report.sizes["test"] > 0 and report.sizes["val"] > 0


def test_classes_all_too_small_get_an_error_that_says_so():
    ds = synthetic({c: 2 for c in "abcdefghij"})  # 20 groups, 2 per class
    with pytest.raises(WingspanError, match="Every 'label' class has fewer than 3 independent"):
        split_dataset(ds)
    _, report = split_dataset(ds, config=SplitConfig(val_fraction=0.5, test_fraction=0.0))
    assert report.sizes["val"] > 0  # with one split to make, 2 groups per class will do


def test_unlabelled_samples_and_impossible_fractions_are_refused():
    ds = synthetic({"a": 10, "b": 10})
    ds.table.loc[0, "label"] = ""
    with pytest.raises(WingspanError, match="1 sample has no 'label' label"):
        split_dataset(ds)
    # A class folder taxonomy.csv lacks: its name said, not only a count.
    ds = synthetic({"a": 10, "b": 10, "c": 4})
    ds.table["genus"] = ds.table["label"].map({"a": "G1", "b": "", "c": ""})
    ds = Dataset(ds.table, ["genus", "label"], Path("/x"), "csv")
    with pytest.raises(WingspanError, match="42 samples have no 'genus' label: those of 'b', "
                       "'c'.") as e:
        split_dataset(ds, level="genus")
    assert "row in taxonomy.csv" in e.value.hint
    with pytest.raises(WingspanError, match="'val_fraction \\+ test_fraction' setting must be"):
        SplitConfig(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(WingspanError, match="'val_fraction' setting must be a fraction"):
        SplitConfig(val_fraction=-0.1)


def test_split_and_sample_writes_a_csv_that_reads_back(demo_dir, tmp_path):
    ds = read_dataset(demo_dir)
    result = split_and_sample(ds, tmp_path, "label",
                              SplitConfig(max_per_class=8, oversample_to=7, seed=1))
    back = read_dataset(tmp_path / "splits.csv")
    # Named with its folder: two splits.csv files get two output folders, not one.
    assert back.out_dir == Path("runs") / "data" / f"{tmp_path.name}-splits"
    train = back.table[back.table["split"] == "train"]
    # Cap and oversampling hold in train; val/test keep their true mix.
    assert train["label"].value_counts().max() <= 8
    assert train["label"].value_counts().min() >= 7
    assert back.table.loc[back.table["split"] != "train"].equals(
        back.table.loc[back.table["split"] != "train"].drop_duplicates())
    assert set(back.levels) == {"family", "subfamily", "genus", "species", "label"}
    assert sorted(back.table["path"]) == sorted(result.dataset.table["path"])
    # The CSV's rows are exactly the split result, split for split.
    pd.testing.assert_series_equal(
        back.table.sort_values("path")["split"].reset_index(drop=True),
        result.dataset.table.sort_values("path")["split"].reset_index(drop=True))


def test_oversampling_above_the_largest_class_is_refused(demo_dir, tmp_path):
    """--oversample-to above the largest class repeats every class: a slip of a few zeros
    (10^6) ran for minutes, its memory climbing, to write classes x N rows."""
    ds = read_dataset(demo_dir)
    with pytest.raises(WingspanError, match="--oversample-to 1000000 is above the largest "
                       r"class's \d+ training images") as e:
        split_and_sample(ds, tmp_path, "label", SplitConfig(oversample_to=10**6, seed=1))
    largest = int(re.search(r"class's (\d+)", e.value.message).group(1))
    assert f"Use at most {largest}" in e.value.hint
    assert not (tmp_path / "splits.csv").exists()
    split_and_sample(ds, tmp_path, "label", SplitConfig(oversample_to=largest, seed=1))
    counts = read_dataset(tmp_path / "splits.csv").table.query("split == 'train'")["label"]
    assert set(counts.value_counts()) == {largest}


def test_identical_copies_stay_grouped_in_a_split_moved_with_its_data(demo_dir, tmp_path):
    """The group of merged identical copies is written as the paths are (relative), so a
    folder moved with its splits.csv keeps them together, and no absolute path leaks."""
    import shutil

    data = Path(shutil.copytree(demo_dir, tmp_path / "data"))
    first = sorted(data.rglob("*.jpg"))[0]
    shutil.copy(first, first.with_name("copy_of_first.jpg"))
    split_and_sample(read_dataset(data), data, "label", SplitConfig(seed=1))
    written = pd.read_csv(data / "splits.csv", keep_default_na=False)
    assert not written["group"].str.contains(str(tmp_path), regex=False).any()
    moved = Path(shutil.move(data, tmp_path / "elsewhere"))
    back = read_dataset(moved / "splits.csv").table.set_index("path")
    pair = [str(moved / first.relative_to(data)), str(moved / first.parent.relative_to(data)
                                                        / "copy_of_first.jpg")]
    assert back.loc[pair[0], "group"] == back.loc[pair[1], "group"]
    assert back.loc[pair[0], "split"] == back.loc[pair[1], "split"]
    assert back["group"].nunique() == len(back) - 1  # every other file is its own group


def test_identical_copies_are_one_group_whatever_the_rows_order(demo_dir, tmp_path):
    """The merged group is named by the least of its names: the same CSV with its rows in
    another order splits alike under one seed."""
    import shutil

    from wingspan.data.leaks import with_duplicates_grouped

    data = Path(shutil.copytree(demo_dir, tmp_path / "data"))
    first = sorted(data.rglob("*.jpg"))[0]
    shutil.copy(first, first.with_name("0_copy.jpg"))
    table = read_dataset(data).table
    grouped = [with_duplicates_grouped(t)[0].set_index("path")["group"]
               for t in (table, table.iloc[::-1])]
    pd.testing.assert_series_equal(grouped[0], grouped[1].loc[grouped[0].index])
    assert grouped[0][str(first)] == str(first.with_name("0_copy.jpg"))


def test_one_picture_in_two_class_folders_is_said_with_both_classes(demo_dir, tmp_path):
    """A copy of a monarch in the admiral folder was trained and scored with both labels,
    and train said only that a picture was saved twice."""
    import shutil

    data = Path(shutil.copytree(demo_dir, tmp_path / "data"))
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    photo = sorted(folders[0].glob("*.jpg"))[0]
    copy = folders[1] / "copy.jpg"
    shutil.copy(photo, copy)
    _, report = split_dataset(read_dataset(data), "label", SplitConfig(seed=0))
    assert report.mixed_labels == [f"{photo} ({folders[0].name}) = {copy} ({folders[1].name})"
                                   if str(photo) < str(copy) else
                                   f"{copy} ({folders[1].name}) = {photo} ({folders[0].name})"]
    said = report.mixed_labels_said("label")
    assert said.startswith("1 group holds images of different 'label' classes (e.g. ")
    assert "fix the labels" in said
    # A group of many images (a --group-regex one): an image of each of two classes, and
    # a count of the rest, not every path on one line.
    third = folders[1] / "third.jpg"
    shutil.copy(photo, third)
    (mixed,) = split_dataset(read_dataset(data), "label", SplitConfig(seed=0))[1].mixed_labels
    assert mixed.count(" = ") == 1 and mixed.endswith(" (and 1 more image in the group)")
    third.unlink()
    # Copies with one class, the usual case, are not said.
    shutil.copy(photo, photo.with_name("again.jpg"))
    copy.unlink()
    assert split_dataset(read_dataset(data), "label", SplitConfig(seed=0))[1].mixed_labels == []
    # Groups a --group-regex made: it may be the regex's doing, not the labels' (`_\d+`
    # took the frame number every observation shares, and the labels were blamed).
    report = split_dataset(read_dataset(data, ReadConfig(group_regex=r"_\d+")), "label",
                           SplitConfig(seed=0))[1]
    said = report.mixed_labels_said("label")
    assert "--group-regex '_\\d+' may take a part of the file name" in said, said


def test_real_inat_resplit_keeps_observations_together(shared_data, tmp_path):
    ds = read_dataset(shared_data / "inat-butterflies", ReadConfig(group_regex=r"_(\d+)_\d+\."))
    result, report = split_dataset(ds, "label", SplitConfig(seed=0))
    assert leaked_groups(result.table) == []
    assert not report.missing
    assert np.isclose(sum(report.fractions.values()), 1.0, atol=0.01)


def test_a_resplit_keeps_one_row_of_an_image_listed_on_two_sides(demo_dir):
    """ETHEC's published split lists 51 images in both val and test: split anew, each is
    one image, not two rows on one side."""
    ds = read_dataset(demo_dir)
    table = ds.table.assign(split="val")
    twice = table.iloc[:3].assign(split="test")
    listed = Dataset(pd.concat([table, twice], ignore_index=True), ds.levels, ds.root, "csv", [])
    split, report = split_dataset(listed, config=SplitConfig(0.2, 0.2, seed=0))
    assert report.repeats_dropped == 3
    assert len(split.table) == len(ds.table) and not split.table["path"].duplicated().any()
    # An image on three sides is one image listed again, not two
    thrice = pd.concat([table, table.iloc[:1].assign(split="test"),
                        table.iloc[:1].assign(split="train")], ignore_index=True)
    split, report = split_dataset(Dataset(thrice, ds.levels, ds.root, "csv", []),
                                  config=SplitConfig(0.2, 0.2, seed=0))
    assert report.repeats_dropped == 1 and len(split.table) == len(ds.table)
    # Repeats on one side (oversampled training rows) are the user's: they stay, together,
    # in train; in val or test one row each, or the image would count twice in the figures
    # (`data split` wrote them twice, and train read the file back as one fewer).
    repeated = table.iloc[:3]["path"]
    oversampled = Dataset(pd.concat([table, table.iloc[:3]], ignore_index=True), ds.levels,
                          ds.root, "csv", [])
    outside = 0
    for seed in range(6):
        split, report = split_dataset(oversampled, config=SplitConfig(0.2, 0.2, seed=seed))
        sides = split.table.groupby("path")["split"].agg(["nunique", "first"])
        assert sides["nunique"].max() == 1
        in_train = int((sides.loc[repeated, "first"] == "train").sum())
        assert report.repeats_dropped == 0 and len(split.table) == len(table) + in_train
        assert not split.table.loc[split.table["split"] != "train", "path"].duplicated().any()
        outside += 3 - in_train
    assert outside  # (a repeat went to val or test under some seed: the case checked)


def random_case(rng: np.random.Generator, most: int = 400):
    """Labels, groups and a fold count of the kinds a split meets: one class to 150, even
    or very uneven classes, groups of one image, a few or many, or a mix; 2 to 10 folds."""
    n_classes = int(rng.choice([1, 2, 3, 5, 10, 40, 150]))
    n = int(rng.integers(10, most))
    p = rng.dirichlet(np.full(n_classes, 0.3)) if rng.random() < 0.4 else None
    y = rng.choice(n_classes, n, p=p)
    g = [np.arange(n), rng.integers(0, max(2, n // 3), n), rng.integers(0, max(2, n // 20), n),
         np.where(rng.random(n) < 0.5, np.arange(n), n + rng.integers(0, 10, n))][
        rng.integers(4)]
    labels = np.array([f"c{v}" for v in y], dtype=object)
    return labels, np.array([f"g{v}" for v in g], dtype=object), int(rng.integers(2, 11))


def assert_sklearns_folds(y, groups, n_splits: int, seed: int) -> bool:
    """Our folds are scikit-learn's, sample for sample; False where it refuses (as we do)."""
    try:
        expected = sklearn_folds(y, groups, n_splits, seed)
    except ValueError:
        with pytest.raises(ValueError, match="n_splits"):
            stratified_group_folds(y, groups, n_splits, seed)
        return False
    np.testing.assert_array_equal(stratified_group_folds(y, groups, n_splits, seed), expected)
    return True


def test_folds_are_scikit_learns_on_random_inputs():
    """The hand-written StratifiedGroupKFold (scikit-learn's took 23-40 s on ETHEC) must
    keep every seed's split: the same folds, down to which of two tied folds a group takes."""
    rng = np.random.default_rng(0)
    compared = sum(assert_sklearns_folds(*random_case(rng, 250), int(rng.integers(2**31)))
                   for _ in range(60))
    assert compared > 40


def ties(kind: str, n_splits: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs where many folds score alike, so the last bit of each score decides."""
    if kind == "one class":  # numpy sums a one-class table's folds pairwise, not in turn
        y, g = ["a"] * 60, range(60)
    elif kind == "even singletons":
        y, g = [c for c in "abcd" for _ in range(25)], range(100)
    elif kind == "identical groups":  # every group a, a, b
        y, g = ["a", "a", "b"] * 30, [i // 3 for i in range(90)]
    elif kind == "rare classes":  # one common class and 30 of one image
        y, g = ["common"] * 50 + [f"r{i}" for i in range(30)], range(80)
    elif kind == "groups across classes":
        y, g = [f"c{i % 7}" for i in range(140)], [i % 23 for i in range(140)]
    else:  # "exactly n_splits": the smallest class has one image per fold
        y, g = ["a"] * n_splits + ["b"] * 40, range(n_splits + 40)
    return np.array(y, dtype=object), np.array([f"g{v}" for v in g], dtype=object)


@pytest.mark.parametrize("kind", ["one class", "even singletons", "identical groups",
                                  "rare classes", "groups across classes", "exactly n_splits"])
def test_folds_are_scikit_learns_where_folds_tie(kind):
    for n_splits in (2, 3, 5, 8, 10):
        y, groups = ties(kind, n_splits)
        for seed in (0, 1, 7, 12345):
            assert assert_sklearns_folds(y, groups, n_splits, seed)


def test_folds_are_scikit_learns_on_an_ethec_like_input():
    """ETHEC's shape, smaller: an image per group, 200 species of very uneven sizes."""
    rng = np.random.default_rng(1)
    y = np.array([f"s{v}" for v in rng.choice(200, 4000, p=rng.dirichlet(np.full(200, 0.5)))],
                 dtype=object)
    for n_splits in (5, 7):
        assert assert_sklearns_folds(y, np.arange(len(y)).astype(str), n_splits, 0)


def test_split_dataset_is_the_split_scikit_learn_made(monkeypatch):
    """End to end: the splits wingspan made with StratifiedGroupKFold, for every setting."""
    import wingspan.data.split as split_module

    ds = synthetic({"a": 40, "b": 25, "c": 9, "d": 4, "e": 2}, per_group=2)
    configs = [SplitConfig(seed=s) for s in range(3)] + [SplitConfig(0.5, 0.3, seed=1),
                                                          SplitConfig(0.4, 0.0, seed=2)]
    ours = [split_dataset(ds, config=c)[0].table["split"] for c in configs]
    monkeypatch.setattr(split_module, "stratified_group_folds", sklearn_folds)
    for config, mine in zip(configs, ours, strict=True):
        pd.testing.assert_series_equal(mine, split_dataset(ds, config=config)[0].table["split"])


def test_folds_are_scikit_learns_where_scores_are_close_but_not_equal():
    """One class of 1000 images beside 100 of 2: where one of its images goes moves the
    score by less than np.isclose's tolerance, inside which the fold with fewer samples
    wins (a tolerance 10 times tighter gives other folds)."""
    y = np.array(["big"] * 1000 + [f"s{i % 100}" for i in range(200)], dtype=object)
    assert assert_sklearns_folds(y, np.arange(len(y)).astype(str), 8, 0)


def test_two_data_folders_of_one_name_keep_their_own_output_folders(demo_dir, tmp_path,
                                                                    monkeypatch, run_cli):
    """runs/data/photos is the first "photos" folder's; another one of that name writes to
    runs/data/photos-HASH, and each finds its own again on the next command."""
    import shutil

    monkeypatch.chdir(tmp_path)
    folders = [tmp_path / side / "photos" for side in ("a", "b")]
    for folder in folders:
        shutil.copytree(demo_dir, folder)
    outs = []
    for folder in (*folders, folders[0]):
        code, _, err = run_cli("data", "inspect", folder, "--metadata-only", "--quiet")
        assert code == 0, err
        outs.append(read_dataset(folder).out_dir)
        summary = json.loads((outs[-1] / "summary.json").read_text())
        assert summary["dataset"]["root"] == str(folder)  # its own, not the other's
    assert outs[0] == outs[2] == Path("runs") / "data" / "photos"
    assert outs[1].parent == outs[0].parent and outs[1].name.startswith("photos-")


def test_a_class_of_few_groups_keeps_one_in_train_whatever_the_folds_take():
    """3 groups at val 0.3 and test 0.3: the folds could take two to test and the third to
    val, and a split that training then refuses came out; one goes back to train, whole."""
    for seed in range(30):  # (before, 17 of these 30 left a class without train)
        ds = synthetic({"c0": 3, "c1": 8, "c2": 8, **{f"r{i}": 3 + i % 5 for i in range(12)}},
                       per_group=1 + seed % 2)
        config = SplitConfig(val_fraction=0.3, test_fraction=0.3, seed=seed)
        result, report = split_dataset(ds, config=config)
        table = result.table
        assert "train" not in report.missing, (seed, report.missing)
        assert set(table["label"]) == set(table[table["split"] == "train"]["label"])
        assert leaked_groups(table) == []


def test_fractions_the_datas_own_split_leaves_unused_are_said(tmp_path):
    """--val-fraction 0.3 --test-fraction 0.3 on split folders trained on the folders'
    split without a word (and config.yaml kept them as if used)."""
    from helpers import folder_dataset

    from wingspan.config import TrainConfig
    from wingspan.data import read_dataset
    from wingspan.training.prepare import ensure_splits

    folder_dataset(tmp_path / "all", {"monarch": 12, "admiral": 12})  # distinct pictures
    for i, path in enumerate(sorted((tmp_path / "all").rglob("*.jpg"))):
        side = ("train", "val", "test")[i % 3]
        (tmp_path / "sf" / side / path.parent.name).mkdir(parents=True, exist_ok=True)
        path.rename(tmp_path / "sf" / side / path.parent.name / path.name)
    logs = []
    config = TrainConfig(val_fraction=0.3, test_fraction=0.3, selection="val")
    ensure_splits(read_dataset(tmp_path / "sf"), "label", config, log=logs.append)
    assert any("--val-fraction 0.3 and --test-fraction 0.3 (val_fraction, test_fraction in "
               "Python) left unused: the data has a split of its own" in line
               for line in logs), logs
    assert any("in Python data.split(val=0.3, test=0.3)" in line for line in logs), logs
    logs.clear()
    ensure_splits(read_dataset(tmp_path / "sf"), "label", TrainConfig(selection="val"),
                  log=logs.append)
    assert not any("left unused" in line for line in logs)  # defaults: nothing to say
    # Train folders alone, --test-fraction 0: kept as asked (no test split), not "unused".
    logs.clear()
    import shutil

    shutil.copytree(tmp_path / "sf" / "train", tmp_path / "tr" / "train")
    ensure_splits(read_dataset(tmp_path / "tr"), "label", TrainConfig(test_fraction=0.0),
                  log=logs.append)
    assert any("The data has no val split" in line for line in logs), logs
    assert not any("left unused" in line for line in logs), logs


def test_a_split_stopped_as_it_is_written_keeps_the_previous_pair(demo_dir, tmp_path,
                                                                  monkeypatch):
    """splits.csv and sampling.json are replaced together: stopped between the two, a new
    split stood beside the old class weights, without a word. A balance plot stopped as
    it is drawn leaves the previous one, not an empty file."""
    import matplotlib.figure
    from helpers import ctrl_c_at_rename

    from wingspan.data.plots import plot_class_balance

    ds = read_dataset(demo_dir)
    split_and_sample(ds, tmp_path, None, SplitConfig(seed=0))
    before = {n: (tmp_path / n).read_bytes() for n in ("splits.csv", "sampling.json")}
    ctrl_c_at_rename(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        split_and_sample(ds, tmp_path, None, SplitConfig(seed=1, max_per_class=3))
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    plot = plot_class_balance(pd.Series({"a": 3, "b": 2}), "label", tmp_path / "b.png")
    drawn = plot.read_bytes()

    def broken(fig, path, **kwargs):
        Path(path).write_bytes(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(KeyboardInterrupt):
        plot_class_balance(pd.Series({"a": 5, "b": 2}), "label", tmp_path / "b.png")
    assert plot.read_bytes() == drawn


def test_a_split_made_without_groups_says_photos_of_one_specimen_may_land_on_two_sides(
        tmp_path):
    """Two views of each specimen, no --group-regex: train said "splitting it by group"
    and put half the specimens on both sides; now it says that no groups were given and
    how to give them, and with --group-regex the views stay on one side."""
    from helpers import write_image

    from wingspan.config import TrainConfig
    from wingspan.training.prepare import ensure_splits

    for seed, (cls, i, view) in enumerate((c, i, v) for c in ("monarch", "admiral")
                                          for i in range(12) for v in ("up", "under")):
        write_image(tmp_path / "d" / cls / f"{cls}_{i:02d}_{view}.jpg", seed=seed)
    config = TrainConfig(selection="val")
    logs = []
    split = ensure_splits(read_dataset(tmp_path / "d"), "label", config, log=logs.append)
    said = next(line for line in logs if line.startswith("The data has no split"))
    assert said.startswith("The data has no split: splitting it photo by photo (no groups "
                           "given: photos of one specimen or observation may land on two "
                           "sides; --group-regex or a CSV's group column keeps them together)")
    specimen = split.table.path.str.replace(r"_(up|under)\.jpg$", "", regex=True)
    assert (split.table.groupby(specimen).split.nunique() > 1).any()  # what it warns of
    logs.clear()
    split = ensure_splits(read_dataset(tmp_path / "d", ReadConfig(group_regex=r"^([a-z]+_\d+)_")),
                          "label", config, log=logs.append)
    assert any(line.startswith("The data has no split: splitting it by group,")
               for line in logs), logs
    specimen = split.table.path.str.replace(r"_(up|under)\.jpg$", "", regex=True)
    assert (split.table.groupby(specimen).split.nunique() == 1).all()
    # Train folders alone, val and test carved from them: said the same way.
    for seed, path in enumerate(sorted((tmp_path / "d").rglob("*.jpg"))):
        write_image(tmp_path / "t" / "train" / path.parent.name / path.name, seed=seed)
    logs.clear()
    ensure_splits(read_dataset(tmp_path / "t"), "label", config, log=logs.append)
    assert any("for test, photo by photo (no groups given: photos of one specimen" in line
               for line in logs), logs


def test_a_class_that_lost_every_group_takes_one_back_from_the_side_holding_most():
    """3 groups at --val 0.3 --test 0.3: two to test, one to val. Train takes one of test's,
    so the class is still on all three sides."""
    from wingspan.data.split import _keep_one_in_train

    split = np.array(["test", "test", "val"], dtype=object)
    labels, groups = np.array(["a", "a", "a"]), np.array(["g1", "g2", "g3"])
    _keep_one_in_train(split, labels, groups, np.ones(3, bool))
    assert sorted(split) == ["test", "train", "val"]


def test_a_large_share_of_few_folds_takes_the_nearest_count():
    from wingspan.data.split import _fold_share

    assert _fold_share(0.9, 3) == (3, 2)  # 2/3, not 1/3
