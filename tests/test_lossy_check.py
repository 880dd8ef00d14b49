"""A lossy engine (bf16) that moves a trained model's answers is left out of its
predictions: measured on its val images at the end of training, kept in the bundle."""

import json
import re

import pytest
import torch
from test_train import tiny

from wingspan.data import read_dataset
from wingspan.inference import Predictor
from wingspan.models import engine, resolve_policy
from wingspan.models.engine import Choice, engine_named
from wingspan.models.policy import Policy
from wingspan.training import finish as finish_module
from wingspan.training import lossy_check, train
from wingspan.training.lossy_check import avoided_engines


def _cpu(tmp_path, **changes):
    """The tiny recipe on the CPU: bf16, made a candidate below, runs on any CPU, where a
    GPU without bf16 would refuse it."""
    return tiny(tmp_path, device="cpu", **changes)


def _checked(changed: int, images: int) -> dict:
    """A manifest's "inference" record."""
    return {"lossy_engines": {"torch-bf16": {"images": images, "answers_changed": changed}}}


def test_an_engine_is_avoided_past_the_share_and_one_near_tie():
    assert avoided_engines(None) == {}  # a bundle from before the check: nothing avoided
    assert avoided_engines(_checked(0, 33)) == {}
    assert avoided_engines(_checked(1, 33)) == {}  # one near tie may flip either way
    assert "2 of this model's 33 val images" in avoided_engines(_checked(2, 33))["torch-bf16"]
    assert avoided_engines(_checked(2, 256)) == {}  # under 1%
    assert avoided_engines(_checked(3, 256)) == {"torch-bf16": "it answered otherwise than "
                                                 "fp32 on 3 of this model's 256 val images"}


