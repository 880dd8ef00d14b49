import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import write_image
from sklearn.metrics import f1_score
from test_train import _prepared_run, tiny

from wingspan.config import SplitConfig
from wingspan.data import read_dataset
from wingspan.data.ethec import IMAGE_DIR
from wingspan.data.split import split_and_sample
from wingspan.errors import WingspanError
from wingspan.evaluate.run import evaluate
from wingspan.inference import Predictor
from wingspan.models.bundle import read_manifest
from wingspan.parallel import local_fabric
from wingspan.predict import predict, write_predictions
from wingspan.run_table import run_row
from wingspan.training import train

LEVELS = ["family", "genus", "label"]


def test_level_weights_in_the_loss(demo_dir, tmp_path):
    from wingspan.training.stages import loss_fn

    run = _prepared_run(demo_dir, tmp_path, levels=LEVELS, level_weights=[1.0, 2.0, 3.0],
                        label_smoothing=0.0, class_weights="none")
    assert run.data.levels == LEVELS
    labels = run.data.train.labels
    outputs = {lv: torch.randn(len(labels), len(run.data.level_classes[lv])) for lv in LEVELS}
    per_level = [torch.nn.functional.cross_entropy(outputs[lv], labels[:, i])
                 for i, lv in enumerate(LEVELS)]
    by_hand = (1 * per_level[0] + 2 * per_level[1] + 3 * per_level[2]) / 6
    torch.testing.assert_close(loss_fn(run)(outputs, labels), by_hand)


def test_the_finest_level_must_learn(demo_dir):
    """Weight 0 on the finest level left untrained the one head every answer is read from
    (the coarser levels are summed from it); 0 on a coarser level is allowed."""
    from wingspan.config import TrainConfig
    from wingspan.training.run import resolve_levels

    data = read_dataset(demo_dir)
    with pytest.raises(WingspanError, match="finest level, 'label', weight 0") as e:
        resolve_levels(data, TrainConfig(levels=["label", "family"], level_weights=[0, 1]))
    assert "a coarser one may be 0" in e.value.hint
    resolved = resolve_levels(data, TrainConfig(levels=["label", "family"],
                                                level_weights=[1, 0]))
    assert (resolved.levels, resolved.level_weights) == (["family", "label"], [0, 1])


