"""The runners for frozen-weight passes: every engine gives the numbers PyTorch fp32 gives,
within its precision's tolerance (tests/agreement.py)."""

import json
import warnings

import numpy as np
import pytest
import torch

from wingspan.inference import Predictor
from wingspan.models import create_classifier, resolve_policy
from wingspan.models import policy as policy_module
from wingspan.models import runtime as runtime_module
from wingspan.models.runtime import OnnxRunner, TorchRunner


def test_onnx_matches_torch_on_a_multi_level_model():
    torch.manual_seed(0)
    model, _ = create_classifier("test_efficientnet", {"family": 3, "species": 7}, "none")
    model.eval()
    x = torch.randn(5, 3, 40, 40)  # exported at one size, run at a different batch size
    reference = TorchRunner(model, torch.device("cpu"), None, channels_last=False)(x)
    onnx = OnnxRunner(model, 40, model.levels)(x)
    assert list(onnx) == ["family", "species"]
    for level in onnx:
        assert onnx[level].shape == reference[level].shape
        torch.testing.assert_close(onnx[level], reference[level], rtol=1e-4, atol=1e-4)
    features = OnnxRunner(model.feature_extractor(), 40)(x[:1])
    torch.testing.assert_close(features, model.features(x[:1]).detach(), rtol=1e-4, atol=1e-4)


def test_runner_reflects_the_weights_it_was_made_with():
    model, _ = create_classifier("test_efficientnet", {"y": 4}, "none")
    policy = resolve_policy("cpu", "fp32", runtime="onnx")
    x = torch.randn(2, 3, 32, 32)
    runner = policy.runner(model, 32, model.levels)
    assert isinstance(runner, OnnxRunner)
    before = runner(x)["y"]
    with torch.no_grad():
        model.head.outputs["y"].bias.add_(1.0)
    after = policy.runner(model, 32, model.levels)(x)["y"]
    torch.testing.assert_close(after, before + 1.0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine", ["onnx-fp32", "torch-bf16"])
def test_predictions_agree_across_engines(demo_dir, tmp_path, engine):
    """Each engine against PyTorch fp32, within the tolerance its precision allows. On
    ImageNet features (Lite0's installed weights) the head decides: on the random test
    network's it answers about 1 / classes for every class, and any engine would agree."""
    from agreement import assert_agree
    from test_train import tiny

    from wingspan.data import read_dataset
    from wingspan.training import train

    config = tiny(tmp_path, backbone="efficientnet_lite0", weights="auto", epochs_head=10,
                  lr=0.03, epochs_finetune=0, val_fraction=0.25, test_fraction=0.0,
                  precision="fp32", runtime="torch")  # the same model on every CPU
    run_dir = train(read_dataset(demo_dir), config, tmp_path / "runs", "r", quiet=True)
    paths = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))[:12]]
    runtime, precision = engine.split("-")
    results = {}
    for name, (rt, prec) in {"torch-fp32": ("torch", "fp32"), engine: (runtime, precision)}.items():
        predictor = Predictor(run_dir, workers=0, runtime=rt, precision=prec)
        assert predictor.policy.frozen.engine.name == name
        assert predictor.policy.frozen.how.startswith("forced")
        results[name] = np.stack([p.probs for p in predictor.run(paths, progress=False)])
    assert results["torch-fp32"].max(1).mean() > 0.5  # a head that decides (4 classes)
    assert_agree(results["torch-fp32"], results[engine], precision)


