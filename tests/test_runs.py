"""`wingspan runs` and `ws.runs`: a runs folder's runs side by side, read from their files."""

import contextlib
import fcntl
import io
import json
import os
import re
import shutil

import pandas as pd
import pytest
import yaml
from test_train import tiny

import wingspan as ws
from wingspan.data import read_dataset
from wingspan.errors import WingspanError
from wingspan.evaluate.run import evaluate
from wingspan.training import train


@pytest.fixture(scope="module")
def finished(demo_dir, tmp_path_factory):
    """One tiny run with a test split, evaluated there (its fair held-out figure)."""
    tmp = tmp_path_factory.mktemp("runs-src")
    run_dir = train(read_dataset(demo_dir), tiny(tmp, test_fraction=0.25), tmp / "runs", "r",
                    quiet=True)
    evaluate(run_dir, progress=False, workers=0, plots=False)
    return run_dir


def _copy(run_dir, to):
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns(".lock", "cache"))
    return to


def _edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.fixture
def runs_dir(finished, tmp_path):
    """Copies of the run: as trained; another seed with its own figures and not evaluated;
    one with a torn metrics.json; one stopped before its model; one killed while set up;
    and folders that are no run."""
    runs = tmp_path / "runs"
    _copy(finished, runs / "seed0")
    other = _copy(finished, runs / "[red]seed1")  # a name that is also rich markup
    config = yaml.safe_load((other / "config.yaml").read_bytes())
    (other / "config.yaml").write_text(yaml.safe_dump({**config, "seed": 1}))
    _edit_json(other / "metrics.json",
               lambda m: {**m, "best": {**m["best"], "stage": "finetune", "epoch": 2,
                                        "val_macro_f1": 0.99},
                          "stage_seconds": {"head": 7.25, "finetune": 100.0}})
    shutil.rmtree(other / "evaluation-test")
    torn = _copy(finished, runs / "torn")
    (torn / "metrics.json").write_text('{"best": ')  # cut short by a full disk, say
    stopped = _copy(finished, runs / "stopped")
    (stopped / "model" / "manifest.json").unlink()
    (stopped / "metrics.json").unlink()
    adapted = _copy(finished, runs / "adapted")  # as `wingspan adapt` writes one: no
    (adapted / "metrics.json").unlink()  # metrics of its own, its adapt.json instead,
    shutil.rmtree(adapted / "evaluation-test")  # and no evaluation until it is evaluated
    (adapted / "adapt.json").write_text(json.dumps({"photos": 3, "adapted_from": str(
        runs / "finished")}))
    (runs / "leftover").mkdir()
    shutil.copy(finished / "splits.csv", runs / "leftover" / "splits.csv")
    (runs / "leftover" / ".lock").touch()
    (runs / "notes").mkdir()
    (runs / "notes" / "ideas.txt").write_text("try lite2\n")
    (runs / "empty").mkdir()
    (runs / "data" / "demo").mkdir(parents=True)  # what `data inspect` writes in runs/
    (runs / "data" / "demo" / "summary.json").write_text("{}")
    (runs / "README.txt").write_text("a file, not a folder\n")
    return runs


def test_the_held_out_figure_is_read_from_an_unknown_evaluation_too(finished, tmp_path):
    """`evaluate --unknown` alone writes evaluation-test-unknown/, with the plain figures
    too; a `--tta` evaluation alone is another recipe's figure, not the run's."""
    runs = tmp_path / "runs"
    evaluation = json.loads((finished / "evaluation-test" / "metrics.json").read_text())
    for name, folder in (("unknown", "evaluation-test-unknown"), ("tta", "evaluation-test-tta"),
                         ("holdout", "evaluation-unknown"), ("holdout-val", "evaluation-unknown"),
                         ("knn", "evaluation-test-unknown-knn"),  # another --unknown-score
                         ("knn-tta", "evaluation-test-unknown-knn-tta")):
        (_copy(finished, runs / name) / "evaluation-test").rename(runs / name / folder)
    # `train --holdout-classes` scores its own split in evaluation-unknown/: counted when it
    # is the run's held-out split, not when it is another.
    (runs / "holdout-val" / "evaluation-unknown" / "metrics.json").write_text(
        json.dumps({**evaluation, "split": "val"}))
    rows = {r["name"]: r for r in _plain(ws.runs(runs))}
    assert evaluation["split"] == "test" and rows["holdout"]["held_out_split"] == "test"
    held_out = round(evaluation["macro"]["f1"], 5)  # (to val's places: see below)
    assert rows["unknown"]["held_out_macro_f1"] == held_out
    assert rows["holdout"]["held_out_macro_f1"] == held_out
    assert rows["knn"]["held_out_macro_f1"] == held_out
    assert rows["tta"]["held_out_macro_f1"] is rows["knn-tta"]["held_out_macro_f1"] is None
    assert rows["holdout-val"]["held_out_macro_f1"] is None
    assert not rows["holdout-val"]["held_out_evaluated"]
    # To the places of the val figure beside it (history.csv's 5): the same 1/14 read as
    # 0.07143 against 0.0714286, a val figure above the held-out one
    (runs / "unknown" / "evaluation-test-unknown" / "metrics.json").write_text(
        json.dumps({**evaluation, "macro": {**evaluation["macro"], "f1": 1 / 14}}))
    [row] = _plain(ws.runs(runs).set_index("name").loc[["unknown"]])
    assert row["held_out_macro_f1"] == 0.07143


