"""How closely two engines' predictions must agree, per precision (tests of whole models
on ImageNet images state their own, on logits: tests/test_policy.py).

- fp32 against fp32 (PyTorch against ONNX Runtime): the same numbers up to float
  rounding in a different order of operations.
- bf16 against fp32: bf16 keeps 8 bits of mantissa, and its rounding adds up over a
  network's layers: on EfficientNet-Lite0 at 32 px with a head that decides, probabilities
  moved by up to 0.07 (AVX2 EPYC; the tolerance is twice that). The top-1 class must be
  the same wherever fp32's top-1 leads its runner-up by more than twice the tolerance (a
  closer race may flip either way), and the reference must decide most images so
  clearly, or the check would say nothing.
"""

import numpy as np

FP32 = {"rtol": 1e-4, "atol": 1e-5}
BF16_PROB_ATOL = 0.15


def assert_agree(reference: np.ndarray, probs: np.ndarray, precision: str) -> None:
    """`probs` (N, classes) from an engine in `precision` against fp32's `reference`."""
    assert reference.shape == probs.shape
    if precision == "fp32":
        np.testing.assert_allclose(probs, reference, **FP32)
        return
    np.testing.assert_allclose(probs, reference, rtol=0, atol=BF16_PROB_ATOL)
    # Each probability may move by the tolerance: a lead of twice it cannot be overturned.
    top2 = np.sort(reference, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * BF16_PROB_ATOL
    assert clear.mean() >= 0.5, "the reference model decides too few images clearly: a " \
        "comparison of its classes would check nothing"
    assert (reference.argmax(1)[clear] == probs.argmax(1)[clear]).all()
