"""Leaks between the sides of a split: groups, files and identical pictures."""

import shutil

import pandas as pd
import pytest
from helpers import folder_dataset, write_image

from wingspan.config import SplitConfig
from wingspan.data import read_dataset
from wingspan.data.leaks import find_leaks, repair_leaks
from wingspan.data.split import split_dataset
from wingspan.errors import WingspanError
from wingspan.training.prepare import ensure_splits


@pytest.fixture
def copies(tmp_path):
    """Two classes of distinct pictures, plus 3 pictures each saved again under new names."""
    root = folder_dataset(tmp_path / "data", {"monarch": 12, "admiral": 12})
    for label in ("monarch", "admiral"):
        for i in range(3 if label == "monarch" else 0):
            shutil.copy(root / label / f"{label}_{i}.jpg", root / label / f"copy_{i}.jpg")
    return root


def test_a_split_keeps_identical_pictures_on_one_side(copies):
    dataset, report = split_dataset(read_dataset(copies), "label",
                                    SplitConfig(val_fraction=0.3, test_fraction=0.3, seed=0))
    table = dataset.table.set_index(dataset.table["path"].map(lambda p: p.split("/")[-1]))
    assert report.duplicates_grouped == 3
    for i in range(3):
        assert table.loc[f"monarch_{i}.jpg", "split"] == table.loc[f"copy_{i}.jpg", "split"]
    assert not find_leaks(dataset)


def _with_split(root, sides):
    rows = [(f"{lab}/{name}", lab, sides(name)) for lab in ("monarch", "admiral")
            for name in sorted(p.name for p in (root / lab).iterdir())]
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(root / "splits.csv",
                                                                  index=False)
    return read_dataset(root)


def test_given_splits_that_leak_a_picture_are_refused_or_repaired(copies):
    from test_train import tiny

    dataset = _with_split(copies, lambda n: "val" if n.startswith("copy") or n.endswith(
        ("_9.jpg", "_10.jpg", "_11.jpg")) else "train")
    leaks = find_leaks(dataset)
    assert len(leaks.by_content) == 3 and not leaks.by_group
    assert "3 identical pictures on two sides (3 in train+val)" in leaks.describe()
    config = tiny(copies.parent)
    with pytest.raises(WingspanError, match="splits leak.*identical pictures"):
        ensure_splits(dataset, "label", config)
    logs = []
    allowed = ensure_splits(dataset, "label", tiny(copies.parent, allow_leaky_splits=True),
                            log=logs.append)
    assert len(allowed.table) == len(dataset.table) and "WARNING" in logs[0]
    repaired, dropped = repair_leaks(dataset)
    assert dropped == 3 and not find_leaks(repaired)
    assert (repaired.table["split"] == "val").sum() == (dataset.table["split"] == "val").sum() - 3


