import json
import os
import re
import shlex
import shutil

import pytest
import yaml
from helpers import write_image

from wingspan.data import read_dataset


@pytest.mark.parametrize("command", [[], ["data"], ["data", "inspect"], ["data", "split"],
                                     ["data", "preview"], ["demo"], ["models"],
                                     ["models", "list"], ["runs"]])
def test_every_command_has_help(run_cli, command):
    code, out, _ = run_cli(*command, "--help")
    assert code == 0
    assert "Usage" in out and "--help" in out


def test_inspect_command(run_cli, demo_dir, tmp_path, monkeypatch):
    code, out, err = run_cli("data", "inspect", demo_dir, "--out", tmp_path, "--quiet",
                             "--level", "genus")
    assert code == 0, err
    assert "Classes per level" in out and "Images per genus" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dataset"]["images"] == 43
    assert (tmp_path / "balance_genus.png").stat().st_size > 1000
    # The pixel budget its messages name can be set here too (48 x 48 JPEGs, 6 x 6 at 1/8).
    # The option sets $WINGSPAN_MAX_PIXELS for the process: setenv first, so that the
    # test's end takes it away again (delenv of an unset variable would not).
    monkeypatch.setenv("WINGSPAN_MAX_PIXELS", "50000000")
    code, out, err = run_cli("data", "inspect", demo_dir, "--out", tmp_path / "small",
                             "--quiet", "--max-pixels", "30")
    assert code == 0, err
    unreadable = json.loads((tmp_path / "small" / "summary.json").read_text())["images"][
        "unreadable"]
    assert len(unreadable) == 43 and "over the pixel budget" in unreadable[0]["error"]


def test_split_command(run_cli, demo_dir, tmp_path, monkeypatch):
    code, out, err = run_cli("data", "split", demo_dir, "--level", "label", "--val", "0.2",
                             "--test", "0.2", "--max-per-class", "5", "--out", tmp_path)
    assert code == 0, err
    assert "Balanced class weights" in out and "--max-per-class left out" in out
    # How to train on it: `train DATA` splits DATA afresh, and this split went unused.
    assert f"Train on this split: `wingspan train {tmp_path / 'splits.csv'}`" in " ".join(
        out.split())
    # The demo gives no groups: said as train says it (data split was silent of it).
    assert "Split photo by photo (no groups given" in " ".join(out.split())
    ds = read_dataset(tmp_path / "splits.csv")
    assert set(ds.table["split"]) == {"train", "val", "test"}
    code, grouped, _ = run_cli("data", "split", demo_dir, "--group-regex", r"(.*_\d{4})",
                               "--out", tmp_path / "grouped")
    assert code == 0 and "photo by photo" not in grouped
    sampling = json.loads((tmp_path / "sampling.json").read_text())
    # One class: train refuses it, so the split says so rather than how to train on it.
    one = tmp_path / "one"
    shutil.copytree(demo_dir / "azure_spotwing", one / "azure_spotwing")
    code, said, err = run_cli("data", "split", one, "--out", tmp_path / "one-split")
    said = " ".join(said.split())
    assert code == 0, err
    assert "trains one class only, which `wingspan train` refuses" in said
    assert "Train on this split" not in said
    assert set(sampling["class_weights"]) == set(ds.table["label"])
    # Said when train's default would leave those weights off (5 a class: within 1.5x).
    w = sampling["class_weights"].values()
    assert max(w) <= 1.5 * min(w)
    assert "train leaves them off by default, its classes being within 1.5x" in \
        " ".join(out.split())
    written = ds.table["split"].value_counts()  # what the file holds, said as such
    assert (f"So splits.csv holds train {written['train']}, val {written['val']}, test "
            f"{written['test']} rows") in " ".join(out.split())
    # Split again, a split of its own: said, as train DATA would keep using that one.
    code, out, _ = run_cli("data", "split", tmp_path / "splits.csv", "--out", tmp_path / "again")
    assert code == 0 and "DATA has a split of its own" in out
    code, out, _ = run_cli("data", "preview", demo_dir, "--rows", "2", "--out", tmp_path / "p")
    assert code == 0 and "(2 of 4 classes; --rows 4 for all)" in out
    # What reading left out is said before splitting, as train says it.
    data = shutil.copytree(demo_dir, tmp_path / "data")
    (data / "empty class").mkdir()
    code, out, err = run_cli("data", "split", data, "--out", tmp_path / "s2")
    assert code == 0 and "While reading the data: 1 x empty class, e.g. class folder 'empty " \
        "class' has no images" in " ".join(err.split())
    # The path on one line of typer's error box. typer draws it on a console it makes for
    # each error, so $COLUMNS set now counts (the consoles' widths, fixed at
    # import, are not the ones that draw it).
    monkeypatch.setenv("COLUMNS", "400")
    code, _, err = run_cli("data", "split", demo_dir, "--out", tmp_path / "splits.csv")
    assert code == 2 and "is a file; name a folder to write into" in err
    code, _, err = run_cli("train", demo_dir, "--runs-dir", tmp_path / "splits.csv")
    assert code == 2 and "is a file; name a folder to write into" in err
    # '-' (standard output, for predict's --output) made a folder named '-'.
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("data", "inspect", demo_dir, "--out", "-")
    assert code == 2 and "'-' is no folder" in err and not (tmp_path / "-").exists()
    # and in every command whose --out is a folder (or export's, a file or folder)
    for args in (["evaluate", "RUN"], ["explain", "RUN", str(demo_dir)], ["export", "RUN"],
                 ["adapt", "RUN", str(demo_dir)], ["demo"]):
        code, _, err = run_cli(*args, "--out", "-")
        assert code == 2 and "'-' is no folder" in err and not (tmp_path / "-").exists(), args


