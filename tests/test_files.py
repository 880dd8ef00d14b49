"""Atomic writes: a failed or interrupted write leaves the previous file and no litter."""

import errno
import os
import sys
from pathlib import Path

import pytest

from wingspan.errors import WingspanError
from wingspan.files import atomic_path, atomic_paths, remove_leftovers, write_text


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


@pytest.mark.parametrize("error", [
    # torch.save's, as a full disk raised it while writing a checkpoint (it names no cause)
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2942976 vs "
                 "2942872"),
    # torch.save's when the disk filled in its last flush (a traceback before)
    RuntimeError("basic_ios::clear: iostream error"),
    # safetensors', writing a bundle
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
              '"No space left on device" })')])
def test_a_full_disk_said_in_torch_or_safetensors_words_is_a_full_disk(tmp_path, error):
    target = tmp_path / "checkpoints" / "best.pt"
    with pytest.raises(WingspanError, match=r"checkpoints is full.*best.pt was not written"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise error
    assert not target.parent.exists()  # made for it, and left empty: removed


def test_a_full_disk_while_writing_files_together_names_them_all_and_leaves_no_folder(
        tmp_path):
    """export's model.onnx (14 MB) did not fit: the error named model.onnx.json, the last
    of the two, said "0 MiB free" counted with the half-written file still there, and left
    the empty export folder."""
    from wingspan.files import atomic_paths

    out = tmp_path / "export"
    with pytest.raises(WingspanError, match=r"export is full \(\d+ MiB free\); model.onnx "
                                            r"and model.onnx.json were not written"):
        with atomic_paths(out / "model.onnx", out / "model.onnx.json") as (graph, _):
            graph.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not out.exists()
    (out / "kept").mkdir(parents=True)  # a folder that was there stays, with what it holds
    with pytest.raises(WingspanError, match="were not written"):
        with atomic_paths(out / "a", out / "b"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert os.listdir(out) == ["kept"]
    fresh = tmp_path / "fresh"  # a failure before the first byte leaves no folder either
    with pytest.raises(ValueError), atomic_paths(fresh / "a"):
        raise ValueError("no file written")
    assert not fresh.exists()


@pytest.mark.parametrize("error", [
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    Exception('Error while serializing: IoError(Os { code: 122, kind: QuotaExceeded, message: '
              '"Disk quota exceeded" })')])
def test_a_disk_quota_used_up_is_said_as_such(tmp_path, error):
    """A cluster's usual 'full disk' is the user's quota (EDQUOT), while the disk has room:
    it ended in a traceback."""
    from wingspan.files import os_error_said

    target = tmp_path / "checkpoints" / "best.pt"
    with pytest.raises(WingspanError, match=r"Your disk quota for .*checkpoints is used up; "
                                            r"best.pt was not written"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise error
    assert not target.parent.exists()  # made for it, and left empty: removed
    said = os_error_said(OSError(errno.EDQUOT, "Disk quota exceeded", "runs/x/train.log"))
    assert said.message == "Your disk quota is used up writing runs/x/train.log."
    # A run of another user's (evaluate's lock file beside it): where else to write.
    # A copy's error names its source first: the file written is the second (adapt named
    # the run it copied from as the one the full disk stopped).
    said = os_error_said(OSError(errno.ENOSPC, "No space left on device", "run/config.yaml",
                                 None, "run-adapted/config.yaml"))
    assert "writing run-adapted/config.yaml" in str(said), said
    said = os_error_said(PermissionError(errno.EACCES, "Permission denied", "r/.ev.lock"))
    assert said.message == "Permission denied: r/.ev.lock." and "--out" in said.hint


def test_a_read_only_folder_is_a_message(tmp_path, monkeypatch, run_cli):
    from wingspan import files

    # Imported before the patch: it binds make_folder by name, and imported under it kept
    # the read-only one for every later test of the process.
    from wingspan.training import run  # noqa: F401

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(files, "make_folder", read_only)
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: read_only(self))
    code, _, err = run_cli("demo", "--out", tmp_path / "ro")
    assert code == 2 and "read-only file system" in err and "Traceback" not in err
    # The library raises the same WingspanError, as the README promises (a read-only run
    # folder gave run.evaluate() a bare OSError [Errno 30]).
    import wingspan as ws

    with pytest.raises(WingspanError, match="is on a read-only file system") as e:
        ws.demo_data(tmp_path / "ro")
    assert "out=" in e.value.hint and isinstance(e.value.__cause__, OSError)


def test_a_folder_the_system_refuses_is_a_message(demo_dir, run_cli):
    """mkdir under /proc fails with ENOENT, though the path's parent exists: it was a
    traceback. (A read-only or full disk, or a permission, keeps its own advice, above.)"""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    for args in (("demo", "--out", "/proc/ws-test"),
                 ("data", "inspect", demo_dir, "--out", "/proc/ws-test/inspect")):
        code, _, err = run_cli(*args)
        said = " ".join(err.split())
        assert code == 2 and "Error: No such file or directory: /proc/ws-test." in said, said
        assert "Hint: Check the path" in said and "Traceback" not in said


def test_an_error_while_writing_removes_the_temporary_file(tmp_path):
    target = tmp_path / "features.safetensors"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        assert tmp.suffix == ".safetensors" and tmp.parent == tmp_path
        raise RuntimeError("killed")
    assert not target.exists() and os.listdir(tmp_path) == []


def test_files_get_the_mode_a_plain_open_gives_them(tmp_path):
    """safetensors creates its files readable by their owner alone: a model trained by one
    user could not be served by another on a shared machine."""
    import torch
    from safetensors.torch import save_file
    (tmp_path / "plain").write_text("")
    usual = os.stat(tmp_path / "plain").st_mode & 0o777
    with atomic_path(tmp_path / "model.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, tmp)
    with atomic_paths(tmp_path / "a.safetensors", tmp_path / "b.json") as (a, b):
        save_file({"w": torch.zeros(2)}, a)
        b.write_text("{}")
    for name in ("model.safetensors", "a.safetensors", "b.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == usual, name


def test_the_temporary_files_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    kept = ["last.pt", "manifest.json", "notes", ".lock", ".wingspan-evaluation", "a.tmp.csv"]
    for name in kept:
        (tmp_path / name).write_text("")
    for name in kept[:3]:
        with atomic_path(tmp_path / name) as tmp:
            tmp.write_text("")
            temporary = tmp.name
        (tmp_path / temporary).write_text("half")  # as a write killed before its rename
    remove_leftovers(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_files_written_together_are_replaced_together(tmp_path):
    """An error while writing the last of them keeps every old one (not the first ones new
    beside an old last); done, all are new."""
    paths = [tmp_path / name for name in ("audit.csv", "duplicates.csv", "audit.html")]
    for path in paths:
        path.write_text("old")
    with pytest.raises(RuntimeError), atomic_paths(*paths) as tmps:
        tmps[0].write_text("new")
        tmps[1].write_text("new")
        raise RuntimeError("killed")
    assert [p.read_text() for p in paths] == ["old"] * 3
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)
    with atomic_paths(*paths) as tmps:
        for tmp in tmps:
            tmp.write_text("new")
    assert [p.read_text() for p in paths] == ["new"] * 3
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)


@pytest.mark.skipif(sys.platform == "win32", reason="a signal sent to itself: POSIX")
@pytest.mark.parametrize("at", [1, 3])
def test_a_ctrl_c_among_the_renames_lands_once_they_are_all_done(tmp_path, monkeypatch, at):
    """A Ctrl-C right after the last rename (while the previous versions were let go) left
    their copies beside the new files, and `data audit` said it had written nothing; one
    between two renames left some old, some new. It is held back until all are in place."""
    import signal

    import wingspan.files

    paths = [tmp_path / name for name in ("audit.csv", "duplicates.csv", "audit.html")]
    for path in paths:
        path.write_text("old")
    replace, renamed = os.replace, []

    def ctrl_c_after(src, dst):
        replace(src, dst)
        if ".tmp" in Path(src).name:
            renamed.append(dst)
            if len(renamed) == at:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(wingspan.files.os, "replace", ctrl_c_after)
    # (Ctrl-C as a terminal's raises KeyboardInterrupt: a test worker may ignore SIGINT)
    worker_s = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), atomic_paths(*paths) as tmps:
            for tmp in tmps:
                tmp.write_text("new")
    finally:
        signal.signal(signal.SIGINT, worker_s)
    assert len(renamed) == 3 and [p.read_text() for p in paths] == ["new"] * 3
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)  # no copies left
    # An error in the held block is said, not turned into the held Ctrl-C's stop
    from wingspan.files import interrupts_held

    worker_s = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(OSError, match="rename failed"), interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            raise OSError("rename failed")
    finally:
        signal.signal(signal.SIGINT, worker_s)


def test_a_rename_that_fails_puts_back_the_files_renamed_before_it(tmp_path, monkeypatch):
    """The last of the three renames fails (its file held open on Windows, say) after two
    were done: those two get their previous version back (a file that had none is gone
    again), not new tables beside an old page."""
    import wingspan.files

    paths = [tmp_path / name for name in ("audit.csv", "duplicates.csv", "audit.html")]
    for path in paths[1:]:
        path.write_text("old")
    replace, new_before_failure = os.replace, []

    def third_held_open(src, dst):
        if ".tmp" in Path(src).name and sum(p.is_file() and p.read_text() == "new"
                                            for p in paths) == 2:
            new_before_failure.append(dst)
            raise PermissionError(errno.EACCES, "The file is used by another process", dst)
        replace(src, dst)

    monkeypatch.setattr(wingspan.files.os, "replace", third_held_open)
    with pytest.raises(PermissionError), atomic_paths(*paths) as tmps:
        for tmp in tmps:
            tmp.write_text("new")
    assert new_before_failure  # the failure came between renames
    assert not paths[0].exists() and [p.read_text() for p in paths[1:]] == ["old"] * 2
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths[1:])  # no litter


