import json
import os
import sys
import time

import pandas as pd
import pytest
from helpers import folder_dataset, write_image

from wingspan.config import ReadConfig
from wingspan.data import READERS, detect_format, read_dataset
from wingspan.data.ethec import IMAGE_DIR
from wingspan.errors import WingspanError
from wingspan.predict import expand_paths


def test_registry_has_every_format():
    assert set(READERS) == {"folder", "split-folders", "csv", "ethec"}


def test_folder_reader_with_taxonomy_and_groups(tmp_path):
    folder_dataset(tmp_path, {"monarch": 3, "peacock": 2})
    (tmp_path / "taxonomy.csv").write_text(
        "folder,family,genus,specific_epithet\n"
        "monarch,Nymphalidae,Danaus,plexippus\npeacock,Nymphalidae,Aglais,io\n")
    ds = read_dataset(tmp_path)
    assert ds.format == "folder"
    assert ds.levels == ["family", "genus", "species", "label"]
    assert ds.default_level == "label"
    assert ds.class_counts().to_dict() == {"monarch": 3, "peacock": 2}
    row = ds.table[ds.table["label"] == "monarch"].iloc[0]
    assert (row["family"], row["species"]) == ("Nymphalidae", "Danaus plexippus")
    assert (ds.table["group"] == ds.table["path"]).all()  # default group: the file itself
    assert not ds.has_splits

    grouped = read_dataset(tmp_path, ReadConfig(group_regex=r"^([a-z]+)_"))
    assert set(grouped.table["group"]) == {"monarch", "peacock"}
    # How the groups were read goes with the data, to the run that records it.
    assert grouped.subset([0, 1]).with_table(grouped.table).group_regex == r"^([a-z]+)_"

    # A blank epithet is no species (a gap, reported), not its genus: two such classes of
    # one genus would otherwise become one species.
    gaps = tmp_path / "gaps"
    folder_dataset(gaps, {"monarch": 1, "peacock": 1, "white": 1})
    (gaps / "taxonomy.csv").write_text(
        "folder,family,genus,specific_epithet\nmonarch,Nymphalidae,Danaus,plexippus\n"
        "peacock,Nymphalidae,Aglais, \nwhite,Nymphalidae,Aglais,\n")
    species = read_dataset(gaps).table.drop_duplicates("label").set_index("label")["species"]
    assert species.to_dict() == {"monarch": "Danaus plexippus", "peacock": "", "white": ""}


def test_folder_reader_reports_empty_class_and_non_images(tmp_path):
    folder_dataset(tmp_path, {"a": 2})
    (tmp_path / "empty_species").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("field notes")
    write_image(tmp_path / "a" / ".ipynb_checkpoints" / "a_0-checkpoint.jpg")  # a copy
    write_image(tmp_path / "stray.jpg")  # beside the class folders: no class
    write_image(tmp_path / "a" / "saved.JFIF", fmt="JPEG")  # a JPEG as Windows saves one
    ds = read_dataset(tmp_path)
    kinds = {p.kind: p for p in ds.problems}
    assert "empty_species" in kinds["empty_class"].message
    assert kinds["not_image"].path.endswith("notes.txt")
    assert kinds["not_in_class_folder"].path.endswith("stray.jpg")
    assert len(ds) == 3
    with pytest.raises(WingspanError, match="empty_species"):
        read_dataset(tmp_path, ReadConfig(strict=True))


def test_class_folders_sorted_further_by_subfolder_are_said_to_be_one_class(tmp_path):
    """family/species/<image>: the classes are the families, which the user is told; a
    class folder with one subfolder, or images of its own beside them, is not flagged."""
    folder_dataset(tmp_path / "Nymphalidae", {"admiral": 2, "monarch": 2})
    folder_dataset(tmp_path / "Pieridae", {"cabbage_white": 2})
    folder_dataset(tmp_path, {"Lycaenidae": 1})
    folder_dataset(tmp_path / "Lycaenidae", {"common_blue": 1, "holly_blue": 1})
    ds = read_dataset(tmp_path)
    assert sorted(ds.table["label"].unique()) == ["Lycaenidae", "Nymphalidae", "Pieridae"]
    nested = [p for p in ds.problems if p.kind == "nested_classes"]
    assert [p.path for p in nested] == [str(tmp_path / "Nymphalidae")]
    assert ("class folder 'Nymphalidae' holds its images in 2 subfolders (e.g. 'admiral'), "
            "all read as the class 'Nymphalidae'") in nested[0].message


def test_folder_reader_takes_fixed_split_from_splits_csv(tmp_path):
    folder_dataset(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "splits.csv").write_text(
        "path,label,split\na/a_0.jpg,a,train\na/a_1.jpg,a,val\nb/b_0.jpg,b,train\n")
    ds = read_dataset(tmp_path)
    names = ds.table["path"].map(lambda p: p.split("/")[-1])
    splits = dict(zip(names, ds.table["split"], strict=True))
    assert splits == {"a_0.jpg": "train", "a_1.jpg": "val", "b_0.jpg": "train", "b_1.jpg": ""}
    assert [p.kind for p in ds.problems] == ["not_in_splits"]


def test_a_splits_csv_that_names_none_of_the_images_is_an_error(tmp_path):
    """Paths written from the folder above (data/a/a_0.jpg) matched no image: every one was
    'not in splits', and training made a random split in place of the user's fixed one."""
    data = tmp_path / "data"
    folder_dataset(data, {"a": 2, "b": 2})
    (data / "splits.csv").write_text("path,label,split\ndata/a/a_0.jpg,a,train\n"
                                     "data/a/a_1.jpg,a,val\ndata/b/b_0.jpg,b,train\n")
    with pytest.raises(WingspanError, match=r"None of the 3 paths in .*splits.csv is an image "
                       r"of its class folders \(e.g. data/a/a_0.jpg, read as .*data/data/a/"
                       r"a_0.jpg\)") as e:
        read_dataset(data)
    assert "relative to" in e.value.hint and "(e.g. a/a_0.jpg)" in e.value.hint


def test_a_splits_csv_gives_groups_and_says_what_it_cannot_use(tmp_path):
    """Beside class folders, a splits.csv's groups are read (one observation on two sides
    was trained without a word, where the same rows as a CSV are refused); a label other
    than the folder's and a listed file that is not there are said, not dropped silently."""
    from wingspan.data.leaks import find_leaks

    folder_dataset(tmp_path, {"a": 3, "b": 2})
    (tmp_path / "splits.csv").write_text(
        "path,label,split,group\na/a_0.jpg,a,train,obs1\na/a_1.jpg,a,test,obs1\n"
        "a/a_2.jpg,b,val,\nb/b_0.jpg,b,train,\nb/b_1.jpg,b,val,\nb/gone.jpg,b,test,\n")
    ds = read_dataset(tmp_path)
    groups = dict(zip(ds.table["path"].map(lambda p: p.split("/")[-1]), ds.table["group"],
                      strict=True))
    assert groups["a_0.jpg"] == groups["a_1.jpg"] == "obs1"
    assert groups["b_0.jpg"].endswith("b_0.jpg")  # no group: the file alone
    kinds = {p.kind: p for p in ds.problems}
    assert sorted(kinds) == ["label_not_folder", "missing_file"]
    assert kinds["label_not_folder"].path.endswith("a_2.jpg")
    assert "labels it 'b', its folder 'a'; the folder's is used" in kinds[
        "label_not_folder"].message
    assert kinds["missing_file"].path.endswith("gone.jpg")
    assert ds.table.set_index(ds.table["path"].map(lambda p: p.split("/")[-1])).loc[
        "a_2.jpg", "label"] == "a"
    assert find_leaks(ds).by_group == {"obs1": ["test", "train"]}  # refused by train
    # --group-regex given now groups the files instead, and says so.
    ds = read_dataset(tmp_path, ReadConfig(group_regex=r"(\w)_\d"))
    assert "group_column_replaced" in [p.kind for p in ds.problems]


def test_a_splits_csv_written_on_windows_or_with_spaces_is_read_as_meant(tmp_path):
    """Backslashed paths (a splits.csv saved on Windows) and the spaces a "path, label,
    split" file puts after its commas were taken for unlisted images: a fresh random split
    then replaced the user's fixed one without a word."""
    folder_dataset(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "splits.csv").write_text(
        "path, label, split\na\\a_0.jpg, a, train\na\\a_1.jpg, a, Valid\n"
        "b\\b_0.jpg, b, TRAIN \nb/b_1.jpg, b, test\n")
    ds = read_dataset(tmp_path)
    names = ds.table["path"].map(lambda p: p.split("/")[-1])
    assert dict(zip(names, ds.table["split"], strict=True)) == {
        "a_0.jpg": "train", "a_1.jpg": "val", "b_0.jpg": "train", "b_1.jpg": "test"}
    assert [p.kind for p in ds.problems] == []


def test_a_folder_named_with_a_backslash_reads_back_from_the_splits_csv_written(tmp_path):
    """A class folder "back\\slash" is so written in the splits.csv `data split` writes; read
    as "back/slash", every image of the class was missing, and the run scored its test
    figures without the class ("2 of the 6 are gone since the run began")."""
    import wingspan as ws

    folder_dataset(tmp_path / "d", {"back\\slash": 3, "b": 3})
    ws.read(tmp_path / "d").split(val=0.3, test=0.3, out=tmp_path / "s")
    assert "back\\slash" in (tmp_path / "s" / "splits.csv").read_text()
    for again in (read_dataset(tmp_path / "s" / "splits.csv"), read_dataset(tmp_path / "d")):
        assert sorted(again.table["label"].unique()) == ["b", "back\\slash"]
        assert len(again) == 6 and not [p for p in again.problems if p.kind == "missing_file"]


def test_a_csv_with_spaces_after_its_commas_finds_its_files_sides_and_groups(tmp_path):
    folder_dataset(tmp_path, {"x": 3})
    (tmp_path / "labels.csv").write_text(
        "path, label, split, group\nx/x_0.jpg, monarch, train, obs1\n"
        "x/x_1.jpg, monarch, train,obs1\nx/x_2.jpg, monarch, val, obs2\n")
    ds = read_dataset(tmp_path / "labels.csv")
    assert len(ds) == 3 and not [p for p in ds.problems if p.kind == "missing_file"]
    assert ds.table["split"].tolist() == ["train", "train", "val"]
    assert ds.table["group"].tolist() == ["obs1", "obs1", "obs2"]  # one observation, not two


def test_a_path_into_a_folder_named_with_spaces_at_its_ends_keeps_them(tmp_path):
    """A class folder " monarch" is read (as the class "monarch"): its paths in a CSV or a
    splits.csv keep the space, which the stripping of ", "-separated files must not take."""
    folder_dataset(tmp_path, {" monarch": 2, "admiral": 2})
    (tmp_path / "labels.csv").write_text(
        "path,label,split\n monarch/ monarch_0.jpg,monarch,train\n"
        " monarch/ monarch_1.jpg,monarch,val\nadmiral/admiral_0.jpg,admiral, train\n"
        "admiral/admiral_1.jpg,admiral,val\n")
    ds = read_dataset(tmp_path / "labels.csv")
    assert len(ds) == 4 and ds.table["split"].tolist() == ["train", "val", "train", "val"]
    (tmp_path / "labels.csv").rename(tmp_path / "splits.csv")  # beside the class folders
    ds = read_dataset(tmp_path)
    assert sorted(ds.table["split"]) == ["train", "train", "val", "val"]


