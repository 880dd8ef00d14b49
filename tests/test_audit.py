"""`wingspan data audit`: deliberately flipped labels come out on top; a resized copy in
another split is found as a near-duplicate."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from wingspan.config import DemoConfig
from wingspan.data.demo import generate_demo


def test_audit_finds_flipped_labels_and_a_resized_copy(tmp_path, run_cli, monkeypatch):
    # fp32 PyTorch features on any machine: `auto` picks bf16 where it is fastest, which
    # moves a near-tie of the ranking (8 of the 11 flips in the top 5% on an AMX Xeon, 9 in
    # fp32), and the test checks the method, not the engine.
    monkeypatch.setenv("WINGSPAN_PRECISION", "fp32")
    monkeypatch.setenv("WINGSPAN_RUNTIME", "torch")
    demo = generate_demo(tmp_path / "demo", DemoConfig())
    images = sorted(p for p in demo.rglob("*.jpg"))
    rng = np.random.default_rng(0)
    classes = sorted(p.name for p in demo.iterdir() if p.is_dir())
    flipped = set(rng.choice(len(images), round(0.05 * len(images)), replace=False).tolist())
    # A copy of one photo, resized and re-encoded: not the same bytes, the same picture.
    copy = tmp_path / "copy.jpg"
    Image.open(images[1]).resize((80, 80)).save(copy, quality=70)
    rows = []
    for i, path in enumerate(images):
        label = path.parent.name
        if i in flipped:
            label = rng.choice([c for c in classes if c != label])
        rows.append({"path": str(path), "label": label, "split": "train"})
    rows.append({"path": str(copy), "label": images[1].parent.name, "split": "test"})
    rows.append(rows[5])  # a training row twice, as `data split --oversample-to` writes
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)

    code, stdout, err = run_cli("data", "audit", table, "--backbone", "efficientnet_lite0",
                                "--out", tmp_path / "audit", "--quiet")
    assert code == 0, err
    ranked = list(csv.DictReader(open(tmp_path / "audit" / "audit.csv")))
    assert len(ranked) == len(rows) - 1 == len({r["path"] for r in ranked})  # each file once
    top = {r["path"] for r in ranked[:len(flipped)]}
    wrong = {str(images[i]) for i in flipped}
    # The issue's target is 80% in the top 5%; on 11 flips that is 9. The head on
    # standardised features gave 9 or 10 by machine (a near-tie at the cut); the head now,
    # 11 (AVX2 EPYC). Most must be there, and the ranking as a whole must put flipped
    # labels above the others: the share of (flipped, kept) pairs ranked that way (an
    # AUROC; 1.0 here, 0.995 before), which one swap at the cut barely moves.
    recall = len(top & wrong) / len(wrong)
    assert recall >= 0.7, f"only {recall:.0%} of the flipped labels in the top 5%"
    rank = {r["path"]: i for i, r in enumerate(ranked)}
    kept = [rank[p] for p in rank if p not in wrong]
    auroc = np.mean([[rank[w] < k for k in kept] for w in wrong])
    assert auroc >= 0.95, auroc
    # The flipped images found are mostly suspected to be of their true class.
    found = [r for r in ranked[:len(flipped)] if r["path"] in wrong]
    right = sum(r["suspected"] == r["path"].split("/")[-2] for r in found)
    assert right >= 0.8 * len(found), found
    dups = list(csv.DictReader(open(tmp_path / "audit" / "duplicates.csv")))
    assert all(d["path_a"] != d["path_b"] for d in dups)  # no file paired with itself
    pair = {str(images[1]), str(copy)}
    assert any({d["path_a"], d["path_b"]} == pair and d["across_splits"] == "True"
               for d in dups), dups[:3]
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 60 and "across splits" in page
    # A card calls its label a mismatch only where another class is likelier
    shown = ranked[:page.count("labelled <b>")]
    assert page.count("looks like") == sum(r["suspected"] != r["label"] for r in shown) > 0
    assert page.count("its label is the likeliest") == sum(r["suspected"] == r["label"]
                                                           for r in shown) > 0
    # ... and so does the terminal's table (its 15 first), not "looks like: admiral" for
    # an admiral
    assert stdout.count("its own") == sum(r["suspected"] == r["label"] for r in ranked[:15])
    assert page.startswith("<!doctype html><html lang='en'>")  # (read aloud in English)
    pairs, groups = (int(n) for n in re.search(r"(\d+) pairs? in (\d+) groups?", page).groups())
    assert f"{pairs} pair{'s' if pairs > 1 else ''} in {groups} group{'s' if groups > 1 else ''}" \
        in page  # not "1 pairs in 1 groups"
    assert "Most suspect labels" in stdout
    # The head that checks is named with its out-of-fold accuracy, and is strong enough here
    said = " ".join(stdout.split())
    accuracy = float(re.search(r"out-of-fold accuracy ([\d.]+)", said).group(1))
    assert accuracy >= 0.8 and "Warning" not in said and "Too weak" not in page
    # Its images under the data's folder (the CSV's), named below it: absolute, they
    # wrapped over 7 lines at ETHEC's depth
    assert "images in" in stdout and str(images[0].parent) not in stdout


def test_a_second_audit_decodes_only_what_changed(tmp_path, monkeypatch):
    """The audit after a round of label fixes reuses every image's features; an edited
    photo is computed again."""
    from wingspan.config import AuditConfig
    from wingspan.data import audit, read_dataset

    demo = generate_demo(tmp_path / "demo", DemoConfig(image_size=64,
                                                       images_per_class=(12, 12, 10)))
    config = AuditConfig(backbone="efficientnet_lite0", folds=2)  # installed weights
    first = audit.audit_dataset(read_dataset(demo), tmp_path / "a", config=config,
                                progress=False)
    decoded = []
    monkeypatch.setattr(audit._Decoded, "__len__", lambda self: decoded.extend(self.paths)
                        or len(self.paths))
    second = audit.audit_dataset(read_dataset(demo), tmp_path / "b", config=config,
                                 progress=False)
    assert decoded == []  # nothing was decoded or run through the backbone
    assert first.issues.equals(second.issues) and first.duplicates.equals(second.duplicates)
    # Edit one photo (a new picture in the same file): that one alone is computed again.
    edited = sorted(demo.rglob("*.jpg"))[3]
    Image.open(sorted(demo.rglob("*.jpg"))[20]).save(edited)
    audit.audit_dataset(read_dataset(demo), tmp_path / "c", config=config, progress=False)
    assert set(decoded) == {str(edited)}
    # Under another pixel budget the images decode otherwise: its features are its own.
    from wingspan.data.images import call_budget

    for out in ("budget-1", "budget-2"):
        decoded.clear()
        with call_budget(10**7):
            audit.audit_dataset(read_dataset(demo), tmp_path / out, config=config,
                                progress=False)
        assert set(decoded) == ({str(p) for p in demo.rglob("*.jpg")} if out == "budget-1"
                                else set())
    # With the cache off, or with random weights (another network on every call),
    # everything is computed.
    for off in (AuditConfig(backbone="efficientnet_lite0", folds=2, cache=False),
                AuditConfig(backbone="test_efficientnet", weights="none", folds=2)):
        for out in ("d", "e"):
            decoded.clear()
            audit.audit_dataset(read_dataset(demo), tmp_path / out, config=off,
                                progress=False)
            assert set(decoded) == {str(p) for p in demo.rglob("*.jpg")}


def test_an_audit_of_one_readable_class_says_so_and_takes_weights(tmp_path, run_cli):
    """Readable images of one class alone: a clear error naming the unreadable files, not
    scikit-learn's; `--weights` is an option, as the offline hint says."""
    from helpers import folder_dataset

    folder_dataset(tmp_path / "data", {"monarch": 4, "admiral": 2})
    for broken in (tmp_path / "data" / "admiral").iterdir():
        broken.write_bytes(b"not a picture")
    code, _, err = run_cli("data", "audit", tmp_path / "data", "--backbone", "test_efficientnet",
                           "--weights", "none", "--folds", "2", "--out", tmp_path / "out",
                           "--quiet")
    assert code == 2 and "Traceback" not in err, err
    assert "2 of 6 images could not be read" in err and "admiral" in err


