"""The Python API (`import wingspan as ws`): the CLI's functions, the same results."""

import dataclasses
import html
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_train import tiny

import wingspan as ws
from wingspan.data import read_dataset
from wingspan.data.split import leaked_groups
from wingspan.errors import WingspanError
from wingspan.export import metadata_path
from wingspan.models.bundle import read_manifest

PNG = "data:image/png;base64,"


@pytest.fixture(scope="module")
def run(demo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    settings = {k: v for k, v in vars(tiny(tmp)).items()}
    return ws.train(ws.read(demo_dir), name="api", runs_dir=tmp / "runs", quiet=True,
                    **settings)


def test_import_is_light_and_train_is_the_function():
    # `wingspan --help` (the CLI module) and the API stay light too.
    code = ("import sys, wingspan as ws, wingspan.api, wingspan.cli; "
            "light = 'torch' not in sys.modules; "
            "import wingspan.training.run; from wingspan import train; "
            "print(light, ws.train is wingspan.api.train is train)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["True", "True"]
    # predict and serve start without the training stack (scikit-learn is a second's import)
    code = ("import sys, wingspan.inference, wingspan.serve; "
            "print('sklearn' in sys.modules, 'wingspan.training.run' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]


def test_one_process_predict_imports_no_training_stack(run, demo_dir):
    """`wingspan predict` on one process starts without what it never uses: Lightning
    (Fabric shares the work among processes, --devices N; 0.07-0.1 s to import after
    torch), scikit-learn and matplotlib. What is imported, not how long: robust on a loaded
    machine."""
    from helpers import cli_in_new_process

    image = next(demo_dir.rglob("*.jpg"))
    done = cli_in_new_process(["predict", run.dir, image, "-q"], (
        "lightning_fabric", "lightning", "sklearn", "matplotlib"), timeout=300)
    assert "exit 0" in done.stdout and "imported: []" in done.stdout, (
        done.stdout + done.stderr)


def test_read_counts_and_display(demo_dir):
    data = ws.read(demo_dir)
    assert len(data) == len(read_dataset(demo_dir)) == 16 + 12 + 9 + 6
    assert data.levels == read_dataset(demo_dir).levels and data.levels[-1] == "label"
    counts = data.counts()
    assert counts["total"].tolist() == [16, 12, 9, 6]
    assert counts.index.tolist() == [p.name for p in sorted(
        (p for p in demo_dir.iterdir() if p.is_dir()), key=lambda p: -len(list(p.iterdir())))]
    assert data.counts("family")["total"].sum() == len(data)
    page = data._repr_html_()
    assert all(name in page for name in counts.index) and ">16<" in page
    with pytest.raises(WingspanError, match="no label level 'order'"):
        data.counts("order")


def test_split_inspect_preview(demo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI's default output folder: runs/data/<name>
    data = ws.read(demo_dir)
    split = data.split(val=0.25, test=0.25, seed=1)
    assert set(split.table["split"]) == {"train", "val", "test"}
    assert not leaked_groups(split.table)
    written = pd.read_csv(tmp_path / "runs" / "data" / data.name / "splits.csv")
    assert len(written) == len(split) == len(data)
    # Split again, data that has its own split now: said, as `wingspan data split` says it.
    with pytest.warns(UserWarning, match=r"has a split of its own \(train \d+, val \d+, test"):
        split.split(val=0.25, test=0.25, seed=2, out=tmp_path / "again")
    assert "train" in split._repr_html_() and split.split_report.sizes["train"] > 0
    # Capped: the display says so beside the split's own sizes (it showed "splits: train
    # 8" next to "train 32 (67%)" alone).
    capped = data.split(val=0.25, test=0.25, seed=1, max_per_class=2, out=tmp_path / "cap")
    trained_on = (capped.table["split"] == "train").sum()
    assert trained_on < capped.split_report.sizes["train"]
    assert f", {trained_on} after sampling" in capped._repr_html_()

    inspection = split.inspect(quiet=True)
    summary = json.loads((tmp_path / "runs/data" / data.name / "summary.json").read_text())
    assert inspection.summary["levels"] == summary["levels"]
    assert summary["levels"]["label"]["imbalance_ratio"] == round(16 / 6, 2)
    page = inspection._repr_html_()
    assert f"tiny images: {len(data)}" in page and page.count(PNG) == len(data.levels)
    assert "No problems found" in split.inspect(tiny_px=32, quiet=True).text
    with pytest.raises(WingspanError, match="No plot of a level 'Family'"):
        inspection.plot("Family")
    plotted = inspection.summary["plots"]
    inspection.summary["plots"] = {}  # as for a level blank for every image
    with pytest.raises(WingspanError, match=f"No plot of a level '{inspection.level}'"):
        inspection.plot()
    inspection.summary["plots"] = plotted
    # Its folder cleaned up since: the display goes on, and says which plot is gone.
    moved = shutil.move(inspection.dir, tmp_path / "moved")
    page = inspection._repr_html_()
    assert "balance of label: " in page and "cannot be read" in page
    assert inspection.plot()._repr_png_() is None  # Jupyter shows its repr (the path)
    shutil.move(moved, inspection.dir)

    with pytest.raises(WingspanError, match="augment: expected one of light, standard, strong"):
        data.preview(augment="heavy")  # named by its keyword, not AugmentConfig's field
    preview = data.preview(image_size=32, rows=2, views=2)
    assert preview.path.resolve() == tmp_path / "runs/data" / data.name / "preview.png"
    assert preview._repr_png_().startswith(b"\x89PNG")


def test_bad_settings_raise_wingspan_errors_naming_them(demo_dir, tmp_path):
    data = ws.read(demo_dir)
    with pytest.raises(WingspanError, match="'epochs_head'"):
        ws.train(data, runs_dir=tmp_path, epochs_head=-1)
    with pytest.raises(WingspanError, match="Unknown setting 'epoch_head'") as e:
        ws.train(data, runs_dir=tmp_path, epoch_head=3)
    assert "'epochs_head'" in e.value.hint
    with pytest.raises(WingspanError, match="'image_size' = 'big'"):
        ws.train(data, runs_dir=tmp_path, image_size="big")
    # ws.train's own argument in a dict of settings: where it goes, not "did you mean
    # 'max_per_class'", which sounds alike and is not it.
    with pytest.raises(WingspanError, match="'max_pixels' is an option of the command, not a "
                                            "setting a TrainConfig holds") as e:
        ws.train(data, runs_dir=tmp_path, config={"max_pixels": 10_000_000, "epochs_head": 1})
    assert "ws.train(..., name=..., runs_dir=..., max_pixels=...)" in e.value.hint
    assert "max_per_class" not in str(e.value) + e.value.hint
    with pytest.raises(WingspanError, match="'resume' is an option of the command") as e:
        ws.train(data, runs_dir=tmp_path, resume=True)  # (it said: did you mean 'runtime'?)
    assert "ws.resume(RUN)" in e.value.hint and "runtime" not in e.value.hint
    with pytest.raises(WingspanError, match="'image_size' = '{max_per_class}'"):  # as given
        ws.train(data, runs_dir=tmp_path, image_size="{max_per_class}")
    # Keras' weights=None (random weights) is taken as "none": only the bad setting is named.
    with pytest.raises(WingspanError, match="'epochs_head' setting must be 0 or more"):
        ws.train(data, runs_dir=tmp_path, weights=None, epochs_head=-1)
    with pytest.raises(WingspanError, match="'image_size' = 'big'") as e:
        ws.train(data, runs_dir=tmp_path, weights=None, image_size="big")
    assert "'weights'" not in str(e.value) and "the keywords in Python" in e.value.hint
    # ... in the settings object too, as the README says of weights=None.
    assert ws.TrainConfig(weights=None).weights == "none"
    with pytest.raises(WingspanError, match="'image_size' = 'big'") as e:
        ws.train(data, runs_dir=tmp_path, config=ws.TrainConfig(weights=None), image_size="big")
    with pytest.raises(WingspanError, match="Unknown setting 'colour'"):
        ws.demo_data(tmp_path / "demo", colour="red")
    assert not any(tmp_path.iterdir())  # nothing was started
    (tmp_path / "blank.yaml").write_text("weights:\n")  # a file's blank is no choice
    with pytest.raises(WingspanError, match="'weights' is empty"):
        ws.train(data, config=tmp_path / "blank.yaml", runs_dir=tmp_path / "runs")


def test_errors_keep_their_fields_when_pickled():
    """Worker processes send errors back pickled: the hint, every_rank (set after the
    error was made, as a run's start does) and a SettingError's own fields survive."""
    from wingspan.config import SettingError

    plain = WingspanError("Bad.", hint="Fix it.", every_rank=True)
    setting = SettingError([("val_fraction", " must be below 1.")], intro="Invalid: ",
                           form="The '{}' setting", hint="Lower it.")
    setting.every_rank = True
    for error in (plain, setting):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and vars(copy) == vars(error)
        assert str(copy) == str(error) and copy.every_rank
    copy = pickle.loads(pickle.dumps(setting))
    assert copy.worded({"val_fraction": "--val-fraction"}).startswith("Invalid: --val-fraction")


def test_run_history_metrics_and_display(run):
    assert run.dir.name == "api"
    pd.testing.assert_frame_equal(run.history, pd.read_csv(run.dir / "history.csv"))
    assert run.metrics == json.loads((run.dir / "metrics.json").read_text())
    assert run.config.backbone == "test_efficientnet" and run.config.epochs_head == 3
    assert run.history["stage"].tolist() == ["head"] * 3 + ["finetune"] * 2
    page = run._repr_html_()
    assert f"{run.metrics['best']['val_macro_f1']:.4f}" in page and PNG in page
    assert run.plot()._repr_png_().startswith(b"\x89PNG")
    # Nothing predicted: the reasons are in the error, not only "no image".
    with pytest.raises(WingspanError, match="nowhere.jpg: no such file"):
        run.predict([run.dir / "nowhere.jpg"], quiet=True)
    # An adapted run has no metrics.json of its own: its bundle's figures stand in.
    import shutil

    adapted = shutil.copytree(run.dir, run.dir.with_name("api-adapted-copy"))
    (adapted / "metrics.json").unlink()
    copy = ws.load(adapted)
    assert copy.metrics == copy.manifest["metrics"] and copy._repr_html_()


def test_a_damaged_history_csv_loses_the_curves_not_the_run(run, tmp_path):
    """history.csv cut to nothing (a full disk): `run.history` raised pandas' EmptyDataError,
    and so did the run's display and `run.evaluate()`, after computing every figure."""
    import shutil

    copy = ws.load(shutil.copytree(run.dir, tmp_path / "cut"))
    # Cut to nothing, zeros a crash left (read without an error), a header cut short.
    for damage in [b"", b"\0" * 4096, b"stage,epoch,train_lo"]:
        (copy.dir / "history.csv").write_bytes(damage)
        with pytest.raises(WingspanError, match=r"history.csv is damaged .*the training "
                           "curves are lost") as e:
            _ = copy.history
        assert "metrics.json" in e.value.hint
    assert f"{run.metrics['best']['val_macro_f1']:.4f}" in copy._repr_html_()
    # A run moved away since it was loaded says so ("status: no model" before).
    moved = ws.load(shutil.copytree(run.dir, tmp_path / "moved"))
    shutil.move(moved.dir, tmp_path / "elsewhere")
    assert "gone: the folder no longer exists" in html.unescape(moved._repr_html_())
    ev = copy.evaluate(out=tmp_path / "ev", quiet=True)
    assert ev.metrics["accuracy"] >= 0 and not (tmp_path / "ev" / "curves.png").exists()


def test_a_run_of_a_wrong_path_says_so(tmp_path):
    """ws.Run checks nothing when made (training makes one per run); what is missing is
    said when asked for, not as pandas' bare FileNotFoundError."""
    with pytest.raises(WingspanError, match=r"No run folder at .*nowhere") as e:
        _ = ws.Run(tmp_path / "nowhere").history
    assert "ws.runs()" in e.value.hint
    (tmp_path / "half").mkdir()
    with pytest.raises(WingspanError, match="half has no history.csv: it is no run folder, "
                       "or its run has not finished an epoch"):
        _ = ws.Run(tmp_path / "half").history


def test_train_takes_a_config_and_a_yaml_file(demo_dir, tmp_path):
    config = tiny(tmp_path, epochs_head=1, epochs_finetune=0)
    a = ws.train(demo_dir, config, runs_dir=tmp_path, quiet=True, seed=3)
    assert (a.config.epochs_head, a.config.seed) == (1, 3)
    (tmp_path / "settings.yaml").write_text("epochs_head: 2\nepochs_finetune: 0\n")
    with pytest.raises(WingspanError, match="'epochs_head'"):
        ws.train(demo_dir, tmp_path / "settings.yaml", epochs_head=-1)


def test_evaluate_is_the_cli_evaluation(run, run_cli, tmp_path, demo_dir):
    ev = run.evaluate(split="val", quiet=True)
    assert ev.dir == run.dir / "evaluation-val"
    assert ev.metrics == json.loads((ev.dir / "metrics.json").read_text())
    code, _, _ = run_cli("evaluate", run.dir, "--split", "val", "--out", tmp_path / "cli",
                         "--quiet")
    assert code == 0
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    timing = {"images_per_second", "engine"}
    assert {k: v for k, v in ev.metrics.items() if k not in timing} == \
        {k: v for k, v in cli.items() if k not in timing}
    page = ev._repr_html_()
    for avg in ("macro", "micro"):
        assert f"{ev.metrics[avg]['f1']:.4f}" in page
    assert f"{ev.metrics['accuracy']:.4f}" in page and f"{ev.metrics['ece']:.4f}" in page
    assert page.count(PNG) == 3  # confusion, reliability, curves
    assert ev.confusion.to_numpy().sum() == ev.metrics["images"]
    assert set(ev.per_class.columns) >= {"precision", "recall", "f1"}
    # sandboxed: the report has no script, so none may run in the notebook's page
    shown = ev.report()._repr_html_()
    assert shown.startswith("<iframe sandbox srcdoc=") and "allow-scripts" not in shown
    assert "&lt;script" not in shown.split("srcdoc=", 1)[1]  # (and the report holds none)
    with pytest.raises(WingspanError, match="Available: .*reliability"):
        ev.plot("roc")
    # With TTA, beside the plain evaluation (RUN/evaluation-val-tta), which stays.
    tta = run.evaluate(split="val", tta=True, quiet=True)
    assert tta.dir == run.dir / "evaluation-val-tta" and tta.metrics["tta"]
    assert json.loads((ev.dir / "metrics.json").read_text()) == ev.metrics
    # Data from ws.read, as train takes it: the same figures as its folder's.
    # (as the command prints in yellow, a warning says the figures are the training's own)
    with pytest.warns(UserWarning, match="not fair: the model was trained on"):
        again = run.evaluate(ws.read(demo_dir), split="all", out=tmp_path / "a", quiet=True)
    by_path = run.evaluate(demo_dir, split="all", out=tmp_path / "b", quiet=True)
    assert again.metrics["accuracy"] == by_path.metrics["accuracy"]
    # The run's summary says the seconds per stage in words, not as a Python dict.
    assert "{" not in run._repr_html_().split("seconds per stage")[1][:200]


def test_an_evaluation_keeps_its_own_results_when_its_folder_is_written_again(
        run, demo_dir, tmp_path):
    """Two data folders of one name evaluate into two folders; an Evaluation whose folder a
    later one replaced keeps its own tables, and says so rather than show the other's
    plots."""
    first, second = tmp_path / "a" / "data", tmp_path / "b" / "data"
    for folder, n in ((first, 2), (second, 3)):
        for class_dir in sorted(p for p in demo_dir.iterdir() if p.is_dir()):
            (folder / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:n]:
                shutil.copy(image, folder / class_dir.name / image.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (its figures are the training's own: not fair)
        a = run.evaluate(first, split="all", quiet=True)
        b = run.evaluate(second, split="all", quiet=True)
        assert a.dir != b.dir and a.dir.parent == b.dir.parent == run.dir
        assert len(a.predictions) == a.metrics["images"] == len(b.predictions) * 2 // 3
        again = run.evaluate(first, split="all", quiet=True, plots=False)
    assert again.dir == a.dir
    assert len(a.predictions) == a.metrics["images"]  # read when it was made
    with pytest.raises(WingspanError, match="now holds a later evaluation"):
        a.plot("confusion")
    assert PNG not in a._repr_html_() and b.plot("confusion").path.is_file()
    shutil.rmtree(b.dir)
    with pytest.raises(WingspanError, match="this evaluation's folder, is gone"):
        b.report()


def test_evaluate_warns_of_classes_it_left_out(run, demo_dir, tmp_path):
    known = sorted(p for p in demo_dir.iterdir() if p.is_dir())[0]
    shutil.copytree(known, tmp_path / "data" / known.name)
    (tmp_path / "data" / "stranger").mkdir()
    for image in sorted(known.iterdir())[:3]:
        shutil.copy(image, tmp_path / "data" / "stranger" / image.name)
    with pytest.warns(UserWarning) as caught:
        ev = run.evaluate(tmp_path / "data", split="all", out=tmp_path / "ev", quiet=True,
                          plots=False)
    said = [str(w.message) for w in caught]
    assert said[-1] == (
        "3 images of 1 class the model does not know were left out: stranger (class_map="
        "{model class: data class} names one of the model's)."), said
    # (a copy of the run's own images, so its figures are called optimistic too)
    assert said[:-1] and all(m.startswith("These figures are not fair") for m in said[:-1])
    assert all(w.filename == __file__ for w in caught)  # the user's line, not the library's
    assert ev.metrics["images"] == len(list(known.iterdir()))


def test_predictions_name_each_image_by_its_absolute_path(run, run_cli, demo_dir,
                                                        tmp_path, monkeypatch):
    """A path as typed (`predict runs/r photos/`) joined none of evaluate's rows, which are
    absolute, and lost its folder after a `%cd`: the CSV, the JSON and the library's table
    name each image absolutely, as evaluate and audit do."""
    image = sorted(next(p for p in demo_dir.iterdir() if p.is_dir()).iterdir())[0]
    monkeypatch.chdir(image.parent.parent)
    typed = os.path.join(image.parent.name, image.name)
    for out in ("p.csv", "p.json"):
        code, _, err = run_cli("predict", run.dir, typed, "missing.jpg", "--output",
                               tmp_path / out, "--quiet")
        assert code == 0, err
    rows = pd.read_csv(tmp_path / "p.csv")
    said = json.loads((tmp_path / "p.json").read_text())
    preds = run.predict([typed, "missing.jpg"], quiet=True)
    for paths in (rows.path.tolist(), preds.path.tolist(),
                  [said["predictions"][0]["path"], said["failed"][0]["path"]]):
        assert paths == [str(image), str(image.parent.parent / "missing.jpg")]
    assert said["predictions"][0]["predicted"] == rows.predicted[0] == preds.predicted[0]
    # A linked folder keeps its name, as the data reader keeps a linked class folder's
    (tmp_path / "link").symlink_to(image.parent)
    linked = run.predict(tmp_path / "link" / image.name, quiet=True)
    assert linked.path.tolist() == [str(tmp_path / "link" / image.name)]


def test_predict_agrees_with_the_cli(run, run_cli, demo_dir, tmp_path):
    folder, other = sorted(p for p in demo_dir.iterdir() if p.is_dir())[:2]
    last = sorted(other.iterdir())[0]
    # An input that cannot be read keeps its place: rows line up with what was asked.
    inputs = [folder, tmp_path / "missing.jpg", last]
    preds = run.predict(inputs, quiet=True)
    code, _, _ = run_cli("predict", run.dir, *inputs, "--output", tmp_path / "p.csv", "--quiet")
    assert code == 0
    cli = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert preds.path.tolist() == cli.path.tolist()
    assert preds.path.tolist()[-2:] == [str(tmp_path / "missing.jpg"), str(last)]
    assert preds.iloc[-2].error == cli.error.iloc[-2] == "no such file or folder"
    # None where there is no text, as documented (pandas made it NaN once one input failed)
    assert preds.iloc[-2][["answer", "predicted", "known_level"]].tolist() == [None] * 3
    assert preds.error.tolist().count(None) == len(preds) - 1
    ok = preds[preds.error.isna()]  # None where the image was read: as pandas reads the
    assert pd.read_csv(tmp_path / "p.csv").error.isna().tolist() == \
        preds.error.isna().tolist()  # CLI's file, whose cell there is empty
    # The prediction under one name in both, and one level's is its top class
    assert ok.predicted.tolist() == cli.predicted[cli.error == ""].tolist() == \
        cli.class_1[cli.error == ""].tolist()
    assert ok.probability.to_numpy() == pytest.approx(
        cli.probability[cli.error == ""].astype(float).to_numpy(), abs=1e-6)
    assert ok.answer.tolist() == cli.answer[cli.error == ""].tolist()
    assert ok.top.map(len).eq(3).all() and (ok.branch.map(len) == 0).all()  # one level
    # --output -: the CSV alone on standard output, for a pipe; the rest on standard error
    code, piped, said = run_cli("predict", run.dir, *inputs, "--output", "-")
    assert code == 0 and "1 skipped" in said
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(piped), keep_default_na=False), cli)
    # and a file beside it: its "Wrote" line on standard error too (it ended the CSV piped)
    code, piped, said = run_cli("predict", run.dir, *inputs, "--output", "-", "--output",
                                tmp_path / "p.json")
    assert code == 0 and f"Wrote{tmp_path / 'p.json'}" in "".join(said.split()), said
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(piped), keep_default_na=False), cli)
    with pytest.raises(WingspanError, match="No image could be predicted"):
        run.predict(tmp_path / "missing.jpg", quiet=True)


def test_predict_keeps_the_model_loaded_until_its_files_change(run, demo_dir, tmp_path,
                                                               monkeypatch):
    """A loop predicting one photo at a time loaded the model (and chose its engine) for
    each: 0.52 s a call for a tiny model, against 0.03 s kept. A calibrate rewrites the
    bundle, and the next call answers with its new thresholds."""
    import wingspan.inference as inference

    loads, load = [], inference.load_bundle
    monkeypatch.setattr(inference, "load_bundle",
                        lambda *a, **k: loads.append(1) or load(*a, **k))
    shutil.copytree(run.dir, tmp_path / "copy")
    copy, image = ws.load(tmp_path / "copy"), next(demo_dir.rglob("*.jpg"))
    first = copy.predict(image, quiet=True)
    assert copy.predict(image, quiet=True, top_k=1).probability[0] == first.probability[0]
    assert len(loads) == 1
    copy.calibrate(unknown=True, unknown_rate=0.4, quiet=True)  # the bundle rewritten
    after = copy.predict(image, quiet=True)
    assert after.threshold[0] < first.threshold[0]  # the new, lower one
    assert after.equals(ws.load(tmp_path / "copy").predict(image, quiet=True))
    # One kept for the process, not one per Run (which kept every Run's model while it
    # lived): another bundle's call frees it.
    import gc
    import weakref

    import wingspan.api.training as api

    kept = weakref.ref(api._LOADED[1])
    ws.load(run.dir).predict(image, quiet=True)
    gc.collect()
    assert kept() is None and len(loads) == 4


PAUSED_WRITE = """
import time, wingspan.files as files
def paused(path):
    print("writing", flush=True)
    time.sleep(300)
files._flush = paused
from wingspan.cli import main
main()
"""


def test_sigterm_stops_any_command_as_ctrl_c_does(run, demo_dir, tmp_path):
    """SIGTERM (`kill`, `timeout`, a scheduler) ended predict, export, evaluate... on the
    spot, no `finally` run: what they were writing was left (an export's 16 MB graph). It
    stops them as Ctrl-C does now, and they exit 143, as a process SIGTERM ended does."""
    import signal

    out = tmp_path / "out" / "p.csv"
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_WRITE, "predict", str(run.dir),
         str(next(demo_dir.rglob("*.jpg"))), "--output", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # (its temporary file written, not yet renamed)
        if line.strip() == "writing":
            break
    assert [p.name for p in out.parent.iterdir()] == [f".p.{proc.pid}.tmp.csv"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143, proc.stderr.read()
    assert list(out.parent.iterdir()) == []


def test_a_narrow_terminal_folds_the_answer_rather_than_cutting_it(run, demo_dir, run_cli,
                                                                   monkeypatch):
    """At 40 columns the prediction read "azure_…": it folds onto more lines, as paths do."""
    from wingspan.cli import common as cli

    photos = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))[::7]]
    answers = run.predict(photos, quiet=True).answer
    photo, answer = max(zip(photos, answers, strict=True), key=lambda pair: len(pair[1]))
    assert len(answer) >= 7  # (longer than a column here)
    monkeypatch.setattr(cli.out, "_width", 30)  # (rich read $COLUMNS when it was made)
    code, out, err = run_cli("predict", run.dir, photo, "--quiet")
    assert code == 0, err
    rows = [line.split("│") for line in out.splitlines() if line.startswith("│")]
    assert "".join(cells[2].strip() for cells in rows) == answer, out


