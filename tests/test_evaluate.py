import base64
import hashlib
import html
import io
import json
import re
import shlex
import shutil
import sys
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score
from test_train import tiny

from wingspan.data import read_dataset
from wingspan.errors import WingspanError
from wingspan.evaluate.calibrate import calibrate
from wingspan.evaluate.calibrate import fit_unknown as calibrate_unknown
from wingspan.evaluate.calibration import MIN_CALIBRATION_IMAGES, calibrate_warnings
from wingspan.evaluate.run import evaluate
from wingspan.evaluate.wording import unreadable_wording
from wingspan.inference import Predictor
from wingspan.models.bundle import read_manifest
from wingspan.predict import predict, write_predictions
from wingspan.training import resume, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data_or_demo):
    """A small run on the Leeds photos (or the demo data without ../shared)."""
    tmp = tmp_path_factory.mktemp("evalrun")
    data, config = shared_data_or_demo
    run_dir = train(read_dataset(data), tiny(tmp, **config), tmp / "runs", "r", quiet=True)
    return run_dir


@pytest.fixture(scope="module")
def shared_data_or_demo(demo_dir):
    from wingspan.config import shared_data_dir

    leeds = shared_data_dir() / "leeds-butterflies"
    if leeds.is_dir():  # the real photos, with their fixed train/val/test split
        return leeds, {"epochs_head": 4, "epochs_finetune": 1, "image_size": 48}
    return demo_dir, {"val_fraction": 0.25, "test_fraction": 0.25}


@pytest.fixture(scope="module")
def evaluation(trained):
    return evaluate(trained, progress=False, workers=0)


@pytest.mark.policy
def test_evaluate_writes_every_output(evaluation, trained):
    out = evaluation.out_dir
    assert out == trained / "evaluation-test"
    for name in ["metrics.json", "per_class.csv", "confusion.csv", "predictions.csv",
                 "confusion.png", "curves.png", "mistakes.png", "reliability.png",
                 "balance.png", "preview.png", "report.html"]:
        assert (out / name).stat().st_size > 100, name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ["accuracy", "top3_accuracy", "macro", "micro", "weighted", "cohen_kappa", "ece",
                "ece_uncalibrated", "temperature", "most_confused", "images_per_second"]:
        assert key in metrics, key
    # Training fitted the temperature on its val split and stored it in the bundle, where
    # evaluate (and predict) read it.
    assert metrics["calibration"]["fitted_on"] == "val"
    manifest = read_manifest(trained / "model")
    assert manifest["calibration"]["temperature"] == pytest.approx(metrics["temperature"])
    assert manifest["calibration"]["val_ece_after"] <= manifest["calibration"]["val_ece_before"]


def test_no_plots_gives_the_same_figures_without_the_pngs(trained, tmp_path, run_cli):
    """--no-plots (plots=False): the same metrics and tables, no PNG, and the report says
    where each figure would have been that it was not drawn."""
    from wingspan.api import Evaluation as ApiEvaluation

    # (both in one engine: the shared fixture's may have been timed otherwise, and bf16
    # moves a figure's last digits, a top-3 answer at a near tie)
    code, _, err = run_cli("evaluate", trained, "--no-plots", "--out", tmp_path / "ev",
                           "--workers", "0", "--precision", "fp32", "--runtime", "torch")
    assert code == 0, err
    assert "Engine: cpu" in err  # as predict says which engine ran
    out = tmp_path / "ev"
    evaluation = evaluate(trained, out=tmp_path / "drawn", progress=False, workers=0,
                          precision="fp32", runtime="torch")
    assert not list(out.glob("*.png")) and list(evaluation.out_dir.glob("*.png"))
    varies = {"images_per_second", "engine"}  # timed afresh each time
    plain = json.loads((evaluation.out_dir / "metrics.json").read_text())
    bare = json.loads((out / "metrics.json").read_text())
    assert {k: v for k, v in bare.items() if k not in varies} == \
        {k: v for k, v in plain.items() if k not in varies}
    for name in ("per_class.csv", "confusion.csv", "predictions.csv"):
        assert (out / name).read_text() == (evaluation.out_dir / name).read_text(), name
    # confusion.csv's corner says which way it reads (it was blank)
    assert (out / "confusion.csv").read_text().startswith("true \\ predicted,")
    page = " ".join((out / "report.html").read_text().split())
    assert "<img" not in page and page.count("not drawn: evaluated with --no-plots") >= 5
    assert page.startswith("<!doctype html><html lang='en'>")  # (read aloud in English)
    with pytest.raises(WingspanError, match="evaluated with plots=False"):
        ApiEvaluation(out, bare, out / "report.html").plot("confusion")
    assert "not drawn" not in evaluation.report.read_text()


def test_evaluate_never_changes_the_model_and_calibrate_does(trained, tmp_path, run_cli):
    import hashlib

    def fingerprint():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((trained / "model").iterdir())}

    def fitted_on_these(split, out):  # the temperature was fitted on the images evaluated
        result = evaluate(trained, split=split, out=tmp_path / out, progress=False, workers=0,
                          plots=False)
        note = "the temperature was fitted on the images being evaluated"
        same = result.metrics["calibration"]["same_data_as_evaluation"]
        assert same == (note in " ".join(result.report.read_text().split()))
        return same

    # The smaller splits throughout (Leeds' val and test: 167 photos each, train 498).
    before = fingerprint()
    assert fitted_on_these("val", "ev") and not fitted_on_these("test", "ev2")  # training's
    assert fingerprint() == before
    old = read_manifest(trained / "model")["calibration"]["temperature"]
    code, out, err = run_cli("calibrate", trained, "--split", "test", "--quiet")
    assert code == 0, err
    new = read_manifest(trained / "model")["calibration"]
    assert f"Temperature {old:.3f} -> {new['temperature']:.3f}" in out
    assert new["fitted_on"] == "test" and new["previous_temperature"] == pytest.approx(old)
    assert fingerprint() != before
    # The unknown answer keeps the temperature its thresholds were set at, and says so
    # when the new one differs.
    assert new["unknown_temperature"] == pytest.approx(old)
    kept = "The unknown answer keeps the temperature its scores and thresholds were fitted at"
    assert (kept in " ".join(out.split())) == (f"{old:.3f}" != f"{new['temperature']:.3f}")
    assert any(kept + " (T 0.300)" in note for note in calibrate_warnings(
        {**new, "temperature": 1.7, "unknown_temperature": 0.3}))
    # Fitted again on the same images: "before" is the ECE at the temperature it replaces,
    # the last one's "after" (also said beside: the ECE without any temperature).
    code, out, err = run_cli("calibrate", trained, "--split", "test", "--quiet")
    again = read_manifest(trained / "model")["calibration"]
    assert again["val_ece_previous"] == pytest.approx(new["val_ece_after"])
    assert again["val_ece_before"] == pytest.approx(new["val_ece_before"])
    assert (f"ECE {new['val_ece_after']:.4f} -> {again['val_ece_after']:.4f} "
            f"({new['val_ece_before']:.4f} without a temperature)") in " ".join(out.split())
    new = again
    assert fitted_on_these("test", "ev3") and not fitted_on_these("val", "ev4")
    # Fitted on other data that holds some of the run's test images (its own folder, say):
    # the run's test split is then among them, though the data's name is another.
    from wingspan.models.bundle import update_manifest

    update_manifest(trained / "model", calibration={
        **new, "fitted_on": f"all of {tmp_path}", "run_images_among": {"train": 9, "test": 2}})
    assert fitted_on_these("test", "ev5") and not fitted_on_these("val", "ev6")
    # ... as calibrate counts them: given other data holding images of every split of the
    # run's (here 5 of each, listed with a split column of their own).
    rows = pd.read_csv(trained / "splits.csv")
    mixed = rows.groupby("split").head(5).assign(split="train")
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    code, _, err = run_cli("calibrate", trained, tmp_path / "mixed.csv", "--split", "all",
                           "--quiet")
    assert code == 0, err
    among = read_manifest(trained / "model")["calibration"]["run_images_among"]
    assert among == {"train": 5, "val": 5, "test": 5}
    assert fitted_on_these("val", "ev7") and fitted_on_these("test", "ev8")
    # ... copies of them too (the data copied elsewhere), as evaluate finds them: none was
    # counted, and the temperature fitted on training images stored without a warning.
    from wingspan.training.folder import trained_on

    root = Path(trained_on(trained))
    for path in rows.groupby("split").head(5)["path"]:
        copy = tmp_path / "copy" / Path(path).relative_to(root)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy)
    code, out, err = run_cli("calibrate", trained, tmp_path / "copy", "--split", "all",
                             "--quiet")
    assert code == 0, err
    among = read_manifest(trained / "model")["calibration"]["run_images_among"]
    assert among == {"train": 5, "val": 5, "test": 5}
    assert "are ones the model was trained on" in " ".join(out.split())
    # Put it back for the other tests of this module.

    update_manifest(trained / "model", calibration={**new, "temperature": old})


def test_calibrate_unknown_records_the_temperature_it_fitted_at(trained, tmp_path, run_cli):
    """After `calibrate` (a new temperature) then `calibrate --unknown` (the scores fitted
    again at it), the bundle's calibration still named the old one as the unknown's."""
    from wingspan.models.bundle import update_manifest

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    calibration = read_manifest(run / "model")["calibration"]
    update_manifest(run / "model", calibration={**calibration, "temperature": 1.7,
                                                "unknown_temperature": 0.3})
    code, _, err = run_cli("calibrate", run, "--unknown", "--quiet")
    assert code == 0, err
    manifest = read_manifest(run / "model")
    assert manifest["calibration"]["unknown_temperature"] == pytest.approx(1.7)
    assert manifest["unknown"]["temperature"] == pytest.approx(1.7)


def test_two_calibrates_of_one_model_at_once_are_refused(trained, tmp_path, run_cli):
    """A `calibrate --unknown` that ended after a `calibrate` begun later wrote back the
    temperature it had read at its start: the new one was lost, both said they were done."""
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = read_manifest(run / "model")["calibration"]["temperature"]
    holding = subprocess.Popen(  # (another calibrate, holding the lock as one does)
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(run / "model" / ".model.calibrate.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holding.stdout.readline().strip() == "held"
        for unknown in ((), ("--unknown",)):
            code, _, err = run_cli("calibrate", run, *unknown, "--quiet")
            assert code == 2 and "Another `wingspan calibrate` is changing" in err, err
        assert read_manifest(run / "model")["calibration"]["temperature"] == before
    finally:
        holding.kill()
        holding.wait()
    for unknown in ((), ("--unknown",)):  # (the lock is let go when each is done)
        code, _, err = run_cli("calibrate", run, *unknown, "--quiet")
        assert code == 0, err


def test_a_run_started_from_another_runs_weights_is_not_fair_on_that_runs_images(demo_dir,
                                                                                tmp_path):
    """A run started from another's checkpoint (--weights, as resume's hint says to do when
    the data changed) splits the data afresh: its test split held images the first run
    trained on, and evaluate called it "never trained or chosen on"."""
    split = {"val_fraction": 0.2, "test_fraction": 0.2, "epochs_finetune": 0}
    first = train(read_dataset(demo_dir), tiny(tmp_path, **split), tmp_path / "runs", "first",
                  quiet=True)
    weights = str(first / "checkpoints" / "last.pt")
    theirs = pd.read_csv(first / "splits.csv")
    seen = set(theirs.loc[theirs["split"] != "test", "path"])
    # Split afresh (another seed, other sides): the first run's images stay out of test
    second = train(read_dataset(demo_dir), tiny(tmp_path, seed=1, weights=weights, **split),
                   tmp_path / "runs", "second", quiet=True)
    assert read_manifest(second / "model")["training"]["started_from"] == str(first.resolve())
    mine = pd.read_csv(second / "splits.csv")
    assert (mine["split"] == "test").sum() and \
        not mine.loc[mine["split"] == "test", "path"].isin(seen).any()
    assert re.search(r"\d+ images that .*first \(whose weights this run starts from\) "
                     r"trained or chose on, or of their groups, went to train, not test: the "
                     r"test split keeps \d+ of the \d+ it was given",
                     (second / "train.log").read_text())
    assert evaluate(second, progress=False, workers=0, plots=False).metrics["fair"].startswith(
        "yes: the test split was never trained or chosen on")
    # Data whose own split puts them in test: not fair, and said why
    given = theirs.assign(split=np.where(theirs["split"] == "train", "test", "train"))
    given.loc[theirs["split"] == "val", "split"] = "val"
    given.to_csv(tmp_path / "given.csv", index=False)
    third = train(read_dataset(tmp_path / "given.csv"), tiny(tmp_path, weights=weights,
                                                             **split),
                  tmp_path / "runs", "third", quiet=True)
    tested = int((given["split"] == "test").sum())
    fair = evaluate(third, progress=False, workers=0, plots=False).metrics["fair"]
    assert fair.startswith(f"no: this run started from the weights of {first.resolve()} "
                           f"(--weights), which was trained or chose its best epoch on "
                           f"{tested} of these {tested} images"), fair


def test_a_class_folder_renamed_since_training_is_no_proof_of_fair_figures(demo_dir,
                                                                           tmp_path):
    """After a class folder was renamed, its images evaluated with --map (34 of 40 the run
    had trained or chosen on) were called "nor a byte-for-byte copy of one, whatever its
    name": the run's own files were gone, so no copy could be looked for, and only the
    first 50 of them were checked for that."""
    data = shutil.copytree(demo_dir, tmp_path / "data")
    run = train(read_dataset(data), tiny(tmp_path, epochs_finetune=0), tmp_path / "runs", "r",
                quiet=True)
    folder = sorted(p for p in data.iterdir() if p.is_dir())[-1]  # (past the first 50 paths)
    folder.rename(data / "renamed")
    (tmp_path / "only").mkdir()
    shutil.copytree(data / "renamed", tmp_path / "only" / "renamed")
    splits = pd.read_csv(run / "splits.csv")
    gone = splits["path"].str.contains(f"/{folder.name}/")
    trained, chosen = ((gone & (splits["split"] == side)).sum() for side in ("train", "val"))
    # The run kept its images' bytes: they are known under their new name
    fair = evaluate(run, tmp_path / "only", class_map={folder.name: "renamed"}, progress=False,
                    workers=0, plots=False).metrics["fair"]
    assert fair.startswith(f"no: the model was trained on {trained} of these {gone.sum()} "
                           f"images and chose its best epoch on {chosen} ({trained + chosen} "
                           "copies of its files in another folder, or moved there)"), fair
    # A run that did not keep them (trained before it did) says what it cannot tell
    (run / "seen-sums.json").unlink()
    fair = evaluate(run, tmp_path / "only", class_map={folder.name: "renamed"}, progress=False,
                    workers=0, plots=False).metrics["fair"]
    assert fair.startswith("yes, as far as can be told") and \
        f"{trained + chosen} of the run's own train and val images are not where its " \
        "splits.csv says" in fair, fair


def test_a_file_of_the_test_split_holding_a_training_images_bytes_is_not_fair(demo_dir,
                                                                             tmp_path):
    """A training photo and a test photo swapped under their names (a re-export that
    renumbered files): evaluate on the run's own test split said "yes: never trained or
    chosen on", of a photo the model had trained on."""
    data = shutil.copytree(demo_dir, tmp_path / "data")
    run = train(read_dataset(data), tiny(tmp_path, epochs_finetune=0, test_fraction=0.2,
                                         val_fraction=0.2), tmp_path / "runs", "r", quiet=True)
    splits = pd.read_csv(run / "splits.csv")
    a = splits.loc[splits["split"] == "train", "path"].iloc[0]
    b = splits.loc[splits["split"] == "test", "path"].iloc[0]
    first, second = Path(a).read_bytes(), Path(b).read_bytes()
    Path(a).write_bytes(second)
    Path(b).write_bytes(first)
    fair = evaluate(run, progress=False, workers=0, plots=False).metrics["fair"]
    tests = int((splits["split"] == "test").sum())
    assert fair.startswith(f"no: the model was trained on 1 of these {tests} images (1 file "
                           "of this split with the bytes of one it trained or chose on: "
                           "changed since)"), fair
    assert "for a fair figure evaluate the run's" not in fair  # (it is the test split)


def test_calibrate_says_what_keeps_the_old_calibration(trained, tmp_path, run_cli):
    """An export carries the temperature and thresholds it was made with, a running server
    those it loaded: calibrate changed the bundle alone, and nothing said the rest had not
    followed (a deployed ONNX model answered otherwise than predict, silently)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code, out, err = run_cli("calibrate", run, "--unknown", "--quiet")
    assert code == 0, err
    said = " ".join(out.split())
    assert ("Note: a `wingspan serve` already running keeps the old unknown scores and "
            "thresholds: restart the server.") in said, said
    (run / "export").mkdir()
    for name in ("model.onnx", "model.onnx.json", "model.int8.onnx", "model.int8.onnx.json"):
        (run / "export" / name).write_text("{}")
    code, out, err = run_cli("calibrate", run, "--quiet")
    assert code == 0, err
    said = " ".join(out.split())
    assert (f"Note: the exports in {run / 'export'} (model.int8.onnx, model.onnx) and a "
            "`wingspan serve` already running keep the old temperature: export again, and "
            "restart the server.") in said, said


def test_calibrate_says_the_images_it_could_not_read(trained, tmp_path, run_cli):
    """A temperature fitted on the readable images of a folder said only 'fitted on 30
    images': the broken ones were left out in silence (evaluate names them)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    rows = pd.read_csv(run / "splits.csv")
    photos = tmp_path / "photos"
    # (12, or as many as the val split holds: the demo's, without ../shared, holds fewer)
    val = rows[rows.split == "val"][["path", "label"]].head(12)
    for i, (path, label) in enumerate(val.itertuples(index=False)):
        (photos / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, photos / label / f"{i}.jpg")
    (photos / label / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    code, said, err = run_cli("calibrate", run, photos, "--quiet")
    assert code == 0, err
    said = " ".join(said.split())
    assert f"fitted on {len(val)} images" in said, said
    assert "1 image could not be read and was left out, " \
           f"e.g. {photos / label / 'broken.jpg'}: Cannot read image" in said, said
    calibration = read_manifest(run / "model")["calibration"]
    assert calibration["unreadable"] == 1
    assert [p for p, _ in calibration["unreadable_examples"]] == [
        str(photos / label / "broken.jpg")]


def test_the_report_says_when_the_rule_of_succession_set_the_temperature(trained, tmp_path):
    from wingspan.evaluate.calibration import calibration_record
    from wingspan.models.bundle import update_manifest

    copy = tmp_path / "run"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("evaluation-*"))
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]])  # three of three right
    record = calibration_record(logits, np.array([0, 1, 0]), "val")
    assert record["method"].startswith("rule of succession")
    update_manifest(copy / "model", calibration=record)
    page = evaluate(copy, split="val", progress=False, workers=0, plots=False).report.read_text()
    assert "set by" in page and "every one of the 3 images it was fitted on was right" in page
    plain = evaluate(trained, split="val", out=tmp_path / "ev", progress=False, workers=0,
                     plots=False)
    cal = plain.metrics["calibration"]
    said = (f"the likelihood of {cal['images']} images" if cal.get("method") == "likelihood"
            else "was right")
    assert said in plain.report.read_text()  # how the temperature was set, either way