@pytest.mark.parametrize("feature_cache", [True, False])
def test_training_gives_the_same_history_on_either_runtime(demo_dir, tmp_path, monkeypatch,
                                                           feature_cache):
    """Stage 1's features, each validation pass and the frozen stages while fine-tuning run
    on ONNX Runtime or PyTorch; the history must not depend on which."""
    from test_train import history, tiny

    from wingspan.data import read_dataset
    from wingspan.models.backbone import Backbone
    from wingspan.training import train

    made, splits = [], []
    real_init, real_split = OnnxRunner.__init__, Backbone.split_frozen
    monkeypatch.setattr(OnnxRunner, "__init__",
                        lambda self, *a, **k: made.append(a[0]) or real_init(self, *a, **k))
    monkeypatch.setattr(Backbone, "split_frozen",
                        lambda self: splits.append(real_split(self)) or splits[-1])
    runs = {}
    for runtime in ("torch", "onnx"):
        config = tiny(tmp_path / runtime, epochs_head=2, epochs_finetune=1, runtime=runtime,
                      precision="fp32", feature_cache=feature_cache)
        runs[runtime] = history(train(read_dataset(demo_dir), config, tmp_path / runtime,
                                      "r", quiet=True))
    # ONNX Runtime really ran: stage 1's frozen backbone and the fine-tuning prefix (which
    # the validation passes reuse); a prefix is split off on onnx only.
    assert splits and all(split is not None for split in splits)
    assert any(m is splits[0][0] for m in made) and len(made) >= 2
    np.testing.assert_allclose(runs["onnx"]["val_loss"], runs["torch"]["val_loss"], atol=1e-3)
    np.testing.assert_allclose(runs["onnx"]["train_loss"], runs["torch"]["train_loss"],
                               atol=1e-3)


def test_a_model_that_cannot_be_exported_runs_in_pytorch(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(runtime_module, "export_onnx", broken)
    monkeypatch.setattr(runtime_module, "_stored_graph", lambda path: None)  # none kept
    model, _ = create_classifier("test_efficientnet", {"y": 3}, "none")
    with pytest.warns(UserWarning, match="unsupported operator.*using PyTorch instead"):
        runner = resolve_policy("cpu", "fp32", runtime="onnx").runner(model, 32, model.levels)
    assert isinstance(runner, TorchRunner)
    assert runner(torch.randn(2, 3, 32, 32))["y"].shape == (2, 3)


def test_export_falls_back_to_the_torch_export_based_exporter(monkeypatch):
    """torch is dropping the TorchScript exporter; without it the graph must still come."""
    real = torch.onnx.export

    def no_legacy(*args, dynamo=True, **kwargs):
        if not dynamo:
            raise RuntimeError("TorchScript-based ONNX export was removed")
        return real(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_legacy)
    model, _ = create_classifier("test_efficientnet", {"y": 3}, "none")
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():  # as in a validation pass
        out = OnnxRunner(model, 32, model.levels)(x)["y"]
    torch.testing.assert_close(out, model(x)["y"].detach(), rtol=1e-4, atol=1e-4)


def test_exporting_leaves_each_module_in_the_mode_it_was_in():
    """A validation pass may export the live model of a training run: it must go on
    training afterwards, its frozen BatchNorm still frozen."""
    from wingspan.models.runtime import export_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Dropout(0.5), torch.nn.Flatten())
    model.train()
    model[1].eval()  # as Backbone.train keeps a frozen BatchNorm
    before = [m.training for m in model.modules()]
    assert export_onnx(model, 8)
    assert [m.training for m in model.modules()] == before


def _counting_exports(monkeypatch, disk: bool = False) -> list[tuple]:
    """The graph_key of each module exported from here on. Unless `disk`, no graph is read
    from the cache folder: what other tests left there (the same seeded weights) would
    spare exports that a test counts."""
    exported, real = [], runtime_module.export_onnx
    if not disk:
        monkeypatch.setattr(runtime_module, "_stored_graph", lambda path: None)

    def counted(module, size, names=None, **kwargs):
        exported.append(runtime_module.graph_key(module, size, names))
        return real(module, size, names, **kwargs)

    monkeypatch.setattr(runtime_module, "export_onnx", counted)
    return exported


