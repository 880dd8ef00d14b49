"""`wingspan export`: an ONNX model that runs with onnxruntime alone."""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import typer.main
from helpers import ctrl_c_at_rename
from PIL import Image
from test_train import tiny

from wingspan.cli import app
from wingspan.data import read_dataset
from wingspan.data.images import open_rgb
from wingspan.export import metadata_path, prepare_pixels
from wingspan.models import load_bundle
from wingspan.models.unknown import level_thresholds
from wingspan.training import train

# The README's ONNX Runtime example, run as it stands (onnxruntime, Pillow and numpy only)
# on each image, its model and image paths swapped for the test's: what it prints, and
# the model's outputs it leaves in `out`.
RUN_README_EXAMPLE = """
import contextlib, io, json, sys
code, model, images = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for path in images:
    names, printed = {"__name__": "__main__", "MODEL": model, "IMAGE": path}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, names)
    rows.append({"printed": printed.getvalue().splitlines(),
                 "out": {k: v[0].tolist() for k, v in names["out"].items()}})
assert not any(m.startswith("wingspan") for m in sys.modules)
print(json.dumps(rows))
"""


def readme_onnx_example() -> str:
    """The README's python block that uses onnxruntime, reading MODEL and IMAGE."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
              if "onnxruntime" in b]
    assert len(blocks) == 1, "the README has one ONNX Runtime example"
    code, models = re.subn(r'InferenceSession\("[^"]+"\)', "InferenceSession(MODEL)",
                           blocks[0])
    code, images = re.subn(r'Image\.open\("[^"]+"\)', "Image.open(IMAGE)", code)
    assert (models, images) == (1, 1), "the example opens one model file and one image"
    return code


def run_readme_onnx_example(model, images: list[str]) -> list[dict]:
    """Per image: the levels' lines [level, class, probability] the example prints, its
    answer, and the model's outputs by name."""
    done = subprocess.run(
        [sys.executable, "-c", RUN_README_EXAMPLE, readme_onnx_example(), str(model), *images],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # the README's example fails: its traceback
    rows = json.loads(done.stdout)
    for row in rows:
        *levels, answer = row.pop("printed")
        assert answer.startswith("answer: ")
        row["answer"] = answer.removeprefix("answer: ")
        row["branch"] = []
        for line in levels:  # "family Nymphalidae 0.97": a class name may hold spaces
            level, *name, probability = line.split()
            row["branch"].append((level, " ".join(name), float(probability)))
    return rows


@pytest.fixture(scope="module")
def run_dir(demo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    return train(read_dataset(demo_dir), tiny(tmp, levels=["family", "label"]), tmp / "runs",
                 "r", quiet=True)


def test_export_runs_without_wingspan_and_matches_pytorch(run_dir, run_cli, demo_dir):
    code, out, err = run_cli("export", run_dir)
    assert code == 0, err
    model = run_dir / "export" / "model.onnx"
    meta = json.loads(metadata_path(model).read_text())
    # Checked on the run's val images against PyTorch: close, and really compared.
    check = meta["checked"]
    assert check["images"] > 0 and 0 < check["max_abs_probability_difference"] < 1e-4
    assert meta["levels"] == ["family", "label"] and meta["taxonomy"]
    assert meta["outputs"] == ["family", "label", "unknown.family", "unknown.label"]
    assert meta["temperature"] > 0 and meta["input"]["dtype"] == "uint8"
    # What timm builds (a tf_ Lite): its plain namesake takes the weights and answers otherwise.
    from wingspan.models.bundle import read_manifest

    assert meta["timm_name"] == read_manifest(run_dir / "model")["timm_name"]
    # How to decode, for a port beyond Pillow (a browser, a phone): each step it skips
    # answers otherwise.
    assert list(meta["input"]["decode"]) == ["jpeg", "orientation", "transparency",
                                             "high_bit_depth", "colour", "resize", "crop"]
    assert meta["unknown"]["score"] == "msp+knn" and check["max_unknown_score_difference"] < 1e-3
    import onnx

    graph = onnx.load(str(model)).graph
    assert [n.op_type for n in graph.node].count("TopK") == 1  # one kNN search, both levels
    # The batch axis is called so on every input and output (not "Softmaxlabel_dim_0").
    assert {v.type.tensor_type.shape.dim[0].dim_param
            for v in [*graph.input, *graph.output]} == {"batch"}
    images = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))[::7]]
    # A cut-out on a transparent background, its hidden pixels black: wingspan puts it on
    # white, and the README's steps must too.
    cutout = np.asarray(Image.open(images[0]).convert("RGBA")).copy()
    cutout[: len(cutout) // 2, :, :] = 0  # the top half: transparent, and black beneath
    images.append(str(run_dir / "cutout.png"))
    Image.fromarray(cutout, "RGBA").save(images[-1])
    # A 16-bit scan: its values stretched over 0..255 (converting it clips them to white).
    deep = np.asarray(Image.open(images[1]).convert("L"), dtype=np.uint16) * 40 + 300
    images.append(str(run_dir / "scan16.png"))
    Image.fromarray(deep).save(images[-1])
    assert Image.open(images[-1]).mode.startswith("I")
    # The same with a colour key (tRNS): stretched, as without one (the README's steps
    # put it on white: 16-bit values clip to white on the way to RGBA).
    images.append(str(run_dir / "scan16-keyed.png"))
    Image.fromarray(deep).save(images[-1], transparency=int(deep[0, 0]))
    assert "transparency" in Image.open(images[-1]).info
    # A float image with a NaN: stretched over its other values (one NaN made it black).
    floats = np.asarray(Image.open(images[2]).convert("L"), dtype=np.float32) / 7
    floats[0, 0] = np.nan
    images.append(str(run_dir / "float.tif"))
    Image.fromarray(floats).save(images[-1])
    rows = run_readme_onnx_example(model, images)
    for row in rows:
        p = np.array(row["out"]["label"])
        assert 0 < p.max() <= 1 and p.sum() == pytest.approx(1.0, abs=1e-5)
        assert row["answer"] == "unknown" or row["answer"] in {*meta["classes"]["family"],
                                                               *meta["classes"]["label"]}
    # The README's steps give predict's answer, branch and probabilities (a family's is the
    # sum over its species, not its own head's), from the same pixels.
    from wingspan.inference import Predictor
    from wingspan.predict import predict

    # (fp32, as the export: what is compared is the preprocessing, not the engines; bf16
    # moves a probability by thousandths, and an answer near its threshold with it)
    said = predict(Predictor(run_dir, workers=0, precision="fp32"), images,
                   progress=False).rows
    for row, theirs in zip(said, rows, strict=True):
        assert row["answer"] == theirs["answer"]
        assert [c for _, c, _ in row["taxonomy"]] == [c for _, c, _ in theirs["branch"]]
        assert [lv for lv, _, _ in theirs["branch"]] == meta["levels"]
        np.testing.assert_allclose([p for _, _, p in row["taxonomy"]],
                                   [p for _, _, p in theirs["branch"]], atol=0.02)
    # The exported scores are the bundle's own detector's, as predict computes them, on the
    # same pixels, so its thresholds hold for them.
    net, manifest, detector = load_bundle(run_dir / "model", with_unknown=True)
    pre, size = manifest["preprocessing"], meta["input"]["size"]
    assert meta["input"]["interpolation"] == pre["interpolation"]  # training's resize
    pixels = np.stack([prepare_pixels(open_rgb(p), size,
                                      meta["input"]["resize_shorter_side_to"],
                                      meta["input"]["interpolation"]) for p in images])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(pre["mean"])[:, None, None]) / torch.tensor(pre["std"])[:, None, None]
    with torch.no_grad():
        features = net.float().eval().features(x)
        want = detector.scores(features, net.head(features))
    # A combined score is a share of val images: rounding may move an image across one
    # val score, and its score by one val image's share (`step`), as export allows. The
    # answers above (predict's and the README's) can then differ only for an image that
    # close to a threshold.
    step = detector.graph("msp+knn").step
    for level in meta["levels"]:
        got = np.array([row["out"][meta["unknown"]["outputs"][level]] for row in rows])
        np.testing.assert_allclose(got, want[level], rtol=1e-3, atol=1e-3 + step)
        threshold = detector.thresholds["msp+knn"][level]
        assert meta["unknown"]["thresholds"][level] == pytest.approx(threshold)
        clear = np.abs(want[level] - threshold) > step + 1e-3
        assert ((got > threshold) == (want[level] > threshold))[clear].all()
    code, _, err = run_cli("export", run_dir, "--format", "tflite")
    assert code == 2 and "Unknown export format 'tflite'" in err
    # Another of the scores the model holds, by name (and --quiet, as every command that
    # works a while takes: no spinner on stderr, the results on stdout).
    other = run_dir / "export" / "maha.onnx"
    code, out, err = run_cli("export", run_dir, "--unknown-score", "mahalanobis", "--out", other,
                             "--quiet")
    assert code == 0 and "Wrote" in out, err
    assert json.loads(metadata_path(other).read_text())["unknown"]["score"] == "mahalanobis"
    code, _, err = run_cli("export", run_dir, "--unknown-score", "odin")
    assert code != 0 and "No unknown score 'odin'" in err


