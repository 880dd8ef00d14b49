"""The benchmark's --smoke mode: tiny sizes, so the script cannot rot unnoticed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import bench_module

BENCH = Path(__file__).parents[1] / "bench" / "run.py"


def test_bench_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Time to reach the plain recipe" in proc.stdout and "Scaling" in proc.stdout
    (saved,) = tmp_path.glob("bench-*-smoke.json")
    results = json.loads(saved.read_text())
    assert results["machine"]["cores"] >= 1
    run = results["training"][0]
    assert run["train_images"] == run["wingspan_train_images"]  # both recipes, one split
    assert set(run["baseline"]["stages"]) == set(run["wingspan"]["stages"]) == {"head",
                                                                                   "finetune"}
    # The plain recipe's way, then every candidate engine of this CPU, auto's pick marked.
    from wingspan.models import resolve_policy

    candidates = [e.name for e in resolve_policy("cpu").frozen_candidates]
    rows = [r for r in results["inference"] if "left_out" not in r]
    assert [r["engine"] for r in rows] == ["fp32 eager NCHW (plain recipe)", *candidates]
    assert sum(r["auto"] for r in rows) == 1
    key = next(k for k in rows[0] if k.startswith("images_per_s"))
    # speedup is computed before images/s are rounded to 0.1: allow for that rounding (a
    # slow or busy CPU's few images/s make it large).
    base = rows[0][key]
    assert all((r[key] - 0.05) / (base + 0.05) - 0.01 <= r["speedup"]
               <= (r[key] + 0.05) / max(base - 0.05, 1e-9) + 0.01 for r in rows), rows
    left_out = {r["engine"] for r in results["inference"] if "left_out" in r}
    assert left_out | set(candidates) == {"torch-fp32", "torch-bf16", "torch-fp16", "onnx-fp32"}
    steps = results["training_step"]
    train_candidates = [e.name for e in resolve_policy("cpu").train_candidates]
    assert [r["engine"] for r in steps] == train_candidates
    assert sum(r["auto"] for r in steps) == 1 and all(r["images_per_s"] > 0 for r in steps)
    assert "Auto against the fastest candidate" in proc.stdout
    assert len(results["scaling"]) == 2 and results["wall_seconds"] > 0
    table = saved.with_suffix(".md").read_text()  # the README's tables, ready to paste
    assert "| data / backbone | stage | plain recipe | wingspan |" in table
    assert "--smoke" in table


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """`make gpu-check`'s steps on 2 CPU processes: train, evaluate, predict, DDP with
    Fabric's launcher and with torchrun."""
    script = Path(__file__).parents[1] / "bench" / "gpu_check.py"
    # TMPDIR: torchrun leaves a folder of its logs in the temporary folder.
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick",
                           "--work", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu-check.json").read_text())
    fp32 = results["precisions"]["fp32"]
    assert fp32["finetune_images_per_s"] > 0 and 0 <= fp32["data_wait"] <= 1
    assert fp32["evaluate_images_per_s"] > 0 and fp32["predict_images_per_s"] > 0
    fabric, torchrun = results["ddp"]
    assert (fabric["launcher"], torchrun["launcher"]) == ("Fabric", "torchrun")
    # Two launchers, the same 2-process run.
    assert fabric["val_macro_f1"] == torchrun["val_macro_f1"]
    for how in ("Fabric", "torchrun"):
        log = (tmp_path / "runs" / f"ddp-{how}" / "train.log").read_text()
        assert "2 processes (DDPStrategy)" in log


