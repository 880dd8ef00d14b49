"""`wingspan adapt`: self-training the head on unlabelled photos (the end-to-end test, on a
trained run, is in test_evaluate.py beside calibrate, the other command that refits)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from wingspan.config import AdaptConfig
from wingspan.errors import WingspanError
from wingspan.evaluate.calibration import softmax
from wingspan.training.adapt import _linear, self_train

CENTRES = np.array([[-2.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 4.0, 0, 0]])


def _draw(rng, n: int, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.repeat(np.arange(len(CENTRES)), n)
    return CENTRES[y] + shift + 0.5 * rng.standard_normal((len(y), CENTRES.shape[1])), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_training_follows_photos_shifted_from_the_training_images(seed):
    # The photos' classes lie 1.6 further along the first axis than the labelled ones: a
    # head fitted on those alone puts class 0's photos near class 1 and misses some.
    rng = np.random.default_rng(seed)
    labelled, labels = _draw(rng, 40, np.zeros(4))
    photos, truth = _draw(rng, 100, np.array([1.6, 0, 0, 0]))
    before = LogisticRegression().fit(labelled, labels).decision_function(photos)
    weight, bias, used = self_train(labelled, labels, photos, before, 3, AdaptConfig())
    after = photos @ weight.T + bias
    accuracy_before = (before.argmax(1) == truth).mean()
    assert accuracy_before < 0.95
    assert (after.argmax(1) == truth).mean() >= accuracy_before + 0.02
    assert len(used) == 3 and all(0 < n <= len(photos) for n in used)


def test_only_confident_photos_are_trained_on():
    rng = np.random.default_rng(0)
    labelled, labels = _draw(rng, 20, np.zeros(4))
    photos, _ = _draw(rng, 30, np.zeros(4))
    logits = np.zeros((len(photos), 3))
    logits[:10, 0] = 5.0  # 10 sure of class 0 (p 0.99), the rest even (p 1/3)
    _, _, used = self_train(labelled, labels, photos, logits, 3, AdaptConfig(rounds=1))
    assert used == [10]


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
                                      {"confidence": "high"}])
def test_settings_are_checked(settings):
    with pytest.raises(WingspanError, match=next(iter(settings))):
        AdaptConfig(**settings)