def test_numbers_match_scikit_learn_on_the_saved_predictions(evaluation):
    metrics = evaluation.metrics
    saved = pd.read_csv(evaluation.out_dir / "predictions.csv")
    y, p = saved["true"], saved["predicted"]
    assert metrics["images"] == len(saved)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert metrics["macro"]["f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert metrics["micro"]["f1"] == pytest.approx(f1_score(y, p, average="micro"))
    assert metrics["weighted"]["f1"] == pytest.approx(f1_score(y, p, average="weighted"))
    assert metrics["cohen_kappa"] == pytest.approx(cohen_kappa_score(y, p))
    probs = saved.filter(like="p:").to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    per_class = pd.read_csv(evaluation.out_dir / "per_class.csv")
    assert per_class["support"].sum() == len(saved)


def test_the_report_reads_on_a_phone(evaluation):
    """Without a viewport a phone laid the report out 980 px wide (its text a third of its
    size), and the overview's long paths ran off a 375 px window."""
    from helpers import chromium_path
    from playwright.sync_api import sync_playwright

    chromium = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 375, "height": 700}, is_mobile=True,
                                device_scale_factor=2)
        page.goto(evaluation.report.resolve().as_uri())
        widths = page.evaluate("[document.documentElement.clientWidth, "
                               "document.documentElement.scrollWidth]")
        # No word or number broken over two lines in a table: a wide table scrolls instead
        # ("0.0000" read "0.00" over "00", "Where the time went" one character a line; a
        # path or a name may break at its slashes and hyphens: the overview's model,
        # 002-heliconius_charitonius)
        broken = page.evaluate("""[...document.querySelectorAll('.t td, .t th')]
            .filter(c => c.textContent.trim() && !/[\\s/-]/.test(c.textContent.trim()))
            .filter(c => { const r = document.createRange(); r.selectNodeContents(c);
                           return r.getClientRects().length > 1; })
            .map(c => c.textContent)""")
        cells = page.evaluate("document.querySelectorAll('.t td').length")
        browser.close()
    assert widths[0] == 375 and widths[1] <= 375, widths
    assert cells > 50 and broken == [], broken


def test_the_report_passes_an_accessibility_check(evaluation, trained, tmp_path):
    """axe-core against WCAG 2.1 AA in Chromium, on a desktop and a phone: before, the
    tables scrolling on a phone could not be reached from the keyboard in most browsers,
    there was no <main>, and a --no-plots report's notes were grey on white at 2.8:1."""
    from helpers import accessibility_problems, chromium_path
    from playwright.sync_api import sync_playwright

    bare = evaluate(trained, plots=False, progress=False, workers=0,
                    out=tmp_path / "no-plots")
    chromium = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        for report, width in ((evaluation.report, 1280), (evaluation.report, 375),
                              (bare.report, 1280)):
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.goto(report.resolve().as_uri())
            assert accessibility_problems(page) == [], (report, width)
            page.close()
        browser.close()
    assert "class='missing'" in bare.report.read_text()


def test_report_is_self_contained(evaluation):
    page = evaluation.report.read_text()
    sources = re.findall(r"<img[^>]*src='([^']*)'", page)
    assert len(sources) == 6  # balance, preview, curves, confusion, mistakes, reliability
    # each a link to its file beside the report too: on a phone a figure shows at a quarter
    # of its size, and no larger copy could be opened
    figures = re.findall(r"<a href='([^']*)'[^>]*><img", page)
    assert len(figures) == 6 and all(f.endswith(".png") and "/" not in f for f in figures)
    assert all((evaluation.out_dir / f).is_file() for f in figures)
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not available" not in page
    # The data table's header row: the class, then one column per split (no empty one).
    header = re.search(r"<thead>\s*<tr[^>]*>(.*?)</tr>", page, re.S).group(1)
    assert re.findall(r"<th>(.*?)</th>", header)[0] == "class"
    assert "<th>split</th>" not in page and "<th></th>" not in page
    # headers in words, not identifiers (the CSVs keep those)
    assert "<th>share of true</th>" in page and "_images_per_s" not in page
    # The mistakes' captions as a table too (text 9 px high in the figure, none for a
    # screen reader): one row a mistake shown, each an image answered wrong.
    saved = pd.read_csv(evaluation.out_dir / "predictions.csv")
    wrong = {Path(p).name for p in saved.loc[saved["true"] != saved["predicted"], "path"]}
    table = page.split("<summary>The same mistakes as a table</summary>")[1]
    rows = re.findall(r"<tr>\s*<td>(.*?)</td>", table.split("</details>")[0])
    assert len(rows) == min(18, len(wrong)) and set(rows) <= {html.escape(n) for n in wrong}
    assert "95% CI" in page  # how far accuracy and macro-F1 could move on other images
    for heading in ["Data", "Augmentation", "Training curves", "Metrics", "Per class",
                    "Confusion matrix", "Most confident mistakes", "Calibration",
                    "Where the time went"]:
        assert f">{heading}" in page, heading
    # Each stage's row has every kind of work, though stage 2 builds no feature cache.
    assert "NaN" not in page.split(">Where the time went")[1]
    # The files beside it are linked, and are there; the classes to look at come first.
    links = re.findall(r"<a href='([^']*)'>", page)
    assert {"metrics.json", "per_class.csv", "predictions.csv"} <= set(links)
    assert all((evaluation.out_dir / link).is_file() for link in links)
    per_class = page.split(">Per class (lowest F1 first)<")[1].split("</table>")[0]
    shown = re.findall(r"<tr>\s*<td>(.*?)</td>", per_class)
    table = pd.read_csv(evaluation.out_dir / "per_class.csv")
    assert shown == table.sort_values(["f1", "support"], ascending=[True, False],
                                      kind="stable")["class"].tolist()
    # What ran and what was kept, not what was asked: the val figure is called optimistic.
    best = json.loads((evaluation.out_dir.parent / "metrics.json").read_text())["best"]
    assert f"head epoch {best['epoch']}, the best on val" in page or \
        f"fine-tuning epoch {best['epoch']}, the best on val" in page
    assert "optimistic: the epoch was chosen on it" in page
    # The overview leads with this split's figures and their fairness, above the val one
    overview = page.split("</table>")[0]
    m = evaluation.metrics
    assert (overview.index(f"<th>accuracy</th><td>{m['accuracy']:.4f}")
            < overview.index(f"<th>macro precision / recall / F1</th><td>"
                             f"{m['macro']['precision']:.4f}")
            < overview.index("<th>are these figures fair?</th>")
            < overview.index("optimistic: the epoch was chosen on it")), overview


@pytest.mark.policy
def test_predict_agrees_with_evaluate(evaluation, trained):
    saved = pd.read_csv(evaluation.out_dir / "predictions.csv").head(20)
    predictor = Predictor(trained, workers=0)
    result = predict(predictor, saved["path"].tolist(), top_k=1, progress=False)
    assert [r["top"][0][0] for r in result.rows] == saved["predicted"].tolist()
    np.testing.assert_allclose([r["top"][0][1] for r in result.rows], saved["probability"],
                               rtol=1e-4, atol=1e-5)


def test_evaluate_with_tta_scores_what_predict_tta_answers(evaluation, trained, run_cli,
                                                           tmp_path):
    code, stdout, stderr = run_cli("evaluate", "--no-plots",
                                   trained, "--tta", "--out", tmp_path / "tta",
                                   "--quiet")
    assert code == 0, stderr
    assert "test-time augmentation" in stdout and "Engine:" not in stderr  # (--quiet)
    metrics = json.loads((tmp_path / "tta" / "metrics.json").read_text())
    assert metrics["tta"] is True and evaluation.metrics["tta"] is False
    assert "<th>test-time augmentation</th><td>on: each image" in (
        tmp_path / "tta" / "report.html").read_text()
    assert "<th>test-time augmentation</th><td>off</td>" in evaluation.report.read_text()
    tta = pd.read_csv(tmp_path / "tta" / "predictions.csv")
    plain = pd.read_csv(evaluation.out_dir / "predictions.csv")
    assert tta["path"].tolist() == plain["path"].tolist()
    probs = [c for c in tta.columns if c.startswith("p:")]
    assert not np.allclose(tta[probs], plain[probs])  # the views were averaged
    # ... as predict --tta averages them, image by image, with the same answers
    predictor = Predictor(trained, workers=0)
    result = predict(predictor, tta["path"].tolist(), top_k=len(probs), tta=True,
                     progress=False)
    np.testing.assert_allclose([[dict(r["top"])[c[2:]] for c in probs] for r in result.rows],
                               tta[probs], rtol=1e-4, atol=1e-6)
    assert tta["answer"].tolist() == [r["answer"] for r in result.rows]


def test_evaluate_says_how_often_the_answer_names_a_class(evaluation, trained):
    """Beside the forced-choice figures: the share of images the unknown answer gives a
    class, and how often that class is right, as predict answers the same images."""
    answers = evaluation.metrics["answers"]
    saved = pd.read_csv(evaluation.out_dir / "predictions.csv")
    result = predict(Predictor(trained, workers=0), saved["path"].tolist(), top_k=1,
                     progress=False)
    named = np.array([r["answer"] != "unknown" for r in result.rows])
    right = (saved["predicted"] == saved["true"]).to_numpy()
    # predictions.csv holds the same answer and the score that decided it, row by row
    assert saved["answer"].tolist() == [r["answer"] for r in result.rows]
    np.testing.assert_allclose(saved["unknown_score"], [r["unknown_score"] for r in result.rows],
                               rtol=1e-4, atol=1e-5)
    assert ((saved["unknown_score"] > saved["threshold"]) == ~named).all()
    assert saved["score_level"].tolist() == [r["score_level"] for r in result.rows]
    assert answers["named"] == pytest.approx(named.mean())
    assert answers["named_wrongly"] == pytest.approx((named & ~right).mean())
    if named.any():
        assert answers["accuracy_when_named"] == pytest.approx(right[named].mean())
    assert "accuracy when a class is named" in evaluation.report.read_text()
    # ... with the counts it is of (1.0000 on one image named read as a fact)
    assert (answers["images_named"], answers["right_when_named"]) == (
        int(named.sum()), int(right[named].sum()))
    from wingspan.evaluate.wording import answer_rows

    assert dict(answer_rows(answers))["accuracy when a class is named"].endswith(
        f" ({int(right[named].sum())} of {int(named.sum())})") or not named.any()


def test_predict_on_mixed_good_and_broken_files(trained, tmp_path, demo_dir):
    folder = tmp_path / "photos"
    good = sorted(demo_dir.rglob("*.jpg"))[:5]
    for i, p in enumerate(good):
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / ("sub" if i % 2 else "") / p.name)
    (folder / "broken.jpg").write_text("not a jpeg")
    data = good[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    predictor = Predictor(trained, workers=0)
    result = predict(predictor, [str(folder), str(tmp_path / "missing.jpg"),
                                 str(folder / "sub" / "*.jpg")], top_k=2, progress=False)
    assert len(result.rows) == 5  # the folder (recursive); the glob's two files are in it
    nothing = predict(predictor, [str(folder / "broken.jpg")], progress=False)
    assert nothing.images_per_second == 0  # a failure is no image predicted
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in result.failed}
    assert set(reasons) == {"broken.jpg", "truncated.jpg", "missing.jpg"}
    assert "no such file" in reasons["missing.jpg"]
    assert all(len(r["top"]) == 2 and r["top"][0][1] >= r["top"][1][1] for r in result.rows)
    write_predictions(result, tmp_path / "out.csv")
    table = pd.read_csv(tmp_path / "out.csv")
    assert len(table) == 8 and table["error"].notna().sum() == 3
    # In the order given, the input that matched nothing at its place among them, each
    # image where it came among the folder's (sorted), failed or not.
    from wingspan.predict import expand_paths

    in_folder, _ = expand_paths([str(folder)])
    assert table["path"].tolist() == [*in_folder, str(tmp_path / "missing.jpg")]
    write_predictions(result, tmp_path / "out.json")
    payload = json.loads((tmp_path / "out.json").read_text())
    assert len(payload["predictions"]) == 5 and len(payload["failed"]) == 3
    # A file whose name looks like a pattern is that file, not a pattern matching nothing.
    odd = shutil.copy(good[0], folder / "monarch [2] é.jpg")
    assert predict(predictor, [str(odd)], progress=False).rows[0]["path"] == str(odd)
    with pytest.raises(WingspanError, match="top_k must be at least 1"):
        predict(predictor, [str(odd)], top_k=0, progress=False)
    # A glob that matches folders (photos/* over class folders) takes their images.
    from wingspan.predict import expand_paths

    (tmp_path / "empty-folder").mkdir()
    found, missing = expand_paths([str(folder / "s*"), str(tmp_path / "empty-*")])
    assert found == sorted(str(p) for p in (folder / "sub").glob("*.jpg")) and len(found) == 2
    assert missing == [(str(tmp_path / "empty-*"),
                        "the pattern matches only folders without images")]


@pytest.mark.policy
def test_predict_streams_and_tta_averages(trained, demo_dir, monkeypatch):
    import wingspan.inference as inference

    opened = []
    real = inference.open_rgb
    monkeypatch.setattr(inference, "open_rgb", lambda p, **kw: opened.append(p) or real(p, **kw))
    paths = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))[:24]]
    predictor = Predictor(trained, batch_size=4, workers=0)
    stream = predictor.run(paths, progress=False)
    next(stream)
    assert len(opened) == 4  # one batch read, not the whole list
    rest = list(stream)
    assert len(rest) == 23
    tta = list(predictor.run(paths[:4], tta=True, progress=False))
    plain = list(predictor.run(paths[:4], progress=False))
    assert all(np.isclose(t.probs.sum(), 1) for t in tta)
    assert any(not np.allclose(t.probs, p.probs) for t, p in zip(tta, plain, strict=True))


def test_cli_evaluate_and_predict(run_cli, trained, demo_dir, tmp_path):
    code, out, err = run_cli("evaluate", "--no-plots",
                             trained, "--split", "val", "--out", tmp_path / "ev",
                             "--quiet")
    assert code == 0, err
    assert "macro precision / recall / F1" in out and (tmp_path / "ev" / "report.html").is_file()
    image = next(demo_dir.rglob("*.jpg"))
    code, out, err = run_cli("predict", trained, str(image), "--output", tmp_path / "p.json",
                             "--quiet")
    assert code == 0, err
    assert "1 image predicted" in out and (tmp_path / "p.json").is_file()
    code, _, err = run_cli("predict", tmp_path / "nothing-here", str(image))
    assert code == 2 and "No model at" in err


def test_predict_prints_names_as_they_are_and_checks_output_first(run_cli, trained, demo_dir,
                                                                  tmp_path, monkeypatch):
    """Brackets in a file name are not Rich markup (`[male]` vanished, `[/` crashed after
    the predicting); an --output that cannot be written is refused before any of it."""
    import shutil

    image = next(demo_dir.rglob("*.jpg"))
    folder = tmp_path / "trip [spain] d [" / "x"
    folder.mkdir(parents=True)
    for name in ("IMG_1 [male].jpg", "IMG_1 [female].jpg"):
        shutil.copy(image, folder / name)
    (folder / "notes [b].jpg").write_text("no picture")  # the folder holds "[/"
    code, out, err = run_cli("predict", trained, folder, "--output", tmp_path / "p.csv",
                             "--quiet")
    assert code == 0, err
    assert "[male].jpg" in out and "[female].jpg" in out  # (the table may wrap the paths)
    assert "notes [b].jpg" in err and (tmp_path / "p.csv").is_file()

    from wingspan.inference import Predictor
    monkeypatch.setattr(Predictor, "run", lambda *a, **k: pytest.fail("predicted first"))
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder.csv").mkdir()
    for output, message in ((tmp_path / "a-folder.csv", "is a folder"),
                            (tmp_path / "a-file" / "p.csv", "is a file, not a folder")):
        code, _, err = run_cli("predict", trained, image, "--output", output)
        assert code == 2 and message in err, err
    # On Windows, an earlier output open in Excel, which refuses to let it be replaced:
    # found before the predicting, not after it (all of it lost then).
    import builtins

    from wingspan import files

    plain_open = builtins.open

    def excel(file, mode="r", *args, **kwargs):
        if str(file) == str(tmp_path / "p.csv") and mode != "rb":
            raise PermissionError(13, "being used by another process", str(file))
        return plain_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(files, "WINDOWS", True)
    monkeypatch.setattr(builtins, "open", excel)
    code, _, err = run_cli("predict", trained, image, "--output", tmp_path / "p.csv")
    assert code == 2 and "another program may have it open" in " ".join(err.split()), err