def test_serve_load_smoke(tmp_path):
    """bench/serve_load.py on a tiny model: a served process, clients, figures."""
    script = BENCH.parent / "serve_load.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--clients", "1", "3",
                           "--seconds", "1", "--out", str(tmp_path / "load.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "load.json").read_text())
    assert figures["predict_images_per_s"] > 0
    assert [r["clients"] for r in figures["load"]] == [1, 3]
    assert all(r["requests"] > 0 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"]
               for r in figures["load"])
    assert all(mb > 100 for mb in figures["rss_mb"])  # a real process's RSS was read
    assert "clients:" in proc.stdout and "server RSS" in proc.stdout


def _levers():
    return bench_module("levers")


def test_levers_zoom_box_maps_the_cam_back_to_the_full_photo():
    """bench/levers.py's two-pass zoom: the hot region of the map over the centre crop,
    as a square box in the full photo's pixels, grown, kept inside the photo."""
    import numpy as np

    zoom_box = _levers().zoom_box
    cam = np.zeros((100, 100))
    cam[40:50, 60:70] = 1.0  # 10% of the view, right of centre
    # A 2000 x 1000 photo whose centre crop showed the square (500, 0)-(1500, 1000).
    box = zoom_box(cam, (500.0, 0.0, 1000.0), (2000, 1000), scale=2.0, least=0.0)
    assert box == (1050, 350, 1250, 550)  # centre (1150, 450), side 2 x 100 px
    # At least `least` of the short side, and shifted to stay inside the photo.
    cam[:] = 0
    cam[0:2, 0:2] = 1.0
    left, top, right, bottom = zoom_box(cam, (500.0, 0.0, 1000.0), (2000, 1000), least=0.3)
    assert (right - left, bottom - top) == (300, 300) and top == 0 and left >= 0
    # Nothing hot: the centre crop itself.
    assert zoom_box(np.zeros((8, 8)), (500.0, 0.0, 1000.0), (2000, 1000)) == (500, 0, 1500,
                                                                               1000)


def test_levers_help_and_list(monkeypatch, capsys):
    levers = _levers()  # in this process: two more Python start-ups would take 15 s
    monkeypatch.setattr(sys, "argv", ["levers.py", "--help"])
    with pytest.raises(SystemExit) as done:
        levers.main()
    help_text = capsys.readouterr().out
    assert done.value.code == 0
    assert "--levers" in help_text and "--seeds" in help_text and "transfer" in help_text
    monkeypatch.setattr(sys, "argv", ["levers.py", "--list"])
    levers.main()
    listed = capsys.readouterr().out
    assert set(levers.LEVERS) == {line.split()[0] for line in listed.splitlines()}


def test_augment_cost_times_every_step_of_each_policy():
    """bench/augment_cost.py on a few images: a table per policy, one row per step."""
    script = BENCH.parent / "augment_cost.py"
    proc = subprocess.run([sys.executable, str(script), "--images", "4", "--size", "64",
                           "--policies", "light", "standard"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    assert out.count("images/s per worker") == 2
    assert "'light' at 64 px" in out and "'standard' at 64 px" in out
    assert "ColorJitter(brightness, contrast, saturation, hue)" in out  # standard's parts
    assert "RandomRotation" in out and "Normalize" in out


def test_levers_baseline_run_takes_no_config_file(tmp_path, monkeypatch):
    """A lever with no settings (the baseline) trains on the defaults: no `--config`, and
    no empty `{}` YAML file beside the runs; a lever with settings gets both."""
    import yaml

    levers = _levers()
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        (tmp_path / "runs" / cmd[cmd.index("--name") + 1]).mkdir(parents=True)

    monkeypatch.setattr(levers.subprocess, "run", fake_run)
    levers.ensure_run(tmp_path / "runs", tmp_path, "inat", 0, {})
    assert "--config" not in commands[-1]
    assert list((tmp_path / "runs").glob("*.yaml")) == []
    levers.ensure_run(tmp_path / "runs", tmp_path, "inat", 0, {"layer_decay": 0.7})
    config = Path(commands[-1][commands[-1].index("--config") + 1])
    assert yaml.safe_load(config.read_text()) == {"layer_decay": 0.7}


def test_oneoff_pass_weighs_each_engine_against_the_export(monkeypatch, capsys):
    """bench/oneoff_pass.py on the tiny network: the export's seconds, and a row per engine
    with its pass's seconds against export + ONNX Runtime's at each image count."""
    oneoff = bench_module("oneoff_pass")
    monkeypatch.setattr(sys, "argv", ["oneoff_pass.py", "--backbones", "test_efficientnet",
                                      "--size", "32", "--batch", "4", "--rounds", "1",
                                      "--images", "10", "1000"])
    oneoff.main()
    out = capsys.readouterr().out
    assert "onnx-whole setup (export + session)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.startswith(("onnx-", "torch-", "prefix+"))}
    assert {"onnx-whole", "torch-fp32", "prefix+torch-fp32"} <= set(rows)
    assert rows["onnx-whole"][1:] == ["1.00", "1.00"]  # itself, at each count
    # The export weighs most on the fewest images: PyTorch's share grows with the count.
    assert float(rows["torch-fp32"][1]) < float(rows["torch-fp32"][2])


def test_unknown_bench_exposes_fine_tuning_to_outliers(tmp_path):
    """bench/unknown.py --outliers (the README's row of outlier exposure while
    fine-tuning) on the demo's tiny network: every fine-tuning step passes outliers, and a
    row per held-out pair comes out."""
    import wingspan as ws

    demo = tmp_path / "demo"
    ws.demo_data(demo)
    others = tmp_path / "others"
    (demo / "white_darktip").rename(others)
    script = Path(__file__).parents[1] / "bench" / "unknown.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(demo), "--pairs", "red_banded,orange_veined",
         "--runs-dir", str(tmp_path / "runs"), "--outliers", str(others), "--",
         "--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32",
         "--epochs-head", "1", "--epochs-finetune", "2", "--workers", "0"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "WINGSPAN_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    images = len(list(others.glob("*.jpg")))
    assert f"outlier exposure: {images} images, weight 0.5" in proc.stdout
    exposed = int(proc.stdout.split("outlier exposure: ")[2].split()[0])
    assert exposed >= 2  # at least a step in each of the 2 epochs
    (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert row["held_out"] == ["red_banded", "orange_veined"] and 0 <= row["auroc"] <= 1