def test_torchscript_export_runs_with_torch_alone(run_dir, run_cli, demo_dir):
    import warnings

    for fmt in ("onnx", "torchscript"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, _, err = run_cli("export", run_dir, "--format", fmt)
        assert code == 0, err
        # torch's "torch.jit.save is deprecated": nothing a user exporting can act on.
        assert not [str(w.message) for w in caught if w.category is FutureWarning]
    model = run_dir / "export" / "model.pt"
    meta = json.loads(metadata_path(model).read_text())
    # --help names the file each format is written to by default (it named model.onnx only).
    out = next(p for p in typer.main.get_command(app).commands["export"].params
               if p.name == "out_path")
    assert all(f.name in out.help for f in (model, run_dir / "export" / "model.onnx"))
    # Beside the ONNX export in the same folder, each file keeps its own metadata.
    onnx = json.loads((run_dir / "export" / "model.onnx.json").read_text())
    assert (meta["format"], onnx["format"]) == ("wingspan-torchscript", "wingspan-onnx")
    # The same kernels as eager PyTorch: checked on real images, equal here.
    assert meta["checked"]["images"] > 0
    assert meta["checked"]["max_abs_probability_difference"] <= 1e-4
    script = ("import sys, json, torch; extra = {'wingspan.json': ''}; "
              "m = torch.jit.load(sys.argv[1], _extra_files=extra); "
              "x = torch.zeros(2, 32, 32, 3, dtype=torch.uint8); out = m(x); "
              "assert not any(k.startswith('wingspan') for k in sys.modules); "
              "assert not any(v.requires_grad for v in out.values()); "  # .numpy() works
              "print(json.dumps({k: v.sum(1).tolist() if v.dim() == 2 else v.shape[0] "
              "for k, v in out.items()})); "
              "print(json.dumps(json.loads(extra['wingspan.json'])['outputs']))")
    printed = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True,
                             text=True, check=True).stdout
    sums, outputs = printed.strip().splitlines()
    sums = json.loads(sums)
    for level in ("family", "label"):
        assert sums[level] == pytest.approx([1.0, 1.0], abs=1e-5)
        assert sums[f"unknown.{level}"] == 2  # a score per image
    assert json.loads(outputs) == ["family", "label", "unknown.family", "unknown.label"]
    # Pixels it was not made for are refused, as ONNX Runtime refuses them (a trace alone
    # answered floats in 0-1, an image resized but not cropped, and NCHW).
    script = ("import sys, torch; m = torch.jit.load(sys.argv[1]); "
              "bad = [torch.zeros(1, 32, 32, 3), torch.zeros(1, 37, 37, 3, dtype=torch.uint8), "
              "torch.zeros(1, 3, 32, 32, dtype=torch.uint8)]\n"
              "for x in bad:\n"
              "    try:\n        m(x)\n        print('answered')\n"
              "    except Exception as e:\n        print(str(e).strip().splitlines()[-1])")
    said = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    assert len(said) == 3 and "expected uint8 values 0-255" in said[0], said
    assert all("expected uint8 RGB (N, 32, 32, 3)" in line for line in said[1:]), said
    assert "got [1, 37, 37, 3]" in said[1] and "got [1, 3, 32, 32]" in said[2]