def test_a_temperature_that_makes_calibration_worse_is_said(evaluation, capsys):
    """On photos unlike its val images the run's temperature can make ECE worse: said,
    with what to do."""
    from types import SimpleNamespace

    from wingspan.cli.evaluate import print_evaluation

    m = evaluation.metrics
    for ece, said in ((m["ece_uncalibrated"] + 0.2, True), (m["ece_uncalibrated"], False)):
        print_evaluation(SimpleNamespace(metrics={**m, "ece": ece}, report=evaluation.report))
        out = capsys.readouterr().out
        assert ("less calibrated" in out and "wingspan calibrate RUN DATA" in out) == said
    # After --map, the pairs to paste too (calibrate without them found no image to fit).
    print_evaluation(SimpleNamespace(metrics={**m, "ece": m["ece_uncalibrated"] + 0.2,
                                              "class_map": {"a b": "x"}},
                                     report=evaluation.report))
    assert "(with the same --map 'a b=x')" in " ".join(capsys.readouterr().out.split())


def test_preview_image_in_report_comes_from_training_images(trained, evaluation, tmp_path,
                                                           monkeypatch):
    with Image.open(evaluation.out_dir / "preview.png") as im:
        assert im.width > 300
    import wingspan.evaluate.figures as figures_module

    drawn, real = [], figures_module.write_preview
    monkeypatch.setattr(figures_module, "write_preview",
                        lambda data, *a, **k: drawn.append(data) or real(data, *a, **k))
    evaluate(trained, progress=False, workers=0, out=tmp_path / "e")
    assert len(drawn) == 1 and set(drawn[0].table["split"]) == {"train"}
    # Other data's training split: images the model never saw, shown as its augmentation.
    other = pd.read_csv(trained / "splits.csv").groupby("label").head(4)
    other["split"] = ["train", "test"] * (len(other) // 2) + ["test"] * (len(other) % 2)
    other.to_csv(tmp_path / "other.csv", index=False)
    shown = evaluate(trained, tmp_path / "other.csv", split="test", progress=False, workers=0,
                     out=tmp_path / "o")
    assert len(drawn) == 1 and not (shown.out_dir / "preview.png").exists()


def test_the_reports_preview_shows_the_models_own_evaluation_view(trained, tmp_path,
                                                                   monkeypatch):
    """The report's "as evaluated" column resized at AugmentConfig's crop 0.875 with a
    bilinear filter, not at the model's crop (timm's crop_pct) with its bicubic one."""
    import wingspan.data.preview as preview_module
    from wingspan.inference import Predictor

    drawn = []
    monkeypatch.setattr(preview_module, "_draw", lambda picks, clean, augment, *a: drawn.append(
        (clean, augment)) or tmp_path / "nothing.png")
    evaluate(trained, progress=False, workers=0, out=tmp_path / "e", plots=True)
    (clean, augment), = drawn
    own = Predictor(trained, progress=False).views(False)[0]
    assert [repr(t) for t in clean.transforms[:2]] == [repr(t) for t in own.transforms[:2]]
    assert "BICUBIC" in repr(own.transforms[0]) and "BICUBIC" in repr(augment.transforms[0])


def test_evaluate_on_images_none_of_which_can_be_read(trained, tmp_path):

    classes = read_manifest(trained / "model")["classes"]
    finest = classes[list(classes)[-1]]
    for c in finest[:2]:
        (tmp_path / "bad" / c).mkdir(parents=True)
        (tmp_path / "bad" / c / "zero.jpg").write_bytes(b"")
        (tmp_path / "bad" / c / "text.jpg").write_text("no pixels here")
    with pytest.raises(WingspanError, match="None of the 4 images of the 'all' split could"):
        evaluate(trained, tmp_path / "bad", split="all", progress=False, workers=0)
    # The same as unknowns, given as the API gives them (a list): named as folders.
    folders = [str(shutil.copytree(tmp_path / "bad" / c, tmp_path / f"unseen{i}"))
               for i, c in enumerate(finest[:2])]
    with pytest.raises(WingspanError, match=f"None of the 4 images in {folders[0]}, "):
        evaluate(trained, split="val", progress=False, workers=0, unknown=folders)
    (Path(folders[0]) / "text.jpg").unlink()  # one image: said as one
    with pytest.raises(WingspanError, match=f"The only image in {folders[0]} could not be "
                       "read: ") as e:
        evaluate(trained, split="val", progress=False, workers=0, unknown=folders[0])
    assert "e.g." not in str(e.value)


def test_a_killed_evaluation_leaves_the_previous_results_whole(trained, tmp_path, monkeypatch):
    from wingspan.evaluate import run as run_module

    out = tmp_path / "ev"
    evaluate(trained, split="val", out=out, progress=False, workers=0, plots=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    for stop in (KeyboardInterrupt(), OSError(28, "No space left on device")):
        def stopped(*args, stop=stop, **kwargs):
            raise stop  # as if stopped while writing the report, the last step

        monkeypatch.setattr(run_module, "write_evaluation_report", stopped)
        with pytest.raises(type(stop)):
            evaluate(trained, split="val", out=out, progress=False, workers=0, plots=False)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
        # The unfinished one is gone: on a full disk it held space the user needs. (The
        # empty lock file stays, as a run's .lock does: deleting one races a waiting taker.)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".ev.lock", "ev"]
    monkeypatch.undo()
    result = evaluate(trained, split="val", out=out, progress=False, workers=0, plots=False)
    assert result.out_dir == out and result.report == out / "report.html"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ev.lock", "ev"]  # no leftovers


def test_a_second_evaluation_into_the_same_folder_at_once_is_refused(trained, tmp_path):
    """Two at once wrote in one partial folder, each deleting the other's files: the
    folder left lacked its marker, and every later evaluation there was refused."""
    import fcntl

    from wingspan.errors import WingspanError

    out = tmp_path / "ev"
    evaluate(trained, split="val", out=out, progress=False, workers=0, plots=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with open(tmp_path / ".ev.lock", "a") as held:  # as another evaluate holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(WingspanError, match=f"Another `wingspan evaluate` is writing {out} "
                                                "now"):
            evaluate(trained, split="val", out=out, progress=False, workers=0, plots=False)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # left alone
        # Another folder is not held up by it.
        evaluate(trained, split="val", out=tmp_path / "other", progress=False, workers=0,
                 plots=False)
    # Nor by one of this process (a notebook's thread, say): it writes as the other would.
    from wingspan.training.folder import hold_lock, release_lock

    assert hold_lock(tmp_path, ".ev.lock", again=False)
    try:
        with pytest.raises(WingspanError, match="Another `wingspan evaluate` is writing"):
            evaluate(trained, split="val", out=out, progress=False, workers=0, plots=False)
    finally:
        release_lock(tmp_path, ".ev.lock")
    result = evaluate(trained, split="val", out=out, progress=False, workers=0, plots=False)
    assert (result.out_dir / ".wingspan-evaluation").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_an_evaluation_lock_another_user_left_is_taken_not_refused(tmp_path, monkeypatch):
    """A group's run (umask 002) that another member evaluated keeps their
    .evaluation-test.lock (0644): its owner's every `evaluate` stopped with "Permission
    denied" on it. Taken read-only, it still keeps two evaluations apart; a lock that is
    not there in a folder we may not write is still refused. (Simulated: CI runs as root,
    for whom chmod changes nothing.)"""
    import builtins
    import errno
    import fcntl

    from wingspan.training import folder
    from wingspan.training.folder import hold_lock, release_lock

    theirs = tmp_path / ".evaluation-test.lock"
    theirs.touch()

    def not_ours(path, mode="r", *args, **kwargs):
        if "w" in mode and Path(path).parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(folder, "open", not_ours, raising=False)
    assert hold_lock(tmp_path, theirs.name, again=False)
    release_lock(tmp_path, theirs.name)
    with open(theirs) as held:  # another evaluation holds it: refused as before
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not hold_lock(tmp_path, theirs.name, again=False)
    with pytest.raises(PermissionError):
        hold_lock(tmp_path, ".evaluation-val.lock", again=False)
    # NFS locks only a file open to write (EBADF): the permission is the error, not
    # "another evaluation holds it", which would never clear.
    def nfs(handle, how):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", nfs)
    with pytest.raises(PermissionError):
        hold_lock(tmp_path, theirs.name, again=False)


def test_evaluate_never_replaces_a_folder_that_is_not_an_evaluation(trained, tmp_path):
    from wingspan.errors import WingspanError

    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for out in (mine, trained):  # a user's folder; the run folder itself
        with pytest.raises(WingspanError, match="not an evaluation's"):
            evaluate(trained, split="val", out=out, progress=False, workers=0)
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert (trained / "model" / "manifest.json").is_file()
    with pytest.raises(WingspanError, match="is a file; the evaluation writes a folder"):
        evaluate(trained, split="val", out=mine / "thesis.tex", progress=False, workers=0)


def test_a_run_moved_elsewhere_still_evaluates(trained, tmp_path, run_cli):
    moved = tmp_path / "a" / "b" / "c" / "run"
    shutil.copytree(trained, moved)
    # A val photo deleted since training: counted and named, not dropped without a word.
    splits = pd.read_csv(moved / "splits.csv")
    gone = splits.index[splits["split"] == "val"][0]
    splits.loc[gone, "path"] = str(tmp_path / "deleted.jpg")
    splits.to_csv(moved / "splits.csv", index=False)
    result = evaluate(moved, split="val", progress=False, workers=0, plots=False)
    assert result.out_dir == moved / "evaluation-val" and result.metrics["images"] > 0
    assert [p for p, _ in result.metrics["unreadable"]] == [str(tmp_path / "deleted.jpg")]
    said = unreadable_wording(result.metrics)
    assert said.startswith(f"1 image of the {(splits['split'] == 'val').sum()} could not be "
                           "read and was left out of these figures, e.g. ")
    code, _, err = run_cli("predict", moved, str(tmp_path), "--output", tmp_path / "p.txt")
    assert code == 2 and "must end in .csv, .json or .html." in " ".join(err.split())


def test_the_mistakes_gallery_shows_where_the_model_looked(trained, demo_dir):
    from wingspan.evaluate.figures import _grad_cam_view

    predictor = Predictor(trained, workers=0)
    image = str(next(demo_dir.rglob("*.jpg")))
    view = _grad_cam_view(predictor, image, target=0)
    size = predictor.size
    assert view["pixels"].shape == (size, size, 3) and view["heatmap"].shape == (size, size)
    assert 0 <= view["heatmap"].min() <= view["heatmap"].max() <= 1
    assert _grad_cam_view(predictor, "/nowhere.jpg", target=0) == {}  # plain image instead


def test_evaluate_other_data_with_a_class_map_shows_the_drop_per_class(trained, tmp_path,
                                                                        run_cli, evaluation,
                                                                        monkeypatch):
    """Another dataset naming the classes differently: its folders hold the run's own test
    images, two classes renamed and mapped, one renamed and not mapped, the rest as they
    were. Same images, so each mapped class's recall here is its recall on its own data."""
    own = read_dataset(trained / "splits.csv").table
    test = own[own["split"] == "test"]
    classes = sorted(test["label"].unique())
    renamed = {classes[0]: "first_other", classes[1]: "second_[b]", classes[2]: "stranger"}
    for label, path in zip(test["label"], test["path"], strict=True):
        folder = tmp_path / "other" / renamed.get(label, label)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / f"{len(list(folder.iterdir()))}{Path(path).suffix}")
    from wingspan.cli import common as cli

    monkeypatch.setattr(cli.out, "_width", 200)  # the transfer table's names on one line
    code, stdout, stderr = run_cli(
        "evaluate", trained, tmp_path / "other", "--split", "all", "--out", tmp_path / "ev",
        "--map", f"{classes[0]}=first_other", "--map", f"{classes[1]}=second_[b]",
        "--quiet")
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["unknown_classes"] == ["stranger"]
    assert metrics["images"] == int((test["label"] != classes[2]).sum())
    transfer = pd.read_csv(tmp_path / "ev" / "transfer.csv")
    assert transfer["data class"].tolist()[:2] == ["first_other", "second_[b]"]
    # and the classes matched by name (a map of two showed the drop of two classes of all)
    assert sorted(transfer["model class"][2:]) == sorted(set(test["label"]) - set(classes[:3]))
    assert (transfer["model class"][2:] == transfer["data class"][2:]).all()
    assert np.allclose(transfer["recall here"], transfer["recall on own data"])
    assert np.allclose(transfer["drop"], 0)
    assert list(transfer.columns) == ["model class", "data class", "recall on own data",
                                      "recall here", "drop", "images here", "named here"]
    # The model has unknown scores: per class, the share of its images the answer names.
    predictor = Predictor(trained, workers=0)
    for theirs, share in zip(transfer["data class"], transfer["named here"], strict=True):
        rows = predict(predictor, [str(p) for p in (tmp_path / "other" / theirs).iterdir()],
                       top_k=1, progress=False).rows
        assert share == pytest.approx(np.mean([r["answer"] != "unknown" for r in rows]))
    per_class = pd.read_csv(tmp_path / "ev" / "per_class.csv").set_index("class")
    assert transfer["recall here"].tolist() == per_class.loc[transfer["model class"],
                                                             "recall"].tolist()
    # Macro averages cover the classes this data holds, not every class of the model, and
    # so does the per-class table: the model's class without images here ('stranger' is
    # not mapped to it) is left out of both and named, not listed with an F1 of 0.
    model_classes = read_manifest(trained / "model")["classes"]["label"]
    assert sorted(per_class.index) == sorted(set(model_classes) - {classes[2]})
    assert (per_class["support"] > 0).all()
    assert metrics["absent_classes"] == [classes[2]]
    assert metrics["macro"]["recall"] == pytest.approx(per_class["recall"].mean())
    assert metrics["macro"]["f1"] == pytest.approx(per_class["f1"].mean())
    assert "without images here (left out of the per-class table and the macro averages)" \
           f"</th><td>1: {classes[2]}</td>" in (tmp_path / "ev" / "report.html").read_text()
    assert "left out of the per-class table and the macro averages" in " ".join(stdout.split())
    # Micro counts every prediction, into any of the model's classes: it is the accuracy.
    assert metrics["micro"]["f1"] == pytest.approx(metrics["accuracy"])
    assert "Transfer per class" in stdout and "second_[b]" in stdout  # not Rich markup
    # Without --out, other data's evaluation is named after it, beside the run's own.
    before = (trained / "evaluation-test" / "metrics.json").read_bytes()
    assert run_cli("evaluate", "--no-plots",
                   trained, tmp_path / "other", "--split", "all", "--quiet")[0] == 0
    assert (trained / "evaluation-other-all" / "metrics.json").is_file()
    assert (trained / "evaluation-test" / "metrics.json").read_bytes() == before
    # Unmapped, the classes named alike match, and the macro averages cover those alone
    # (the same rule as with --map); the images of the rest are counted, not just named.
    plain = json.loads((trained / "evaluation-other-all" / "metrics.json").read_text())
    held = pd.read_csv(trained / "evaluation-other-all" / "per_class.csv")
    assert sorted(held["class"]) == classes[3:] and (held["support"] > 0).all()
    assert plain["absent_classes"] == sorted(set(model_classes) - set(classes[3:]))
    # The images answered with those classes are counted: wrong, in no class's precision.
    answered = pd.read_csv(trained / "evaluation-other-all" / "predictions.csv")["predicted"]
    assert plain["answered_absent"] == int(answered.isin(plain["absent_classes"]).sum())
    assert plain["macro"]["f1"] == pytest.approx(held["f1"].mean())
    assert plain["unknown_class_images"] == int(test["label"].isin(classes[:3]).sum())
    assert f"{plain['unknown_class_images']} images of 3 classes: first_other" in (
        trained / "evaluation-other-all" / "report.html").read_text()
    # calibrate on photos without a split fits on all of them.
    shutil.copytree(trained, tmp_path / "copy")
    if plain["images"] >= MIN_CALIBRATION_IMAGES:  # the Leeds photos (the demo's are few)
        fitted = calibrate(tmp_path / "copy", tmp_path / "other", progress=False, workers=0)
        assert fitted["images"] == plain["images"]
    # A split the data does not have is named, with those it has.
    code, _, err = run_cli("evaluate", trained, "--split", "validation")
    assert code == 2 and "no 'validation' split" in err and "It has: test, train, val" in err
    # --out . : the folder it is run in (an empty one).
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    code, _, err = run_cli("evaluate", trained, "--split", "test", "--out", ".", "--quiet")
    assert code == 0, err
    assert (tmp_path / "here" / "metrics.json").is_file()
    assert "Transfer: recall per class" in (tmp_path / "ev" / "report.html").read_text()

    code, _, stderr = run_cli("evaluate", "--no-plots",
                              trained, tmp_path / "other", "--split", "all",
                              "--out", tmp_path / "ev2", "--map", "unicorn=first_other,"
                              f"{classes[0]}=pegasus")
    assert code != 0
    assert "does not know (unicorn)" in stderr and "level 'label' (pegasus)" in stderr
    code, _, stderr = run_cli("evaluate", trained, tmp_path / "other", "--map", "oops")
    assert code != 0 and "expected NAME=NAME" in stderr
    # A data class that already matches a model class by name is not joined by another.
    code, _, stderr = run_cli("evaluate", trained, "--map", f"{classes[0]}={classes[1]}")
    assert code != 0 and (f"would score the data's '{classes[1]}' and its own '{classes[0]}' "
                          f"both as the model's '{classes[0]}'") in " ".join(stderr.split())
    code, _, stderr = run_cli("evaluate", "--no-plots", trained, tmp_path / "other", "--map",
                              f"{classes[0]}=first_other", "--map", f"{classes[0]}=second_other")
    assert code != 0 and f"gives {classes[0]} twice" in stderr


def test_adapt_writes_a_new_run_and_leaves_the_run_as_it_was(trained, tmp_path, run_cli,
                                                              monkeypatch):
    import hashlib

    from safetensors.torch import load_file

    def fingerprint(run):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((run / "model").iterdir())}

    before = fingerprint(trained)
    splits = pd.read_csv(trained / "splits.csv")
    # Unlabelled: copies of test images, and a broken file, in a folder named on macOS
    # ('é' in two characters, NFD: the run's keys are in NFC).
    photos = tmp_path / unicodedata.normalize("NFD", "photos_é")
    photos.mkdir()
    shown = splits[splits.split != "train"]  # every class in turn
    shown = shown.assign(turn=shown.groupby("label").cumcount()).sort_values(["turn", "label"])
    # The test's model is near chance, so the head and label spreading agree on few photos
    # (about 1 in 5): 60 of them keep some agreed on whatever the machine's numerics.
    shown = shown.path.head(60)  # fewer on the demo data, when ../shared is not there
    for i, path in enumerate(shown):
        shutil.copy(path, photos / f"{i}{Path(path).suffix}")
    n = len(shown)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic")  # skipped, not fatal
    out = tmp_path / "adapted"
    (out / "model").mkdir(parents=True)  # an earlier adapted run is replaced
    (out / "model" / "manifest.json").write_text('{"training": {"adapted": {}}}')
    (out / "adapt.json").write_text("{}")
    code, stdout, err = run_cli("adapt", trained, photos, "--out", out, "--quiet")
    assert code == 0, err
    assert not list(tmp_path.glob(".*partial"))
    assert f"{n + 2} photos (2 unreadable)" in stdout
    # which, and why (the reader's message without the path said again)
    assert f"skipped {photos / 'broken.jpg'}: " in err and "Cannot read image" not in err, err
    assert f"skipped {photos / 'phone.heic'}: a HEIC photo" in " ".join(err.split())
    assert "Replaced the earlier adapted run" in stdout
    assert fingerprint(trained) == before
    summary = json.loads((out / "adapt.json").read_text())
    assert summary["photos"] == n + 2 and summary["unreadable"] == 2
    assert summary["adapted_from"] == str(trained.resolve())
    assert summary["neighbours"] == 7 and summary["rounds"] == 1
    used = list(summary["photos_used_per_round"].values())[-1]
    assert len(used) == 1 and 0 < used[0] <= n  # those the head and neighbours agree on
    assert f"trained on {used[0]} of them;" in stdout
    assert summary["training_images"] > 0 and not summary["classes_without_training_images"]
    # The copies are of val and test images, at other paths: counted as theirs (by their
    # bytes), as evaluate counts them after
    counts = splits[splits.path.isin(shown)].split.value_counts()
    assert (summary["val_images_among_photos"], summary["test_images_among_photos"]) == (
        counts.get("val", 0), counts.get("test", 0))
    assert sum(summary["classes_after"].values()) == n
    # The head changed (and the unknown scores, fitted again); the backbone did not.
    old, new = (load_file(r / "model" / "model.safetensors") for r in (trained, out))
    assert old.keys() == new.keys()
    for name in old:
        same = np.array_equal(old[name].numpy(), new[name].numpy())
        if name.startswith("head.outputs"):
            assert not same, name
        elif not name.startswith("unknown."):
            assert same, name
    manifest = read_manifest(out / "model")
    assert manifest["classes"] == read_manifest(trained / "model")["classes"]
    assert manifest["training"]["adapted"]["photos"] == n + 2
    assert manifest["unknown"]["fitted_on"]
    assert (out / "splits.csv").read_bytes() == (trained / "splits.csv").read_bytes()
    assert not (out / "metrics.json").exists()  # the run's figures are not the adapted one's
    # The adapted run is a run: it evaluates and predicts.
    result = evaluate(out, split="val", progress=False, workers=0, plots=False)
    assert result.metrics["accuracy"] == pytest.approx(summary["val_accuracy"])
    # The server says so too.
    from fastapi.testclient import TestClient

    from wingspan.serve import ServeLimits, create_app

    with TestClient(create_app(out, ServeLimits(), device="cpu")) as client:
        adapted = client.get("/model").json()["adapted"]
    # (the run it came from by name, as the server's title names it: not where it lies)
    assert adapted["adapted_from"] == trained.name and adapted["photos"] == n + 2
    # Its report says it was adapted, and whose curves and epochs it shows.
    page = " ".join((result.out_dir / "report.html").read_text().split())
    assert f"from {trained.resolve()} on {n + 2} unlabelled photos: its backbone, the " \
           "training epochs and the training curves below are that run&#x27;s" in page, page
    preds = list(Predictor(out, workers=0).run([str(p) for p in photos.iterdir()],
                                               progress=False))
    assert sum(p.error != "" for p in preds) == 2  # (the broken one and the HEIC)
    with pytest.raises(WingspanError, match="written by `wingspan adapt`"):
        resume(out)  # it has no training of its own (it would start one from nothing)
    # Adapted again on some photos: the first ones shaped it too (its head labelled these),
    # so an evaluation on them is no fairer than on the adapted run's.
    some_photos = sorted(photos.glob("[0-4].*"))
    code, _, err = run_cli("adapt", out, *some_photos, "--out", tmp_path / "again", "--quiet")
    assert code == 0, err
    listed = pd.read_csv(tmp_path / "again" / "adapt-photos.csv")["path"].tolist()
    assert sorted(listed) == sorted(pd.read_csv(out / "adapt-photos.csv")["path"])
    # ... and its report says so, not "on 5 photos" of the head the first ones shaped
    first = len(pd.read_csv(out / "adapt-photos.csv"))  # (these 5 among them: not twice)
    again = evaluate(tmp_path / "again", split="test", progress=False, workers=0, plots=False,
                     out=tmp_path / "ev-again").report.read_text()
    assert f"on {len(some_photos)} unlabelled photos (and {first - len(some_photos)} more " \
           "that one was adapted on)" in again
    # Each readable photo's size and sha256 are kept (evaluate finds its copies by them).
    kept = pd.read_csv(out / "adapt-photos.csv", dtype=str).fillna("")
    assert (kept["sha256"] != "").sum() == n and (kept["bytes"] != "").sum() == n
    # A probability no photo reaches: nothing to learn from, and the head stays as trained
    # (a head refitted on the run's own images alone would lose what training gave it).
    # Its folder is said as given, relative, and `[b]` is no Rich markup (bold).
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli("adapt", trained, photos, "--out", "runs/a[b]",
                                "--confidence", "0.999999", "--quiet")
    assert code == 0, err
    assert "No photo's class was agreed on" in stdout and "the head stays as trained" in stdout
    assert "Adapted run: runs/a[b] " in stdout, stdout
    summary = json.loads((tmp_path / "runs" / "a[b]" / "adapt.json").read_text())
    assert list(summary["photos_used_per_round"].values())[-1] == [0]
    assert summary["changed"] == 0.0
    unsure = load_file(tmp_path / "runs" / "a[b]" / "model" / "model.safetensors")
    for name in old:
        if not name.startswith("unknown."):
            assert np.array_equal(old[name].numpy(), unsure[name].numpy()), name