def test_a_previous_version_that_cannot_be_put_back_is_kept_and_named(tmp_path, monkeypatch):
    """The third rename fails, and so does putting the first file's previous version back
    (held open too): that version stays where it was kept, and the error says where, rather
    than the user's previous file being deleted with the litter."""
    import wingspan.files

    paths = [tmp_path / name for name in ("audit.csv", "duplicates.csv", "audit.html")]
    for path in paths:
        path.write_text("old")
    replace = os.replace

    def held_open(src, dst):
        if Path(dst) == paths[2] or ".old" in Path(src).name and Path(dst) == paths[0]:
            raise PermissionError(errno.EACCES, "The file is used by another process", dst)
        replace(src, dst)

    monkeypatch.setattr(wingspan.files.os, "replace", held_open)
    with pytest.raises(WingspanError, match="audit.csv") as caught, \
            atomic_paths(*paths) as tmps:
        for tmp in tmps:
            tmp.write_text("new")
    kept = [p for p in tmp_path.iterdir() if ".old" in p.name]
    assert len(kept) == 1 and kept[0].read_text() == "old"
    assert str(kept[0]) in str(caught.value), str(caught.value)
    assert isinstance(caught.value.__cause__, PermissionError)  # the first failure too
    assert [p.read_text() for p in paths] == ["new", "old", "old"]