def test_a_run_whose_splits_csv_changed_is_listed_damaged(finished, tmp_path):
    """evaluate and calibrate refuse a run whose splits.csv changed since it trained:
    `runs` says so rather than "done". Its paths rewritten (data moved) are the same rows."""
    runs = tmp_path / "runs"
    edited, moved = _copy(finished, runs / "edited"), _copy(finished, runs / "moved")
    splits = pd.read_csv(edited / "splits.csv", dtype=str, keep_default_na=False)
    first_test = splits.index[splits["split"] == "test"][0]
    splits.loc[first_test, "split"] = "train"  # a test image moved to train by hand
    splits.to_csv(edited / "splits.csv", index=False)
    text = (moved / "splits.csv").read_text()
    (moved / "splits.csv").write_text(text.replace("/", "/./"))
    assert _status(runs, "edited") == (
        "damaged", "splits.csv has changed since the run trained (edited, or damaged): "
                   "evaluate and calibrate refuse it until the run's own is put back")
    assert _status(runs, "moved") == ("done", None)
    # One it cannot read at all is damaged too, and the listing goes on.
    (moved / "splits.csv").write_text('path,label,split\n"' + "x" * 200_000 + "\n")
    status, detail = _status(runs, "moved")
    assert status == "damaged" and detail.startswith("splits.csv cannot be read (")


def _plain(frame: pd.DataFrame) -> list[dict]:
    """Records with every empty cell None (NaN, <NA>), to compare across formats."""
    return [{k: None if pd.isna(v) else v for k, v in row.items()}
            for row in frame.astype(object).to_dict("records")]


def _stopped_after(run_dir) -> str:
    """The detail of a stopped copy of the run: after its history's last epoch."""
    last = pd.read_csv(run_dir / "history.csv").iloc[-1]
    return f"after {last['stage']} epoch {last['epoch']}"


def _status(runs_dir, name: str) -> tuple:
    """A run's (status, detail) in ws.runs, None for no detail."""
    row = _plain(ws.runs(runs_dir).set_index("name").loc[[name]].reset_index())[0]
    return row["status"], row["detail"]


def test_runs_frame_lists_each_run_with_values_from_its_files(runs_dir, finished, demo_dir):
    frame = ws.runs(runs_dir)
    assert not (runs_dir / "seed0" / ".lock").exists()  # listing writes nothing
    rows = {r["name"]: r for r in _plain(frame)}
    assert set(rows) == {"seed0", "[red]seed1", "torn", "stopped", "adapted",
                         "leftover"}  # no others
    assert {n: (r["status"], r["detail"]) for n, r in rows.items()} == {
        "adapted": ("done (adapted)", "from finished on 3 photos"), "seed0": ("done", None),
        "[red]seed1": ("done", None),
        "stopped": ("stopped (resumable)", _stopped_after(finished)),
        "torn": ("damaged", "metrics.json is not valid JSON (line 1, column 10)"),
        "leftover": ("left over: killed while set up", None)}
    metrics = json.loads((finished / "metrics.json").read_text())
    evaluation = json.loads((finished / "evaluation-test" / "metrics.json").read_text())
    assert evaluation["fair"].startswith("yes")
    seed0 = rows["seed0"]
    assert seed0 == {**seed0, "data": str(demo_dir), "backbone": "test_efficientnet",
                     "levels": "label",
                     "image_size": 32, "seed": 0, "selection": "holdout",
                     "val_macro_f1": metrics["best"]["val_macro_f1"],
                     "best_stage": metrics["best"]["stage"],
                     "best_epoch": metrics["best"]["epoch"],
                     "held_out_split": "test",
                     "held_out_macro_f1": round(evaluation["macro"]["f1"], 5),
                     "held_out_images": evaluation["images"], "held_out_unreadable": 0,
                     "train_seconds": round(sum(metrics["stage_seconds"].values()), 1),
                     "path": str(runs_dir / "seed0")}
    seed1 = rows["[red]seed1"]
    assert (seed1["seed"], seed1["val_macro_f1"], seed1["best_stage"], seed1["best_epoch"],
            seed1["train_seconds"]) == (1, 0.99, "finetune", 2, 107.2)
    assert seed1["held_out_split"] == "test" and seed1["held_out_macro_f1"] is None
    # A damaged run keeps what could be read before the damaged file.
    assert (rows["torn"]["backbone"], rows["torn"]["val_macro_f1"]) == ("test_efficientnet",
                                                                         None)
    assert rows["stopped"]["val_macro_f1"] is None and rows["stopped"]["seed"] == 0
    # An adapted copy has no figures of its own training, but its levels and, once
    # `wingspan evaluate` has scored it, the held-out figure (its reason to be listed).
    adapted = rows["adapted"]
    assert (adapted["levels"], adapted["image_size"], adapted["held_out_split"],
            adapted["held_out_macro_f1"], adapted["val_macro_f1"]) == (
        "label", 32, "test", None, None)
    shutil.copytree(finished / "evaluation-test", runs_dir / "adapted" / "evaluation-test")
    assert _plain(ws.runs(runs_dir).set_index("name").loc[["adapted"]])[0][
        "held_out_macro_f1"] == round(evaluation["macro"]["f1"], 5)
    # Scored on photos it adapted on, the figure is not fair: said so, not "not evaluated"
    # (evaluating again would say the same).
    from wingspan.cli.runs import _held_out

    # A figure of part of the split (4 of its images gone since) says of how many
    part = {**evaluation, "unreadable": [["gone.jpg", "No such file"]] * 4}
    (runs_dir / "adapted" / "evaluation-test" / "metrics.json").write_text(json.dumps(part))
    row = ws.runs(runs_dir).set_index("name").loc["adapted"]
    assert _held_out(row) == (f"{round(evaluation['macro']['f1'], 5):.4f} "
                              f"({evaluation['images']} of {evaluation['images'] + 4})")

    unfair = {**evaluation, "fair": "no: `wingspan adapt` refitted this model on 3 of these"}
    (runs_dir / "adapted" / "evaluation-test" / "metrics.json").write_text(json.dumps(unfair))
    row = ws.runs(runs_dir).set_index("name").loc["adapted"]
    assert pd.isna(row["held_out_macro_f1"]) and bool(row["held_out_evaluated"])
    assert _held_out(row) == "not fair (see evaluate)"
    shutil.rmtree(runs_dir / "adapted" / "evaluation-test")
    assert _held_out(ws.runs(runs_dir).set_index("name").loc["adapted"]) == "not evaluated"
    assert rows["leftover"]["backbone"] is None and rows["leftover"]["created"]
    # Sorted: scores best first, empty cells last; other columns ascending.
    assert ws.runs(runs_dir, sort="val_macro_f1")["name"].tolist()[:2] == ["[red]seed1",
                                                                          "seed0"]
    assert ws.runs(runs_dir, sort="seed")["seed"].tolist()[:5] == [0, 0, 0, 0, 1]
    # The headers `wingspan runs` prints sort too ("Cannot sort by 'val F1'" before).
    for header, column in (("val F1", "val_macro_f1"), ("run", "name"),
                           ("held-out F1", "held_out_macro_f1"), ("Seconds", "train_seconds"),
                           ("held-out F1 (images)", "held_out_macro_f1")):
        assert ws.runs(runs_dir, sort=header)["name"].tolist() == ws.runs(
            runs_dir, sort=column)["name"].tolist(), header
    with pytest.raises(WingspanError, match="Cannot sort by 'val_f'") as e:
        ws.runs(runs_dir, sort="val_f")
    assert "Did you mean 'val_macro_f1'?" in e.value.hint
    with pytest.raises(WingspanError, match="best_stage and best_epoch"):  # (a header:
        ws.runs(runs_dir, sort="best")  # it was told "no such column")
    # Scores read alike (1.0 read "1.0" beside "0.8070"); a long failure is cut in the
    # table, not wrapped a word a line in a narrow terminal.
    from wingspan.cli.runs import _RUN_COLUMNS, _status_cell

    score = dict((h, cell) for h, cell, _ in _RUN_COLUMNS)["val F1"]
    assert score({"val_macro_f1": 1.0}) == "1.0000"
    cut = _status_cell({"status": "failed", "detail": "Every training image of " + "x, " * 80})
    assert len(cut) < 80 and cut.endswith("...")  # ("…" crashed an ASCII terminal)