def test_preview_command(run_cli, demo_dir, tmp_path):
    code, out, err = run_cli("data", "preview", demo_dir, "--rows", "2", "--views", "2",
                             "--image-size", "48", "--out", tmp_path)
    assert code == 0, err
    assert (tmp_path / "preview.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["data", "inspect", "/no/such/folder"], "does not exist"),
    (["data", "split", "DEMO", "--val", "0.7", "--test", "0.5"], "--val + --test must be below 1"),
    (["data", "split", "DEMO", "--level", "tribe"], "no label level 'tribe'"),
    (["data", "split", "DEMO", "--level", "famly"], "Did you mean 'family'?"),
    (["data", "preview", "DEMO", "--augment", "wild"], "--augment must be one of"),
    (["data", "split", "DEMO", "--seed", "-1"], "--seed = -1: must be between 0 and 2**32"),
    (["data", "preview", "DEMO", "--seed", "-1"],
     "seed (--seed, seed= in Python) must be from 0 to 2**32 - 1"),
    # (a split given where DATA goes: "No dataset at test")
    (["evaluate", "DEMO", "test"], "DATA 'test' is a split name, and no such folder is here"),
    (["calibrate", "DEMO", "val"], "DATA 'val' is a split name, and no such folder is here"),
    (["MAX_PIXELS=10MP", "data", "inspect", "DEMO"], "is '10MP', not a number of pixels"),
    (["MAX_PIXELS=²", "data", "inspect", "DEMO"], "is '²', not a number of pixels"),
    # (train and predict, which share work among processes, took the default unsaid)
    (["MAX_PIXELS=200M", "train", "DEMO", "--epochs-head", "0"], "is '200M', not a number"),
    (["MAX_PIXELS=abc", "predict", "DEMO", "DEMO"], "is 'abc', not a number of pixels"),
])
def test_user_errors_are_one_clear_message(run_cli, demo_dir, args, message, monkeypatch):
    if args[0].startswith("MAX_PIXELS="):
        monkeypatch.setenv("WINGSPAN_MAX_PIXELS", args.pop(0).split("=")[1])
    args = [str(demo_dir) if a == "DEMO" else a for a in args]
    code, out, err = run_cli(*args)
    assert code == 2
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message, setting", [
    (["train", "DEMO", "--val-fraction", "2"], "--val-fraction must be a fraction in [0, 1)",
     "val_fraction"),
    (["train", "DEMO", "--epochs-head", "0", "--epochs-finetune", "0"],
     "--epochs-head + --epochs-finetune must be at least 1", "epochs_head"),
    (["train", "DEMO", "--lr", "inf"], "--lr = inf: Input should be a finite number", "'lr'"),
    (["data", "audit", "DEMO", "--similarity", "2"], "--similarity must be in (0, 1]",
     "duplicate_similarity"),
    (["data", "preview", "DEMO", "--augment", "wild"], "--augment must be one of", "policy"),
    (["data", "inspect", "DEMO", "--tiny-px", "0"], "--tiny-px must be a positive", "tiny_px"),
    (["adapt", "DEMO", "DEMO", "--confidence", "1"], "--confidence must be from 0 to below 1",
     "'confidence'"),
    # the other setting a problem names, as typed too
    (["data", "split", "DEMO", "--max-per-class", "5", "--oversample-to", "10"],
     "--oversample-to must be at most --max-per-class (5)", "max_per_class"),
    # a number too large to mean anything overflowed torch, islice or a C int (tracebacks)
    (["train", "DEMO", "--feature-views", "99999999999999999999"], "--feature-views = "
     "99999999999999999999: too large to mean anything here", "feature_views"),
    (["train", "DEMO", "--devices", "99999999999999999999"], "--devices = "
     "99999999999999999999: too large", "'devices'"),
    (["train", "DEMO", "--feature-views", "65"], "--feature-views must be at most 64",
     "feature_views"),
    (["predict", "DEMO", "DEMO", "--devices", "99999999999999999999"],
     "--devices 99999999999999999999: must be 1 to 1024", "'devices'"),
    # the engines' names with the other settings: said once the data was read and torch
    # imported (9 s on iNat), naming neither the option nor the file
    (["train", "DEMO", "--precision", "fp64"], "--precision must be one of auto, fp32, bf16, "
     "fp16. Got 'fp64' instead.",
     "'precision'"),
    (["train", "DEMO", "--runtime", "tensorrt"], "--runtime must be one of", "'runtime'"),
    (["train", "DEMO", "--strategy", "fsdp"], "--strategy must be one of auto, ddp.",
     "'strategy'"),
    (["adapt", "DEMO", "DEMO", "--precision", "fp64"], "--precision must be one of",
     "'precision'"),
    # an option whose setting has another name (serve's --timeout sets timeout_s)
    (["serve", "DEMO", "--timeout", "inf"], "--timeout = inf: Input should be a finite",
     "timeout_s"),
])
def test_a_bad_option_is_named_as_typed(run_cli, demo_dir, args, message, setting):
    """A value refused by the config names the option the user typed, not the setting
    behind it."""
    code, _, err = run_cli(*[str(demo_dir) if a == "DEMO" else a for a in args])
    err = " ".join(err.split())
    assert code == 2 and message in err and setting not in err, err