def test_the_images_checked_are_spread_over_a_split_listed_class_by_class():
    rows = torch.arange(5000)  # 50 classes of 100 images, one after another
    picked = lossy_check.spread(rows, 256)
    assert len(picked) == 256 and len(set(picked.tolist())) == 256
    assert len(set((picked // 100).tolist())) == 50
    assert lossy_check.spread(rows[:30], 256).tolist() == list(range(30))


def test_the_policy_leaves_out_an_avoided_engine_unless_precision_is_forced(monkeypatch):
    """Machine-independent: torch-fp32 and onnx-fp32 are candidates on every CPU (onnx
    standing in for a lossy engine here)."""
    for name in ("WINGSPAN_PRECISION", "WINGSPAN_RUNTIME"):
        monkeypatch.delenv(name, raising=False)
    why = "it answered otherwise than fp32 on 9 of this model's 40 val images"
    policy = resolve_policy("cpu", avoid={"onnx-fp32": why, "not-an-engine-here": "x"})
    names = [e.name for e in policy.frozen_candidates]
    assert "onnx-fp32" not in names and "torch-fp32" in names
    assert policy.left_out["onnx-fp32"] == why
    assert f"not onnx-fp32 for this model: {why}" in policy.describe()  # said where it shows
    forced = resolve_policy("cpu", precision="fp32", avoid={"onnx-fp32": why})
    assert "onnx-fp32" in [e.name for e in forced.frozen_candidates]
    # Forced to the one engine the check left out: used as asked, with what it found.
    one = resolve_policy("cpu", precision="fp32", runtime="onnx", avoid={"onnx-fp32": why})
    assert [e.name for e in one.frozen_candidates] == ["onnx-fp32"]
    assert f"forced by precision fp32, runtime onnx; though {why}" in one.describe()
    # Never every candidate: the last one stays (a runtime forced to what was avoided).
    alone = resolve_policy("cpu", runtime="onnx", avoid={"onnx-fp32": why})
    assert [e.name for e in alone.frozen_candidates] == ["onnx-fp32"]


def _bf16_everywhere(monkeypatch):
    """bf16 a candidate on any CPU (emulated where the CPU lacks it: slow, but right), and
    no engine forced from the environment (the suite's own reruns force them)."""
    for name in ("WINGSPAN_PRECISION", "WINGSPAN_RUNTIME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(lossy_check, "lossy_candidates",
                        lambda device: [engine_named("torch-bf16")])
    monkeypatch.setattr(engine, "auto_leaves_out", lambda *args: "")


def test_training_checks_the_lossy_engines_on_val_and_predict_follows(demo_dir, tmp_path,
                                                                      monkeypatch):
    _bf16_everywhere(monkeypatch)
    run = train(read_dataset(demo_dir), _cpu(tmp_path, epochs_finetune=0), tmp_path / "runs",
                "r", quiet=True)
    manifest = json.loads((run / "model" / "manifest.json").read_text())
    checked = manifest["inference"]["lossy_engines"]["torch-bf16"]
    val = json.loads((run / "metrics.json").read_text())["val_images"]
    assert checked["images"] == val and 0 <= checked["answers_changed"] <= val
    log = (run / "train.log").read_text()
    assert (f"torch-bf16 answered otherwise than fp32 on {checked['answers_changed']} of "
            f"{val} val images") in log
    # A model whose check found bf16 moving its answers is predicted without it.
    manifest["inference"] = _checked(5, val)
    (run / "model" / "manifest.json").write_text(json.dumps(manifest))
    predictor = Predictor(run, device="cpu", workers=0)
    assert "torch-bf16" not in [e.name for e in predictor.policy.frozen_candidates]
    assert f"5 of this model's {val} val images" in predictor.policy.left_out["torch-bf16"]


def test_a_run_whose_frozen_engine_is_left_out_ends_in_fp32(demo_dir, tmp_path, monkeypatch):
    """Its temperature and unknown thresholds are set on what its predictions will run."""
    _bf16_everywhere(monkeypatch)
    monkeypatch.setattr(finish_module, "check_lossy_engines", lambda run, passes: {
        "torch-bf16": {"images": 10, "answers_changed": 5}})
    timed = Policy.choose_frozen  # the frozen passes measured fastest in bf16

    def bf16_won(policy, *args, **kwargs):
        if "torch-bf16" not in [e.name for e in policy.frozen_candidates]:
            return timed(policy, *args, **kwargs)  # (the Predictor's, below)
        return policy.with_choice("frozen", Choice(engine_named("torch-bf16"), "measured"))

    monkeypatch.setattr(Policy, "choose_frozen", bf16_won)
    run = train(read_dataset(demo_dir), _cpu(tmp_path, epochs_head=2, epochs_finetune=0),
                tmp_path / "runs", "r", quiet=True)
    log = (run / "train.log").read_text()
    assert "frozen passes torch-bf16" in log.splitlines()[0]
    assert "torch-bf16 answered otherwise than fp32 on 5 of 10 val images: left out" in log
    assert re.search(r"The final passes run (onnx|torch)-fp32, as this model's predictions "
                     r"will \(torch-bf16 left out\)", log), log
    policy = Predictor(run, device="cpu", workers=0).policy
    assert policy.frozen.engine.precision == "fp32" and "torch-bf16" in policy.avoided
    # metrics.json, as train.log, says what the final passes ran (it said bf16's alone)
    engine = json.loads((run / "metrics.json").read_text())["engine"]
    assert re.search(r"; final passes (onnx|torch)-fp32, as this model's predictions$",
                     engine), engine
    # bf16 forced for the run: its final passes stay as asked.
    monkeypatch.setenv("WINGSPAN_PRECISION", "bf16")
    run = train(read_dataset(demo_dir), _cpu(tmp_path, epochs_head=1, epochs_finetune=0),
                tmp_path / "runs", "forced", quiet=True)
    assert "The final passes run" not in (run / "train.log").read_text()


def test_no_lossy_candidate_no_check(demo_dir, tmp_path, monkeypatch):
    """Where auto would never pick a lossy engine (an AVX2 CPU), nothing is measured."""
    monkeypatch.delenv("WINGSPAN_PRECISION", raising=False)
    monkeypatch.setattr(lossy_check, "lossy_candidates", lambda device: [])
    run = train(read_dataset(demo_dir), _cpu(tmp_path, epochs_head=1, epochs_finetune=0),
                tmp_path / "runs", "r", quiet=True)
    manifest = json.loads((run / "model" / "manifest.json").read_text())
    assert "inference" not in manifest and "answered otherwise" not in (
        run / "train.log").read_text()
    # Predicting where bf16 is measured fastest, the engine line says it was never checked
    # for this model (and what gives the export's answers); fp32 chosen, nothing to say.
    monkeypatch.setattr(engine, "auto_leaves_out", lambda *args: "")
    timed = Policy.choose_frozen
    for name in ("torch-bf16", "torch-fp32"):
        monkeypatch.setattr(Policy, "choose_frozen", lambda policy, *a, name=name, **k:
                            policy.with_choice("frozen", Choice(engine_named(name),
                                                                "measured")))
        said = Predictor(run, device="cpu", workers=0).policy.describe()
        assert ("torch-bf16 never checked against fp32 on this model's val images" in said
                ) == (name == "torch-bf16"), said
    monkeypatch.setattr(Policy, "choose_frozen", timed)


@pytest.mark.parametrize("frozen", ["torch-bf16", "torch-fp32"])
def test_the_final_val_pass_reuses_the_checks_own_on_its_engine(demo_dir, tmp_path,
                                                                 monkeypatch, frozen):
    """The check ran the frozen passes' engine (a lossy one, or its torch-fp32 reference)
    on every val image: the final val pass is not run again, and its features are those a
    pass would give (on Leeds, 2.4 s of a run's end)."""
    _bf16_everywhere(monkeypatch)
    monkeypatch.setattr(Policy, "choose_frozen", lambda policy, *a, **k: policy.with_choice(
        "frozen", Choice(engine_named(frozen), "measured")))
    passes, outputs = [], finish_module._final_outputs

    def counted(run):
        passes.append(run.policy.frozen.engine.name)
        return final_pass(run)

    def compared(run, split, cached, *args):
        got = outputs(run, split, cached, *args)
        if split == "val":  # (a pass of its own, uncounted, to compare with)
            monkeypatch.setattr(finish_module, "_final_pass", final_pass)
            again = outputs(run, split, cached)
            monkeypatch.setattr(finish_module, "_final_pass", counted)
            assert torch.equal(got[0], again[0]) and torch.equal(got[2], again[2])
        return got

    final_pass = finish_module._final_pass
    monkeypatch.setattr(finish_module, "_final_pass", counted)
    monkeypatch.setattr(finish_module, "_final_outputs", compared)
    # (no head epoch: the best model is fine-tuned, so no feature cache serves val)
    run = train(read_dataset(demo_dir), _cpu(tmp_path, epochs_head=0, epochs_finetune=1),
                tmp_path / "runs", "r", quiet=True)
    manifest = json.loads((run / "model" / "manifest.json").read_text())
    assert manifest["inference"]["lossy_engines"]["torch-bf16"]["images"] == json.loads(
        (run / "metrics.json").read_text())["val_images"]
    assert passes == [frozen]  # train's alone