@pytest.fixture(scope="module")
def hierarchical_run(demo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hier")
    return train(read_dataset(demo_dir), tiny(tmp, levels=["label", "family", "genus"],
                                              rare_below=7), tmp / "runs", quiet=True)


def test_hierarchical_bundle_carries_the_taxonomy(hierarchical_run):
    manifest = read_manifest(hierarchical_run / "model")
    assert list(manifest["classes"]) == LEVELS  # ordered coarse to fine whatever was typed
    assert manifest["taxonomy"]["levels"] == LEVELS
    # The demo's smallest class (6 images, fewer than 7 in train) trains as its genus.
    rare = manifest["training"]["rare_classes"]
    assert "white_darktip" in rare and rare["white_darktip"].endswith("(rare label)")
    assert rare["white_darktip"] in manifest["classes"]["label"]
    # `wingspan runs` shows the levels learnt, coarse to fine.
    assert run_row(hierarchical_run)["levels"] == ",".join(LEVELS)
    # The unknown answer's MSP at the coarser levels is on the species' shares, the
    # probabilities predict shows there: the taxonomy's membership is kept for it.
    from wingspan.models import load_bundle

    _, _, detector = load_bundle(hierarchical_run / "model", with_unknown=True)
    assert list(detector.members) == LEVELS[:-1]
    for lv in LEVELS[:-1]:
        assert detector.members[lv].shape == (len(manifest["classes"][LEVELS[-1]]),
                                              len(manifest["classes"][lv]))


def test_a_taxonomy_that_does_not_match_the_classes_is_not_written(hierarchical_run,
                                                                      tmp_path):
    from wingspan.models import load_bundle, save_bundle

    model, manifest = load_bundle(hierarchical_run / "model")
    taxonomy = manifest["taxonomy"]
    save_bundle(model, tmp_path / "same", manifest["classes"], taxonomy)  # as trained: fine
    shuffled = {**taxonomy, "classes": {**taxonomy["classes"],
                                        "label": taxonomy["classes"]["label"][::-1]}}
    with pytest.raises(WingspanError, match="taxonomy's 'label' classes are not the model's"):
        save_bundle(model, tmp_path / "wrong", manifest["classes"], shuffled)
    assert not (tmp_path / "wrong").exists()


@pytest.mark.policy
def test_hierarchical_evaluation_and_prediction(hierarchical_run, demo_dir, tmp_path):
    result = evaluate(hierarchical_run, split="val", progress=False, workers=0)
    h = result.metrics["hierarchy"]
    assert set(h["levels"]) == set(LEVELS)
    assert h["consistency"]["marginalised"] == 1.0
    assert 0 <= h["consistency"]["heads"] <= 1
    assert sum(h["mistake_depth"].values()) == result.metrics["images"]
    assert "rare" in h and h["rare"]["images"] >= 1
    table = pd.read_csv(result.out_dir / "levels.csv")
    assert list(table.columns) == ["method", *LEVELS]  # each row names its figure
    assert table["method"].tolist() == ["micro-F1, marginalisation (consistent)",
                                        "macro-F1, marginalisation", "micro-F1, per-level heads"]
    assert (result.out_dir / "confusion_family.png").is_file()
    # predictions.csv holds each coarser level's truth and answer: the level's figures
    # can be recomputed from it.
    saved = pd.read_csv(result.out_dir / "predictions.csv", dtype=str, keep_default_na=False)
    for level in LEVELS[:-1]:
        right = (saved[f"true:{level}"] == saved[f"predicted:{level}"]).mean()
        assert right == pytest.approx(h["levels"][level]["accuracy"]), level
        # and each coarser level's classes have a table of their own, per_class.csv's
        # columns, whose recalls are the level's accuracy again
        per_class = pd.read_csv(result.out_dir / f"per_class_{level}.csv")
        assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support"]
        assert per_class["support"].sum() == (saved[f"true:{level}"] != "").sum()
        assert (per_class["recall"] * per_class["support"]).sum() / per_class[
            "support"].sum() == pytest.approx(right)
        assert per_class["f1"].mean() == pytest.approx(h["levels"][level]["macro_f1"])
    # Its answer and the level it is given at are predict's: a species merged by
    # --rare-below is answered at the genus (the CSV said known_level 'label' for it).
    rows = predict(Predictor(hierarchical_run, workers=0), saved["path"].tolist(),
                   progress=False).rows
    assert [(r["known_level"] or "", r["answer"]) for r in rows] == \
        list(zip(saved["known_level"], saved["answer"], strict=True))
    # ... and each coarser level's class and probability are predict's branch, as its
    # CSV gives them (evaluate gave the class alone)
    for r, (_, row) in zip(rows, saved.iterrows(), strict=True):
        for lv, c, p in r["taxonomy"][:-1]:
            assert row[f"predicted:{lv}"] == c
            assert float(row[f"probability:{lv}"]) == pytest.approx(p, abs=1e-6)
    assert (saved["known_level"] == "genus").any()  # (the tiny model's favourite is merged)
    # unknown.csv's too, for the same pixels taken as unseen (saved again losslessly, in a
    # folder of no class's name: copies of known images are refused as unseen).
    from PIL import Image

    pngs = []
    for i, path in enumerate(saved["path"]):
        with Image.open(path) as im:
            png = tmp_path / "unseen" / f"{i:03d}.png"
            png.parent.mkdir(exist_ok=True)
            im.convert("RGB").save(png)
        pngs.append(str(png))
    unseen = evaluate(hierarchical_run, split="val", unknown=tmp_path / "unseen",
                      progress=False, workers=0, plots=False, out=tmp_path / "scored")
    table = pd.read_csv(unseen.out_dir / "unknown.csv", dtype=str, keep_default_na=False)
    rows = {r["path"]: (r["known_level"] or "", r["answer"], r["predicted"]) for r in predict(
        Predictor(hierarchical_run, workers=0), pngs, progress=False).rows}
    assert list(zip(table["known_level"], table["answer"], table["predicted"],
                    strict=True)) == [rows[p] for p in table["path"]]
    # the answer's columns named and ordered as predictions.csv's, for a script reading both
    assert list(table.columns[:3]) == ["path", "answer", "known_level"]
    assert list(table.columns[-2:]) == ["predicted", "probability"]
    assert (table["known_level"] == "genus").any()
    page = result.report.read_text()
    assert "Per taxonomic level" in page
    assert " &gt; ".join(LEVELS) in page  # the header names every level the run learnt
    # Each level's accuracy and macro-F1 are in the page, and each coarser level's matrix.
    for level in LEVELS[:-1]:
        assert f"Confusion matrix: {level}" in page
        start = page.index(f"Confusion matrix: {level}")
        assert page[start:start + 400].count("data:image/png;base64,") == 1
    for level in LEVELS:
        assert f"<td>{level}</td>" in page
        assert f"<td>{h['levels'][level]['macro_f1']:.4f}</td>" in page
    # Predict shows the branch, each level's probability the sum over its descendants.
    image = next(demo_dir.rglob("*.jpg"))
    result = predict(Predictor(hierarchical_run, workers=0), [str(image)], progress=False)
    row = result.rows[0]
    assert [lv for lv, _, _ in row["taxonomy"]] == LEVELS
    probs = [p for _, _, p in row["taxonomy"]]
    assert probs == sorted(probs, reverse=True)  # a parent holds at least its child's share
    # The JSON names the branch as the server's answers and the library's table do.
    write_predictions(result, tmp_path / "preds.json")
    [said] = json.loads((tmp_path / "preds.json").read_text())["predictions"]
    assert [(b["level"], b["class"]) for b in said["branch"]] == \
        [(lv, c) for lv, c, _ in row["taxonomy"]]


def test_each_coarser_level_has_its_most_confused_pairs(hierarchical_run, tmp_path):
    """Above 60 classes a level's matrix names none of them (ETHEC's 135 genera): its most
    confused pairs, as the finest level's, were in neither metrics.json nor the page."""
    result = evaluate(hierarchical_run, split="val", progress=False, workers=0, plots=False,
                      out=tmp_path / "ev")
    saved = pd.read_csv(result.out_dir / "predictions.csv", dtype=str, keep_default_na=False)
    page = result.report.read_text()
    for level in LEVELS[:-1]:
        m = result.metrics["hierarchy"]["levels"][level]
        wrong = saved[saved[f"true:{level}"] != saved[f"predicted:{level}"]]
        counts = wrong.groupby([f"true:{level}", f"predicted:{level}"]).size()
        assert m["confused_pairs"] == len(counts) > 0, level
        assert len(m["most_confused"]) == min(15, len(counts))
        assert all(counts[p["true"], p["predicted"]] == p["count"] for p in m["most_confused"])
        cm = pd.read_csv(result.out_dir / f"confusion_{level}.csv", index_col=0)
        assert cm.to_numpy().sum() == (saved[f"true:{level}"] != "").sum()
        # beside the level's matrix, as the finest level's table is beside its own
        part = page.split(f"<h3>Confusion matrix: {level}</h3>")[1].split("<h3>Confusion")[0]
        assert f"<h3>Most confused: {level}" in part
        assert f"<td>{m['most_confused'][0]['true']}</td>" in part
        assert f"<th>predicted {level}</th>" in part
    # (each table a region a screen reader lists by its name: no two of one name)
    regions = re.findall(r"role='region'[^>]*aria-label='([^']*)'", page)
    assert len(regions) == len(set(regions)) > len(LEVELS)
    # Each pair, the finest level's and a coarser one's, names the deepest level its two
    # classes share in the model's tree ("none": apart at the top); the coarsest, none.
    from wingspan.data.taxonomy import Taxonomy

    tree = Taxonomy.from_dict(read_manifest(hierarchical_run / "model")["taxonomy"])
    for lv, pairs in [("genus", result.metrics["hierarchy"]["levels"]["genus"]["most_confused"]),
                      ("label", result.metrics["most_confused"])]:
        index = {c: i for i, c in enumerate(tree.classes[lv])}
        up = {u: tree.parent_of(lv, u) for u in LEVELS[:LEVELS.index(lv)]}
        assert pairs, lv
        for p in pairs:
            t, q = index[p["true"]], index[p["predicted"]]
            same = [u for u, a in up.items() if a[t] == a[q]]
            assert p["shared_level"] == (same[-1] if same else "none"), (lv, p)
    assert "shared_level" not in result.metrics["hierarchy"]["levels"]["family"][
        "most_confused"][0]
    assert "<th>shared level</th>" in page.split("<h2>Confusion matrix</h2>")[1]


def test_evaluate_scores_the_branch_not_the_finest_heads_top_class(hierarchical_run,
                                                                   monkeypatch, tmp_path):
    """The branch can differ from the finest head's own top class (a likelier family whose
    species are each less likely): evaluate scores the branch, as predict answers it. A
    branch that always ends in the least likely species makes the two differ here."""
    from wingspan.data.taxonomy import Taxonomy

    chosen = Taxonomy.predict

    def least_likely_species(self, fine_probs, *, temperature):
        return {**chosen(self, fine_probs, temperature=temperature),
                self.finest: fine_probs.argmin(1)}

    monkeypatch.setattr(Taxonomy, "predict", least_likely_species)
    result = evaluate(hierarchical_run, split="val", out=tmp_path / "ev", progress=False,
                      workers=0)
    saved = pd.read_csv(result.out_dir / "predictions.csv")
    probs = saved.filter(like="p:").to_numpy()
    species = [c.removeprefix("p:") for c in saved.filter(like="p:").columns]
    assert saved["predicted"].tolist() == [species[i] for i in probs.argmin(1)]
    assert result.metrics["accuracy"] == pytest.approx((saved["predicted"] == saved["true"]).mean())
    assert result.metrics["accuracy"] == pytest.approx(
        result.metrics["hierarchy"]["levels"]["label"]["accuracy"])


def test_photos_without_the_coarser_levels_are_scored_at_them_from_the_models_tree(
        hierarchical_run, demo_dir, tmp_path):
    """Species folders and no taxonomy.csv: each coarser level's truth is the model's own
    parent of the folder's class, so the figures are those of the data with its table."""
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(demo_dir, plain, ignore=shutil.ignore_patterns("taxonomy.csv"))
    assert read_dataset(plain).levels == ["label"]
    with_table, without = (
        evaluate(hierarchical_run, data, split="all", progress=False, workers=0, plots=False,
                 out=tmp_path / f"ev-{data.name}").metrics["hierarchy"]
        for data in (demo_dir, plain))
    assert without["levels"] == with_table["levels"]
    assert without["mistake_depth"] == with_table["mistake_depth"]
    # (evaluated without plots: each coarser level's matrix says so in its place)
    page = " ".join((tmp_path / "ev-plain" / "report.html").read_text().split())
    for level in list(without["levels"])[:-1]:  # the model's coarser levels
        assert (f"Confusion matrix: {level}</h3><div class='grid'><p class='missing'>"
                f"(confusion matrix of {level}: not drawn") in page, level


def test_a_level_the_data_leaves_blank_is_left_out_of_the_answers_there_too(
        hierarchical_run, demo_dir, tmp_path):
    """Images whose genus the data leaves blank are out of the genus figures; the answers'
    "named at genus or finer" counted them, against the genus the model's tree gives."""
    table = read_dataset(demo_dir).table
    blank = table.index[::9]
    table.loc[blank, "genus"] = ""
    table[["path", "family", "genus", "label"]].to_csv(tmp_path / "blank.csv", index=False)
    metrics = evaluate(hierarchical_run, tmp_path / "blank.csv", split="all", progress=False,
                       workers=0, plots=False, out=tmp_path / "ev").metrics
    assert metrics["hierarchy"]["levels"]["genus"]["no_truth"] == len(blank)
    got = pd.read_csv(tmp_path / "ev" / "predictions.csv", keep_default_na=False)
    has = got["true:genus"] != ""
    assert (~has).sum() == len(blank)
    genus = metrics["answers"]["by_level"]["genus"]
    answered = got["known_level"].isin(["genus", "label"])  # at the genus or finer
    assert genus["named"] == pytest.approx(answered[has].mean())
    right = got["true:genus"] == got["predicted:genus"]
    assert genus["named_wrongly"] == pytest.approx((answered & ~right)[has].mean())


def test_data_that_names_the_finest_level_otherwise_is_scored_at_every_level(
        demo_dir, tmp_path, capsys, monkeypatch):
    """A model whose finest level is 'species' (a taxonomy.csv's), evaluated on a CSV of
    path,label whose labels are species: the label column is the species' truth (it was a
    KeyError once every image had been predicted)."""
    table = read_dataset(demo_dir).table
    own = train(read_dataset(demo_dir), tiny(tmp_path, levels=["family", "species"],
                                              epochs_finetune=0), tmp_path / "runs",
                quiet=True)
    table[["path", "species"]].rename(columns={"species": "label"}).to_csv(
        tmp_path / "photos.csv", index=False)
    assert read_dataset(tmp_path / "photos.csv").levels == ["label"]
    from wingspan.cli.common import out
    from wingspan.cli.evaluate import print_evaluation

    monkeypatch.setattr(out, "_width", 200)  # a table row on a line, whatever the terminal

    evaluations = [evaluate(own, data, split="all", progress=False, workers=0, plots=False,
                            out=tmp_path / f"ev-{i}")
                   for i, data in enumerate((tmp_path / "photos.csv", demo_dir))]
    by_label, by_species = (e.metrics for e in evaluations)
    assert by_label["images"] == len(table)
    assert by_label["hierarchy"]["levels"] == by_species["hierarchy"]["levels"]
    # On screen: each level's micro- and macro-F1.
    print_evaluation(evaluations[0])
    said = " ".join(capsys.readouterr().out.split())
    macro = " │ ".join(f"{v['macro_f1']:.4f}" for v in by_label["hierarchy"]["levels"].values())
    assert f"macro-F1, marginalisation │ {macro} │" in said, said


def test_other_names_mapped_are_scored_at_every_level_as_the_same_photos(
        hierarchical_run, demo_dir, tmp_path):
    """The demo's photos in renamed class folders, each mapped back: every level's figures
    are those of the photos under their own names (the coarser ones from the model's
    tree), not 0 for a truth looked up under the data's names."""
    import shutil

    rare = read_manifest(hierarchical_run / "model")["training"]["rare_classes"]
    classes = sorted(p.name for p in demo_dir.iterdir() if p.is_dir() and p.name not in rare)
    for c in classes:
        shutil.copytree(demo_dir / c, tmp_path / "same" / c)
        shutil.copytree(demo_dir / c, tmp_path / "renamed" / f"{c}-here")
    own, mapped = (evaluate(hierarchical_run, tmp_path / name, split="all", progress=False,
                            workers=0, out=tmp_path / f"ev-{name}",
                            class_map=class_map).metrics["hierarchy"]
                   for name, class_map in [("same", None),
                                           ("renamed", {c: f"{c}-here" for c in classes})])
    assert mapped["levels"] == own["levels"]
    assert mapped["mistake_depth"] == own["mistake_depth"]


def test_a_taxonomy_model_whose_names_end_in_a_space_is_scored_at_every_level(
        hierarchical_run, tmp_path):
    """A model trained before folder names and taxonomy.csv values lost their end spaces
    knows 'azure_spotwing ' in 'Pixelia ' in 'Lycaenidae ' (and the rare 'white_darktip '
    as 'Chalkia  (rare label)') where its own splits.csv now reads the names without:
    every level scores as it did, not as classes the model does not know."""
    import shutil

    from wingspan.models.bundle import meaning_digest, update_manifest

    def old(name: str) -> str:  # the name the model was trained with
        return name.replace(" (rare", "  (rare") if name.endswith(" (rare label)") else name + " "

    def padded(classes: dict) -> dict:
        return {lv: [old(c) for c in names] for lv, names in classes.items()}

    copy = tmp_path / "old"
    shutil.copytree(hierarchical_run, copy)
    manifest = read_manifest(copy / "model")
    training = manifest["training"]
    changes = {"classes": padded(manifest["classes"]),
               "taxonomy": {**manifest["taxonomy"],
                            "classes": padded(manifest["taxonomy"]["classes"])},
               "training": {**training, "rare_classes": {
                   old(k): old(v) for k, v in training["rare_classes"].items()}}}
    update_manifest(copy / "model", **changes,
                    meaning_sha256=meaning_digest({**manifest, **changes}))
    before, after = (evaluate(run, split="val", progress=False, workers=0, plots=False,
                              out=tmp_path / f"ev-{run.name}").metrics
                     for run in (hierarchical_run, copy))
    # Right answers to lose at every level, and a rare class among the images.
    assert all(f["accuracy"] > 0 for f in before["hierarchy"]["levels"].values())
    assert before["hierarchy"]["rare"]["images"] > 0
    assert after["images"] == before["images"] and not after["unknown_class_images"]
    assert after["accuracy"] == pytest.approx(before["accuracy"])
    # (the most confused pairs name the classes as each model knows them, end spaces too)
    for h in (before["hierarchy"], after["hierarchy"]):
        for m in h["levels"].values():
            for p in m.get("most_confused", []):
                p["true"], p["predicted"] = p["true"].strip(), p["predicted"].strip()
    assert after["hierarchy"] == before["hierarchy"]
    levels = [pd.read_csv(tmp_path / f"ev-{run.name}" / "levels.csv")
              for run in (hierarchical_run, copy)]
    pd.testing.assert_frame_equal(*levels)
    # The run's own images (what calibrate --unknown and adapt fit on) are the same too.
    from wingspan.evaluate.own_images import own_images

    ours, theirs = (own_images(Predictor(run, workers=0), "fit", progress=False)
                    for run in (hierarchical_run, copy))
    for part in ("train", "val"):
        assert theirs[part].paths == ours[part].paths
        for lv in LEVELS:
            np.testing.assert_array_equal(theirs[part].labels[lv], ours[part].labels[lv])


def test_an_answer_stopped_at_a_coarse_level_gives_that_levels_score(
        hierarchical_run, demo_dir, tmp_path, monkeypatch, run_cli):
    """Known as a family, not as a genus: the score shown is the genus's, over its
    threshold (not the finest level's, under its own), and the probability the family's;
    the CSV carries the branch the table shows."""
    from wingspan.inference import Predictor

    real = Predictor.thresholds.fget
    monkeypatch.setattr(Predictor, "thresholds", property(
        lambda self: {**real(self), "family": 1e9, "genus": -1e9}))  # genus turns all away
    image = sorted(demo_dir.rglob("*.jpg"))[0]
    code, out, err = run_cli("predict", hierarchical_run, image, "--device", "cpu",
                             "--output", tmp_path / "p.csv", "--quiet")
    assert code == 0, err
    row = pd.read_csv(tmp_path / "p.csv").iloc[0]
    assert list(row.index[:10]) == ["path", "answer", "predicted", "probability", "family",
                                    "family_prob", "genus", "genus_prob", "label", "label_prob"]
    # The prediction is the branch's species, not the top class by its own probability
    assert (row["predicted"], row["probability"]) == (row["label"], row["label_prob"])
    assert (row["known_level"], row["score_level"]) == ("family", "genus")
    assert row["answer"] == row["family"] and row["unknown_score"] > row["threshold"]
    assert f"{row['family_prob']:.3f}" in out and "at genus" in out
    assert "0 images are unlike the classes the model knows, 1 known at a coarser" in out


def test_predicts_table_shows_the_top_k_of_a_run_with_levels(hierarchical_run, demo_dir,
                                                             run_cli):
    """--top-k 1, 3 and 10 printed the same table for a run with --levels: the branch alone,
    where the CSV lists the finest level's top k."""
    image = sorted(demo_dir.rglob("*.jpg"))[0]
    shown = {}
    for k in (1, 3):
        code, out, err = run_cli("predict", hierarchical_run, image, "--device", "cpu",
                                 "--top-k", k, "--quiet")
        assert code == 0, err
        shown[k] = out
    # "other", not "next": the branch is chosen top-down, one of them can be likelier
    assert "other" not in shown[1] and "other 2 label" in shown[3] and "next" not in shown[3]
    probabilities = {k: len(re.findall(r"\b\d\.\d\d\b", out)) for k, out in shown.items()}
    assert probabilities[3] == probabilities[1] + 2, shown


def test_predicts_table_of_a_run_with_levels_shows_fewer_rows(hierarchical_run, demo_dir,
                                                              run_cli):
    """A taxonomy's branch takes 7-9 lines an image at 80 columns: its first 50 images were
    466 lines of a 4-level model's table. 15 are shown (a flat model's 50), the caption
    says how many, and --output writes all."""
    from wingspan.config import PREDICT_ROWS_TAXONOMY

    photos = sorted(demo_dir.rglob("*.jpg"))
    assert len(photos) > PREDICT_ROWS_TAXONOMY
    code, out, err = run_cli("predict", hierarchical_run, demo_dir, "--device", "cpu",
                             "--quiet")
    assert code == 0, err
    said = " ".join(out.split())
    assert f"first {PREDICT_ROWS_TAXONOMY} of {len(photos)}; --output FILE writes all" in said
    # (a row's first line starts its path; the path folds onto the lines below it)
    starts = [line for line in out.splitlines() if line.startswith(f"│ {str(demo_dir)[:8]}")]
    assert len(starts) == PREDICT_ROWS_TAXONOMY, out


def test_explain_draws_the_branch_that_predict_answers(hierarchical_run, demo_dir, tmp_path):
    from wingspan.explain import explain

    paths = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))[::5]]
    said = predict(Predictor(hierarchical_run, "cpu", "fp32", runtime="torch", workers=0),
                   paths, progress=False).rows
    shown = explain(hierarchical_run, paths, tmp_path)
    assert [e.label for e in shown] == [r["taxonomy"][-1][1] for r in said]
    assert [e.answer for e in shown] == [r["answer"] for r in said]