def test_an_audit_refuses_an_out_it_cannot_write_before_the_work(tmp_path, run_cli,
                                                                  monkeypatch):
    """`--out /proc/x` was refused once the features, heads and duplicate search were done
    (23 s on Leeds, an hour at 40k images): now before the features. Ctrl-C says what it
    kept."""
    from helpers import folder_dataset

    import wingspan.data.audit as audit

    folder_dataset(tmp_path / "data", {"monarch": 4, "admiral": 3})

    def never(*args, **kwargs):
        raise AssertionError("the features were computed")

    monkeypatch.setattr(audit, "image_features", never)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out in ("/proc/wingspan-audit", tmp_path / "file" / "audit", tmp_path / "dangling"):
        code, _, err = run_cli("data", "audit", tmp_path / "data", "--backbone",
                               "test_efficientnet", "--weights", "none", "--out", out, "--quiet")
        said = " ".join(err.split())
        assert code == 2 and "the audit's files go to" in said and "Traceback" not in err, err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(audit, "image_features", interrupted)
    code, _, err = run_cli("data", "audit", tmp_path / "data", "--backbone",
                           "test_efficientnet", "--weights", "none", "--out", tmp_path / "o",
                           "--quiet")
    assert code == 130 and "Stopped: this audit wrote nothing (with --no-cache or --weights " \
        "none no features are kept" in " ".join(err.split()), err  # (random weights' features)
    code, _, err = run_cli("data", "audit", tmp_path / "data", "--backbone",
                           "efficientnet_lite0", "--out", tmp_path / "o", "--quiet")
    assert code == 130 and "Stopped: this audit wrote nothing; the features computed so far " \
        "are cached" in " ".join(err.split()), err
    # A stop once its files were in place said "wrote nothing" too
    monkeypatch.undo()
    real = audit.audit_dataset

    def written_then_stopped(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(audit, "audit_dataset", written_then_stopped)
    code, _, err = run_cli("data", "audit", tmp_path / "data", "--backbone",
                           "test_efficientnet", "--weights", "none", "--out", tmp_path / "w",
                           "--quiet")
    assert code == 130 and "Stopped once this audit was written to" in err, err
    assert "wrote nothing" not in err and (tmp_path / "w" / "audit.csv").is_file()


def test_classes_of_a_single_image_are_left_out_of_the_label_audit_only(tmp_path, run_cli):
    """Long-tailed data (ETHEC's species) has classes of one image: the others are audited,
    those are named, and every image is still searched for duplicates."""
    import pandas as pd
    from helpers import folder_dataset

    folder_dataset(tmp_path / "data", {"monarch": 4, "admiral": 3, "lone": 1})
    code, out, err = run_cli("data", "audit", tmp_path / "data", "--backbone",
                             "test_efficientnet", "--weights", "none", "--out",
                             tmp_path / "out", "--quiet")
    assert code == 0, err
    said = " ".join(out.split())
    assert "1 class has a single image, so its label was not checked" in said
    assert "perceptual hashes within" in said
    audited = pd.read_csv(tmp_path / "out" / "audit.csv")
    assert set(audited["label"]) == {"monarch", "admiral"} and len(audited) == 7
    # The page says so too (the console's line alone was lost with the terminal).
    page = " ".join((tmp_path / "out" / "audit.html").read_text().split())
    assert "Not checked: 1 class with a single image" in page and "lone" in page
    folder_dataset(tmp_path / "few", {"monarch": 4, "lone": 1})
    code, _, err = run_cli("data", "audit", tmp_path / "few", "--backbone",
                           "test_efficientnet", "--weights", "none", "--out",
                           tmp_path / "out2", "--quiet", "--no-cache")
    assert code == 2 and "at least 2 classes with 2 images or more" in " ".join(err.split())
    assert not (tmp_path / "out2").exists()  # refused before anything: no empty folder
    # A wrong --device is refused whether or not the features are cached (it was not when
    # they all were).
    code, _, err = run_cli("data", "audit", tmp_path / "data", "--backbone",
                           "test_efficientnet", "--weights", "none", "--out",
                           tmp_path / "out3", "--quiet", "--device", "tpu")
    assert code == 2 and "--device must be auto, cpu, cuda or cuda:N" in err, err


def test_an_audit_stopped_midway_leaves_the_previous_audit_whole(tmp_path, monkeypatch):
    """Killed while it draws its page (thumbnails: the slow part), an audit leaves the
    previous audit's three files as they were, not new tables beside the old page."""
    import pytest
    from helpers import folder_dataset, write_image

    from wingspan.config import AuditConfig
    from wingspan.data import audit, read_dataset

    folder_dataset(tmp_path / "data", {"monarch": 4, "admiral": 3})
    out = tmp_path / "out"
    (out / "splits.csv").parent.mkdir()
    (out / "splits.csv").write_text("another command's output\n")  # the folder is shared
    config = AuditConfig(backbone="test_efficientnet", weights="none", folds=2)
    audit.audit_dataset(read_dataset(tmp_path / "data"), out, config=config, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"audit.csv", "duplicates.csv", "audit.html", "splits.csv"}
    write_image(tmp_path / "data" / "admiral" / "new.jpg", seed=99)  # the next audit's tables

    def killed(path, size=160):
        raise KeyboardInterrupt

    monkeypatch.setattr(audit, "thumbnail_uri", killed)
    with pytest.raises(KeyboardInterrupt):
        audit.audit_dataset(read_dataset(tmp_path / "data"), out, config=config,
                            progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # and no leftovers
    monkeypatch.undo()
    audit.audit_dataset(read_dataset(tmp_path / "data"), out, config=config, progress=False)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before) and b"new.jpg" in after["audit.csv"]


def test_audit_reads_images_by_trains_rules_strict_and_max_pixels(tmp_path, run_cli,
                                                                   monkeypatch):
    """`data audit` takes --strict and --max-pixels as train does, and says how many images
    it could not read (not only in audit.html)."""
    from helpers import folder_dataset, write_image

    folder_dataset(tmp_path / "data", {"monarch": 3, "admiral": 3})
    (tmp_path / "data" / "admiral" / "broken.jpg").write_bytes(b"not a picture")
    write_image(tmp_path / "data" / "monarch" / "large.png", size=(800, 800))
    args = ("data", "audit", tmp_path / "data", "--backbone", "test_efficientnet",
            "--weights", "none", "--folds", "2", "--out", tmp_path / "out", "--quiet")
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    assert "Could not read 1 image, left out of the audit" in " ".join(stdout.split())
    # audit.html lists it, its path once and breakable (it made a phone's page scroll
    # sideways), and data without splits shows none on its cards (a bare "-" read as a bullet)
    page = (tmp_path / "out" / "audit.html").read_text()
    unreadable = page.split("<h2>Unreadable (1)</h2>")[1].split("</ul>")[0]
    broken = str(tmp_path / "data" / "admiral" / "broken.jpg")
    assert unreadable.startswith("<ul class='m'>") and unreadable.count(broken) == 1, unreadable
    assert " · - · " not in page and "quality " in page
    code, _, err = run_cli(*args, "--strict")
    assert code == 2 and "1 image cannot be read (--strict)" in err and "broken.jpg" in err
    # A PNG over the pixel budget is refused, as train refuses it. (The option sets
    # $WINGSPAN_MAX_PIXELS for the process: setenv first, so that the test puts it back.)
    monkeypatch.setenv("WINGSPAN_MAX_PIXELS", "50000000")
    code, stdout, err = run_cli(*args, "--max-pixels", "200000")
    assert code == 0, err
    said = " ".join(stdout.split())
    assert "Could not read 2 images, left out of the audit" in said


def test_an_audit_with_a_runs_weights_sees_images_as_the_run_was_trained(tmp_path, run_cli,
                                                                         monkeypatch):
    """`data audit --weights RUN` reads images at the run's --image-size (its bundle's
    preprocessing), not the backbone's default; the same weights at two sizes are kept
    apart in the feature cache."""
    from safetensors.torch import load_file, save_file

    from wingspan.config import AuditConfig, TrainConfig
    from wingspan.data import audit, read_dataset
    from wingspan.training import train

    demo = generate_demo(tmp_path / "demo", DemoConfig(image_size=48,
                                                       images_per_class=(8, 8, 8)))
    run = train(read_dataset(demo), TrainConfig(
        backbone="test_efficientnet", weights="none", image_size=32, epochs_head=1,
        epochs_finetune=0, batch_size=8, feature_views=1, workers=0,
        cache_dir=str(tmp_path / "cache"), val_fraction=0.25, test_fraction=0.0),
        tmp_path / "runs", "small", quiet=True)
    sizes = []  # (input size, images decoded) of each audit's feature pass
    monkeypatch.setattr(audit._Decoded, "__len__", lambda self: sizes.append(
        (self.size, len(self.paths))) or len(self.paths))
    code, _, err = run_cli("data", "audit", demo, "--weights", run, "--folds", "2",
                           "--out", tmp_path / "a", "--quiet")
    assert code == 0, err
    assert sizes and {s for s, _ in sizes} == {32}, sizes  # test_efficientnet's own is 160
    page = (tmp_path / "a" / "audit.html").read_text()
    assert "the fine-tuned backbone of" in page and "ImageNet" not in page
    # The same backbone as a plain weights file: no run to say its size, so the
    # backbone's default, computed anew (not the 32-pixel features under the same weights).
    plain = tmp_path / "backbone.safetensors"
    save_file({k.removeprefix("backbone.net."): v for k, v in
               load_file(run / "model" / "model.safetensors").items()
               if k.startswith("backbone.net.")}, plain)
    images = len(list(demo.rglob("*.jpg")))
    for weights, size in ((plain, 160), (run, None)):  # None: all kept from the first audit
        sizes.clear()
        audit.audit_dataset(read_dataset(demo), tmp_path / "b", progress=False,
                            config=AuditConfig("test_efficientnet", str(weights), folds=2))
        assert set(sizes) == ({(size, images)} if size else set()), (weights, sizes)


def test_near_duplicates_are_the_same_pairs_in_any_size_of_block():
    """The search goes a block of rows at a time, sized to hold memory flat as N grows:
    whatever the block, the pairs are those a full N x N comparison finds."""
    import pandas as pd
    import torch

    from wingspan.config import AuditConfig
    from wingspan.data.audit import near_duplicates

    rng = np.random.default_rng(0)
    n = 400
    features = rng.normal(size=(n, 16))
    features[1::40] = features[0::40] + rng.normal(scale=0.01, size=(10, 16))  # bursts
    bits = rng.integers(0, 2, size=(n, 64)).astype(bool)
    bits[3::40] = bits[2::40]
    bits[3::40, :5] ^= True  # resized copies: 5 bits apart
    table = pd.DataFrame({"path": [f"/d/{i}.jpg" for i in range(n)],
                          "split": ["train", "val"] * (n // 2),
                          "label": ["a", "b", "c", "d"] * (n // 4)})
    config = AuditConfig()
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = unit @ unit.T
    hamming = (bits[:, None, :] != bits[None, :, :]).sum(2)
    close = (sims >= config.duplicate_similarity) | (hamming <= config.hash_distance)
    expected = {(f"/d/{a}.jpg", f"/d/{b}.jpg", int(hamming[a, b]))
                for a, b in zip(*np.nonzero(np.triu(close, 1)), strict=True)}
    assert len(expected) == 20
    for cells in (1 << 24, 7 * n, 1):  # one block, blocks of 7 rows, a row at a time
        found = near_duplicates(table, torch.from_numpy(features), torch.from_numpy(bits),
                                "label", config, cells=cells)
        assert set(zip(found["path_a"], found["path_b"], found["hash_distance"],
                       strict=True)) == expected
        assert found["across_splits"].all() and found["labels_differ"].all()


def test_a_look_alike_class_lists_each_image_with_its_closest_not_every_pair():
    """Pinned specimens shot alike: 60 near-identical images list each one's closest few
    partners (not 1,770 pairs), and each pair names the group of all 60."""
    import pandas as pd
    import torch

    from wingspan.config import AuditConfig
    from wingspan.data.audit import near_duplicates

    rng = np.random.default_rng(1)
    n = 100
    features = rng.normal(size=(n, 16))
    features[:60] = features[0] + rng.normal(scale=0.01, size=(60, 16))  # one look
    features[60:62] = features[60] + rng.normal(scale=0.01, size=(2, 16))  # a pair apart
    bits = rng.integers(0, 2, size=(n, 64)).astype(bool)
    table = pd.DataFrame({"path": [f"/d/{i}.jpg" for i in range(n)], "split": "train",
                          "label": "a"})
    found = near_duplicates(table, torch.from_numpy(features), torch.from_numpy(bits),
                            "label", AuditConfig(duplicates_per_image=5), cells=7 * n)
    look = found[found["group_size"] == 60]
    listed = set(look["path_a"]) | set(look["path_b"])
    assert listed == {f"/d/{i}.jpg" for i in range(60)}  # every image of it, once or more
    assert 60 * 5 / 2 <= len(look) <= 60 * 5 and look["group"].nunique() == 1
    pair = found[found["group_size"] == 2]
    assert len(pair) == 1 and {pair["path_a"].iloc[0], pair["path_b"].iloc[0]} == {
        "/d/60.jpg", "/d/61.jpg"}
    assert len(found) == len(look) + 1


def test_the_pairs_of_many_alike_images_are_not_all_held_at_once():
    """Every close pair was kept for the groups: 8,000 alike images held 5.7 GB, and a tray
    of 16k would fill this machine. They are kept as the groups they make (one pair per
    image), so memory stays near flat however many pairs there are."""
    import tracemalloc

    import pandas as pd
    import torch

    from wingspan.config import AuditConfig
    from wingspan.data.audit import near_duplicates

    rng = np.random.default_rng(2)
    n = 1500  # 1.1M close pairs: 36 MB of indices held at once before
    features = rng.normal(size=(1, 8)) + rng.normal(scale=0.01, size=(n, 8))
    bits = rng.integers(0, 2, size=(n, 64)).astype(bool)
    table = pd.DataFrame({"path": [f"/d/{i}.jpg" for i in range(n)], "split": "train",
                          "label": "a"})
    def search():
        return near_duplicates(table, torch.from_numpy(features), torch.from_numpy(bits),
                               "label", AuditConfig(duplicates_per_image=2), cells=20 * n)

    search()  # (its imports' first allocations are not what is measured)
    tracemalloc.start()
    found = search()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (found["group_size"] == n).all() and found["group"].nunique() == 1
    assert peak < 40e6, peak  # (174 MB before)


def test_photos_of_one_observation_share_a_fold_so_a_wrong_label_of_all_is_found():
    """--group-regex was read but the folds ignored it: a whole observation filed under the
    wrong class (3 photos, near copies) had its other photos in the training folds, which
    vouched for the wrong label. With the groups kept in one fold, the class the features
    say is the one suspected."""
    from wingspan.config import AuditConfig
    from wingspan.data.audit import label_issues

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 512)) * 0.25  # a few photos span the space (as 1280-d
    # features of a small set): the head can learn a near copy's wrong label from the others
    rows, feats = [], []
    for obs in range(60):
        cls = obs % 2
        label = ["a", "b"][1 - cls] if obs in (0, 1) else ["a", "b"][cls]  # 2 filed wrongly
        base = centres[cls] + rng.normal(size=512)
        for k in range(3):
            rows.append({"path": f"obs_{obs}_{k}.jpg", "group": f"obs_{obs}", "split": "",
                         "label": label})
            feats.append(base + 0.1 * rng.normal(size=512))
    table = pd.DataFrame(rows)
    ranked = label_issues(table, torch.tensor(np.array(feats), dtype=torch.float32), "label",
                          AuditConfig())
    wrong = ranked[ranked.path.str.match(r"obs_[01]_")]
    assert (wrong["rank"] <= 6).all() and (wrong.suspected != wrong.label).all(), wrong


def test_a_class_of_one_group_is_not_checked_and_all_such_is_refused(tmp_path):
    """With groups, a class whose photos are all one observation has none in the folds that
    score it: its images came out top with probability 0 for their label (all classes so:
    scikit-learn's traceback). It is now left unchecked, as a class of one image is."""
    import pytest
    from helpers import folder_dataset

    from wingspan.config import AuditConfig, ReadConfig
    from wingspan.data import audit, read_dataset
    from wingspan.errors import WingspanError

    folder_dataset(tmp_path / "data", {"monarch": 4, "admiral": 4, "peacock": 3})
    config = AuditConfig(backbone="test_efficientnet", weights="none", folds=2, cache=False)
    for path in (tmp_path / "data" / "peacock").iterdir():  # one observation, 3 photos
        path.rename(path.with_name(f"obs_7_{path.name}"))
    grouped = read_dataset(tmp_path / "data", ReadConfig(group_regex=r"^(obs_\d+)_"))
    result = audit.audit_dataset(grouped, tmp_path / "out", config=config, progress=False)
    assert result.single_image_classes == ["peacock"]
    assert "peacock" not in set(result.issues["label"])
    # Every class one group (a site per class, say): nothing can be checked.
    by_class = read_dataset(tmp_path / "data", ReadConfig(group_regex=r"^([a-z]+|obs)_"))
    with pytest.raises(WingspanError, match=r"at least 2 classes with 2 images or more \(2 "
                                            r"groups, with --group-regex\)"):
        audit.audit_dataset(by_class, tmp_path / "out2", config=config, progress=False)


def test_the_default_audit_puts_both_installed_backbones_side_by_side(tmp_path, monkeypatch):
    """Lite2's and Lite0's features together found more deliberate flips than either alone
    (iNat 0.80 of them in the top 5% against Lite2's 0.745): the default head sees both;
    the near-duplicates stay the first backbone's, whose similarity was measured. Weights of
    one backbone (a run, a file) cannot go with several."""
    import pytest

    from wingspan.config import AuditConfig, SettingError
    from wingspan.data import audit, read_dataset
    from wingspan.errors import WingspanError
    from wingspan.models import runtime

    forget = runtime.forget_sessions
    demo = generate_demo(tmp_path / "demo", DemoConfig(image_size=64,
                                                       images_per_class=(10, 10, 10)))
    data = read_dataset(demo)
    assert audit.audit_backbones(AuditConfig()) == ["efficientnet_lite2", "efficientnet_lite0"]
    monkeypatch.setenv("WINGSPAN_RUNTIME", "onnx")
    sessions = []
    monkeypatch.setattr(runtime, "forget_sessions", lambda: sessions.append(
        len(runtime._SESSIONS)) or forget())
    # (on the CPU, where ONNX Runtime runs, whatever the machine: a GPU box's would not)
    both = audit.audit_dataset(data, tmp_path / "both", progress=False,
                               config=AuditConfig(folds=2, device="cpu"))
    # Each backbone's ONNX Runtime session (1 GB for Lite2 at batch 32) is let go before
    # the next is made: the audit's peak memory is one backbone's.
    assert sessions[0] >= 1 and len(sessions) == 2 and not runtime._SESSIONS
    alone = audit.audit_dataset(data, tmp_path / "alone", progress=False,
                                config=AuditConfig("efficientnet_lite2", folds=2, device="cpu"))
    assert both.backbone == "efficientnet_lite2 + efficientnet_lite0"
    assert "efficientnet_lite0 (ImageNet, frozen)" in both.html.read_text()
    assert both.duplicates.equals(alone.duplicates)
    quality = both.issues.set_index("path")["label_quality"]
    assert not np.allclose(quality, alone.issues.set_index("path")["label_quality"][quality.index])
    # Each backbone's features are cached apart: an audit with either alone reuses them.
    decoded = []
    monkeypatch.setattr(audit._Decoded, "__len__", lambda self: decoded.extend(self.paths)
                        or len(self.paths))
    audit.audit_dataset(data, tmp_path / "lite0", progress=False,
                        config=AuditConfig("efficientnet_lite0", folds=2))
    assert decoded == []
    # A misspelt second name is said before the first's pass, not after it.
    fresh = tmp_path / "fresh.jpg"
    Image.new("RGB", (40, 40), (9, 99, 199)).save(fresh)
    with pytest.raises(WingspanError, match="Unknown backbone 'efficientnet_lit0'"):
        audit.image_features([str(fresh)], AuditConfig("efficientnet_lite0,efficientnet_lit0"),
                             progress=False)
    assert decoded == []
    with pytest.raises(SettingError, match="one name with weights"):
        AuditConfig("efficientnet_lite0,efficientnet_lite2", weights="runs/x")
    with pytest.raises(SettingError, match="comma-separated"):
        AuditConfig("efficientnet_lite0,")


def test_the_audit_page_passes_an_accessibility_check(tmp_path, run_cli):
    """axe-core against WCAG 2.1 AA in Chromium, and two cards a row on a phone: the cards
    were 6 px too wide for two (one column, half the screen blank), each image's alt text
    was its path (read out twice, with the caption), and there was no <main>."""
    from helpers import accessibility_problems, chromium_path, folder_dataset
    from playwright.sync_api import sync_playwright

    folder_dataset(tmp_path / "data", {"monarch": 6, "admiral": 6})
    copy = tmp_path / "data" / "admiral" / "copy.jpg"  # a near-duplicate pair, two labels
    copy.write_bytes((tmp_path / "data" / "monarch" / "monarch_0.jpg").read_bytes() + b"\0")
    code, _, err = run_cli("data", "audit", tmp_path / "data", "--backbone",
                           "test_efficientnet", "--weights", "none", "--folds", "2", "--out",
                           tmp_path / "out", "--quiet")
    assert code == 0, err
    page_file = tmp_path / "out" / "audit.html"
    assert "labels differ" in page_file.read_text()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path())
        for width in (1280, 375, 320):
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.goto(page_file.resolve().as_uri())
            assert accessibility_problems(page) == [], width
            # (a pair, two columns wide, must not widen a one-column page)
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            tops = page.eval_on_selector_all(  # (the first two cards of the suspects)
                ".g .c", "cs => cs.slice(0, 2).map(c => c.getBoundingClientRect().top)")
            alts = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.alt)")
            page.close()
            assert tops[0] == tops[1], (width, tops)  # two cards side by side
        browser.close()
    assert alts and not any("/" in alt for alt in alts), alts[:3]
    assert any(alt.startswith("#1, labelled ") for alt in alts), alts[:3]


def _gallery_of(names: list[str], image: Path) -> Path:
    """audit.html beside `image` (a plain 32-px image, made) of three suspect cards, each
    image labelled one of `names` and taken for another, and no duplicates."""
    from wingspan.config import AuditConfig
    from wingspan.data.audit import gallery

    image.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (90, 120, 200)).save(image)
    issues = pd.DataFrame({"rank": [1, 2, 3], "path": [str(image)] * 3, "split": "-",
                           "label": names, "suspected": names[::-1], "label_quality": 0.001,
                           "suspected_probability": 0.03, "flagged": True})
    duplicates = pd.DataFrame(columns=["path_a", "path_b", "label_a", "label_b", "split_a",
                                       "split_b", "similarity", "hash_distance",
                                       "across_splits", "labels_differ", "group",
                                       "group_size"])
    page_file = image.parent / "audit.html"
    page_file.write_text(gallery(issues, duplicates, "label", AuditConfig(), "x", {}))
    return page_file