def test_fixed_splits_follow_symlinks_and_refuse_a_file_on_two_sides(tmp_path):
    folder_dataset(tmp_path / "elsewhere", {"b": 2})
    folder_dataset(tmp_path / "data", {"a": 2})
    (tmp_path / "data" / "b").symlink_to(tmp_path / "elsewhere" / "b")
    (tmp_path / "data" / "splits.csv").write_text(
        "path,label,split\na/a_0.jpg,a,train\na/a_1.jpg,a,val\na/a_1.jpg,a,test\n"
        "b/b_0.jpg,b,train\nb/b_1.jpg,b,val\n")
    ds = read_dataset(tmp_path / "data")
    names = ds.table["path"].map(lambda p: p.split("/")[-1])
    splits = dict(zip(names, ds.table["split"], strict=True))
    assert splits == {"a_0.jpg": "train", "a_1.jpg": "", "b_0.jpg": "train", "b_1.jpg": "val"}
    (torn,) = ds.problems
    assert torn.kind == "conflicting_splits" and torn.path.endswith("a_1.jpg")



def test_a_split_files_repeated_rows_are_said_when_read_as_the_folders_split(tmp_path):
    """`data split --oversample-to --out DATA` writes a rare class's images again into
    DATA/splits.csv; `train DATA` read each once and trained without the repeats, silently
    (the CSV itself, read as data, keeps them)."""
    for name in ("a/a_0.jpg", "a/a_1.jpg", "b/b_0.jpg", "b/b_1.jpg"):
        write_image(tmp_path / "data" / name)
    (tmp_path / "data" / "splits.csv").write_text(
        "path,label,split\na/a_0.jpg,a,train\na/a_0.jpg,a,train\na/a_0.jpg,a,train\n"
        "a/a_1.jpg,a,val\nb/b_0.jpg,b,train\nb/b_1.jpg,b,val\n")
    ds = read_dataset(tmp_path / "data")
    assert len(ds.table) == 4
    (said,) = ds.problems
    assert said.kind == "repeated_rows" and "2 repeats" in said.message
    assert str(tmp_path / "data" / "splits.csv") in said.message
    assert len(read_dataset(tmp_path / "data" / "splits.csv").table) == 6


def test_fixed_splits_resolve_each_folder_once(tmp_path, monkeypatch):
    """A splits.csv beside class folders is matched by resolved paths, each folder once
    (Path.resolve walked every part of every path three times per image: seconds at 48k)."""
    import os

    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(300):
            (tmp_path / "data" / label / f"{i}.jpg").write_bytes(b"")  # listed, never opened
    rows = [f"{lab}/{i}.jpg,{lab},{'train' if i % 2 else 'val'}" for lab in "ab"
            for i in range(299)]  # the last of each is not listed
    (tmp_path / "data" / "splits.csv").write_text("path,label,split\n" + "\n".join(rows))
    calls = []
    realpath = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, **kw: calls.append(p) or realpath(p, **kw))
    ds = read_dataset(tmp_path / "data")
    names = [os.path.relpath(p, tmp_path / "data") for p in ds.table["path"]]
    splits = dict(zip(names, ds.table["split"], strict=True))
    assert splits["a/1.jpg"] == "train" and splits["b/298.jpg"] == "val"
    assert splits["a/299.jpg"] == "" and splits["b/299.jpg"] == ""
    assert [p.kind for p in ds.problems] == ["not_in_splits"] * 2
    assert len(calls) < 20  # a few per folder, not one or more per image

def test_class_folders_are_stripped_as_csv_labels_are(tmp_path):
    """A folder 'monarch ' beside 'monarch' is the one class, said, not a second class."""
    folder_dataset(tmp_path, {"monarch": 2, "admiral": 2})
    write_image(tmp_path / "monarch " / "m.jpg", seed=9)
    ds = read_dataset(tmp_path)
    assert ds.class_counts().to_dict() == {"monarch": 3, "admiral": 2}
    (said,) = ds.problems
    assert said.kind == "label_stripped" and said.path == str(tmp_path / "monarch ")
    assert "class folder 'monarch ' has spaces at its ends; read as the class 'monarch'" in (
        said.message)


def test_csv_labels_are_stripped(tmp_path):
    folder_dataset(tmp_path, {"x": 3})
    (tmp_path / "labels.csv").write_text(
        "path,label,family\nx/x_0.jpg,monarch ,F1\nx/x_1.jpg, monarch,F1 \nx/x_2.jpg,monarch,F1\n")
    ds = read_dataset(tmp_path / "labels.csv")
    assert ds.class_counts().to_dict() == {"monarch": 3}
    assert set(ds.table["family"]) == {"F1"}
    # Said, once per row changed (train.log sums them up in one line); a space after the
    # separator is not said: "a, b" is how some write a CSV (the README: ignored).
    assert [(p.kind, p.path) for p in ds.problems] == [("label_stripped", "x/x_0.jpg"),
                                                       ("label_stripped", "x/x_1.jpg")]
    assert [p.message for p in ds.problems] == [  # each cell by its column
        "label 'monarch ' has spaces at its ends; read without them",
        "family 'F1 ' has spaces at its ends; read without them"]
    (tmp_path / "labels.csv").write_text(
        "path, label, family\nx/x_0.jpg, monarch, F1\nx/x_1.jpg, monarch, F1\n")
    assert read_dataset(tmp_path / "labels.csv").problems == []
    # A spreadsheet's empty cell written as NaN is kept as it says, and said.
    (tmp_path / "labels.csv").write_text("path,label\nx/x_0.jpg,monarch\nx/x_1.jpg,NaN\n")
    ds = read_dataset(tmp_path / "labels.csv")
    assert set(ds.table["label"]) == {"monarch", "NaN"}
    assert [(p.kind, p.path.rsplit("/", 1)[1]) for p in ds.problems] == [
        ("missing_like_label", "x_1.jpg")]


def test_csv_reader_relative_paths_levels_and_missing_files(tmp_path):
    folder_dataset(tmp_path / "imgs", {"x": 2, "y": 1})
    csv = tmp_path / "meta" / "labels.csv"
    csv.parent.mkdir()
    csv.write_text("path,label,split,group,family\n"
                   "../imgs/x/x_0.jpg,x,train,g1,F1\n../imgs/x/x_1.jpg,x,val,g1,F1\n"
                   "../imgs/y/y_0.jpg,y,test,,F2\n../imgs/y/gone.jpg,y,train,,F2\n"
                   "../imgs/y,y,train,,F2\n")  # a folder: there, but no image file
    ds = read_dataset(csv)
    assert ds.format == "csv" and ds.levels == ["family", "label"]
    assert len(ds) == 3
    assert ds.table["group"].tolist()[:2] == ["g1", "g1"]
    assert ds.table["group"].iloc[2] == ds.table["path"].iloc[2]
    missing = {os.path.basename(p.path): p.message for p in ds.problems if p.kind == "missing_file"}
    assert missing == {"gone.jpg": "listed in labels.csv, but not found",
                       "y": "listed in labels.csv, but a folder, not an image file"}
    with pytest.raises(WingspanError, match="2 images listed in labels.csv do not exist"):
        read_dataset(csv, ReadConfig(strict=True))
    # Level columns in any order are read coarse to fine (fewer classes: coarser).
    csv.write_text("path,label,genus,family\n../imgs/x/x_0.jpg,x,Gx,F1\n"
                   "../imgs/x/x_1.jpg,x,Gx,F1\n../imgs/y/y_0.jpg,y,Gy,F1\n")
    assert read_dataset(csv).levels == ["family", "genus", "label"]


def test_a_csv_from_a_spreadsheet_is_read_or_said_how_to_save_it(tmp_path):
    """Excel's habits: "Path;Label" headers (read in any case), and a Windows "CSV (Comma
    delimited)" in cp1252 (refused with how to save it as UTF-8, not a codec's words)."""
    write_image(tmp_path / "a" / "x.jpg")
    write_image(tmp_path / "b" / "y.jpg")
    csv = tmp_path / "list.csv"
    csv.write_text("Path;Label;Split\na/x.jpg;a;Train\nb/y.jpg;b;train\n")
    ds = read_dataset(csv)
    assert ds.table["label"].tolist() == ["a", "b"] and set(ds.table["split"]) == {"train"}
    csv.write_text("Path;path;Label\na/x.jpg;a/x.jpg;a\n")  # which one is meant?
    with pytest.raises(WingspanError, match="has 2 'path' columns: 'Path', 'path'"):
        read_dataset(csv)
    # Windows paths, which no other machine opens: said so (the hint named an "image root"
    # that no option sets).
    csv.write_text("path,label\nC:\\photos\\x.jpg,a\nC:\\photos\\y.jpg,b\n")
    with pytest.raises(WingspanError) as e:
        read_dataset(csv)
    assert "a Windows path, which this machine cannot open" in e.value.hint
    csv.write_bytes("path,label\na/x.jpg,caf\xe9\nb/y.jpg,b\n".encode("cp1252"))
    with pytest.raises(WingspanError, match="it is not UTF-8 text") as e:
        read_dataset(csv)
    assert "CSV UTF-8" in e.value.hint
    # Said by its line: pandas gave a byte's position in the chunk it decoded ("position
    # 2325" of a row on line 15,001)
    csv.write_bytes(b"path,label\n" + b"".join(b"a/%05d.jpg,a\n" % i for i in range(20000))
                    .replace(b"a/15000.jpg,a", b"a/15000.jpg,caf\xe9"))
    with pytest.raises(WingspanError, match=r"it is not UTF-8 text \(byte 0xe9 on line "
                                            r"15002: a/15000.jpg,caf\\xe9\)"):
        read_dataset(csv)
    csv.write_bytes("path,label\na/x.jpg,a\n".encode("utf-16"))  # Excel's "Unicode Text"
    with pytest.raises(WingspanError, match="it is UTF-16 text") as e:
        read_dataset(csv)
    assert "iconv -f utf-16" in e.value.hint
    # A Greek or Japanese Excel saves in its own code page: iconv -f cp1252, the one hint
    # given, turned Πεταλούδα into Ðåôáëïýäá without a word.
    csv.write_bytes("path,label\na/x.jpg,Πεταλούδα\n".encode("cp1253"))
    with pytest.raises(WingspanError, match="it is not UTF-8 text") as e:
        read_dataset(csv)
    assert "cp1253 Greek" in e.value.hint and "cp932 Japanese" in e.value.hint