def test_a_full_cache_disk_does_not_make_images_unreadable(tmp_path, monkeypatch):
    from helpers import write_image

    from wingspan.training import decode_cache

    image = write_image(tmp_path / "a.jpg", size=(40, 30), seed=1)

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(decode_cache.np, "save", full)
    array = decode_cache.DecodeCache(tmp_path / "cache", 32, min_bytes=0).load(str(image))
    assert array.shape == (32, 42, 3)  # decoded (to the working size) all the same


def test_small_image_files_are_decoded_each_time_not_kept(tmp_path):
    """The decoded cache held 190-330 KB for each image of a few hundred pixels (a 66 KB
    448-px JPEG of ETHEC's: 10-13 GiB per image size for its 48k), to save a 2-3 ms decode.
    A file under DECODE_CACHE_MIN_BYTES is decoded each time; a larger one is kept; the
    pixels are the same either way."""
    import numpy as np
    from helpers import write_image
    from PIL import Image

    from wingspan.config import DECODE_CACHE_MIN_BYTES
    from wingspan.training.decode_cache import DecodeCache

    small = str(write_image(tmp_path / "small.jpg", size=(448, 448), seed=1))
    large = str(write_image(tmp_path / "large.png", size=(300, 200), seed=2))
    assert os.path.getsize(small) < DECODE_CACHE_MIN_BYTES
    cache = DecodeCache(tmp_path / "cache", 64)
    assert np.array_equal(cache.load(small), np.array(cache.decode(small)))
    assert not any((tmp_path / "cache" / "decoded-64").iterdir())  # nothing kept
    bar = os.path.getsize(large) - 1  # (the same rule, with a bar this file is over)
    kept = DecodeCache(tmp_path / "cache", 64, min_bytes=bar)
    assert np.array_equal(kept.load(large), np.array(kept.decode(large)))
    assert [p.name for p in (tmp_path / "cache" / "decoded-64").iterdir()] == [
        kept.arrays.entry(large).name]
    assert np.array_equal(kept.load(large), np.array(kept.decode(large)))  # read back
    # A small file of many pixels (one colour compresses to nothing) is kept: its decode
    # is slow whatever its size on disk.
    flat = tmp_path / "flat.png"
    Image.new("RGB", (2000, 1000), (90, 120, 30)).save(flat)
    assert os.path.getsize(flat) < DECODE_CACHE_MIN_BYTES
    cache.load(str(flat))
    assert [p.name for p in (tmp_path / "cache" / "decoded-64").iterdir()
            if p.name != kept.arrays.entry(large).name] == [cache.arrays.entry(str(flat)).name]