POOLS = """
import multiprocessing, os, signal, sys
from wingspan.cli.app import _sigterm_as_interrupt

def blocked(_):
    return signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])

def disposition(_):
    return signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not blocked(_)

_sigterm_as_interrupt()  # as every command does: in place while a library forks its pools
fork = multiprocessing.get_context("fork")
with fork.Pool(2) as pool:  # (cleanlab's, in `data audit`)
    print(all(pool.map(disposition, range(4))))
for _ in range(int(sys.argv[1])):
    with fork.Pool(2) as pool:
        pool.map(abs, range(10))  # then Pool.terminate, which SIGTERMs its workers
print("done")
# The embedding program's handler, left to its own. (Closed, not terminated: a Python
# handler in a Pool's workers can lose Pool.terminate's SIGTERM, CPython's own race,
# python/cpython#87015; measured here with and without wingspan's hook alike, ~1 run of
# 100 pools in 5 under load: the test hung in CI so.)
signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
pool = fork.Pool(2)
print(not any(pool.map(disposition, range(4))))
pool.close()
pool.join()
# ... as is its mask: SIGTERM blocked (to sigwait for it) stays blocked, in both
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
pool = fork.Pool(2)  # (closed, not terminated: its workers' SIGTERM is blocked)
workers = pool.map(blocked, range(4))
pool.close()
pool.join()
print(all(workers) and blocked(0))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_pool_forked_under_the_sigterm_handler_is_ended_without_hanging():
    """The handler passed a forked child's SIGTERM on to the default, but one that came
    before the child's Python had reset its signals was lost: `Pool.terminate` then waited
    for the worker for good (a `data audit` hung in cleanlab, 1 pool in a few hundred).
    Its workers now start with SIGTERM's default, never caught: no window to lose it in."""
    proc = subprocess.run([sys.executable, "-c", POOLS, "300"], capture_output=True,
                          text=True, timeout=170)
    assert proc.stdout.split() == ["True", "done", "True", "True"], proc.stderr[-2000:]