def test_a_bad_setting_from_a_config_file_keeps_its_name(run_cli, demo_dir, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("val_fraction: 2\n")
    code, _, err = run_cli("train", demo_dir, "--config", path)
    assert code == 2 and "The 'val_fraction' setting must be a fraction" in err
    path.write_text("test_fraction: 0.2\n")  # one from each: each named where it was set
    code, _, err = run_cli("train", demo_dir, "--config", path, "--val-fraction", "0.9")
    assert code == 2 and "--val-fraction + test_fraction must be below 1" in err


def test_weights_that_are_no_keyword_and_no_file_say_what_weights_takes(
        run_cli, demo_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `data`: no such file or folder here
    # (At any width: main prints a WingspanError on the err console, which never wraps a line.)
    read = []  # said before the data is read (slow on a large dataset)
    monkeypatch.setattr("wingspan.cli.train.read_data", lambda *args: read.append(args))
    code, _, err = run_cli("train", demo_dir, "--weights", "data", "--backbone",
                           "test_efficientnet", "--runs-dir", tmp_path / "runs", "--quiet")
    assert code == 2 and "--weights data is neither a keyword (auto, none) nor an existing " \
        f"file or folder ({tmp_path / 'data'} is not found)" in err, err
    assert "--weights (weights= in Python) takes auto" in err and ".safetensors" in err
    assert not read and not (tmp_path / "runs").exists()
    code, _, err = run_cli("data", "audit", demo_dir, "--weights", "data", "--quiet")
    assert code == 2 and "--weights data is neither a keyword" in err and not read
    (tmp_path / "data").mkdir()  # a folder, but no run
    code, _, err = run_cli("train", demo_dir, "--weights", "data", "--backbone",
                           "test_efficientnet", "--runs-dir", tmp_path / "runs", "--quiet")
    assert code == 2 and "--weights data is a folder but not a wingspan run or model" in err
    # A run without its model yet (training, or stopped) is one: said so, with its last
    # checkpoint, which --weights takes.
    (tmp_path / "data" / "config.yaml").write_text("backbone: test_efficientnet\n")
    (tmp_path / "data" / "splits.csv").write_text("path,label,split\n")
    code, _, err = run_cli("train", demo_dir, "--weights", "data", "--backbone",
                           "test_efficientnet", "--runs-dir", tmp_path / "runs", "--quiet")
    said = " ".join(err.split())
    assert code == 2 and "--weights data is a run without a model yet (stopped" in said, said
    assert "Finish it with `wingspan train --resume data` (it has no checkpoint yet)" in said
    (tmp_path / "data" / "checkpoints").mkdir()
    (tmp_path / "data" / "checkpoints" / "last.pt").write_bytes(b"")
    code, _, err = run_cli("train", demo_dir, "--weights", "data", "--backbone",
                           "test_efficientnet", "--runs-dir", tmp_path / "runs", "--quiet")
    assert "start from its last checkpoint: --weights data/checkpoints/last.pt" in " ".join(
        err.replace("\n", "").split())
    code, _, err = run_cli("train", demo_dir, "--weights", "atuo", "--backbone",
                           "test_efficientnet", "--runs-dir", tmp_path / "runs", "--quiet")
    assert code == 2 and "Did you mean auto?" in err


def test_a_bad_option_under_torchrun_is_said_by_rank_0_alone(run_cli, demo_dir, tmp_path,
                                                               monkeypatch):
    """torchrun starts every process with the same command line: each finds the same typo
    before any process group exists, and only rank 0 (RANK from the launcher) prints it."""
    bad = ("train", demo_dir, "--weights", "atuo", "--runs-dir", tmp_path / "runs", "--quiet")
    for rank, says in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        code, _, err = run_cli(*bad)
        assert code == 2 and ("Did you mean auto?" in err) == says, (rank, err)
    monkeypatch.setenv("RANK", "1")  # errors met after the options: each process says its own
    code, _, err = run_cli("train", "--resume", tmp_path / "no-such-run", "--quiet")
    assert code == 2 and "Error" in err, err


def test_serve_on_a_port_in_use_is_one_clear_message(run_cli, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # Said before the model loads: MODEL need not be one.
        code, out, err = run_cli("serve", tmp_path, "--port", port)
    assert code == 2, err
    assert " ".join(err.split()) == (f"Error: Port {port} is in use on 127.0.0.1 (another "
                                     "server listens there): pick another with --port.")


def test_serve_takes_its_limits_from_the_command_line(run_cli, tmp_path, monkeypatch):
    """A deployment sets what the server takes on (behind a proxy with its own limits, say)."""
    import wingspan.serve
    from wingspan.config import ServeLimits

    given = {}
    monkeypatch.setattr(wingspan.serve, "serve", lambda model, **kw: given.update(kw))
    code, _, err = run_cli("serve", tmp_path, "--top-k", "2", "--max-files", "3",
                           "--max-upload-mb", "1.5", "--max-in-flight", "4", "--timeout", "9")
    assert code == 0, err
    assert given["limits"] == ServeLimits(top_k=2, max_files=3, max_bytes=1572864,
                                          max_in_flight=4, timeout_s=9.0)
    code, _, err = run_cli("serve", tmp_path, "--max-files", "0")
    assert code == 2 and "--max-files must be at least 1" in err
    code, _, err = run_cli("serve", tmp_path, "--max-upload-mb", "inf")  # "no limit": said,
    assert code == 2 and "--max-upload-mb" in err  # not an OverflowError's traceback
    # The pixel budget, as predict takes it (museum scans): the server's decodes read it.
    monkeypatch.setenv("WINGSPAN_MAX_PIXELS", "1")  # (put back as it was after the test)
    code, _, err = run_cli("serve", tmp_path, "--max-pixels", "100000000")
    assert code == 0, err
    assert os.environ["WINGSPAN_MAX_PIXELS"] == "100000000"


def test_demo_command_writes_everything(run_cli, tmp_path):
    tmp_path = tmp_path / ("a-folder-name-long-enough-that-no-path-fits-in-80-columns" * 2)
    # A folder that a Finder window left its .DS_Store in is empty as far as anyone is
    # concerned (the demo refused it).
    tmp_path.mkdir()
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    # Smaller than the default (96 px, 2 fine-tuning epochs): the same steps, in half the time.
    code, out, err = run_cli("demo", "--out", tmp_path, "--image-size", "64",
                             "--epochs-finetune", "1", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "demo_config.json").read_text())["image_size"] == 64
    assert (tmp_path / "data" / "taxonomy.csv").is_file() and yaml.safe_load(
        (tmp_path / "train" / "config.yaml").read_text())["image_size"] == 64
    for name in ["inspect/summary.json", "splits.csv", "sampling.json", "preview.png",
                 "data/taxonomy.csv"]:
        assert (tmp_path / name).is_file(), name
        assert str(tmp_path / name.split("/")[0]) in out
    # Paths are printed whole, never broken over lines, so they copy and paste.
    assert f"report         {tmp_path / 'train' / 'evaluation-test' / 'report.html'}\n" in out
    assert (tmp_path / "demo_config.json").is_file()  # marks the folder: it may run there again
    # What to do next, as a new shell runs it (`make demo` runs .venv/bin/wingspan, which a
    # new shell does not find): here in-process, so `wingspan`.
    assert f"wingspan serve {tmp_path / 'train'}\n" in out and "wingspan train PHOTOS" in out
    # The page of every photo's answer: the line suggested, run as it is.
    [line] = [line for line in out.splitlines() if "--output" in line]
    code, _, err = run_cli(*shlex.split(line)[1:], "--quiet")
    assert code == 0 and (tmp_path / "predictions.html").is_file(), err
    # A folder of the user's is never written into: the demo would replace its train/.
    (tmp_path.parent / "mine" / "train" / "cats").mkdir(parents=True)
    (tmp_path.parent / "mine" / "train" / "cats" / "1.jpg").write_bytes(b"precious")
    code, out, err = run_cli("demo", "--out", tmp_path.parent / "mine", "--quiet")
    assert code == 2 and "holds files that the demo did not write" in " ".join(err.split())
    assert [p.name for p in (tmp_path.parent / "mine").rglob("*")] == ["train", "cats", "1.jpg"]


def test_models_list_shows_offline_weights(run_cli):
    code, out, err = run_cli("models", "list")
    assert code == 0, err
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ ")}
    assert "yes (package)" in lines["efficientnet_lite0"]
    assert "resnet50" in lines


def test_tables_fold_long_names_in_80_columns(run_cli, monkeypatch):
    """A narrow terminal, or a pipe (rich then assumes 80 columns), keeps every name whole:
    folded onto a second line, not cut to 'tf_efficientnet_l…' for both Lite0 and Lite2."""
    from wingspan.cli import common as cli

    monkeypatch.setattr(cli.out, "_width", 80)  # rich's own field: restored to None after
    code, out, _ = run_cli("models", "list")
    assert code == 0 and "…" not in out
    timm_names = "".join(line.split("│")[2].strip() for line in out.splitlines()
                         if line.startswith("│ "))
    assert "tf_efficientnet_lite0" in timm_names and "tf_efficientnet_lite2" in timm_names


@pytest.mark.parametrize("width", [60, 40])
def test_no_table_cuts_a_name_in_a_narrow_terminal(run_cli, demo_dir, tmp_path, monkeypatch,
                                                   width):
    """At 60 columns `models list` read "efficient…" for both Lite0 and Lite2, and `data
    inspect` "Polyomma…" for a class: every table folds a value onto more lines instead."""
    from wingspan.cli import common as cli

    monkeypatch.setattr(cli.out, "_width", width)  # rich's own field: restored to None after
    code, out, _ = run_cli("models", "list")
    assert code == 0 and "…" not in out, out
    backbones = "".join(line.split("│")[1].strip() for line in out.splitlines()
                        if line.startswith("│ "))
    assert "efficientnet_lite0" in backbones and "efficientnet_lite2" in backbones, out
    code, out, err = run_cli("data", "inspect", demo_dir, "--out", tmp_path, "--quiet")
    assert code == 0 and "…" not in out, err + out


def test_models_list_says_nothing_of_missing_weights_when_none_miss(run_cli, monkeypatch):
    from wingspan.models import weights

    monkeypatch.setattr(weights, "find_offline", lambda spec: "package")
    code, out, _ = run_cli("models", "list")
    assert code == 0 and "pass --weights PATH" not in " ".join(out.split())


def test_doctor_times_every_candidate_and_keeps_the_choice(run_cli, monkeypatch, tmp_path):
    import json

    from wingspan.models import resolve_policy

    monkeypatch.delenv("WINGSPAN_PRECISION", raising=False)
    monkeypatch.delenv("WINGSPAN_RUNTIME", raising=False)
    monkeypatch.setenv("WINGSPAN_CACHE", str(tmp_path))
    code, _, err = run_cli("doctor", "--image-size", "-3")
    assert code == 2 and "Invalid value for '--image-size'" in err, err
    code, out, err = run_cli("doctor", "--backbone", "test_efficientnet", "--image-size", "32",
                             "--batch-size", "4")
    assert code == 0, err
    text = " ".join(out.split())
    assert "Machine" in text and "torch kernels" in text and "onnxruntime" in text
    policy = resolve_policy()
    for engine in (*policy.frozen_candidates, *policy.train_candidates):
        assert f"│ {engine.name} " in out
    # One engine for frozen passes, one for the step: "only candidate" where nothing was
    # chosen (the step on a CPU without fast bf16).
    chose = sum(len(c) > 1 for c in (policy.frozen_candidates, policy.train_candidates))
    assert (out.count("picked"), text.count("only candidate")) == (chose, 2 - chose), out
    for name in policy.left_out:
        assert f"│ {name} " in out
    assert "efficientnet_lite0" in out and "package" in out  # the offline weights
    saved = json.loads((tmp_path / "engines.json").read_text())
    # ... and what the cache folder holds, which only grows (no other command says).
    assert f"Cache: {tmp_path}" in text and "engines.json" in out and "safe to delete" in text
    kinds = sorted(json.loads(k)["kind"] for k in saved)
    assert kinds == ["frozen", "train"]
    assert all(r["how"] == "measured" and r["images_per_s"] for r in saved.values())
    # What doctor measured is what the next run with these settings uses.
    from wingspan.models import create_classifier

    net, _ = create_classifier("test_efficientnet", {"y": 3}, "none")
    assert resolve_policy().choose_frozen(net, 32, 4).frozen.how == "cached"
    # --no-train-step: the frozen passes alone are timed, kept and shown (a step with one
    # candidate, as on a CPU without bf16, was shown as "picked").
    monkeypatch.setenv("WINGSPAN_CACHE", str(tmp_path / "frozen-only"))
    code, out, err = run_cli("doctor", "--backbone", "test_efficientnet", "--image-size", "32",
                             "--batch-size", "4", "--no-train-step")
    assert code == 0 and "Frozen passes" in out and "Training step" not in out, err
    saved = json.loads((tmp_path / "frozen-only" / "engines.json").read_text())
    assert [json.loads(k)["kind"] for k in saved] == ["frozen"]
    assert "cannot be written" not in out
    # A cache that cannot be written (a read-only HOME) kept nothing, said by nothing.
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("WINGSPAN_CACHE", str(tmp_path / "file" / "cache"))
    code, out, err = run_cli("doctor", "--backbone", "test_efficientnet", "--image-size", "32",
                             "--batch-size", "4", "--no-train-step")
    assert code == 0 and "The cache folder cannot be written: nothing is kept" in " ".join(
        out.split()), (out, err)


def test_the_cache_use_is_counted_by_folder_largest_first(tmp_path):
    from wingspan.doctor import cache_use, human_bytes

    (tmp_path / "decoded-256" / "x").mkdir(parents=True)
    for i, size in enumerate((3000, 2000)):
        (tmp_path / "decoded-256" / "x" / f"{i}.npy").write_bytes(b"0" * size)
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "a.onnx").write_bytes(b"0" * 1500)
    (tmp_path / "engines.json").write_text("{}")
    assert cache_use(tmp_path) == [("decoded-256", 5000, 2), ("graphs", 1500, 1),
                                   ("engines.json", 2, 1)]
    assert cache_use(tmp_path / "none") == []  # (no cache yet)
    from wingspan.doctor import cache_writable

    assert cache_writable(tmp_path) and cache_writable(tmp_path / "new" / "cache")
    (tmp_path / "file").write_text("")  # (root writes anywhere: a path under a file cannot be)
    assert not cache_writable(tmp_path / "file" / "cache")
    assert [human_bytes(n) for n in (12, 5000, 2_345_678, 10**10)] == [
        "12 bytes", "5.0 KB", "2.3 MB", "10.0 GB"]


@pytest.mark.parametrize("option", [("--top-k", "0"), ("--top-k", "-2"), ("--batch-size", "0")])
def test_predict_refuses_counts_below_one(run_cli, tmp_path, option):
    code, _, err = run_cli("predict", tmp_path, tmp_path / "x.jpg", *option)
    # Typer's wording depends on its version: pydantic's, or click's "x>=1".
    assert code == 2 and re.search(r"greater than or equal to 1|x>=1", " ".join(err.split()))
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["predict", "MODEL", "x.jpg"], ["evaluate", "MODEL"],
                                     ["calibrate", "MODEL"], ["calibrate", "MODEL", "--unknown"],
                                     ["adapt", "MODEL", "x.jpg"]])