def test_an_image_rewritten_in_place_is_decoded_again(tmp_path):
    """Other pixels in the same file (of the same size, with its old modification time
    put back, as `cp -p` or `rsync -a` leave it): the cache must not give the old ones."""
    from helpers import write_image

    from wingspan.training.decode_cache import DecodeCache

    image = write_image(tmp_path / "a.bmp", size=(40, 30), colour=(10, 10, 10))
    cache = DecodeCache(tmp_path / "cache", 30, min_bytes=0)
    assert cache.load(str(image)).max() == 10
    before = os.stat(image)
    write_image(image, size=(40, 30), colour=(200, 200, 200))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(image).st_size == before.st_size
    assert cache.load(str(image)).min() == 200


def test_a_damaged_decoded_entry_that_still_loads_is_decoded_again(tmp_path):
    """An entry written over (by hand, a bad block) that still loads as an array crashed
    the loader (a vector) or trained on another picture (a crop): one of another shape is
    a miss. A cache folder that cannot be made (read-only) keeps nothing, and the command
    goes on."""
    import numpy as np
    from helpers import write_image

    from wingspan.training.decode_cache import DecodeCache

    image = str(write_image(tmp_path / "a.png", size=(40, 30), colour=(10, 10, 10)))
    cache = DecodeCache(tmp_path / "cache", 30, min_bytes=0)
    good = cache.load(image)
    entry = cache.arrays.entry(image)
    for damaged in (np.zeros(5), good[:10, :7], good.astype(np.float32)):
        np.save(entry, damaged, allow_pickle=False)
        assert np.array_equal(cache.load(image), good)
    (tmp_path / "ro").write_text("a file where the cache's folder would go")
    assert np.array_equal(DecodeCache(tmp_path / "ro" / "cache", 30, min_bytes=0).load(image),
                          good)