def test_a_csv_in_nfc_finds_files_that_macos_named_in_nfd(tmp_path):
    """Photos copied from a Mac spell 'é' in two characters (NFD); a CSV typed or exported
    elsewhere spells it in one (NFC): they were "not found", and lost to training."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "Vanessa_é")
    for i in range(2):
        write_image(tmp_path / nfd / unicodedata.normalize("NFD", f"café_{i}.jpg"))
    write_image(tmp_path / "plain" / "p.jpg")
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(
        f"{unicodedata.normalize('NFC', f'Vanessa_é/café_{i}.jpg')},v\n" for i in range(2))
        + "plain/p.jpg,p\nplain/gone.jpg,p\n", encoding="utf-8")
    ds = read_dataset(csv)
    assert len(ds) == 3 and all(os.path.isfile(p) for p in ds.table["path"])
    assert [os.path.basename(p.path) for p in ds.problems if p.kind == "missing_file"] == [
        "gone.jpg"]
    # Each photo its own group, as for any other: train said it split "by group" (each
    # one's group was its path as written, the path as found on disk).
    from wingspan.data.samples import groups_given

    assert not groups_given(ds.table)


def test_a_csv_made_on_windows_finds_files_named_in_another_case(tmp_path):
    """'IMG_1.JPG' in a list made on Windows or macOS, 'IMG_1.jpg' on disk: they read it as
    one file, Linux found none ("missing file"), and the photo was lost to training. Read as
    they read it, and said; two files that differ only in case are neither."""
    for name in ("a/IMG_1.jpg", "a/IMG_2.jpg", "b/x.jpg", "b/X.jpg", "b/y.jpg"):
        write_image(tmp_path / "Photos" / name)
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\nphotos/a/IMG_1.JPG,a\nPhotos/a/IMG_2.jpg,a\n"
                   "Photos/b/x.JPG,b\nPhotos/b/y.jpg,b\n", encoding="utf-8")
    ds = read_dataset(csv)
    assert sorted(os.path.relpath(p, tmp_path) for p in ds.table["path"]) == [
        "Photos/a/IMG_1.jpg", "Photos/a/IMG_2.jpg", "Photos/b/y.jpg"]
    said = {p.kind: p for p in ds.problems}
    assert said["name_case_differs"].message == (
        "listed in list.csv as 'IMG_1.JPG': read as 'IMG_1.jpg', which differs in case only "
        "(as Windows and macOS read it)")
    assert os.path.basename(said["missing_file"].path) == "x.JPG"  # (x.jpg or X.jpg?)
    from wingspan.data.samples import groups_given

    assert not groups_given(ds.table)
    # A folder in another case: the message quotes from there (it read "'IMG_1.jpg': read
    # as 'IMG_1.jpg'"). One file in two spellings with two labels: left out, as one file
    # listed twice so is (it was trained on under both).
    csv.write_text("path,label\nphotos/a/IMG_1.jpg,a\nPhotos/a/img_2.jpg,b\n"
                   "Photos/a/IMG_2.jpg,a\nPhotos/b/y.jpg,b\n", encoding="utf-8")
    ds = read_dataset(csv)
    assert sorted(os.path.relpath(p, tmp_path) for p in ds.table["path"]) == [
        "Photos/a/IMG_1.jpg", "Photos/b/y.jpg"]
    said = {(p.kind, p.message) for p in ds.problems}
    assert ("name_case_differs", "listed in list.csv as 'photos/a/IMG_1.jpg': read as "
            "'Photos/a/IMG_1.jpg', which differs in case only (as Windows and macOS read it)"
            ) in said, said
    assert ("conflicting_labels", "listed 2 times, with the labels b and a: left out") in said


@pytest.mark.parametrize("content, message", [
    # (the columns and sides in words, not Python's ['file', 'label'])
    ("file,label\na.jpg,x\n", r"no 'path' column \(its columns: file, label\)\."),
    ("path,label,split\na.jpg,x,training\n",
     "line 2: split 'training' is not one of train, val, test."),
    # pandas read the second as 'genus.1', a level of its own, without a word
    ("path,label,family,genus,genus \na.jpg,x,F,G,H\n",
     r"has 2 columns named 'genus' \(columns 4, 5\)"),
])
def test_csv_reader_clear_errors(tmp_path, content, message):
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    with pytest.raises(WingspanError, match=message):
        read_dataset(csv)


def test_an_empty_csv_is_said_so_with_what_its_first_line_holds(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("")  # (pandas said "No columns to parse from file", with no hint)
    with pytest.raises(WingspanError, match="labels.csv: it is empty") as e:
        read_dataset(csv)
    assert "'path' among them" in e.value.hint


def test_a_taxonomy_with_wrong_or_repeated_rows_says_which_in_words(tmp_path):
    folder_dataset(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "taxonomy.csv").write_text("dir,family\na,F\n")
    with pytest.raises(WingspanError, match=r"\(its columns: dir, family\)\."):
        read_dataset(tmp_path)
    (tmp_path / "taxonomy.csv").write_text("folder,family\na,F\na,G\nb,F\n")
    with pytest.raises(WingspanError, match="lists these folders more than once") as e:
        read_dataset(tmp_path)
    assert e.value.message.endswith("more than once: a.") and e.value.hint  # (none before)


@pytest.mark.parametrize("rows, left_out", [
    ("", None), ("a.jpg,\nb.jpg,\n", "2 rows with an empty label"),
    ("a.jpg,x\na.jpg,y\n", "1 image listed with two labels")])
def test_a_csv_with_no_usable_row_says_so(tmp_path, rows, left_out):
    """A header alone, or only rows that are left out: a message about the CSV's rows, not
    a traceback (an empty table once lost its columns) nor a hint about class folders."""
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / name, size=(8, 8))
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + rows)
    with pytest.raises(WingspanError, match="no usable images") as e:
        read_dataset(csv)
    assert e.value.hint.startswith("List one image per row under the header: path,label")
    if left_out:
        assert left_out in e.value.hint
    else:
        assert e.value.hint.endswith("path,label.")


def test_bad_paths_and_empty_datasets(tmp_path):
    with pytest.raises(WingspanError, match="does not exist"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WingspanError, match="no usable images"):
        read_dataset(tmp_path / "empty")
    # A folder of photos (or one class's folder) given as DATA: said as such, not "empty".
    for i in range(3):
        write_image(tmp_path / "photos" / f"IMG_{i}.JPG", seed=i)
    with pytest.raises(WingspanError, match=r"(?s)photos has no class folders: its 3 images "
                       r"lie in it directly.*Sort them into one folder per class"):
        read_dataset(tmp_path / "photos")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(WingspanError, match="Cannot tell the dataset format") as said:
        read_dataset(tmp_path / "weights.bin")
    assert "--format" in said.value.hint
    # A spreadsheet as itself, or as Excel's tab-separated text: said what to do with each.
    (tmp_path / "specimens.xlsx").write_bytes(b"PK\3\4")
    with pytest.raises(WingspanError, match="Cannot tell the dataset format") as said:
        read_dataset(tmp_path / "specimens.xlsx")
    assert said.value.hint.startswith("Save the sheet as CSV (in Excel: File > Save As > CSV")
    (tmp_path / "specimens.txt").write_text("path\tlabel\n")
    with pytest.raises(WingspanError, match="Cannot tell the dataset format") as said:
        read_dataset(tmp_path / "specimens.txt")
    assert "read it as one with --format csv" in said.value.hint
    with pytest.raises(WingspanError,
                       match="(?s)Unknown dataset format 'parquet'.*folder, split-folders, csv"):
        read_dataset(tmp_path, ReadConfig(format="parquet"))


def test_detect_format(tmp_path, demo_dir):
    assert detect_format(demo_dir) == "folder"
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "val.json").write_text("{}")
    assert detect_format(tmp_path) == "ethec"
    assert detect_format(write_image(tmp_path / "a.csv", fmt="PNG")) == "csv"


def test_unknown_level_names_the_valid_ones(demo_dir):
    ds = read_dataset(demo_dir)
    with pytest.raises(WingspanError, match="(?s)no label level 'tribe'.*family, subfamily"):
        ds.resolve_level("tribe")


# --- the real data in ../shared/data ---------------------------------------------------

def test_real_leeds_folder(shared_data):
    ds = read_dataset(shared_data / "leeds-butterflies")
    assert len(ds) == 832 and ds.table["label"].nunique() == 10
    assert ds.table["family"].nunique() == 4
    assert ds.table["split"].value_counts().to_dict() == {"train": 498, "val": 167, "test": 167}
    assert not ds.problems


def test_real_inat_csv_with_observation_groups(shared_data):
    ds = read_dataset(shared_data / "inat-butterflies" / "splits.csv",
                      ReadConfig(group_regex=r"_(\d+)_\d+\.jpg$"))
    assert len(ds) == 1337 and ds.table["label"].nunique() == 8
    assert ds.levels == ["family", "subfamily", "genus", "species", "label"]
    assert ds.table["split"].value_counts().to_dict() == {"train": 1101, "val": 236}
    assert ds.table["group"].str.fullmatch(r"\d+").all()  # the observation id


@pytest.fixture(scope="module")
def ethec_root(shared_data, tmp_path_factory):
    """The real ETHEC val/test split files, with small images written for every 20th record,
    and for test's 2 records whose image_name is empty (their file's name in image_path), in
    the folder of the scan date their name holds; val's 6 such records have no file."""
    root = tmp_path_factory.mktemp("ethec")
    (root / "splits").mkdir()
    written = set()
    for split in ("val", "test"):
        src = shared_data / "ethec-splits" / f"{split}.json"
        (root / "splits" / f"{split}.json").symlink_to(src)
        records = json.loads(src.read_text())
        for i, rec in enumerate(records.values()):
            image = f"{rec['image_path']}/{rec['image_name']}"
            if not rec["image_name"]:  # ETHZ_ENT01_2017_05_26_035377.JPG: in 2017_05_26R
                image = f"{rec['image_path'][11:21]}R/{rec['image_path']}"
                if split == "val":
                    continue
            if (i % 20 == 0 or not rec["image_name"]) and image not in written:
                write_image(root / IMAGE_DIR / image, size=(16, 16), seed=len(written), fmt="JPEG")
                written.add(image)
    return root, written


