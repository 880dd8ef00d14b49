"""`wingspan adapt`: self-training the head on unlabelled photos (the end-to-end test, on a
trained run, is in test_evaluate.py beside calibrate, the other command that refits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from wingspan.config import AdaptConfig
from wingspan.errors import WingspanError
from wingspan.evaluate.calibration import softmax
from wingspan.training.adapt import _linear, self_train, spread_labels

CENTRES = np.array([[-2.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 4.0, 0, 0]])


def _draw(rng, n: int, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.repeat(np.arange(len(CENTRES)), n)
    return CENTRES[y] + shift + 0.5 * rng.standard_normal((len(y), CENTRES.shape[1])), y


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rounds", [1, 3])
def test_self_training_follows_photos_shifted_from_the_training_images(seed, rounds):
    # The photos' classes lie 1.6 further along the first axis than the labelled ones: a
    # head fitted on those alone puts class 0's photos near class 1 and misses some.
    rng = np.random.default_rng(seed)
    labelled, labels = _draw(rng, 40, np.zeros(4))
    photos, truth = _draw(rng, 100, np.array([1.6, 0, 0, 0]))
    before = LogisticRegression().fit(labelled, labels).decision_function(photos)
    config = AdaptConfig(rounds=rounds)
    weight, bias, used = self_train(labelled, labels, photos, before, 3, config)
    after = photos @ weight.T + bias
    accuracy_before = (before.argmax(1) == truth).mean()
    assert accuracy_before < 0.95
    assert (after.argmax(1) == truth).mean() >= accuracy_before + 0.01  # 3 photos or more
    assert len(used) == rounds and all(0 < n <= len(photos) for n in used)


@pytest.mark.parametrize("seed", [0, 1])
def test_label_spreading_passes_classes_along_the_photos(seed):
    # Two interleaved half-moons, each labelled only at its outer tip: the inner end of each
    # moon is nearer to the other moon's labelled images, and reached through its own
    # photos alone. (A constant third feature keeps the shapes under L2 normalisation.)
    from sklearn.datasets import make_moons
    from sklearn.neighbors import KNeighborsClassifier

    x, y = make_moons(300, noise=0.05, random_state=seed)
    tips = np.r_[np.flatnonzero(y == 0)[np.argsort(x[y == 0, 0])[:10]],
                 np.flatnonzero(y == 1)[np.argsort(-x[y == 1, 0])[:10]]]
    rest = np.setdiff1d(np.arange(len(y)), tips)
    features = np.c_[x, np.full(len(x), 10.0)]
    spread = spread_labels(features[tips], y[tips], features[rest], AdaptConfig())
    nearest = KNeighborsClassifier(1).fit(x[tips], y[tips]).predict(x[rest])
    assert (spread == y[rest]).mean() > 0.75
    assert (spread == y[rest]).mean() > (nearest == y[rest]).mean() + 0.1


def test_only_photos_the_head_and_their_neighbours_agree_on_are_trained_on():
    rng = np.random.default_rng(0)
    labelled, labels = _draw(rng, 20, np.zeros(4))
    photos, truth = _draw(rng, 10, np.zeros(4))  # 10 of each class, beside their own
    logits = np.zeros((len(photos), 3))
    logits[np.arange(30), truth] = 5.0  # sure and right (p 0.99)...
    logits[:5] = [0.0, 5.0, 0.0]  # ...but 5 of class 0 taken for class 1
    logits[10:13] = [0.0, 0.3, 0.0]  # 3 of class 1 named right, unsure (p 0.4)
    assert (spread_labels(labelled, labels, photos, AdaptConfig()) == truth).all()
    assert self_train(labelled, labels, photos, logits, 3, AdaptConfig())[2] == [25]
    # A bar on the head's probability as well leaves out the unsure ones.
    assert self_train(labelled, labels, photos, logits, 3,
                      AdaptConfig(confidence=0.5))[2] == [22]
    # The bar is on the calibrated probability: at temperature 0.1 those are sure (p 0.91).
    assert self_train(labelled, labels, photos, logits, 3, AdaptConfig(confidence=0.5),
                      temperature=0.1)[2] == [25]
    # No photo agreed on: nothing is fitted (the run's head stays as it is).
    weight, bias, used = self_train(labelled, labels, photos, logits, 3,
                                    AdaptConfig(confidence=0.999))
    assert weight is None and bias is None and used == [0]


def test_the_linear_layer_gives_scikit_learns_probabilities_for_every_head_class():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 5))
    for classes_seen in ([0, 2], [0, 1, 3]):  # binary fits have one decision function
        y = np.array(classes_seen)[rng.integers(0, len(classes_seen), 60)]
        fit = LogisticRegression().fit(x, y)
        weight, bias = _linear(fit, 4, 5)
        probs = softmax(x @ weight.T + bias)
        assert np.allclose(probs[:, classes_seen], fit.predict_proba(x), atol=1e-6)
        unseen = [c for c in range(4) if c not in classes_seen]
        assert probs[:, unseen].max() < 1e-6  # a class the fit never saw never wins


@pytest.mark.parametrize("settings", [{"rounds": 0}, {"confidence": 1.0}, {"c": 0},
                                      {"confidence": -0.1}, {"confidence": "high"},
                                      {"neighbours": 0}, {"spreading": 1.0}])
def test_settings_are_checked(settings):
    with pytest.raises(WingspanError, match=next(iter(settings))):
        AdaptConfig(**settings)


def test_adapting_again_without_out_keeps_the_earlier_adapted_run(tmp_path):
    """`run.adapt("garden/")` then `run.adapt("park/")` wrote both to RUN-adapted: the
    second replaced the first (and the first's Run object then predicted with it). Now the
    default is the first free name, as train numbers a taken run name."""
    from wingspan.training.adapt import default_out

    run = tmp_path / "leeds"
    run.mkdir()
    assert default_out(run) == tmp_path / "leeds-adapted"
    (tmp_path / "leeds-adapted" / "model").mkdir(parents=True)  # adapted to the garden
    assert default_out(run) == tmp_path / "leeds-adapted-2"
    (tmp_path / "leeds-adapted-2").mkdir()  # an empty folder (made by hand) is taken as is
    assert default_out(run) == tmp_path / "leeds-adapted-2"
    (tmp_path / "leeds-adapted-2" / "adapt.json").write_text("{}")
    (tmp_path / "leeds-adapted-3").write_text("a file")
    assert default_out(run) == tmp_path / "leeds-adapted-4"


def test_two_adapts_at_once_each_keep_their_own_run(tmp_path):
    """Two `wingspan adapt RUN ...` started together both chose RUN-adapted (the name is
    taken only once written) and the later replaced the other. The folder is now held by
    a lock beside it from the start: the second takes the next name, and an --out that
    another adapt is writing is refused."""
    from wingspan.training.adapt import _claim
    from wingspan.training.folder import hold_lock, release_lock

    run = tmp_path / "leeds"
    run.mkdir()
    assert hold_lock(tmp_path, ".leeds-adapted.lock", again=False)  # the first adapt
    try:
        assert _claim(None, run) == tmp_path / "leeds-adapted-2"
        with pytest.raises(WingspanError, match="Another `wingspan adapt` is writing"):
            _claim(tmp_path / "leeds-adapted", run)
    finally:
        release_lock(tmp_path, ".leeds-adapted.lock")
        release_lock(tmp_path, ".leeds-adapted-2.lock")
    assert _claim(None, run) == tmp_path / "leeds-adapted"  # free again once it ends
    release_lock(tmp_path, ".leeds-adapted.lock")


def test_a_failed_adapt_leaves_nothing_half_written_beside_the_run(demo_dir, tmp_path,
                                                                   monkeypatch):
    """A full disk while the adapted run was written left its hidden .NAME.partial folder
    (36 KB and more) until the next adapt."""
    import errno

    from test_train import tiny

    import wingspan.training.adapt as adapt_module
    from wingspan.data import read_dataset
    from wingspan.training import train

    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_finetune=0), tmp_path
                    / "runs", "r", quiet=True)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapt_module, "save_bundle", full)
    photos = sorted(str(p) for p in demo_dir.rglob("*.jpg"))[:12]
    with pytest.raises(OSError):
        adapt_module.adapt(run_dir, photos, out=tmp_path / "runs" / "a", progress=False)
    # (its lock file stays, as every lock file does: removing one races another holder)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".a.lock", "r"]


def test_adapt_writes_a_photo_named_in_other_bytes(demo_dir, tmp_path):
    """A photo named in bytes that are not UTF-8 (b'caf\\xe9.jpg', from a zip made on
    Windows) is read and adapted on; writing its name in adapt_photos.csv was a
    UnicodeEncodeError once all the work was done, and no adapted run was written."""
    import os
    import shutil

    from test_train import tiny

    from wingspan.data import read_dataset
    from wingspan.training import train
    from wingspan.training.adapt import adapt
    from wingspan.training.folder import ADAPT_PHOTOS_FILE

    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=20, epochs_finetune=0),
                    tmp_path / "runs", "r", quiet=True)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, path in enumerate(sorted(demo_dir.rglob("*.jpg"))[::2]):
        shutil.copy(path, photos / f"{i}.jpg")
    shutil.copy(next(demo_dir.rglob("*.jpg")), photos / os.fsdecode(b"caf\xe9.jpg"))
    out = tmp_path / "runs" / "adapted"
    done = adapt(run_dir, [str(photos)], out=out, progress=False)
    assert any(any(n) for n in done["photos_used_per_round"].values())  # a head refitted
    written = (out / ADAPT_PHOTOS_FILE).read_text(encoding="utf-8")
    assert "caf\\udce9.jpg" in written and written.count("\n") == 1 + len(list(photos.iterdir()))


def test_adapt_draws_a_large_runs_own_images_with_the_runs_seed(demo_dir, tmp_path,
                                                                monkeypatch):
    """Past MAX_FIT_IMAGES training images adapt refits on a sample of them: drawn with
    seed 0 whatever the run's seed (calibrate and training draw with the run's)."""
    from safetensors.torch import load_file
    from test_train import tiny

    import wingspan.evaluate.own_images as own_module
    from wingspan.data import read_dataset
    from wingspan.training import train
    from wingspan.training.adapt import adapt

    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_head=20, epochs_finetune=0,
                                                 seed=3), tmp_path / "runs", "r", quiet=True)
    monkeypatch.setattr(own_module, "MAX_FIT_IMAGES", 8)  # (the demo's run has 30 or so)
    photos = sorted(str(p) for p in demo_dir.rglob("*.jpg"))[::2]

    def head(seed, name):
        adapt(run_dir, photos, out=tmp_path / "runs" / name, progress=False, workers=0,
              **({} if seed is None else {"seed": seed}))
        weights = load_file(tmp_path / "runs" / name / "model" / "model.safetensors")
        return {k: v for k, v in weights.items() if k.startswith("head.")}

    default, own, zero = head(None, "default"), head(3, "own"), head(0, "zero")
    assert default.keys() == own.keys() and default
    assert all(torch.equal(default[k], own[k]) for k in default)
    assert not all(torch.equal(default[k], zero[k]) for k in default)


def test_photos_that_hold_no_image_are_said_as_such_not_as_unreadable(demo_dir, tmp_path):
    """An empty folder of photos was "Cannot read: photos (the folder holds no images)";
    evaluate --unknown's alike ended without its full stop."""
    from test_train import tiny

    from wingspan.data import read_dataset
    from wingspan.evaluate.unseen import unseen_paths
    from wingspan.training import train
    from wingspan.training.adapt import adapt

    (tmp_path / "photos").mkdir()
    with pytest.raises(WingspanError) as e:
        unseen_paths(tmp_path / "photos")
    assert e.value.message.endswith(": the folder holds no images."), e.value.message
    run_dir = train(read_dataset(demo_dir), tiny(tmp_path, epochs_finetune=0), tmp_path
                    / "runs", "r", quiet=True)
    with pytest.raises(WingspanError) as e:
        adapt(run_dir, [str(tmp_path / "photos")], progress=False)
    assert e.value.message == (f"No photos to adapt to: {tmp_path / 'photos'} (the folder "
                               "holds no images)."), e.value.message