def test_long_class_names_stay_in_their_audit_cards(tmp_path):
    """ETHEC's species folders (Genus_epithet, up to 27 letters, no space to wrap at) ran
    over the next card in the gallery and widened the page at 1280 px."""
    from helpers import chromium_path
    from playwright.sync_api import sync_playwright

    page_file = _gallery_of(["Pseudochazara_telephassa", "Kuekenthaliella_eugenia",
                             "Lasiommata_paramegaera"], tmp_path / "a.jpg")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path())
        for width in (1280, 375):
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.goto(page_file.resolve().as_uri())
            over = page.eval_on_selector_all(".g .c", """cs => cs.filter(c =>
                [...c.querySelectorAll('*')].some(e => e.getBoundingClientRect().right
                > c.getBoundingClientRect().right + 1)).length""")
            assert over == 0, width
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            page.close()
        browser.close()


def test_the_audit_scores_its_checker_beside_chance():
    from wingspan.config import AuditConfig
    from wingspan.data.audit import checker_scores

    issues = pd.DataFrame({"label": list("aaaabb"), "suspected": list("aabbba")})
    scores = checker_scores(issues, AuditConfig().weak_checker)
    assert scores["accuracy"] == 3 / 6 and scores["balanced_accuracy"] == (2 / 4 + 1 / 2) / 2
    assert scores["commonest_share"] == 4 / 6 and scores["classes"] == 2
    assert scores["weak"] and 0.5 < AuditConfig().weak_checker < 0.85  # (iNat's head: 0.85)
    assert not checker_scores(issues, 0.5)["weak"]