def test_real_ethec_split_files(ethec_root):
    root, written = ethec_root
    start = time.perf_counter()
    ds = read_dataset(root)
    took = time.perf_counter() - start
    assert ds.format == "ethec"
    assert ds.levels == ["family", "subfamily", "genus", "species"]
    images = set(ds.table["path"].str.split(IMAGE_DIR + "/").str[1])
    assert images == written  # every record with a file, whichever split lists it
    assert set(ds.table["split"]) == {"val", "test"}
    assert ds.table["species"].str.count(" ").min() >= 1  # "Genus epithet"
    assert ds.table["group"].str.startswith("ETHZ-ENT").all()  # barcodes
    general = [p.message for p in ds.problems if p.path is None]
    assert any("val: 169 images are listed more than once" in m for m in general)
    # 8 records have an empty image_name and the file's name in image_path (6 in val, 2 in
    # test): read from the folder of the scan date where the file is there, else left out
    # and said so. The 2 of test, the only images of Euphydryas sibirica, are there (and are
    # 2 of val's 6: images that val and test both list); the other 4 of val are not.
    assert any(m.startswith("val: 4 records have an empty image_name (their image_path "
                            "holds a file name") for m in general)
    for split in ("val", "test"):
        assert any(m.startswith(f"{split}: 2 records have an empty image_name and the file's "
                                "name in image_path: read from the folder of its scan date, "
                                "e.g. 2017_05_26R/ETHZ_ENT01_2017_05_26_0353")
                   for m in general), split
    sibirica = ds.table[ds.table["species"] == "Euphydryas sibirica"]
    assert sorted(sibirica["split"]) == ["test", "test", "val", "val"]
    # 49 images and 116 barcodes leak between the splits through the records with a name,
    # 2 images and 1 barcode more through these 2 (once read, they leak too)
    assert any(m.startswith("51 images are in more than one split") for m in general)
    # Barcodes through two of their images: 22 more are in both only by an image listed
    # in both, which is that image's leak (training's check counts them alike).
    assert any(m.startswith("117 barcodes have different images in more than one split")
               for m in general)
    missing = sum(p.kind == "missing_file" for p in ds.problems)
    assert missing + len(ds) == 5286 + 5049 - 213 - 204 - 4
    print(f"read ETHEC val+test in {took:.2f}s")


def test_real_ethec_metadata_only(shared_data):
    ds = read_dataset(shared_data / "ethec-splits", ReadConfig(check_files=False))
    # (the 8 records with the file's name in image_path kept: no file is looked for)
    assert len(ds) == 5286 + 5049 - 213 - 204
    # Training's log counts the records dropped, not the records and the sums per split.
    from wingspan.data.samples import report_reading

    said: list[str] = []
    counts = report_reading(ds, said.append)
    assert counts["duplicate_record"] == 213 + 204 and "no_image_name" not in counts
    assert counts["image_name_in_image_path"] == 8  # (records, each listed by token)
    assert sum("213 extra records dropped" in line for line in said) == 1
    assert sum("records have an empty image_name and the file's name" in line
               for line in said) == 2  # (a sum per split, said as it is)
    assert ds.table["species"].nunique() == 561  # Euphydryas sibirica's 2 among the 8
    assert ds.table["family"].nunique() == 6
    assert isinstance(ds.table, pd.DataFrame)


def test_ethec_without_images_suggests_metadata_only(shared_data):
    with pytest.raises(WingspanError, match="--metadata-only"):
        read_dataset(shared_data / "ethec-splits")


def test_a_csv_row_with_an_extra_field_is_refused_with_its_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("path,label,split\na.jpg,monarch,train\na.jpg,admiral,val,oops\n")
    with pytest.raises(WingspanError, match=r"data.csv, line 3: 4 fields where the header"):
        read_dataset(csv_file, ReadConfig(check_files=False))
    # The line a text editor shows: blank lines and a quoted line break counted.
    csv_file.write_text('\npath,label,split\n\na.jpg,"mon\narch",train\na.jpg,admiral,val,oops\n')
    with pytest.raises(WingspanError, match=r"data.csv, line 6: 4 fields where the header"):
        read_dataset(csv_file, ReadConfig(check_files=False))


def test_train_valid_test_folders_are_a_fixed_split_not_three_classes(tmp_path):
    """Ultralytics, Keras and Kaggle lay a dataset out as train/ val/ test/, each with one
    folder per class (`valid` or `validation` for val)."""
    for side, n in (("train", 3), ("valid", 2), ("test", 1)):
        folder_dataset(tmp_path / side, {f"{c}-{side}": n for c in ("monarch", "admiral")})
        for c in ("monarch", "admiral"):
            (tmp_path / side / f"{c}-{side}").rename(tmp_path / side / c)
    (tmp_path / "taxonomy.csv").write_text("folder,family\nmonarch,Nymphalidae\n"
                                           "admiral,Nymphalidae\n")
    ds = read_dataset(tmp_path)
    assert ds.format == "split-folders" and ds.levels == ["family", "label"]
    assert ds.class_counts().to_dict() == {"admiral": 6, "monarch": 6}
    assert ds.table.groupby("split").size().to_dict() == {"test": 2, "train": 6, "val": 4}
    assert (ds.table["family"] == "Nymphalidae").all()
    # Asked for as class folders, it is read as the user says.
    assert set(read_dataset(tmp_path, ReadConfig(format="folder")).table["label"]) == {
        "train", "valid", "test"}


def test_a_kaggle_test_folder_of_unlabelled_images_leaves_the_layout_a_split(tmp_path):
    """Kaggle ships test/ as images with no class folders (and some a val/ left empty): read
    as class folders, that made classes named train, valid and test."""
    for side in ("train", "valid"):
        folder_dataset(tmp_path / side, {"monarch": 3, "admiral": 3})
    folder_dataset(tmp_path / "loose", {"x": 4})
    (tmp_path / "loose" / "x").rename(tmp_path / "test")
    (tmp_path / "loose").rmdir()
    (tmp_path / "val").mkdir()
    ds = read_dataset(tmp_path)
    assert ds.format == "split-folders"
    assert ds.class_counts().to_dict() == {"admiral": 6, "monarch": 6}
    assert ds.table.groupby("split").size().to_dict() == {"train": 6, "val": 6}
    said = [p for p in ds.problems if p.kind == "unlabelled_split"]
    assert len(said) == 1 and said[0].path.endswith("test") and "4 images" in said[0].message


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX quoting")
def test_the_command_for_a_kaggle_test_folder_pastes_as_one_path(tmp_path):
    """`wingspan predict RUN /data/my photos/test` named the folder as two arguments: the
    path in the command said is quoted, as the shell reads it."""
    import shlex

    root = tmp_path / "my photos"
    for side in ("train", "valid"):
        folder_dataset(root / side, {"monarch": 3, "admiral": 3})
    folder_dataset(root / "loose", {"x": 2})
    (root / "loose" / "x").rename(root / "test")
    (root / "loose").rmdir()
    said = next(p for p in read_dataset(root).problems if p.kind == "unlabelled_split").message
    pasted = said.split("`")[1]
    assert shlex.split(pasted) == ["wingspan", "predict", "RUN", str(root / "test")], said


def test_a_group_regex_with_alternatives_takes_the_group_that_matched(tmp_path):
    for name in ("obs_12_1.jpg", "obs_12_2.jpg", "IMG_7.jpg", "IMG_8.jpg", "other.jpg"):
        write_image(tmp_path / "monarch" / name, seed=len(name))
    ds = read_dataset(tmp_path, ReadConfig(group_regex=r"_(\d+)_\d+\.jpg$|^IMG_(\d)"))
    groups = dict(zip(ds.table["path"].map(lambda p: p.rsplit("/", 1)[1]), ds.table["group"],
                      strict=True))
    assert groups["obs_12_1.jpg"] == groups["obs_12_2.jpg"] == "12"
    assert (groups["IMG_7.jpg"], groups["IMG_8.jpg"]) == ("7", "8")
    assert groups["other.jpg"].endswith("other.jpg")  # no match: its own group, listed
    assert [p.kind for p in ds.problems] == ["group_unmatched"]
    # Matching no file at all is a slip in the regex: the split would not be grouped.
    with pytest.raises(WingspanError, match=r"--group-regex '\^obs\(\\d\+\)' matches none "
                       r"of the 5 file names \(e.g. IMG_7.jpg\): nothing would be grouped"):
        read_dataset(tmp_path, ReadConfig(group_regex=r"^obs(\d+)"))
    # A regex without a group whose whole match is the same for every file: one group for
    # all, said as such (the split said "fewer than 3 independent images").
    with pytest.raises(WingspanError, match=r"gives all 5 files the one group '\.jpg': "
                                            r"nothing could be split(?s:.*)in parentheses"):
        read_dataset(tmp_path, ReadConfig(group_regex=r"\.jpg$"))


def test_a_file_listed_twice_in_a_csv(tmp_path):
    """With two labels it is left out; repeated in val or test it counts once; repeated in
    train it stays (as --oversample-to writes it); on two sides, the leak check's."""
    folder_dataset(tmp_path, {"x": 5})
    (tmp_path / "l.csv").write_text(
        "path,label,split\nx/x_0.jpg,a,train\nx/x_0.jpg,a,train\nx/x_1.jpg,a,val\n"
        "x/x_1.jpg,a,val\nx/x_2.jpg,a,train\nx/x_2.jpg,b,train\nx/x_3.jpg,b,train\n"
        "x/x_3.jpg,b,test\nx/x_4.jpg,b,val\n")
    ds = read_dataset(tmp_path / "l.csv")
    rows = [(p.rsplit("/", 1)[1], s) for p, s in zip(ds.table["path"], ds.table["split"],
                                                     strict=True)]
    assert rows == [("x_0.jpg", "train"), ("x_0.jpg", "train"), ("x_1.jpg", "val"),
                    ("x_3.jpg", "train"), ("x_3.jpg", "test"), ("x_4.jpg", "val")]
    said = {p.kind: (p.message, p.path.rsplit("/", 1)[1]) for p in ds.problems}
    assert said == {"repeated_row": ("listed 2 times in the val split; counted once", "x_1.jpg"),
                    "conflicting_labels": ("listed 2 times, with the labels a and b: left out",
                                           "x_2.jpg")}


def test_a_group_regex_wins_over_a_csvs_group_column(tmp_path):
    for name in ("obs_1_1.jpg", "obs_1_2.jpg", "obs_2_1.jpg"):
        write_image(tmp_path / "monarch" / name, seed=len(name) + int(name[4]) + int(name[6]))
    (tmp_path / "s.csv").write_text("path,label,group\n" + "".join(
        f"monarch/{n},monarch,monarch/{n}\n" for n in ("obs_1_1.jpg", "obs_1_2.jpg",
                                                       "obs_2_1.jpg")))
    ds = read_dataset(tmp_path / "s.csv", ReadConfig(group_regex=r"obs_(\d+)_"))
    assert ds.table["group"].tolist() == ["1", "1", "2"]
    assert [p.kind for p in ds.problems] == ["group_column_replaced"]
    assert read_dataset(tmp_path / "s.csv").table["group"].tolist()[0] == "monarch/obs_1_1.jpg"


def test_a_macs_zip_folder_is_not_a_class_or_a_split(tmp_path):
    for side in ("train", "val"):
        folder_dataset(tmp_path / side, {"monarch": 2, "admiral": 2})
    write_image(tmp_path / "__MACOSX" / "train" / "monarch" / "._monarch_0.jpg")
    ds = read_dataset(tmp_path)
    assert ds.format == "split-folders" and set(ds.table["label"]) == {"monarch", "admiral"}
    assert not ds.problems