def test_a_stopped_run_says_after_which_epoch_and_plainly_without_its_history(runs_dir):
    """Read from history.csv's last row (`--resume` takes up after it); a history missing,
    empty, damaged or not wingspan's must not cost the listing: the plain status."""
    stopped = runs_dir / "stopped"
    history = pd.read_csv(stopped / "history.csv")
    history.iloc[:2].to_csv(stopped / "history.csv", index=False)  # killed in head epoch 3
    first = history.iloc[1]
    last = stopped / "checkpoints" / "last.pt"
    os.utime(last)  # checkpointed after that epoch
    assert _status(runs_dir, "stopped") == (
        "stopped (resumable)", f"after {first['stage']} epoch {first['epoch']}")
    # The head stage checkpoints every few minutes: history.csv may be ahead of last.pt.
    os.utime(last, (1, 1))
    assert _status(runs_dir, "stopped")[1].endswith("; resumes from an earlier checkpoint")
    saved = last.read_bytes()
    last.unlink()
    assert _status(runs_dir, "stopped")[1].endswith("; no checkpoint yet: resumes from the "
                                                    "start")
    last.write_bytes(saved)
    for damage in (lambda p: p.unlink(), lambda p: p.write_text(""),
                   lambda p: p.write_text("stage,epoch\n"),  # before its first epoch
                   lambda p: p.write_bytes(b"\xff\xfe,\x00\n\"a"),
                   lambda p: p.write_text("stage,epoch\nhead,two\n"),
                   lambda p: p.write_text("when,what\n1,2\n"),
                   lambda p: p.write_text("stage,epoch\n[red]x[/],1\n")):
        damage(stopped / "history.csv")
        assert _status(runs_dir, "stopped") == ("stopped (resumable)", None)


