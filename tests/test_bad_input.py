"""The bad-input corpus: generated files and settings a hostile but realistic user gives,
each with its expected outcome. `predict` reads every file kind; its outcome for each is
one of: predicted, skipped with a reason (the others go on), or a clear error (exit 2)."""

import csv
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import tiny

from wingspan.data import read_dataset
from wingspan.training import train

GOOD = (200, 120, 40)


def _rgb(size=(64, 48)):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3),
                                                             dtype=np.uint8))


def _truncated(path):
    _rgb((256, 256)).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:600])


def _bomb(path):
    """A PNG whose header claims 40000 x 40000 pixels (1.6 GP) over a few bytes of data."""
    import struct
    import zlib

    _rgb((8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", 40000, 40000)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def _exif_rotated(path):
    image, exif = _rgb(), Image.Exif()
    exif[0x0112] = 6
    image.save(path, "JPEG", exif=exif)


# name -> (how to write it, expected: "predicted" or a fragment of the skip reason)
FILES = {
    "zero-byte.jpg": (lambda p: p.write_bytes(b""), "the file is empty (0 bytes)"),
    "text.jpg": (lambda p: p.write_text("hello, I am not a picture\n"),
                 "is not a JPEG, PNG, TIFF, WebP, GIF or BMP image, whatever its name says"),
    "truncated.jpg": (_truncated, "Cannot read image"),
    "huge.png": (lambda p: Image.new("L", (9000, 6000)).save(p),  # and how to raise it
                 "over the budget of 50 MP. Shrink the image, or raise the budget (--max-pixels"),
    "bomb-40000x40000.png": (_bomb, "Cannot read image"),
    "huge.jpg": (lambda p: Image.new("RGB", (9000, 6000), GOOD).save(p), "predicted"),
    "tiny-3x3.png": (lambda p: _rgb((3, 3)).save(p), "predicted"),
    "strip-4000x10.png": (lambda p: _rgb((4000, 10)).save(p), "predicted"),
    "cmyk.jpg": (lambda p: _rgb().convert("CMYK").save(p), "predicted"),
    "grey16.png": (lambda p: Image.fromarray(
        (np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(p), "predicted"),
    "rgba.png": (lambda p: _rgb().convert("RGBA").save(p), "predicted"),
    "palette.gif": (lambda p: _rgb().convert("P").save(p), "predicted"),
    "scan.tiff": (lambda p: _rgb().save(p), "predicted"),
    "photo.webp": (lambda p: _rgb().save(p), "predicted"),
    "rotated-exif.jpg": (_exif_rotated, "predicted"),
    "écaille 🦋.jpg": (lambda p: _rgb().save(p, "JPEG"), "predicted"),
    "png-named.jpg": (lambda p: _rgb().save(p, "PNG"), "predicted"),  # content, not suffix
}


@pytest.fixture(scope="module")
def run_dir(demo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    return train(read_dataset(demo_dir), tiny(tmp, epochs_finetune=0), tmp / "runs", "r",
                 quiet=True)


@pytest.fixture(scope="module")
def predicted(run_dir, tmp_path_factory):
    """One predict over the whole corpus: every file either predicted or skipped."""
    from wingspan.cli import main

    folder = tmp_path_factory.mktemp("corpus")
    for name, (write, _) in FILES.items():
        write(folder / name)
    out = folder.parent / "pred.csv"
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run_dir), *[str(folder / n) for n in FILES], "--output", str(out),
              "--quiet"])
    assert e.value.code in (None, 0)
    with open(out, newline="") as f:
        return {row["path"].rsplit("/", 1)[-1]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("name", list(FILES))
def test_predict_outcome_for_each_kind_of_file(predicted, name):
    expected = FILES[name][1]
    row = predicted[name]
    if expected == "predicted":
        assert row["class_1"] and not row["error"], row["error"]
        assert 0 < float(row["prob_1"]) <= 1
    else:
        assert not row["class_1"] and expected in row["error"]


# Typer words a range error one of two ways, by version: "Input should be greater than or
# equal to 1" (0.2x) or click's "0 is not in the range x>=1".
AT_LEAST_1 = r"(greater than or equal to 1|x>=1)"


@pytest.mark.parametrize("args, message", [
    (["--top-k", "0"], AT_LEAST_1),
    (["--batch-size", "0"], AT_LEAST_1),
    (["--output", "p.txt"], "must end in .csv, .json or .html"),
    (["--max-pixels", "0"], AT_LEAST_1),
    (["--device", "tpu"], "Unknown device 'tpu'"),
    # (train refused it; predict and evaluate passed it on to torch: a traceback)
    (["--device", "mps"], "--device mps: wingspan runs on the CPU or a CUDA GPU; an Apple "
                          r"GPU \(mps\) is not supported yet"),
    (["--device", "cuda:7", "--devices", "2"], "names one GPU"),
    (["--devices", "0"], "--devices 0: must be 1 to 1024"),
])
def test_predict_settings_that_are_refused(run_dir, run_cli, tmp_path, monkeypatch, args,
                                           message):
    image = tmp_path / "a.jpg"
    _rgb().save(image)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past "no GPU here"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # (cuda:7 is there)
    code, _, err = run_cli("predict", run_dir, image, *args)
    assert code == 2 and re.search(message, " ".join(err.split())) and "Traceback" not in err


def test_a_missing_path_and_a_missing_model(run_dir, run_cli, tmp_path, monkeypatch):
    code, out, err = run_cli("predict", run_dir, tmp_path / "nowhere.jpg")
    err = " ".join(err.split())
    assert code == 2 and "no such file or folder" in err and "No model at" not in err
    assert "No image could be predicted" in err
    code, _, err = run_cli("predict", tmp_path / "no-model", tmp_path)
    assert code == 2 and "No model at" in err and "Did you mean" not in err
    # A run's name mistyped: the runs with names close to it.
    monkeypatch.chdir(run_dir.parent.parent)
    code, _, err = run_cli("predict", f"{run_dir.parent.name}/{run_dir.name}x", tmp_path)
    err = " ".join(err.split())
    assert code == 2 and "the path does not exist" in err, err
    assert f"Did you mean {run_dir.parent.name}/{run_dir.name}?" in err, err


@pytest.mark.parametrize("args, batch", [((), 32), (("--batch-size", "64"), 64),
                                         (("--batch-size=6",), 6)])
def test_out_of_memory_says_which_batch_size_to_try(run_dir, run_cli, tmp_path, monkeypatch,
                                                    args, batch):
    """torch's allocator error (a real one, asked for 400 PB) is a message and a hint, exit
    2, not a traceback; any other RuntimeError stays a traceback (a bug to report)."""
    from wingspan.inference import Predictor

    def too_much(self, *a, **k):
        torch.empty(10**17)  # (400 PB: past any address space, overcommitted or not)

    image = tmp_path / "a.jpg"
    _rgb().save(image)
    monkeypatch.setattr(Predictor, "run", too_much)
    code, _, err = run_cli("predict", run_dir, image, *args)
    err = " ".join(err.split())
    assert code == 2 and f"Out of CPU memory at --batch-size {batch}: DefaultCPUAllocator" in err
    assert f"A smaller --batch-size (e.g. {batch // 2}) needs less memory" in err
    assert "enforce fail" not in err and "Traceback" not in err

    def bug(self, *a, **k):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(Predictor, "run", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_cli("predict", run_dir, image)


@pytest.mark.parametrize("said, detail, gpu_hint", [
    # torch before 2.4 (the statistics in brackets, then advice)
    ("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity; "
     "14.21 GiB already allocated; 4.75 MiB free; 14.50 GiB reserved in total by PyTorch) If "
     "reserved memory is >> allocated memory try setting max_split_size_mb",
     "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity; "
     "14.21 GiB already allocated; 4.75 MiB free; 14.50 GiB reserved in total by PyTorch)",
     True),
    # a Mac's: no nvidia-smi, and none of torch's advice to lift its limit
    ("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max "
     "allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool. Use "
     "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations "
     "(may cause system failure).",
     "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max "
     "allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool", False)])
def test_out_of_memory_messages_of_other_devices_and_versions(said, detail, gpu_hint):
    from wingspan.errors import out_of_memory_said

    e = out_of_memory_said(torch.OutOfMemoryError(said), 32)
    assert e.message == f"Out of GPU memory at --batch-size 32: {detail}."
    assert ("nvidia-smi" in e.hint) == gpu_hint
    # At batch 1 there is no smaller batch to try; where a file set it, no number is given
    assert "--batch-size" not in out_of_memory_said(torch.OutOfMemoryError(said), 1,
                                                    training=True).hint
    assert "a smaller --batch-size or --image-size" in out_of_memory_said(
        torch.OutOfMemoryError(said), None, training=True).hint


def test_a_data_workers_full_shared_memory_is_said_with_what_to_change():
    """predict under Docker's 64 MB /dev/shm: a 60-line traceback ending in a worker's
    "unable to allocate shared memory(shm) for file </torch_1_2>: No space left on device
    (28)", with no word of --workers or the container's shm size."""
    from wingspan.errors import out_of_memory_said

    error = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal "
                         "Traceback (most recent call last):\n  ...\nRuntimeError: unable "
                         "to allocate shared memory(shm) for file </torch_61_2_0>: No space "
                         "left on device (28)\n")
    e = out_of_memory_said(error, 32)
    assert e.message.startswith("Out of shared memory: a data worker could not hand its "
                                "batch over through /dev/shm (unable to allocate shared "
                                "memory(shm) for file </torch_61_2_0>: No space left"), e.message
    assert "--workers" in e.hint and "docker run --shm-size 1g" in e.hint


def test_the_batch_size_an_out_of_memory_message_names():
    """The one given, the default, or none where a config file or the run sets it (it
    said 32 of a run whose --config set 64)."""
    from wingspan.cli.app import _batch_size

    assert _batch_size(["predict", "RUN", "x.jpg"]) == 32
    assert _batch_size(["train", "data", "--batch-size", "12"]) == 12
    assert _batch_size(["train", "data", "--config", "c.yaml"]) is None
    assert _batch_size(["train", "--resume", "runs/r"]) is None
    assert _batch_size(["explain", "RUN", "x.jpg"]) is None  # (no --batch-size there)
    # `doctor` times the training step at its --batch-size, which can run out of memory on
    # a GPU: it was left out of a list of commands kept by hand.
    assert _batch_size(["doctor", "--batch-size", "256"]) == 256
    assert _batch_size(["doctor"]) == 32
    assert _batch_size(["data", "audit", "DATA"]) is None  # (a group's command: none there)
    assert _batch_size(["nosuchcommand"]) is None


def test_predict_on_one_photo_and_on_none(run_dir, run_cli, tmp_path):
    image = tmp_path / "a.jpg"
    _rgb().save(image)
    code, out, err = run_cli("predict", run_dir, image, "--quiet")
    assert code == 0, err
    assert "1 image predicted" in " ".join(out.split())
    # More classes asked for than the model has: the header names those shown, the 3
    # after the prediction (it said "top 4" over 3); with --top-k 1, none.
    code, out, err = run_cli("predict", run_dir, image, "--top-k", "10", "--quiet")
    assert code == 0 and "next 3" in out and "next 9" not in out, out
    code, out, err = run_cli("predict", run_dir, image, "--top-k", "1", "--quiet")
    assert code == 0 and "prediction" in out and "next" not in out, out
    # Nothing predicted: the files skipped and why, not an empty table above them.
    code, out, err = run_cli("predict", run_dir, tmp_path / "nowhere.jpg")
    assert code == 2 and "prediction" not in out and "no such file" in err


def test_predict_counts_the_files_of_a_folder_that_are_not_images(run_dir, run_cli, tmp_path):
    """A folder's notes and a raw photo's sidecar are left out, as training's reader leaves
    them, but said: "2 images predicted" of a folder of 5 files read as 3 lost. The JSON
    lists them; a pattern (photos/*) that matches them says the same."""
    import json

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        _rgb().save(folder / name)
    (folder / "notes.txt").write_text("garden, June")
    (folder / "a.xmp").write_text("<x:xmpmeta/>")
    (folder / "Thumbs.db").write_bytes(b"junk")  # a file manager's: not said
    for given in (folder, f"{folder}/*"):
        code, out, err = run_cli("predict", run_dir, given, "--output", tmp_path / "p.json",
                                 "--quiet")
        said = " ".join((out + err).split())
        assert code == 0 and "2 images predicted" in said, said
        assert "Left out 2 files that are not images (by their names' endings): a.xmp, " \
               "notes.txt" in said and "Thumbs" not in said, said
        written = json.loads((tmp_path / "p.json").read_text())
        assert [p.rsplit("/", 1)[-1] for p in written["not_images"]] == ["a.xmp", "notes.txt"]
        assert len(written["predictions"]) == 2 and not written["failed"]
    # The folder and a pattern over it in one call: each file counted once.
    code, out, err = run_cli("predict", run_dir, folder, f"{folder}/*", f"{folder}/**",
                             "--quiet")
    assert code == 0 and "Left out 2 files that are not images" in " ".join((out + err).split())
    # The library says it as a warning.
    import wingspan as ws

    with pytest.warns(UserWarning, match="Left out 2 files that are not images"):
        assert len(ws.load(run_dir).predict(folder, quiet=True)) == 2
    # One image named: nothing else said.
    code, out, err = run_cli("predict", run_dir, folder / "a.jpg", "--quiet")
    assert code == 0 and "Left out" not in out + err
    # One such file: said in the singular ("by their names' endings" of one file).
    (folder / "notes.txt").unlink()
    code, out, err = run_cli("predict", run_dir, folder, "--quiet")
    assert "Left out 1 file that is not an image (by its name's ending): a.xmp" in \
        " ".join((out + err).split()), (out, err)


def test_evaluate_on_photos_whose_classes_the_model_does_not_know(run_dir, run_cli, tmp_path,
                                                                  demo_dir):
    """A folder whose class names are not the model's: both sets named, and --map."""
    source = next(p for p in demo_dir.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    for label in ("garden_a", "garden_b"):
        (tmp_path / "garden" / label).mkdir(parents=True)
        shutil.copy(source, tmp_path / "garden" / label / source.name)
    code, _, err = run_cli("evaluate", run_dir, tmp_path / "garden", "--split", "all",
                           "--quiet")
    err = " ".join(err.split())
    classes = ", ".join(sorted(p.name for p in demo_dir.iterdir() if p.is_dir()))
    assert code == 2 and "Traceback" not in err
    assert f"the model knows {classes}; the data's 'label' classes there are garden_a, " \
           "garden_b" in err and "--map MODEL_CLASS=DATA_CLASS" in err


def test_a_message_names_some_and_counts_the_rest():
    from wingspan.errors import some

    assert some(["a", "b"]) == "a, b"
    assert some(list("abcdefg"), 5) == "a, b, c, d, e and 2 more"
    assert some([]) == ""


def test_predict_writes_the_same_columns_whatever_could_be_read(run_dir, demo_dir, tmp_path):
    """The columns follow the model and --top-k, not the rows read: a batch of broken files
    had no level columns and one class column, and appended batches did not line up. Lines
    end in "\\n" (a "\\r" was left on the error column for awk and cut)."""
    from wingspan.cli import main

    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    headers = []
    for name, photo in (("good", next(demo_dir.rglob("*.jpg"))), ("bad", tmp_path / "broken.jpg")):
        out = tmp_path / f"{name}.csv"
        with pytest.raises(SystemExit):
            main(["predict", str(run_dir), str(photo), "--output", str(out), "--quiet"])
        raw = out.read_bytes()
        assert b"\r" not in raw
        headers.append(raw.split(b"\n")[0])
    assert headers[0] == headers[1] and b"class_3" in headers[0], headers
    # A score just over its threshold reads as over it (6 digits wrote both 0.9992).
    from wingspan.predict import _cell

    assert _cell(0.99920004) != _cell(0.99919957)


def test_predict_strict_exits_2_for_a_skipped_image_after_writing_the_rest(run_dir, demo_dir,
                                                                           tmp_path, run_cli):
    """A script had no way to fail on a mistyped or broken path: predict listed and skipped
    it and exited 0, as it still does without --strict."""
    import pandas as pd

    good = next(demo_dir.rglob("*.jpg"))
    paths = [good, tmp_path / "mistyped.jpg"]
    code, _, err = run_cli("predict", run_dir, *paths, "--output", tmp_path / "p.csv", "-q")
    assert code == 0, err
    code, _, err = run_cli("predict", run_dir, *paths, "--output", tmp_path / "s.csv", "-q",
                           "--strict")
    assert code == 2 and "--strict: 1 image was missing or unreadable" in err, err
    rows = pd.read_csv(tmp_path / "s.csv")  # written first: nothing lost
    assert rows["path"].tolist() == [str(good), str(tmp_path / "mistyped.jpg")]
    assert rows["error"].isna().tolist() == [True, False]


def test_explain_strict_exits_2_for_a_skipped_image_after_the_overlays(run_dir, demo_dir,
                                                                       tmp_path, run_cli):
    """As predict --strict: explain listed and skipped a missing or broken image and
    exited 0, with no option to fail on it; now --strict exits 2, the others' overlays
    written first."""
    good = next(demo_dir.rglob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    for given in ([tmp_path / "mistyped.jpg"], [broken]):
        code, _, err = run_cli("explain", run_dir, good, *given, "--out", tmp_path / "a", "-q")
        assert code == 0, err
        out = tmp_path / f"s-{given[0].stem}"
        code, _, err = run_cli("explain", run_dir, good, *given, "--out", out, "-q", "--strict")
        assert code == 2 and "--strict: 1 image was missing or unreadable" in err, err
        assert len(list(out.glob("*.png"))) == 1  # the good one's overlay: nothing lost


@pytest.mark.parametrize("backbone", ["runs/butterflies", "../model.pth"])
def test_a_path_given_as_the_backbone_is_said_so_before_the_run_is_named(demo_dir, run_cli,
                                                                         tmp_path, backbone):
    # A run's default name is DATA-BACKBONE: "--backbone runs/x" was refused as "The run
    # name 'demo-runs/x' is a path", of a name the user never gave; no folder is made.
    code, _, err = run_cli("train", demo_dir, "--backbone", backbone, "--runs-dir",
                           tmp_path / "runs")
    err = " ".join(err.split())
    assert code == 2 and "is a path, not an architecture" in err, err
    assert "run name" not in err and f"--weights {backbone}" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_run_and_the_images_swapped_are_said_to_be(run_dir, demo_dir, run_cli):
    """`wingspan predict photos/ runs/x` said only that photos/ is no model: the run is
    named as coming first, with the command in order (predict, explain, evaluate)."""
    folder = next(p for p in demo_dir.iterdir() if p.is_dir())
    image = next(folder.glob("*.jpg"))
    for words, first in ((("predict", folder, run_dir), folder),
                         (("explain", image, run_dir), image),
                         (("evaluate", demo_dir, run_dir), demo_dir)):
        code, _, err = run_cli(*words)
        err = " ".join(err.split())
        assert code == 2 and f"{first} is not a model, and {run_dir} is one" in err, err
        assert f"The run comes first: `wingspan {words[0]} {run_dir} {first}`" in err, err
    # Neither a model: the error as it was, with its own hint.
    code, _, err = run_cli("predict", folder, image)
    assert code == 2 and "The run comes first" not in err and "Give a run folder" in err, err