@pytest.mark.parametrize("nth", [1, 2])
def test_an_export_killed_between_its_two_files_keeps_the_previous_pair(run_dir, tmp_path,
                                                                        monkeypatch, nth):
    """The JSON beside a model must be that model's: stopped before or between the renames
    of the new model and its JSON, an export leaves the previous pair whole (a model
    without its JSON loses its thresholds; one beside the other's, wrong answers)."""
    from wingspan import export

    out = tmp_path / "model.pt"
    export.export_model(run_dir, out, fmt="torchscript")
    before = out.read_bytes(), metadata_path(out).read_text()
    ctrl_c_at_rename(monkeypatch, nth)
    with pytest.raises(KeyboardInterrupt):
        export.export_model(run_dir, out, fmt="torchscript", unknown_score="msp")
    assert (out.read_bytes(), metadata_path(out).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.json"]


def test_a_reexport_beside_an_older_exports_metadata_says_it_is_out_of_date(run_dir,
                                                                           tmp_path):
    """Exports before 2026-12-01 wrote model.json beside model.onnx; today's write
    model.onnx.json. A re-export after `calibrate` left the old file, with the old
    temperature, for a deployment script to go on reading, without a word."""
    import warnings

    from wingspan import export

    out = tmp_path / "model.pt"
    (tmp_path / "model.json").write_text(json.dumps({"format": "wingspan-torchscript",
                                                     "temperature": 9.0}))
    (tmp_path / "notes.json").write_text("{}")
    with pytest.warns(UserWarning, match="model.json beside it is an earlier wingspan's "
                                         "metadata for this file") as said:
        export.export_model(run_dir, out, fmt="torchscript")
    assert "model.pt.json is this export's" in str(said[0].message)
    assert json.loads((tmp_path / "model.json").read_text())["temperature"] == 9.0  # kept
    # Not an export's, or another format's (model.onnx's old metadata): nothing said.
    for other in ('{"my": "own"}', '{"format": "wingspan-onnx"}'):
        (tmp_path / "model.json").write_text(other)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            export.export_model(run_dir, out, fmt="torchscript")


def test_a_bundle_away_from_its_run_is_checked_on_generated_pictures(run_dir, run_cli,
                                                                      tmp_path):
    import shutil

    bundle = shutil.copytree(run_dir / "model", tmp_path / "model")  # no splits.csv beside
    for fmt, file in (("onnx", "m.onnx"), ("torchscript", "m.pt")):
        code, out, err = run_cli("export", bundle, "--format", fmt, "--out", tmp_path / file)
        assert code == 0, err
        checked = json.loads(metadata_path(tmp_path / file).read_text())["checked"]
        assert checked["images"] == 8 and checked["generated"]
        assert checked["max_abs_probability_difference"] <= 1e-4
        assert "on 8 generated pictures" in " ".join(out.split())
    # --out a folder: the model file in it.
    (tmp_path / "deploy").mkdir()
    code, out, err = run_cli("export", bundle, "--out", tmp_path / "deploy")
    assert code == 0, err
    assert (tmp_path / "deploy" / "model.onnx").is_file()
    assert metadata_path(tmp_path / "deploy" / "model.onnx").is_file()
    # By default a bundle away from its run exports into its own folder: two bundles side
    # by side do not write over each other's export.
    other = shutil.copytree(bundle, tmp_path / "model-b")
    for each in (bundle, other):
        code, out, err = run_cli("export", each)
        assert code == 0, err
        assert (each / "export" / "model.onnx").is_file()
    # A name without the format's suffix is a folder too, even with a dot in it.
    code, out, err = run_cli("export", bundle, "--format", "torchscript", "--out",
                             tmp_path / "exports" / "v1.2")
    assert code == 0, err
    assert (tmp_path / "exports" / "v1.2" / "model.pt").is_file()
    # A file named for the other format is refused before any work.
    code, _, err = run_cli("export", bundle, "--format", "torchscript", "--out",
                           tmp_path / "x.onnx")
    assert code == 2 and "a .onnx file for a torchscript export" in err
    assert not (tmp_path / "x.onnx").exists()


def test_no_temperature_changes_an_answer_of_predict_or_the_export(run_dir, run_cli,
                                                                   demo_dir, tmp_path):
    """A taxonomy's branch is chosen at temperature 1, by predict and by the README's steps
    alike: a temperature far from the fitted one (0.02 here, against 0.25) changes the
    probabilities shown, never the answers. (Whether the branch on the calibrated sums
    would have moved depends on the tree; `test_no_temperature_changes_the_branch` makes
    one where it does. Here the README's power of the temperature is checked against
    predict's.)"""
    import shutil

    from wingspan.inference import Predictor
    from wingspan.models.bundle import MANIFEST, update_manifest
    from wingspan.predict import predict

    images = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))]
    bundle = shutil.copytree(run_dir / "model", tmp_path / "model")
    calibration = json.loads((bundle / MANIFEST).read_text())["calibration"]
    update_manifest(bundle, calibration={**calibration, "temperature": 0.02})
    rows = {}
    for name, model in (("fitted", run_dir), ("sharp", bundle)):
        rows[name] = predict(Predictor(model, workers=0, precision="fp32"), images,
                             progress=False).rows
    for fitted, sharp in zip(rows["fitted"], rows["sharp"], strict=True):
        assert [c for _, c, _ in fitted["taxonomy"]] == [c for _, c, _ in sharp["taxonomy"]]
        assert fitted["answer"] == sharp["answer"]  # (the unknown scores keep their own T)
    assert max(abs(f["top"][0][1] - h["top"][0][1])
               for f, h in zip(rows["fitted"], rows["sharp"], strict=True)) > 0.05
    code, _, err = run_cli("export", bundle)
    assert code == 0, err
    model = bundle / "export" / "model.onnx"
    theirs = run_readme_onnx_example(model, images)
    meta = json.loads(metadata_path(model).read_text())
    for ours, row in zip(rows["sharp"], theirs, strict=True):
        assert [c for _, c, _ in ours["taxonomy"]] == [c for _, c, _ in row["branch"]]
        near = [abs(row["out"][f"unknown.{lv}"] - threshold) < 1e-4  # (float rounding
                for lv, threshold in meta["unknown"]["thresholds"].items()]  # of engines)
        assert ours["answer"] == row["answer"] or any(near)