@pytest.mark.parametrize("workers, message", [
    ("-1", "--workers (workers= in Python) must be 0 or more. Got -1 instead."),
    ("514", "--workers 514 (workers= in Python) would start 514 data-loading processes on 2 "
            "CPU cores; at most 8"),
])
def test_commands_that_read_images_refuse_a_bad_workers_as_train_does(
        run_cli, tmp_path, monkeypatch, command, workers, message):
    """Each command whose images go through a data loader takes --workers, checked as
    train's is, before the model is read (MODEL holds none; a path that is not there at
    all is said first, before torch loads: test_a_mistyped_run_is_said_...)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    (tmp_path / "no-run").mkdir()
    args = [str(tmp_path / "no-run") if a == "MODEL" else a for a in command]
    code, _, err = run_cli(*args, "--workers", workers)
    err = " ".join(err.split())
    assert code == 2 and message in err and "No model at" not in err, err
    assert "Traceback" not in err


def test_a_score_just_over_its_threshold_reads_as_over_it():
    from wingspan.errors import apart

    assert apart(1.00023, 1.0002) == ("1.00023", "1.0002")  # not "1 > 1"
    assert apart(0.8123, 0.25) == ("0.812", "0.25")
    assert apart(0.999771, 0.9992) == ("0.9998", "0.9992")  # not "1", the highest score


def test_the_command_list_reads_as_sentences():
    """`wingspan --help` lists each command by its docstring's first paragraph, joined
    (rich mode kept its source line breaks mid-sentence)."""
    import inspect

    from wingspan.cli import app, data_app

    for info in [*app.registered_commands, *data_app.registered_commands]:
        assert info.short_help and "\n" not in info.short_help, info.name
    evaluate = next(i for i in app.registered_commands if i.name == "evaluate")
    assert "HTML report. The model is not changed" in evaluate.short_help
    # and its help, each paragraph on one line (rich kept the docstring's line breaks: at
    # 80 columns train's read "checkpoints and the" then "model bundle" on a line alone).
    for info in [*app.registered_commands, *data_app.registered_commands]:
        shown = info.help or inspect.getdoc(info.callback)  # (typer's choice, in that order)
        assert all("\n" not in p for p in shown.split("\n\n")), info.name


def _help_pages(command=None, path=()):
    """Every help page: the app's, each group's and each command's (`data split`...)."""
    import typer.main

    from wingspan.cli import app

    command = command or typer.main.get_command(app)
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _help_pages(sub, (*path, name))