def test_a_nas_thumbnail_folder_is_not_read_as_more_photos(tmp_path):
    """A Synology NAS writes CLASS/@eaDir/PHOTO.jpg/SYNOPHOTO_THUMB_M.jpg beside every photo:
    read as photos in a subfolder of the class, they tripled the data and put each test
    photo's thumbnails in train. Neither training's reader nor predict reads them now, nor
    a recycle bin's."""
    from wingspan.predict import expand_paths

    folder_dataset(tmp_path / "photos", {"monarch": 2, "admiral": 2})
    for photo in (tmp_path / "photos").glob("*/*.jpg"):
        for size in ("S", "M"):
            write_image(photo.parent / "@eaDir" / photo.name / f"SYNOPHOTO_THUMB_{size}.jpg")
    write_image(tmp_path / "photos" / "monarch" / "#recycle" / "old.jpg")
    write_image(tmp_path / "photos" / "$RECYCLE.BIN" / "S-1-5" / "x.jpg")
    ds = read_dataset(tmp_path / "photos")
    assert len(ds.table) == 4 and set(ds.table["label"]) == {"monarch", "admiral"}
    assert not [p for p in ds.problems if p.kind != "few_images"], ds.problems
    found, missing = expand_paths([str(tmp_path / "photos")])
    assert not missing and sorted(found) == sorted(ds.table["path"])


def test_predict_finds_the_images_training_reads(tmp_path):
    """Symlinked folders followed, hidden files (a Mac's ._ copies) skipped: the same
    images as the reader finds under a class folder."""
    from wingspan.predict import expand_paths

    folder_dataset(tmp_path / "elsewhere", {"y2023": 2})
    folder_dataset(tmp_path / "photos", {"monarch": 2})
    (tmp_path / "photos" / "monarch" / "y2023").symlink_to(tmp_path / "elsewhere" / "y2023")
    write_image(tmp_path / "photos" / "monarch" / "._monarch_0.jpg")
    found, missing = expand_paths([str(tmp_path / "photos")])
    assert not missing and len(found) == 4
    assert sorted(found) == sorted(read_dataset(tmp_path / "photos").table["path"])


def test_a_missing_file_with_brackets_in_its_name_is_said_missing(tmp_path):
    """photos/a[b].jpg that is not there is a missing file, not a pattern matching nothing."""
    from wingspan.predict import expand_paths

    named = str(tmp_path / "photos" / "a[b].jpg")
    assert expand_paths([named]) == ([], [(named, "no such file or folder, nor any match as "
                                                  "a pattern")])


def test_wingspan_output_inside_data_is_not_a_class(tmp_path):
    """`cd DATA; wingspan data inspect .` writes runs/data/<name>/ there: a second run must
    not read it as a class."""
    folder_dataset(tmp_path, {"monarch": 2, "admiral": 2})
    out = tmp_path / "runs" / "data" / tmp_path.name
    write_image(out / "balance.png", fmt="PNG")
    (out / "summary.json").write_text("{}")
    ds = read_dataset(tmp_path)
    assert set(ds.table["label"]) == {"monarch", "admiral"}
    assert [(p.kind, p.path) for p in ds.problems] == [("not_a_class", str(tmp_path / "runs"))]


