"""How closely two engines' predictions must agree, per precision (tests of whole models
on ImageNet images state their own, on logits: tests/test_policy.py).

- fp32 against fp32 (PyTorch against ONNX Runtime): the same numbers up to float
  rounding in a different order of operations.
- bf16 against fp32: bf16 keeps 8 bits of mantissa, so probabilities move by up to a few
  hundredths; the top-1 class must be the same wherever fp32's top-1 leads its runner-up
  by more than that tolerance (a closer race may flip either way).
"""

import numpy as np

FP32 = {"rtol": 1e-4, "atol": 1e-5}
BF16_PROB_ATOL = 0.02


def assert_agree(reference: np.ndarray, probs: np.ndarray, precision: str) -> None:
    """`probs` (N, classes) from an engine in `precision` against fp32's `reference`."""
    assert reference.shape == probs.shape
    if precision == "fp32":
        np.testing.assert_allclose(probs, reference, **FP32)
        return
    np.testing.assert_allclose(probs, reference, rtol=0, atol=BF16_PROB_ATOL)
    top2 = np.sort(reference, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > BF16_PROB_ATOL
    assert (reference.argmax(1)[clear] == probs.argmax(1)[clear]).all()