def test_a_graph_is_exported_once_per_weights_and_size(monkeypatch):
    import copy

    exported = _counting_exports(monkeypatch)
    model, _ = create_classifier("test_efficientnet", {"y": 4}, "none")
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    first = OnnxRunner(model.feature_extractor(), 32)(x)
    # The same weights, in a new wrapper or a copy of the model: no export.
    again = OnnxRunner(copy.deepcopy(model).feature_extractor(), 32)(x)
    assert len(exported) == 1 and torch.equal(again, first)
    OnnxRunner(model.feature_extractor(), 40)  # another size: another graph
    with torch.no_grad():  # one BatchNorm statistic moves: stale weights must not run
        next(b for n, b in model.named_buffers() if "running_mean" in n)[0] += 1.0
    changed = OnnxRunner(model.feature_extractor(), 32)(x)
    assert len(exported) == 3 and not torch.equal(changed, first)
    torch.testing.assert_close(changed, model.features(x).detach(), rtol=1e-4, atol=1e-4)


def test_a_training_run_exports_each_graph_once(demo_dir, tmp_path, monkeypatch):
    """ONNX Runtime is timed and wins; the run then needs the frozen backbone for the feature
    cache (the graph just timed), the frozen prefix for fine-tuning (the one the step's
    timing made, where it timed one), each validation pass's model and the final features
    of train and val. Each graph is exported once, and the run computes exactly what it
    computes when every pass exports its own."""
    from safetensors.torch import load_file
    from test_train import NUMBERS, history, tiny

    from wingspan.config import PRECISION_ENV, RUNTIME_ENV
    from wingspan.data import read_dataset
    from wingspan.training import train

    real_timing = policy_module.time_calls

    def onnx_fastest(calls, x, rounds, near_tie):  # real outputs (guarded), a fixed winner
        _, outputs = real_timing(calls, x, 0, None)
        return {name: 1.0 if name == "onnx-fp32" else 2.0 for name in calls}, outputs

    monkeypatch.setattr(policy_module, "time_calls", onnx_fastest)
    # Exports cost nothing here, so that every pass runs on ONNX Runtime, however long an
    # export takes on this machine today (Policy._for_one_pass weighs the measured one).
    monkeypatch.setattr(policy_module, "export_seconds", lambda *a, **k: 0.0)
    for forced in (PRECISION_ENV, RUNTIME_ENV):  # (make test sets them): ONNX is timed here
        monkeypatch.delenv(forced, raising=False)
    exported = _counting_exports(monkeypatch)
    runs, counts = {}, {}
    for reuse in (False, True):
        monkeypatch.setattr(runtime_module, "_KEEP", 2 if reuse else 0)
        monkeypatch.setenv("WINGSPAN_CACHE", str(tmp_path / f"cache-{reuse}"))  # timed anew
        # fp32: on a bf16 CPU each run would time the training step's precisions afresh
        # (this fresh cache) and might fine-tune the two in different ones.
        config = tiny(tmp_path / str(reuse), epochs_head=2, epochs_finetune=2,
                      precision="fp32", keep_feature_cache=True)  # (compared below)
        runs[reuse] = train(read_dataset(demo_dir), config, tmp_path / str(reuse), "r",
                            quiet=True)
        counts[reuse], exported[:] = list(exported), []
    for run in runs.values():
        assert "frozen passes onnx-fp32 (measured" in (run / "train.log").read_text()
    # Every pass exporting its own graph exported some twice; now each graph once, all of them.
    assert len(counts[False]) > len(set(counts[False]))
    assert len(counts[True]) == len(set(counts[True]))
    assert set(counts[True]) == set(counts[False])
    # The same features, model and history, to the bit.
    for file in ("cache/features.safetensors", "model/model.safetensors"):
        old, new = load_file(runs[False] / file), load_file(runs[True] / file)
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert history(runs[True])[NUMBERS].equals(history(runs[False])[NUMBERS])


def _broken_export(monkeypatch) -> list[str]:
    """Every export fails, like a layer ONNX does not support; the type of each module
    whose export was tried."""
    tried = []

    def broken(module, *args, **kwargs):
        tried.append(type(module).__name__)
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(runtime_module, "export_onnx", broken)
    monkeypatch.setattr(runtime_module, "_stored_graph", lambda path: None)  # none kept
    return tried