def test_symlinked_folders_inside_a_class_are_followed_once(tmp_path):
    folder_dataset(tmp_path / "elsewhere", {"y2023": 2})
    folder_dataset(tmp_path / "data", {"monarch": 1})
    (tmp_path / "data" / "monarch" / "2023").symlink_to(tmp_path / "elsewhere" / "y2023")
    (tmp_path / "data" / "monarch" / "loop").symlink_to(tmp_path / "data" / "monarch")
    (tmp_path / "data" / "monarch" / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")
    ds = read_dataset(tmp_path / "data")
    assert len(ds) == 3  # its own picture and the two linked ones; the loop adds nothing
    assert [p.kind for p in ds.problems] == ["missing_file"]  # the dangling link, listed
    os.mkfifo(tmp_path / "data" / "monarch" / "fifo.jpg")  # not a link, nor to be opened
    said = [p.message for p in read_dataset(tmp_path / "data").problems if "fifo" in p.path]
    assert said == ["not a regular file (a pipe, socket or device); ignored"]
    os.remove(tmp_path / "data" / "monarch" / "fifo.jpg")
    # A link up the tree (a "shortcut to Photos") or into another class would give this
    # class the others' photos too: not followed, and said. Windows' junk is no problem.
    folder_dataset(tmp_path / "data", {"admiral": 2})
    (tmp_path / "data" / "monarch" / "Shortcut to Photos").symlink_to(tmp_path / "data")
    (tmp_path / "data" / "monarch" / "admirals").symlink_to(tmp_path / "data" / "admiral")
    (tmp_path / "data" / "monarch" / "Thumbs.db").write_bytes(b"\0" * 10)
    ds = read_dataset(tmp_path / "data")
    assert ds.class_counts().to_dict() == {"monarch": 3, "admiral": 2}
    linked = {os.path.basename(p.path): p.message for p in ds.problems
              if p.kind == "link_not_followed"}
    assert set(linked) == {"Shortcut to Photos", "admirals"}
    assert "a folder above it: not followed" in linked["Shortcut to Photos"]
    assert "another part of the data: not followed" in linked["admirals"]
    assert "not_image" not in {p.kind for p in ds.problems}
    # A class folder that is a link to another (or to the data): not a class of its own,
    # whose photos were "the same picture in two class folders", the link unnamed. A link
    # to a folder elsewhere is a class like any.
    (tmp_path / "data" / "monarch_link").symlink_to(tmp_path / "data" / "monarch")
    (tmp_path / "data" / "all").symlink_to(tmp_path / "data")
    (tmp_path / "data" / "y2023").symlink_to(tmp_path / "elsewhere" / "y2023")
    (tmp_path / "data" / "y2023_again").symlink_to(tmp_path / "elsewhere" / "y2023")
    # (a class kept in a hidden folder of the data and linked: a class like any)
    folder_dataset(tmp_path / "data" / ".pool", {"swallowtail": 2})
    (tmp_path / "data" / "swallowtail").symlink_to(tmp_path / "data" / ".pool" / "swallowtail")
    ds = read_dataset(tmp_path / "data")
    assert ds.class_counts().to_dict() == {"monarch": 3, "swallowtail": 2, "y2023": 2,
                                           "admiral": 2}
    linked = {os.path.basename(p.path): p.message for p in ds.problems
              if p.kind == "link_not_followed"}
    assert {"monarch_link", "all", "y2023_again"} <= set(linked)
    assert not {"y2023", "swallowtail"} & set(linked)
    assert linked["monarch_link"].endswith("another class folder, or the data itself: not "
                                           "read as a class of its own (its images would take "
                                           "two labels); delete the link")
    assert "which another link leads to" in linked["y2023_again"]


def test_a_decomposed_folder_name_matches_its_composed_taxonomy_row(tmp_path):
    """macOS writes 'é' as 'e' + a combining accent in folder names."""
    import unicodedata

    folder_dataset(tmp_path, {unicodedata.normalize("NFD", "paon du jour é"): 2})
    (tmp_path / "taxonomy.csv").write_text("folder,family\npaon du jour é,Nymphalidae\n",
                                           encoding="utf-8")
    ds = read_dataset(tmp_path)
    assert set(ds.table["label"]) == {"paon du jour é"}
    assert (ds.table["family"] == "Nymphalidae").all() and not ds.problems


@pytest.mark.parametrize("taxonomy", [
    "folder,family,\nmonarch,Nymphalidae,\nadmiral,Nymphalidae,\n",  # saved from Excel
    "folder, family\nmonarch , Nymphalidae\nadmiral,Nymphalidae \n",  # spaces
])
def test_a_taxonomy_file_is_read_as_loosely_as_the_data(tmp_path, taxonomy):
    folder_dataset(tmp_path, {"monarch": 1, "admiral": 1})
    (tmp_path / "taxonomy.csv").write_text(taxonomy)
    ds = read_dataset(tmp_path)
    assert ds.levels == ["family", "label"] and not ds.problems
    assert (ds.table["family"] == "Nymphalidae").all()


def test_a_taxonomy_column_named_like_a_table_column_is_refused(tmp_path):
    folder_dataset(tmp_path, {"monarch": 1})
    (tmp_path / "taxonomy.csv").write_text("folder,family,group\nmonarch,Nymphalidae,x\n")
    with pytest.raises(WingspanError, match="column named 'group'"):
        read_dataset(tmp_path)


def test_empty_spreadsheet_columns_are_dropped_and_a_skipped_taxonomy_is_said(tmp_path):
    folder_dataset(tmp_path / "img", {"monarch": 1, "admiral": 1})
    (tmp_path / "taxonomy.csv").write_text("folder,family\nmonarch,Nymphalidae\n"
                                           "admiral,Nymphalidae\n")
    (tmp_path / "data.csv").write_text("path,label,,\nimg\\monarch\\monarch_0.jpg,monarch,,\n"
                                       "img/admiral/admiral_0.jpg,admiral,,\n")
    ds = read_dataset(tmp_path / "data.csv")  # a Windows path too
    assert ds.levels == ["family", "label"] and len(ds) == 2 and not ds.problems
    (tmp_path / "data.csv").write_text("path,label,photographer\n"
                                       "img/monarch/monarch_0.jpg,monarch,Ann\n")
    ds = read_dataset(tmp_path / "data.csv")
    assert ds.levels == ["photographer", "label"]
    assert [p.kind for p in ds.problems] == ["taxonomy_ignored"]


def test_a_stray_split_json_says_how_to_read_class_folders(tmp_path):
    folder_dataset(tmp_path, {"monarch": 1})
    (tmp_path / "train.json").write_text('{"losses": [1, 2]}')
    with pytest.raises(WingspanError) as e:
        read_dataset(tmp_path)
    assert "--format folder" in e.value.hint
    assert read_dataset(tmp_path, ReadConfig(format="folder")).class_counts().to_dict() == {
        "monarch": 1}


def test_levels_with_as_many_classes_go_in_rank_order(tmp_path):
    """One genus per family (a small collection) ties their class counts: the CSV's own
    column order (genus first) put genus above family, and a genus under two families
    was reported as a family under two genera."""
    from wingspan.data.taxonomy import taxonomy_conflicts

    folder_dataset(tmp_path, {"a": 1, "b": 1, "c": 1, "d": 1})
    csv = tmp_path / "specimens.csv"
    csv.write_text("path,label,genus,family\n"
                   "a/a_0.jpg,Pieris rapae,Pieris,Pieridae\n"
                   "b/b_0.jpg,Pieris napi,Pieris,Papilionidae\n"
                   "c/c_0.jpg,Papilio machaon,Papilio,Papilionidae\n"
                   "d/d_0.jpg,Vanessa cardui,Vanessa,Nymphalidae\n")
    ds = read_dataset(csv)
    assert ds.levels == ["family", "genus", "label"]
    assert "genus 'Pieris' is under 2 family values: ['Papilionidae', 'Pieridae']" \
        in taxonomy_conflicts(ds.table, ds.levels)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_csv_saved_by_a_european_spreadsheet_is_read(tmp_path, sep):
    """Excel where the comma is the decimal point saves "CSV" with semicolons (and a BOM
    and CRLF as "CSV UTF-8"): read as it was meant, not as one column named
    'path;label;family' and refused."""
    folder_dataset(tmp_path, {"a": 2, "b": 1})
    rows = ["path,label,family", "a/a_0.jpg,Pieris rapae,Pieridae",
            "a/a_1.jpg,Pieris rapae,Pieridae", "b/b_0.jpg,Papilio machaon,Papilionidae"]
    csv = tmp_path / "specimens.csv"
    csv.write_bytes(("\ufeff" + "\r\n".join(r.replace(",", sep) for r in rows) + "\r\n")
                    .encode("utf-8"))
    ds = read_dataset(csv)
    assert ds.levels == ["family", "label"]
    assert ds.table["label"].tolist() == ["Pieris rapae", "Pieris rapae", "Papilio machaon"]
    assert ds.table["family"].tolist() == ["Pieridae", "Pieridae", "Papilionidae"]
    # A row with a field too many is still found, counted in the file's own separator.
    csv.write_text(f"path{sep}label\na/a_0.jpg{sep}x{sep}extra\n")
    with pytest.raises(WingspanError, match="line 2: 3 fields"):
        read_dataset(csv)


@pytest.mark.parametrize("header, sep", [
    ("path\tlabel\tgenus;species", "\t"),  # no comma, a ';' inside a name: not split there
    ("path\tlabel\tlength, mm", "\t"),  # a comma inside a name of a tab-separated file
    ('path;label;"length, mm"', ";"),  # a quoted comma in a semicolon file's header
])
def test_the_separator_is_the_one_that_reads_the_header_as_columns(tmp_path, header, sep):
    """A separator inside a column name does not decide how the file is split: the one
    that names the expected column (else gives the most columns) does."""
    from wingspan.data.taxonomy import read_taxonomy

    folder_dataset(tmp_path, {"a": 2})
    csv = tmp_path / "specimens.csv"
    csv.write_text(header + "\n" + "".join(f"a/a_{i}.jpg{sep}Pieris rapae{sep}x\n"
                                           for i in range(2)))
    ds = read_dataset(csv)
    assert ds.table["label"].tolist() == ["Pieris rapae"] * 2
    assert ds.levels[-1] == "label" and len(ds.levels) == 2  # the third column: a level
    # As many columns either way: the separator that names the 'folder' column.
    taxonomy = tmp_path / "taxonomy.csv"
    taxonomy.write_text("folder\tfamily, Latin\nmonarch\tNymphalidae\n")
    assert read_taxonomy(taxonomy).to_dict() == {"family, Latin": {"monarch": "Nymphalidae"}}


def test_csv_paths_written_from_the_current_folder_say_where_they_are_read_from(
        tmp_path, monkeypatch):
    """museum/specimens.csv listing museum/img/a.jpg (relative to where the user stood):
    every file was 'missing', with a hint to check the image root."""
    folder_dataset(tmp_path / "museum" / "img", {"a": 2})
    csv = tmp_path / "museum" / "specimens.csv"
    csv.write_text("path,label\nmuseum/img/a/a_0.jpg,x\nmuseum/img/a/a_1.jpg,x\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WingspanError, match=r"from the CSV's folder .*museum\).*current folder "
                       r"\(e\.g\. museum/img/a/a_0\.jpg\)[\s\S]*e\.g\. img/a/a_0\.jpg"):
        read_dataset("museum/specimens.csv")
    # Written relative to the CSV, they are read; --metadata-only does not look.
    assert len(read_dataset(csv, ReadConfig(check_files=False))) == 2
    csv.write_text("path,label\nimg/a/a_0.jpg,x\nimg/a/a_1.jpg,x\n")
    assert len(read_dataset("museum/specimens.csv")) == 2


def test_phone_and_camera_photos_that_cannot_be_read_are_named_as_such(tmp_path):
    folder_dataset(tmp_path, {"monarch": 2})
    (tmp_path / "monarch" / "IMG_0001.HEIC").write_bytes(b"\0" * 16)
    (tmp_path / "iphone").mkdir()
    for i in range(3):
        (tmp_path / "iphone" / f"IMG_{i}.heic").write_bytes(b"\0" * 16)
    (tmp_path / "iphone" / "DSC_1.NEF").write_bytes(b"\0" * 16)
    ds = read_dataset(tmp_path)
    said = {os.path.basename(p.path): p for p in ds.problems}
    assert said["IMG_0001.HEIC"].kind == "unsupported_photo"
    assert "a HEIC photo, which cannot be read here" in said["IMG_0001.HEIC"].message
    assert "a Nikon RAW photo" in said["DSC_1.NEF"].message
    assert "has no images it can read (4 photos in a format that cannot be read: convert " \
           "them to JPEG)" in said["iphone"].message


def test_predict_says_the_links_in_a_folder_it_does_not_follow(tmp_path):
    """A link to nothing (a photo on a disk not mounted) and one up the tree in a folder
    given to predict were dropped without a word."""
    folder_dataset(tmp_path / "photos", {"monarch": 2})
    (tmp_path / "photos" / "monarch" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "photos" / "monarch" / "loop").symlink_to(tmp_path)  # above the folder
    found, missing = expand_paths([str(tmp_path / "photos")])
    assert len(found) == 2
    said = {os.path.basename(p): why for p, why in missing}
    assert said.keys() == {"gone.jpg", "loop"}
    assert "a link to nothing" in said["gone.jpg"] and "a folder above it" in said["loop"]


def test_a_dead_link_in_a_class_folder_is_said_and_stops_strict(tmp_path):
    """--strict stops at a missing file in a class folder as in a CSV (it went on); a loop
    of links is said as one, not as a link to a missing file."""
    folder_dataset(tmp_path, {"monarch": 2, "admiral": 2})
    (tmp_path / "monarch" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "admiral" / "a.jpg").symlink_to(tmp_path / "admiral" / "b.jpg")
    (tmp_path / "admiral" / "b.jpg").symlink_to(tmp_path / "admiral" / "a.jpg")
    said = {os.path.basename(p.path): p.message for p in read_dataset(tmp_path).problems}
    assert said["gone.jpg"].startswith("a link to nothing")
    assert said["a.jpg"].startswith("a loop of links")
    with pytest.raises(WingspanError, match="3 links in the class folders of .* lead to no "
                                            "image, e.g. .*"):
        read_dataset(tmp_path, ReadConfig(strict=True))


def test_class_folders_that_differ_only_in_case_are_pointed_out(tmp_path):
    folder_dataset(tmp_path, {"admiral": 2, "Admiral": 1, "monarch": 1})
    ds = read_dataset(tmp_path)
    assert ds.class_counts().to_dict() == {"admiral": 2, "Admiral": 1, "monarch": 1}
    [said] = [p for p in ds.problems if p.kind == "classes_differ_in_case"]
    assert "'Admiral' and 'admiral' differ only in case, and are read as 2 classes" in \
        said.message
    # In a CSV too, at every level: one species typed two ways is two classes.
    (tmp_path / "labels.csv").write_text(
        "path,label,genus\nadmiral/admiral_0.jpg,Pieris napi,Pieris\n"
        "admiral/admiral_1.jpg,pieris napi,pieris\nmonarch/monarch_0.jpg,Danaus,Danaus\n")
    said = [p.message for p in read_dataset(tmp_path / "labels.csv").problems
            if p.kind == "classes_differ_in_case"]
    assert said == ["the label values 'Pieris napi' and 'pieris napi' differ only in case, and "
                    "are read as 2 classes; write them alike to make them one",
                    "the genus values 'Pieris' and 'pieris' differ only in case, and are read "
                    "as 2 classes; write them alike to make them one"]


def test_class_folders_that_look_alike_are_pointed_out(tmp_path):
    """A Hebrew name copied with an invisible right-to-left mark, and a Japanese one typed
    in half-width katakana, were two classes beside their twins, with no word said."""
    folder_dataset(tmp_path, {"\u05e4\u05e8\u05e4\u05e8": 2, "\u05e4\u05e8\u05e4\u05e8\u200f": 1,
                              "\u30a2\u30b2\u30cf": 2, "\uff71\uff79\uff9e\uff8a": 1, "monarch": 1})
    said = sorted(p.message for p in read_dataset(tmp_path).problems
                  if p.kind == "classes_differ_in_case")
    assert len(said) == 2, said
    assert all("differ only in case, spacing, width or invisible marks, and are read as 2 "
               "classes" in s for s in said), said
    assert any("'\u05e4\u05e8\u05e4\u05e8\\u200f'" in s for s in said), said  # the mark shown


def test_labels_that_differ_in_spacing_are_pointed_out(tmp_path):
    """A spreadsheet's 'Vanessa  cardui' (two spaces) beside 'Vanessa cardui' was a class
    of its own with "No problems found"; a zero-width space, the same; and twins with a
    no-break space were named in words that read alike."""
    folder_dataset(tmp_path, {"a": 4})
    rows = ["Vanessa cardui", "Vanessa  cardui", "Vanessa\u200bcardui", "Vanessa\u00a0cardui"]
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(
        f"a/a_{i}.jpg,{label}\n" for i, label in enumerate(rows)), encoding="utf-8")
    ds = read_dataset(tmp_path / "labels.csv")
    assert len(ds.class_counts()) == 4  # (read as written: the message says how to mend it)
    [said] = [p.message for p in ds.problems if p.kind == "classes_differ_in_case"]
    assert said == ("the label values 'Vanessa  cardui' and 'Vanessa cardui' and "
                    "'Vanessa\\u00a0cardui' and 'Vanessa\\u200bcardui' differ only in case, "
                    "spacing, width or invisible marks, and are read as 4 classes; write them "
                    "alike to make them one")


def test_a_folder_that_cannot_be_listed_is_said_not_skipped(tmp_path, monkeypatch, run_cli):
    """os.walk passes over a folder it may not list without a word: its photos would be
    lost silently. (Simulated: CI runs as root, for whom chmod 000 changes nothing.)"""
    folder_dataset(tmp_path, {"monarch": 2, "admiral": 2})
    write_image(tmp_path / "monarch" / "2023" / "a.jpg")
    locked = {str(tmp_path / "monarch" / "2023"), str(tmp_path / "admiral")}
    scandir = os.scandir

    def guarded(path="."):
        if os.fspath(path) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    stat = os.stat

    def entered(path, *args, **kwargs):  # what is inside a folder we may not enter
        if os.path.dirname(os.fspath(path)) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", guarded)
    monkeypatch.setattr(os, "stat", entered)  # (Path.is_file raised it: train stopped on
    ds = read_dataset(tmp_path)  # "Permission denied: admiral/manifest.json")
    assert ds.class_counts().to_dict() == {"monarch": 2}
    said = {(p.kind, p.path): p.message for p in ds.problems}
    assert "Permission denied" in said["unreadable_folder", str(tmp_path / "monarch" / "2023")]
    assert ("unreadable_folder", str(tmp_path / "admiral")) in said
    # The class left out is not said to be empty of images, but to be locked.
    assert "may list (check its permissions)" in said["empty_class", str(tmp_path / "admiral")]
    # predict lists it among the inputs skipped, with the reason.
    found, skipped = expand_paths([str(tmp_path / "monarch")])
    assert len(found) == 2
    assert [p for p, _ in skipped] == [str(tmp_path / "monarch" / "2023")]
    _, skipped = expand_paths([str(tmp_path / "admiral") + "/"])  # said once, not twice
    assert [p for p, _ in skipped] == [str(tmp_path / "admiral")]
    # An unreadable data folder itself: a message, not a traceback.
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", os.fspath(p))) if os.fspath(p) == str(tmp_path)
        else listdir(p))
    code, _, err = run_cli("data", "inspect", tmp_path)
    assert code == 2 and "Permission denied" in err and "Traceback" not in err