def test_the_int8_check_reads_labels_at_the_models_level(tmp_path):
    """A model whose finest level is not the data's `label` (--levels family,genus) is
    checked against genus labels, not the species in `label`."""
    from wingspan.export import _split_images

    bundle = tmp_path / "run" / "model"
    bundle.mkdir(parents=True)
    (tmp_path / "run" / "splits.csv").write_text(
        "path,label,split,group,family,genus\n/a.jpg,danaus_plexippus,val,,Nymph,Danaus\n"
        "/b.jpg,pieris_rapae,train,,Pier,Pieris\n")
    assert _split_images(bundle, "val", 10, level="genus") == (["/a.jpg"], ["Danaus"])
    assert _split_images(bundle, "val", 10) == (["/a.jpg"], ["danaus_plexippus"])


def test_the_int8_check_scores_the_class_predict_names(tmp_path, monkeypatch):
    """A taxonomy model names its top-down branch's species, which need not be the finest
    argmax: int8's val top-1 counts the classes predict names."""
    from wingspan import export
    from wingspan.config import DemoConfig
    from wingspan.data.demo import generate_demo
    from wingspan.export import _split_images
    from wingspan.inference import Predictor
    from wingspan.models import save_bundle
    from wingspan.predict import predict

    # 6 species: 3 of them Nymphalidae (the fixture's 4 have a family each).
    data = generate_demo(tmp_path / "demo", DemoConfig(image_size=32,
                                                       images_per_class=(16,) + (8,) * 5))
    run = train(read_dataset(data), tiny(tmp_path, levels=["family", "label"], epochs_head=1,
                                         epochs_finetune=0), tmp_path / "runs", "r",
                quiet=True)
    model, manifest = load_bundle(run / "model")
    taxonomy = manifest["taxonomy"]
    species, family = taxonomy["classes"]["label"], np.array(taxonomy["parents"]["family"])
    big = next(f for f in sorted(set(family)) if (family == f).sum() >= 2)
    kin, other = np.flatnonzero(family == big), np.flatnonzero(family != big)[0]
    # For every image: `other` is the likeliest species (1.5 against 1.2 and 1s), the
    # family of `kin` the likeliest family (at least 2.2 against 1.5), kin[0] its species.
    head = model.head.outputs["label"]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[kin] = 20.0
        head.bias[kin[0]] += np.log(1.2)
        head.bias[other] = 20.0 + np.log(1.5)
    # At T 0.2 the calibrated probabilities would give `other`'s family (7.6 against 4.5 and
    # less): the branch is chosen at T 1, as predict does.
    save_bundle(model, run / "model", manifest["classes"], taxonomy=taxonomy,
                training=manifest["training"], metrics=manifest["metrics"],
                calibration={**manifest.get("calibration", {}), "temperature": 0.2})
    paths, labels = _split_images(run / "model", "val", 1000, level="label")
    rows = predict(Predictor(run, workers=0, precision="fp32"), paths, progress=False).rows
    named = [row["taxonomy"][-1][1] for row in rows]
    assert set(named) == {species[kin[0]]}  # the branch's, not the argmax `other`
    branch, argmax = (np.mean([t == species[i] for t in labels]) for i in (kin[0], other))
    assert branch != argmax  # (else this test could not tell the two apart)
    monkeypatch.setattr(export, "int8_allowed_drop", lambda n: 1.0)
    path = export.export_model(run, run / "q" / "m.int8.onnx", quantize="int8")
    assert json.loads(metadata_path(path).read_text())["int8"]["val_top1_fp32"] == \
        pytest.approx(branch)