def test_the_decoded_image_cache_shrinks_with_the_models_filter(tmp_path):
    """Training's images are shrunk as predict's eval transform shrinks them (the same
    size: 400 x 300 to 42 x 32, the long side truncated; the same pixels), with the
    model's filter (timm's `interpolation`), each filter in a cache of its own."""
    import numpy as np
    import torch
    from helpers import write_image
    from PIL import Image

    from wingspan.data.transforms import AugmentConfig, eval_transform
    from wingspan.export import prepare_pixels
    from wingspan.training.decode_cache import DecodeCache

    image = write_image(tmp_path / "a.png", size=(400, 300), seed=1)
    with Image.open(image) as im:
        rgb = im.convert("RGB")
    want = {f.upper(): eval_transform(AugmentConfig(image_size=32, eval_crop=1.0),
                                      normalize=False, interpolation=f)(rgb)
            for f in ("bilinear", "bicubic")}  # predict's pixels (a centre crop of 32)
    assert not np.array_equal(want["BILINEAR"], want["BICUBIC"])
    want = {f: (w.permute(1, 2, 0) * 255).round().byte().numpy() for f, w in want.items()}
    for name in ("bilinear", "bicubic"):
        got = DecodeCache(tmp_path / "cache", 32, name, min_bytes=0).load(str(image))
        assert got.shape == (32, 42, 3)
        np.testing.assert_array_equal(got[:, 5:37], want[name.upper()])
        # and the exported model's resize (the README's, in Pillow alone)
        np.testing.assert_array_equal(prepare_pixels(rgb, 32, 32, name), want[name.upper()])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "decoded-32", "decoded-32-bilinear"]
    # Enlarged (an image smaller than the working size) and cropped (a side 19 over the
    # crop: torchvision rounds 9.5 to 10) alike too, in training, predict and the export.
    config = AugmentConfig(image_size=32, eval_crop=0.875)  # resized to 37, then cropped
    for size in ((510, 370), (20, 30)):
        image = write_image(tmp_path / f"{size[0]}.png", size=size, seed=2)
        with Image.open(image) as im:
            rgb = im.convert("RGB")
        want = eval_transform(config, normalize=False, interpolation="bicubic")(rgb)
        want = (want.permute(1, 2, 0) * 255).round().byte().numpy()
        cached = DecodeCache(tmp_path / "cache", 37, "bicubic", min_bytes=0).load(str(image))
        got = eval_transform(config, normalize=False, interpolation="bicubic")(
            torch.from_numpy(cached).permute(2, 0, 1))  # as training's val pass takes it
        np.testing.assert_array_equal((got.permute(1, 2, 0) * 255).round().byte().numpy(), want)
        np.testing.assert_array_equal(prepare_pixels(rgb, 32, 37, "bicubic"), want)

def test_the_decoded_image_cache_keeps_each_pixel_budgets_decodes_apart(tmp_path):
    """A low pixel budget decodes a JPEG reduced below the working size (then enlarges it):
    the on-disk cache, shared by every run, must not hand that to a run or call with the
    default budget, nor an image a low budget refuses to a call under it."""
    import numpy as np
    from helpers import write_image

    from wingspan.data.images import ImageTooLarge, call_budget
    from wingspan.training.decode_cache import DecodeCache

    jpeg = str(write_image(tmp_path / "a.jpg", size=(2000, 1500), seed=1, quality=95))
    png = str(write_image(tmp_path / "b.png", size=(2000, 1500), seed=2))
    full = np.array(DecodeCache(None, 300).decode(jpeg))  # libjpeg at 1/4, then resized
    with call_budget(100_000):  # 1/8 fits it: 250 x 188, enlarged (another picture)
        reduced = DecodeCache(tmp_path / "cache", 300, min_bytes=0).load(jpeg)
    assert full.shape == (300, 400, 3) and reduced.shape == (300, 398, 3)
    cache = DecodeCache(tmp_path / "cache", 300, min_bytes=0)
    np.testing.assert_array_equal(cache.load(jpeg), full)  # decoded again, not reused
    cache.load(png)
    with call_budget(100_000):  # as it was: reused, and the PNG refused, as uncached
        low = DecodeCache(tmp_path / "cache", 300, min_bytes=0)
        np.testing.assert_array_equal(low.load(jpeg), reduced)
        with pytest.raises(ImageTooLarge, match="over the budget of 0.1 MP"):
            low.load(png)


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


def test_real_paths_resolve_as_path_resolve_does(tmp_path, monkeypatch):
    """Folders resolved once, files only if links: the same strings as Path.resolve, for
    relative paths, links to folders and to files, a missing file and a bare name."""
    from wingspan.files import real_paths

    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "1.jpg").write_bytes(b"x")
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "2.jpg").write_bytes(b"y")
    (tmp_path / "data" / "a" / "2.jpg").symlink_to(tmp_path / "pool" / "2.jpg")
    (tmp_path / "seen").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path / "seen")
    paths = ["a/1.jpg", "a/2.jpg", str(tmp_path / "seen" / "a" / "1.jpg"), "a/gone.jpg",
             "a/../a/1.jpg", "1.jpg", str(tmp_path / "data" / "a" / "2.jpg")]
    assert real_paths(paths) == [str(Path(p).resolve()) for p in paths]
    assert real_paths(paths)[:2] == [str(tmp_path / "data" / "a" / "1.jpg"),
                                     str(tmp_path / "pool" / "2.jpg")]
    # One name in two spellings (macOS writes the decomposed one): one file for the checks.
    composed, decomposed = "a/\u00e9t\u00e9.jpg", "a/e\u0301te\u0301.jpg"
    assert real_paths([composed]) == real_paths([decomposed])


