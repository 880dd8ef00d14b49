
import numpy as np
import pandas as pd
import pytest

from wingspan.data.samples import renamed


def _labels(rng, n: int, dtype) -> pd.Series:
    """Labels from a few names (some with end spaces), some cells None or NaN."""
    names = np.array(["monarch", "admiral", "white", "white ", "Danaus", "", "é"], dtype=object)
    values = names[rng.integers(len(names), size=n)]
    values[rng.random(n) < 0.1] = None
    values[rng.random(n) < 0.1] = np.nan
    return pd.Series(values, dtype=dtype, index=rng.permutation(n) + 7, name="species")


@pytest.mark.parametrize("dtype", [object, "str"])
@pytest.mark.parametrize("seed", range(20))
def test_renamed_equals_series_replace_on_label_columns(seed, dtype):
    rng = np.random.default_rng(seed)
    labels = _labels(rng, int(rng.integers(0, 40)), dtype)
    keys = ["monarch", "admiral", "white", "white ", "unseen"]
    mapping = {k: str(rng.choice(["admiral", "monarch", "Pieris (rare)", "white"]))
               for k in rng.choice(keys, int(rng.integers(0, len(keys) + 1)), replace=False)}
    pd.testing.assert_series_equal(renamed(labels, mapping), labels.replace(mapping))


@pytest.mark.parametrize("dtype", [object, "str"])
def test_renamed_is_one_pass_keeps_missing_cells_and_leaves_its_input_alone(dtype):
    labels = pd.Series(["a", "b", "c", None, np.nan], dtype=dtype, index=[3, 3, 1, 1, 0])
    before = labels.copy()
    out = renamed(labels, {"a": "b", "b": "c"})
    assert out.tolist()[:3] == ["b", "c", "c"] and out.iloc[3:].isna().all()
    pd.testing.assert_series_equal(out, labels.replace({"a": "b", "b": "c"}))
    pd.testing.assert_series_equal(renamed(labels, {}), labels)
    pd.testing.assert_series_equal(labels, before)
    empty = pd.Series([], dtype=dtype)
    pd.testing.assert_series_equal(renamed(empty, {"a": "b"}), empty.replace({"a": "b"}))