def test_a_failed_export_is_tried_once_per_graph_in_a_run(demo_dir, tmp_path, monkeypatch):
    """Each pass of a run would try the export again (0.5-2 s) and warn again; the first
    failure of a graph is remembered for the run, and the run trains in PyTorch fp32 as
    with --runtime torch (its frozen prefix too: its fallback runs without autograd)."""
    from test_train import history, tiny

    from wingspan.data import read_dataset
    from wingspan.training import train

    tried = _broken_export(monkeypatch)
    runs = {}
    for runtime in ("torch", "onnx"):
        config = tiny(tmp_path / runtime, epochs_head=2, epochs_finetune=2, runtime=runtime,
                      precision="fp32", feature_cache=False)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            runs[runtime] = history(train(read_dataset(demo_dir), config, tmp_path / runtime,
                                          "r", quiet=True))
        warned = [str(w.message) for w in said if "ONNX Runtime" in str(w.message)]
        assert len(warned) == (runtime == "onnx")
    # The frozen backbone of stage 1, the fine-tuning prefix, the model validated: once each
    assert sorted(tried) == ["PooledFeatures", "Sequential", "WithFeatures"]
    np.testing.assert_allclose(runs["onnx"]["val_loss"], runs["torch"]["val_loss"], atol=1e-5)
    np.testing.assert_allclose(runs["onnx"]["train_loss"], runs["torch"]["train_loss"],
                               atol=1e-5)


def test_an_unexportable_model_is_tried_again_in_the_next_run(monkeypatch):
    """What a failure is remembered for ends with the run (forget_sessions)."""
    tried = _broken_export(monkeypatch)
    model, _ = create_classifier("test_efficientnet", {"y": 3}, "none")
    policy = resolve_policy("cpu", "fp32", runtime="onnx")
    with pytest.warns(UserWarning, match="unsupported operator"):
        runners = [policy.runner(model, 32, model.levels) for _ in range(3)]
    assert len(tried) == 1 and all(isinstance(r, TorchRunner) for r in runners)
    runtime_module.forget_sessions()
    with pytest.warns(UserWarning, match="unsupported operator"):
        policy.runner(model, 32, model.levels)
    assert len(tried) == 2


def test_one_pass_on_new_weights_exports_only_where_that_pays(monkeypatch):
    """A validation pass while training runs once on weights that change right after: the
    export is weighed (its seconds in this run) against the fastest eligible PyTorch engine,
    by the images/s measured for the frozen passes."""
    from wingspan.models.engine import Choice, engine_named

    exported = _counting_exports(monkeypatch)
    monkeypatch.setattr(policy_module, "export_seconds", lambda *a, **k: 2.0)
    model, _ = create_classifier("test_efficientnet", {"y": 3}, "none")
    measured = Choice(engine_named("onnx-fp32"), "measured",
                      images_per_s={"onnx-fp32": 30.0, "torch-fp32": 15.0, "torch-bf16": 29.0},
                      rejected={"torch-bf16": "changes too many images"})
    policy = resolve_policy("cpu", "fp32").with_choice("frozen", measured)
    small = policy.runner(model, 32, model.levels, once=10)  # 0.67 s against 2.33 s
    assert isinstance(small, TorchRunner) and small.dtype is None and not exported
    assert isinstance(policy.runner(model, 32, model.levels, once=100), OnnxRunner)  # 6.7 / 5.3
    assert isinstance(policy.runner(model, 32, model.levels), OnnxRunner)  # fixed weights
    forced = resolve_policy("cpu", "fp32", runtime="onnx")  # no figures: as asked
    assert isinstance(forced.runner(model, 32, model.levels, once=1), OnnxRunner)
    monkeypatch.setattr(policy_module, "export_seconds", lambda *a, **k: None)
    assert isinstance(policy.runner(model, 32, model.levels, once=10), OnnxRunner)  # none yet


def _exported_types(monkeypatch) -> list[str]:
    """The type of each module exported from here on (none read from the cache folder, as
    in _counting_exports)."""
    exported, real = [], runtime_module.export_onnx
    monkeypatch.setattr(runtime_module, "_stored_graph", lambda path: None)

    def counted(module, *args, **kwargs):
        exported.append(type(module).__name__)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(runtime_module, "export_onnx", counted)
    return exported


