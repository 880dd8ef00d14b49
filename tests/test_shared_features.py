"""Stage 1's features kept across runs (training.shared_features): a second run on the same
images reads what the first computed, exactly, and recomputes whatever it would compute
otherwise (another augmentation seed, an edited photo)."""

import re
import shutil

import pandas as pd
import pytest
from PIL import Image
from safetensors.torch import load_file
from test_train import tiny

from wingspan.data import read_dataset
from wingspan.training import train
from wingspan.training.folder import feature_cache_file


def weights_file(tmp_path):
    """A tiny backbone's weights in a file: random weights (--weights none) are not kept."""
    from safetensors.torch import save_file

    from wingspan.models import create_classifier

    model, _ = create_classifier("test_efficientnet", {"label": 2}, weights="none")
    path = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.net.state_dict().items()}, path)
    return str(path)


def cached(run_dir) -> tuple[int, int, int]:
    """(training images, val images, features read from earlier runs) as train.log says."""
    line = next(x for x in (run_dir / "train.log").read_text().splitlines()
                if "Cached features of" in x)
    n, m = map(int, re.search(r"of (\d+) training images x 2 views and (\d+) valid", line)
               .groups())
    found = re.search(r"\((\d+) of them computed before and read from", line)
    return n, m, int(found[1]) if found else 0


def run(data, tmp_path, name, **changes):
    config = tiny(tmp_path, epochs_head=2, epochs_finetune=0, keep_feature_cache=True,
                  runtime="torch", precision="fp32", **changes)
    return train(data, config, tmp_path / "runs", name=name, quiet=True)


def test_a_second_run_reads_the_features_the_first_computed(demo_dir, tmp_path):
    data, weights = read_dataset(demo_dir), weights_file(tmp_path)
    first = run(data, tmp_path, "first", weights=weights)
    n, m, reused = cached(first)
    assert reused == 0 and n and m
    assert "for later runs with the same weights, engine (torch-fp32) and augmentation" in \
        (first / "train.log").read_text()
    # Only the head's settings changed: every feature is read, none computed.
    second = run(data, tmp_path, "second", weights=weights, lr=1e-3, label_smoothing=0.0)
    assert cached(second) == (n, m, 2 * n + m)
    a, b = load_file(feature_cache_file(first)), load_file(feature_cache_file(second))
    assert (a["train"] == b["train"]).all() and (a["val"] == b["val"]).all()
    # Random weights keep nothing, and `reuse_features: false` reads nothing.
    none = run(data, tmp_path / "none", "none")
    assert cached(none)[2] == 0 and not (tmp_path / "none" / "cache" / "features").exists()
    none = run(data, tmp_path / "None", "None", weights="None")  # (random weights too)
    assert cached(none)[2] == 0 and not (tmp_path / "None" / "cache" / "features").exists()
    off = run(data, tmp_path, "off", weights=weights, reuse_features=False)
    assert cached(off) == (n, m, 0)


def test_another_seed_or_an_edited_photo_is_computed_again(demo_dir, tmp_path):
    shutil.copytree(demo_dir, tmp_path / "data")
    data, weights = read_dataset(tmp_path / "data"), weights_file(tmp_path)
    first = run(data, tmp_path, "first", weights=weights)
    n, m, _ = cached(first)
    # Another seed splits otherwise and draws other crops: each image's clean view (train's
    # or val's) is the same and read, every augmented one is computed.
    other = run(data, tmp_path, "other", weights=weights, seed=1)
    assert cached(other) == (n, m, n + m)
    # Another augmentation draws other crops of the same seed; another size, other pixels.
    light = run(data, tmp_path, "light", weights=weights, augment="light")
    assert cached(light) == (n, m, n + m)
    assert cached(run(data, tmp_path, "bigger", weights=weights, image_size=40)) == (n, m, 0)
    # A photo edited since: its features are computed again, the others' read.
    splits = pd.read_csv(first / "splits.csv")
    photo = tmp_path / "data" / splits.loc[splits["split"] == "val", "path"].iloc[0]
    Image.open(photo).rotate(90).save(photo)
    again = run(read_dataset(tmp_path / "data"), tmp_path, "again", weights=weights)
    assert cached(again) == (n, m, 2 * n + m - 1)


@pytest.mark.parametrize("changed", ["timm", "machine"])
def test_another_timm_or_machine_computes_again(demo_dir, tmp_path, monkeypatch, changed):
    """timm builds and runs the backbone: a new release computes otherwise from the same
    weights (as the engines' cache knows), and so do another machine's kernels (TF32 on an
    A100, AMX's bf16), where a cache folder in a shared home serves several. Each read the
    first run's features."""
    import timm

    data, weights = read_dataset(demo_dir), weights_file(tmp_path)
    n, m, _ = cached(run(data, tmp_path, "first", weights=weights))
    if changed == "timm":
        monkeypatch.setattr(timm, "__version__", timm.__version__ + ".post1")
    else:
        # (the processor as the key names it, a GPU's or a CPU's: the same on any machine)
        import wingspan.training.shared_features as shared

        monkeypatch.setattr(shared, "processor", lambda device: "ANOTHER")
    assert cached(run(data, tmp_path, "second", weights=weights)) == (n, m, 0)


def test_a_cache_folder_that_cannot_be_made_keeps_nothing_and_says_no_folder(demo_dir,
                                                                             tmp_path):
    """The log said "kept in None for later runs" where the cache folder could not be made
    (read-only, or under a file)."""
    (tmp_path / "file").write_text("")
    blocked = run(read_dataset(demo_dir), tmp_path, "blocked", weights=weights_file(tmp_path),
                  cache_dir=str(tmp_path / "file" / "cache"))
    line = next(x for x in (blocked / "train.log").read_text().splitlines()
                if "Cached features of" in x)
    assert "None" not in line and "kept in" not in line, line
