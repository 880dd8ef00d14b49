"""A lossy engine (bf16) that moves a trained model's answers is left out of its
predictions: measured on its val images at the end of training, kept in the bundle."""

import json

from test_train import tiny

from wingspan.data import read_dataset
from wingspan.inference import Predictor
from wingspan.models import resolve_policy
from wingspan.models.engine import engine_named
from wingspan.training import lossy_check, train
from wingspan.training.lossy_check import avoided_engines


def _checked(changed: int, images: int) -> dict:
    return {"inference": {"lossy_engines": {"torch-bf16": {"images": images,
                                                           "answers_changed": changed}}}}


def test_an_engine_is_avoided_past_the_share_and_one_near_tie():
    assert avoided_engines({}) == {}  # a bundle from before the check: nothing avoided
    assert avoided_engines(_checked(0, 33)) == {}
    assert avoided_engines(_checked(1, 33)) == {}  # one near tie may flip either way
    assert "2 of this model's 33 val images" in avoided_engines(_checked(2, 33))["torch-bf16"]
    assert avoided_engines(_checked(2, 256)) == {}  # under 1%
    assert avoided_engines(_checked(3, 256)) == {"torch-bf16": "it answered otherwise than "
                                                 "fp32 on 3 of this model's 256 val images"}


def test_the_policy_leaves_out_an_avoided_engine_unless_precision_is_forced():
    """Machine-independent: torch-fp32 and onnx-fp32 are candidates on every CPU (onnx
    standing in for a lossy engine here)."""
    why = "it answered otherwise than fp32 on 9 of this model's 40 val images"
    policy = resolve_policy("cpu", avoid={"onnx-fp32": why, "not-an-engine-here": "x"})
    names = [e.name for e in policy.frozen_candidates]
    assert "onnx-fp32" not in names and "torch-fp32" in names
    assert policy.left_out["onnx-fp32"] == why
    forced = resolve_policy("cpu", precision="fp32", avoid={"onnx-fp32": why})
    assert "onnx-fp32" in [e.name for e in forced.frozen_candidates]
    # Never every candidate: the last one stays (a runtime forced to what was avoided).
    alone = resolve_policy("cpu", runtime="onnx", avoid={"onnx-fp32": why})
    assert [e.name for e in alone.frozen_candidates] == ["onnx-fp32"]


def test_training_checks_the_lossy_engines_on_val_and_predict_follows(demo_dir, tmp_path,
                                                                      monkeypatch):
    # bf16 made a candidate on any CPU (emulated where the CPU lacks it: slow, but right)
    monkeypatch.setattr(lossy_check, "lossy_candidates",
                        lambda device: [engine_named("torch-bf16")])
    run = train(read_dataset(demo_dir), tiny(tmp_path, epochs_finetune=0), tmp_path / "runs",
                "r", quiet=True)
    manifest = json.loads((run / "model" / "manifest.json").read_text())
    checked = manifest["inference"]["lossy_engines"]["torch-bf16"]
    val = json.loads((run / "metrics.json").read_text())["val_images"]
    assert checked["images"] == val and 0 <= checked["answers_changed"] <= val
    log = (run / "train.log").read_text()
    assert (f"torch-bf16 answered otherwise than fp32 on {checked['answers_changed']} of "
            f"{val} val images") in log
    # A model whose check found bf16 moving its answers is predicted without it.
    manifest["inference"] = _checked(5, val)["inference"]
    (run / "model" / "manifest.json").write_text(json.dumps(manifest))
    predictor = Predictor(run, device="cpu", workers=0)
    assert "torch-bf16" not in [e.name for e in predictor.policy.frozen_candidates]
    assert f"5 of this model's {val} val images" in predictor.policy.left_out["torch-bf16"]


def test_no_lossy_candidate_no_check(demo_dir, tmp_path, monkeypatch):
    """Where auto would never pick a lossy engine (an AVX2 CPU), nothing is measured."""
    monkeypatch.setattr(lossy_check, "lossy_candidates", lambda device: [])
    run = train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=1, epochs_finetune=0),
                tmp_path / "runs", "r", quiet=True)
    manifest = json.loads((run / "model" / "manifest.json").read_text())
    assert "inference" not in manifest and "answered otherwise" not in (
        run / "train.log").read_text()
