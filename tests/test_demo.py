import hashlib

import numpy as np
import pytest
from PIL import Image

from wingspan.config import DEMO_SPECIES, DemoConfig
from wingspan.data import read_dataset
from wingspan.data.demo import SPECIES, generate_demo
from wingspan.data.taxonomy import taxonomy_conflicts
from wingspan.errors import WingspanError


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_and_imbalanced(tmp_path):
    config = DemoConfig(image_size=40, images_per_class=(5, 3, 2))
    a = generate_demo(tmp_path / "a", config)
    b = generate_demo(tmp_path / "b", config)
    c = generate_demo(tmp_path / "c", DemoConfig(image_size=40, images_per_class=(5, 3, 2),
                                                 seed=1))
    assert _digest(a) == _digest(b) != _digest(c)
    ds = read_dataset(a)
    assert ds.class_counts().tolist() == [5, 3, 2]
    assert ds.levels == ["family", "subfamily", "genus", "species", "label"]
    assert taxonomy_conflicts(ds.table, ds.levels) == []
    with Image.open(ds.table["path"].iloc[0]) as im:
        assert im.size == (40, 40) and im.mode == "RGB"


def test_every_demo_species_is_distinct_and_the_taxonomy_is_a_tree(tmp_path):
    root = generate_demo(tmp_path, DemoConfig(image_size=48,
                                              images_per_class=(6,) * len(SPECIES)))
    ds = read_dataset(root)
    assert taxonomy_conflicts(ds.table, ds.levels) == []
    assert len({(s.forewing, s.hindwing, s.colour, s.pattern) for s in SPECIES}) == len(SPECIES)
    # Images of one species vary (pose, background): no two files are the same.
    pixels = [np.asarray(Image.open(p)) for p in ds.table["path"]]
    assert len({p.tobytes() for p in pixels}) == len(pixels)


def test_the_demo_species_are_as_many_as_the_config_allows():
    # (the config's limit, which cannot import the table, and the table, kept in step)
    assert len(SPECIES) == DEMO_SPECIES


def test_demo_config_is_validated():
    with pytest.raises(WingspanError, match="images_per_class"):
        DemoConfig(images_per_class=(1,) * (len(SPECIES) + 1))
    # A size of 0 or less is a setting's error, not Pillow's "cannot write empty image".
    for size in (0, -5, 15, 1025):  # (5000 px drew 7 images in 5 minutes)
        with pytest.raises(WingspanError, match=r"'image_size' setting must be 16 to 1024 "
                           rf"pixels. Got {size} instead"):
            DemoConfig(image_size=size)
    # Before the data is made: training refused them at the demo's fifth step.
    for name, value in (("epochs_finetune", -1), ("epochs_head", -2), ("feature_views", 0)):
        with pytest.raises(WingspanError, match=rf"'{name}' setting must be"):
            DemoConfig(**{name: value})


def test_a_second_demo_in_the_same_folder_replaces_the_first(tmp_path):
    generate_demo(tmp_path / "d", DemoConfig(image_size=24, images_per_class=(4, 4, 4)))
    again = generate_demo(tmp_path / "d", DemoConfig(image_size=24, images_per_class=(2, 1)))
    assert _digest(again) == _digest(generate_demo(
        tmp_path / "fresh", DemoConfig(image_size=24, images_per_class=(2, 1))))
    assert read_dataset(again).class_counts().tolist() == [2, 1]
    # A file where the folder should be: said (FileExistsError before), and left.
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(WingspanError, match="notes.txt is a file; the demo's images go in a "
                       "folder"):
        generate_demo(tmp_path / "notes.txt", DemoConfig(image_size=24))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # A Finder's .DS_Store (or Windows' Thumbs.db) is nobody's work: not refused.
    (tmp_path / "d" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "d" / SPECIES[0].folder / "Thumbs.db").write_bytes(b"\0")
    generate_demo(tmp_path / "d", DemoConfig(image_size=24, images_per_class=(2, 1)))
    # Other hidden files and folders may be someone's work: refused, and left.
    notes = tmp_path / "d" / SPECIES[0].folder / ".my_notes" / "field_log.txt"
    notes.parent.mkdir()
    notes.write_text("months of notes")
    with pytest.raises(WingspanError, match="did not write .*my_notes"):
        generate_demo(tmp_path / "d", DemoConfig(image_size=24, images_per_class=(2, 1)))
    assert notes.read_text() == "months of notes"
    notes.unlink()
    notes.parent.rmdir()
    # Files it did not write are not its to delete: it refuses and leaves them.
    mine = tmp_path / "d" / SPECIES[0].folder / "my_photo.jpg"
    mine.write_bytes(b"x")
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "notes.txt").write_text("keep")
    for folder, name in ((tmp_path / "d", "my_photo.jpg"), (tmp_path / "own", "notes.txt")):
        with pytest.raises(WingspanError, match=f"did not write .*{name}"):
            generate_demo(folder, DemoConfig(image_size=24, images_per_class=(2, 1)))
    assert mine.exists() and (tmp_path / "own" / "notes.txt").read_text() == "keep"