def test_a_wrong_map_hint_names_some_classes_and_counts_the_rest(tmp_path):
    """With many classes the --map hint names ten of each side and counts the others,
    rather than every class the model knows and 30 of the data's."""
    from types import SimpleNamespace

    from helpers import folder_dataset

    from wingspan.evaluate.transfer import check_class_map

    names = [f"c{i:02d}" for i in range(40)]
    dataset = read_dataset(folder_dataset(tmp_path / "d", dict.fromkeys(names, 1), (8, 8)))
    model = SimpleNamespace(classes=[f"m{i:02d}" for i in range(40)], rare=[], level="label",
                            taxonomy=None)
    with pytest.raises(WingspanError, match="does not know") as e:
        check_class_map({"unicorn": "c00"}, model, dataset, "label")
    assert e.value.hint == ("Write --map MODEL_CLASS=DATA_CLASS (in Python: class_map="
                            "{model class: data class}). The model knows: "
                            f"{', '.join(model.classes[:10])} and 30 more; the data has: "
                            f"{', '.join(names[:10])} and 30 more.")
    # The likely slips: the sides swapped, a name in another case.
    with pytest.raises(WingspanError, match="does not know") as e:
        check_class_map({"c03": "m07"}, model, dataset, "label")
    assert e.value.hint.startswith("The sides look swapped: the model's class comes first.")
    with pytest.raises(WingspanError, match="does not know") as e:
        check_class_map({"M07": "c03"}, model, dataset, "label")
    assert e.value.hint.startswith("Did you mean 'm07' for 'M07' (names differ in case)?")
    # A typo in a name (a letter left out): the nearest name of its side, as a mistyped
    # run folder is told (the hint listed every class, to be searched by eye).
    species = ["azure_spotwing", "eyed_scallop", "red_banded"]
    data = read_dataset(folder_dataset(tmp_path / "b", dict.fromkeys(species, 1), (8, 8)))
    three = SimpleNamespace(classes=species, rare=[], level="label", taxonomy=None)
    with pytest.raises(WingspanError, match="does not know") as e:
        check_class_map({"azure_spotwng": "azure_spotwing"}, three, data, "label")
    assert e.value.hint.startswith("Did you mean 'azure_spotwing' for 'azure_spotwng'?"), \
        e.value.hint
    with pytest.raises(WingspanError, match="does not have") as e:
        check_class_map({"red_banded": "red_bandd"}, three, data, "label")
    assert e.value.hint.startswith("Did you mean 'red_banded' for 'red_bandd'?"), e.value.hint
    # One data class given to two model classes: both named.
    with pytest.raises(WingspanError, match="--map \\(class_map= in Python\\) gives the data "
                       "class 'c05' to 2 of the model's classes \\(m01, m02\\)") as e:
        check_class_map({"m01": "c05", "m02": "c05"}, model, dataset, "label")
    assert e.value.hint == "Map each data class to one model class."


