from pathlib import Path

import pytest
import torch
from PIL import Image

from wingspan.config import AugmentConfig
from wingspan.data import read_dataset
from wingspan.data.preview import write_preview
from wingspan.data.transforms import POLICIES, eval_transform, train_transform
from wingspan.errors import WingspanError


@pytest.fixture
def photo():
    return Image.effect_mandelbrot((300, 200), (-2, -1.2, 1, 1.2), 60).convert("RGB")


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_train_transform_shapes_and_randomness(photo, policy):
    transform = train_transform(AugmentConfig(policy=policy, image_size=64))
    torch.manual_seed(0)
    a, b = transform(photo), transform(photo)
    assert a.shape == b.shape == (3, 64, 64) and a.dtype == torch.float32
    assert not torch.equal(a, b)  # augmentation differs from draw to draw


def test_eval_transform_is_deterministic_and_normalised(photo):
    config = AugmentConfig(image_size=96)
    transform = eval_transform(config)
    a, b = transform(photo), transform(photo)
    assert a.shape == (3, 96, 96) and torch.equal(a, b)
    raw = eval_transform(config, normalize=False)(photo)
    assert 0 <= raw.min() and raw.max() <= 1
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(a, (raw - mean) / std)


def test_custom_normalisation(photo):
    # EfficientNet-Lite weights expect (x - 127) / 128 on 0..255 pixels.
    t = eval_transform(AugmentConfig(image_size=32), mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    x = t(photo)
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_unknown_policy_is_refused():
    with pytest.raises(WingspanError, match="'policy' setting must be one of"):
        AugmentConfig(policy="extreme")


def test_preview_grid_file(demo_dir, tmp_path):
    torch.manual_seed(123)
    path = write_preview(read_dataset(demo_dir), tmp_path / "preview.png",
                         AugmentConfig(image_size=48), rows=3, augmented=4)
    with Image.open(path) as im:
        # 3 rows of 5 panels: wider than tall, and big enough to see.
        assert im.width > im.height > 200
    # The caller's random stream goes on as it was (ws.preview in a notebook reseeded it).
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


def test_a_preview_stopped_while_saved_leaves_the_previous_one(demo_dir, tmp_path,
                                                               monkeypatch):
    """preview.png was written in place: a Ctrl-C while saving (0.7 s for a large grid)
    left a torn PNG with a valid header, a SIGKILL an empty file."""
    from matplotlib.figure import Figure

    data, out = read_dataset(demo_dir), tmp_path / "preview.png"
    write_preview(data, out, AugmentConfig(image_size=32), rows=1, augmented=1)
    before = out.read_bytes()

    def torn(fig, path, **kwargs):
        Path(path).write_bytes(before[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", torn)
    with pytest.raises(KeyboardInterrupt):
        write_preview(data, out, AugmentConfig(image_size=32), rows=2, augmented=1)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_preview_passes_over_unreadable_images(demo_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    for image in folders[0].iterdir():  # a class none of whose images reads: left out
        image.write_bytes(b"not an image")
    for image in sorted(folders[1].iterdir())[:-1]:  # one that reads: shown
        image.write_bytes(image.read_bytes()[:200])  # truncated
    sizes, said = [], []
    for source, rows in ((data, len(folders)), (demo_dir, len(folders) - 1)):
        path = write_preview(read_dataset(source), tmp_path / f"{rows}.png",
                             AugmentConfig(image_size=48), rows=rows, augmented=2,
                             log=said.append)
        with Image.open(path) as im:
            sizes.append(im.size)
    assert sizes[0] == sizes[1]  # the same number of rows: every class but the broken one
    assert said == [f"Not shown: {folders[0].name} (no image of the class could be read)."]
    with pytest.raises(WingspanError, match=r"rows \(--rows, rows= in Python\) must be from 1 to"):
        write_preview(read_dataset(demo_dir), tmp_path / "none.png", rows=0)
    with pytest.raises(WingspanError,
                       match=r"seed \(--seed, seed= in Python\) must be from 0 to") as e:
        write_preview(read_dataset(demo_dir), tmp_path / "none.png", seed=-1)
    assert e.value.hint == "Use 0, say."  # (it said 6, as for --rows)
    # No bound above ran out of memory (--image-size 10^9) or time (--views 10^5), refused
    # now before any image is read.
    # Each hint gives the option's default (--views' said 6, where --views is 5 unless given)
    for settings, hint in (({"augmented": 100_000}, "Use 5, say."),
                           ({"rows": 10_000}, "Use 6, say."),
                           ({"config": AugmentConfig(image_size=10**9)}, "Use 224, say.")):
        with pytest.raises(WingspanError, match=r"must be from \d+ to \d+, got") as e:
            write_preview(read_dataset(demo_dir), tmp_path / "none.png", **settings)
        assert e.value.hint == hint
    assert not (tmp_path / "none.png").exists()


def test_the_preview_names_each_class_whole(demo_dir, tmp_path, monkeypatch):
    import shutil

    from matplotlib.axes import Axes

    long = "a_class_named_at_some_length"  # 28 characters: cut at 18 before
    shutil.copytree(next(p for p in demo_dir.iterdir() if p.is_dir()), tmp_path / "d" / long)
    said, original = [], Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel", lambda ax, text, **kw: (
        said.append(text), original(ax, text, **kw))[1])
    write_preview(read_dataset(tmp_path / "d"), tmp_path / "p.png",
                  AugmentConfig(image_size=48), rows=1, augmented=1)
    assert [t.replace("\n", "") for t in said] == [long]
    # Images left blank at a level are no class of it: not a row named "".
    data = read_dataset(demo_dir)
    data.table.loc[data.table.index[:5], "family"] = ""
    said.clear()
    write_preview(data, tmp_path / "f.png", AugmentConfig(image_size=48), level="family",
                  rows=10, augmented=1)
    assert sorted(t.replace("\n", "") for t in said) == sorted(
        set(data.table["family"]) - {""})


def test_the_config_names_every_policy_and_depends_on_nothing_above_it():
    import subprocess
    import sys

    from wingspan.config import AUGMENT_POLICIES
    from wingspan.data.transforms import POLICIES

    assert tuple(POLICIES) == AUGMENT_POLICIES
    code = ("import sys, wingspan.config as c; c.TrainConfig(); c.DemoConfig(); "
            "c.AugmentConfig(); "
            "print(sorted(m for m in sys.modules if m.startswith(('wingspan.', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert eval(out) == ["wingspan.config", "wingspan.errors"]


def test_small_on_clutter_pastes_the_photo_shrunk_on_a_blurred_copy(photo):
    import numpy as np

    from wingspan.data.transforms import SmallOnClutter

    assert SmallOnClutter(p=0.0)(photo) is photo
    torch.manual_seed(1)
    out = SmallOnClutter(p=1.0, area=(0.25, 0.25))(photo)  # half of each side: 150 x 100
    torch.manual_seed(1)  # the same draws, to know where it went
    torch.rand(())
    torch.empty(()).uniform_(0.25, 0.25)
    x, y = int(torch.randint(0, 151, ())), int(torch.randint(0, 101, ()))
    pixels = np.asarray(out)
    assert out.size == photo.size
    assert np.array_equal(pixels[y:y + 100, x:x + 150], np.asarray(photo.resize((150, 100))))
    outside = pixels.copy()
    outside[y:y + 100, x:x + 150] = np.asarray(photo)[y:y + 100, x:x + 150]
    assert not np.array_equal(outside, np.asarray(photo))  # the rest is not the photo
    assert np.abs(np.diff(pixels[:, :, 0].astype(int), axis=1)).mean() < np.abs(
        np.diff(np.asarray(photo)[:, :, 0].astype(int), axis=1)).mean()  # blurred: smoother


def test_preview_cuts_a_long_class_name_in_the_middle(demo_dir, tmp_path, monkeypatch):
    """Wrapped to three lines of 16, a long name lost its end, where names differ."""
    import shutil

    import wingspan.data.preview as preview

    long = "Coenonympha gardetta darwiniana from the southern alps, series 17"
    shutil.copytree(next(p for p in demo_dir.iterdir() if p.is_dir()), tmp_path / "d" / long)
    labels = []
    real = preview.subplots

    def spy(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        labels.append(axes)
        return fig, axes

    monkeypatch.setattr(preview, "subplots", spy)
    write_preview(read_dataset(tmp_path / "d"), tmp_path / "p.png", AugmentConfig(image_size=32),
                  rows=1, augmented=1)
    shown = labels[0][0][0].get_ylabel()
    assert len(shown.split("\n")) <= 3 and shown.replace("\n", "").endswith("series 17")
    assert "…" in shown