SIGTERMS = """
import os, signal, sys, time
from wingspan.cli.app import _sigterm_as_interrupt
from wingspan.errors import TERMINATED
_sigterm_as_interrupt()


class Loader:
    def __init__(self, message):
        self.message = message

    def __del__(self):
        raise RuntimeError(self.message)


try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
except KeyboardInterrupt:  # (dropped, as Python drops one raised in a __del__)
    pass
assert TERMINATED.is_set()
Loader("DataLoader worker (pid 1) is killed by signal: Terminated. ")  # not shown
Loader("another fault")  # shown
print("second", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("still running")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_second_sigterm_ends_the_command_and_a_killed_loader_is_not_a_traceback():
    """A group's SIGTERM (`timeout`'s, SLURM's) ended the data workers too: the loader's
    __del__ then printed their death as a traceback. And a SIGTERM raised where Python
    drops the KeyboardInterrupt (an import's callback) was lost: a second one now ends the
    command on the spot."""
    proc = subprocess.run([sys.executable, "-c", SIGTERMS], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGTERM, (proc.stdout, proc.stderr)
    assert proc.stdout.split() == ["second"]
    assert "another fault" in proc.stderr and "DataLoader worker" not in proc.stderr


def test_a_photo_skipped_inside_a_folder_keeps_its_place_among_the_folders_photos(
        run, demo_dir, tmp_path):
    """A phone's HEIC photo in a folder was listed at the folder's start."""
    photos = tmp_path / "photos"
    (photos / "x").mkdir(parents=True)
    first, last = sorted(next(p for p in demo_dir.iterdir() if p.is_dir()).iterdir())[:2]
    shutil.copy(first, photos / "a.jpg")
    (photos / "m.heic").write_bytes(b"\0" * 16)
    shutil.copy(last, photos / "x" / "z.jpg")
    preds = run.predict(photos, quiet=True)
    assert [Path(p).relative_to(photos).as_posix() for p in preds.path] == [
        "a.jpg", "m.heic", "x/z.jpg"]
    assert preds.error.notna().tolist() == [False, True, False]
    # A glob over folders, one's name the start of another's ("-" sorts before "/"): each
    # skipped file in its own folder's place.
    for folder, names in (("2024-05", ["b.jpg", "c.heic", "d.jpg"]), ("2024-05-12", ["a.jpg"])):
        (tmp_path / "g" / folder).mkdir(parents=True)
        for name in names:
            if name.endswith(".heic"):
                (tmp_path / "g" / folder / name).write_bytes(b"\0" * 16)
            else:
                shutil.copy(first, tmp_path / "g" / folder / name)
    preds = run.predict(str(tmp_path / "g" / "*"), quiet=True)
    assert [Path(p).relative_to(tmp_path / "g").as_posix() for p in preds.path] == [
        "2024-05/b.jpg", "2024-05/c.heic", "2024-05/d.jpg", "2024-05-12/a.jpg"]


def test_a_bundles_own_tensors_file_loads_its_bundle(run, demo_dir, tmp_path):
    """runs/NAME/model/model.safetensors, which --weights takes, was refused by load and
    predict as "not a wingspan model bundle ('wingspan_manifest')"."""
    image = sorted(next(p for p in demo_dir.iterdir() if p.is_dir()).iterdir())[0]
    tensors = run.dir / "model" / "model.safetensors"
    by_file = ws.load(tensors).predict(image, quiet=True)
    assert by_file.drop(columns="path").equals(
        run.predict(image, quiet=True).drop(columns="path"))
    (tmp_path / "other.safetensors").write_bytes(tensors.read_bytes())  # no manifest beside
    with pytest.raises(WingspanError, match=r"not a wingspan model bundle \(no wingspan "
                       r"manifest in its metadata\)"):
        ws.load(tmp_path / "other.safetensors")


def test_workers_reach_the_loader_and_change_no_answer(run, run_cli, demo_dir, tmp_path,
                                                       monkeypatch):
    """predict, evaluate and calibrate --workers (and the API's `workers`) set the data
    loader's workers; 0 and 1 give the same answers. (Batches of 4: one batch alone is
    read without workers, which could only add their start.)"""
    import wingspan.inference as inference

    used, loader = [], inference.Loader

    def spy(*args, **kwargs):
        used.append(kwargs["num_workers"])
        return loader(*args, **kwargs)

    monkeypatch.setattr(inference, "Loader", spy)
    folder = sorted(p for p in demo_dir.iterdir() if p.is_dir())[0]
    for n in ("0", "1"):
        code, _, err = run_cli("predict", run.dir, folder, "--workers", n, "--quiet",
                               "--batch-size", "4", "--output", tmp_path / f"p{n}.csv")
        assert code == 0, err
    assert used == [0, 1]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "p0.csv"),
                                  pd.read_csv(tmp_path / "p1.csv"))
    assert run.predict(folder, workers=1, quiet=True, batch_size=4).equals(
        run.predict(folder, workers=0, quiet=True, batch_size=4))
    assert used[2:] == [1, 0]
    run.predict(folder, workers=1, quiet=True, batch_size=1000)  # one batch
    assert used[4:] == [0]
    code, _, err = run_cli("evaluate", "--no-plots", "--batch-size", "4",
                           run.dir, "--split", "val", "--workers", "1", "--quiet",
                           "--out", tmp_path / "e1")
    assert code == 0, err
    e0 = run.evaluate(split="val", workers=0, out=tmp_path / "e0", quiet=True, plots=False,
                      batch_size=4).metrics
    e1 = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    timing = {"images_per_second", "engine"}
    assert {k: v for k, v in e0.items() if k not in timing} == \
        {k: v for k, v in e1.items() if k not in timing}
    assert used[5:] == [1, 0]
    shutil.copytree(run.dir, tmp_path / "copy")  # calibrate rewrites the bundle
    code, _, err = run_cli("calibrate", tmp_path / "copy", "--workers", "1", "--quiet",
                           "--batch-size", "4")
    assert code == 0, err
    assert used[7:] == [1]
    with pytest.raises(WingspanError, match="workers: expected a whole number of at least 0, "
                                            "got -1"):
        run.predict(folder, workers=-1, quiet=True)
    with pytest.raises(WingspanError, match="workers: expected a whole number"):
        run.evaluate(workers="2", quiet=True)


def test_calibrate_changes_the_bundle_as_the_command_does(run, run_cli, tmp_path):
    """Run.calibrate fits what `wingspan calibrate` fits, on a copy of the same run: the
    temperature (and with unknown=True the unknown scores), stored in the bundle, and
    returns what the command prints."""
    from wingspan.models.bundle import read_manifest

    def copy(name):
        return shutil.copytree(run.dir, tmp_path / name,
                               ignore=shutil.ignore_patterns("evaluation-*"))

    def fingerprint(run_dir):
        return {p.name: p.read_bytes() for p in sorted((run_dir / "model").iterdir())}

    api, cli = copy("api"), copy("cli")
    before = read_manifest(api / "model")["calibration"]
    untouched = fingerprint(api)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        fitted = ws.load(api).calibrate(split="train", workers=0, quiet=True)
    assert fingerprint(api) != untouched
    # All it stored but the photos' hashes (evaluate's leak check), which a notebook
    # showed in full: 10 KB for 228 photos.
    stored = read_manifest(api / "model")["calibration"]
    assert stored.pop("photo_sums") and stored == fitted
    assert fitted["previous_temperature"] == pytest.approx(before["temperature"])
    assert fitted["fitted_on"] == "train" and fitted["images"] >= 10
    code, out, err = run_cli("calibrate", cli, "--split", "train", "--workers", "0", "--quiet")
    assert code == 0, err
    by_cli = read_manifest(cli / "model")["calibration"]
    assert by_cli.keys() == {*fitted, "photo_sums"}
    for key in ("temperature", "val_ece_previous", "val_ece_before", "val_ece_after", "images",
                "fitted_on"):
        assert fitted[key] == pytest.approx(by_cli[key]), key
    assert (f"Temperature {before['temperature']:.3f} -> {fitted['temperature']:.3f}" in out
            and f"ECE {fitted['val_ece_previous']:.4f} -> {fitted['val_ece_after']:.4f}" in out)
    # A temperature at a bound of its search: the command's warning, as a Python warning.
    said = [str(w.message) for w in warned if "bound of its search" in str(w.message)]
    assert len(said) == fitted["at_bound"] and ("bound of its search" in out) == \
        fitted["at_bound"]
    # Fitted on the training split: both say the probabilities come out too sure.
    trained = fitted["run_images_among"]["train"]
    assert trained == fitted["images"] and "test" not in fitted["run_images_among"]
    note = f"{trained} of the {trained} images the temperature was fitted on are ones the model"
    assert any(str(w.message).startswith(note) for w in warned)
    assert note in " ".join(out.split())

    # unknown=True: the unknown scores fitted again, the temperature left as it is.
    u = ws.load(api).calibrate(unknown=True, unknown_rate=0.2, unknown_score="energy",
                               workers=0, quiet=True)
    manifest = read_manifest(api / "model")
    assert manifest["calibration"] == {**fitted, "photo_sums": manifest["calibration"][
        "photo_sums"]}
    assert manifest["unknown"]["score"] == u["score"] == "energy" and u["rate"] == 0.2
    code, out, err = run_cli("calibrate", cli, "--unknown", "--unknown-rate", "0.2",
                             "--unknown-score", "energy", "--workers", "0", "--quiet")
    assert code == 0, err
    assert f"{u['train_images']} training images" in out and f"{u['val_images']} val" in out
    by_cli = read_manifest(cli / "model")["unknown"]["thresholds"]
    assert by_cli.keys() == manifest["unknown"]["thresholds"].keys()
    for score, thresholds in manifest["unknown"]["thresholds"].items():
        assert by_cli[score] == pytest.approx(thresholds), score
    assert u["thresholds"] == pytest.approx(by_cli["energy"])

    # Refused before any image is read, in the API's own names.
    same = fingerprint(api)
    for settings, message in [
            ({"unknown": "moths/"}, "unknown: expected True or False, got str"),
            ({"unknown": True, "split": "val"}, "it takes no data, split or class_map"),
            ({"unknown_rate": 0.1}, "fits again only with unknown=True"),
            ({"unknown": True, "unknown_rate": 1.5}, "expected a share above 0 and below 1"),
            ({"split": "dev"}, "split: expected one of"),
            ({"batch_size": 0}, "batch_size: expected a whole number"),
            ({"max_pixels": 0}, "max_pixels: expected a whole number")]:
        with pytest.raises(WingspanError, match=message) as e:
            ws.load(api).calibrate(quiet=True, **settings)
        if "split" in settings and not settings.get("unknown"):
            assert e.value.hint == "Leave it out for the val split (else all of data)."
    assert fingerprint(api) == same


def test_adapt_takes_the_keywords_evaluate_and_predict_take(run, demo_dir, tmp_path,
                                                            monkeypatch):
    """Every Run method that reads images takes quiet (no progress bars), workers, device
    and batch_size, as its command does (adapt's device and batch_size are AdaptConfig's);
    adapt took neither quiet nor workers ("Unknown setting")."""
    import inspect

    import wingspan.inference as inference
    import wingspan.progress as progress
    from wingspan.config import AdaptConfig

    common = {"quiet", "workers", "device", "batch_size"}
    for method in (ws.Run.evaluate, ws.Run.predict, ws.Run.adapt):
        takes = set(inspect.signature(method).parameters)
        if method is ws.Run.adapt:
            takes |= {f.name for f in dataclasses.fields(AdaptConfig)}
        assert common <= takes, method.__name__
    shown, workers, loader = [], [], inference.Loader
    monkeypatch.setattr(progress, "_shown", lambda enabled: shown.append(enabled) or enabled)

    def spy(*args, **kwargs):
        workers.append(kwargs["num_workers"])
        return loader(*args, **kwargs)

    monkeypatch.setattr(inference, "Loader", spy)
    folder = sorted(p for p in demo_dir.iterdir() if p.is_dir())[0]
    adapted = run.adapt(folder, out=tmp_path / "a", workers=0, quiet=True, batch_size=4)
    assert (adapted.dir / "adapt.json").is_file()
    # A notebook shows what adapting did, not a training's figures (it has none: "nan")
    summary = json.loads((adapted.dir / "adapt.json").read_text())
    page = adapted._repr_html_()
    assert "Adapted run" in page and str(run.dir) in page and "nan" not in page
    assert f"{summary['val_accuracy_before']:.4f} / {summary['val_accuracy']:.4f}" in page
    assert shown and not any(shown)  # progress was asked about, and never drawn
    assert workers and set(workers) == {0}


def test_max_pixels_is_a_keyword_where_the_command_has_the_option(run, demo_dir, tmp_path,
                                                                    monkeypatch):
    """--max-pixels (the pixel budget of one image) as the API's `max_pixels`, on each
    function whose command takes it; for that call only (the next one has the default)."""
    import inspect

    from wingspan.config import MAX_PIXELS_ENV

    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    for function in (ws.train, ws.resume, ws.Data.inspect, ws.Run.evaluate, ws.Run.calibrate,
                     ws.Run.predict, ws.Run.adapt):
        names = list(inspect.signature(function).parameters)
        # added after `quiet`, so that a call passing quiet by position still means it
        assert names.index("max_pixels") > names.index("quiet"), function.__name__
    folder = sorted(p for p in demo_dir.iterdir() if p.is_dir())[0]
    with pytest.raises(WingspanError, match="over the budget of 0.00001 MP"):  # 48 x 48 JPEGs:
        run.predict(folder, max_pixels=10, quiet=True, workers=0)  # 6 x 6 at 1/8 is over
    assert MAX_PIXELS_ENV not in os.environ
    assert run.predict(folder, quiet=True, workers=0).error.isna().all()
    with pytest.raises(WingspanError, match="could be read"):
        run.evaluate(split="val", max_pixels=10, out=tmp_path / "e", quiet=True, workers=0)
    shutil.copytree(run.dir, tmp_path / "copy")  # calibrate would rewrite the bundle
    with pytest.raises(WingspanError, match="could be read"):
        ws.load(tmp_path / "copy").calibrate(max_pixels=10, quiet=True, workers=0)
    summary = ws.read(demo_dir).inspect(out=tmp_path / "i", max_pixels=10, quiet=True).summary
    assert len(summary["images"]["unreadable"]) == summary["images"]["checked"] == len(
        ws.read(demo_dir))
    with pytest.raises(WingspanError, match="max_pixels: expected a whole number"):
        run.predict(folder, max_pixels=0, quiet=True)


def test_max_pixels_in_two_threads_each_keep_their_own(monkeypatch):
    """Two calls in two threads with different max_pixels each read images with their own
    budget throughout, also after the other has ended (the budget was the environment's,
    set and put back by each call: the last set won, and the first to end undid the
    other's)."""
    import threading

    from wingspan.api.arguments import _max_pixels
    from wingspan.config import MAX_PIXELS_ENV
    from wingspan.data.images import max_pixels

    monkeypatch.setenv(MAX_PIXELS_ENV, "30")  # the process's own (as --max-pixels sets it)
    inside, first_left = threading.Barrier(3, timeout=60), threading.Event()
    seen = {}

    def call(budget):
        with _max_pixels(budget):
            inside.wait()  # both calls have begun
            seen[budget] = [max_pixels()]
            inside.wait()
            if budget == 10:
                return
            assert first_left.wait(60)
            seen[budget].append(max_pixels())

    threads = [threading.Thread(target=call, args=(b,)) for b in (10, 20)]
    for thread in threads:
        thread.start()
    inside.wait()
    inside.wait()
    threads[0].join(60)
    first_left.set()
    threads[1].join(60)
    assert seen == {10: [10], 20: [20, 20]}
    assert max_pixels() == 30 and os.environ[MAX_PIXELS_ENV] == "30"


def test_load_a_run_and_a_bundle(run, demo_dir, tmp_path):
    again = ws.load(run.dir)
    pd.testing.assert_frame_equal(again.history, run.history)
    assert ws.load(run.dir / "model").dir == run.dir  # a run's own bundle: the whole run
    shutil.copytree(run.dir / "model", tmp_path / "bundle")
    bundle = ws.load(tmp_path / "bundle")
    assert bundle.dir is None and bundle.classes == run.classes
    assert bundle.metrics["best"] == run.metrics["best"]
    assert bundle.config.backbone == "test_efficientnet"
    with pytest.raises(WingspanError, match="without its run folder"):
        _ = bundle.history
    image = next(demo_dir.rglob("*.jpg"))
    one_engine = {"precision": "fp32", "runtime": "torch"}  # auto may time them apart
    assert bundle.predict(image, quiet=True, **one_engine).equals(
        run.predict(image, quiet=True, **one_engine))
    assert "val macro-F1" in bundle._repr_html_()
    with pytest.raises(WingspanError, match="No model at"):
        ws.load(tmp_path / "nothing")
    with pytest.raises(WingspanError, match="is not a model: it holds no manifest.json or"):
        ws.load(demo_dir)  # a data folder: said at once, not at the first prediction
    with pytest.raises(WingspanError, match="batch_size: expected a whole number of at least 1"):
        run.predict(image, batch_size=0, quiet=True)
    # Arguments of the wrong kind: a message naming the argument, not a TypeError inside.
    import numpy as np

    for call, message in ((lambda: ws.load(5), "path: expected a path"),
                          (lambda: run.predict(np.zeros((2, 4, 3)), quiet=True),
                           "paths: expected a file, folder or glob, or a list of them; got "
                           "ndarray"),
                          (lambda: run.predict(b"a.jpg", quiet=True), "got bytes"),
                          (lambda: run.predict(image, top_k="2", quiet=True), "top_k: expected"),
                          (lambda: run.evaluate(class_map=3, quiet=True), "class_map: expected")):
        with pytest.raises(WingspanError, match=message):
            call()
    with pytest.raises(WingspanError, match="name: expected a run name"):
        ws.train(demo_dir, name=5)
    # A training checkpoint (what an Ultralytics user loads first) is said to be one.
    with pytest.raises(WingspanError, match="not a safetensors file") as e:
        ws.load(run.dir / "checkpoints" / "best.pt")
    assert e.value.hint.startswith(f"It is a training checkpoint of the run {run.dir}")
    # A damaged metrics.json is said so, as `ws.runs` says it.
    copy = shutil.copytree(run.dir, tmp_path / "copy", ignore=shutil.ignore_patterns(
        "evaluation-*", "cache"))
    (copy / "metrics.json").write_text("{")
    with pytest.raises(WingspanError, match="metrics.json is damaged: not valid JSON") as e:
        _ = ws.load(copy).metrics
    assert "fitted since is then lost" in e.value.hint  # (the resume writes the model too)
    assert len(run.predict((str(image), image), quiet=True)) == 2  # any list of paths
    from wingspan.api.arguments import _class_map_arg

    assert _class_map_arg(t for t in ["a=b", "c=d"]) == {"a": "b", "c": "d"}  # a generator


def test_a_misspelt_keyword_is_named_with_the_closest_ones(run, demo_dir):
    """As ws.train(epoch_head=1) answers: each function and method names the keyword it
    does not take and the likeliest meant, not Python's bare TypeError."""
    image = next(demo_dir.rglob("*.jpg"))
    data = ws.read(demo_dir)
    for call, message, meant in (
            (lambda: ws.read(demo_dir, formt="folder"), "read() takes no keyword 'formt'",
             "'format'"),
            (lambda: data.split(valid=0.2), "data.split() takes no keyword 'valid'", "'val'"),
            (lambda: run.predict(image, topk=2), "run.predict() takes no keyword 'topk'",
             "'top_k'"),
            (lambda: run.evaluate(batchsize=8), "run.evaluate() takes no keyword 'batchsize'",
             "'batch_size'"),
            (lambda: ws.runs(run.dir.parent, srot="name"), "runs() takes no keyword 'srot'",
             "'sort'"),
            (lambda: run.evaluate(map={"a": "b"}), "run.evaluate() takes no keyword 'map'",
             "'class_map'")):
        with pytest.raises(WingspanError, match=re.escape(message)) as e:
            call()
        assert f"Did you mean {meant}" in e.value.hint, e.value.hint


def test_explain_adapt_evaluate_and_export_check_their_arguments(run, demo_dir, tmp_path):
    """A wrong kind of argument raises a WingspanError naming it, before any work: not a
    TypeError from deep inside."""
    import numpy as np

    image = next(demo_dir.rglob("*.jpg"))
    for call, message in (
            (lambda: run.explain(5), "images: expected a file, folder or glob"),
            (lambda: run.explain(np.zeros((2, 3))), "images: expected a file, folder or glob"),
            (lambda: run.explain([]), "images: got an empty list"),
            # (iterated, a DataFrame gave its column names: "No image could be predicted
            # (path: no such file or folder)")
            (lambda: run.predict(pd.DataFrame({"path": [str(image)]})),
             r"paths: got a DataFrame; give its column of paths, frame\['path'\]"),
            (lambda: run.explain(image, out=5), "out: expected a path"),
            (lambda: run.adapt(5), "photos: expected a file, folder or glob"),
            (lambda: run.adapt([image, 3]), "photos: each must be a path"),
            (lambda: run.adapt(image, out=tmp_path / "a", roundz=2), "Unknown setting"),
            (lambda: run.adapt(image, out=5), "out: expected a path"),
            (lambda: run.evaluate(unknown=5, quiet=True), "unknown: expected a file"),
            (lambda: run.evaluate(unknown=True, quiet=True), "unknown: expected a folder"),
            (lambda: run.evaluate(unknown=b"moths", quiet=True), "unknown: .* got bytes"),
            (lambda: run.evaluate(unknown=[None], quiet=True), "unknown: each must be a path"),
            (lambda: run.evaluate(5, quiet=True), "data: expected a path"),
            # (a string is true: "no" turned test-time augmentation on)
            (lambda: run.predict(image, tta="no"), "tta: expected True or False, got str"),
            (lambda: run.evaluate(tta="no", quiet=True), "tta: expected True or False"),
            (lambda: run.evaluate(plots=1, quiet=True), "plots: expected True or False"),
            (lambda: ws.read(demo_dir, strict="no"), "strict: expected True or False"),
            # (quiet="no" was quiet, as every string is true)
            (lambda: run.predict(image, quiet="no"), "quiet: expected True or False"),
            (lambda: run.evaluate(quiet="no"), "quiet: expected True or False"),
            (lambda: run.calibrate(quiet="no"), "quiet: expected True or False"),
            (lambda: run.adapt(image, quiet="no"), "quiet: expected True or False"),
            (lambda: ws.read(demo_dir).inspect(quiet="no", out=tmp_path / "q"),
             "quiet: expected True or False"),
            (lambda: ws.train(demo_dir, quiet="no", runs_dir=tmp_path / "q"),
             "quiet: expected True or False"),
            (lambda: ws.resume(run, quiet="no"), "quiet: expected True or False"),
            (lambda: ws.read(demo_dir).inspect(metadata_only="no", out=tmp_path / "i"),
             "metadata_only: expected True or False"),
            (lambda: run.calibrate(5, quiet=True), "data: expected a path"),
            (lambda: run.evaluate(out=5, quiet=True), "out: expected a path"),
            (lambda: run.evaluate(split=0, quiet=True), "split: expected one of train, val"),
            (lambda: run.evaluate(split=["val"], quiet=True), "split: .* got list"),
            (lambda: run.evaluate(split="tst", quiet=True), "split: .* or all, got str 'tst'"),
            (lambda: run.export(out=5), "out: expected a path"),
            (lambda: ws.read(5), "path: expected a path"),
            (lambda: ws.read(None), "path: expected a path"),
            (lambda: ws.train(3), "data: expected a dataset"),
            (lambda: ws.train(demo_dir, runs_dir=5), "runs_dir: expected a path"),
            (lambda: ws.train(demo_dir, config=5), "config: expected a path"),
            (lambda: ws.train(demo_dir, config={"epoch_head": 2}), "'epoch_head'"),
            (lambda: ws.TrainConfig(epoch_head=1), "Unknown setting 'epoch_head'"),
            (lambda: ws.demo_data(tmp_path / "d", backbone="resnet50"), "training setting")):
        with pytest.raises(WingspanError, match=message):
            call()
    # A split or a backbone given by position, where a path comes: said so, with the keyword.
    for call, message, meant in (
            (lambda: run.evaluate("test", quiet=True), "data: 'test' is a split name",
             "split='test'"),
            (lambda: run.calibrate("val", quiet=True), "data: 'val' is a split name",
             "split='val'"),
            (lambda: ws.train(demo_dir, "efficientnet_lite0"),
             "config: there is no file efficientnet_lite0", "backbone='efficientnet_lite0'"),
            (lambda: ws.train(demo_dir, "nowhere.yaml"), "config: there is no file nowhere.yaml",
             "backbone='efficientnet_lite2', epochs_finetune=4")):
        with pytest.raises(WingspanError, match=message) as e:
            call()
        assert meant in e.value.hint, e.value.hint
    # (a dict of settings is taken as a TrainConfig is)
    with pytest.raises(WingspanError, match="'batch_size' setting must be at least 1"):
        ws.train(demo_dir, config={"batch_size": 0}, runs_dir=tmp_path / "never")
    # A path that is not there: said by name, as the CLI says it.
    with pytest.raises(WingspanError, match="nowhere.jpg: no such file or folder"):
        run.explain(tmp_path / "nowhere.jpg")
    with pytest.raises(WingspanError, match=r"nowhere \(no such file or folder\)"):
        run.adapt([tmp_path / "nowhere"], out=tmp_path / "a")
    with pytest.raises(WingspanError, match="No images of unseen classes in .*nowhere"):
        run.evaluate(unknown=tmp_path / "nowhere", out=tmp_path / "ev", quiet=True)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_explain_writes_overlays(run, demo_dir, tmp_path):
    images = run.explain(sorted(demo_dir.rglob("*.jpg"))[:2], out=tmp_path)
    assert [i.path.parent for i in images] == [tmp_path, tmp_path]
    assert all(i._repr_png_().startswith(b"\x89PNG") for i in images)
    shown = images._repr_html_()  # a notebook shows the overlays, not a list's text
    assert shown.count("<img") == 2 and all(i.path.name in shown for i in images)
    # What cannot be explained is said: a warning naming it, or an error when it is all.
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.warns(UserWarning, match=r"2 inputs left out: .*nowhere.jpg: no such file.*"
                                         r"notes.jpg"):
        images = run.explain([tmp_path / "nowhere.jpg", *sorted(demo_dir.rglob("*.jpg"))[:1],
                              tmp_path / "notes.jpg"], out=tmp_path / "some")
    assert len(images) == 1
    with pytest.raises(WingspanError, match="No image could be explained .*notes.jpg"):
        run.explain(tmp_path / "notes.jpg", out=tmp_path / "none")


def test_predict_warns_of_files_that_are_not_images_at_the_users_line(run, demo_dir,
                                                                     tmp_path):
    """The warning pointed at wingspan's own argument checker, not at the user's call."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(sorted(demo_dir.rglob("*.jpg"))[0], folder / "a.jpg")
    (folder / "notes.txt").write_text("field notes")
    with pytest.warns(UserWarning, match="Left out 1 file that is not an image") as caught:
        preds = run.predict(folder, quiet=True)
    assert len(preds) == 1 and all(w.filename == __file__ for w in caught)


def test_hierarchical_levels(demo_dir, tmp_path):
    data = ws.read(demo_dir)
    run = ws.train(data, runs_dir=tmp_path, quiet=True,
                   **{**vars(tiny(tmp_path)), "levels": ["family", "label"]})
    preds = run.predict(demo_dir, quiet=True)
    families = dict(zip(data.table["label"], data.table["family"], strict=False))
    for _, row in preds.iterrows():  # the consistent branch: the class under its family
        (lv1, family, p1), (lv2, label, p2) = row.branch
        assert (lv1, lv2) == ("family", "label") and 0 < p2 <= p1 <= 1
        assert label == row.predicted and p2 == row.probability and families[label] == family
    ev = run.evaluate(split="val", quiet=True, plots=False)
    assert set(ev.metrics["hierarchy"]["levels"]) == {"family", "label"}
    assert "Per level" in ev._repr_html_()
    # The unknown answer per level, as predict answers the same images: answered at least
    # that deep, and the branch's class there right or not.
    val = pd.read_csv(run.dir / "splits.csv").query("split == 'val'")
    answers = ev.metrics["answers"]
    got = run.predict(val["path"].tolist(), quiet=True)
    depth = {**{f: 0 for f in data.table["family"]}, **{c: 1 for c in data.table["label"]}}
    reach = got["answer"].map(depth).fillna(-1).to_numpy()
    # The level each answer is at, and the score that decided it, as the CLI writes them.
    assert (got["known_level"].map({"family": 0, "label": 1}).fillna(-1) == reach).all()
    over = got["unknown_score"] > got["threshold"]
    assert (over == (got["known_level"] != "label")).all()
    assert (got.loc[~over, "score_level"] == "label").all()
    for i, level in enumerate(["family", "label"]):
        branch = got["branch"].map(lambda b, i=i: b[i][1])
        right = (branch == val[level].to_numpy()).to_numpy()
        named = reach >= i
        figures = answers["by_level"][level]
        assert figures["named"] == pytest.approx(named.mean())
        assert figures["named_wrongly"] == pytest.approx((named & ~right).mean())
        if named.any():
            assert figures["accuracy_when_named"] == pytest.approx(right[named].mean())
    assert answers["named"] == answers["by_level"]["label"]["named"]
    # The open-set figures count what predict answers too: the same val images as
    # "unseen" are turned away exactly where predict names no species.
    # (the same pixels in other bytes: the val images themselves, in their class folders,
    # or copies of them, would be refused)
    from PIL import Image

    unseen = tmp_path / "unseen"
    unseen.mkdir()
    for i, path in enumerate(val["path"]):
        with Image.open(path) as image:
            image.convert("RGB").save(unseen / f"{i:03d}.png")  # lossless: the same pixels
    evaluation = run.evaluate(split="val", unknown=unseen, out=tmp_path / "ev-u", quiet=True,
                              plots=False)
    u = evaluation.metrics["unknown"]
    shown = evaluation._repr_html_()  # a notebook shows what the terminal prints
    assert "Unknown images: " in shown and "msp+knn (in use)" in shown
    assert "At the thresholds of every level" in shown and "named a class" in shown
    named_species = (reach >= 1)
    assert u["known_turned_away"] == pytest.approx(1 - named_species.mean())
    assert u["unseen_flagged"] == u["known_turned_away"]
    assert list(u["thresholds"]) == ["family", "label"]
    assert u["thresholds"]["label"] == u["threshold"]
    assert u["known_accuracy_with_unknown"] == pytest.approx(
        (got["answer"].to_numpy() == val["label"].to_numpy()).mean())
    # unknown.csv says which level's score stopped each answer, against its own threshold
    # (the levels' thresholds differ), and the finest one's, which AUROC ranks.
    listed = pd.read_csv(tmp_path / "ev-u" / "unknown.csv")
    over = listed["unknown_score"] > listed["threshold"]
    assert (over == (listed["known_level"].fillna("") != "label")).all()
    assert set(listed["score_level"]) <= {"family", "label"} and "label_score" in listed


def test_a_stopped_run_shows_where_it_stopped_and_how_to_go_on(run, tmp_path):
    stopped = tmp_path / "stopped"
    shutil.copytree(run.dir, stopped, ignore=shutil.ignore_patterns("model", "metrics.json",
                                                                   "evaluation-*"))
    again = ws.load(stopped)
    last = again.history.iloc[-1]
    page = again._repr_html_()  # what a notebook shows for `again`: no traceback
    assert f"stopped after {last['stage']} epoch {last['epoch']} (resumable)" in page
    assert html.escape(f"ws.resume({str(stopped)!r})") in page and "training curves" in page
    for use in (lambda: again.metrics, lambda: again.classes, lambda: again.predict(stopped)):
        with pytest.raises(WingspanError, match="has no model yet: its training stopped") as e:
            use()
        assert f"ws.resume({str(stopped)!r})" in e.value.hint


def test_export_and_resume_are_the_cli_functions(run, tmp_path):
    path = run.export(out=tmp_path / "model.onnx")
    meta = json.loads(metadata_path(path).read_text())
    assert path.is_file() and meta["classes"]["label"] == run.classes
    with pytest.raises(WingspanError, match="is finished; there is nothing to resume") as e:
        ws.resume(run.dir)
    assert e.value.every_rank  # (said by rank 0 alone, not once a process: --devices 2)
    # Its model damaged (a disk error, a copy cut short): predict says a resume writes it
    # again from the checkpoint, and the resume does, the same weights.
    damaged = tmp_path / "damaged"
    shutil.copytree(run.dir, damaged)
    weights = damaged / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(WingspanError, match="are corrupt") as e:
        ws.load(damaged).predict([str(tmp_path)])
    assert "wingspan train --resume RUN" in e.value.hint
    ws.resume(damaged, quiet=True)
    assert read_manifest(damaged / "model")["weights_sha256"] == \
        read_manifest(run.dir / "model")["weights_sha256"]
    assert "training was done, writing its model" in (damaged / "train.log").read_text()


def test_a_path_in_the_home_folder_is_read_there(run, demo_dir, tmp_path, monkeypatch,
                                                 run_cli):
    """"~/runs" is the home's runs folder in the library and in a quoted CLI argument, as a
    shell reads it: never a folder named "~" made in the current one."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    shutil.copytree(run.dir, tmp_path / "runs" / "r")
    shutil.copytree(next(p for p in demo_dir.iterdir() if p.is_dir()), tmp_path / "photos")
    assert ws.load("~/runs/r").dir == tmp_path / "runs" / "r"
    assert ws.runs("~/runs")["name"].tolist() == ["r"]
    answers = run.predict("~/photos", quiet=True)
    assert len(answers) == len(list((tmp_path / "photos").iterdir()))
    assert answers["error"].isna().all()
    ws.read(demo_dir).split(out="~/split")
    assert (tmp_path / "split" / "splits.csv").is_file()
    code, out, err = run_cli("runs", "~/runs")
    assert code == 0 and " r " in out, err
    code, out, err = run_cli("data", "split", str(demo_dir), "--out=~/split2")
    assert code == 0 and (tmp_path / "split2" / "splits.csv").is_file(), err
    assert not list((tmp_path / "here").iterdir())  # no "~" folder here


def test_counts_in_messages_agree_with_their_nouns():
    from wingspan.errors import counted

    assert [counted(1, "class"), counted(2, "class"), counted(3, "image"),
            counted(2, "group holds", "groups hold")] == [
        "1 class", "2 classes", "3 images", "2 groups hold"]


def test_calibrating_a_read_only_run_is_refused_before_the_work(run, tmp_path, monkeypatch):
    """A run folder on a read-only mount: calibrate fitted the whole temperature, then failed
    naming a temporary file ('.manifest.9778.tmp.json'). Now it says so before it starts,
    with and without unknown=True."""
    import errno

    from wingspan.inference import Predictor

    copy = shutil.copytree(run.dir, tmp_path / "ro", ignore=shutil.ignore_patterns("evaluation-*"))
    opened = Path.open

    def read_only_model(path, *args, **kwargs):
        if path.parent == copy / "model" and "w" in (args[0] if args else kwargs.get("mode", "")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", read_only_model)

    def predicted(*args, **kwargs):
        raise AssertionError("no image is to be predicted: the refusal comes first")

    monkeypatch.setattr(Predictor, "run", predicted)
    for unknown in (False, True):
        with pytest.raises(WingspanError, match=r"ro/model cannot be written to \(Read-only "
                                                r"file system\): calibrate") as e:
            ws.load(copy).calibrate(unknown=unknown, workers=0, quiet=True)
        assert "calibrate the copy" in e.value.hint


def test_a_model_written_again_by_resume_says_a_later_calibration_is_lost(run, tmp_path):
    """A damaged model.safetensors: its error's hint says to resume, which writes the model
    again from the checkpoint, as trained. The temperature and unknown answer that
    `calibrate` fitted since went back to training's without a word."""
    from wingspan.models.bundle import read_manifest

    copy = shutil.copytree(run.dir, tmp_path / "r", ignore=shutil.ignore_patterns("evaluation-*"))
    trained = read_manifest(copy / "model")["calibration"]["temperature"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (fitted on train: said optimistic)
        ws.load(copy).calibrate(split="train", workers=0, quiet=True)
    ws.load(copy).calibrate(unknown=True, unknown_rate=0.1, workers=0, quiet=True)
    assert read_manifest(copy / "model")["unknown"]["fitted_by"] == "calibrate"
    weights = copy / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    ws.resume(copy, quiet=True)
    log = " ".join((copy / "train.log").read_text().split())
    assert ("The model was written again from its checkpoint, as trained: the temperature "
            in log and "(fitted on train) and the unknown answer's scores and thresholds, "
            "which `wingspan calibrate` fitted since, are not kept" in log), log[-600:]
    manifest = read_manifest(copy / "model")
    assert manifest["calibration"]["temperature"] == pytest.approx(trained)
    assert "fitted_by" not in manifest["unknown"]


def test_a_runs_files_it_may_not_read_are_said_as_the_cli_says_them(run, monkeypatch):
    """run.metrics and run.history raised a bare PermissionError where the methods raise
    the CLI's words."""
    import errno

    import pandas as pd

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "metrics.json")

    monkeypatch.setattr(Path, "read_text", refused)
    with pytest.raises(WingspanError, match="Permission denied: metrics.json"):
        _ = run.metrics
    monkeypatch.undo()
    monkeypatch.setattr(pd, "read_csv", refused)
    with pytest.raises(WingspanError, match="Permission denied"):
        _ = run.history


def test_an_evaluations_tables_keep_class_names_as_written(tmp_path):
    """ws's Evaluation read its CSVs with pandas' defaults: classes named "NA" or "None"
    became missing, and "01", "1" and "1.0" the one number 1 (rows as floats beside
    columns as text, so that confusion.loc[c, c] failed for every class)."""
    from wingspan.api import Evaluation

    classes = ["01", "1", "1.0", "NA", "None", "nan"]
    n = len(classes)
    pd.DataFrame({"class": classes, "precision": 0.5, "recall": 0.5, "f1": 0.5,
                  "support": 2}).to_csv(tmp_path / "per_class.csv", index=False)
    pd.DataFrame(np.eye(n, dtype=int), index=classes, columns=classes).to_csv(
        tmp_path / "confusion.csv")
    pd.DataFrame({"path": [f"{c}.jpg" for c in classes], "true": classes,
                  "predicted": classes[::-1], "probability": 0.9, "answer": classes,
                  "known_level": ["label"] * (n - 1) + [""], "unknown_score": 0.1,
                  "threshold": 0.2, "score_level": "label",
                  **{f"p:{c}": 1 / n for c in classes}}).to_csv(
        tmp_path / "predictions.csv", index=False)
    ev = Evaluation(tmp_path, {}, tmp_path / "report.html")
    assert ev.per_class["class"].tolist() == classes
    assert ev.confusion.index.tolist() == ev.confusion.columns.tolist() == classes
    assert all(ev.confusion.loc[c, c] == 1 for c in classes)
    assert ev.predictions["true"].tolist() == classes
    assert ev.predictions["predicted"].tolist() == classes[::-1]
    assert ev.predictions["known_level"].isna().tolist() == [False] * (n - 1) + [True]
    assert ev.predictions["probability"].dtype == float
    assert ev.predictions[f"p:{classes[0]}"].dtype == float


def test_a_run_of_nothing_is_refused_with_a_message():
    """Run(None), as its signature allows: a TypeError ("unsupported operand type(s) for /:
    'NoneType' and 'str'")."""
    with pytest.raises(WingspanError, match="needs a run folder or a model bundle"):
        ws.Run(None)


def test_a_run_its_evaluation_and_images_outlive_a_change_of_folder(run, tmp_path,
                                                                    monkeypatch, demo_dir):
    """Run, Evaluation, Image and Inspection kept the paths as given: after a notebook's %cd (or a
    script's os.chdir) a run loaded as "runs/r" said "No model at runs/r", and an
    evaluation that its folder was gone, though nothing had moved."""
    monkeypatch.chdir(tmp_path)
    loaded = ws.load(os.path.relpath(run.dir))
    ev = loaded.evaluate(split="val", out="ev-here", quiet=True, plots=False)
    curves = loaded.plot()
    inspection = ws.read(os.path.relpath(demo_dir)).inspect(out="insp", quiet=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    photo = next(demo_dir.rglob("*.jpg"))
    assert len(loaded.predict([photo])) == 1 and loaded.history is not None
    assert ev.dir == tmp_path / "ev-here" and "<iframe" in ev.report()._repr_html_()
    assert ev.per_class is not None and str(tmp_path) in repr(ev)
    assert curves._repr_png_()  # (None: the PNG not found, Jupyter shows the path instead)
    assert inspection.plot()._repr_png_() and "cannot be read" not in \
        inspection._repr_html_()


def test_messages_a_library_call_meets_name_its_keywords_too(tmp_path, demo_dir):
    """Errors met in Python named only the command line's options and commands (--format,
    `wingspan runs DIR`): each says its keyword or call beside them."""
    (tmp_path / "x.py").write_text("")
    with pytest.raises(ws.WingspanError) as e:
        ws.read(tmp_path / "x.py")
    assert "--format (format= in Python)" in e.value.hint
    with pytest.raises(ws.WingspanError) as e:
        ws.runs(tmp_path / "nope")
    assert 'ws.runs("experiments/runs") in Python' in e.value.hint
    with pytest.raises(ws.WingspanError) as e:
        ws.read(demo_dir).preview(rows=0, out=tmp_path / "p")
    assert "(--rows, rows= in Python)" in str(e.value)
    with pytest.raises(ws.WingspanError) as e:
        ws.train(demo_dir, weights="nosuch", quiet=True, runs_dir=tmp_path / "runs")
    assert "--weights (weights= in Python) takes auto" in e.value.hint
    # A table of paths and labels (fastai's from_df habit): how to give it, on one line.
    table = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["x", "y"]})
    for call in (ws.read, ws.train):
        with pytest.raises(ws.WingspanError) as e:
            call(table)
        assert "got DataFrame path label 0 a.jpg" in str(e.value)
        assert 'df.to_csv("photos.csv", index=False)' in e.value.hint


def test_an_empty_path_is_refused_as_the_command_line_refuses_it(demo_dir, tmp_path,
                                                                 monkeypatch):
    """ws.train(..., runs_dir="") wrote the run into the current folder, which the
    command line refuses ("" is an unset variable's value more often than not)."""
    monkeypatch.chdir(tmp_path)
    for call in (lambda: ws.train(demo_dir, runs_dir="", name="r", quiet=True),
                 lambda: ws.read(" "), lambda: ws.runs("")):
        with pytest.raises(WingspanError, match=r"is empty: give a path \(\"\.\" for the "):
            call()
    assert not list(tmp_path.iterdir())



SCRIPT = """\
import multiprocessing
import wingspan as ws
from wingspan.training import data

multiprocessing.set_start_method("spawn", force=True)  # as on macOS and Windows
data.usable_cores = lambda: 4  # workers whatever this machine's cores
{body}
"""


@pytest.mark.parametrize("guarded", [False, True])
def test_a_script_without_the_main_guard_trains_where_workers_start_by_spawn(
        demo_dir, tmp_path, guarded):
    """macOS and Windows start worker processes by spawn: each imports the main script
    again. A script that called ws.train at its top level (as the quick start shows it)
    had each data worker train again: it failed, after making a second run folder, and
    the run stopped blaming memory. Now such a script reads the images in its own process
    and says why; under the guard, workers are used as before."""
    call = (f"ws.train({str(demo_dir)!r}, backbone='test_efficientnet', weights='none', "
            f"image_size=32, epochs_head=1, epochs_finetune=0, runs_dir={str(tmp_path)!r}, "
            "quiet=True)")
    script = tmp_path / "mine.py"
    script.write_text(SCRIPT.format(body=f"if __name__ == '__main__':\n    {call}" if guarded
                                    else call))
    env = {**os.environ, "WINGSPAN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [p for p in tmp_path.iterdir() if (p / "config.yaml").is_file()]
    assert len(runs) == 1, runs  # not a second run folder made by a worker
    said = " ".join(done.stderr.split())
    if guarded:
        assert "Reading the images in this process" not in said, said
    else:
        assert "Reading the images in this process, not in 3 worker processes" in said \
            and "line 7" in said \
            and 'Put the script\'s calls under `if __name__ == "__main__":`' in said, said


def test_a_resumed_runs_workers_from_an_unguarded_script_are_dropped_not_refused(monkeypatch):
    """A run started with workers=4 and resumed from a script without the main guard, where
    workers start by spawn: the saved setting is the run's, not given now, so it is said and
    the images read in this process; given now, it is refused with the reason."""
    from wingspan.training import data

    monkeypatch.setattr(data, "unguarded_script_line", lambda: 7)
    monkeypatch.setattr(data, "usable_cores", lambda: 4)
    said: list[str] = []
    assert data.resolve_workers(4, log=said.append) == 0
    assert "The run's --workers 4: each worker process would run this script again" in said[0]
    assert "line 7" in said[0] and "if __name__" in said[0]
    with pytest.raises(WingspanError, match="workers=4: each worker process would run this "
                                            "script again") as e:
        data.resolve_workers(4)
    assert "if __name__ == \"__main__\":" in e.value.hint
    assert data.resolve_workers(0) == 0  # (none asked for: nothing to say)


DROPPED_IN_DEL = """
import os, signal, time
{install}

class Finaliser:
    def __del__(self):  # (a DataLoader's, joining its workers, as a stage ends)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs here, where Python drops what it raises
            pass

try:
    with {context}:
        Finaliser()
        print("went on", flush=True)
        time.sleep(20)
        print("still running", flush=True)
except KeyboardInterrupt as e:
    print("stopped by", e, flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("install, context", [
    ("from wingspan.cli.app import _sigterm_as_interrupt\n_sigterm_as_interrupt()",
     "open(os.devnull)"),
    ("from wingspan.training.run import _Terminated", "_Terminated()")])
def test_a_sigterm_that_lands_in_a_finaliser_still_stops_the_command(install, context):
    """A SIGTERM handler's KeyboardInterrupt raised in a __del__ (a loader's), a weakref
    callback (every import's) or an at-fork hook is dropped by Python, "Exception ignored":
    a run went on to its end, into a scheduler's SIGKILL (3 of 117 signals). It is sent
    again, and stops the command as a first SIGTERM does (not as a second, at once)."""
    proc = subprocess.run([sys.executable, "-c", DROPPED_IN_DEL.format(
        install=install, context=context)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.split("\n")[-2] == "stopped by SIGTERM", (proc.stdout, proc.stderr)
    assert "still running" not in proc.stdout and "Exception ignored" not in proc.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_python_m_wingspan_exits_143_when_a_sigterm_stops_code_run_by_exec(tmp_path):
    """A SIGTERM while torch's imports build a namedtuple (exec() of a string) set CPython's
    "unhandled KeyboardInterrupt" flag: under `python -m` (torchrun's and Fabric's way to
    start a process) it then died by SIGINT, 130, for the 143 that says SIGTERM."""
    (tmp_path / "stopped_in_exec.py").write_text(
        "import wingspan.cli, wingspan.console\n"
        "from wingspan.errors import TERMINATED\n\n"
        "def cli():\n"
        "    TERMINATED.set()\n"
        "    exec(\"raise KeyboardInterrupt('SIGTERM')\")\n\n"
        "wingspan.cli.main = cli\n"
        "wingspan.console.main()\n")
    proc = subprocess.run([sys.executable, "-m", "stopped_in_exec"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-2000:])


STOPPED_ANOTHER_WAY = """
import os, signal, time, types
from pathlib import Path
import wingspan.training.run as R
{install}

class Finaliser:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs here, where Python drops what it raises
            pass

def recipe(run):  # the signal dropped, and its data workers dead of it: the run stops so
    Finaliser()
    raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")

logged = []
def log(message, **_):
    time.sleep(0.05)  # (train.log on a slow disk)
    logged.append(message)

run = types.SimpleNamespace(is_main=True, dir=Path("."), log=log, config=None,
                            fabric=types.SimpleNamespace(world_size=1, global_rank=0))
R._recipe = recipe
try:
    R.interruptible(run)
except BaseException as e:
    print("raised", type(e).__name__)
time.sleep(0.2)
print(*(line.split(" (")[0] for line in logged), sep="\\n")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("install", [
    "", "from wingspan.cli.app import _sigterm_as_interrupt\n_sigterm_as_interrupt()"])
def test_a_dropped_sigterm_is_not_sent_again_into_a_stop_under_way(install, tmp_path):
    """A dropped SIGTERM whose run stopped another way at once (its data workers or a peer
    killed by the same signal) was sent again into the stop's handling: train.log lost the
    line that says how to go on, and from Python the default handler, back in place by
    then, killed the process on the spot."""
    proc = subprocess.run([sys.executable, "-c", STOPPED_ANOTHER_WAY.format(install=install)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.split("\n")[:2] == ["raised Interrupted", "Stopped by SIGTERM"], (
        proc.stdout, proc.stderr)


SWALLOWED = """
import os, signal, sys
import wingspan.training.run as R

original = R.train_head

def train_head(run):  # the handler runs, and what it raised is swallowed without a trace
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
    except KeyboardInterrupt:  # (a library's try around an import, say)
        pass
    return original(run)

R.train_head = train_head
sys.argv = ["wingspan", "train", {data!r}, "--backbone", "test_efficientnet", "--weights",
            "none", "--image-size", "32", "--epochs-head", "3", "--epochs-finetune", "1",
            "--workers", "0", "--runs-dir", {runs!r}, "--name", "r"]
from wingspan.console import main
main()
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_sigterm_swallowed_without_a_trace_stops_the_run_at_its_next_epoch(demo_dir,
                                                                             tmp_path):
    """A SIGTERM whose handler ran but whose KeyboardInterrupt something swallowed (once in
    144 signals of a stress test, in start-up imports; not a drop Python reports) let the
    run train to its end. It stops at the next checkpointed epoch's or stage's end (the
    head stage's, on cached features), resumable."""
    proc = subprocess.run([sys.executable, "-c", SWALLOWED.format(
        data=str(demo_dir), runs=str(tmp_path))], capture_output=True, text=True, timeout=300,
        env={**os.environ, "WINGSPAN_CACHE": str(tmp_path / "cache")})
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 143, said[-3000:]
    assert "Stopped by SIGTERM" in said and "wingspan train --resume" in said, said[-3000:]
    history = pd.read_csv(tmp_path / "r" / "history.csv")
    assert set(history["stage"]) == {"head"}, history  # (no fine-tuning epoch)
    assert (tmp_path / "r" / "checkpoints" / "last.pt").is_file()


def test_a_predict_of_a_few_photos_times_no_engine(run, demo_dir, run_cli, monkeypatch,
                                                   tmp_path):
    """With no engine choice stored (a new machine, or a busy one, where no timing is
    kept), a predict of one photo timed every candidate on 64-image batches before its one
    pass (18-32 s for a Lite0 at 224 px on a 2-core Xeon): fewer images than one round of
    the timing run in PyTorch fp32 untimed; more are timed, and the choice kept."""
    monkeypatch.setenv("WINGSPAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WINGSPAN_PRECISION", raising=False)
    monkeypatch.delenv("WINGSPAN_RUNTIME", raising=False)
    photos = sorted(str(p) for p in demo_dir.rglob("*.jpg"))
    code, _, err = run_cli("predict", run.dir, photos[0], "--batch-size", "2", "--workers", "0")
    assert code == 0, err
    assert "frozen passes torch-fp32 (untimed: 1 image, fewer than timing the" in err, err
    assert not (tmp_path / "cache" / "engines.json").exists()
    code, _, err = run_cli("predict", run.dir, demo_dir, "--batch-size", "2", "--workers", "0")
    assert code == 0 and "untimed" not in err and "(measured" in err, err
    assert (tmp_path / "cache" / "engines.json").is_file()
    code, _, err = run_cli("predict", run.dir, photos[0], "--batch-size", "2", "--workers", "0")
    assert code == 0 and "(cached" in err, err  # (what a timing kept, even for one photo)


def test_predict_names_a_skipped_photo_once(run, demo_dir, run_cli, tmp_path):
    """"skipped a.jpg: Cannot read image a.jpg: ..." said the path twice, the second time
    inside the reader's message: once now, then why."""
    broken = tmp_path / "my photos" / "broken one.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"not a jpeg")
    code, _, err = run_cli("predict", run.dir, next(demo_dir.rglob("*.jpg")), broken,
                           "--workers", "0")
    assert code == 0, err
    line = next(x for x in err.splitlines() if x.startswith("skipped"))
    assert line.startswith(f"skipped {broken}: ") and line.count(str(broken)) == 1, line


def test_predicts_lines_in_a_log_say_they_count_batches(run, demo_dir, run_cli,
                                                        monkeypatch):
    """A log's plain progress line read "Predicting: 1 of 2 (50%)" for 3 photos: it
    counts batches, and says so."""
    from wingspan import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    photos = sorted(demo_dir.rglob("*.jpg"))[:3]
    code, _, err = run_cli("predict", run.dir, *photos, "--batch-size", "2", "--workers", "0")
    assert code == 0, err
    assert "Predicting 3 images, batches of 2: 1 of 2 (50%), 0:00" in err, err


def test_an_image_in_memory_is_answered_with_what_to_pass():
    """fastai's learn.predict(img) habit: an image's array was iterated as a list of paths
    ("each must be a path; got ndarray array([[0, 0, 0],"), with no word of what to do."""
    import numpy as np
    from PIL import Image

    from wingspan.api.arguments import _paths_arg

    for value in (np.zeros((32, 32, 3), np.uint8), [np.zeros((32, 32, 3), np.uint8)],
                  [Image.new("RGB", (8, 8))], Image.new("RGB", (8, 8))):
        with pytest.raises(WingspanError, match="paths: ") as e:
            _paths_arg(value)
        assert "save an in-memory image to a file first" in (e.value.hint or ""), value
        assert "\n" not in e.value.message


def test_an_array_of_paths_is_taken_as_a_list_of_them(tmp_path):
    """`frame["path"].to_numpy()` (strings, or objects in pandas 2) names files: only an
    array of pixels is refused as an image in memory."""
    import numpy as np

    from wingspan.api.arguments import _paths_arg

    for value in (np.array(["a.jpg", "b.jpg"]), np.array(["a.jpg", "b.jpg"], dtype=object)):
        assert [str(p) for p in _paths_arg(value)] == ["a.jpg", "b.jpg"]
    with pytest.raises(WingspanError, match="got ndarray"):
        _paths_arg(np.zeros((4, 4, 3), np.uint8))


def test_the_interrupt_a_stopped_run_raises_is_a_name_of_the_library():
    """The README: a run stopped by Ctrl-C raises Interrupted, whose e.run_dir goes to
    ws.resume; a notebook catches it as `except ws.Interrupted as e`, not from the module
    that defines it."""
    import wingspan as ws
    from wingspan.training.run import Interrupted

    assert ws.Interrupted is Interrupted and issubclass(ws.Interrupted, KeyboardInterrupt)
    assert "Interrupted" in dir(ws)