def test_runs_says_which_run_is_being_trained_now(runs_dir, finished):
    # Another process's lock on the run: flock'd through a file of our own (this process
    # holds no run through train's own lock, which being_trained would not count).
    with open(runs_dir / "stopped" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        frame = ws.runs(runs_dir)
    assert frame.set_index("name").loc["stopped", "status"] == "training now"
    assert _status(runs_dir, "stopped") == ("stopped (resumable)", _stopped_after(finished))


def test_runs_on_nfs_says_a_finished_run_is_not_being_trained(runs_dir, finished,
                                                              monkeypatch):
    """NFS emulates flock with byte-range locks: an exclusive one needs a file opened to
    write (flock(2)). being_trained opens the lock to read, so it must test with a shared
    lock, or every run with a .lock reads as being trained there."""
    import errno
    import os

    flock = fcntl.flock

    def nfs_flock(handle, operation):
        fd = handle if isinstance(handle, int) else handle.fileno()
        if operation & fcntl.LOCK_EX and \
                fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return flock(handle, operation)

    (runs_dir / "stopped" / ".lock").touch()  # left by the run that trained it
    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    assert _status(runs_dir, "stopped") == ("stopped (resumable)", _stopped_after(finished))
    with open(runs_dir / "stopped" / ".lock", "w") as lock:  # and one held is still seen
        flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert ws.runs(runs_dir).set_index("name").loc["stopped", "status"] == "training now"


def test_runs_says_when_a_lock_cannot_be_read(run_cli, runs_dir, monkeypatch):
    """Another user's run whose .lock we may not open: `train` takes it as held (never two
    at once), but the listing must not call a finished run "training now". Emulated, as
    the tests may run as root, whom no mode stops."""
    import builtins
    import errno
    from pathlib import Path

    from wingspan.training.folder import being_trained

    (runs_dir / "seed0" / ".lock").touch()  # (leftover has its own)
    real_open = builtins.open

    def no_lock(file, *args, **kwargs):
        if isinstance(file, str | Path) and Path(file).name == ".lock" and \
                Path(file).parent.name in ("seed0", "leftover"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_lock)
    status = ws.runs(runs_dir).set_index("name")["status"]
    assert status["seed0"] == status["leftover"] == "unknown: cannot read .lock"
    assert status["[red]seed1"] == "done"  # a lock that can be read: as before
    assert being_trained(runs_dir / "seed0")  # what `train` asks: held, to be safe
    code, out, err = run_cli("runs", runs_dir)
    assert code == 0, err
    assert "A run whose .lock cannot be read may or may not be training now" in \
        " ".join(out.split())


def test_runs_leaves_out_a_folder_it_may_not_enter_and_says_so(runs_dir, run_cli,
                                                                monkeypatch):
    """Path.is_file raises PermissionError (Python < 3.14) inside a folder without the
    execute bit: emulated, as the tests may run as root, whom no mode stops. Such a folder
    (another user's run, made with umask 077) was left out unsaid: its name is said."""
    import errno
    import pathlib

    (runs_dir / "private").mkdir()
    (runs_dir / "lost+found").mkdir()  # (a file system's own, at a mount's top: no run)
    stat, access = pathlib.Path.stat, os.access

    def no_entry(path, *args, **kwargs):
        if path.parent.name == "private":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", no_entry)
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
        pathlib.Path(path).name not in ("private", "lost+found") and access(path, mode, **kwargs)))
    frame = ws.runs(runs_dir)
    assert "private" not in frame["name"].tolist() and "seed0" in frame["name"].tolist()
    assert frame.attrs["unreadable"] == ["private"]
    code, out, err = run_cli("runs", runs_dir, "--output", runs_dir.parent / "runs.html")
    said = "Not listed: 1 folder this user may not read (private); ask the owner for read " \
        "access."
    assert code == 0 and said in " ".join(out.split()), (out, err)
    assert said in (runs_dir.parent / "runs.html").read_text()  # (the page says it too)


def test_runs_names_only_the_folders_it_left_out(runs_dir, run_cli, monkeypatch, tmp_path):
    """A run that may be entered but not listed (chmod 711) is read by its files' names and
    listed: it was said to be left out too. A name in other bytes than UTF-8 stopped the
    page's write; and where no folder could be read, the page said "No runs here." alone."""
    import pathlib

    private = os.fsdecode(b"caf\xe9")
    (runs_dir / private).mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
        pathlib.Path(path).name not in ("seed0", private) and access(path, mode, **kwargs)))
    frame = ws.runs(runs_dir)
    assert "seed0" in frame["name"].tolist() and frame.attrs["unreadable"] == [private]
    code, out, err = run_cli("runs", runs_dir, "--output", tmp_path / "runs.html")
    assert code == 0 and "(caf\\udce9)" in (tmp_path / "runs.html").read_text(), err
    (tmp_path / "alone" / private).mkdir(parents=True)
    code, out, err = run_cli("runs", tmp_path / "alone", "--output", tmp_path / "alone.html")
    assert code == 0 and "Not listed: 1 folder" in (tmp_path / "alone.html").read_text(), err


def test_runs_leaves_out_the_hidden_folder_of_an_adapt_stopped_midway(runs_dir, finished):
    """A killed `adapt` left runs/.NAME-adapted.partial, a copy of the run's files with no
    model yet: listed as "stopped (resumable)", and `train --resume` on it retrained the
    base run from its start, which the next adapt of that name then deleted unsaid."""
    partial = _copy(finished, runs_dir / ".seed0-adapted.partial")
    shutil.rmtree(partial / "model")
    names = ws.runs(runs_dir)["name"].tolist()
    assert "seed0" in names and not [n for n in names if n.startswith(".")]


def test_a_bad_engine_setting_in_the_environment_leaves_a_stopped_run_stopped(
        finished, tmp_path, monkeypatch):
    """$WINGSPAN_PRECISION=bogus stopped `train --resume` in the run's set-up, which wrote
    error.txt: `wingspan runs` then called the intact run failed."""
    from wingspan.training import resume

    stopped = _copy(finished, tmp_path / "runs" / "stopped")
    (stopped / "model" / "manifest.json").unlink()
    (stopped / "metrics.json").unlink()
    before = ws.runs(tmp_path / "runs").loc[0, "status"]
    monkeypatch.setenv("WINGSPAN_PRECISION", "bogus")
    with pytest.raises(WingspanError, match=r"Unknown precision 'bogus' \(WINGSPAN_PRECISION"):
        resume(stopped, quiet=True)
    assert not (stopped / "error.txt").exists()
    assert ws.runs(tmp_path / "runs").loc[0, "status"] == before


def test_a_run_that_lost_its_config_is_listed_damaged(runs_dir, finished):
    """A trained run whose config.yaml was deleted was left out unsaid, where `train
    --resume` calls it damaged."""
    lost = _copy(finished, runs_dir / "lost")
    (lost / "config.yaml").unlink()
    row = ws.runs(runs_dir).set_index("name").loc["lost"]
    assert row["status"] == "damaged" and row["detail"] == "config.yaml is missing (a " \
        "resume needs it)"
    # evaluate and calibrate said "this bundle is not inside a run folder"
    from wingspan.evaluate.calibrate import calibrate

    for command in (evaluate, calibrate):
        with pytest.raises(WingspanError, match=f"{lost / 'config.yaml'} is missing: {lost} "
                           "has a run's splits.csv") as e:
            command(lost, progress=False, workers=0)
        assert e.value.hint == (f"Put the run's config.yaml back to {command.__name__} on its "
                                f"own splits, or give DATA: `wingspan {command.__name__} "
                                f"{lost / 'model'} DATA`.")


