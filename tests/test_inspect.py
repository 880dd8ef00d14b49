import json
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import write_image
from PIL import Image

from wingspan.config import InspectConfig, ReadConfig
from wingspan.data import read_dataset
from wingspan.data.inspect import inspect_dataset, print_summary
from wingspan.data.plots import plot_class_balance


@pytest.fixture
def messy(tmp_path):
    """A CSV dataset seeded with one of every problem inspect must find."""
    d = tmp_path / "imgs"
    rows = []

    def add(name, label, split, **kw):
        rows.append((f"imgs/{name}", label, split))
        return write_image(d / name, **kw) if kw.get("size", True) else d / name

    for i in range(4):
        add(f"good_a{i}.jpg", "a", "train", size=(80, 80), seed=i)
        add(f"good_b{i}.jpg", "b", "train", size=(80, 80), seed=10 + i)
    add("cmyk.jpg", "a", "train", size=(80, 80), seed=20, mode="CMYK")
    add("rgba.png", "a", "val", size=(80, 80), seed=21, mode="RGBA")
    add("palette.png", "b", "val", size=(80, 80), seed=22, mode="P")
    add("tiny.jpg", "b", "train", size=(20, 12), seed=23)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    add("rotated.jpg", "a", "train", size=(90, 70), seed=24, exif=exif)
    exif = Image.Exif()
    exif[0x0112] = 9  # no orientation at all: decoding leaves it upright, unlisted
    add("odd_orientation.jpg", "b", "train", size=(90, 70), seed=25, exif=exif)
    deep = np.linspace(0, 65535, 80 * 80).reshape(80, 80).astype(np.uint16)
    Image.fromarray(deep).save(d / "deep.png")
    rows.append(("imgs/deep.png", "b", "train"))
    Image.new("RGB", (1, 40000)).save(d / "strip.png")  # refused by train and predict
    rows.append(("imgs/strip.png", "a", "train"))  # (was called tiny, and passed --strict)
    (d / "not_an_image.jpg").write_text("this is a text file")
    rows.append(("imgs/not_an_image.jpg", "a", "train"))
    good = write_image(d / "full.jpg", size=(200, 200), seed=25)
    rows.append(("imgs/full.jpg", "b", "train"))
    rows.append(("imgs/full.jpg", "b", "val"))  # one file listed twice: not a copy of itself
    (d / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    rows.append(("imgs/truncated.jpg", "b", "train"))
    shutil.copy(d / "good_a0.jpg", d / "copy_in_test.jpg")  # same bytes, another split
    rows.append(("imgs/copy_in_test.jpg", "a", "test"))
    shutil.copy(d / "good_b0.jpg", d / "copy_other_label.jpg")  # same bytes, another label
    rows.append(("imgs/copy_other_label.jpg", "a", "train"))
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(tmp_path / "data.csv",
                                                                  index=False)
    return tmp_path / "data.csv"


def test_inspect_finds_every_seeded_problem(messy, tmp_path):
    ds = read_dataset(messy)
    summary = inspect_dataset(ds, tmp_path / "out", InspectConfig(tiny_px=32), progress=False)
    images = summary["images"]
    names = lambda paths: {p.rsplit("/", 1)[-1] for p in paths}  # noqa: E731
    assert names(u["path"] for u in images["unreadable"]) == {"not_an_image.jpg",
                                                              "truncated.jpg", "strip.png"}
    assert "too long and thin" in next(u["error"] for u in images["unreadable"]
                                       if u["path"].endswith("strip.png"))
    assert "truncated" in next(u["error"] for u in images["unreadable"]
                               if u["path"].endswith("truncated.jpg"))
    modes = {k.split(" (")[0]: names(v) for k, v in images["unusual_modes"].items()}
    assert modes["CMYK colour"] == {"cmyk.jpg"}
    assert modes["alpha channel"] == {"rgba.png"}
    assert modes["palette"] == {"palette.png"}
    assert modes["16-bit"] == {"deep.png"}
    assert names(images["exif_rotated"]) == {"rotated.jpg"}
    assert names(t["path"] for t in images["tiny"]) == {"tiny.jpg"}
    dups = images["duplicates"]
    assert [names(g["paths"]) for g in dups["across_splits"]] == [
        {"good_a0.jpg", "copy_in_test.jpg"}]
    assert dups["across_splits"][0]["splits"] == ["test", "train"]
    assert [names(g["paths"]) for g in dups["conflicting_labels"]] == [
        {"good_b0.jpg", "copy_other_label.jpg"}]
    assert dups["extra_copies"] == 2
    # What was printed is what was written.
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["images"]["checked"] == 22


def test_inspect_counts_and_plots_per_level(demo_dir, tmp_path):
    ds = read_dataset(demo_dir)
    summary = inspect_dataset(ds, tmp_path, progress=False)
    assert summary["levels"]["label"]["counts"] == ds.class_counts().to_dict()
    assert summary["levels"]["label"]["imbalance_ratio"] == round(16 / 6, 2)
    assert summary["taxonomy_conflicts"] == [] and summary["blank_levels"] == []
    for level in ds.levels:
        with Image.open(tmp_path / f"balance_{level}.png") as im:
            assert im.width > 300 and im.height > 100


def test_inspect_reports_taxonomy_conflicts(demo_dir, tmp_path):
    ds = read_dataset(demo_dir)
    ds.table.loc[ds.table["label"] == ds.table["label"].iloc[-1], "family"] = "Wrongidae"
    genus = ds.table["genus"].iloc[-1]
    ds.table.loc[ds.table["genus"] == genus, "genus"] = ds.table["genus"].iloc[0]
    summary = inspect_dataset(ds, tmp_path, check_images=False, progress=False)
    assert any("under 2 family values" in c for c in summary["taxonomy_conflicts"])


def test_inspect_names_images_left_blank_at_a_level(demo_dir, tmp_path, capsys):
    ds = read_dataset(demo_dir)
    first, second = ds.table["path"].iloc[0], ds.table["path"].iloc[1]
    ds.table.loc[0, "genus"] = ""
    ds.table.loc[1, ["family", "subfamily"]] = ""  # two levels, one image: counted once
    summary = inspect_dataset(ds, tmp_path, check_images=False, progress=False)
    assert summary["blank_levels"] == [f"{first}: no genus", f"{second}: no family, subfamily"]
    print_summary(summary)
    printed = capsys.readouterr().out
    assert "blank at a level (train --levels refuses them in train and val): 2" in printed
    assert "No problems found" not in printed


@pytest.mark.parametrize("n_classes, most", [(10, 5000), (500, 5000), (60, 40)])
def test_balance_plot_is_readable_for_few_and_many_classes(tmp_path, n_classes, most,
                                                           monkeypatch):
    import matplotlib.figure

    rng = np.random.default_rng(0)
    counts = pd.Series(rng.zipf(1.5, n_classes).clip(1, most) + (25 if most < 100 else 0),
                       index=[f"species number {i}" for i in range(n_classes)])
    ticks, save = [], matplotlib.figure.Figure.savefig

    def saving(fig, *args, **kwargs):  # the y tick labels drawn (within the axis' view)
        fig.canvas.draw()
        ax = fig.axes[0]
        low, high = sorted(ax.get_ylim())  # (the bar chart's axis runs top-down)
        ticks.extend(t.get_text() for t in ax.get_yticklabels(which="both")
                     if t.get_text() and low <= t.get_position()[1] <= high)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", saving)
    path = plot_class_balance(counts, "species", tmp_path / "plot.png")
    with Image.open(path) as im:
        # Few classes: one labelled bar each, so the figure grows with them; many: fixed size.
        assert im.height < 1200
        assert im.width >= 800
    # Plain numbers: the log axis's ticks are mathtext, which the plots draw as written (a
    # class named "$5-$10" must read so), and read "$\mathdefault{10^{2}}$"; at least two
    # of them where the counts span less than a decade (25-65 a class: none, at first).
    assert len(ticks) >= 2 and not [t for t in ticks if "$" in t], ticks


def test_metadata_only_reads_labels_without_images(shared_data, tmp_path):
    ds = read_dataset(shared_data / "ethec-splits", ReadConfig(check_files=False))
    summary = inspect_dataset(ds, tmp_path, check_images=False, progress=False)
    # 561 species, one of them (Euphydryas sibirica) only in records whose file's name is in
    # image_path, read with no file looked for
    assert summary["levels"]["species"]["classes"] == 561
    assert "images" not in summary
    kinds = set(summary["reader_problems"])
    assert {"duplicate_record", "image_in_two_splits", "barcode_in_two_splits"} <= kinds


def test_the_sizes_line_gives_each_side_its_own_range(tmp_path):
    """The narrowest image need not be the shortest: widths and heights are said apart,
    not as a "min 1x1" that no image has."""
    from rich.console import Console

    from wingspan.data.inspect import print_summary

    write_image(tmp_path / "d" / "a" / "wide.png", size=(500, 20))
    write_image(tmp_path / "d" / "b" / "tall.png", size=(10, 300))
    write_image(tmp_path / "d" / "b" / "square.png", size=(40, 40))
    summary = inspect_dataset(read_dataset(tmp_path / "d"), tmp_path / "out", progress=False)
    console = Console(record=True, width=200)
    print_summary(summary, console)
    said = console.export_text()
    assert "Image sizes: widths 10-500 px (median 40), heights 20-300 px (median 40)" in said


def test_a_class_of_unreadable_files_is_pointed_out(tmp_path):
    """Its files count among the images, but training has nothing of it to learn from."""
    for i in range(3):
        write_image(tmp_path / "d" / "fine" / f"{i}.png", size=(16, 16), seed=i)
    (tmp_path / "d" / "broken").mkdir()
    (tmp_path / "d" / "broken" / "empty.jpg").write_bytes(b"")
    (tmp_path / "d" / "broken" / "text.jpg").write_text("not a picture")
    # An iPhone photo renamed .jpg: a HEIC, as training and predict say it.
    (tmp_path / "d" / "broken" / "phone.jpg").write_bytes(b"\0\0\0\x18ftypheic" + bytes(200))
    summary = inspect_dataset(read_dataset(tmp_path / "d"), tmp_path / "out", progress=False)
    assert summary["images"]["classes_without_readable_images"] == ["broken"]
    # Each file's reason as training and predict would give it: a cut-off copy is empty.
    errors = {u["path"].rsplit("/", 1)[-1]: u["error"] for u in summary["images"]["unreadable"]}
    assert errors == {"empty.jpg": "the file is empty (0 bytes)",
                      "text.jpg": "not an image (unrecognised format)",
                      "phone.jpg": "a HEIC photo, which cannot be read here"}
    from rich.console import Console

    from wingspan.data.inspect import print_summary

    console = Console(record=True, width=200)
    print_summary(summary, console)
    said = console.export_text()
    assert "classes with no readable image (training stops at them): 1" in said
    # What to fix first comes first: what stops training, then what is merely skipped.
    order = ["Fix first: train refuses these", "classes with no readable image",
             "Worth knowing: skipped or handled", "unreadable or truncated: 3"]
    assert [said.index(part) for part in order] == sorted(said.index(part) for part in order)


def test_inspect_names_the_groups_and_files_on_two_sides_that_train_refuses(tmp_path):
    """One file listed in train and test, and one observation on two sides: inspect said
    "No problems found", and then train refused the data without naming either."""
    from rich.console import Console

    from wingspan.config import TrainConfig
    from wingspan.errors import WingspanError
    from wingspan.training.prepare import _check_leaks

    for i in range(4):
        write_image(tmp_path / "img" / f"{i}.jpg", size=(40, 40), seed=i)
    (tmp_path / "l.csv").write_text(
        "path,label,split,group\nimg/0.jpg,a,train,\nimg/0.jpg,a,test,\n"
        "img/1.jpg,b,train,obs7\nimg/2.jpg,b,val,obs7\nimg/3.jpg,a,val,\n")
    ds = read_dataset(tmp_path / "l.csv")
    summary = inspect_dataset(ds, tmp_path / "out", progress=False)
    img = tmp_path / "img"
    assert summary["split_leaks"] == [
        f"group 'obs7' ({img / '1.jpg'}, {img / '2.jpg'}) on train+val",
        f"{img / '0.jpg'} on test+train"]
    console = Console(width=400, record=True)
    print_summary(summary, console)
    said = console.export_text()
    assert "groups or files on two sides of the split (train refuses them): 2" in said
    assert "No problems found" not in said
    with pytest.raises(WingspanError, match=r"1 group on two sides \(1 in train\+val\), "
                       r"e\.g\. group 'obs7'"):
        _check_leaks(ds, "label", TrainConfig(), print)


def test_a_class_misspelt_in_valid_is_said_before_train_refuses_it(tmp_path):
    """train/monarch beside valid/Monarch: two classes, one with no training image. The
    case twins were compared within each split folder only, and inspect found nothing."""
    from helpers import folder_dataset

    folder_dataset(tmp_path / "train", {"monarch": 3, "admiral": 3})
    folder_dataset(tmp_path / "valid", {"Monarch": 2, "admiral": 1, "onlyinval": 1})
    ds = read_dataset(tmp_path)
    (twins,) = [p for p in ds.problems if p.kind == "classes_differ_in_case"]
    assert ("the classes 'Monarch' (in valid/) and 'monarch' (in train/) differ only in case"
            in twins.message)
    summary = inspect_dataset(ds, tmp_path / "out", check_images=False, progress=False)
    side = ds.table.loc[ds.table["label"] == "onlyinval", "split"].iloc[0]
    assert summary["classes_without_training_images"] == [f"Monarch (only in {side})",
                                                          f"onlyinval (only in {side})"]


def test_one_class_is_said_before_train_refuses_it(tmp_path):
    from helpers import folder_dataset
    from rich.console import Console

    folder_dataset(tmp_path / "d", {"monarch": 3})
    summary = inspect_dataset(read_dataset(tmp_path / "d"), tmp_path / "out",
                              check_images=False, progress=False)
    console = Console(width=200, record=True)
    print_summary(summary, console)
    said = console.export_text()
    assert "one class only (train refuses it): 1" in said and "'monarch'" in said
    assert "No problems found" not in said


def test_one_class_read_as_two_by_its_case_is_a_finding_that_biases_the_figures(tmp_path):
    """'Monarch' and 'monarch' read as two classes (every confusion between them counted as
    a mistake) was listed under "Worth knowing: skipped or handled", and train's log said it
    as a plain line."""
    from helpers import folder_dataset
    from rich.console import Console

    from wingspan.data.samples import report_reading

    folder_dataset(tmp_path / "d", {"monarch": 3, "Monarch": 3, "admiral": 3})
    ds = read_dataset(tmp_path / "d")
    console = Console(width=200, record=True)
    print_summary(inspect_dataset(ds, tmp_path / "out", check_images=False, progress=False),
                  console)
    said = console.export_text()
    biased, handled = said.find("these bias its figures"), said.find("Worth knowing")
    twins = said.find("differ only in case")
    assert 0 <= biased < twins and (handled < 0 or twins < handled), said
    logged: list[str] = []
    report_reading(ds, logged.append)
    assert [line for line in logged if "differ only in case" in line][0].startswith(
        "Warning: while reading the data: ")


def test_the_class_table_calls_images_of_no_split_none(tmp_path):
    """Its column of unsplit images was headed "all", which the summary line calls "none";
    with no split at all it repeated the total."""
    from helpers import folder_dataset
    from rich.console import Console

    from wingspan.data.inspect import print_class_table

    folder_dataset(tmp_path, {"a": 3, "b": 2})

    def header(ds) -> list[str]:
        console = Console(width=200, record=True)
        print_class_table(ds, "label", console)
        return next(line for line in console.export_text().splitlines()
                    if "label" in line and "total" in line).replace("┃", " ").split()

    assert header(read_dataset(tmp_path)) == ["label", "total"]
    (tmp_path / "splits.csv").write_text("path,split\na/a_0.jpg,train\nb/b_0.jpg,val\n")
    assert header(read_dataset(tmp_path)) == ["label", "train", "val", "none", "total"]
    # Images blank at a level are no class of it (they counted as one, named "").
    ds = read_dataset(tmp_path)
    ds.table["family"] = ["F"] * 3 + [""] * 2
    console = Console(width=200, record=True)
    print_class_table(ds, "family", console)
    assert "Images per family (1 class)" in console.export_text()


def test_a_notes_column_read_as_a_level_is_pointed_at(tmp_path):
    """An extra CSV column (notes) is a coarser level, and each class 'is under N notes
    values': the finding says what the columns mean and what to do."""
    from helpers import folder_dataset
    from rich.console import Console

    folder_dataset(tmp_path, {"a": 2})
    (tmp_path / "l.csv").write_text("path,label,notes\na/a_0.jpg,a,sunny\na/a_1.jpg,a,wet\n")
    summary = inspect_dataset(read_dataset(tmp_path / "l.csv"), tmp_path / "out",
                              check_images=False, progress=False)
    console = Console(width=300, record=True)
    print_summary(summary, console)
    assert ("taxonomy conflict (train --levels refuses it; every extra column of a CSV is read "
            "as a coarser level: remove one that is not (notes, a finer rank), and name one of "
            "specimen ids 'group'): 1") in console.export_text()


def test_a_genus_under_two_families_is_a_conflict_even_with_fewer_genera(demo_dir, tmp_path):
    """taxonomy.csv giving one genus two families, so that genus has fewer classes than
    family: it was read as a tree with genus on top ('No problems found', and --levels
    family,genus trained as genus,family). Ranks keep their order; the slip is named."""
    data = shutil.copytree(demo_dir, tmp_path / "d")
    tax = pd.read_csv(data / "taxonomy.csv", dtype=str, keep_default_na=False)
    tax["genus"] = [tax["genus"].iloc[0]] * 2 + list(tax["genus"].iloc[2:])  # one genus, 2 families
    assert tax["genus"].nunique() < tax["family"].nunique()
    tax.to_csv(data / "taxonomy.csv", index=False)
    ds = read_dataset(data)
    assert ds.levels.index("family") < ds.levels.index("genus")
    summary = inspect_dataset(ds, tmp_path / "out", check_images=False, progress=False)
    assert any("under 2 family values" in c for c in summary["taxonomy_conflicts"])


def test_a_level_named_like_a_path_stays_in_the_output_folder(tmp_path):
    """A level's name comes from a CSV's header or taxonomy.csv, a stranger's: one named
    "x/../../../PWN" wrote its balance plot outside --out. File names take a safe form."""
    from pathlib import Path

    from helpers import folder_dataset

    from wingspan.files import name_part

    folder_dataset(tmp_path / "d", {"a": 2, "b": 2})
    (tmp_path / "d" / "taxonomy.csv").write_text("folder,x/../../../PWN\na,F1\nb,F2\n")
    ds = read_dataset(tmp_path / "d")
    summary = inspect_dataset(ds, tmp_path / "out", check_images=False, progress=False)
    assert {Path(p).parent for p in summary["plots"].values()} == {tmp_path / "out"}
    assert not list(tmp_path.rglob("PWN*"))
    assert name_part("family") == "family" and name_part("a/b") != name_part("a_b")


def test_letters_the_plot_font_lacks_are_said_once(tmp_path, monkeypatch):
    """Class names in letters the font lacks drew a warning per letter and figure (66
    lines of evaluate's output for CJK names): one line says it, and what to do; other
    warnings pass as they were."""
    import warnings

    from wingspan import plotting

    monkeypatch.setattr(plotting, "_FONT_SAID", [])
    counts = pd.Series([5, 3], index=["\ue000\ue001 one", "\ue002 two"])  # (in no font)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_class_balance(counts, "label", tmp_path / "a.png")
        plot_class_balance(counts, "label", tmp_path / "b.png")
        with plotting.literal_text():
            warnings.warn("something else", RuntimeWarning, stacklevel=1)
        with pytest.raises(ValueError), plotting.literal_text():  # a drawing that fails
            warnings.warn("before the fault", RuntimeWarning, stacklevel=1)
            raise ValueError("no figure")
    said = [str(w.message) for w in caught]
    assert "before the fault" in said
    assert not [s for s in said if "Glyph" in s], said
    assert sum("the plots' font lacks" in s for s in said) == 1, said
    assert "something else" in said


def test_an_installed_font_with_the_letters_draws_them(tmp_path, monkeypatch):
    """matplotlib falls back only to families named in font.family, so a CJK font
    installed as the warning advised still left boxes: wingspan names the installed ones
    it knows after the user's own. (Here DejaVu Serif stands in, as it has letters that
    DejaVu Sans lacks; no CJK font installs on this machine.)"""
    import warnings

    from wingspan import plotting

    monkeypatch.setattr(plotting, "_FONT_SAID", [])
    monkeypatch.setattr(plotting, "FALLBACK_FONTS", ("No Such Font", "DejaVu Serif"))
    plotting.fallback_families.cache_clear()
    counts = pd.Series([5, 3], index=["\u1d15\u02ef one", "two"])  # not in DejaVu Sans
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_class_balance(counts, "label", tmp_path / "a.png")
    plotting.fallback_families.cache_clear()
    assert not [w for w in caught if "font lacks" in str(w.message) or "Glyph" in
                str(w.message)], [str(w.message) for w in caught]


def test_a_long_class_name_is_shortened_in_the_balance_plot(tmp_path):
    """A 125-character name ran off the figure, with matplotlib's "Tight layout not
    applied" printed under every command that draws it; the other plots shorten names."""
    import warnings

    counts = pd.Series([5, 3], index=["Papilio machaon gorganus " * 5, "two"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_class_balance(counts, "label", tmp_path / "a.png")
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]


def test_inspect_checks_a_resize_as_a_model_at_224_px_would_make_it(tmp_path):
    """Inspect knows no model: checked as at a 512 px view, every 96 x 96 photo was called
    unreadable under --max-pixels 200000, which train reads whole; and a 20 x 8000 strip,
    which a model at 224 px reads, too."""
    from wingspan.data.images import image_facts

    Image.new("RGB", (96, 96)).save(tmp_path / "small.png")
    Image.new("RGB", (20, 8000)).save(tmp_path / "strip.png")
    Image.new("RGB", (1, 40000)).save(tmp_path / "thread.png")
    assert image_facts(str(tmp_path / "small.png"), budget=200_000).error is None
    assert image_facts(str(tmp_path / "strip.png")).error is None
    assert "too long and thin" in image_facts(str(tmp_path / "thread.png")).error


def test_a_class_too_small_to_split_is_said_before_train_keeps_it_apart(tmp_path):
    """A class of 1 or 2 photos: train and data split keep it in train only, never
    evaluated, and say so; inspect, the command run first to find such things, did not."""
    from helpers import folder_dataset
    from rich.console import Console

    folder_dataset(tmp_path / "d", {"monarch": 6, "lonely": 1, "pair": 2})
    summary = inspect_dataset(read_dataset(tmp_path / "d"), tmp_path / "out",
                              check_images=False, progress=False)
    assert summary["too_few_to_split"] == ["lonely (1 independent image)",
                                           "pair (2 independent images)"]
    console = Console(width=200, record=True)
    print_summary(summary, console)
    said = console.export_text()
    assert "classes too small to split: train keeps them in train only" in said, said


def test_classes_are_counted_of_the_images_that_can_be_read(tmp_path):
    """3 of a class's 9 files broken: inspect counted 9, and its imbalance 9:3 where train
    learns from 6:3."""
    from helpers import broken_images, folder_dataset
    from rich.console import Console

    folder_dataset(tmp_path / "d", {"a": 6, "b": 3})
    broken_images(tmp_path / "d" / "a", 3)
    summary = inspect_dataset(read_dataset(tmp_path / "d"), tmp_path / "out", progress=False)
    assert summary["dataset"]["images"] == 12  # as listed
    assert summary["levels"]["label"]["counts"] == {"a": 6, "b": 3}
    assert summary["levels"]["label"]["imbalance_ratio"] == 2.0
    console = Console(width=200, record=True)
    print_summary(summary, console)
    assert "Classes per level (readable images)" in console.export_text()


def test_inspect_reads_with_as_many_threads_as_the_cores_this_process_may_use(monkeypatch):
    """A container, SLURM or `taskset` may allow 2 cores of a 64-core machine: 8 decoding
    threads (one per core of the machine, at most 8) crowded the 2."""
    import os

    import wingspan.config

    monkeypatch.setattr(wingspan.config, "CGROUP_CPU_MAX", "/nonexistent/cpu.max")  # no quota
    monkeypatch.setattr(wingspan.config, "CGROUP_V1_QUOTA", ("/nonexistent/q", "/nonexistent/p"))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 7}, raising=False)
    assert InspectConfig().workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert InspectConfig().workers == 8
    # doctor says the same: the cores this process may use, and the machine's beside them.
    from wingspan.doctor import machine

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 7}, raising=False)
    assert (machine()["cores"], machine()["machine_cores"]) == (2, 64)