def test_hierarchical_family_accuracy_is_not_worse_than_family_only(demo_dir, tmp_path):
    """The small version of the iNat check: marginalised family predictions of a run on
    all levels against a run trained on family alone (same data, seed and budget), on
    ImageNet features (Lite0's installed weights; the random test network's are at
    chance, where the two would differ by luck alone) in fp32 PyTorch on every CPU."""
    same = dict(epochs_head=6, epochs_finetune=0, backbone="efficientnet_lite0",
                weights="auto", image_size=64, precision="fp32", runtime="torch")
    hier = train(read_dataset(demo_dir), tiny(tmp_path, levels=LEVELS, **same),
                 tmp_path / "h", quiet=True)
    flat = train(read_dataset(demo_dir), tiny(tmp_path, level="family", **same),
                 tmp_path / "f", quiet=True)
    h = evaluate(hier, split="val", progress=False, workers=0, plots=False).metrics
    f = evaluate(flat, split="val", progress=False, workers=0, plots=False).metrics
    family = h["hierarchy"]["levels"]["family"]["accuracy"]
    assert f["accuracy"] >= 0.8  # a family model that learnt something to compare with
    assert family >= f["accuracy"] - 1 / f["images"]  # at most one val image worse


def test_evaluating_data_whose_taxonomy_contradicts_itself_is_refused_as_training_is(
        hierarchical_run, demo_dir, tmp_path):
    """Its coarser levels are the truth of the per-level figures: one species under two
    families would be scored against a truth that is no tree."""
    import shutil

    data = shutil.copytree(demo_dir, tmp_path / "data")
    table = pd.read_csv(data / "taxonomy.csv", dtype=str)
    other = table.loc[table["family"] != table.loc[0, "family"], "genus"].iloc[0]
    table.loc[0, "genus"] = other  # that genus now under two families
    table.to_csv(data / "taxonomy.csv", index=False)
    with pytest.raises(WingspanError, match="data's taxonomy contradicts itself"):
        evaluate(hierarchical_run, data, split="all", progress=False, workers=0, plots=False,
                 out=tmp_path / "ev")