def _epochs_scored(monkeypatch, scores: dict[str, list[float]]) -> None:
    """Each stage's epochs get these val macro-F1s, so that which epoch is best is set by
    the test, not by how a random network at chance happened to train on this CPU."""
    from wingspan.training import stages as stages_module

    real = stages_module._end_epoch

    def scored(run, stage, epoch, train_loss, labels, preds, val, *rest, **kwargs):
        val = {**val, "macro_f1": scores[stage][epoch]}
        return real(run, stage, epoch, train_loss, labels, preds, val, *rest, **kwargs)

    monkeypatch.setattr(stages_module, "_end_epoch", scored)


@pytest.mark.parametrize("best_is_last", [True, False])
def test_fine_tuning_exports_its_prefix_once_and_no_model_per_epoch(demo_dir, tmp_path,
                                                                   monkeypatch, best_is_last):
    """With ONNX Runtime forced, the frozen prefix is exported once for fine-tuning; each
    validation pass reuses its runner, the rest in PyTorch; the final passes (features for
    calibration and the unknown score) export the best model once; all score what PyTorch
    alone scores, whether the best epoch is the last one or not (the best weights are
    reloaded)."""
    import json

    from test_train import history, tiny

    from wingspan.data import read_dataset
    from wingspan.models.bundle import read_manifest
    from wingspan.training import train

    exported = _exported_types(monkeypatch)
    _epochs_scored(monkeypatch, {"head": [0.0], "finetune": [0.5, 0.6, 0.7] if best_is_last
                                 else [0.5, 0.9, 0.1]})
    metrics, runs = {}, {}
    for runtime in ("onnx", "torch"):
        config = tiny(tmp_path / runtime, epochs_head=1, epochs_finetune=3, lr=0.03,
                      runtime=runtime, precision="fp32")
        run = train(read_dataset(demo_dir), config, tmp_path / runtime, "r", quiet=True)
        metrics[runtime] = {**json.loads((run / "metrics.json").read_text()),
                            **read_manifest(run / "model")}
        runs[runtime] = history(run)
    best = metrics["onnx"]["best"]
    assert (best["stage"], best["epoch"]) == ("finetune", 3 if best_is_last else 2)
    # Stage 1's backbone and the fine-tuning prefix; nothing per epoch; the best model.
    assert exported == ["PooledFeatures", "Sequential", "WithFeatures"]
    np.testing.assert_allclose(runs["onnx"]["val_loss"], runs["torch"]["val_loss"], atol=1e-4)
    # (val_macro_f1 is what _epochs_scored gave: the engines are compared on val_acc)
    np.testing.assert_allclose(runs["onnx"]["val_acc"], runs["torch"]["val_acc"])
    # The random network's logits are nearly flat, and the temperature that fits them is
    # poorly determined: the two engines' rounding moved it by 7.5e-4 (2 workers, 1 thread).
    temperatures = [m["calibration"]["temperature"] for m in metrics.values()]
    assert temperatures[0] == pytest.approx(temperatures[1], rel=3e-3)


def test_a_prefixed_pass_runs_the_model_as_it_is_now(monkeypatch):
    """The fine-tuning prefix on ONNX Runtime and the rest in PyTorch give the whole model's
    features and logits, for the rest's weights of the moment (new ones each epoch, or the
    best epoch's reloaded), without another export."""
    from wingspan.models.runtime import TorchRunner
    from wingspan.training.finetune_engine import finetune_parts, prefixed_pass

    exported = _counting_exports(monkeypatch)
    model, _ = create_classifier("test_efficientnet", {"family": 2, "species": 3}, "none")
    model.backbone.unfreeze_last(1)
    policy = resolve_policy("cpu", "fp32", runtime="onnx")
    prefix, trained = finetune_parts(model, policy, 32)
    forward = prefixed_pass(prefix, trained, policy, None)
    module, names = model.with_features()
    reference = TorchRunner(module, torch.device("cpu"), None, channels_last=False)
    x = torch.randn(5, 3, 32, 32)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # what a fine-tuning step changes
                p.add_(0.1 * torch.randn_like(p))
    features = []
    for _ in range(2):  # the weights of the moment, then the best ones reloaded
        out, expected = forward(x), reference(x)
        assert list(out) == names
        for name in names:
            torch.testing.assert_close(out[name], expected[name], rtol=1e-4, atol=1e-4)
        features.append(out["features"])
        model.load_state_dict(best)
    assert len(exported) == 1  # the prefix, for the training steps
    assert not torch.equal(*features)  # (the weights did move)