@pytest.fixture
def windows_text(monkeypatch):
    """Text files opened without an encoding use cp1252, as on a Western Windows machine
    (Python there reads and writes the ANSI code page unless told otherwise)."""
    import builtins
    import io

    def text_encoding(encoding, stacklevel=2):
        return "cp1252" if encoding in (None, "locale") else encoding

    plain_open = builtins.open

    def cp1252_open(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):
        if "b" not in mode and encoding in (None, "locale"):
            encoding = "cp1252"
        return plain_open(file, mode, buffering, encoding, *args, **kwargs)

    monkeypatch.setattr(io, "text_encoding", text_encoding)
    monkeypatch.setattr(builtins, "open", cp1252_open)


def test_data_whose_path_windows_cannot_spell_in_its_code_page(tmp_path, windows_text,
                                                               run_cli, monkeypatch):
    """A photo folder named "Fotos_Árvíztűrő" (ű and ő are not in cp1252): `data inspect`
    stopped with a UnicodeEncodeError traceback on Windows, writing the file that says
    whose outputs a folder holds; it is UTF-8 now, and read back as such (a second
    inspect finds the folder its own)."""
    for label in ("monarch", "admiral"):
        for i in range(3):
            write_image(tmp_path / "Fotos_Árvíztűrő" / label / f"{i}.jpg")
    monkeypatch.chdir(tmp_path)  # (outputs in runs/data/NAME here)
    for _ in range(2):
        code, out, err = run_cli("data", "inspect", tmp_path / "Fotos_Árvíztűrő", "--quiet")
        assert code == 0 and "Traceback" not in err, err
    outputs = [p.parent for p in (tmp_path / "runs").rglob(".source")]
    assert len(outputs) == 1, outputs  # the second found the first's folder its own
    assert (outputs[0] / ".source").read_bytes().decode("utf-8").strip() == \
        str((tmp_path / "Fotos_Árvíztűrő").resolve())
    # A run trained on it: its config.yaml (UTF-8) names the folder in its first line, and
    # --weights RUN/checkpoints/best.pt reads it back (UnicodeDecodeError on cp1252's
    # undefined bytes, as Ő's 0x90 is).
    from wingspan.models.weights import checkpoint_run_settings

    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(f"# Trained on {tmp_path / 'Fotos_ŐŰ'}\nbackbone: x\n",
                                     encoding="utf-8")
    assert checkpoint_run_settings(run / "checkpoints" / "best.pt") == {"backbone": "x"}