def test_adapt_refuses_what_it_cannot_do(trained, tmp_path):
    from wingspan.training.adapt import adapt

    with pytest.raises(WingspanError, match="no such file"):
        adapt(trained, [str(tmp_path / "nowhere")], tmp_path / "a", progress=False)
    for holding_the_run in (trained, trained.parent):
        with pytest.raises(WingspanError, match="holds the run itself"):
            adapt(trained, [str(tmp_path)], holding_the_run, progress=False)
    with pytest.raises(WingspanError, match="is inside the run"):
        adapt(trained, [str(tmp_path)], trained / "sub", progress=False)
    assert not (trained / "sub").exists()
    (tmp_path / "only-a-folder" / "sub").mkdir(parents=True)
    with pytest.raises(WingspanError, match="the pattern matches only folders without images"):
        adapt(trained, [str(tmp_path / "only-a-folder" / "*")], tmp_path / "d", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(WingspanError, match="The only photo could not be read: "):
        adapt(trained, [str(broken)], tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    other = tmp_path / "other-run"  # a folder that is not an earlier adapted run
    (other / "model").mkdir(parents=True)
    (other / "adapt.json").write_text("{}")  # not enough: its model must say it was adapted
    with pytest.raises(WingspanError, match="overwritten"):
        adapt(trained, [str(tmp_path)], other, progress=False)
    import wingspan as ws

    with pytest.raises(WingspanError, match="Did you mean 'rounds'"):
        ws.load(trained).adapt(tmp_path, roundz=2)
    bundle = shutil.copytree(trained / "model", tmp_path / "bundle")  # no run around it
    with pytest.raises(WingspanError, match="bundle is not inside a run folder"):
        adapt(bundle, [str(tmp_path)], tmp_path / "b", progress=False)
    # A head with a hidden layer: adapt refits linear heads only.
    from wingspan.models import create_classifier, save_bundle

    manifest = read_manifest(trained / "model")
    deep, _ = create_classifier("resnet18", {lv: len(c) for lv, c in manifest["classes"].items()},
                                weights="none", hidden=16)
    (tmp_path / "deep").mkdir()
    shutil.copy(trained / "splits.csv", tmp_path / "deep")
    save_bundle(deep.eval(), tmp_path / "deep" / "model", manifest["classes"])
    with pytest.raises(WingspanError, match="hidden layer"):
        adapt(tmp_path / "deep", [str(tmp_path)], tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists()


def test_adapt_says_a_temperature_fitted_on_other_photos_is_not_carried_over(
        trained, tmp_path, run_cli):
    """A temperature calibrate fitted on the user's own photos was dropped by adapt for
    one fitted on val without a word (its calibrated unknown setting was kept)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("evaluation-*"))
    splits = pd.read_csv(run / "splits.csv")
    code, _, err = run_cli("calibrate", run, "--split", "test", "--quiet")
    assert code == 0, err
    photos = splits[splits.split == "train"].path.head(6).tolist()
    code, said, err = run_cli("adapt", run, *photos, "--out", tmp_path / "a", "--quiet")
    assert code == 0, err
    said = " ".join(said.split())
    fitted = read_manifest(run / "model")["calibration"]
    assert (f"The run's temperature {fitted['temperature']:.3f}, fitted on "
            f"{fitted['fitted_on']}, is for its head as it was") in said, said
    assert f"wingspan calibrate {tmp_path / 'a'} DATA" in said
    # Fitted on val (a copy: other tests calibrate `trained` in place): nothing to say.
    code, _, err = run_cli("calibrate", run, "--quiet")
    assert code == 0, err
    code, said, err = run_cli("adapt", run, *photos, "--out", tmp_path / "b", "--quiet")
    assert code == 0 and "is for its head as it was" not in said, said


def test_adapt_says_nothing_of_val_images_it_did_not_train_on(trained, tmp_path, run_cli):
    """With no photo agreed on, the head stays as trained: it was said to have trained on
    the run's own val and test images given as photos, and their figures to be unfair."""
    splits = pd.read_csv(trained / "splits.csv")
    val = splits[splits.split == "val"].path.head(5).tolist()
    test = splits[splits.split == "test"].path.head(3).tolist()
    code, stdout, err = run_cli("adapt", trained, *val, *test, "--out", tmp_path / "a",
                                "--confidence", "0.9999", "--quiet")
    assert code == 0, err
    stdout = " ".join(stdout.split())
    assert "No photo's class was agreed on" in stdout
    assert "own val images (or " not in stdout  # (the warning, of one photo or more)
    assert "own test images (or " not in stdout
    summary = json.loads((tmp_path / "a" / "adapt.json").read_text())
    assert summary["val_images_among_photos"] == 5  # (the count stays in adapt.json)
    # ... nor does evaluate call its test figures unfair for photos it never refitted on
    fair = evaluate(tmp_path / "a", split="test", progress=False, workers=0, plots=False,
                    out=tmp_path / "ev").metrics["fair"]
    assert fair.startswith("yes"), fair


def test_adapt_warns_when_the_photos_are_the_runs_own_val_images(trained, tmp_path, run_cli,
                                                                 shared_data_or_demo):
    splits = pd.read_csv(trained / "splits.csv")
    val = splits[splits.split == "val"].path.head(5).tolist()
    test = splits[splits.split == "test"].path.head(3).tolist()
    # ... among training images, so that the head finds photos to refit on (said only then);
    # not copies of the run's or the data's own val or test images (Leeds has a few)
    data = shared_data_or_demo[0]
    own = pd.read_csv(data / "splits.csv") if (data / "splits.csv").is_file() else splits
    held_out = {hashlib.sha256((data / p if not Path(p).is_absolute() else Path(p))
                               .read_bytes()).digest()
                for table in (splits, own) for p in table[table.split != "train"].path}
    among_train = [p for p in splits[splits.split == "train"].path[1:]  # (the first: below)
                   if hashlib.sha256(Path(p).read_bytes()).digest() not in held_out][:40]
    # one test image as a copy under another name: counted too (evaluate finds it so)
    copied = Path(shutil.copy(test[2], tmp_path / f"IMG_0001{Path(test[2]).suffix}"))
    code, stdout, err = run_cli("adapt", trained, *val, *test[:2], copied, *among_train,
                                "--out", tmp_path / "a", "--quiet")
    assert code == 0, err
    stdout = " ".join(stdout.split())
    assert "trained on 0 of them" not in stdout, stdout
    assert "5 of the photos are the run's own val images (or copies of them)" in stdout
    assert "3 of the photos are the run's own test images (or copies of them)" in stdout
    summary = json.loads((tmp_path / "a" / "adapt.json").read_text())
    assert (summary["val_images_among_photos"], summary["test_images_among_photos"]) == (5, 3)
    # Its test figures are then not called fair, nor those of any data holding the photos
    # (here the run's own data given as other data: its test split was "fair" before).
    given = 8 + len(among_train)
    assert pd.read_csv(tmp_path / "a" / "adapt-photos.csv")["path"].size == given
    for data in (None, shared_data_or_demo[0]):
        split = "test" if data is None or (data / "splits.csv").is_file() else "all"  # demo
        fair = evaluate(tmp_path / "a", data, split=split, progress=False, workers=0,
                        plots=False, out=tmp_path / f"ev-{data is None}").metrics["fair"]
        among = 3 if split == "test" else given  # (all of the demo's images: val's too)
        assert fair.startswith(f"no: `wingspan adapt` refitted this model on {among} of these "
                               ), fair
    # Sorted into class folders by hand to label them (copies, under other names), beside
    # a photo adapt never saw: still optimistic (they were called fair).
    labelled = tmp_path / "labelled"
    rows = splits[splits.path.isin(test + splits[splits.split == "train"].path.head(1).tolist())]
    for i, (path, label) in enumerate(zip(rows.path, rows.label, strict=True)):
        (labelled / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, labelled / label / f"sorted-{i}{Path(path).suffix}")
    fair = evaluate(tmp_path / "a", labelled, split="all", progress=False, workers=0,
                    plots=False, out=tmp_path / "ev-labelled").metrics["fair"]
    assert fair.startswith("no: `wingspan adapt` refitted this model on 3 of these 4 images "
                           "(as unlabelled photos; 3 of them as copies in another place)"), fair
    # A temperature fitted on the adapted run's val split, 5 of whose images it adapted on:
    # warned of, as one fitted on training images is.
    code, said, err = run_cli("calibrate", tmp_path / "a", "--quiet")
    assert code == 0, err
    said = " ".join(said.split())
    assert "Warning: 5 of the " in said and " images the temperature was fitted on are photos " \
           "`wingspan adapt` (run.adapt in Python) refitted this model's head on" in said, said


def test_unknown_images_may_sit_under_a_known_genus_but_not_a_known_species(tmp_path):
    """An unseen species filed under its (known) family is what --unknown is for; a folder
    named after a species the model knows is refused."""
    from types import SimpleNamespace

    from helpers import write_image

    from wingspan.evaluate.unseen import check_unseen

    model = SimpleNamespace(classes=["monarch", "admiral"], manifest={"classes": {
        "family": ["Nymphalidae"], "label": ["monarch", "admiral"]}})
    check_unseen([str(tmp_path / "Nymphalidae" / "x.jpg")], [], model)
    with pytest.raises(WingspanError, match="classes the model knows: monarch"):
        check_unseen([str(tmp_path / "monarch" / "x.jpg")], [], model)
    with pytest.raises(WingspanError, match="also among the images of known classes"):
        check_unseen([str(tmp_path / "new" / "x.jpg")], [str(tmp_path / "new" / "x.jpg")],
                      model)
    # ... in another case, or copied (the same bytes) under any name: refused too.
    with pytest.raises(WingspanError, match="classes the model knows: monarch"):
        check_unseen([str(tmp_path / "Monarch" / "x.jpg")], [], model)
    for name, seed in (("test.jpg", 0), ("copy.jpg", 0), ("other.jpg", 1)):
        write_image(tmp_path / name, seed=seed)
    check_unseen([str(tmp_path / "other.jpg")], [str(tmp_path / "test.jpg")], model)
    with pytest.raises(WingspanError, match=r"1 of the --unknown images \(unknown= in Python\) "
                       r"is a copy \(the same bytes\) of images of known classes evaluated"):
        check_unseen([str(tmp_path / "copy.jpg"), str(tmp_path / "other.jpg")],
                      [str(tmp_path / "test.jpg")], model)
    # A folder named as the class reads (macOS's decomposed é, an end space) is that class.
    model.classes = ["Pieris napi (Linn\u00e9)"]
    with pytest.raises(WingspanError, match="classes the model knows: Pieris napi"):
        check_unseen([str(tmp_path / "Pieris napi (Linne\u0301) " / "x.jpg")], [], model)


def test_unreadable_unknown_images_are_said_beside_the_figures(trained, tmp_path, run_cli):
    """`evaluate --unknown DIR` with broken files in DIR: the summary and the report say
    that part of the folder was not scored, not metrics.json alone."""
    from helpers import write_image

    unseen = tmp_path / "moths"
    for i in range(3):
        write_image(unseen / f"moth_{i}.jpg", size=(40, 40), seed=i)
    (unseen / "broken.jpg").write_bytes(b"not a jpeg")
    (unseen / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic")  # no image: counted too
    code, stdout, err = run_cli("evaluate", "--no-plots", trained, "--unknown", unseen, "--out",
                                tmp_path / "ev", "--quiet")
    assert code == 0, err
    u = json.loads((tmp_path / "ev" / "metrics.json").read_text())["unknown"]
    assert u["unseen_images"] == 3 and sorted(p for p, _ in u["unreadable"]) == [
        str(unseen / "broken.jpg"), str(unseen / "phone.heic")]
    said = " ".join(stdout.split())
    assert "2 of the --unknown images could not be read and were not scored" in said
    page = " ".join((tmp_path / "ev" / "report.html").read_text().split())
    assert re.search(r"unreadable images of unseen classes \(not scored\)</t[dh]>\s*<td[^>]*>2<",
                     page), page[page.find("unseen classes"):][:300]
    # --strict (a script's or CI job's gate, as predict's): the report is written all the
    # same, and the exit says that images were left out; none left out, it exits 0.
    code, stdout, err = run_cli("evaluate", "--no-plots", trained, "--unknown", unseen, "--out",
                                tmp_path / "strict", "--quiet", "--strict")
    assert code == 2 and "--strict: 2 images were missing or unreadable" in err, err
    assert (tmp_path / "strict" / "report.html").is_file() and "Report:" in stdout
    code, _, err = run_cli("evaluate", "--no-plots", trained, "--out", tmp_path / "clean",
                           "--quiet", "--strict")
    assert code == 0, err
    # A file DATA lists that is gone stops it as DATA is read, as train's --strict does
    # (in any split: the data is not what it says), before any work; without --strict it
    # is said and left out.
    listed = pd.read_csv(trained / "splits.csv")
    gone = listed[listed["split"] == "train"].iloc[:1].assign(path=str(tmp_path / "gone.jpg"))
    pd.concat([listed, gone]).to_csv(tmp_path / "listed.csv", index=False)
    code, _, err = run_cli("evaluate", "--no-plots", trained, tmp_path / "listed.csv",
                           "--split", "test", "--out", tmp_path / "gone", "--quiet", "--strict")
    said = " ".join(err.split())
    assert code == 2 and "1 image listed in listed.csv does not exist" in said, err
    assert not (tmp_path / "gone").exists()
    code, _, err = run_cli("evaluate", "--no-plots", trained, tmp_path / "listed.csv",
                           "--split", "test", "--out", tmp_path / "gone", "--quiet")
    assert code == 0, err


def test_a_misspelt_unknown_folder_among_others_is_refused_not_left_out(tmp_path):
    """`run.evaluate(unknown=["moths/", "leafs/"])` with "leafs/" misspelt scored the moths
    alone, and said so only in metrics.json. A path given that names nothing is refused; a
    HEIC given by name is counted unreadable, as in a folder."""
    from helpers import write_image

    from wingspan.evaluate.unseen import unseen_paths

    moths = tmp_path / "moths"
    write_image(moths / "moth.jpg", size=(40, 40), seed=0)
    heic = tmp_path / "phone.heic"
    heic.write_bytes(b"\0\0\0\x18ftypheic")
    for typo in [tmp_path / "leafs", str(tmp_path / "leafs*.jpg")]:
        with pytest.raises(WingspanError, match=f"{re.escape(str(typo))}: no such file or "
                                                 "folder") as e:
            unseen_paths([moths, typo])
        assert "fewer images than given" in e.value.hint
    paths, missing = unseen_paths([moths, heic])
    assert paths == [str(moths / "moth.jpg")] and [p for p, _ in missing] == [str(heic)]
    # An image file gone since it was listed (a --holdout-classes run's, on resume) is
    # counted unreadable, as before: refusing it would fail the run's last step for good.
    gone = str(tmp_path / "held" / "gone.jpg")
    paths, missing = unseen_paths([str(moths / "moth.jpg"), gone])
    assert paths == [str(moths / "moth.jpg")] and [p for p, _ in missing] == [gone]


def test_calibrate_refuses_a_handful_of_images_and_keeps_the_temperature(trained, tmp_path,
                                                                          run_cli):
    """A temperature fitted on 1 image (or 3) says little: refused with the minimum said,
    and the model keeps the one it has."""
    split = pd.read_csv(trained / "splits.csv")
    label, rows = next(iter(split[split["split"] == "test"].groupby("label")))
    for i, path in enumerate(rows["path"].head(3)):
        (tmp_path / "few" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(trained / path if not Path(path).is_absolute() else path,
                    tmp_path / "few" / label / f"{i}.jpg")
    before = read_manifest(trained / "model")["calibration"]
    code, _, err = run_cli("calibrate", trained, tmp_path / "few", "--quiet")
    said = " ".join(err.split())
    n = min(3, len(rows))
    assert code == 2 and (f"Only {n} image{'s' if n > 1 else ''} of the model's classes in the "
                          "'all' split") in said
    assert f"fewer than {MIN_CALIBRATION_IMAGES} says little" in said
    assert f"The model keeps its temperature ({before['temperature']:.3f}" in said
    assert read_manifest(trained / "model")["calibration"] == before
    # The model's classes under other names (iNat's 'monarch' for Leeds' '001-danaus_...'):
    # both sides named, and how to map them.
    (tmp_path / "few" / label).rename(tmp_path / "few" / "other-name")
    code, _, err = run_cli("calibrate", trained, tmp_path / "few", "--quiet")
    said = " ".join(err.split())
    assert code == 2 and "No images of the model's classes" in said, said
    assert label in said.split("the model knows ")[1].split(";")[0], said
    assert "classes there are other-name" in said and "--map MODEL_CLASS=DATA_CLASS" in said, said
    assert read_manifest(trained / "model")["calibration"] == before


def test_data_classes_named_in_another_case_are_paired_in_the_hint(trained, tmp_path, run_cli):
    """Photos of the model's classes in folders named in another case ('Monarch' for
    'monarch') were left out as classes the model does not know, with no word of which
    they look like; and with every folder so, the error named both sides without pairing
    them. Names alone still never pair them (two classes may differ only in case): the
    hint gives the --map that does."""
    from wingspan.evaluate.wording import left_out_wording

    own = read_dataset(trained / "splits.csv").table
    test = own[own["split"] == "test"]
    classes = sorted(test["label"].unique())
    for label, path in zip(test["label"], test["path"], strict=True):
        folder = tmp_path / "other" / (label.upper() if label == classes[0] else label)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / f"{len(list(folder.iterdir()))}{Path(path).suffix}")
    code, stdout, stderr = run_cli("evaluate", "--no-plots", trained, tmp_path / "other",
                                   "--split", "all", "--out", tmp_path / "ev", "--quiet")
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["look_alike"] == {classes[0].upper(): classes[0]}
    said = " ".join((stdout + stderr).split())
    assert (f"differs from the model's {classes[0]} only in case; if it is the same, pair "
            f"them: --map {classes[0]}={classes[0].upper()}") in said, said
    assert f"class_map={{'{classes[0]}': '{classes[0].upper()}'}}" in left_out_wording(
        metrics, classes[0].upper(), "class_map", python=True)
    # Only that class, in another case: nothing the model knows, and the pairing in the hint
    shutil.copytree(tmp_path / "other" / classes[0].upper(), tmp_path / "one" / classes[0].title())
    code, _, stderr = run_cli("evaluate", "--no-plots", trained, tmp_path / "one", "--split",
                              "all", "--quiet")
    said = " ".join(stderr.split())
    assert code == 2 and "No images of the model's classes" in said, said
    assert f"pair them: --map {classes[0]}={classes[0].title()} (in Python: class_map={{" \
           f"'{classes[0]}': '{classes[0].title()}'}})" in said, said
    # calibrate's own "no images" says it too (it gave the plain hint)
    code, _, stderr = run_cli("calibrate", trained, tmp_path / "one", "--split", "all",
                              "--quiet")
    said = " ".join(stderr.split())
    assert code == 2 and f"pair them: --map {classes[0]}={classes[0].title()}" in said, said


def test_the_look_alike_hint_pairs_every_class_in_one_map_that_the_command_line_takes():
    """Three pairs and "and the rest" left a user whose every folder was capitalised to type
    the others; a class holding a comma got a --map that --map refuses (it splits there)."""
    from wingspan.evaluate.wording import look_alike_hint

    alike = {c.title(): c for c in ("monarch", "red admiral", "painted_lady", "small white")}
    said = look_alike_hint(alike)
    assert said.endswith("pair them: --map 'monarch=Monarch,red admiral=Red Admiral,"
                         "painted_lady=Painted_Lady,small white=Small White'"), said
    said = look_alike_hint({"Danaus plexippus, Monarch": "danaus plexippus, monarch"})
    assert said.endswith("pair them: class_map={'danaus plexippus, monarch': 'Danaus "
                         "plexippus, Monarch'} in Python (--map cannot name a class that holds "
                         "a comma or '=')"), said
    many = look_alike_hint({f"C{i:02}": f"c{i:02}" for i in range(25)}, python=True)
    assert "'c19': 'C19'}" in many and many.endswith(" (and 5 more alike)"), many


def test_calibrate_with_a_map_fits_on_the_mapped_images_as_if_renamed(trained, tmp_path,
                                                                      run_cli):
    """The run's images under other folder names (iNat's for Leeds' species), mapped with
    --map, give the temperature that the same images under the model's names give; the
    folder of a class the model does not know is left out of both."""
    from wingspan.models.bundle import update_manifest

    own = read_dataset(trained / "splits.csv").table
    classes = sorted(own["label"].unique())
    theirs = {c: f"other-{i}" for i, c in enumerate(classes[:-1])}
    for i, (label, path) in enumerate(zip(own["label"], own["path"], strict=True)):
        for data, folder in (("mapped[b]", theirs.get(label, "stranger")),
                             ("renamed", label if label in theirs else "stranger")):
            (tmp_path / data / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, tmp_path / data / folder / f"{i}{Path(path).suffix}")
    kept = read_manifest(trained / "model")["calibration"]
    try:
        code, _, err = run_cli("calibrate", trained, tmp_path / "renamed", "--quiet")
        assert code == 0, err
        renamed = read_manifest(trained / "model")["calibration"]
        maps = [f"{ours}={data}" for ours, data in theirs.items()]
        code, out, err = run_cli("calibrate", trained, tmp_path / "mapped[b]", "--quiet",
                                 "--map", maps[0], "--map", ",".join(maps[1:]))
        assert code == 0, err
        mapped = read_manifest(trained / "model")["calibration"]
        n = int(own["label"].isin(list(theirs)).sum())
        assert renamed["images"] == mapped["images"] == n, (renamed, mapped)
        assert mapped["temperature"] == renamed["temperature"], (renamed, mapped)
        # The tiny model's T may stop at a bound: the ECE on the images fitted on (before
        # any temperature, and after) says they and their classes are the same.
        for ece in ("val_ece_before", "val_ece_after"):
            assert mapped[ece] == renamed[ece], (renamed, mapped)
        assert mapped["class_map"] == theirs and "class_map" not in renamed
        assert f"fitted on {n} images (all of {tmp_path / 'mapped[b]'})" in out, out
        # ... and the images it left out, said as evaluate says them.
        stranger = len(own) - n
        assert mapped["unknown_classes"] == ["stranger"]
        assert (f"{stranger} image{'s' if stranger > 1 else ''} of 1 class the model does not "
                f"know {'were' if stranger > 1 else 'was'} left out: stranger") in \
            " ".join(out.split()), out
        # evaluate's checks, and its words.
        code, _, err = run_cli("calibrate", trained, tmp_path / "mapped[b]", "--quiet",
                               "--map", "nosuch=other-0")
        said = " ".join(err.split())
        assert code == 2 and "--map (class_map= in Python) names classes the model does not " \
            "know (nosuch)" in said
        code, _, err = run_cli("calibrate", trained, "--unknown", "--quiet",
                               "--map", maps[0])
        assert code == 2 and "it takes no DATA, --split or --map" in " ".join(err.split())
    finally:  # the module's other tests expect training's temperature
        update_manifest(trained / "model", calibration=kept)


def test_the_note_on_a_temperature_fitted_on_the_evaluated_images_covers_all_of_them():
    """Fitted on all of DATA, evaluated on its test split (or the other way round): the
    temperature saw the images evaluated, and the report's note says so."""
    from wingspan.evaluate.fairness import among_evaluated

    assert among_evaluated("val", "val") and among_evaluated("all", "test")
    assert among_evaluated("val", "all") and not among_evaluated("val", "test")
    assert among_evaluated("all of /d", "test of /d") and among_evaluated("test of /d",
                                                                            "all of /d")
    assert not among_evaluated("all of /d", "test of /e")
    assert not among_evaluated("all of /d", "test") and not among_evaluated(None, "val")


def _with_an_end_space(trained, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the run whose model spells its first class with an end space, as models
    trained before names lost theirs do; and the classes as the data names them now."""
    from wingspan.inference import find_bundle
    from wingspan.models.bundle import meaning_digest, update_manifest

    old = tmp_path / "old"
    shutil.copytree(trained, old)
    bundle = find_bundle(old)
    classes = read_manifest(bundle)["classes"]
    level = list(classes)[-1]
    spaced = classes[level][0] + " "
    manifest = {**read_manifest(bundle), "classes": {**classes, level: [spaced,
                                                                      *classes[level][1:]]}}
    update_manifest(bundle, classes=manifest["classes"], meaning_sha256=meaning_digest(manifest))
    return old, classes[level]


def test_a_model_whose_class_names_end_in_a_space_evaluates_on_the_names_read_now(trained,
                                                                                  tmp_path):
    """Folders are read without end spaces now; a model trained before knows "name "."""
    old, _ = _with_an_end_space(trained, tmp_path)
    before = evaluate(trained, split="val", progress=False, workers=0, plots=False).metrics
    after = evaluate(old, split="val", progress=False, workers=0, plots=False).metrics
    assert after["images"] == before["images"] and not after.get("unknown_class_images")
    assert after["accuracy"] == pytest.approx(before["accuracy"])
    # A model that knows both names keeps each to its own.
    from types import SimpleNamespace

    from wingspan.evaluate.rows import split_rows

    both = SimpleNamespace(classes=["monarch", "monarch "], rare={}, level="label",
                           taxonomy=None)
    table = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["monarch", "monarch "],
                          "split": ["val", "val"]})
    rows = split_rows(SimpleNamespace(table=table), "val", "label", both)
    assert rows["_label"].tolist() == ["monarch", "monarch "]


def test_map_and_unknown_match_a_class_name_that_ends_in_a_space_as_read_now(trained,
                                                                             tmp_path):
    """--map monarch=X against a model that knows 'monarch ' maps it (the user types the
    name as folders read now); the data's own 'monarch' still matches 'monarch ', so a map
    joining another class to it is refused; and an --unknown folder 'monarch' is a class
    the model knows."""
    old, classes = _with_an_end_space(trained, tmp_path)
    val = read_dataset(trained / "splits.csv").table.query("split == 'val'")
    for label, path in zip(val["label"], val["path"], strict=True):
        folder = tmp_path / "other" / ("first_other" if label == classes[0] else label)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder)
    metrics = evaluate(old, tmp_path / "other", split="all", progress=False, workers=0, plots=False,
                       class_map={classes[0]: "first_other"}, out=tmp_path / "ev").metrics
    assert metrics["images"] == len(val) and not metrics["unknown_classes"]
    with pytest.raises(WingspanError, match=f"would score the data's '{classes[1]}' and its "
                                            f"own '{classes[0]}' both"):
        evaluate(old, split="val", progress=False, workers=0, plots=False,
                 class_map={classes[0]: classes[1]})
    unseen = tmp_path / "unseen" / classes[0]
    unseen.mkdir(parents=True)
    shutil.copy(val["path"].iloc[0], unseen / "x.jpg")
    with pytest.raises(WingspanError, match="folders named after classes the model knows"):
        evaluate(old, split="val", progress=False, workers=0, plots=False, unknown=unseen.parent)


def test_a_map_in_decomposed_letters_matches_the_names_as_read(trained, tmp_path):
    """macOS gives folder names decomposed (NFD) where they are copied: the data's
    'Pieris napí' folder reads in NFC, and --map with the pasted spelling was refused,
    naming two classes that looked the same."""
    import unicodedata

    classes = json.loads((trained / "model" / "manifest.json").read_text())["classes"]
    first = classes[next(iter(classes))][0]
    accented = "Pieris napí"
    val = read_dataset(trained / "splits.csv").table.query("split == 'val'")
    for label, path in zip(val["label"], val["path"], strict=True):
        folder = tmp_path / "other" / (accented if label == first else label)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder)
    metrics = evaluate(trained, tmp_path / "other", split="all", progress=False, workers=0,
                       plots=False, out=tmp_path / "ev",
                       class_map={first: unicodedata.normalize("NFD", accented)}).metrics
    assert metrics["images"] == len(val) and not metrics["unknown_classes"]


def test_images_the_run_trained_or_chose_on_give_figures_called_optimistic(trained, evaluation,
                                                                           tmp_path, run_cli):
    """Evaluating the run's train split (to check the fit) or its val (the best epoch was
    chosen on it) is allowed but called optimistic, on screen, in metrics.json and in the
    report; so is other DATA holding some of those images, whatever its splits call them."""
    code, stdout, err = run_cli("evaluate", "--no-plots", trained, "--split", "train", "--out",
                                tmp_path / "train", "--quiet")
    assert code == 0, err
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    fair = metrics["fair"]
    assert fair.startswith(f"no: the model was trained on all {metrics['images']} of these "
                           "images, so these figures are optimistic")
    assert f"wingspan evaluate {trained} --split test" in fair  # the run's own path
    assert fair in " ".join(stdout.split())
    page = (tmp_path / "train" / "report.html").read_text()
    assert "are these figures fair?</th><td>no: the model was trained on all" in page
    # The demo gives no groups: fair, if no two photos show one specimen, as it says.
    assert evaluation.metrics["fair"] == (
        "yes: the test split was never trained or chosen on (each photo its own group: none "
        "were given, so if several photos show one specimen or observation, some may sit on "
        f"both sides; `wingspan data audit {trained}/splits.csv` lists near-duplicates across "
        "them)")
    # Other data: a CSV of the run's own images, a few of each split, all called test.
    own = pd.read_csv(trained / "splits.csv")
    some = own.groupby("split").head(3).assign(split="test")[["path", "label", "split"]]
    some.to_csv(tmp_path / "other.csv", index=False)
    code, stdout, err = run_cli("evaluate", "--no-plots", trained, tmp_path / "other.csv", "--out",
                                tmp_path / "other", "--quiet")
    assert code == 0, err
    fair = json.loads((tmp_path / "other" / "metrics.json").read_text())["fair"]
    assert fair.startswith("no: the model was trained on 3 of these 9 images and chose "
                           "its best epoch on 3, so these figures are optimistic")
    assert "Are these figures fair?" in stdout
    # Only val's: chosen on.
    some[own.loc[some.index, "split"] != "train"].to_csv(tmp_path / "other.csv", index=False)
    assert run_cli("evaluate", "--no-plots",
                   trained, tmp_path / "other.csv", "--out", tmp_path / "other",
                   "--quiet")[0] == 0
    fair = json.loads((tmp_path / "other" / "metrics.json").read_text())["fair"]
    assert fair.startswith("no: the best epoch was chosen on val (3 of these images)")
    # None of them: fair.
    some[own.loc[some.index, "split"] == "test"].to_csv(tmp_path / "other.csv", index=False)
    assert run_cli("evaluate", "--no-plots",
                   trained, tmp_path / "other.csv", "--out", tmp_path / "other",
                   "--quiet")[0] == 0
    fair = json.loads((tmp_path / "other" / "metrics.json").read_text())["fair"]
    assert fair.startswith("yes: none of these files")


def test_the_fair_hint_counts_the_test_images_still_there(tmp_path):
    """After 4 of 29 test photos were deleted, evaluate --split all said "evaluate the
    run's 29 test images"."""
    from helpers import write_image

    from wingspan.evaluate.fairness import fairness_verdict

    names = ("t.jpg", "v.jpg", "x1.jpg", "x2.jpg", "x3.jpg")
    for seed, name in enumerate(names):
        write_image(tmp_path / "a" / name, seed=seed)
    own = pd.DataFrame({"path": [str(tmp_path / "a" / n) for n in names],
                        "split": ["train", "val", "test", "test", "test"]})
    (tmp_path / "a" / "x3.jpg").unlink()
    said = fairness_verdict({}, "all", None, own["path"].tolist()[:4], own, run_dir=tmp_path)
    assert "for a fair figure evaluate the run's 2 test images" in said, said


def test_a_copy_or_a_move_of_the_runs_own_images_is_not_called_fair(tmp_path):
    """The run's data copied to another folder (or moved there before splits.csv was
    rewritten) was evaluated as 'yes: none of these files is one the run trained on' at
    accuracy 0.997. The same path below the data's root, with the same bytes (or the run's
    files gone, most of them found so), is its image; another photo of a name is not."""
    from helpers import write_image

    from wingspan.evaluate.fairness import fairness_verdict

    names = ("t1.jpg", "t2.jpg", "t3.jpg", "v.jpg", "test.jpg")
    for seed, name in enumerate(names):
        write_image(tmp_path / "data" / "a" / name, seed=seed)
    own = pd.DataFrame({"path": [str(tmp_path / "data" / "a" / n) for n in names],
                        "split": ["train", "train", "train", "val", "test"]})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"# Trained on {tmp_path / 'data'}, read with x\n")

    def fair(root, files, data="other"):
        return fairness_verdict({}, "all", data, [str(root / "a" / n) for n in files], own,
                                run_dir=run, data_root=root)

    shutil.copytree(tmp_path / "data", tmp_path / "copy")
    said = fair(tmp_path / "copy", ("t1.jpg", "v.jpg", "test.jpg"))
    assert said.startswith("no: the model was trained on 1 of these 3 images and chose its best "
                           "epoch on 1 (2 copies of its files in another folder, or moved "
                           "there), so these figures are optimistic"), said
    # Another photo under one of the run's names (a camera's IMG_0001.jpg): not its image,
    # whether the run's own file is there or gone (one name of four is no move).
    write_image(tmp_path / "other" / "a" / "t1.jpg", seed=9)
    assert fair(tmp_path / "other", ["t1.jpg"]).startswith("yes: none of these files")
    (tmp_path / "data" / "a" / "t1.jpg").unlink()  # (a copy of it can no more be looked for)
    assert fair(tmp_path / "other", ["t1.jpg"]).startswith(
        "yes, as far as can be told: none of these files")
    assert "1 of the run's own train and val images is not where its splits.csv says" in \
        fair(tmp_path / "other", ["t1.jpg"])
    # The run's own test split, a train file deleted since: its own files, fair.
    assert fairness_verdict({}, "test", None, [own["path"].iloc[-1]], own, run_dir=run,
                     data_root=tmp_path / "data").startswith("yes: the test split")
    # ... said without a caveat where groups were given (two photos of specimen s1 here)
    grouped = own.assign(group=["s1", "s1", "s2", "s3", "s4"])
    # (identical files, which a split keeps together, are no groups given: the caveat stays)
    copies = own.assign(group=["same-file:a/t1.jpg", "same-file:a/t1.jpg", *own["path"][2:]])
    assert "(each photo its own group: none were given" in fairness_verdict(
        {}, "test", None, [own["path"].iloc[-1]], copies, run_dir=run,
        data_root=tmp_path / "data")
    assert fairness_verdict({}, "test", None, [own["path"].iloc[-1]], grouped, run_dir=run,
                     data_root=tmp_path / "data") == (
        "yes: the test split was never trained or chosen on")
    # Copies under other names and class folders, as data for `--map` holds them: their
    # bytes say what they are (a re-saved copy would not: the wording says so)
    (tmp_path / "renamed" / "monarch").mkdir(parents=True)
    for own_name, new in (("t2.jpg", "IMG_1.jpg"), ("v.jpg", "IMG_2.jpg")):
        shutil.copy(tmp_path / "data" / "a" / own_name, tmp_path / "renamed" / "monarch" / new)
    said = fairness_verdict({}, "all", "renamed", [str(tmp_path / "renamed" / "monarch" / n)
                                                   for n in ("IMG_1.jpg", "IMG_2.jpg")],
                            own, run_dir=run, data_root=tmp_path / "renamed")
    assert said.startswith("no: the model was trained on 1 of these 2 images and chose its "
                           "best epoch on 1 (2 copies"), said
    assert "re-saved, resized or edited would not be seen" in fair(tmp_path / "other", ["t1.jpg"])
    # The data moved: the run's files are gone, and found at the same paths there.
    shutil.move(tmp_path / "data", tmp_path / "moved")
    # ... other files then cannot be compared with the run's bytes: said, not a plain yes
    assert fair(tmp_path / "other", ["t1.jpg"]).startswith(
        "yes, as far as can be told: none of these files is one the run trained or chose its "
        "best epoch on; its own images are not where its splits.csv says")
    said = fair(tmp_path / "moved", ("t2.jpg", "t3.jpg", "v.jpg"))
    assert said.startswith("no: the model was trained on 2 of these 3 images and chose its "
                           "best epoch on 1 (3 copies"), said


def test_copies_of_the_runs_images_named_on_macos_are_found(tmp_path):
    """A class folder copied from macOS spells 'é' in two characters (NFD), and the run's
    keys are in NFC: its copies were not found (so not "moved" either), and evaluate called
    the figures on them fair."""
    from helpers import write_image

    from wingspan.evaluate.fairness import fairness_verdict

    cls = unicodedata.normalize("NFD", "Vanessa_é")
    names = ("t1.jpg", "t2.jpg", "v.jpg")
    for seed, name in enumerate(names):
        write_image(tmp_path / "data" / cls / name, seed=seed)
    others = [tmp_path / "data" / "plain" / f"{i}.jpg" for i in range(4)]  # not copied
    for i, path in enumerate(others):
        write_image(path, seed=10 + i)
    own = pd.DataFrame({"path": [str(tmp_path / "data" / cls / n) for n in names]
                        + list(map(str, others)), "split": ["train", "train", "val"] + [
                            "train"] * 4})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"# Trained on {tmp_path / 'data'}, read with x\n")
    shutil.copytree(tmp_path / "data" / cls, tmp_path / "copy" / cls)
    said = fairness_verdict({}, "all", "other", [str(tmp_path / "copy" / cls / n) for n in names],
                     own, run_dir=run, data_root=tmp_path / "copy")
    assert said.startswith("no: the model was trained on 2 of these 3 images and chose its "
                           "best epoch on 1 (3 copies"), said


def test_the_fairness_check_matches_the_runs_images_through_a_link(tmp_path):
    """DATA read through a symlinked folder (or relative to here) names the run's images
    by other paths: they are still the images it trained or chose on."""
    from helpers import write_image

    from wingspan.evaluate.fairness import fairness_verdict

    for seed, name in enumerate(("t.jpg", "v.jpg", "new.jpg")):  # (other bytes each: a
        write_image(tmp_path / "data" / "a" / name, seed=seed)  # byte copy is a copy)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    own = pd.DataFrame({"path": [str(tmp_path / "data" / "a" / n) for n in ("t.jpg", "v.jpg")],
                        "split": ["train", "val"]})
    seen = [str(tmp_path / "link" / "a" / n) for n in ("t.jpg", "v.jpg", "new.jpg")]
    assert fairness_verdict({}, "all", "other", seen, own).startswith(
        "no: the model was trained on 1 of these 3 images and chose its best epoch on 1")
    assert fairness_verdict({}, "all", "other", seen[2:], own).startswith(
        "yes: none of these files")
    twice = [seen[0], str(tmp_path / "data" / "a" / "t.jpg")]  # one file by two paths
    assert fairness_verdict({}, "all", "other", twice, own).startswith(
        "no: the model was trained on this image")


