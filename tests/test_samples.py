
from pathlib import Path

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



def test_a_data_folder_with_a_long_name_gets_output_folders_it_can_make(tmp_path,
                                                                        monkeypatch):
    """A data folder's name may use 250 bytes (80 CJK letters): its second output folder
    of that name (NAME-HASH) and evaluate's evaluation-NAME-SPLIT went over a file name's
    255 and failed, "File name too long"."""
    from helpers import write_image

    from wingspan.data import read_dataset
    from wingspan.evaluate.folder import evaluation_name

    monkeypatch.chdir(tmp_path)
    name = "蝴" * 83  # 249 bytes
    roots = [tmp_path / "one" / name, tmp_path / "two" / name]
    for root in roots:
        for label in "ab":
            write_image(root / label / "0.jpg", seed=ord(label))
    outs = [read_dataset(root).claim_out_dir() for root in roots]  # the second: NAME-HASH
    assert outs[0] != outs[1] and all(out.is_dir() for out in outs)
    assert read_dataset(roots[1]).out_dir == outs[1]  # found again, as its own
    folder = Path("run") / evaluation_name(name, "test", True, True, True, "energy")
    folder.mkdir(parents=True)  # and its lock file beside it: both within 255 bytes
    (folder.parent / f".{folder.name}.lock").touch()