def test_int8_is_written_only_within_a_point_of_fp32(run_dir, run_cli, monkeypatch, caplog):
    from wingspan import export
    from wingspan.errors import WingspanError

    assert export.int8_allowed_drop(1000) == 0.01 and export.int8_allowed_drop(25) == 0.04
    monkeypatch.setattr(export, "int8_allowed_drop", lambda n: -1.0)  # any result: refused
    # Both weights tried (the fast, then the exact) and named with their figures.
    with pytest.raises(WingspanError, match=r"int8 refused: val top-1 [\d.]+ \(int8-7bit "
                       r"weights\) and [\d.]+ \(uint8 weights\) against fp32's [\d.]+ on "
                       r"\d+ images"):
        export.export_model(run_dir, run_dir / "q" / "m.int8.onnx", quantize="int8")
    assert not (run_dir / "q" / "m.int8.onnx").exists()
    monkeypatch.setattr(export, "int8_allowed_drop", lambda n: 1.0)  # written, with figures
    with pytest.warns(UserWarning, match="int8 was checked on") as caveats:  # (Python too)
        path = export.export_model(run_dir, run_dir / "q" / "m.int8.onnx", quantize="int8")
    figures = json.loads(metadata_path(path).read_text())["int8"]
    assert [str(w.message) for w in caveats] == export.int8_caveats(figures)
    assert figures["val_images"] > 0 and figures["calibration_images"] > 0
    assert 0 <= figures["val_top1_int8"] <= 1 and 0 <= figures["val_top1_fp32"] <= 1
    assert 0 <= figures["val_unknown_share_int8"] <= 1  # the unknown score, measured again
    # The fast weights first, kept when they pass; how long it took beside fp32, here.
    assert figures["weights"] == "int8-7bit" and figures["refused"] == {}
    assert figures["seconds_int8_vs_fp32"] > 0
    # The int8 file's thresholds are its own: they turn away the stated share of the known
    # val images as the int8 model scores them.
    import onnxruntime as ort

    meta = json.loads(metadata_path(path).read_text())
    assert meta["checked"]["graph"] == "fp32, before quantizing"  # not the int8 file's
    assert figures["unknown_thresholds_fp32"].keys() == meta["unknown"]["thresholds"].keys()
    paths, _ = export._split_images(export.find_bundle(run_dir), "val", 1000)
    spec = meta["input"]
    pixels = export._pixels(paths, export.InputSpec(spec["size"], spec["resize_shorter_side_to"],
                                                    spec["interpolation"]))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    thresholds = meta["unknown"]["thresholds"]
    scores = dict(zip(thresholds, session.run([f"unknown.{lv}" for lv in thresholds],
                                              {"pixels": pixels}), strict=True))
    assert thresholds == pytest.approx(level_thresholds(scores, meta["unknown"]["rate"]),
                                       rel=1e-6)
    # How far int8's probabilities are from fp32's, measured on those val images (the fp32
    # graph's agreement with PyTorch says nothing of the int8 file).
    fp32 = ort.InferenceSession(str(export.export_model(run_dir, run_dir / "q" / "m.onnx")),
                                providers=["CPUExecutionProvider"])
    apart = np.abs(session.run(["label"], {"pixels": pixels})[0]
                   - fp32.run(["label"], {"pixels": pixels})[0]).max()
    assert figures["max_abs_probability_difference_vs_fp32"] == pytest.approx(apart, abs=1e-6)
    # ... and on how many of them it answers another class (a better top-1 can hide many)
    changed = (session.run(["label"], {"pixels": pixels})[0].argmax(1)
               != fp32.run(["label"], {"pixels": pixels})[0].argmax(1)).mean()
    assert figures["val_answers_changed"] == pytest.approx(changed)
    # The CLI says so, without the quantizer's advice to pre-process in the way.
    code, out, err = run_cli("export", run_dir, "--quantize", "int8", "--out",
                             run_dir / "q" / "cli.int8.onnx")
    said = " ".join(out.split())
    assert code == 0 and "the int8 model's own, set again on its val scores" in said
    assert re.search(r"the fp32 graph, before quantizing, agrees with PyTorch within "
                     r"[\d.e-]+ on \d+ images\. int8 \(int8-7bit weights\) val top-1 [\d.]+ "
                     r"\(fp32 [\d.]+\), another answer than fp32's on \d+ of \d+ val images, "
                     r"probabilities within [\d.e+-]+ of fp32's, [\d.]+x fp32's time here",
                     said), said
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    # On so few val images, one answer is the allowance: said, with what to do, as a
    # warning (stderr), as Python callers get it.
    warned = " ".join(err.split())
    assert (f"Warning: int8 was checked on {figures['val_images']} val images only, where one "
            f"answer is {1 / figures['val_images']:.1%}: a smaller drop goes unseen") in warned
    # Many answers moved though top-1 held (a weak many-class model): said too, from 2
    # images and past 5% (one near tie may flip either way).
    moved = export.int8_caveats({"val_answers_changed": 59 / 299, "val_images": 299})
    assert len(moved) == 1 and moved[0].startswith(
        "int8 answers otherwise than fp32 on 20% of the val images, though its top-1 held")
    assert export.int8_caveats({"val_answers_changed": 1 / 110, "val_images": 110}) == []
    few = export.int8_caveats({"val_answers_changed": 1 / 11, "val_images": 11})  # 1 image
    assert len(few) == 1 and few[0].startswith("int8 was checked on 11 val images only")
    assert export.int8_caveats({"val_answers_changed": 2 / 106, "val_images": 106}) == []
    assert (len(export.int8_caveats(figures)) == 1) == (" though its top-1 held" not in warned)
    # The same export twice is the same file: the machine's timing is in the JSON beside
    # it, not inside (a content hash took each export for a new model).
    with pytest.warns(UserWarning, match="int8 was checked on"):
        again = export.export_model(run_dir, run_dir / "q" / "again.int8.onnx",
                                    quantize="int8")
    assert again.read_bytes() == path.read_bytes()
    import onnx

    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # The network is int8, the unknown score's own nodes are not.
    only_unknown = set(export._nodes_only_for(graph, ["unknown.family", "unknown.label"],
                                              ["family", "label"]))
    assert {n.op_type for n in graph.node if n.name in only_unknown} >= {"MatMul", "TopK"}
    assert not {n.op_type for n in graph.node if n.name in only_unknown} & {
        "QuantizeLinear", "DequantizeLinear"}