def test_a_folder_replaced_when_killed_between_the_renames_is_put_back(tmp_path,
                                                                        monkeypatch):
    """Killed after the earlier folder was moved aside and before the new one was moved in,
    nothing stood at the folder's place, and the next replace began by removing the earlier
    one. It is now put back first: a next replace stopped at once leaves it in place."""
    import shutil

    import pytest

    from wingspan.files import replace_folder

    final, old = tmp_path / "ev", tmp_path / ".ev.old"
    old.mkdir()  # where the kill left the earlier results
    (old / "metrics.json").write_text("earlier")
    partial = tmp_path / ".ev.partial"
    partial.mkdir()
    (partial / "metrics.json").write_text("later")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", stopped)
        with pytest.raises(KeyboardInterrupt):
            replace_folder(partial, final)
    assert (final / "metrics.json").read_text() == "earlier"
    replace_folder(partial, final)
    assert (final / "metrics.json").read_text() == "later" and not old.exists()


def test_a_ctrl_c_between_replace_folders_renames_puts_the_earlier_back(tmp_path,
                                                                         monkeypatch):
    """`adapt --out EARLIER` stopped between moving the earlier run aside and moving the new
    one in left it hidden as .NAME.old; the next adapt took the free name and deleted it."""
    import os

    import pytest

    from wingspan import files
    from wingspan.training.adapt import default_out

    run = tmp_path / "r"
    final = tmp_path / "r-adapted"
    final.mkdir()
    (final / "adapt.json").write_text("earlier")
    partial = tmp_path / ".r-adapted.partial"
    partial.mkdir()
    real = os.replace

    def stopped_after_the_first(source, target):
        if Path(source) == partial:
            raise KeyboardInterrupt
        real(source, target)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", stopped_after_the_first)
        with pytest.raises(KeyboardInterrupt):
            files.replace_folder(partial, final)
    assert (final / "adapt.json").read_text() == "earlier"
    # Killed there (nothing put back): the next adapt's default name sees it, put back
    os.replace(final, tmp_path / ".r-adapted.old")
    assert default_out(run) == tmp_path / "r-adapted-2"
    assert (final / "adapt.json").read_text() == "earlier"


def test_disk_spelling_opens_an_nfc_key_of_a_name_written_on_macos(tmp_path, monkeypatch):
    """real_paths keys paths in NFC; a file whose folder and name the disk spells in NFD
    (as macOS writes them) is found by its key, and a path in no spelling stays as given."""
    import unicodedata

    from wingspan.files import disk_spelling, real_paths

    folder = tmp_path / unicodedata.normalize("NFD", "Épreuve")
    folder.mkdir()
    photo = folder / unicodedata.normalize("NFD", "café.jpg")
    photo.write_bytes(b"x")
    (tmp_path / "plain.jpg").write_bytes(b"y")
    keys = real_paths([photo, tmp_path / "plain.jpg", tmp_path / "gone.jpg"])
    assert not os.path.exists(keys[0])  # (Linux takes no other spelling of a name)
    spelt = disk_spelling(keys)
    assert spelt == [str(photo), keys[1], keys[2]]
    # A relative path, its first name respelt too (as the folder it is read from spells it)
    monkeypatch.chdir(tmp_path)
    assert disk_spelling([unicodedata.normalize("NFC", "Épreuve/café.jpg")]) == [
        str(photo.relative_to(tmp_path))]