def test_ethec_splits_that_list_an_image_twice_are_repaired_and_reported(tmp_path):
    import json

    from helpers import write_image
    from test_train import tiny

    from wingspan.data.ethec import IMAGE_DIR

    root = tmp_path / "ethec"
    (root / "splits").mkdir(parents=True)
    species = [("Pieridae", "Pierinae", "Pieris", "rapae"),
               ("Nymphalidae", "Satyrinae", "Erebia", "aethiops")]
    records = {s: {} for s in ("train", "val", "test")}
    n = 0
    for split, count in (("train", 6), ("val", 3), ("test", 3)):
        for family, subfamily, genus, epithet in species:
            for _ in range(count):
                n += 1
                records[split][f"t{n}"] = {
                    "token": f"t{n}", "image_path": "d", "image_name": f"{n}.jpg",
                    "family": family, "subfamily": subfamily, "genus": genus,
                    "specific_epithet": epithet, "barcode": f"B{n}"}
                write_image(root / IMAGE_DIR / "d" / f"{n}.jpg", seed=n, fmt="JPEG")
    leaked = next(iter(records["val"].values()))  # as in the published splits: val and test
    records["test"]["again"] = {**leaked, "token": "again"}
    # A rare species whose one specimen is in val and test both (two photos, one barcode):
    # the repair keeps it on test, and says that the species has no val image left.
    for split, count in (("train", 4), ("val", 1), ("test", 1)):
        for _ in range(count):
            n += 1
            records[split][f"t{n}"] = {
                "token": f"t{n}", "image_path": "d", "image_name": f"{n}.jpg",
                "family": "Hesperiidae", "subfamily": "Hesperiinae", "genus": "Ochlodes",
                "specific_epithet": "sylvanus", "barcode": "ONE" if split != "train" else f"B{n}"}
            write_image(root / IMAGE_DIR / "d" / f"{n}.jpg", seed=n, fmt="JPEG")
    for split, recs in records.items():
        (root / "splits" / f"{split}.json").write_text(json.dumps(recs))
    logs = []
    dataset = ensure_splits(read_dataset(root), "species", tiny(tmp_path), log=logs.append)
    assert any("The ETHEC splits leak" in line and "Repaired: 2 records dropped" in line
               for line in logs)
    assert ("1 species class lost every val image to the repair (each class's val specimens "
            "were on another side too, and are kept there): Ochlodes sylvanus") in logs
    assert not find_leaks(dataset)
    rows = dataset.table[dataset.table["path"].str.endswith(f"/{leaked['image_name']}")]
    assert rows["split"].tolist() == ["test"]  # kept on the test side only


def test_an_ethec_image_listed_under_two_labels_keeps_neither(tmp_path):
    """Two records of one image in a split, of two genera: the first was kept and the
    other dropped as a mere repeat, so the image trained under a label no one could
    vouch for. Both are left out and said, as the CSV reader does; a plain repeat still
    keeps one."""
    import json

    from helpers import write_image

    from wingspan.data.ethec import IMAGE_DIR

    root = tmp_path / "ethec"
    (root / "splits").mkdir(parents=True)
    record = {"image_path": "d", "family": "Pieridae", "subfamily": "Pierinae",
              "genus": "Pieris", "specific_epithet": "rapae", "barcode": ""}
    records = {f"t{n}": {**record, "token": f"t{n}", "image_name": f"{n}.jpg"}
               for n in range(4)}
    records["again"] = {**records["t1"], "token": "again"}  # the same label: a repeat
    records["other"] = {**records["t2"], "token": "other", "genus": "Aporia"}
    for n in range(4):
        write_image(root / IMAGE_DIR / "d" / f"{n}.jpg", seed=n, fmt="JPEG")
    (root / "splits" / "val.json").write_text(json.dumps(records))
    dataset = read_dataset(root)
    names = sorted(p.rsplit("/", 1)[1] for p in dataset.table["path"])
    assert names == ["0.jpg", "1.jpg", "3.jpg"]
    said = [p.message for p in dataset.problems if p.kind == "conflicting_labels"]
    assert said[0] == ("val: 1 image is listed under different labels (e.g. d/2.jpg: genus "
                       "Pieris / Aporia); all 2 records left out")
    assert sum(p.kind == "duplicate_record" and p.path is not None
               for p in dataset.problems) == 1