def test_export_seconds_are_the_graphs_own_else_the_last_made(monkeypatch):
    """What the one-pass rule weighs: a graph's own export, else the run's latest one."""
    model, _ = create_classifier("test_efficientnet", {"y": 3}, "none")
    model.eval()
    assert runtime_module.export_seconds(model, 32, model.levels) is None
    OnnxRunner(model.feature_extractor(), 32)
    last = runtime_module.export_seconds(model.feature_extractor(), 32)
    assert last > 0 and runtime_module.export_seconds(model, 32, model.levels) == last
    OnnxRunner(model, 32, model.levels)
    own = runtime_module.export_seconds(model, 32, model.levels)
    assert own > 0 and runtime_module.export_seconds(model.feature_extractor(), 32) == last
    runtime_module.forget_sessions()
    assert runtime_module.export_seconds(model, 32, model.levels) is None


def test_fine_tuning_validates_in_the_training_steps_precision(demo_dir, tmp_path,
                                                              monkeypatch):
    """The unfrozen rest of a validation pass runs in the training step's precision (bf16
    here, as measured on a CPU with bf16), without an export of the whole model; the final
    passes run one export of it, in fp32."""
    import json

    from test_train import tiny

    from wingspan.data import read_dataset
    from wingspan.models.engine import Choice, engine_named
    from wingspan.training import run as run_module
    from wingspan.training import stages as stages_module
    from wingspan.training import train

    def bf16_step(policy, *args, **kwargs):
        return policy.with_choice("train", Choice(engine_named("torch-bf16"), "test"))

    monkeypatch.setattr(run_module, "choose_train", bf16_step)
    dtypes = {}
    real = stages_module.prefixed_pass
    monkeypatch.setattr(stages_module, "prefixed_pass", lambda *a:
                        dtypes.setdefault("validation", []).append(a[3]) or real(*a))
    exported = _exported_types(monkeypatch)
    _epochs_scored(monkeypatch, {"head": [0.0], "finetune": [0.5, 0.6, 0.7]})
    config = tiny(tmp_path, epochs_head=1, epochs_finetune=3, lr=0.03, runtime="onnx",
                  precision="auto")
    run = train(read_dataset(demo_dir), config, tmp_path, "r", quiet=True)
    assert json.loads((run / "metrics.json").read_text())["best"]["stage"] == "finetune"
    # One validation pass runner for the stage; one export for the final passes.
    assert dtypes == {"validation": [torch.bfloat16]}
    assert exported == ["PooledFeatures", "Sequential", "WithFeatures"]


def test_fine_tunings_epochs_are_scored_on_the_heads_fp32_logits(demo_dir, tmp_path,
                                                                 monkeypatch):
    """A validation pass ran the head in its own precision (the training step's bf16 on
    a CPU with bf16, a GPU's frozen engine): fine-tuning's epochs were chosen on other
    logits than the head stage's (fp32) and than those the model then answers with. The
    pass's logits are replaced here by uniform ones: scored from its features, the epochs'
    val loss is the trained head's, not the uniform answer's ln K."""
    import math

    import pandas as pd
    from test_train import tiny

    from wingspan.data import read_dataset
    from wingspan.training import stages as stages_module
    from wingspan.training import train

    real = stages_module.prefixed_pass

    def uniform_logits(*args):
        forward = real(*args)

        def run(images):
            out = forward(images)
            return {k: v if k == "features" else torch.zeros_like(v) for k, v in out.items()}
        return run

    monkeypatch.setattr(stages_module, "prefixed_pass", uniform_logits)
    config = tiny(tmp_path, epochs_head=2, epochs_finetune=2, runtime="onnx", precision="fp32")
    run = train(read_dataset(demo_dir), config, tmp_path, "r", quiet=True)
    history = pd.read_csv(run / "history.csv")
    classes = read_dataset(demo_dir).table["label"].nunique()
    tuned = history[history["stage"] == "finetune"]
    assert len(tuned) == 2
    assert not any(math.isclose(loss, math.log(classes), rel_tol=1e-4)
                   for loss in tuned["val_loss"]), tuned["val_loss"].tolist()


