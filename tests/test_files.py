"""Atomic writes: a failed or interrupted write leaves the previous file and no litter."""

import errno
import os

import pytest

from wingspan.errors import WingspanError
from wingspan.files import atomic_path, write_text


def test_a_full_disk_keeps_the_old_file_and_says_where(tmp_path, monkeypatch):
    target = tmp_path / "out" / "pred.csv"
    write_text(target, "old,complete\n")

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WingspanError, match=r"disk holding .*out is full.*pred.csv was not"):
        write_text(target, "new,but cut mid-")
    assert target.read_text() == "old,complete\n"
    assert os.listdir(target.parent) == ["pred.csv"]  # no temporary file left behind


def test_an_error_while_writing_removes_the_temporary_file(tmp_path):
    target = tmp_path / "features.safetensors"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        assert tmp.suffix == ".safetensors" and tmp.parent == tmp_path
        raise RuntimeError("killed")
    assert not target.exists() and os.listdir(tmp_path) == []


def test_a_full_cache_disk_does_not_make_images_unreadable(tmp_path, monkeypatch):
    from helpers import write_image

    from wingspan.training import decode_cache

    image = write_image(tmp_path / "a.jpg", size=(40, 30), seed=1)

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(decode_cache.np, "save", full)
    array = decode_cache.DecodeCache(tmp_path / "cache", 32).load(str(image))
    assert array.shape == (30, 40, 3)  # decoded all the same


def test_the_decoded_image_cache_shrinks_with_the_models_filter(tmp_path):
    """Training's images are shrunk with the filter predict and the export use (timm's
    `interpolation`), each filter in a cache of its own."""
    import numpy as np
    from helpers import write_image
    from PIL import Image

    from wingspan.training.decode_cache import DecodeCache

    image = write_image(tmp_path / "a.png", size=(400, 300), seed=1)
    with Image.open(image) as im:
        want = {f: np.asarray(im.convert("RGB").resize((43, 32), getattr(Image.Resampling, f),
                                                       reducing_gap=3.0))
                for f in ("BILINEAR", "BICUBIC")}
    assert not np.array_equal(want["BILINEAR"], want["BICUBIC"])
    for name in ("bilinear", "bicubic"):
        got = DecodeCache(tmp_path / "cache", 32, name).load(str(image))
        np.testing.assert_array_equal(got, want[name.upper()])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "decoded-32", "decoded-32-bilinear"]


def test_the_cli_says_the_disk_is_full_instead_of_a_traceback(run_cli, tmp_path, monkeypatch):
    from wingspan.data import inspect as inspect_module

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(inspect_module, "inspect_dataset", full)
    (tmp_path / "d" / "a").mkdir(parents=True)
    from helpers import write_image

    write_image(tmp_path / "d" / "a" / "1.jpg")
    code, _, err = run_cli("data", "inspect", tmp_path / "d", "--out", tmp_path / "o")
    assert code == 2 and "The disk is full" in err and "Traceback" not in err