def test_an_audit_whose_checker_is_too_weak_says_its_flags_do_not_mean_wrong_labels(
        tmp_path, run_cli):
    """300 classes of ~9 images: cleanlab flagged 64% of them while the out-of-fold head
    named 24% right, and neither the terminal nor the page said that the flags then mean
    "the features do not tell these classes apart". Here random pixels and weights: the
    head is near chance."""
    from helpers import folder_dataset

    folder_dataset(tmp_path / "data", {f"species_{i:02}": 3 for i in range(20)})
    code, out, err = run_cli("data", "audit", tmp_path / "data", "--backbone",
                             "test_efficientnet", "--weights", "none", "--out",
                             tmp_path / "out", "--quiet")
    assert code == 0, err
    said = " ".join(out.split())
    accuracy = float(re.search(r"out-of-fold accuracy ([\d.]+)", said).group(1))
    assert accuracy < 0.3 and "(chance 0.05, the commonest class's share)" in said, said
    assert "Warning: the out-of-fold head names only" in said
    assert "--weights RUN" in said and "coarser --level" in said
    page = " ".join((tmp_path / "out" / "audit.html").read_text().split())
    assert "out-of-fold accuracy" in page and "Too weak a check:" in page
    assert "--weights RUN" in page


def test_audit_folds_follow_the_largest_class_not_the_smallest():
    from wingspan.config import AuditConfig
    from wingspan.data.audit import fold_count

    labels = pd.Series(["a"] * 20 + ["b"] * 2)
    assert fold_count(labels, AuditConfig(folds=5)) == 5