def test_ethec_reports_each_leak_once(tmp_path):
    """An image listed in val and test lists its barcode (the group) twice too: that is the
    image's leak, not also the barcode's. A barcode leaks through two of its images."""
    import json

    from wingspan.data.ethec import IMAGE_DIR

    root = tmp_path / "ethec"
    (root / "splits").mkdir(parents=True)

    def record(n, barcode):
        return {"token": f"t{n}", "image_path": "d", "image_name": f"{n}.jpg",
                "family": "Pieridae", "subfamily": "Pierinae", "genus": "Pieris",
                "specific_epithet": "rapae", "barcode": barcode}

    records = {"val": {f"t{n}": record(n, f"B{n}") for n in range(4)},
               "test": {f"t{n}": record(n, f"B{n}") for n in range(4, 8)}}
    records["test"]["again"] = {**record(0, "B0"), "token": "again"}  # image 0, val + test
    records["test"]["t8"] = record(8, "B1")  # specimen B1: image 1 in val, image 8 in test
    for split, recs in records.items():
        (root / "splits" / f"{split}.json").write_text(json.dumps(recs))
    for n in range(9):
        write_image(root / IMAGE_DIR / "d" / f"{n}.jpg", seed=n, fmt="JPEG")
    dataset = read_dataset(root)
    said = {p.kind: p.message for p in dataset.problems if "two_splits" in p.kind}
    assert said["barcode_in_two_splits"].startswith(
        "1 barcode has different images in more than one")
    assert said["image_in_two_splits"].startswith("1 image is in more than one split")
    # Said as it is where training reads the data, not "1 x image in two splits, e.g. 1
    # image is in more than one split".
    from wingspan.data.samples import report_reading

    logged: list[str] = []
    report_reading(dataset, logged.append)
    assert f"While reading the data: {said['image_in_two_splits']}" in logged
    assert not any(" x " in line for line in logged), logged
    leaks = find_leaks(dataset, by_content=False)  # what training counts, the same
    assert len(leaks.by_path) == 1 and list(leaks.by_group) == ["B1"]


def test_empty_files_are_not_one_picture_on_every_side(tmp_path):
    """Failed downloads leave empty files: identical bytes, but no picture to leak."""
    from wingspan.config import InspectConfig
    from wingspan.data.inspect import inspect_dataset

    folder_dataset(tmp_path, {"monarch": 3, "admiral": 3})
    for name in ("monarch/empty.jpg", "admiral/empty.jpg"):
        (tmp_path / name).write_bytes(b"")
    ds = read_dataset(tmp_path)
    empty = ds.table["path"].str.endswith("empty.jpg")
    ds.table["split"] = "train"
    ds.table.loc[empty & (ds.table["label"] == "admiral"), "split"] = "test"
    leaks = find_leaks(ds)
    assert not leaks.by_content
    summary = inspect_dataset(ds, tmp_path / "out", InspectConfig(), progress=False)
    assert summary["images"]["duplicates"]["groups"] == []
    assert len(summary["images"]["unreadable"]) == 2


def test_each_leak_is_counted_once(tmp_path):
    """One file listed in train and test is one leak: not also a group (by default one
    file) and an identical picture (its own bytes). A specimen of two pictures on two
    sides is a group's leak, and a copy under another name a picture's."""
    folder_dataset(tmp_path, {"monarch": 4, "admiral": 4})
    shutil.copy(tmp_path / "admiral" / "admiral_3.jpg", tmp_path / "admiral" / "copy.jpg")
    (tmp_path / "l.csv").write_text(
        "path,label,split,group\n"
        "monarch/monarch_0.jpg,monarch,train,\nmonarch/monarch_0.jpg,monarch,test,\n"
        "monarch/monarch_1.jpg,monarch,train,\nmonarch/monarch_2.jpg,monarch,train,\n"
        "admiral/admiral_0.jpg,admiral,train,\nadmiral/admiral_1.jpg,admiral,train,B7\n"
        "admiral/admiral_2.jpg,admiral,val,B7\n"
        "admiral/admiral_3.jpg,admiral,train,\nadmiral/copy.jpg,admiral,val,\n")
    leaks = find_leaks(read_dataset(tmp_path / "l.csv"))
    assert list(leaks.by_path) == [str(tmp_path / "monarch" / "monarch_0.jpg")]
    assert list(leaks.by_group) == ["B7"] and len(leaks.by_content) == 1
    assert leaks.describe(examples=0) == (
        "1 group on two sides (1 in train+val); 1 file on two sides (1 in test+train); "
        "1 identical picture on two sides (1 in train+val)")
    # Named, so that one leak among 48k images can be found.
    admiral = tmp_path / "admiral"
    assert leaks.describe() == (
        f"1 group on two sides (1 in train+val), e.g. group 'B7' ({admiral / 'admiral_1.jpg'}, "
        f"{admiral / 'admiral_2.jpg'}) on train+val; 1 file on two sides (1 in test+train), "
        f"e.g. {tmp_path / 'monarch' / 'monarch_0.jpg'} on test+train; 1 identical picture "
        f"on two sides (1 in train+val), e.g. {admiral / 'admiral_3.jpg'} = "
        f"{admiral / 'copy.jpg'} on train+val")