def test_int8_falls_back_to_uint8_weights_when_7bit_costs_accuracy(run_dir, monkeypatch):
    """The fast 7-bit weights are tried first; where they cost accuracy (AVX2 saturates
    full int8 weights, and 7 bits lose precision) the exact uint8 weights are written.
    Forced here: the sessions of the fp32 and uint8 graphs answer every val image right,
    the 7-bit one wrong, whatever this CPU's integer kernels make of them."""
    import onnx

    from wingspan import export

    bundle = run_dir / "model"
    finest = "label"
    classes = export._classes(bundle)[finest]
    paths, labels = export._split_images(bundle, "val", 1000, level=finest)
    truth = {}  # val pixels -> their class, as the check reads them
    made = {}  # graph bytes -> the weights int8_graph made them with
    real_int8_graph, real_session = export.int8_graph, export._ort_session
    real_readable = export._readable_pixels

    def readable_pixels(images, spec):
        pixels, kept = real_readable(images, spec)
        if list(images) == paths:
            truth.update({pixels[i].tobytes(): classes.index(labels[k])
                          for i, k in enumerate(kept)})
        return pixels, kept

    def int8_graph(graph, calibration, keep=(), weights="uint8"):
        made[out := real_int8_graph(graph, calibration, keep, weights)] = weights
        return out

    def session(graph):
        shift = 1 if made.get(graph) == "int8-7bit" else 0  # the next class: wrong
        inner = real_session(graph)

        class Answering:  # the finest probabilities one-hot on the truth (or beside it)
            def run(self, names, feeds):
                out = inner.run(names, feeds)
                if names and names[0] == finest:
                    out[0] = np.eye(len(classes), dtype=np.float32)[
                        [(truth[row.tobytes()] + shift) % len(classes)
                         for row in feeds["pixels"]]]
                return out

        return Answering()

    monkeypatch.setattr(export, "_readable_pixels", readable_pixels)
    monkeypatch.setattr(export, "int8_graph", int8_graph)
    monkeypatch.setattr(export, "_ort_session", session)
    monkeypatch.setattr(export, "int8_allowed_drop", lambda n: 0.0)
    path = export.export_model(run_dir, run_dir / "fallback" / "m.int8.onnx", quantize="int8")
    figures = json.loads(metadata_path(path).read_text())["int8"]
    assert figures["val_top1_fp32"] == 1.0 and figures["val_top1_int8"] == 1.0
    assert figures["weights"] == "uint8" and figures["refused"] == {"int8-7bit": 0.0}
    assert truth and list(made.values()) == ["int8-7bit", "uint8"]  # 7-bit tried first
    # The file written is the uint8 graph: its weights are unsigned.
    weights = [t for t in onnx.load(str(path)).graph.initializer
               if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
               and len(t.dims) == 4]
    assert weights and all(t.data_type == onnx.TensorProto.UINT8 for t in weights)


