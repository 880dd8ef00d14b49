"""`wingspan export`: an ONNX model that runs with onnxruntime alone."""

import json
import subprocess
import sys

import pytest
from test_train import tiny

from wingspan.data import read_dataset
from wingspan.train import train

# What the README shows: the exported model with onnxruntime, Pillow and numpy only.
STANDALONE = """
import json, sys
import numpy as np, onnxruntime as ort
from PIL import Image

session = ort.InferenceSession(sys.argv[1])
meta = json.loads(session.get_modelmeta().custom_metadata_map["wingspan"])
size, resize = meta["input"]["size"], meta["input"]["resize_shorter_side_to"]
rows = []
for path in sys.argv[2:]:
    image = Image.open(path).convert("RGB")
    scale = resize / min(image.size)
    image = image.resize((max(size, round(image.width * scale)),
                          max(size, round(image.height * scale))), Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    probs = dict(zip(meta["outputs"], session.run(None, {"pixels": pixels[None]})))
    finest = meta["outputs"][-1]
    p = probs[finest][0]
    rows.append([path, meta["classes"][finest][int(p.argmax())], float(p.max()), float(p.sum())])
assert not any(m.startswith("wingspan") for m in sys.modules)
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def run_dir(demo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    return train(read_dataset(demo_dir), tiny(tmp, levels=["family", "label"]), tmp / "runs",
                 "r", quiet=True)


def test_export_runs_without_wingspan_and_matches_pytorch(run_dir, run_cli, demo_dir):
    code, out, err = run_cli("export", run_dir)
    assert code == 0, err
    model = run_dir / "export" / "model.onnx"
    meta = json.loads(model.with_suffix(".json").read_text())
    # Checked on the run's val images against PyTorch: close, and really compared.
    check = meta["checked"]
    assert check["images"] > 0 and 0 < check["max_abs_probability_difference"] < 1e-4
    assert meta["outputs"] == ["family", "label"] and meta["taxonomy"]
    assert meta["temperature"] > 0 and meta["input"]["dtype"] == "uint8"
    images = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))[:3]]
    rows = json.loads(subprocess.run([sys.executable, "-c", STANDALONE, str(model), *images],
                                     capture_output=True, text=True, check=True).stdout)
    for _, label, top, total in rows:
        assert label in meta["classes"]["label"] and 0 < top <= 1
        assert total == pytest.approx(1.0, abs=1e-5)
    code, _, err = run_cli("export", run_dir, "--format", "tflite")
    assert code == 2 and "Unknown export format 'tflite'" in err