@pytest.mark.parametrize("path", list(_help_pages()), ids=lambda p: " ".join(p) or "wingspan")
def test_help_reads_at_80_columns(run_cli, monkeypatch, path):
    """At 80 columns train's help ran down a column of 17 characters: typer gave --train-bn
    and --no-train-bn a column each, and rich shrank every column alike. Now every page's help text
    has 40 characters at least, no option's name is cut ("--allow-leaky-sp…"), and a flag
    shows no `<bool>` type."""
    monkeypatch.setenv("COLUMNS", "80")  # (typer makes a console for each page)
    code, out, _ = run_cli(*path, "--help")
    assert code == 0
    rows = [line[1:-1] for line in out.splitlines() if line[:1] == line[-1:] == "│"]
    indents = [(row, len(row) - len(row.lstrip())) for row in rows if row.strip()]
    # A row's further lines start where its help does (its first, at the option's name).
    widths = [len(row) - indent for row, indent in indents if indent > 4]
    assert min(widths, default=78) >= 40, out
    assert "…" not in out and "<bool>" not in out, out


def test_train_help_groups_its_options(run_cli, monkeypatch):
    """train's 40 options in one panel: now in panels, in the same order in every command."""
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = run_cli("train", "--help")
    assert code == 0
    assert re.findall(r"╭─ (.+?) ─", out) == [
        "Arguments", "Options", "Data", "Model", "Training", "Unknown answer",
        "Engines & devices", "Output"]
    code, out, _ = run_cli("predict", "--help")
    assert re.findall(r"╭─ (.+?) ─", out) == [
        "Arguments", "Options", "Data", "Unknown answer", "Engines & devices", "Output"]