def test_int8_keeps_the_features_of_an_offline_lite_backbone(demo_dir):
    """tf_efficientnet_lite0 pads "same" by arithmetic on the input's shape: quantized
    with the network, every Pad padded wrongly and int8 features came out near zero (an
    int8 export of a Lite model was always refused). Real ImageNet weights, as users get."""
    import onnx

    from wingspan import export
    from wingspan.export import _ort_session, int8_graph
    from wingspan.models.factory import create_imagenet_model
    from wingspan.models.runtime import export_onnx

    net, loaded = create_imagenet_model("efficientnet_lite0")
    assert loaded is not None  # installed with wingspan
    net.reset_classifier(0)  # pooled features

    class Pixels(torch.nn.Module):  # uint8 NHWC in, as the exported bundle takes them
        def __init__(self):
            super().__init__()
            self.net = net  # its own (as a closure's, the tracer folds the padding away)

        def forward(self, x):
            return {"features": self.net((x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)}

    pixels = np.stack([prepare_pixels(open_rgb(p), 64, 64) for p in
                       sorted(demo_dir.rglob("*.jpg"))])
    graph = export_onnx(Pixels(), 64, ["features"], input_name="pixels",
                        example=torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
    quantized = int8_graph(graph, pixels[::2])  # calibrated on half, compared on the rest
    fp32, int8 = (_ort_session(g).run(None, {"pixels": pixels[1::2]})[0]
                  for g in (graph, quantized))
    cosine = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.min() > 0.9, cosine
    assert np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32) < 0.3
    # The pads (sizes worked out from the input's shape) stay fp32: on field photos their
    # int8 rounding left the features at 0.1% of fp32's.
    graph = onnx.load_from_string(quantized).graph
    sizes = export._size_arithmetic(graph)
    assert {"Pad", "Shape"} <= {n.op_type for n in graph.node}
    assert {"Ceil", "Div"} <= {n.op_type for n in graph.node if n.name in sizes}
    assert not {n.op_type for n in graph.node if n.name in sizes} & {
        "QuantizeLinear", "DequantizeLinear"}


def test_checking_an_export_prints_no_onnx_runtime_warnings(capfd):
    from onnx import TensorProto, helper, numpy_helper

    from wingspan.export import _ort_session

    # An initializer no node uses: ONNX Runtime removes it, with a warning at its default level.
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2]) for n in ("pixels", "y")]
    unused = numpy_helper.from_array(np.zeros(3, np.float32), "unused")
    graph = helper.make_graph([helper.make_node("Identity", ["pixels"], ["y"])], "g", io[:1],
                              io[1:], [unused])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = _ort_session(model.SerializeToString())
    assert session.run(None, {"pixels": np.ones((1, 2), np.float32)})[0].tolist() == [[1, 1]]
    out, err = capfd.readouterr()
    assert "Removing initializer" not in out + err