def test_an_empty_path_is_not_the_current_folder(tmp_path, monkeypatch):
    """`wingspan predict RUN "$PHOTOS"` with the variable unset: '' was read as '.', and
    every image below the current folder was predicted (a home folder, say)."""
    write_image(tmp_path / "here.jpg")
    monkeypatch.chdir(tmp_path)
    for empty in ("", " "):
        found, skipped = expand_paths([empty, "here.jpg"])
        assert found == ["here.jpg"]
        assert skipped[0][0] == repr(empty) and "an empty path" in skipped[0][1]


def test_a_recursive_glob_gives_each_image_once_and_passes_over_what_a_folder_would(tmp_path):
    """`photos/**` matches the folders and the files in them: each image predicted once
    (twice or three times, it doubled a species' count in the CSV), and the files that a
    folder's search passes over (Thumbs.db, notes.txt) passed over too; a HEIC photo, in a
    glob or named, said as such."""
    for name in ("monarch/a.jpg", "monarch/b.jpg", "admiral/deep/c.jpg"):
        write_image(tmp_path / "photos" / name)
    (tmp_path / "photos" / "monarch" / "Thumbs.db").write_bytes(b"\0" * 10)
    (tmp_path / "photos" / "monarch" / "notes.txt").write_text("seen on the fence")
    heic = tmp_path / "photos" / "IMG_1.HEIC"
    heic.write_bytes(b"\0\0\0\x18ftypheic")
    images = sorted(str(p) for p in (tmp_path / "photos").rglob("*.jpg"))
    for pattern in ("photos/**", "photos/**/*"):
        found, skipped = expand_paths([str(tmp_path / pattern)])
        assert sorted(found) == images and len(found) == len(images), pattern
        assert [(path, why.split(",")[0]) for path, why in skipped] == [
            (str(heic), "a HEIC photo")], pattern
    found, skipped = expand_paths([images[0], str(tmp_path / "photos"), str(heic)])
    assert found[0] == images[0] and sorted(found) == images  # given first, kept first
    assert [path for path, _ in skipped] == [str(heic)]  # in the folder and named: once
    # As zsh expands photos/**/* unquoted: the folders, then the files in them.
    found, _ = expand_paths([str(tmp_path / "photos" / "monarch"), *images])
    assert sorted(found) == images and len(found) == len(images)
    # A file named twice is predicted twice: a row for each input, in order.
    assert expand_paths([images[0], images[0]])[0] == [images[0], images[0]]
    _, skipped = expand_paths([str(tmp_path / "photos" / "monarch" / "*.txt")])
    assert skipped == [(str(tmp_path / "photos" / "monarch" / "*.txt"),
                        "the pattern matches no image file")]


def test_a_class_folder_linked_to_nothing_is_said_not_dropped(tmp_path):
    """A class folder that links to an external disk not mounted vanished without a word."""
    folder_dataset(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "monarch_external").symlink_to(tmp_path / "not-mounted" / "monarchs")
    ds = read_dataset(tmp_path)
    (gone,) = [p for p in ds.problems if p.kind == "missing_file"]
    assert gone.path == str(tmp_path / "monarch_external")
    assert "not-mounted/monarchs, which is not there" in gone.message
    assert sorted(set(ds.table["label"])) == ["a", "b"]


def test_class_folders_spelt_in_two_unicode_forms_are_one_class_and_said(tmp_path):
    import unicodedata

    composed, decomposed = (unicodedata.normalize(f, "Bläuling") for f in ("NFC", "NFD"))
    try:
        folder_dataset(tmp_path, {composed: 2})
        folder_dataset(tmp_path, {decomposed: 3})
    except OSError:  # a file system that keeps one spelling (macOS's) cannot hold both
        pytest.skip("this file system normalises names")
    if len([p for p in tmp_path.iterdir() if p.is_dir()]) < 2:
        pytest.skip("this file system normalises names")
    ds = read_dataset(tmp_path)
    assert ds.class_counts().to_dict() == {composed: 5}
    (merged,) = [p for p in ds.problems if p.kind == "classes_merged"]
    assert "two Unicode spellings" in merged.message and f"'{composed}'" in merged.message


def test_a_level_data_without_a_taxonomy_lacks_says_where_levels_come_from(tmp_path):
    folder_dataset(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(WingspanError, match="no label level 'family'") as e:
        read_dataset(tmp_path).resolve_level("family")
    assert "Choose one of: label. Coarser levels come from a taxonomy.csv" in e.value.hint


def test_a_taxonomy_row_spelt_in_another_case_is_named(tmp_path):
    folder_dataset(tmp_path, {"008-pieris_rapae": 1, "001-danaus": 1})
    (tmp_path / "taxonomy.csv").write_text("folder,family\n008-Pieris_Rapae,Pieridae\n"
                                           "001-danaus,Nymphalidae\n")
    (missing,) = [p for p in read_dataset(tmp_path).problems if p.kind == "taxonomy_missing"]
    assert missing.message.endswith("Its row '008-Pieris_Rapae' differs only in case: write it "
                                    "as the folder is named.")


def test_two_class_folders_given_one_species_are_said(tmp_path):
    """A row copied and not edited: two folders became one species class, and nothing
    said so (`data inspect`: "No problems found"; train: "species: 5 classes" of 6)."""
    folder_dataset(tmp_path, {"eyed_scallop": 2, "red_banded": 2, "monarch": 2})
    (tmp_path / "taxonomy.csv").write_text(
        "folder,family,genus,specific_epithet\neyed_scallop,Nymphalidae,Synthia,rubrofasciata\n"
        "red_banded,Nymphalidae,Synthia,rubrofasciata\nmonarch,Nymphalidae,Danaus,plexippus\n")
    ds = read_dataset(tmp_path)
    (merged,) = [p for p in ds.problems if p.kind == "taxonomy_merges"]
    assert merged.message.startswith("The class folders eyed_scallop, red_banded are all "
                                     "species 'Synthia rubrofasciata'")
    assert ds.table["species"].nunique() == 2 and ds.table["label"].nunique() == 3



def test_names_that_are_not_utf8_are_left_out_and_said(tmp_path):
    """A file or class folder named in another encoding (b'caf\\xe9.jpg', from a zip made
    on Windows): its lone surrogate crashed train's splits.csv, predict's CSV and the
    plots, after the work; the readers now leave it out and say so, the rest read."""
    from wingspan.data.split import write_splits

    for i in range(3):
        write_image(tmp_path / "a" / f"{i}.jpg", seed=i)
        write_image(tmp_path / "b" / f"{i}.jpg", seed=10 + i)
    odd_file = tmp_path / "a" / os.fsdecode(b"caf\xe9.jpg")
    odd_class = tmp_path / os.fsdecode(b"\xe9t\xe9")
    write_image(odd_file, seed=20)
    write_image(odd_class / "0.jpg", seed=21)
    ds = read_dataset(tmp_path)
    assert len(ds) == 6 and sorted(ds.table["label"].unique()) == ["a", "b"]
    said = [p for p in ds.problems if p.kind == "name_not_utf8"]
    assert sorted(p.path.rsplit("/", 2)[-2] + "/" + p.path.rsplit("/", 1)[-1] for p in said) \
        == ["\\udce9t\\udce9/0.jpg", "a/caf\\udce9.jpg"]
    write_splits(ds, tmp_path / "splits.csv")  # crashed: surrogates not allowed
    assert "caf" not in (tmp_path / "splits.csv").read_text(encoding="utf-8")
    # predict reads such a file; its CSV (which that name stopped) spells it out.
    from wingspan.predict import PredictResult, write_predictions

    found, skipped = expand_paths([str(tmp_path / "a")])
    assert str(odd_file) in found and not skipped
    write_predictions(PredictResult(failed=[(str(odd_file), "broken")], order=[("failed", 0)]),
                      tmp_path / "p.csv")
    assert "caf\\udce9.jpg" in (tmp_path / "p.csv").read_text(encoding="utf-8")
    # A dataset of such names alone: the error says why.
    only = tmp_path / "only"
    write_image(only / os.fsdecode(b"\xe9") / "0.jpg", seed=22)
    with pytest.raises(WingspanError, match="not UTF-8 text"):
        read_dataset(only)
    # The data's own place so named: read (inspect and predict read it before), and said
    # where splits.csv cannot name it (a traceback).
    place = tmp_path / os.fsdecode(b"d\xe9j\xe0")
    for label in "ab":
        write_image(place / label / "0.jpg", seed=ord(label))
    ds = read_dataset(place)
    assert len(ds) == 2 and not ds.problems
    with pytest.raises(WingspanError, match="splits.csv cannot hold"):
        write_splits(ds, tmp_path / "splits2.csv", relative=False)


def test_a_jpeg_under_a_phone_photos_name_is_read_by_its_bytes(tmp_path):
    """x.heic holding a JPEG (some exports keep the name): a folder skipped it, predict
    called it "a HEIC photo, which cannot be read here", while a CSV row and serve read it.
    A real HEIC is still left out, with that reason."""
    for i in range(2):
        write_image(tmp_path / "a" / f"{i}.jpg", seed=i)
        write_image(tmp_path / "b" / f"{i}.jpg", seed=10 + i)
    disguised = write_image(tmp_path / "a" / "IMG_1.HEIC", seed=5, fmt="JPEG")
    real = tmp_path / "b" / "IMG_2.heic"
    real.write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))
    ds = read_dataset(tmp_path)
    assert str(disguised) in set(ds.table["path"]) and str(real) not in set(ds.table["path"])
    assert [p.path for p in ds.problems if p.kind == "unsupported_photo"] == [str(real)]
    for given in ([str(disguised), str(real)], [str(tmp_path / "*" / "IMG_*")]):
        found, skipped = expand_paths(given)
        assert found == [str(disguised)], (given, found)
        assert [(p, why.split(",")[0]) for p, why in skipped] == [
            (str(real), "a HEIC photo")], skipped