def test_what_killed_writers_left_is_removed_once_their_process_is_gone(tmp_path):
    """Each killed export left its graph (14 MB for a Lite0), each killed audit its kept
    page, never removed. Gone now once the writer's process is gone and the file is quiet;
    a live process's, a recent one and the user's own files stay."""
    import subprocess
    import time

    from wingspan.files import remove_dead_leftovers

    gone = subprocess.Popen(["true"])  # a process that has ended
    gone.wait()
    old = time.time() - 3600
    names = {f".model.{gone.pid}.tmp.onnx": False, f".audit.{gone.pid}.old.html": False,
             f".model.{os.getpid()}.tmp.onnx": True, "model.onnx": True, "notes.tmp.txt": True}
    for name in names:
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (old, old))
    (tmp_path / f".recent.{gone.pid}.tmp.csv").write_text("being written elsewhere?")
    mine = tmp_path / f".notes.{gone.pid}.old.html"  # a user's own file, named alike
    mine.write_text("x")
    os.utime(mine, (old, old))
    remove_dead_leftovers(*(tmp_path / n for n in ("model.onnx", "audit.html", "recent.csv")))
    assert {p.name for p in tmp_path.iterdir()} == {
        n for n, kept in names.items() if kept} | {f".recent.{gone.pid}.tmp.csv", mine.name}


def test_whether_a_writer_lives_is_asked_without_a_signal_on_windows(monkeypatch):
    """os.kill(pid, 0) probes a process on Linux and macOS; on Windows signal 0 is
    CTRL_C_EVENT, a Ctrl-C to the console: a train that met a killed writer's leftover in
    the cache exited 130 without a word, every time. There psutil is asked instead."""
    import subprocess

    from wingspan import files

    psutil = pytest.importorskip("psutil")  # (installed with wingspan on Windows alone)
    gone = subprocess.Popen(["true"])
    gone.wait()
    asked = []

    def no_signals(pid, sig):
        raise AssertionError(f"os.kill({pid}, {sig}) on Windows")

    def pid_exists(pid):  # (psutil's own probe on Windows is OpenProcess, not a signal)
        asked.append(pid)
        return pid == os.getpid()

    monkeypatch.setattr(files, "WINDOWS", True)
    monkeypatch.setattr(os, "kill", no_signals)
    monkeypatch.setattr(psutil, "pid_exists", pid_exists)
    assert files._alive(os.getpid()) and not files._alive(gone.pid)
    assert asked == [os.getpid(), gone.pid]