@pytest.mark.parametrize("dtype", [object, "str"])
def test_evaluate_rows_rename_by_spelling_then_map_then_rare_each_in_one_pass(dtype):
    """The truth of each row: the model's old spelling first, then --map (a swap of two
    names stays a swap, not a chain), then the rare merge (a mapped name that is rare
    merges); other names, and missing cells, stay as they are, in the table's own dtype."""
    from types import SimpleNamespace

    from wingspan.evaluate.rows import split_rows

    rare = {"white": "Pieris (rare species)", "cabbage ": "Pieris (rare species)"}
    model = SimpleNamespace(classes=["monarch", "admiral", "Pieris (rare species)"],
                            rare=rare, level="species", taxonomy=None)
    class_map = {"monarch": "admiral", "admiral": "monarch", "white": "Weiss"}  # ours: theirs
    names = ["admiral", "monarch", "Weiss", "cabbage", "white", "painted lady", None, np.nan]
    table = pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(names) + 1)],
                          "species": pd.Series([*names, "monarch"], dtype=dtype),
                          "split": ["val"] * len(names) + ["train"]})
    rows = split_rows(SimpleNamespace(table=table), "val", "species", model, class_map)
    assert rows["species"].tolist()[:6] == ["admiral", "monarch", "Weiss", "cabbage ", "white",
                                            "painted lady"]
    assert rows["_label"].tolist()[:6] == ["monarch", "admiral", *["Pieris (rare species)"] * 3,
                                           "painted lady"]
    assert rows["_label"].iloc[6:].isna().all() and rows["_label"].dtype == table["species"].dtype
    assert rows["_label"].tolist()[6:] == table["species"].tolist()[6:8]  # None stays None


def test_a_tta_evaluation_goes_beside_the_plain_one(evaluation, trained, run_cli, tmp_path):
    """`--tta` writes RUN/evaluation-SPLIT-tta: a user who evaluates with and without TTA
    keeps both, and evaluating either again replaces only its own folder."""
    plain, tta = trained / "evaluation-test", trained / "evaluation-test-tta"
    assert evaluation.out_dir == plain
    shutil.rmtree(tta, ignore_errors=True)
    before = (plain / "predictions.csv").read_bytes()
    code, stdout, err = run_cli("evaluate", "--no-plots", trained, "--tta", "--quiet")
    assert code == 0, err
    assert f"Report: {tta / 'report.html'}" in stdout  # where it wrote
    assert (plain / "predictions.csv").read_bytes() == before
    assert json.loads((plain / "metrics.json").read_text())["tta"] is False
    assert json.loads((tta / "metrics.json").read_text())["tta"] is True
    probs = pd.read_csv(tta / "predictions.csv").filter(like="p:")
    assert not np.allclose(probs, pd.read_csv(plain / "predictions.csv").filter(like="p:"))
    page = (tta / "report.html").read_text()
    assert "<th>test-time augmentation</th><td>on: each image" in page
    # The temperature and thresholds were fitted without TTA: the report says so.
    assert "fitted on single views" in page
    assert "fitted on single views" not in (plain / "report.html").read_text()
    # The plain evaluation again: the TTA one stays.
    again = evaluate(trained, progress=False, workers=0)  # (the shared one: with its plots)
    assert again.out_dir == plain and again.metrics["tta"] is False
    assert json.loads((tta / "metrics.json").read_text())["tta"] is True


def test_unknown_evaluations_go_beside_the_plain_one(evaluation, trained, run_cli, tmp_path):
    """`--unknown DIR` writes RUN/evaluation-SPLIT-unknown, and an --unknown-score other than
    the model's own adds its name: a plain rerun afterwards replaces only its own folder, so
    the unknown figures stay (before, all three shared RUN/evaluation-SPLIT)."""
    from helpers import write_image

    plain, with_unknown = trained / "evaluation-test", trained / "evaluation-test-unknown"
    other = "knn" if evaluation.metrics["answers"]["score"] != "knn" else "msp"
    scored = trained / f"evaluation-test-unknown-{other}"
    for i in range(4):
        write_image(tmp_path / "noise" / f"{i}.jpg", size=(40, 40), seed=i)
    for extra in ([], ["--unknown-score", other, "--no-plots"]):
        code, stdout, err = run_cli("evaluate", trained, "--unknown", tmp_path / "noise",
                                    "--quiet", *extra)
        assert code == 0, err
    assert f"Report: {scored / 'report.html'}" in stdout  # where it wrote
    for folder, score in ((with_unknown, evaluation.metrics["answers"]["score"]),
                          (scored, other)):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["unknown"]["unseen_images"] == 4 and metrics["unknown"]["score"] == score
        assert (folder / "unknown.csv").is_file()
        assert (folder / "unknown.png").is_file() is (folder == with_unknown)  # (--no-plots)
    # The model's own score named again is the plain evaluation, which a rerun replaces
    # while the unknown folders stay.
    code, stdout, err = run_cli("evaluate", trained, "--unknown-score",
                                evaluation.metrics["answers"]["score"], "--quiet")
    assert code == 0, err
    assert f"Report: {plain / 'report.html'}" in stdout
    assert "unknown" not in json.loads((plain / "metrics.json").read_text())
    for folder in (with_unknown, scored):
        assert "unknown" in json.loads((folder / "metrics.json").read_text())
        assert (folder / "unknown.csv").is_file()