def test_a_run_that_lost_its_splits_is_listed_damaged(runs_dir, finished):
    """A trained run whose splits.csv was deleted was left out of the listing unsaid (as
    another program's config.yaml), and evaluate called the missing file changed."""
    lost = _copy(finished, runs_dir / "lost-splits")
    (lost / "splits.csv").unlink()
    row = ws.runs(runs_dir).set_index("name").loc["lost-splits"]
    assert row["status"] == "damaged" and row["detail"] == "splits.csv is missing " \
        "(evaluate and a resume need it)"
    with pytest.raises(WingspanError, match="splits.csv is missing") as e:
        evaluate(lost, progress=False, workers=0, plots=False)
    assert "Put the run's own splits.csv back" in e.value.hint
    # Another program's config.yaml alone is still no run.
    (runs_dir / "other").mkdir()
    (runs_dir / "other" / "config.yaml").write_text("lr: 1\n")
    assert "other" not in ws.runs(runs_dir)["name"].tolist()


def test_runs_in_a_folder_it_may_not_read_is_a_clear_error(run_cli, runs_dir, monkeypatch):
    import errno
    import pathlib

    def no_listing(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(pathlib.Path, "iterdir", no_listing)  # (root reads any folder)
    code, _, err = run_cli("runs", runs_dir)
    assert code == 2 and f"Cannot list runs in {runs_dir}" in " ".join(err.split())
    assert "Permission denied" in err and "Traceback" not in err


def _cells(out: str) -> list[list[str]]:
    """The table's rows, cut at the columns where its header's labels begin."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.strip().startswith("run "))
    starts = [m.start(1) for m in re.finditer(r"(?:^|\s{2})(\S)", lines[head])]
    rows = []
    for line in lines[head + 2:]:
        if not line.strip():
            break
        rows.append([line[a:b].strip() for a, b in
                     zip(starts, [*starts[1:], None], strict=True)])
    return rows


def test_runs_command_table_and_outputs(run_cli, runs_dir, finished, tmp_path, monkeypatch):
    from wingspan.cli import common as cli

    monkeypatch.setattr(cli.out, "_width", 400)  # a row on a line (rich's own field)
    monkeypatch.chdir(tmp_path)  # RUNS_DIR by default: runs/, as train writes it
    code, out, err = run_cli("runs", "--sort", "name", "--output", "all.csv")
    assert code == 0, err
    cells = _cells(out)
    assert [c[:2] for c in cells] == [
        ["[red]seed1", "done"], ["adapted", "done (adapted): from finished on 3 photos"],
        ["leftover", "left over: killed while set up"],
        ["seed0", "done"],
        ["stopped", f"stopped {_stopped_after(finished)} (resumable)"],
        ["torn", "damaged: metrics.json is not valid JSON (line 1, column 10)"]]
    frame = ws.runs("runs", sort="name")
    seed1 = cells[0]
    assert seed1[4:12] == ["label", "32", "1", "holdout", "0.9900", "not evaluated",
                           "finetune 2", "107.2"]
    assert cells[1][4:10] == ["label", "32", "0", "holdout", "", "not evaluated"]
    seed0 = frame.iloc[3]
    # (with the images the held-out figure was measured on: 1.0 on 2 topped the table)
    assert cells[3][8:10] == [f"{seed0['val_macro_f1']:.4f}",
                             f"{seed0['held_out_macro_f1']:.4f} ({seed0['held_out_images']})"]
    assert "`wingspan train --resume runs/NAME`" in out and "Wrote all.csv" in out
    # What was written is the frame, cell for cell, in either format.
    assert _plain(pd.read_csv(tmp_path / "all.csv")) == _plain(frame)
    code, _, err = run_cli("runs", "runs", "--sort", "name", "--output", "out/all.json")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "all.json").read_text())["runs"] == _plain(frame)
    code, _, err = run_cli("runs", "runs", "--output", "all.txt")
    assert code == 2 and "must end in .csv, .json or .html." in " ".join(err.split())
    # --output -: the CSV alone on standard output, for a pipe (the table cut names short)
    code, out, err = run_cli("runs", "runs", "--sort", "name", "--output", "-")
    assert code == 0, err
    assert _plain(pd.read_csv(io.StringIO(out))) == _plain(frame)
    # A narrow terminal (or a pipe) gets the main columns, no cell cut short.
    monkeypatch.setattr(cli.out, "_width", 80)
    code, out, _ = run_cli("runs")
    assert code == 0 and "…" not in out and "0.9900" in out
    assert "created in a wider terminal or with --output" in " ".join(out.split())


def test_listing_runs_needs_no_torch():
    """Read from JSON and YAML alone, it starts in a blink (no training stack)."""
    import subprocess
    import sys

    code = "import sys, wingspan.run_table; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False"]


def test_runs_dir_that_is_no_runs_folder_is_a_clear_error(run_cli, runs_dir, tmp_path):
    code, _, err = run_cli("runs", tmp_path / "no-such")
    assert code == 2 and "There is no folder" in err and "Hint:" in err and "--runs-dir" in err
    code, _, err = run_cli("runs", runs_dir / "README.txt")
    assert code == 2 and "is a file, not a folder of runs" in err
    code, _, err = run_cli("runs", runs_dir / "seed0")
    assert code == 2 and "is a run itself" in err
    assert f"`wingspan runs {runs_dir}`" in " ".join(err.split())
    with pytest.raises(WingspanError, match="There is no folder"):
        ws.runs(tmp_path / "no-such")
    code, out, _ = run_cli("runs", runs_dir / "notes")
    assert code == 0 and "No runs in" in out


def test_a_killed_trainers_data_workers_do_not_keep_its_run_locked(tmp_path):
    """The trainer holds the run's lock; a worker forked after it (a data loader's) shared
    it and, outliving a trainer killed with SIGKILL by seconds, kept the run "training now"
    and a --resume refused."""
    import signal
    import subprocess
    import sys
    import textwrap

    from wingspan.training.folder import HELD, lock_state

    run = tmp_path / "r"
    run.mkdir()
    trainer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from wingspan.training.folder import hold_lock
        assert hold_lock(Path({str(run)!r}))
        if os.fork() == 0:  # a worker: lives on after the trainer
            # Said from the worker, once fork() has returned in it (its at-fork hooks have
            # run): the trainer's word came before the worker had run at all on a busy CI.
            print(os.getpid(), flush=True)
            time.sleep(30)
            os._exit(0)
        time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    worker = int(trainer.stdout.readline())
    try:
        assert lock_state(run) == HELD  # the trainer trains it
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        os.kill(worker, 0)  # the worker still lives...
        assert lock_state(run) != HELD  # ...and holds nothing
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_runs_on_a_terminal_or_pipe_of_another_encoding(finished, tmp_path):
    """`--output -` wrote its CSV in the terminal's encoding (a Windows pipe's cp1252 cut a
    CSV of CJK names short, exit 1), and closing the pipe early (`| head`) exited 1; an
    ASCII terminal crashed on the table's "…" (a failed run's error cut short)."""
    import subprocess
    import sys

    runs = tmp_path / "runs"
    _copy(finished, runs / "蝴蝶 été")
    failed = _copy(finished, runs / "failed")
    (failed / "model" / "manifest.json").unlink()
    (failed / "error.txt").write_text("RuntimeError: " + "a long error, " * 10 + "\n")

    def wingspan(*args, encoding, close=False):
        done = subprocess.Popen([sys.executable, "-m", "wingspan", *args], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONIOENCODING": encoding,
                                     "COLUMNS": "80"})
        if close:
            done.stdout.close()
        out, said = done.communicate(timeout=300)
        assert done.returncode == 0, said.decode()[-2000:]
        return out, said

    out, _ = wingspan("runs", "runs", "--output", "-", encoding="cp1252")
    rows = pd.read_csv(io.StringIO(out.decode("utf-8")))  # UTF-8, as the file would be
    assert sorted(rows["name"]) == ["failed", "蝴蝶 été"]
    _, said = wingspan("runs", "runs", "--output", "-", encoding="utf-8", close=True)
    assert not said, said.decode()
    out, _ = wingspan("runs", "runs", encoding="ascii")  # the table, its odd letters escaped
    assert "failed:" in out.decode("ascii") and "\\u8774\\u8776" in out.decode("ascii")


def test_a_run_reached_by_a_link_too_is_listed_once(finished, tmp_path):
    """A link beside a run (`ln -s r latest`) listed it twice; a run linked in from
    elsewhere is listed, once however many links lead to it."""
    runs = tmp_path / "runs"
    _copy(finished, runs / "r")
    (runs / "latest").symlink_to(runs / "r")
    (runs / "linked").symlink_to(finished)
    (runs / "linked-again").symlink_to(finished)
    assert sorted(ws.runs(runs)["name"]) == ["linked", "r"]


def test_how_to_go_on_is_quoted_for_the_shell(tmp_path):
    """The resume command a stopped run prints was pasted into a shell as it was: a run
    folder with a space in its path became two arguments."""
    from wingspan.training.run import go_on

    run_dir = tmp_path / "my runs" / "first run"
    said = go_on(run_dir)
    assert f"wingspan train --resume '{run_dir}' (in Python: ws.resume({str(run_dir)!r}))" \
        in said
    # and where predict, evaluate or export meet the stopped run
    from wingspan.errors import WingspanError
    from wingspan.inference import find_bundle

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    (run_dir / "splits.csv").write_text("path,label,split\n")
    with pytest.raises(WingspanError) as e:
        find_bundle(run_dir)
    assert f"`wingspan train --resume '{run_dir}'`" in e.value.hint, e.value.hint


def test_a_deleted_working_folder_shows_paths_as_they_are(tmp_path, monkeypatch):
    """`wingspan runs` from a folder deleted under the shell (rm -rf runs; mkdir runs, from
    another terminal) ended in a FileNotFoundError traceback: paths are shown relative to
    the working folder, which was not there to ask."""
    from wingspan.cli.common import here

    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert here(tmp_path / "runs" / "a") == tmp_path / "runs" / "a"
    # From /, a path is shown whole: made relative to /, it lost its leading slash
    monkeypatch.chdir("/")
    assert here(tmp_path / "runs" / "a") == tmp_path / "runs" / "a"


def test_a_stopped_run_whose_checkpoint_is_cut_short_is_listed_damaged(finished, tmp_path):
    """A last.pt cut short (a copy of the folder that stopped midway) was listed "stopped
    (resumable)", and the resume it promised then refused it."""
    import torch

    runs = tmp_path / "runs"
    stopped = _copy(finished, runs / "stopped")
    (stopped / "model" / "manifest.json").unlink()
    (stopped / "metrics.json").unlink()
    last = stopped / "checkpoints" / "last.pt"
    last.parent.mkdir(exist_ok=True)
    torch.save({"step": torch.zeros(10_000)}, last)
    assert _status(runs, "stopped")[0] == "stopped (resumable)"
    whole = last.read_bytes()
    last.write_bytes(whole[: len(whole) // 2])
    status, detail = _status(runs, "stopped")
    assert status == "damaged" and detail.startswith("checkpoints/last.pt is cut short"), detail


def test_runs_say_which_settings_and_splits_tell_the_runs_apart(run_cli, finished, tmp_path,
                                                                monkeypatch):
    """Runs of one command but --lr or --label-smoothing read alike in `wingspan runs`, row
    for row; and a run of another --seed was scored on another split (other images), unsaid."""
    from wingspan.cli import common as cli
    from wingspan.training.folder import splits_digest

    runs = tmp_path / "runs"
    _copy(finished, runs / "a")
    for name, change in (("lr", {"lr": 0.01}), ("smooth", {"label_smoothing": 0.0})):
        run = _copy(finished, runs / name)
        config = yaml.safe_load((run / "config.yaml").read_bytes())
        (run / "config.yaml").write_text(yaml.safe_dump({**config, **change}))
    other = _copy(finished, runs / "other-split")  # as --seed 1 splits the data
    splits = pd.read_csv(other / "splits.csv", dtype=str, keep_default_na=False)
    first_test = splits.index[splits["split"] == "test"][0]
    splits.loc[first_test, "split"] = "train"
    splits.to_csv(other / "splits.csv", index=False)
    _edit_json(other / "metrics.json", lambda m: {**m, "splits_digest": splits_digest(other)})
    (runs / "torn").mkdir()  # a run whose config cannot be read tells nothing either way
    (runs / "torn" / "config.yaml").write_text("lr: [\n")
    shutil.copy(finished / "splits.csv", runs / "torn" / "splits.csv")
    lr, smoothing = yaml.safe_load((finished / "config.yaml").read_bytes())["lr"], \
        yaml.safe_load((finished / "config.yaml").read_bytes())["label_smoothing"]
    ours, theirs = splits_digest(finished)[:8], splits_digest(other)[:8]
    changes = {r["name"]: r["changes"] for r in _plain(ws.runs(runs))}
    assert changes == {
        "a": f"lr={lr} label_smoothing={smoothing} split={ours}",
        "lr": f"lr=0.01 label_smoothing={smoothing} split={ours}",
        "smooth": f"lr={lr} label_smoothing=0.0 split={ours}",
        "other-split": f"lr={lr} label_smoothing={smoothing} split={theirs}",
        "torn": None}
    monkeypatch.setattr(cli.out, "_width", 80)  # beneath the table, a run a line
    code, out, err = run_cli("runs", runs)
    assert code == 0, err
    assert f"  lr: lr=0.01 label_smoothing={smoothing} split={ours}" in out.splitlines()
    # Runs alike in all but their names: no changes to show.
    shutil.rmtree(runs / "lr"), shutil.rmtree(runs / "smooth"), shutil.rmtree(other)
    assert ws.runs(runs)["changes"].isna().all()
    code, out, _ = run_cli("runs", runs)
    assert code == 0 and "What differs" not in out


def test_sorting_runs_by_their_held_out_figure_says_the_choice_spends_it(run_cli, finished,
                                                                        tmp_path):
    """`--sort held-out` invites choosing on the test split, and the chosen run's figure
    was still called fair: a line says that a choice among runs spends it, as the epoch's
    choice spends val."""
    runs = tmp_path / "runs"
    _copy(finished, runs / "a")
    code, out, err = run_cli("runs", runs, "--sort", "held-out F1")
    assert code == 0 and "optimistic too" not in out, (out, err)  # one run: no choice
    _copy(finished, runs / "b")
    for sort in ("held-out F1", "held_out_macro_f1"):
        code, out, err = run_cli("runs", runs, "--sort", sort)
        said = " ".join(out.split())
        assert code == 0 and "Choosing a run by its held-out F1 makes that figure optimistic " \
            "too: choose by val F1, or score the chosen one on data no choice has seen " \
            "(`wingspan evaluate RUN OTHER_DATA`)." in said, (out, err)
    code, out, err = run_cli("runs", runs, "--sort", "val F1")
    assert code == 0 and "optimistic too" not in out, (out, err)


def test_runs_page_lists_links_and_draws_the_runs(run_cli, runs_dir, finished, tmp_path,
                                                  monkeypatch):
    """`--output runs.html`: the runs side by side on one self-contained page, as a W&B or
    MLflow user compares experiments: every run a row (a damaged one with what is wrong),
    its name a link to its report (else its config.yaml), the finished runs' val F1 per
    epoch in one embedded figure; names that are HTML or markup shown as they are."""
    import base64
    import html
    from urllib.parse import unquote

    from helpers import accessibility_problems, chromium_path, cli_in_new_process
    from playwright.sync_api import sync_playwright

    from wingspan.evaluate import plots

    _copy(finished, runs_dir / "<i>it's & co")  # evaluated too: two held-out figures
    drawn = []
    real = plots.plot_runs_f1
    monkeypatch.setattr(plots, "plot_runs_f1", lambda h, p: drawn.append(list(h)) or real(h, p))
    page_path = tmp_path / "page" / "runs.html"
    code, out, err = run_cli("runs", runs_dir, "--sort", "held-out F1", "--output", page_path)
    assert code == 0 and "Wrote" in out, err
    page = page_path.read_text()
    frame = ws.runs(runs_dir)
    assert all(f">{html.escape(name)}<" in page for name in frame["name"])
    assert "<i>it" not in page and "damaged: metrics.json is not valid JSON" in page
    assert "val F1: the macro-F1 the best epoch was chosen on (optimistic)" in page
    assert "makes that figure optimistic too" in page  # (chosen by held-out F1, of two)
    # Links relative to the page, each to a file there: a report, else the settings.
    links = dict(re.findall(r"<a href='([^']*)'>([^<]*)</a>", page))
    assert all((page_path.parent / unquote(href)).is_file() for href in links)
    to = {html.unescape(name): unquote(href) for href, name in links.items()}
    assert to["seed0"] == "../runs/seed0/evaluation-test/report.html"
    assert to["[red]seed1"].endswith("seed1/config.yaml") and "leftover" not in to
    # The figure: embedded, named for a screen reader, a line per finished run.
    [(alt, data)] = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([^']+)'>",
                               page)
    assert "val macro-F1 per epoch" in alt
    assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(drawn[0]) == sorted(frame.loc[frame["status"] == "done", "name"])
    # No runs: a page that says so; and the page, as the listing, needs no torch.
    (tmp_path / "none").mkdir()
    done = cli_in_new_process(["runs", tmp_path / "none", "--output", tmp_path / "none.html"],
                              ("torch",))
    assert "exit 0" in done.stdout and "imported: []" in done.stdout, done
    assert "No runs here" in (tmp_path / "none.html").read_text()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path())
        for path, width in ((page_path, 1280), (page_path, 375), (tmp_path / "none.html", 375)):
            tab = browser.new_page(viewport={"width": width, "height": 800})
            tab.goto(path.resolve().as_uri())
            assert accessibility_problems(tab) == [], (path, width)
            tab.close()
        browser.close()


def test_runs_figure_keeps_many_runs_legend_outside_its_lines(tmp_path):
    """Thirty runs' names laid over the lines hid them: the legend goes beside the axes."""
    from wingspan.evaluate import plots

    history = pd.DataFrame({"stage": ["head"] * 2 + ["finetune"] * 3,
                            "epoch": [1, 2, 1, 2, 3], "val_macro_f1": [.2, .4, .5, .6, .65]})
    figures = []
    real = plots._save
    with pytest.MonkeyPatch.context() as m:
        m.setattr(plots, "_save", lambda fig, path: figures.append(fig) or real(fig, path))
        plots.plot_runs_f1({f"run-{i}": history for i in range(30)}, tmp_path / "f1.png")
    ax = figures[0].axes[0]
    legend = ax.get_legend()
    assert len(legend.get_texts()) == 31  # and "fine-tuning begins"
    assert legend.get_window_extent().x0 > ax.get_window_extent().x1
    assert legend.get_window_extent().x1 <= figures[0].bbox.x1 + 1  # not cut off
    assert (tmp_path / "f1.png").is_file()


def test_a_narrow_listing_says_which_runs_differ_in_image_size(run_cli, finished, tmp_path,
                                                                monkeypatch):
    """At 80 columns the size column is left out, and `changes` leaves image_size to that
    column: runs of one command but --image-size read alike, row for row."""
    from wingspan.cli import common as cli

    runs = tmp_path / "runs"
    _copy(finished, runs / "a")
    big = _copy(finished, runs / "big")
    config = yaml.safe_load((big / "config.yaml").read_bytes())
    size = config["image_size"]
    (big / "config.yaml").write_text(yaml.safe_dump({**config, "image_size": size * 2}))
    monkeypatch.setattr(cli.out, "_width", 80)
    code, out, err = run_cli("runs", runs)
    assert code == 0, err
    lines = out.splitlines()
    assert f"  a: image_size={size}" in lines and f"  big: image_size={size * 2}" in lines, out


def test_a_narrow_listing_says_which_runs_differ_in_their_levels(run_cli, finished, tmp_path,
                                                                  monkeypatch):
    """`changes` leaves level and levels to the levels column, which 80 columns leave out:
    a run of --levels family,species and one of species alone read alike, row for row."""
    from wingspan.cli import common as cli

    runs = tmp_path / "runs"
    _copy(finished, runs / "a")
    both = _copy(finished, runs / "both")
    _edit_json(both / "model" / "manifest.json",
               lambda m: {**m, "classes": {"family": ["x", "y"], **m["classes"]}})
    level = ws.runs(runs).set_index("name").loc["a", "levels"]
    monkeypatch.setattr(cli.out, "_width", 80)
    code, out, err = run_cli("runs", runs)
    assert code == 0, err
    lines = out.splitlines()
    assert f"  a: levels={level}" in lines and f"  both: levels=family,{level}" in lines, out


def test_changes_spell_settings_as_config_yaml_does(finished, tmp_path):
    """`changes` gave Python's spelling of a setting, max_per_class=None and
    holdout_classes=['a', 'b'], where config.yaml and the options say null and a,b."""
    runs = tmp_path / "runs"
    _copy(finished, runs / "a")
    capped = _copy(finished, runs / "capped")
    config = yaml.safe_load((capped / "config.yaml").read_bytes())
    assert config["max_per_class"] is None and config["allow_leaky_splits"] is False
    (capped / "config.yaml").write_text(yaml.safe_dump(
        {**config, "max_per_class": 5, "allow_leaky_splits": True,
         "level_weights": [1.0, 2.0]}))
    changes = dict(ws.runs(runs)[["name", "changes"]].itertuples(index=False))
    assert set(changes["a"].split()) == {"max_per_class=null", "allow_leaky_splits=false",
                                         "level_weights=null"}, changes
    assert set(changes["capped"].split()) == {"max_per_class=5", "allow_leaky_splits=true",
                                              "level_weights=1.0,2.0"}, changes


def test_a_narrow_listing_says_which_runs_were_trained_on_other_data(run_cli, finished,
                                                                     tmp_path, monkeypatch):
    """At 80 columns the data column is left out: runs on two datasets read alike, and a
    held-out sort ranked them together."""
    from wingspan.cli import common as cli

    runs = tmp_path / "runs"
    _copy(finished, runs / "a")
    other = _copy(finished, runs / "other")
    text = (other / "config.yaml").read_text(encoding="utf-8")
    first, rest = text.split("\n", 1)
    ours = first.removeprefix("# Trained on ").split(", read with")[0]
    (other / "config.yaml").write_text(
        first.replace(ours, str(tmp_path / "leeds")) + "\n" + rest, encoding="utf-8")
    monkeypatch.setattr(cli.out, "_width", 80)
    code, out, err = run_cli("runs", runs)
    assert code == 0, err
    lines = out.splitlines()
    assert f"  a: data={ours}" in lines and f"  other: data={tmp_path / 'leeds'}" in lines, out