def test_data_whose_tree_places_a_class_otherwise_than_the_models_is_said(
        hierarchical_run, demo_dir, tmp_path):
    """A revised taxonomy (a genus moved to another family, common between sources) was
    scored against without a word: the answers right at the species counted as wrong at
    the family, 0.70 there beside 0.97 named right in the same report."""
    import html
    import shutil

    import wingspan as ws
    from wingspan.evaluate.wording import tree_wording

    data = shutil.copytree(demo_dir, tmp_path / "data")
    table = pd.read_csv(data / "taxonomy.csv", dtype=str)
    genus, family = table.loc[0, "genus"], table.loc[0, "family"]
    elsewhere = table.loc[table["family"] != family, "family"].iloc[0]
    table.loc[table["genus"] == genus, "family"] = elsewhere  # the whole genus: still a tree
    table.to_csv(data / "taxonomy.csv", index=False)
    metrics = evaluate(hierarchical_run, data, split="all", progress=False, workers=0,
                       plots=False, out=tmp_path / "ev").metrics
    moved = sorted(table.loc[table["genus"] == genus, "folder"])
    assert metrics["tree_differs"] == [f"{c}: family {elsewhere} here, {family} in the model"
                                       for c in moved]
    said = tree_wording(metrics)
    assert said.startswith(f"The data's taxonomy places {len(moved)} class")
    assert html.escape(said) in (tmp_path / "ev" / "report.html").read_text()
    with pytest.warns(UserWarning, match="The data's taxonomy places"):
        ws.load(hierarchical_run).evaluate(data, split="all", quiet=True, plots=False,
                                           out=tmp_path / "ev2")
    # its own data: nothing said
    assert "tree_differs" not in evaluate(hierarchical_run, demo_dir, split="all",
                                          progress=False, workers=0, plots=False,
                                          out=tmp_path / "ev3").metrics