def test_the_graph_of_weights_that_stay_is_kept_on_disk_for_the_next_process(
        monkeypatch, tmp_path):
    """A predictor's graph is read back from the cache folder in a new process (here: the
    sessions forgotten) without an export, and runs alike; a damaged file is exported
    again and replaced; other weights never use it; the last GRAPHS_KEPT stay."""
    monkeypatch.setenv("WINGSPAN_CACHE", str(tmp_path))
    exported = _counting_exports(monkeypatch, disk=True)
    model, _ = create_classifier("test_efficientnet", {"y": 4}, "none")
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    first = OnnxRunner(model, 32, model.levels, keep=True)(x)["y"]
    kept = list((tmp_path / "graphs").glob("*.onnx"))
    assert len(exported) == 1 and len(kept) == 1
    took = json.loads(kept[0].with_suffix(".json").read_text())["seconds"]
    runtime_module.forget_sessions()  # as a new process starts
    again = OnnxRunner(model, 32, model.levels, keep=True)(x)["y"]
    assert len(exported) == 1 and torch.equal(again, first)
    # What the export took, for Policy._for_one_pass to weigh, as if exported here.
    assert runtime_module.export_seconds(model, 32, model.levels) == took > 0
    # Another wingspan, timm or torch (its exporter) makes its own graph of these weights.
    runtime_module.forget_sessions()
    monkeypatch.setattr(runtime_module, "_code_digest", lambda: "another version")
    OnnxRunner(model, 32, model.levels, keep=True)
    assert len(exported) == 2 and len(list((tmp_path / "graphs").glob("*.onnx"))) == 2
    monkeypatch.undo()  # (the cache folder and the counting again)
    monkeypatch.setenv("WINGSPAN_CACHE", str(tmp_path))
    exported = _counting_exports(monkeypatch, disk=True)
    for stale in set((tmp_path / "graphs").glob("*")) - {kept[0], kept[0].with_suffix(".json")}:
        stale.unlink()
    runtime_module.forget_sessions()
    OnnxRunner(model, 32, model.levels)(x)  # a one-pass runner neither reads nor writes
    assert len(exported) == 1 and len(list((tmp_path / "graphs").glob("*.onnx"))) == 1

    kept[0].write_bytes(kept[0].read_bytes()[:1000])  # cut short
    runtime_module.forget_sessions()
    redone = OnnxRunner(model, 32, model.levels, keep=True)(x)["y"]
    assert len(exported) == 2 and torch.equal(redone, first)
    assert kept[0].stat().st_size > 1000  # replaced whole
    # Damaged where it still loads (bytes zeroed in its weights): its sha256 tells, and it is
    # exported again; it trained every later run of the backbone on wrong features.
    raw = bytearray(kept[0].read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 4096] = bytes(4096)
    kept[0].write_bytes(bytes(raw))
    runtime_module.forget_sessions()
    assert torch.equal(OnnxRunner(model, 32, model.levels, keep=True)(x)["y"], first)
    assert len(exported) == 3

    with torch.no_grad():  # other weights: another graph, never the kept one
        model.head.outputs["y"].bias.add_(1.0)
    moved = OnnxRunner(model, 32, model.levels, keep=True)(x)["y"]
    assert len(exported) == 4
    torch.testing.assert_close(moved, first + 1.0, rtol=1e-4, atol=1e-4)
    for size in (33, 34, 35, 36):
        OnnxRunner(model.feature_extractor(), size, keep=True)
    assert len(list((tmp_path / "graphs").glob("*.onnx"))) == runtime_module.GRAPHS_KEPT
    runtime_module.forget_sessions()