def _table_dataset(rows):
    """A dataset straight from (path, group, split, label) rows: no files needed."""
    from pathlib import Path

    from wingspan.data.samples import Dataset

    table = pd.DataFrame(rows, columns=["path", "group", "split", "label"])
    return Dataset(table, ["label"], Path("/nowhere"), "csv")


def test_leaks_are_found_and_repaired_by_whole_columns_on_many_rows():
    """find_leaks and repair_leaks count sides by whole columns (ETHEC's 48k files took
    seconds of a Python call per key): the same leaks, sides and rows kept as before, on
    a table of thousands of clean rows with a few leaks among them."""
    rows = [(f"/d/{i}.jpg", f"g{i}", ("train", "val", "test")[i % 3], "a") for i in range(3000)]
    rows += [("/d/1.jpg", "g1", "test", "a"),  # a file listed in val and test: test keeps it
             ("/d/x.jpg", "g0", "val", "a"),  # specimen g0 (train) through another image
             ("/d/y.jpg", "g2", "val", "a"),  # specimen g2: test and val, test keeps it
             ("/d/z.jpg", "g3", "train", "a"),  # g3: train, val and test, train keeps it
             ("/d/w.jpg", "g3", "test", "a"),
             ("/d/v.jpg", "g6", "", "a")]  # no side: never a leak
    dataset = _table_dataset(rows)
    leaks = find_leaks(dataset, by_content=False)
    assert leaks.by_path == {"/d/1.jpg": ["test", "val"]}
    assert leaks.by_group == {"g0": ["train", "val"], "g2": ["test", "val"],
                              "g3": ["test", "train"]}
    assert sorted(dataset.table["path"].iloc[leaks.rows["by_group"]]) == [
        "/d/0.jpg", "/d/2.jpg", "/d/3.jpg", "/d/w.jpg", "/d/x.jpg", "/d/y.jpg", "/d/z.jpg"]
    assert "3 groups on two sides" in leaks.describe()
    repaired, dropped = repair_leaks(dataset, leaks)  # no file is read: none is a picture
    gone = set(dataset.table["path"] + ":" + dataset.table["split"]) - set(
        repaired.table["path"] + ":" + repaired.table["split"])
    assert gone == {"/d/1.jpg:val", "/d/x.jpg:val", "/d/y.jpg:val", "/d/w.jpg:test"}
    assert dropped == 4
    assert not find_leaks(repaired, by_content=False)
    assert len(repaired) == len(dataset) - 4


def test_data_of_one_picture_saved_in_every_file_is_said_so(tmp_path):
    """One photo copied into 6 files of each of 2 classes: the split said "fewer than 3
    independent images" and to make no test split, which said the same again."""
    root = folder_dataset(tmp_path / "data", {"monarch": 1, "admiral": 1})
    one = root / "monarch" / "monarch_0.jpg"
    for label in ("monarch", "admiral"):
        for i in range(6):
            shutil.copy(one, root / label / f"copy_{i}.jpg")
    (root / "admiral" / "admiral_0.jpg").unlink()
    with pytest.raises(WingspanError, match=r"nothing to split off \(12 images are copies of "
                       r"another under another name, counted as one with it") as e:
        split_dataset(read_dataset(root), "label")
    assert "data inspect" in e.value.message and "--test-fraction" not in e.value.hint
    # Two pictures a class: no test split would do, and is said
    for label in ("monarch", "admiral"):
        write_image(root / label / "other.jpg", seed=len(label))
    with pytest.raises(WingspanError, match="nothing to split off") as e:
        split_dataset(read_dataset(root), "label")
    assert "--test-fraction 0" in e.value.hint