def test_contradictory_taxonomy_stops_training(demo_dir, tmp_path):
    ds = read_dataset(demo_dir)
    ds.table.loc[ds.table.index[0], "family"] = "Wrongidae"
    with pytest.raises(WingspanError, match="taxonomy contradicts itself"):
        train(ds, tiny(tmp_path, levels=LEVELS), tmp_path / "runs", quiet=True)
    # In the test split too: its images would be scored against a tree that says otherwise.
    ds = read_dataset(demo_dir)
    ds.table["split"] = "train"
    ds.table.loc[ds.table.index[::5], "split"] = "val"
    ds.table.loc[ds.table.index[1::5], "split"] = "test"
    ds.table.loc[ds.table.index[1], "family"] = "Wrongidae"
    with pytest.raises(WingspanError, match="taxonomy contradicts itself"):
        train(ds, tiny(tmp_path, levels=LEVELS), tmp_path / "runs", quiet=True)


BIG_FAMILY = ["azure_spotwing", "orange_veined", "white_darktip"]


def _one_big_family(demo_dir):
    """The demo with three of its four species in one family: the family's summed
    probability can win where none of its species is the top class, so the top-down
    branch and the flat argmax differ (in the demo as generated each family has one)."""
    dataset = read_dataset(demo_dir)
    dataset.table.loc[dataset.table["label"].isin(BIG_FAMILY), "family"] = "Nymphalidae"
    return dataset