def test_an_audit_reads_its_images_with_the_workers_shared_memory_holds(tmp_path, run_cli,
                                                                         monkeypatch):
    """Its loader took a worker per core whatever /dev/shm held (Docker's 64 MB): as the
    training's and predict's do now, as many as fit, said, down to none."""
    from types import SimpleNamespace

    from helpers import folder_dataset

    from wingspan.training import data as data_module

    folder_dataset(tmp_path / "data", {"monarch": 6, "admiral": 6})
    monkeypatch.setattr(data_module, "SHM_SAID", [])
    monkeypatch.setattr(data_module, "default_workers", lambda: 2)
    monkeypatch.setattr(data_module.os, "statvfs",
                        lambda path: SimpleNamespace(f_bavail=0, f_frsize=4096))
    code, _, err = run_cli("data", "audit", tmp_path / "data", "--backbone", "test_efficientnet",
                           "--weights", "none", "--folds", "2", "--out", tmp_path / "out",
                           "--quiet")
    assert code == 0, err
    assert "/dev/shm has 0 MB free" in " ".join(err.split()) and "0 workers instead of 2" in \
        " ".join(err.split())
    assert (tmp_path / "out" / "audit.csv").is_file()


def test_long_class_names_and_paths_break_at_their_parts_in_audit_cards(tmp_path):
    """A species folder has no space: overflow-wrap cut it a letter or two before the card's
    edge at 1280 px ("Heteropterus_m" over "orpheus", "Hesperia_comm" over "a"); it should
    break after its _ (and a path after a /)."""
    from helpers import chromium_path
    from playwright.sync_api import sync_playwright

    page_file = _gallery_of(["Heteropterus_morpheus", "Hesperia_comma", "Melitaea_athalia"],
                            tmp_path / "Heteropterus_morpheus" / "a.jpg")
    lines_of = """e => {  // the text of each line the element's text is laid out in
        const lines = [], range = document.createRange();
        const walk = document.createTreeWalker(e, NodeFilter.SHOW_TEXT);
        for (let t = walk.nextNode(); t; t = walk.nextNode())
            for (let i = 0; i < t.length; i++) {
                range.setStart(t, i); range.setEnd(t, i + 1);
                const top = Math.round(range.getBoundingClientRect().top);
                if (!lines.length || lines[lines.length - 1].top !== top)
                    lines.push({top, text: ''});
                lines[lines.length - 1].text += t.data[i];
            }
        return lines.map(l => l.text);
    }"""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path())
        for width in (1280, 375):
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.goto(page_file.resolve().as_uri())
            for element in page.query_selector_all(".g .c b"):
                lines = element.evaluate(lines_of)
                assert all(line.endswith("_") for line in lines[:-1]), (width, lines)
            path_lines = page.query_selector(".g .c .m").evaluate(lines_of)
            assert all(line.endswith(("/", "_", "-", " ")) for line in path_lines[:-1]), (
                width, path_lines)
            page.close()
        browser.close()