def test_a_file_where_a_folder_goes_is_one_clear_message(run_cli, demo_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli("demo", "--out", tmp_path / "afile" / "demo")
    assert code == 2 and "afile is a file, where a folder is needed" in " ".join(err.split())
    from test_train import tiny

    from wingspan.data import read_dataset
    from wingspan.errors import WingspanError
    from wingspan.training import train

    with pytest.raises(WingspanError, match="afile is a file, where a folder is needed"):
        train(read_dataset(demo_dir), tiny(tmp_path), tmp_path / "afile", quiet=True)


def test_a_count_of_one_takes_the_singular(run_cli, demo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    (next(p for p in sorted(data.iterdir()) if p.is_dir()) / "broken.jpg").write_bytes(b"no")
    code, _, err = run_cli("data", "inspect", data, "--out", tmp_path / "i", "--quiet",
                           "--strict")
    assert code == 2 and "1 image cannot be read" in " ".join(err.split()), err
    # Only the largest class (16 images, 11 in train) is over 10: one image of one class.
    code, out, err = run_cli("data", "split", demo_dir, "--level", "label", "--max-per-class",
                             "10", "--out", tmp_path / "s")
    out = " ".join(out.split())
    assert code == 0 and "left out 1 training image of 1 class (listed" in out, out


def test_train_ends_with_the_seconds_per_stage_and_the_engine_timing_in_them(tmp_path, capsys):
    """The last lines of `wingspan train`: the stage totals count the engine timing that the
    log's 'Stage ... took' lines leave out, and say so, in words rather than a dict."""
    from wingspan.cli.train import print_run

    metrics = {"best": {"val_macro_f1": 1.0, "val_acc": 1.0, "stage": "finetune", "epoch": 1},
               "stage_seconds": {"head": 37.4, "finetune": 62.8},
               "engines": {"frozen": {"how": "measured", "seconds": 13.79},
                           "train": {"how": "cached", "seconds": 0.0}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    print_run(tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert "seconds in epochs: head 37.4, finetune 62.8 (timing the engines included: 13.8)" \
        in out, out
    assert "{" not in out


def test_class_names_and_paths_are_printed_as_they_are_not_as_rich_markup(run_cli, tmp_path,
                                                                          monkeypatch):
    """`[red]x` is a class name and `d[b]` a folder, not Rich markup (a red 'x', a bold
    nothing): inspect, split, audit and explain print them as the files name them."""
    from helpers import folder_dataset

    from wingspan.cli import common as cli

    # Table cells on one line. rich reads $COLUMNS once, when the console is made: an
    # import under pytest-xdist may have fixed it already, so set the console's own field.
    monkeypatch.setattr(cli.out, "_width", 200)

    data = folder_dataset(tmp_path / "d[b]", {"[red]x": 6, "plain": 5, "[i]one": 1})
    code, out, err = run_cli("data", "inspect", data, "--out", tmp_path / "o", "--quiet")
    assert code == 0, err
    said = " ".join(out.split())
    assert "[red]x" in said and "[i]one (1)" in said and "d[b]" in said, said
    code, out, err = run_cli("data", "split", data, "--out", tmp_path / "s")
    assert code == 0, err
    assert "kept in train only: [i]one" in " ".join(out.split()), out
    code, out, err = run_cli("data", "audit", data, "--backbone", "test_efficientnet",
                             "--weights", "none", "--folds", "2", "--out", tmp_path / "a",
                             "--quiet")
    assert code == 0, err
    said = " ".join(out.split())
    assert "so its label was not checked (no other image of the class to learn from out of " \
           "fold): [i]one" in said, said
    # (the image under the data's folder, which the caption names; and the label)
    assert f"images in {data}" in said and "│ [red]x/[red]x_" in said and "│ [red]x " in said, \
        said
    code, _, err = run_cli("explain", tmp_path, tmp_path / "no[b].jpg")
    assert code == 2 and f"skipped {tmp_path / 'no[b].jpg'}" in err, err


def test_a_class_name_with_a_comma_is_quoted_in_lists_of_names():
    from wingspan.errors import some

    assert some(["Danaus plexippus, Monarch", "admiral"]) == \
        "'Danaus plexippus, Monarch', admiral"
    assert some(list("abc"), n=2) == "a, b and 1 more"


def test_an_exported_model_or_an_unwritable_output_is_refused_before_any_work(tmp_path,
                                                                              run_cli):
    image = write_image(tmp_path / "a.jpg")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(200))  # what an ONNX file opens with
    code, _, err = run_cli("predict", onnx, image)
    assert code == 2 and "is not a wingspan model bundle" in err
    assert "It is an exported model, for ONNX Runtime" in err and "Traceback" not in err
    # root may write anywhere, says os.access, /proc included: a file is really made there.
    if os.path.isdir("/proc/self"):
        code, _, err = run_cli("predict", onnx, image, "--output", "/proc/preds.csv")
        assert code == 2 and "/proc cannot be written to" in err


def test_the_demo_says_next_commands_as_a_new_shell_runs_them(tmp_path, monkeypatch):
    """`make demo` runs .venv/bin/wingspan: the commands it suggests failed in a new shell
    ("wingspan: command not found") until the venv was activated."""
    from wingspan.cli.demo import _wingspan_command

    script = tmp_path / ".venv" / "bin" / "wingspan"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr("sys.argv", [".venv/bin/wingspan", "demo"])
    assert _wingspan_command() == ".venv/bin/wingspan"
    monkeypatch.setenv("PATH", str(script.parent))
    script.chmod(0o755)
    assert _wingspan_command() == "wingspan"  # (activated: found on the PATH)
    monkeypatch.setattr("sys.argv", ["/usr/bin/pytest"])
    assert _wingspan_command() == "wingspan"
    from pathlib import Path

    import wingspan

    monkeypatch.setattr("sys.argv", [str(Path(wingspan.__file__).parent / "__main__.py")])
    assert _wingspan_command().endswith(" -m wingspan")  # python -m wingspan demo



def test_a_reader_that_closes_the_pipe_early_is_no_failure(tmp_path):
    """`wingspan predict ... --output x.csv | head`: the reader gone, rich exited 1 as a
    crash does (nothing said), though the files were written; a `set -o pipefail` script
    stopped. The rest of the output goes nowhere, and the command ends as it would."""
    import subprocess
    import sys

    (tmp_path / "runs").mkdir()
    done = subprocess.Popen([sys.executable, "-m", "wingspan", "runs", "runs"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done.stdout.close()  # gone before anything is printed
    _, said = done.communicate(timeout=300)
    assert done.returncode == 0 and not said, said.decode()


def test_an_output_without_a_file_name_is_shown_one_that_works(run_cli, tmp_path):
    """--output .csv was told "e.g. --output .csv.csv"."""
    (tmp_path / "runs").mkdir()
    code, _, err = run_cli("runs", tmp_path / "runs", "--output", ".csv")
    assert code == 2 and "e.g. --output out.csv" in " ".join(err.split()), err


def test_a_config_file_of_nested_aliases_is_refused_at_once(tmp_path):
    """A YAML alias bomb (1 KB, a billion items) under a setting: safe_load builds it by
    reference, but the refusal quoted its whole repr, and `train --config` hung."""
    import subprocess
    import sys

    rows = ["lr:", "  - &l0 [x, x, x, x, x, x, x, x, x, x]"]
    rows += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(rows) + "\n")
    (tmp_path / "data").mkdir()
    done = subprocess.run([sys.executable, "-m", "wingspan", "train", "data", "--config",
                           "bomb.yaml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "'lr'" in done.stderr and len(done.stderr) < 5000, \
        done.stderr[-2000:]


def test_what_the_library_says_on_stderr_keeps_a_long_path_on_one_line(capsys):
    """train's lines on stderr (a third of what it says, the resume command included) were
    cut at 80 columns in a log file or CI, a path broken in two: as the CLI's own consoles,
    the library's leave long lines whole."""
    import dataclasses

    from wingspan import progress
    from wingspan.training.context import Run

    path = "/data/" + "very_long_folder_name/" * 8 + "model.pth"
    console = next(f for f in dataclasses.fields(Run) if f.name == "console").default_factory()
    for each in (progress.console, console):
        each.print(f"Run runs/x: efficientnet_lite0 ({path}) on cpu")
        assert capsys.readouterr().err.strip().splitlines() == [
            f"Run runs/x: efficientnet_lite0 ({path}) on cpu"]


def test_progress_is_drawn_in_a_terminal_not_into_a_ci_log(capsys, monkeypatch):
    """FORCE_COLOR=1, which CI jobs set for colour in their logs, made rich take the log for
    a terminal: every frame of every bar went into it, \r and cursor codes and all. And
    TERM=dumb (Emacs' shell), which cannot redraw a line, got a blank line per bar."""
    from wingspan import progress

    def drawn() -> str:
        list(progress.track(range(3), "Predicting"))
        with progress.Bar(3, "Caching") as bar:
            bar.advance(3)
        with progress.status("Timing"):
            pass
        return capsys.readouterr().err

    for name in ("TTY_INTERACTIVE", "TTY_COMPATIBLE", "FORCE_COLOR", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert drawn() == ""  # (stderr captured: no tty)
    monkeypatch.delenv("FORCE_COLOR")
    # A tty (rich's own field, and ours: what a terminal answers)
    monkeypatch.setattr(progress.console, "_force_terminal", True)
    monkeypatch.setattr(progress, "_isatty", lambda: True, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert "\x1b[?25l" in drawn()  # (drawn there, as before: the cursor hidden for it)
    monkeypatch.setenv("TERM", "dumb")
    assert drawn() == ""
    monkeypatch.setenv("TTY_INTERACTIVE", "0")  # rich's switch, for a CI that fakes a tty
    monkeypatch.setenv("TERM", "xterm-256color")
    assert drawn() == ""


def test_long_work_says_how_far_it_has_got_in_a_log(capsys, monkeypatch):
    """With no terminal to draw a bar on (CI, `| tee log`), an epoch, a predict over a folder
    or an audit printed nothing for as long as it took (a CI that stops a job silent for
    10 minutes stopped it): a plain line at most every LOG_EVERY_S seconds; none for quick
    work, none when progress is off."""
    from wingspan import progress

    for name in ("TTY_INTERACTIVE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    list(progress.track(range(3), "Fine-tune epoch 1/4"))
    assert capsys.readouterr().err == ""  # (quick: said by the epoch's own line)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    list(progress.track(range(4), "Fine-tune epoch 1/4"))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Fine-tune epoch 1/4: 1 of 4 (25%), 0:00", lines
    assert lines[-1].startswith("Fine-tune epoch 1/4: 4 of 4 (100%)") and len(lines) == 4
    with progress.Bar(3 * 2**20, "Downloading ethec.zip", units="bytes") as bar:
        bar.advance(2**20)
    assert capsys.readouterr().err == "Downloading ethec.zip: 1.0 of 3.0 MB (33%), 0:00\n"
    list(progress.track(iter(range(2)), "Checking images"))  # (no length: a count alone)
    assert capsys.readouterr().err.splitlines()[-1] == "Checking images: 2, 0:00"
    list(progress.track(range(4), "Predicting", enabled=False))
    with progress.Bar(3, "Caching", enabled=False) as bar:
        bar.advance(3)
    assert capsys.readouterr().err == ""


def test_a_process_forked_by_a_command_still_dies_of_sigterm():
    """SIGTERM stops a command as Ctrl-C does; a child forked from it (a multiprocessing
    Pool's worker: cleanlab's in `data audit`) took that handler along, and raised
    KeyboardInterrupt where Pool.terminate's SIGTERM met it: `data audit` hung for good
    waiting for it. A forked child dies of SIGTERM, as by default."""
    import subprocess
    import sys

    script = """
import os, signal, sys, time
from wingspan.cli.app import _sigterm_as_interrupt
_sigterm_as_interrupt()
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
time.sleep(0.5)
os.kill(child, signal.SIGTERM)
_, status = os.waitpid(child, 0)
print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM)
try:
    os.kill(os.getpid(), signal.SIGTERM)  # the command itself: as Ctrl-C
    time.sleep(5)
except KeyboardInterrupt:
    print("interrupted")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["True", "interrupted"], done.stderr[-2000:]


def test_data_split_takes_trains_names_for_the_fractions_too(run_cli, demo_dir, tmp_path):
    """train's --val-fraction / --test-fraction typed to data split (its --val / --test)
    were refused with no suggestion."""
    code, out, err = run_cli("data", "split", demo_dir, "--val-fraction", "0.2",
                             "--test-fraction", "0", "--out", tmp_path)
    assert code == 0, err
    splits = read_dataset(tmp_path / "splits.csv").table["split"].value_counts()
    assert "test" not in splits and splits["val"] / splits.sum() == pytest.approx(0.2, abs=0.02)


def test_no_strict_on_the_command_line_undoes_a_config_files_strict(run_cli, demo_dir,
                                                                     tmp_path):
    """A config file's `strict: true` could not be turned off for one run: command-line
    options win over the file, but --strict had no --no-strict."""
    import yaml
    from test_train import tiny

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    (next(p for p in sorted(data.iterdir()) if p.is_dir()) / "broken.jpg").write_bytes(b"no")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**vars(tiny(tmp_path, epochs_head=1, epochs_finetune=0)),
                                      "strict": True}))
    base = ["train", data, "--config", config, "--runs-dir", tmp_path / "runs", "--quiet"]
    code, _, err = run_cli(*base, "--name", "strict")
    assert code == 2 and "broken.jpg" in err, err
    code, _, err = run_cli(*base, "--name", "lenient", "--no-strict")
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "runs" / "lenient" / "config.yaml").read_text())[
        "strict"] is False


@pytest.mark.parametrize("setting", [["--lr", "-1"], ["--epochs-head", "-3"],
                                     ["--val-fraction", "1.5"], ["--image-size", "5"]])
def test_a_wrong_training_setting_is_said_before_torch_is_imported(tmp_path, setting):
    """Said after 8-13 s (torch and timm imported first, and the error path's own import of
    torch.distributed), where a typer-checked option is said in under a second."""
    from helpers import cli_in_new_process

    done = cli_in_new_process(["train", tmp_path, *setting], ("torch", "timm"))
    assert "exit 2" in done.stdout and setting[0] in done.stderr, done.stderr
    assert "imported: []" in done.stdout, done.stdout


@pytest.mark.parametrize("command", ["predict", "explain", "evaluate", "calibrate", "adapt",
                                     "export", "serve"])
def test_a_mistyped_run_is_said_before_torch_is_imported(tmp_path, command):
    """`wingspan predict runs/typo photo.jpg` said "No model at runs/typo" after the 3-4 s
    of torch, torchvision and timm (the run was looked for in the model's loading, and
    photo.jpg read as a bundle to see whether the two were swapped), needing none."""
    from helpers import cli_in_new_process, write_image

    run = tmp_path / "runs" / "lite"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    image = write_image(tmp_path / "photo.jpg")
    given = [image] if command in ("predict", "explain", "adapt") else []
    done = cli_in_new_process([command, tmp_path / "runs" / "lit", *given], ("torch",))
    err = " ".join(done.stderr.split())
    assert "exit 2" in done.stdout and "No model at" in err and f"Did you mean {run}" in err, (
        done.stdout + err)
    assert "imported: []" in done.stdout, done.stdout


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["predict", "--help"],
                                  ["data", "inspect", "--help"], ["--version"]])
def test_help_imports_no_numpy(args):
    """Every command's parse (its --help, a mistyped option) imports the CLI's modules:
    numpy, imported by wingspan.files at the top, was 0.15-0.25 s of `wingspan --help`'s
    0.55 s. (What is imported, not how long it takes: a test a loaded machine cannot fail.)"""
    from helpers import cli_in_new_process

    done = cli_in_new_process(args, ("numpy", "pandas", "torch"))
    assert "exit 0" in done.stdout, done.stdout + done.stderr
    assert "imported: []" in done.stdout, done.stdout


def test_progress_bars_leave_nothing_in_a_log_file(capsys):
    """A bar on stderr that is no terminal (a log, CI, `2> file`) was not drawn but left a
    blank line each time: between train's epochs, and before an error's message."""
    from wingspan import progress

    assert list(progress.track(range(3), "counting")) == [0, 1, 2]
    with progress.status("waiting"):
        pass
    with progress.Bar(2, "stepping") as bar:
        bar.advance(2)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_help_whose_reader_went_is_no_failure(tmp_path, args):
    """`wingspan --help | head -1` under `set -o pipefail` failed (exit 1, nothing said),
    where a command's own output to a reader gone exits 0."""
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # (gone before anything is written)
    try:
        done = subprocess.run([sys.executable, "-m", "wingspan", *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("args, said", [
    (["data", "split", "DEMO", "--out", ""], "after --out"),
    (["data", "split", "DEMO", "--out="], "to --out"),
    (["predict", "DEMO", ""], "as argument 3"),
    (["evaluate", "DEMO", "--unknown-score", ""], "after --unknown-score"),
    (["train", ""], "as argument 2")])
def test_an_empty_value_is_refused_not_taken_for_here(run_cli, demo_dir, tmp_path,
                                                     monkeypatch, args, said):
    """`--out "$OUT"` with OUT unset: "" was the current folder (data split replaced the
    splits.csv there, export wrote its graph there), and "" took some options' defaults."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "splits.csv").write_text("mine\n")
    code, out, err = run_cli(*[str(demo_dir) if a == "DEMO" else a for a in args])
    assert code == 2 and f"An empty value was given {said}" in err, err
    assert (tmp_path / "splits.csv").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["splits.csv"]


def test_an_empty_holdout_list_still_holds_none_out():
    from wingspan.cli.app import _refuse_empty

    _refuse_empty(["train", "DATA", "--holdout-classes", ""])
    _refuse_empty(["train", "DATA", "--holdout-classes="])


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["train", "DATA"], 1)])
def test_a_command_cut_short_by_its_readers_going_stays_a_failure(args, code):
    """Rich points stdout at /dev/null and exits 1 where a reader went: help so cut is no
    failure; a command so cut mid-run (`train ... 2>&1 | head -1`) did not do its work."""
    import subprocess
    import sys

    script = ("import importlib, os, sys\ncli = importlib.import_module('wingspan.cli.app')\n"
              "def cut_short(args, prog_name):\n"
              "    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())\n"
              "    raise SystemExit(1)\n"
              "cli.app = cut_short\n"
              f"try:\n    cli.main({args!r})\n"
              "except SystemExit as e:\n    sys.stderr.write(f'exit {e.code}')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.stderr.strip().endswith(f"exit {code}"), done.stderr


INTERRUPTED_AT = """
import builtins, runpy, sys
real, at = builtins.__import__, sys.argv[1]

def interrupted(name, *args, **kwargs):  # a Ctrl-C while `at` is being imported
    if name == at:
        raise KeyboardInterrupt
    return real(name, *args, **kwargs)

builtins.__import__ = interrupted
sys.argv = ["wingspan", "--help"]
runpy.run_module("wingspan", run_name="__main__")  # as `python -m wingspan` and the script
"""


@pytest.mark.parametrize("module", ["typer", "wingspan.cli.train"])
def test_a_ctrl_c_while_the_commands_are_imported_stops_quietly(module):
    """A Ctrl-C in the first 0.2-0.5 s (a command typed wrong, stopped at once) came while
    the commands were imported, and printed a 20-line KeyboardInterrupt traceback; after,
    a command stops quietly with 130. Now the same from the first line of wingspan's."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", INTERRUPTED_AT, module], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 130 and done.stderr == "", done.stderr[-2000:]


def test_large_numbers_that_mean_something_are_kept():
    """The bound on numbers too large to mean anything spares a 4 GB upload limit and a
    seed up to 2**32 - 1 (numpy's own bound); predict's batch has a bound of its own."""
    from wingspan.config import ServeLimits, TrainConfig
    from wingspan.errors import WingspanError
    from wingspan.inference import Predictor

    assert ServeLimits(max_bytes=2**32).max_bytes == 2**32
    assert TrainConfig(seed=2**32 - 1).seed == 2**32 - 1
    with pytest.raises(WingspanError, match=r"--batch-size 10+ \(batch_size= in Python\): "
                                            "must be 1 to 65,536"):
        Predictor("no-such-model", batch_size=10**20)  # (said before the model is sought)


def test_wingspans_own_warnings_read_as_the_commands_other_lines(run_cli, demo_dir, tmp_path,
                                                                 monkeypatch):
    """A cache folder that cannot be written: "Warning: ...", not Python's file:line and
    source line (policy.py:171: UserWarning, then `cache.put(...)`)."""
    import warnings

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("WINGSPAN_CACHE", str(tmp_path / "file"))
    import wingspan.models.engine as engine

    # (said once a process: doctor's test on an unwritable cache may have said it here)
    monkeypatch.setattr(engine, "NOT_KEPT", [])
    before = warnings.showwarning
    code, _, err = run_cli("data", "audit", demo_dir, "--backbone", "test_efficientnet",
                           "--weights", "none", "--out", tmp_path / "audit", "--quiet")
    said = " ".join(err.split())
    assert code == 0 and "Warning: Could not keep the engines' timings" in said, err
    assert "UserWarning" not in err and "cache.put" not in err
    assert warnings.showwarning is before  # in-process, the hook is left as it was


def test_train_whose_messages_reader_went_says_so_in_its_log(demo_dir, tmp_path):
    """`wingspan train DATA 2>&1 | head -3`, or a pager quit: the run stops (exit 1, its
    messages have nowhere to go), and train.log ended mid-run without a word, where Ctrl-C
    leaves a line that says how to go on."""
    import shlex
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "wingspan", "train", str(demo_dir), "--backbone",
           "test_efficientnet", "--weights", "none", "--image-size", "32", "--epochs-head",
           "3", "--epochs-finetune", "2", "--workers", "0", "--runs-dir",
           str(tmp_path / "runs"), "--name", "piped", "--device", "cpu"]
    # (cut once the set-up is said: a reader gone before then leaves no run folder, as any
    # stop before training does)
    done = subprocess.run(["bash", "-c", shlex.join(cmd) + " 2>&1 | sed '/^head  *1:/q'; "
                           "exit ${PIPESTATUS[0]}"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WINGSPAN_CACHE": str(tmp_path / "cache")})
    log = (tmp_path / "runs" / "piped" / "train.log").read_text().splitlines()
    assert done.returncode == 1, (done.returncode, log[-3:])
    assert log[-1].split(" ", 1)[1].startswith(
        "Stopped: the reader of its messages went away (`| head`, a pager quit). "), log[-3:]
    assert "wingspan train --resume " in log[-1]


@pytest.mark.parametrize("typed", ["--epoch", "--epochs", "--epoch-head"])
def test_a_misspelt_option_suggests_every_option_it_begins(run_cli, demo_dir, typed):
    """`--epoch 3` suggested --epochs-head alone: --epochs-finetune, as near a meaning, was
    past difflib's cut-off."""
    code, _, err = run_cli("train", demo_dir, typed, "3")
    said = " ".join(err.replace("│", " ").split())
    assert code == 2 and f"No such option: {typed}" in said, err
    assert "--epochs-head" in said and "--epochs-finetune" in said, err


@pytest.mark.parametrize("typed", ["--optimizer", "--weight-decay", "--layer_decay"])
def test_an_option_that_is_a_config_file_setting_says_where_it_goes(run_cli, demo_dir, typed):
    """timm's users type `--optimizer sgd`: click said "No such option" alone (at best with
    an unrelated close match); the setting has a place in a --config file, said so."""
    code, _, err = run_cli("train", demo_dir, typed, "0.1")
    said = " ".join(err.replace("│", " ").split())
    setting = typed.lstrip("-").replace("-", "_")
    assert code == 2 and f"No such option: {typed}. '{setting}' is a setting of a --config " \
        f"file: a line `{setting}: VALUE` in a YAML file given with --config FILE." in said, err
    code, _, err = run_cli("predict", demo_dir, demo_dir, typed, "0.1")  # (no --config there)
    assert code == 2 and "is a setting of a --config file" not in err, err


@pytest.mark.parametrize("command", [["predict", "RUN", "RUN"], ["evaluate", "RUN"],
                                     ["calibrate", "RUN", "--unknown"], ["export", "RUN"]])
def test_a_misspelt_unknown_score_is_said_before_the_model_is_read(run_cli, tmp_path,
                                                                   command):
    """`--unknown-score maha` was said only once torch and the bundle had loaded (5-8 s),
    where a misspelt run is said at once: here no bundle is read at all (the folder holds
    none), and the typo is what is said."""
    args = [str(tmp_path) if a == "RUN" else a for a in command]
    code, _, err = run_cli(*args, "--unknown-score", "maha")
    said = " ".join(err.split())
    assert code == 2 and "No unknown score 'maha'. Hint: Did you mean 'mahalanobis'? " \
        "Choose one of: msp, energy, mahalanobis, knn, msp+knn." in said, err