def test_what_safetensors_left_writing_through_its_own_temporary_file_is_removed(tmp_path):
    """safetensors writes through a .tmpXXXXXX file of its own and renames it: a killed
    calibrate left a whole model's worth in model/, a killed train its feature cache's,
    which neither a resume nor the next save removed. A quiet one goes; a recent one (being
    written) and other files stay."""
    import time

    from wingspan.files import is_leftover, remove_dead_leftovers

    old = time.time() - 3600
    for name in (".tmpAb3dE9", ".tmpRecent", "notes.tmp"):
        (tmp_path / name).write_bytes(b"x" * 100)
    for name in (".tmpAb3dE9", "notes.tmp"):
        os.utime(tmp_path / name, (old, old))
    remove_dead_leftovers(tmp_path / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmpRecent", "notes.tmp"]
    assert is_leftover(".tmpRecent") and not is_leftover("notes.tmp")  # (at a resume)


def test_a_cache_drops_what_its_killed_writers_left(tmp_path):
    """A data worker killed writing a decoded image left .<sha1>.<pid>.tmp.npy in the
    cache shared by every run, which nothing read or removed. Gone once its process is and
    the file is quiet; a live writer's, a recent one and the entries stay."""
    import hashlib
    import subprocess
    import time

    import numpy as np

    from wingspan.files import FileArrays

    gone = subprocess.Popen(["true"])
    gone.wait()
    sha = hashlib.sha1(b"x").hexdigest()
    old = time.time() - 3600
    names = {f".{sha}.{gone.pid}.tmp.npy": False, f".{sha}.{os.getpid()}.tmp.npy": True,
             f"{sha}.npy": True}
    for name in names:
        np.save(tmp_path / name, np.zeros(3))
        os.utime(tmp_path / name, (old, old))
    np.save(tmp_path / f".{'0' * 40}.{gone.pid}.tmp.npy", np.zeros(3))  # recent
    FileArrays(tmp_path, "key")
    assert {p.name for p in tmp_path.iterdir()} == {
        n for n, kept in names.items() if kept} | {f".{'0' * 40}.{gone.pid}.tmp.npy"}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_a_cache_shared_by_a_group_stays_writable_by_the_group(tmp_path):
    """A lab's cache ($WINGSPAN_CACHE at a setgid folder of its group): the first user's
    decoded-*, features and graphs were made 0755 (umask 022), so every other user's
    entries were not kept, unsaid. Folders made there take its group's access; a private
    cache's stay as the umask makes them."""
    import stat

    from wingspan.files import FileArrays
    from wingspan.models.engine import EngineCache
    from wingspan.models.runtime import _store_graph

    shared, private = tmp_path / "shared", tmp_path / "private"
    shared.mkdir(mode=0o775)
    shared.chmod(0o2775)
    private.mkdir()
    private.chmod(0o755)
    umask = os.umask(0o022)
    try:
        FileArrays(shared / "audit-features" / "abc", "key")
        _store_graph(shared / "graphs" / "g.onnx", b"graph", 1.0)
        # (a cache folder not made yet, its first file the engines' timings)
        EngineCache(shared / "new-cache" / "engines.json").put({"k": 1}, {"r": 2})
        FileArrays(private / "decoded-256", "key")
    finally:
        os.umask(umask)
    for folder in ("audit-features", "audit-features/abc", "graphs", "new-cache"):
        assert stat.S_IMODE((shared / folder).stat().st_mode) == 0o2775, folder
    assert (shared / "graphs" / "g.onnx").read_bytes() == b"graph"
    assert stat.S_IMODE((private / "decoded-256").stat().st_mode) == 0o755


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_a_cache_made_under_a_folder_open_to_all_stays_private(tmp_path):
    """A cache made under /tmp (1777: group-writable too) took its group bits: the user's
    own cache went writable by their group (often every user's), for anyone to replace
    its features, decodes and graphs."""
    import stat

    from wingspan.files import FileArrays

    public = tmp_path / "tmp"
    public.mkdir()
    public.chmod(0o1777)
    umask = os.umask(0o022)
    try:
        FileArrays(public / "me" / "wingspan" / "features", "key")
    finally:
        os.umask(umask)
    for folder in ("me", "me/wingspan", "me/wingspan/features"):
        assert stat.S_IMODE((public / folder).stat().st_mode) == 0o755, folder


def test_an_output_open_in_another_program_on_windows_is_named(tmp_path, monkeypatch):
    """Windows refuses to replace a file that another program holds open (a predictions
    CSV in Excel), or to move a folder holding one (an evaluation's): the error said
    "Permission denied" on a temporary file that no longer existed, and hinted at `ls -l`.
    Now it names the file and says to close it; the file is as it was."""
    from wingspan import files

    target = tmp_path / "preds.csv"
    target.write_text("the user's open copy")
    real = os.replace

    def excel(source, dest):
        if Path(dest) == target or Path(source) == tmp_path / "evaluation-test":
            raise PermissionError(13, "The process cannot access the file because it is "
                                      "being used by another process", str(source))
        real(source, dest)

    monkeypatch.setattr(files, "WINDOWS", True)
    monkeypatch.setattr(os, "replace", excel)
    with pytest.raises(WingspanError, match="Cannot replace .*preds.csv: another program may "
                                            "have it open") as e, atomic_path(str(target)) as tmp:
        tmp.write_text("new")
    assert "Close it there" in e.value.hint and target.read_text() == "the user's open copy"
    assert [p.name for p in tmp_path.iterdir()] == ["preds.csv"]  # (no temporary left)
    folder = tmp_path / "evaluation-test"
    folder.mkdir()
    (folder / "predictions.csv").write_text("open")
    (tmp_path / ".partial").mkdir()
    with pytest.raises(WingspanError, match="another program may have a file in the folder open"):
        files.replace_folder(tmp_path / ".partial", folder)
    assert (folder / "predictions.csv").read_text() == "open"
    # Elsewhere a PermissionError stays one (a folder this user may not write, say).
    monkeypatch.setattr(files, "WINDOWS", False)
    with pytest.raises(PermissionError), atomic_path(target) as tmp:
        tmp.write_text("new")