def test_audit_cards_say_which_images_cleanlab_flagged(tmp_path):
    """The lowest label qualities are not all flagged (on the demo data 6 of the 10 first
    were): a card says in words whether it is, which no card said."""
    import re

    from wingspan.config import AuditConfig
    from wingspan.data.audit import gallery

    image = tmp_path / "a.jpg"
    Image.new("RGB", (32, 32), (90, 120, 200)).save(image)
    issues = pd.DataFrame({"rank": [1, 2, 3], "path": [str(image)] * 3, "split": "-",
                           "label": ["monarch", "admiral", "white"],
                           "suspected": ["admiral", "monarch", "monarch"],
                           "label_quality": [0.01, 0.02, 0.03],
                           "suspected_probability": 0.6, "flagged": [True, False, True]})
    duplicates = pd.DataFrame(columns=["path_a", "path_b", "label_a", "label_b", "split_a",
                                       "split_b", "similarity", "hash_distance",
                                       "across_splits", "labels_differ", "group",
                                       "group_size"])
    page = gallery(issues, duplicates, "label", AuditConfig(), "x", {})
    cards = page.split("<div class='c'>")[1:]
    said = [bool(re.search(r">flagged</b> by cleanlab", c)) for c in cards]
    assert said == [True, False, True], cards


def test_an_audit_of_a_runs_splits_csv_names_its_images_folder_not_the_runs(tmp_path,
                                                                             run_cli):
    """The README's `wingspan data audit runs/mine/splits.csv`: the CSV lists its photos by
    absolute paths elsewhere, and the table's caption said "images in runs/mine"."""
    from helpers import folder_dataset

    folder_dataset(tmp_path / "photos", {"monarch": 4, "admiral": 4})
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    table = tmp_path / "runs" / "mine" / "splits.csv"
    table.write_text("path,label,split\n" + "".join(
        f"{p},{p.parent.name},train\n" for p in sorted((tmp_path / "photos").rglob("*.*"))))
    code, out, err = run_cli("data", "audit", table, "--backbone", "test_efficientnet",
                             "--weights", "none", "--folds", "2", "--out", tmp_path / "out",
                             "--quiet", "--no-cache")
    assert code == 0, err
    said = " ".join(out.split())
    assert f"images in {tmp_path / 'runs' / 'mine'}" not in said, said
    assert f"images in {tmp_path / 'photos'}" in said and "monarch/" in said