def test_tta_names_other_data_and_unknown_evaluations_too(trained, tmp_path, run_cli):
    """With other DATA (and --map) the TTA evaluation is RUN/evaluation-NAME-SPLIT-tta,
    beside the plain one; with --unknown it is the split's -unknown-tta folder, and the
    unknown figures are scored on the views' mean."""
    from helpers import write_image

    own = read_dataset(trained / "splits.csv").table
    test = own[own["split"] == "test"].head(12)
    classes = sorted(test["label"].unique())
    for label, path in zip(test["label"], test["path"], strict=True):
        folder = tmp_path / "mine" / ("renamed" if label == classes[0] else label)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / f"{len(list(folder.iterdir()))}{Path(path).suffix}")
    mapped = ["--map", f"{classes[0]}=renamed", "--split", "all", "--quiet"]
    for extra in ([], ["--tta"]):
        code, stdout, err = run_cli("evaluate", "--no-plots",
                                    trained, tmp_path / "mine", *mapped, *extra)
        assert code == 0, err
    plain, tta = trained / "evaluation-mine-all", trained / "evaluation-mine-all-tta"
    assert json.loads((plain / "metrics.json").read_text())["tta"] is False
    metrics = json.loads((tta / "metrics.json").read_text())
    assert metrics["tta"] is True and metrics["transfer"][0]["data class"] == "renamed"
    assert f"Report: {tta / 'report.html'}" in stdout

    for i in range(6):
        write_image(tmp_path / "noise" / f"{i}.jpg", size=(40, 40), seed=i)
    shutil.rmtree(trained / "evaluation-val-unknown-tta", ignore_errors=True)
    for extra in ([], ["--tta"]):
        code, stdout, err = run_cli("evaluate", "--no-plots",
                                    trained, "--split", "val", "--unknown",
                                    tmp_path / "noise", "--quiet", *extra)
        assert code == 0, err
    for folder, on in ((trained / "evaluation-val-unknown", False),
                       (trained / "evaluation-val-unknown-tta", True)):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["tta"] is on and metrics["unknown"]["unseen_images"] == 6
        assert (folder / "unknown.csv").is_file()
    assert "fitted on single views" in stdout  # the thresholds were set without TTA


def test_another_photo_of_a_specimen_trained_on_is_not_called_fair(demo_dir, tmp_path):
    """ETHEC's specimens have several photos, grouped by barcode: evaluated on the data the
    run was trained on, a test photo of a specimen whose other photo it trained on makes
    the figures optimistic, though no file is one it trained on."""
    table = read_dataset(demo_dir).table
    table = table.assign(split=["train", "train", "val", "test"] * (len(table) // 4)
                         + ["train"] * (len(table) % 4))
    table[["path", "label", "split", "group"]].to_csv(tmp_path / "photos.csv", index=False)
    run = train(read_dataset(tmp_path / "photos.csv"), tiny(tmp_path, epochs_finetune=0),
                tmp_path / "runs", quiet=True)
    fair = evaluate(run, tmp_path / "photos.csv", split="test", progress=False, workers=0,
                    plots=False, out=tmp_path / "ev").metrics["fair"]
    assert fair.startswith("yes"), fair
    # A second photo of a trained-on specimen, put in test afterwards (a repaired leak).
    trained_on_row = table[table.split == "train"].iloc[0]
    second = tmp_path / "second-photo.jpg"  # (not the same bytes: a byte copy is a copy)
    with Image.open(trained_on_row.path) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second)
    table = pd.concat([table, pd.DataFrame([{**trained_on_row, "path": str(second),
                                             "split": "test"}])])
    table[["path", "label", "split", "group"]].to_csv(tmp_path / "photos.csv", index=False)
    fair = evaluate(run, tmp_path / "photos.csv", split="test", progress=False, workers=0,
                    plots=False, out=tmp_path / "ev").metrics["fair"]
    assert fair.startswith("no: 1 of these") and "(the same group)" in fair, fair


def test_images_blank_at_the_level_are_said_as_such_not_as_a_nameless_class():
    """A class folder that taxonomy.csv lacks reads with no species: evaluate leaves those
    images out saying why, rather than as 'a class the model does not know' named ''."""
    from wingspan.evaluate.rows import left_out_figures
    from wingspan.evaluate.wording import left_out_wording

    rows = pd.DataFrame({"_label": ["Danaus plexippus", "", "", "Pieris rapae", "moth"]})
    known = rows["_label"].isin(["Danaus plexippus", "Pieris rapae"])
    left = left_out_figures(rows, known, "species", ["Danaus plexippus", "Pieris rapae"])
    assert left == {"unknown_classes": ["moth"], "unknown_class_images": 1,
                    "unlabelled": {"level": "species", "images": 2}}
    said = left_out_wording(left, "moth", "--map MODEL_CLASS=DATA_CLASS")
    assert said.startswith("1 image of 1 class the model does not know was left out: moth (")
    assert said.endswith("; 2 images with no 'species' in the data (blank there: a class "
                         "folder that taxonomy.csv lacks, say) were left out")
    only_blank = left_out_figures(rows.iloc[:3], known.iloc[:3], "species", [])
    assert left_out_wording(only_blank, "", "--map").startswith("2 images with no 'species'")


def test_evaluating_a_run_whose_splits_csv_changed_since_training_is_refused(trained,
                                                                            tmp_path):
    """Rows cut from its splits.csv: its test split is no longer the one the run kept
    apart, so its figures would not be the run's. Paths rewritten (data moved) are fine."""
    run = shutil.copytree(trained, tmp_path / "run",
                          ignore=shutil.ignore_patterns("evaluation-*", "cache"))
    splits = run / "splits.csv"
    rows = splits.read_text().splitlines(True)
    splits.write_text("".join(rows[:len(rows) * 3 // 4]))
    with pytest.raises(WingspanError, match="splits.csv has changed since the run trained"
                       ) as e:
        evaluate(run, progress=False, workers=0, plots=False)
    assert e.value.hint.endswith(f"evaluate on other data: `wingspan evaluate {run} DATA`.")
    with pytest.raises(WingspanError, match="splits.csv has changed since") as e:
        calibrate(run, progress=False, workers=0)  # its hint names its own command
    assert e.value.hint.endswith(f"calibrate on other data: `wingspan calibrate {run} DATA`.")
    splits.write_text("".join(row.replace("/", "/./", 1) if i else row
                              for i, row in enumerate(rows)))
    assert evaluate(run, progress=False, workers=0, plots=False).metrics["images"] > 0


def test_a_map_names_classes_that_hold_commas():
    """--map 'a=red,admiral' was split at the comma ("--map 'admiral': expected NAME=NAME"),
    though a class folder may be so named; a text of pairs is still split at its commas."""
    from wingspan.config import name_pairs

    assert name_pairs(["009=red,admiral"], "--map") == {"009": "red,admiral"}
    assert name_pairs(["a=b, c=d,", "e=monarch=big"], "--map") == {
        "a": "b", "c": "d", "e": "monarch=big"}
    assert name_pairs(["a=b,c=red,admiral,d=e"], "--map") == {
        "a": "b", "c": "red,admiral", "d": "e"}
    with pytest.raises(WingspanError, match="'oops': expected NAME=NAME"):
        name_pairs(["oops"], "--map")


def test_a_run_whose_data_moved_says_where_its_paths_are(trained, tmp_path):
    """Every image of the run's split gone (the data moved): the hint named `data inspect`
    and --split, which cannot help; the paths are in the run's splits.csv, to rewrite."""
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("evaluation-*"))
    splits = copy / "splits.csv"
    table = pd.read_csv(splits)
    table["path"] = "/nowhere/moved/" + table["path"].map(lambda p: Path(p).name)
    table.to_csv(splits, index=False)
    with pytest.raises(WingspanError, match="could be read") as e:
        evaluate(copy, progress=False, workers=0, plots=False)
    assert f"not where {splits} says" in e.value.hint and "sed 's|" in e.value.hint
    # calibrate said "None of the 29 images of the 'val' split could be read." alone
    with pytest.raises(WingspanError, match="could be read") as e:
        calibrate(copy, progress=False, workers=0)
    assert e.value.hint.endswith("and calibrate again.") and f"not where {splits} says" in \
        e.value.hint
    # adapt and calibrate --unknown blamed splits.csv ("has no usable images")
    from wingspan.training.adapt import adapt

    photo = pd.read_csv(trained / "splits.csv")["path"].iloc[0]
    for refit in (lambda: adapt(copy, [photo], out=tmp_path / "a", progress=False, workers=0),
                  lambda: calibrate_unknown(copy, progress=False, workers=0)):
        with pytest.raises(WingspanError, match=f"The run's own images, which .* are not "
                           f"where {re.escape(str(splits))} says") as e:
            refit()
        assert "sed 's|" in e.value.hint


def test_a_bundle_without_its_run_folder_is_not_called_fair(trained, tmp_path, run_cli):
    """A model/ folder copied alone, evaluated on the data it trained on: "yes, unless this
    data holds images the model was trained or chosen on", and the screen said nothing.
    Which images those are is unknown without the run's splits.csv; said so."""
    bundle = shutil.copytree(trained / "model", tmp_path / "bundle")
    data = pd.read_csv(trained / "splits.csv")
    data.to_csv(tmp_path / "same.csv", index=False)
    code, out, err = run_cli("evaluate", bundle, tmp_path / "same.csv", "--split", "all",
                             "--no-plots", "--out", tmp_path / "ev")
    assert code == 0, err
    fair = json.loads((tmp_path / "ev" / "metrics.json").read_text())["fair"]
    assert fair.startswith("unknown: this model came without its run folder"), fair
    assert "Are these figures fair? unknown" in " ".join(out.split())


def test_the_report_says_how_the_run_was_trained_and_links_its_files(demo_dir, tmp_path):
    """Two reports of runs that differed in --lr alone looked alike but for their figures,
    with no word of the recipe nor a link to the run's config.yaml, train.log, history.csv.
    The overview names the settings that are not the defaults and the line to train it
    again; a model folder copied alone still names them (its manifest keeps them)."""
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, lr=0.01, label_smoothing=0.0,
                                                 epochs_head=1, epochs_finetune=1),
                    tmp_path / "runs", "lr & 'x'", quiet=True)  # (said escaped)

    def overview(ev):
        page = ev.report.read_text()
        rows = {k: html.unescape(v) for k, v in re.findall(
            r"<tr><th>([^<]*)</th><td>([^<]*)</td>", page.split("</table>")[0])}
        links = re.findall(r"<a href='([^']*)'>(config.yaml|train.log|history.csv)</a>", page)
        return rows, links

    ev = evaluate(run_dir, plots=False, progress=False, workers=0)
    rows, links = overview(ev)
    said = rows["how it was trained (settings not the defaults)"]
    assert "lr 0.01" in said and "label_smoothing 0.0" in said, said
    assert "workers" not in said and "cache_dir" not in said  # (where it ran: no recipe)
    again = shlex.split(rows["to train it again"])
    assert again[:2] == ["wingspan", "train"], again
    assert again[again.index("--config") + 1] == str(run_dir / "config.yaml")
    assert sorted(name for _, name in links) == ["config.yaml", "history.csv", "train.log"]
    assert all((ev.out_dir / unquote(href)).resolve() == (run_dir / name).resolve()
               for href, name in links)
    # Elsewhere (--out), which may be moved alone: the same rows, no links out of it.
    rows_out, links = overview(evaluate(run_dir, plots=False, progress=False, workers=0,
                                        out=tmp_path / "elsewhere"))
    assert rows_out["to train it again"] == rows["to train it again"] and links == []
    # The model folder copied alone: its settings still, no run to train again or link.
    alone = shutil.copytree(run_dir / "model", tmp_path / "alone")
    rows_alone, links = overview(evaluate(alone, run_dir / "splits.csv", split="val",
                                          plots=False, progress=False, workers=0))
    assert rows_alone[next(k for k in rows if k.startswith("how it was"))] == said
    assert "to train it again" not in rows_alone and links == []
    # A damaged config.yaml: the report is written all the same, with no line to paste.
    (run_dir / "config.yaml").write_text("lr: [0.01\n", encoding="utf-8")
    rows, _ = overview(evaluate(run_dir, plots=False, progress=False, workers=0))
    assert "lr 0.01" in rows["how it was trained (settings not the defaults)"]
    assert "to train it again" not in rows


def test_a_file_put_in_an_evaluation_folder_is_not_deleted_by_the_next(trained, tmp_path):
    """A second evaluation replaces the folder whole: notes the user put there since were
    deleted without a word (an --out of other files was refused, the default one not)."""
    out = tmp_path / "ev"
    evaluate(trained, progress=False, workers=0, plots=False, out=out)
    evaluate(trained, progress=False, workers=0, plots=False, out=out)  # its own files: fine
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(WingspanError, match="holds files the evaluation there did not write: "
                       "my_notes.txt") as e:
        evaluate(trained, progress=False, workers=0, plots=False, out=out)
    assert (out / "my_notes.txt").read_text() == "mine" and "Move them out" in e.value.hint
    (out / "my_notes.txt").unlink()
    evaluate(trained, progress=False, workers=0, plots=False, out=out)


def test_a_report_without_mistakes_says_so_in_words(tmp_path):
    """Every image right (the demo's 33 of 33): the report showed the mistakes' heading,
    how to read their Grad-CAMs, and an image saying "no mistakes"."""
    from wingspan.evaluate.report import write_report

    for all_right in (True, False):
        page = write_report(tmp_path / f"{all_right}.html", "t",
                            {"all_right": all_right}).read_text()
        assert ("None: every image here was answered right." in page) == all_right
        assert ("under the Grad-CAM of the wrong class" in page) != all_right


def test_ece_on_copies_of_the_calibration_photos_is_said_optimistic(trained, tmp_path,
                                                                     run_cli):
    """calibrate on the run's test split, then evaluate copies of those photos sorted into
    class folders (or a folder above them): the ECE after is optimistic, and was called
    fair, as the check compared folder paths alone."""
    run = shutil.copytree(trained, tmp_path / "run",
                          ignore=shutil.ignore_patterns("evaluation-*"))
    test = pd.read_csv(run / "splits.csv").query("split == 'test'")
    for path, label in zip(test["path"], test["label"], strict=True):
        (tmp_path / "copies" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "copies" / label / Path(path).name)

    def same(out):
        return evaluate(run, tmp_path / "copies", split="all", out=tmp_path / out,
                        progress=False, workers=0, plots=False
                        ).metrics["calibration"]["same_data_as_evaluation"]

    from wingspan.models.bundle import update_manifest

    fitted = read_manifest(run / "model")["calibration"]  # as training fitted it, on val
    update_manifest(run / "model", calibration={
        **{k: v for k, v in fitted.items() if k not in ("photo_sums", "run_images_among")},
        "fitted_on": "val"})
    assert not same("before")
    calibrate(run, split="test", progress=False, workers=0)
    assert same("after")
    # Said on screen too, where most read it (the report alone said it).
    for split, fitted_here in (("test", True), ("val", False)):
        code, out, err = run_cli("evaluate", run, "--split", split, "--no-plots", "--quiet",
                                 "--out", tmp_path / f"cli-{split}")
        assert code == 0, err
        assert ("optimistic: fitted on these images" in " ".join(out.split())) == fitted_here
        # ... and in a notebook, which said "ECE before / after" without it
        from wingspan.api.evaluation import Evaluation

        done = evaluate(run, split=split, out=tmp_path / f"nb-{split}", progress=False,
                        workers=0, plots=False)
        shown = Evaluation(done.out_dir, done.metrics, done.report)._repr_html_()
        assert ("optimistic: fitted on these images" in shown) == fitted_here
    assert "photo_sums" not in evaluate(run, split="val", out=tmp_path / "val", progress=False,
                                        workers=0, plots=False).metrics["calibration"]



def test_evaluate_says_which_files_of_other_data_it_did_not_read(trained, evaluation, tmp_path,
                                                                 run_cli):
    """A CSV row whose file is gone and a JPEG named .heic (read nowhere from a folder):
    evaluate counted fewer images and said nothing, where train and audit name them."""
    own = read_dataset(trained / "splits.csv").table
    test = own[own["split"] == "test"].head(6)
    rows = []
    for i, (label, path) in enumerate(zip(test["label"], test["path"], strict=True)):
        shutil.copy(path, tmp_path / f"{i}.jpg")
        rows.append((f"{i}.jpg", label))
    rows.append(("gone.jpg", test["label"].iloc[0]))
    (tmp_path / "data.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    code, stdout, stderr = run_cli("evaluate", trained, tmp_path / "data.csv", "--split", "all",
                                   "--out", tmp_path / "ev", "--no-plots", "--quiet")
    assert code == 0, stderr
    said = " ".join(stdout.split())
    assert "While reading the data: 1 x missing file" in said and "gone.jpg" in said, said
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["images"] == 6 and len(metrics["reading"]) == 1
    assert "gone.jpg" in metrics["reading"][0]
    assert "reading" not in evaluation.metrics  # the run's own split: nothing read anew