def test_a_pattern_in_a_folder_named_with_brackets_says_how_to_match_it(tmp_path):
    """"2024 [garden]/*.jpg" matched nothing (the brackets are a pattern), said as "no such
    file or folder, nor any match": the reason now says how to write it."""
    import glob

    folder = tmp_path / "2024 [garden]"
    write_image(folder / "a.jpg", seed=1)
    found, skipped = expand_paths([str(folder / "*.jpg")])
    assert found == [] and "'[' begins a pattern" in skipped[0][1], skipped
    escaped = skipped[0][1].split("(")[-1].rstrip(")").replace("...", "*.jpg")
    assert glob.glob(escaped) == [str(folder / "a.jpg")]  # the spelling it gives works
    found, skipped = expand_paths([str(tmp_path / "nothing" / "*.jpg")])
    assert skipped[0][1] == "no such file or folder, nor any match as a pattern"
    found, skipped = expand_paths([str(folder / "b.jpg")])  # a slip in the file's name
    assert skipped[0][1] == "no such file or folder, nor any match as a pattern"


def _small_ethec(root, records=None):
    """An ETHEC root of 2 species, 4 train, 2 val and 2 test images each; `records` (token:
    record) are added to train.json, the file of their image written where one is named."""
    (root / "splits").mkdir(parents=True)
    n = 0
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        recs = {}
        for genus, epithet in (("Pieris", "rapae"), ("Erebia", "aethiops")):
            for _ in range(count):
                n += 1
                recs[f"t{n}"] = {"token": f"t{n}", "image_path": "d", "image_name": f"{n}.jpg",
                                 "family": "Pieridae", "subfamily": "Pierinae", "genus": genus,
                                 "specific_epithet": epithet, "barcode": f"B{n}"}
                write_image(root / IMAGE_DIR / "d" / f"{n}.jpg", seed=n, fmt="JPEG")
        if split == "train":
            recs.update(records or {})
            for r in (records or {}).values():
                if isinstance(r, dict) and r.get("image_name"):
                    write_image(root / IMAGE_DIR / "d" / r["image_name"], seed=7, fmt="JPEG")
        (root / "splits" / f"{split}.json").write_text(json.dumps(recs))
    return root


def test_a_part_of_an_ethec_dataset_given_for_it_names_the_root(tmp_path, monkeypatch):
    """The image folder read as 95 classes named after scan dates; the folder around the
    root as one class; the splits folder as 19,771 missing images; a split file as no
    format at all. Each now names the root to give."""
    root = _small_ethec(tmp_path / "download" / "ETHEC_dataset")
    (tmp_path / "download" / "ETHEC_dataset.zip").write_bytes(b"PK")
    for given, what in ((root / "splits" / "train.json", "is a split file of"),
                        (root / "splits", "is the folder of the split files of"),
                        (root / IMAGE_DIR, "is the image folder of"),
                        (tmp_path / "download", "is the folder that holds")):
        with pytest.raises(WingspanError, match=f"{what} the ETHEC dataset at") as e:
            read_dataset(given)
        assert e.value.hint.startswith(f"Give {root} as DATA")
    monkeypatch.chdir(root / IMAGE_DIR)  # `wingspan data inspect .` from inside it
    with pytest.raises(WingspanError, match="is the image folder of the ETHEC dataset at"):
        read_dataset(".")
    assert read_dataset(root).format == "ethec"
    # Asked for as a folder of classes, it is one (whatever it is).
    assert read_dataset(root / IMAGE_DIR, ReadConfig(format="folder")).format == "folder"


def test_an_ethec_record_without_a_genus_is_left_out_by_token_and_names_are_stripped(tmp_path):
    """A null or blank rank made a blank label that `train --levels` refused with a hint
    about taxonomy.csv (ETHEC has none), and `inspect` said nothing; a genus with a space
    after it was a second genus."""
    base = {"image_path": "d", "family": "Pieridae", "subfamily": "Pierinae",
            "specific_epithet": "rapae", "barcode": "X"}
    root = _small_ethec(tmp_path / "e", {
        "nogenus": {**base, "token": "nogenus", "image_name": "x1.jpg", "genus": None},
        "spaced": {**base, "token": "spaced", "image_name": "x2.jpg", "genus": "Pieris ",
                   "barcode": "Y"}})
    ds = read_dataset(root)
    assert ds.table["genus"].value_counts().to_dict() == {"Pieris": 9, "Erebia": 8}
    assert not ds.table["path"].str.endswith("x1.jpg").any()
    said = [p.message for p in ds.problems if p.kind == "unnamed_taxon"]
    assert said == ["train: 1 record lacks a family, subfamily, genus or specific epithet (e.g. "
                    "record nogenus: no genus): left out",
                    "train: record nogenus left out: it lacks a family, subfamily, genus or "
                    "specific epithet"]


def test_a_damaged_ethec_file_names_its_record_and_says_to_download_again(tmp_path):
    root = _small_ethec(tmp_path / "e", {"bad": "Pieris rapae"})
    with pytest.raises(WingspanError, match="record bad is not an ETHEC record") as e:
        read_dataset(root)
    assert "download the dataset again" in e.value.hint
    root = _small_ethec(tmp_path / "f")
    text = (root / "splits" / "val.json").read_text()
    (root / "splits" / "val.json").write_text(text[: len(text) // 2])  # cut short
    with pytest.raises(WingspanError, match="val.json is damaged") as e:
        read_dataset(root)
    assert "download the dataset again" in e.value.hint
    # Another tool's train.json beside class folders (UTF-16 text, say) is no damaged ETHEC.
    folder_dataset(tmp_path / "g", {"monarch": 1})
    (tmp_path / "g" / "train.json").write_text('{"a": 1}', encoding="utf-16")
    with pytest.raises(WingspanError, match="Cannot read .* as an ETHEC split file") as e:
        read_dataset(tmp_path / "g")
    assert "--format folder" in e.value.hint


def test_reading_says_a_lone_sum_as_it_is_and_counts_many_of_a_kind(tmp_path):
    """ETHEC's '49 images are in more than one split' read '1 x image in two splits, e.g.
    49 images ...'; a kind of many cases without a path (a class each) stays counted."""
    from wingspan.data.samples import Problem, report_reading

    folder_dataset(tmp_path, {"monarch": 2, "admiral": 2})
    ds = read_dataset(tmp_path)
    ds.problems = [Problem("taxonomy_missing", "class a has no row"),
                   Problem("taxonomy_missing", "class b has no row"),
                   Problem("image_in_two_splits", "49 images are in more than one split")]
    logged: list[str] = []
    report_reading(ds, logged.append)
    assert logged == ["While reading the data: 2 x taxonomy missing, e.g. class a has no row",
                      "While reading the data: 49 images are in more than one split"]


def test_a_column_of_specimen_ids_not_named_group_is_pointed_out(tmp_path):
    """A curator's `specimen` column was read as a coarser level, with no word said: the
    split then put one specimen's photos on two sides. A real coarser level is not such."""
    folder_dataset(tmp_path, {"monarch": 4, "admiral": 4})
    rows = [(f"{c}/{c}_{i}.jpg", c, f"{c[0]}{i // 2}", "Danaus" if c == "monarch" else "Vanessa")
            for c in ("monarch", "admiral") for i in range(4)]
    for column, values in (("Specimen ID", 2), ("genus", 3)):
        (tmp_path / "s.csv").write_text(f"path,label,{column}\n" + "".join(
            f"{r[0]},{r[1]},{r[values]}\n" for r in rows))
        said = [p.message for p in read_dataset(tmp_path / "s.csv").problems
                if p.kind == "column_finer_than_label"]
        assert said == ([] if column == "genus" else [
            "the column 'Specimen ID' is finer than the label (4 values, each of one class, "
            "up to 2 rows each), yet is read as a coarser level, as every extra column is: if "
            "it names specimens or observations, name it 'group' to keep each one's photos on "
            "one side of a split; if it is a finer rank (subspecies), make it the label or "
            "leave it out"])
    # Named 'group', it groups: nothing to say.
    (tmp_path / "s.csv").write_text("path,label,group\n" + "".join(
        f"{r[0]},{r[1]},{r[2]}\n" for r in rows))
    ds = read_dataset(tmp_path / "s.csv")
    assert not [p for p in ds.problems if p.kind == "column_finer_than_label"]
    assert ds.table["group"].nunique() == 4


def test_a_spreadsheets_empty_rows_are_no_records(tmp_path):
    """Excel writes ",,,," for the empty rows under a table: each was said as "a row with an
    empty label; skipped" of no file. A row with a path and no label still is."""
    folder_dataset(tmp_path, {"monarch": 2, "admiral": 2})
    (tmp_path / "s.csv").write_text(
        "path,label,split,\r\nmonarch/monarch_0.jpg,monarch,train,\r\n"
        "admiral/admiral_0.jpg,admiral,train,\r\nmonarch/monarch_1.jpg,,train,\r\n"
        ",,,\r\n , ,,\r\n,,train,\r\n,,train,\r\n", encoding="utf-8-sig")  # (filled down)
    ds = read_dataset(tmp_path / "s.csv")
    assert len(ds.table) == 2
    said = [(p.kind, os.path.basename(p.path)) for p in ds.problems]
    assert said == [("no_label", "monarch_1.jpg")]
    # A label with no path was "a folder, not an image file" (the CSV's own folder), and
    # two such "listed 2 times, with the labels ...": said by its line. Lines stay the
    # file's after empty rows (a wrong split value's too).
    (tmp_path / "s.csv").write_text(
        "path,label,split\n,,\n\nmonarch/monarch_0.jpg,monarch,train\n,admiral,train\n"
        ", monarch ,val\n\nadmiral/admiral_0.jpg,admiral,train\n")
    ds = read_dataset(tmp_path / "s.csv")
    assert len(ds.table) == 2
    assert [(p.kind, p.message, p.path) for p in ds.problems] == [
        ("no_path", f"line {n} has no path (label '{label}'); skipped", str(tmp_path / "s.csv"))
        for n, label in ((5, "admiral"), (6, " monarch "))]
    (tmp_path / "s.csv").write_text(
        "path,label,split\n,,\n\nmonarch/monarch_0.jpg,monarch,x\n")
    with pytest.raises(WingspanError, match="s.csv, line 4: split 'x'"):
        read_dataset(tmp_path / "s.csv")


def test_a_column_with_values_and_no_name_is_said_not_read_as_a_level(tmp_path):
    """A note typed beside the table, under no header, was read as a level named pandas'
    'Unnamed: 2', blank on every other row (114 'blank at a level' lines in inspect)."""
    folder_dataset(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "s.csv").write_text("path,label,\na/a_0.jpg,a,check this one\na/a_1.jpg,a,\n"
                                    "b/b_0.jpg,b,\nb/b_1.jpg,b,\n")
    ds = read_dataset(tmp_path / "s.csv")
    assert ds.levels == ["label"] and len(ds.table) == 4
    assert [(p.kind, p.message) for p in ds.problems] == [(
        "unnamed_column", "column 3 has values but no name in the header; not read (name it "
        "to read it as a coarser level)")]