def test_an_unknown_score_alone_that_disagrees_says_what_else_it_may_be():
    """A random-weight model (--weights none, the only way offline for most backbones) has
    features alike for every image: its tied unknown scores moved past the tolerance, and
    the refusal said only "an operator may export wrongly"."""
    from types import SimpleNamespace

    from wingspan.errors import WingspanError
    from wingspan.export import _compare

    probs = np.full((4, 3), 1 / 3, dtype=np.float32)
    want = {"probs": torch.from_numpy(probs), "unknown.msp": torch.zeros(4)}
    got = {"probs": probs, "unknown.msp": np.full(4, 0.5, dtype=np.float32)}
    with pytest.raises(WingspanError, match="in unknown score on 4 images") as e:
        _compare(got, want, ["probs", "unknown.msp"], SimpleNamespace(step=0.0), "export", 4)
    assert e.value.hint.startswith("The probabilities agree (within 0):")
    assert e.value.hint.endswith("Otherwise, report this with the backbone's name: an "
                                 "operator may export wrongly.")
    with pytest.raises(WingspanError, match="in probability") as e:
        _compare({**got, "probs": probs + 0.1}, want, ["probs"], None, "export", 4)
    assert e.value.hint.startswith("Report this with the backbone's name")


def test_a_full_temporary_folder_in_int8_export_is_named(tmp_path, monkeypatch):
    """int8 quantizing writes through the temporary folder: when its disk was full the
    error said only "The disk is full.", and the output's disk, which users then checked,
    had room."""
    import errno
    import io

    import onnxruntime.quantization

    from wingspan.export import int8_graph
    from wingspan.files import os_error_said

    graph = io.BytesIO()
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3), torch.zeros(1, 3, 8, 8), graph,
                      input_names=["pixels"], dynamo=False)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", full)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # (read from $TMPDIR again)
    with pytest.raises(OSError) as e:
        int8_graph(graph.getvalue(), np.zeros((8, 3, 8, 8), np.float32))
    said = str(os_error_said(e.value))
    assert f"The disk is full writing {tmp_path} (the temporary folder; $TMPDIR moves it)" \
        in said, said


def test_the_int8_check_scores_rare_species_as_their_merged_class(tmp_path, monkeypatch):
    """--rare-below trains a rare species as "GENUS (rare label)"; splits.csv still names it
    as itself. The int8 check scores its val images against the merged class the model
    answers: read as the species, none counted right, and with every species merged the
    export was refused as if the data were gone ("cannot be checked")."""
    from wingspan import export
    from wingspan.config import DemoConfig
    from wingspan.data.demo import generate_demo
    from wingspan.export import _split_images
    from wingspan.inference import Predictor
    from wingspan.models.bundle import MANIFEST
    from wingspan.predict import predict

    data = generate_demo(tmp_path / "demo", DemoConfig(image_size=32,
                                                       images_per_class=(8,) * 4))
    run = train(read_dataset(data), tiny(tmp_path, levels=["family", "label"], epochs_head=1,
                                         epochs_finetune=0, rare_below=1000),
                tmp_path / "runs", "r", quiet=True)
    rare = json.loads((run / "model" / MANIFEST).read_text())["training"]["rare_classes"]
    paths, labels = _split_images(run / "model", "val", 1000, level="label")
    assert all(label in rare for label in labels)  # every species merged
    rows = predict(Predictor(run, workers=0, precision="fp32"), paths, progress=False).rows
    right = np.mean([row["taxonomy"][-1][1] == rare[label]
                     for row, label in zip(rows, labels, strict=True)])
    monkeypatch.setattr(export, "int8_allowed_drop", lambda n: 1.0)
    path = export.export_model(run, run / "q" / "m.int8.onnx", quantize="int8")
    assert json.loads(metadata_path(path).read_text())["int8"]["val_top1_fp32"] == \
        pytest.approx(right)