def test_the_epoch_is_scored_on_the_branch_not_the_finest_heads_top_class(demo_dir, tmp_path):
    """Hand-made logits where the top class (yellow_tailwing) is alone in its family and the
    other family's three species together are likelier: the score counts the branch."""
    from wingspan.training.prepare import ensure_splits
    from wingspan.training.run import start_run
    from wingspan.training.stages import _scores

    config = tiny(tmp_path, levels=["family", "label"])
    dataset = ensure_splits(_one_big_family(demo_dir), "label", config, log=lambda _: None)
    (tmp_path / "run").mkdir()
    run = start_run(tmp_path / "run", config, dataset, quiet=True, checkpoint=None,
                 fabric=local_fabric("cpu"))
    classes, families = run.data.classes, run.data.level_classes["family"]
    assert families == ["Nymphalidae", "Papilionidae"]
    azure, orange, yellow = (classes.index(c) for c in
                             ("azure_spotwing", "orange_veined", "yellow_tailwing"))
    # Rows 1-2: yellow_tailwing 0.4 and 0.2 each of the others, so the argmax is
    # yellow_tailwing, but Nymphalidae holds 0.6 and the branch ends in its first species
    # (azure_spotwing, on a tie). Row 3: clearly yellow_tailwing either way.
    probs = torch.full((3, 4), 0.2)
    probs[:2, yellow] = 0.4
    probs[2] = 0.1
    probs[2, yellow] = 0.7
    outputs = {"label": probs.log(), "family": torch.zeros(3, 2)}
    truth = [azure, orange, yellow]
    labels = torch.tensor([[int(c == yellow), c] for c in truth])  # (family, label)
    scores = _scores(run, outputs, labels)
    flat = outputs["label"].argmax(1).tolist()
    assert flat == [yellow] * 3  # would score accuracy 1/3, macro-F1 1/6
    branch = [azure, azure, yellow]
    assert scores["acc"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx(f1_score(truth, branch, average="macro"))
    assert scores["macro_f1"] == pytest.approx(5 / 9)  # azure 2/3, orange 0, yellow 1


def test_the_kept_epochs_val_score_is_that_of_what_predict_answers(demo_dir, tmp_path):
    """A taxonomy run keeps the epoch whose branch answers score best on val: the kept
    epoch's val macro-F1 in the history is the macro-F1 of the kept model's top-down
    branches on the val images, computed here by hand (at temperature 1, as in training)."""
    run_dir = train(_one_big_family(demo_dir), tiny(tmp_path, levels=["family", "label"]),
                    tmp_path / "runs", quiet=True)
    best = json.loads((run_dir / "metrics.json").read_text())["best"]
    h = pd.read_csv(run_dir / "history.csv")
    kept = h[(h["stage"] == best["stage"]) & (h["epoch"] == best["epoch"])].iloc[0]
    assert kept["val_macro_f1"] == h["val_macro_f1"].max()
    splits = pd.read_csv(run_dir / "splits.csv")
    val = splits[splits["split"] == "val"]
    predictor = Predictor(run_dir, workers=0)
    classes = predictor.classes
    logits = np.stack([p.logits for p in predictor.run(val["path"].tolist(), progress=False)])
    probs = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    family_of = val.drop_duplicates("label").set_index("label")["family"]
    families = sorted(set(family_of))
    in_family = np.array([[family_of[c] == f for f in families] for c in classes])
    top_family = (probs @ in_family).argmax(1)
    branch = np.where(in_family[:, top_family].T, probs, -1).argmax(1)
    truth = val["label"].map(classes.index).to_numpy()
    flat = f1_score(truth, probs.argmax(1), average="macro", zero_division=0)
    # The premise: a model near chance puts the three-species family first, and its own
    # top class need not be in it (here they differ).
    assert (branch != probs.argmax(1)).any()
    assert kept["val_macro_f1"] != pytest.approx(flat, abs=1e-5)
    assert kept["val_macro_f1"] == pytest.approx(
        f1_score(truth, branch, average="macro", zero_division=0), abs=1e-5)
    assert kept["val_acc"] == pytest.approx((branch == truth).mean(), abs=1e-5)


def test_ethec_end_to_end_on_a_sample(shared_data, tmp_path):
    """Real ETHEC split files, generated images at their paths, a grouped re-split, a
    hierarchical run on all four levels and the per-level table."""
    root = tmp_path / "ethec"
    (root / "splits").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        records = json.loads((shared_data / "ethec-splits" / f"{split}.json").read_text())
        genera = {"Pieris", "Erebia", "Polyommatus", "Parnassius"}
        keep = {k: r for k, r in records.items() if r["genus"] in genera}
        keep = dict(list(keep.items())[:150])
        (root / "splits" / f"{split}.json").write_text(json.dumps(keep))
        for r in keep.values():
            write_image(root / IMAGE_DIR / r["image_path"] / r["image_name"], size=(40, 40),
                        seed=int(rng.integers(1 << 30)), fmt="JPEG")
    dataset = read_dataset(root)
    assert dataset.levels == ["family", "subfamily", "genus", "species"]
    split = split_and_sample(dataset, tmp_path / "split", "species",
                             SplitConfig(val_fraction=0.2, test_fraction=0.2))
    run = train(read_dataset(split.splits_csv),
                tiny(tmp_path, levels=["family", "subfamily", "genus", "species"],
                     rare_below=3, epochs_head=3, epochs_finetune=1), tmp_path / "runs",
                quiet=True)
    result = evaluate(run, progress=False, workers=0, plots=False)
    table = pd.read_csv(result.out_dir / "levels.csv")
    assert list(table.columns) == ["method", "family", "subfamily", "genus", "species"]
    assert result.metrics["hierarchy"]["consistency"]["marginalised"] == 1.0


@pytest.fixture(scope="module")
def pretrained_hierarchical_run(demo_dir, tmp_path_factory):
    """The taxonomy run on EfficientNet-Lite0's installed ImageNet weights at 64 pixels:
    features that tell the demo's classes apart (the random test network's are at chance,
    and a head and label spreading at chance agree on 4 of 43 photos, or on none)."""
    tmp = tmp_path_factory.mktemp("hier-lite0")
    return train(read_dataset(demo_dir),
                 tiny(tmp, levels=["label", "family", "genus"], rare_below=7,
                      backbone="efficientnet_lite0", weights="auto", image_size=64),
                 tmp / "runs", quiet=True)


def test_adapt_refits_every_level_of_a_taxonomy_run(pretrained_hierarchical_run, demo_dir,
                                                     tmp_path):
    from wingspan.config import IMAGE_EXTENSIONS, AdaptConfig
    from wingspan.training.adapt import adapt

    run = pretrained_hierarchical_run
    photos = sorted(p for p in demo_dir.rglob("*") if p.suffix in IMAGE_EXTENSIONS)
    done = adapt(run, [str(p) for p in photos], tmp_path / "adapted", AdaptConfig(rounds=2),
                 progress=False, workers=0)
    # Every level's head was fitted on the training images and photos, including the rare
    # class that trains under its genus's name; on features that separate the classes, the
    # head and label spreading agree on most photos (36-41 of 43 measured).
    assert set(done["photos_used_per_round"]) == set(LEVELS)
    assert all(len(used) == 2 and len(photos) / 2 < min(used) and max(used) <= len(photos)
               for used in done["photos_used_per_round"].values())
    assert not done["classes_without_training_images"]
    manifest = read_manifest(tmp_path / "adapted" / "model")
    old = read_manifest(run / "model")
    assert manifest["classes"] == old["classes"] and manifest["taxonomy"] == old["taxonomy"]
    assert manifest["training"]["rare_classes"] == old["training"]["rare_classes"]
    assert set(manifest["unknown"]["levels"]) == set(LEVELS)
    preds = list(Predictor(tmp_path / "adapted", workers=0).run([str(p) for p in photos[:4]],
                                                                 progress=False))
    assert all(set(p.heads) == set(LEVELS[:-1]) and p.unknown for p in preds)
    assert json.loads((tmp_path / "adapted" / "adapt.json").read_text())["photos"] == len(photos)
    # Its val figures are what evaluate gives: the top-down branch's answers, at the
    # temperature fitted again.
    result = evaluate(tmp_path / "adapted", split="val", progress=False, workers=0, plots=False)
    assert result.metrics["accuracy"] == pytest.approx(done["val_accuracy"])
    assert result.metrics["ece"] == pytest.approx(manifest["calibration"]["val_ece_after"],
                                                  abs=1e-6)
    # What it says changed is what predict answers, the branch's class (it counted the
    # finest head's top class, which the branch matches on every photo here). Within a
    # photo: the engines may differ on a near tie.
    from collections import Counter

    from wingspan.predict import predict

    answered = {name: [row["taxonomy"][-1][1] for row in predict(
        Predictor(model, workers=0), [str(p) for p in photos], progress=False).rows]
        for name, model in (("before", run), ("after", tmp_path / "adapted"))}
    changed = np.mean([a != b for a, b in zip(*answered.values(), strict=True)])
    assert done["changed"] == pytest.approx(changed, abs=1.01 / len(photos))
    for when in ("before", "after"):
        counts = Counter(answered[when])
        assert sum(abs(n - counts[c]) for c, n in done[f"classes_{when}"].items()) <= 2


def test_refitting_refuses_a_splits_csv_whose_coarse_classes_the_model_does_not_know(
        hierarchical_run, tmp_path):
    import shutil

    from wingspan.evaluate.own_images import own_images

    copy = tmp_path / "run"
    shutil.copytree(hierarchical_run, copy)
    splits = pd.read_csv(copy / "splits.csv")
    family = splits.family.iloc[0]
    splits.loc[splits.family == family, "family"] = "Renamedidae"  # edited by hand
    splits.to_csv(copy / "splits.csv", index=False)
    with pytest.raises(WingspanError, match="family classes the model does not know: "
                                            "Renamedidae"):
        own_images(Predictor(copy, workers=0), "calibrating needs", progress=False)


def test_a_blank_level_cell_in_a_csv_names_the_level_and_what_other_rows_give(tmp_path):
    """A genus left blank on one row: the hint said to complete a taxonomy.csv the user
    never had, and not which level was missing."""
    from helpers import folder_dataset

    from wingspan.training.prepare import plan_labels

    folder_dataset(tmp_path, {"a": 4, "b": 4})
    rows = [f"a/a_{i}.jpg,Pieris rapae,{'' if i == 2 else 'Pieris'},Pieridae,"
            f"{'val' if i == 3 else 'train'}" for i in range(4)]
    rows += [f"b/b_{i}.jpg,Papilio machaon,Papilio,Papilionidae,{'val' if i == 3 else 'train'}"
             for i in range(4)]
    csv = tmp_path / "specimens.csv"
    csv.write_text("path,label,genus,family,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(WingspanError, match=r"a_2\.jpg \(no genus; other rows of label "
                       r"'Pieris rapae' give 'Pieris'\)[\s\S]*level columns of specimens\.csv"):
        plan_labels(read_dataset(csv), LEVELS, tiny(tmp_path, levels=LEVELS), log=lambda _: None)
    # A level named with a '.' (torch's module names refuse it): said, not a KeyError.
    csv.write_text("path,label,sub.family,split\n" + "".join(
        f"{c}/{c}_{i}.jpg,{c},F{c},{'val' if i == 3 else 'train'}\n" for c in "ab"
        for i in range(4)))
    with pytest.raises(WingspanError, match="The level 'sub.family' cannot be trained") as e:
        plan_labels(read_dataset(csv), ["sub.family", "label"],
                    tiny(tmp_path, levels=["sub.family", "label"]), log=lambda _: None)
    assert "sub_family" in e.value.hint
    # A level named as one of predict's CSV columns made two columns of that name.
    for name in ("answer", "class_1", "label_prob", "predicted"):
        csv.write_text(f"path,label,{name},split\n" + "".join(
            f"{c}/{c}_{i}.jpg,{c},F{c},{'val' if i == 3 else 'train'}\n" for c in "ab"
            for i in range(4)))
        with pytest.raises(WingspanError, match=f"The level '{name}' cannot be trained: its "
                           "name is one of predict's own output columns") as e:
            plan_labels(read_dataset(csv), [name, "label"], tiny(tmp_path, levels=[name, "label"]),
                        log=lambda _: None)
        assert f"{name}_level" in e.value.hint


def test_training_figures_count_the_answer_as_val_does(demo_dir, tmp_path, monkeypatch):
    """train_acc and train_macro_f1 score the class predict would answer (the top-down
    branch, with a taxonomy), as val's figures do: with the answer stubbed to the first
    class, every epoch's train accuracy is that class's share of the training images."""
    from wingspan.training import stages

    answered = []

    def first_class(run, outputs):
        answered.append(len(outputs["label"]))
        return torch.zeros(len(outputs["label"]), dtype=torch.long)

    monkeypatch.setattr(stages, "_answered", first_class)
    run_dir = train(_one_big_family(demo_dir), tiny(tmp_path, levels=["family", "label"]),
                    tmp_path / "runs", quiet=True)
    splits = pd.read_csv(run_dir / "splits.csv")
    first = sorted(splits["label"].unique())[0]
    share = {s: (part["label"] == first).mean() for s, part in splits.groupby("split")}
    h = pd.read_csv(run_dir / "history.csv")
    assert set(h["stage"]) == {"head", "finetune"} and answered
    assert h["train_acc"].to_numpy() == pytest.approx(share["train"], abs=1e-4)
    assert h["val_acc"].to_numpy() == pytest.approx(share["val"], abs=1e-4)


@pytest.mark.parametrize("tta", [False, True])
def test_msp_rates_the_class_the_answer_names_at_every_level(pretrained_hierarchical_run,
                                                             demo_dir, tta):
    """A taxonomy's MSP is 1 - the probability predict shows for the branch's class at each
    level. With --tta too: scored on the views' mean logits, it rated another branch's
    class than the answer's (2 of 80 images) and so changed where an answer stopped."""
    from wingspan.config import IMAGE_EXTENSIONS
    from wingspan.inference import Predictor
    from wingspan.predict import taxonomy_path

    predictor = Predictor(pretrained_hierarchical_run, workers=0, unknown_score="msp")
    assert predictor.unknown.temperature == predictor.temperature  # (as training fits them)
    photos = sorted(str(p) for p in demo_dir.rglob("*") if p.suffix in IMAGE_EXTENSIONS)
    for p in predictor.run(photos, tta=tta, progress=False):
        branch = taxonomy_path(predictor.taxonomy, p.probs, predictor.temperature)
        assert [p.unknown[lv] for lv, _, _ in branch] == pytest.approx(
            [1 - shown for _, _, shown in branch], abs=1e-4), p.path


def test_a_rare_below_that_takes_every_class_says_so(demo_dir, tmp_path):
    """--rare-below 100 on classes of 8-20 training images: every species trained as its
    genus, with only the usual info line; now a warning says none is learnt as a species."""
    from wingspan.training.prepare import ensure_splits, plan_labels

    logs = []
    config = tiny(tmp_path, levels=["family", "label"], rare_below=1000)
    dataset = ensure_splits(read_dataset(demo_dir), "label", config, log=logs.append)
    plan = plan_labels(dataset, ["family", "label"], config, log=logs.append)
    assert all(c.endswith("(rare label)") for c in plan.classes["label"])
    assert any(line.startswith("Warning: that is every 'label' class: none is learnt as such")
               for line in logs), logs
    logs.clear()
    config = tiny(tmp_path, levels=["family", "label"], rare_below=3)
    plan_labels(ensure_splits(read_dataset(demo_dir), "label", config, log=logs.append),
                ["family", "label"], config, log=logs.append)
    assert not any("every 'label' class" in line for line in logs)


def test_an_export_answers_a_merged_rare_species_at_its_genus_as_predict_does(
        hierarchical_run, demo_dir, tmp_path):
    """The export's metadata did not say which classes --rare-below merged: a program
    following the README's steps answered 'Chalkia (rare label)' as a species, where
    predict answers the genus, for every image of it."""
    from test_export import run_readme_onnx_example

    from wingspan.export import export_model, metadata_path

    model = export_model(hierarchical_run, out=tmp_path / "model.onnx")
    merged = read_manifest(hierarchical_run / "model")["training"]["rare_classes"][
        "white_darktip"]
    assert json.loads(metadata_path(model).read_text())["merged_classes"] == [merged]
    images = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))[::3]]
    said = predict(Predictor(hierarchical_run, workers=0, precision="fp32"), images,
                   progress=False).rows
    theirs = run_readme_onnx_example(model, images)
    assert any(r["taxonomy"][-1][1] == merged for r in said)  # (the tiny model's favourite)
    assert [r["answer"] for r in said] == [r["answer"] for r in theirs]
    assert merged not in {r["answer"] for r in theirs}