def test_evaluations_csvs_spell_out_a_path_in_other_bytes(tmp_path):
    """A data folder named in bytes that are not UTF-8 is read (its name is the user's):
    predictions.csv then stopped the evaluation, once every image was predicted."""
    import os

    from wingspan.files import write_csv

    write_csv(pd.DataFrame({"path": [os.fsdecode(b"/d\xe9j\xe0/a.jpg")]}), tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text(encoding="utf-8") == "path\n/d\\udce9j\\udce0/a.jpg\n"


def test_calibrate_adapt_and_serve_take_precision_and_runtime(trained, tmp_path, run_cli,
                                                            monkeypatch, demo_dir):
    """As predict and evaluate do: they always ran `auto`, and only the environment could
    change that (for a machine whose measured engine answers wrongly, or an exact run)."""
    from wingspan.serve import create_app

    copy = shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("cache"))
    given, real = [], Predictor.__init__

    def spy(self, *args, **kwargs):
        given.append((kwargs.get("precision"), kwargs.get("runtime")))
        real(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "__init__", spy)
    engine = ["--precision", "fp32", "--runtime", "torch", "--workers", "0", "--quiet"]
    photos = sorted(demo_dir.rglob("*.jpg"))[:12]
    for args in (["calibrate", copy], ["calibrate", copy, "--unknown"],
                 ["adapt", copy, *photos, "--out", tmp_path / "adapted"]):
        code, _, err = run_cli(*args, *engine)
        assert code == 0, err
        assert given[-1] == ("fp32", "torch"), args
    create_app(copy, precision="fp32", runtime="torch")
    assert given[-1] == ("fp32", "torch")


def test_no_known_images_in_a_split_names_the_splits_that_have_some(trained, tmp_path,
                                                                     run_cli):
    """Evaluate and calibrate say it alike (calibrate kept a drifted copy of evaluate's
    check): the other splits to try where the data has them (calibrate said "give another
    --split" of data with none; evaluate never did)."""
    own = read_dataset(trained / "splits.csv").table
    rows = own[own["split"] == "train"].head(6)[["path", "label"]].assign(split="train")
    other = own[own["split"] == "train"].tail(4)[["path"]].assign(label="nobody", split="test")
    table = tmp_path / "data.csv"
    pd.concat([rows, other]).to_csv(table, index=False)
    for command, doing in (("evaluate", ""), ("calibrate", " to calibrate on")):
        code, _, err = run_cli(command, trained, table, "--split", "test", "--quiet")
        said = " ".join(err.split())
        assert code == 2 and f"No images of the model's classes in the 'test' split{doing}:" \
            in said, said
        assert "; or give another --split (train)." in said, said
    # Data without splits ('all'): no other split to give
    (tmp_path / "flat" / "nobody").mkdir(parents=True)
    shutil.copy(own["path"].iloc[0], tmp_path / "flat" / "nobody" / "a.jpg")
    code, _, err = run_cli("calibrate", trained, tmp_path / "flat", "--quiet")
    said = " ".join(err.split())
    assert code == 2 and "No images of the model's classes in the 'all' split" in said, said
    assert "--split" not in said, said


def test_the_look_alike_hint_says_spacing_and_shows_what_does_not_show():
    """Names one space or a no-break space apart pair as look-alikes; the hint said "only in
    case, width or invisible marks" and printed the no-break twin as the same name."""
    from wingspan.evaluate.rows import look_alikes
    from wingspan.evaluate.wording import look_alike_hint

    alike = look_alikes(["red  admiral", "small\u00a0white", "monarch"],
                        {"red admiral", "small white", "peacock"})
    assert alike == {"red  admiral": "red admiral", "small\u00a0white": "small white"}
    said = look_alike_hint(alike)
    assert ("red  admiral, small\\u00a0white differ from the model's red admiral, small "
            "white only in case, spacing, width or invisible marks;") in said, said


def test_classes_without_images_here_but_answered_are_said_apart(tmp_path, run_cli,
                                                                  monkeypatch):
    """On the run's own split the macro averages cover every class seen, answers too: a
    class with no test image that was answered is in them with F1 0, while the message
    said the classes without images were "left out" of them."""
    from helpers import folder_dataset

    from wingspan.evaluate import run as run_module

    root = folder_dataset(tmp_path / "photos", {"a": 8, "b": 8, "c": 8})
    rows = [(f"{c}/{c}_{i}.jpg", c, "train" if c == "c" or i < 4 else
             ("val" if i < 6 else "test")) for c in "abc" for i in range(8)]
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(root / "data.csv",
                                                                   index=False)
    run_dir = train(read_dataset(root / "data.csv"), tiny(tmp_path, epochs_finetune=0),
                    tmp_path / "runs", "r", quiet=True)
    c = read_manifest(run_dir / "model")["classes"]["label"].index("c")
    monkeypatch.setattr(run_module, "predicted_classes",  # a model that answers c to all
                        lambda predictor, probs, t: np.full(len(probs), c))
    code, out, err = run_cli("evaluate", run_dir, "--no-plots", "--workers", "0")
    assert code == 0, err
    metrics = json.loads((run_dir / "evaluation-test" / "metrics.json").read_text())
    per_class = pd.read_csv(run_dir / "evaluation-test" / "per_class.csv")
    assert metrics["answered_only_classes"] == ["c"] == \
        per_class.loc[per_class.support == 0, "class"].tolist()
    assert metrics["macro"]["f1"] == pytest.approx(per_class.f1.mean())  # c's 0 in it
    said = " ".join(out.split())
    assert ("1 class of the model's has no images here but was answered: in the per-class "
            "table and the macro averages, each with F1 0: c") in said
    assert "but answered (in the per-class table and the macro averages, each with F1 " \
           "0)</th><td>1: c</td>" in (run_dir / "evaluation-test" / "report.html").read_text()


def test_an_unknown_folder_named_after_a_mapped_data_class_is_refused(trained, tmp_path):
    """With --map, a folder of --unknown named after a data class mapped to one of the
    model's (its photos, say: a monarch folder for the model's Danaus plexippus) was
    scored as unseen (AUROC 0.61)."""
    from helpers import write_image

    ours = read_manifest(trained / "model")["classes"]["label"][0]
    own = pd.read_csv(trained / "splits.csv")
    (tmp_path / "other" / "monarch").mkdir(parents=True)
    for i, path in enumerate(own.loc[own.label == ours, "path"][:2]):
        shutil.copy(path, tmp_path / "other" / "monarch" / f"{i}.jpg")
    write_image(tmp_path / "unk" / "Monarch" / "a.jpg", seed=3)
    with pytest.raises(WingspanError, match=r"include folders named after classes the model "
                       rf"knows: monarch \(--map: {re.escape(ours)}\)"):
        evaluate(trained, tmp_path / "other", split="all", class_map={ours: "monarch"},
                 unknown=tmp_path / "unk", progress=False, workers=0, plots=False,
                 out=tmp_path / "ev")


def test_the_transfer_table_goes_on_when_the_runs_own_images_are_gone(tmp_path, run_cli):
    """A run folder copied to another machine: `evaluate RUN OTHER --map` predicted every
    image, then stopped at the run's own splits.csv ("no usable images"), where without
    --map it worked. Its recall on own data is none now, said with why and of which split."""
    from helpers import folder_dataset

    data = folder_dataset(tmp_path / "data", {"a": 8, "b": 8})
    run_dir = train(read_dataset(data), tiny(tmp_path, epochs_finetune=0, test_fraction=0.25),
                    tmp_path / "runs", "r", quiet=True)
    other = tmp_path / "other"
    for theirs, ours in (("renamed_a", "a"), ("b", "b")):
        shutil.copytree(data / ours, other / theirs)
    shutil.move(data, tmp_path / "elsewhere")
    code, out, err = run_cli("evaluate", run_dir, other, "--split", "all", "--map",
                             "a=renamed_a", "--no-plots", "--workers", "0", "--out",
                             tmp_path / "ev")
    assert code == 0, err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    own = metrics["transfer_own"]
    assert own["split"] == "test" and own["images"] == own["unreadable"] > 0
    assert all(r["recall on own data"] is None for r in metrics["transfer"])
    assert (f"own data: its test split; {own['unreadable']} of its {own['images']} images "
            "could not be read, gone since") in " ".join(out.split())


def test_a_map_hint_matches_each_name_against_its_own_side(tmp_path):
    """A model class of --map that is the data's class in another case is no slip of the
    model's class: a genus model given --map azure_spotwing=AZURE_SPOTWING was told "Did
    you mean 'AZURE_SPOTWING' for 'azure_spotwing'", which the model does not know either."""
    from types import SimpleNamespace

    from helpers import folder_dataset

    from wingspan.evaluate.transfer import check_class_map

    data = read_dataset(folder_dataset(tmp_path / "d", {"AZURE_SPOTWING": 1, "RED": 1}, (8, 8)))
    genus = SimpleNamespace(classes=["Pixelia", "Synthia"], rare=[], level="label",
                            taxonomy=None)
    with pytest.raises(WingspanError, match="does not know") as e:
        check_class_map({"azure_spotwing": "AZURE_SPOTWING"}, genus, data, "label")
    assert "Did you mean" not in e.value.hint
    # A data class in another case is still told, on its own side.
    with pytest.raises(WingspanError, match="does not have") as e:
        check_class_map({"Pixelia": "azure_spotwing"}, genus, data, "label")
    assert e.value.hint.startswith("Did you mean 'AZURE_SPOTWING' for 'azure_spotwing'")


def test_predict_writes_a_page_to_look_through_the_least_sure_first(run_cli, trained, demo_dir,
                                                                     tmp_path, monkeypatch):
    """`--output preds.html`: a card per image (its thumbnail, linked to the photo, the
    answer and the rest of the row as the terminal says it), the least sure first, the
    answers counted above, the skipped below; at most PREDICT_PAGE_IMAGES cards."""
    from helpers import accessibility_problems, chromium_path
    from playwright.sync_api import sync_playwright

    import wingspan.predict

    images = sorted(demo_dir.rglob("*.jpg"))[:12]
    (tmp_path / "broken.jpg").write_bytes(b"not a photo")
    page_path = tmp_path / "out" / "preds.html"
    # (the page and a CSV of every image from one predict: --output repeated)
    code, out, err = run_cli("predict", trained, *images, tmp_path / "broken.jpg",
                             "--output", page_path, "--output", tmp_path / "p.csv", "-q")
    assert code == 0 and page_path.is_file(), err
    assert f"Wrote {page_path}" in " ".join(out.split()), out
    table = pd.read_csv(tmp_path / "p.csv")
    assert table["error"].notna().sum() == 1  # (broken.jpg's row)
    table = table[table["error"].isna()]
    page = page_path.read_text()
    cards = re.findall(r"<div class='c'><a href='([^']+)'><img alt='([^']+)' "
                       r"src='data:image/jpeg;base64,([^']+)'></a><div>(.*?)</div>", page)
    assert len(cards) == len(images) == len(table)
    # Each card links to its photo (relative to the page) and shows it, named for a reader.
    assert sorted((page_path.parent / unquote(link)).resolve() for link, *_ in cards) == \
        sorted(p.resolve() for p in images)
    assert all(Image.open(io.BytesIO(base64.b64decode(data))).format == "JPEG"
               for *_, data, _ in cards)
    assert all(html.unescape(alt).startswith(f"{unquote(link).rsplit('/', 1)[-1]}, answered ")
               for link, alt, *_ in cards)
    # The least sure first: unknown answers, then by the probability of the class answered.
    by_path = table.set_index(table["path"].map(lambda p: Path(p).resolve()))
    rows = [by_path.loc[(page_path.parent / unquote(link)).resolve()] for link, *_ in cards]
    known = [r["probability"] for r in rows if r["answer"] != "unknown"]
    assert [r["answer"] == "unknown" for r in rows] == sorted(r["answer"] == "unknown"
                                                               for r in rows)[::-1]
    assert known == sorted(known)
    assert all(re.sub("<[^>]+>", "", said).startswith(r["answer"])
               for (*_, said), r in zip(cards, rows, strict=True))
    # The answers counted, and the file that could not be read named with its reason.
    counts = dict(re.findall(r"<tr><td>([^<]+)</td><td>(\d+)</td></tr>", page))
    assert {a: int(n) for a, n in counts.items()} == table["answer"].value_counts().to_dict()
    assert "<h2>Skipped (1)</h2>" in page and "broken.jpg" in page
    # Which model made it (the page may be sent on, or opened days later).
    assert re.search(r"<p>By the model (.*?), \d{4}-\d\d-\d\d \d\d:\d\d UTC\.</p>", page)[1] \
        .replace("<wbr>", "") == html.escape(str(trained / "model"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path())
        for width in (1280, 375):
            tab = browser.new_page(viewport={"width": width, "height": 800})
            tab.goto(page_path.resolve().as_uri())
            assert accessibility_problems(tab) == [], width
            assert tab.evaluate("document.documentElement.scrollWidth") <= width
            tab.close()
        browser.close()
    # Thousands of photos: the least sure alone, said (the CSV keeps them all).
    monkeypatch.setattr(wingspan.predict, "PREDICT_PAGE_IMAGES", 5)
    code, _, err = run_cli("predict", trained, *images, "--output", page_path, "-q")
    page = page_path.read_text()
    assert code == 0 and page.count("<div class='c'>") == 5, err
    assert f"The 5 least sure of the {len(images)} images" in page
    # The table's caption then names no page as holding them all; an output given twice is
    # written once.
    import wingspan.cli.predict

    monkeypatch.setattr(wingspan.cli.predict, "PREDICT_ROWS", 3)
    monkeypatch.setattr(wingspan.cli.predict, "PREDICT_PAGE_IMAGES", 5)
    code, out, err = run_cli("predict", trained, *images, "--output", page_path, "--output",
                             tmp_path / "p.csv", "--output", page_path)
    said = " ".join(out.split())
    assert code == 0 and f"all in {tmp_path / 'p.csv'}" in said, out
    assert said.count(f"Wrote {page_path}") == 1, out
    code, out, err = run_cli("predict", trained, *images, "--output", page_path)
    assert code == 0 and "--output FILE.csv writes all" in " ".join(out.split()), out


def _hierarchical_rows() -> list[dict]:
    """predict's rows of a 4-level model: a family known only, a subfamily known only (each
    stopped by its unknown score), a species, and an unknown answer."""
    levels = ["family", "subfamily", "genus", "species"]

    def row(name, known, branch, top, score=0.5):
        return {"path": f"/photos/{name}.jpg", "top": top, "known_level": known,
                "taxonomy": [(lv, c, p) for lv, (c, p) in zip(levels, branch, strict=True)],
                "predicted": branch[-1][0], "probability": branch[-1][1],
                "answer": next((c for lv, (c, _) in zip(levels, branch, strict=True)
                                if lv == known), "unknown"),
                "unknown_score": score, "threshold": 0.9, "score_level": "genus"}

    branch = [("Nymphalidae", 0.54), ("Nymphalinae", 0.42), ("Aglais", 0.16),
              ("Aglais io", 0.16)]
    top = [("Polyommatus icarus", 0.31), ("Aglais io", 0.16), ("Vanessa atalanta", 0.15)]
    return [row("sure", "species", [("Nymphalidae", 0.9), ("Nymphalinae", 0.9),
                                    ("Aglais", 0.9), ("Aglais io", 0.9)], top),
            row("subfamily", "subfamily", branch, top, score=0.99),
            row("family", "family", [("Nymphalidae", 0.46), ("Danainae", 0.18),
                                     ("Danaus", 0.18), ("Danaus plexippus", 0.18)],
                [("Pieris rapae", 0.26), ("Danaus plexippus", 0.18)], score=0.99),
            row("unlike", None, branch, top, score=0.999)]


def test_a_coarser_answer_names_its_closest_species_with_the_species_probability():
    """An answer stopped at its subfamily read "closest: Aglais io 0.418", the subfamily's
    probability, beside a branch that says "Aglais io 0.16" (the terminal's and the page's
    words alike)."""
    from wingspan.predict import PredictResult, row_words

    result = PredictResult(rows=_hierarchical_rows(), top_k=3, level="species",
                           levels=["family", "subfamily", "genus", "species"])
    said = row_words(result.rows[1], result)
    assert (said.answer, said.at_level, said.probability) == \
        ("Nymphalinae", " (subfamily)", "0.420")
    assert said.detail.startswith("closest: Aglais io 0.160; unknown score"), said.detail


def test_the_page_shows_the_coarsest_answers_first_each_by_the_probability_it_shows(tmp_path):
    """The least sure first: a family known only before a subfamily known only (it came
    after, sorted by its species' probability, which its card does not show)."""
    from wingspan.predict import PredictResult, predictions_page

    result = PredictResult(rows=_hierarchical_rows(), top_k=3, level="species",
                           levels=["family", "subfamily", "genus", "species"])
    page = predictions_page(result, tmp_path / "preds.html")
    said = [html.unescape(re.sub("<[^>]+>", "", s))
            for s in re.findall(r"</a><div>(.*?)</div>", page)]
    assert said == ["unknown", "Nymphalidae (family) 0.460", "Nymphalinae (subfamily) 0.420",
                    "Aglais io 0.900"], said


def test_the_page_links_a_name_in_other_bytes_and_says_each_skipped_file_once(tmp_path):
    """A photo named in bytes that are not UTF-8 (b'caf\\xe9.jpg') stopped the page's write
    once every image was predicted (the CSV and JSON spell it out); a skipped file's
    reason named its path twice ("a.jpg: Cannot read image a.jpg: ...")."""
    import os

    from wingspan.predict import PredictResult, predictions_page

    photo = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jpg"))
    Image.new("RGB", (40, 30), "red").save(photo, "JPEG")
    row = {"path": str(photo), "top": [("a", 0.9), ("b", 0.1)], "known_level": "label",
           "predicted": "a", "probability": 0.9, "answer": "a"}
    broken = str(tmp_path / "broken.jpg")
    result = PredictResult(rows=[row], top_k=2, level="label",
                           failed=[(broken, f"Cannot read image {broken}: the file is empty "
                                            "(0 bytes).")])
    page = predictions_page(result, tmp_path / "preds.html")
    page.encode("utf-8")  # (written as UTF-8)
    assert "href='caf%E9.jpg'" in page and "alt='caf\\udce9.jpg, answered a'" in page
    assert "broken.jpg: the file is empty (0 bytes).</li>" in page