def test_a_rare_species_merged_into_its_genus_is_answered_at_the_genus(hierarchical_run,
                                                                         demo_dir, run_cli):
    """--rare-below trains white_darktip as 'Chalkia (rare label)': predict answered that
    pseudo-species with known_level 'label', a species it cannot name. It is answered at
    the genus, whatever its unknown score, and said so without a false 'score > threshold'."""
    from wingspan.predict import answered

    predictor = Predictor(hierarchical_run, workers=0)
    merged = read_manifest(hierarchical_run / "model")["training"]["rare_classes"][
        "white_darktip"]
    branch = [("family", "Pieridae", 0.9), ("genus", "Chalkia", 0.8), ("label", merged, 0.7)]
    assert answered(predictor, "label", branch, merged) == ("genus", "Chalkia")
    assert answered(predictor, "family", branch, merged) == ("family", "Pieridae")
    other = [*branch[:2], ("label", "azure_spotwing", 0.7)]
    assert answered(predictor, "label", other, "azure_spotwing") == ("label", "azure_spotwing")
    # Every image, with the unknown threshold out of the way: those whose branch ends in
    # the merged class are answered at the genus, any other at the species.
    used = predictor.unknown.thresholds[predictor.unknown_score]
    used.update(dict.fromkeys(used, float("inf")))
    images = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))]
    rows = predict(predictor, images, progress=False).rows
    ends = [dict((lv, c) for lv, c, _ in r["taxonomy"]) for r in rows]
    assert any(e["label"] == merged for e in ends)  # (the tiny model's favourite, here)
    for row, end in zip(rows, ends, strict=True):
        level = "genus" if end["label"] == merged else "label"
        assert (row["known_level"], row["answer"]) == (level, end[level])
    # The command says the species are not learnt apart, not that a score was too high.
    code, out, err = run_cli("predict", hierarchical_run,
                             *[p for p, e in zip(images, ends, strict=True)
                               if e["label"] == merged][:3])
    said = " ".join(out.split())
    assert code == 0, err
    assert "Chalkia (genus)" in said and "species not learnt" in said, said
    for score, limit in re.findall(r"unknown score ([\d.]+) > ([\d.]+)", said):
        assert float(score) > float(limit), said  # said only where it is so
