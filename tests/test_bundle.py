import json

import pytest
import torch

from wingspan.errors import WingspanError
from wingspan.models import create_classifier, load_bundle, save_bundle
from wingspan.models.bundle import DAMAGED_HINT, MANIFEST, WEIGHTS


@pytest.fixture
def model():
    torch.manual_seed(0)
    m, _ = create_classifier("resnet18", {"label": 3}, weights="none", hidden=16)
    return m.eval()


CLASSES = {"label": ["admiral", "monarch", "peacock"]}


@pytest.mark.parametrize("name", ["bundle", "model.safetensors"])
def test_round_trip_gives_identical_outputs(model, tmp_path, name):
    path = save_bundle(model, tmp_path / name, CLASSES, training={"epochs": 1},
                       metrics={"val_macro_f1": 0.5}, weights_source="none")
    loaded, manifest = load_bundle(path)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x)["label"], loaded(x)["label"])
    assert manifest["classes"] == CLASSES
    assert manifest["model"] == {"backbone": "resnet18", "outputs": {"label": 3}, "hidden": 16,
                                 "dropout": 0.2}
    assert manifest["preprocessing"]["input_size"] == 224
    assert manifest["metrics"] == {"val_macro_f1": 0.5}
    assert not loaded.training


def test_loading_a_bundle_leaves_the_callers_random_stream_alone(model, tmp_path):
    """The model was built with random weights before the bundle's replaced them, which
    drew from torch's global generator: a seeded script's numbers changed depending on
    whether (and how often) it loaded a model."""
    path = save_bundle(model, tmp_path / "b", CLASSES)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_bundle(path)
    assert torch.equal(torch.rand(3), expected)


def test_tampered_weights_are_refused(model, tmp_path):
    path = save_bundle(model, tmp_path / "b", CLASSES)
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-100] ^= 0xFF  # flip bits inside a tensor
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(WingspanError, match="do not match the checksum"):
        load_bundle(path)
    (path / WEIGHTS).write_bytes(bytes(data[:5000]))  # cut short
    with pytest.raises(WingspanError, match="are corrupt") as e:
        load_bundle(path)
    assert e.value.hint == DAMAGED_HINT and "--resume" in e.value.hint


def test_a_bundle_rewritten_and_stopped_between_its_two_files_keeps_both_old(
        model, tmp_path, monkeypatch):
    """calibrate --unknown rewrites the weights (the scores fitted again) and then the
    manifest with their checksum: a Ctrl-C between the two left new weights beside the old
    checksum, and nothing would load the bundle again. Both are put back now."""
    from helpers import ctrl_c_at_rename

    path = save_bundle(model, tmp_path / "b", CLASSES)
    before = {name: (path / name).read_bytes() for name in (WEIGHTS, MANIFEST)}
    with torch.no_grad():
        model.head.outputs["label"].bias.add_(1.0)  # other weights, another checksum
    ctrl_c_at_rename(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        save_bundle(model, path, CLASSES)
    monkeypatch.undo()
    assert {name: (path / name).read_bytes() for name in (WEIGHTS, MANIFEST)} == before
    load_bundle(path)  # (it loads: the old bundle whole)
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS, MANIFEST])


def test_broken_bundles_give_clear_errors(model, tmp_path):
    path = save_bundle(model, tmp_path / "b", CLASSES)
    manifest = json.loads((path / MANIFEST).read_text())

    def write(**changes):
        (path / MANIFEST).write_text(json.dumps({**manifest, **changes}))

    write(format_version=99)
    with pytest.raises(WingspanError, match="(?s)bundle format 99, newer.*Upgrade"):
        load_bundle(path)
    write(model={**manifest["model"], "backbone": "no_such_net"})
    with pytest.raises(WingspanError, match="do not match their checksum"):
        load_bundle(path)
    # The deeper checks, for a manifest without that checksum (or edited with care):
    write(model={**manifest["model"], "backbone": "no_such_net"}, meaning_sha256=None)
    with pytest.raises(WingspanError, match="backbone cannot be built"):
        load_bundle(path)
    write(model={**manifest["model"], "outputs": {"label": 4}}, meaning_sha256=None)
    with pytest.raises(WingspanError, match="do not fit the model"):
        load_bundle(path)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(WingspanError, match="corrupt") as e:
        load_bundle(path)
    assert e.value.hint == DAMAGED_HINT  # what to do: the run writes it again
    (path / MANIFEST).unlink()
    with pytest.raises(WingspanError, match="not a complete model bundle"):
        load_bundle(path)
    with pytest.raises(WingspanError, match="No model bundle"):
        load_bundle(tmp_path / "elsewhere")
    (tmp_path / "plain.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(WingspanError, match="not a wingspan model bundle"):
        load_bundle(tmp_path / "plain.safetensors")


def test_class_names_must_match_the_head(model, tmp_path):
    with pytest.raises(WingspanError, match="3 outputs for 'label' but 2 class names"):
        save_bundle(model, tmp_path / "b", {"label": ["a", "b"]})


@pytest.mark.parametrize("edit", [
    lambda m: m["classes"]["label"].__setitem__(0, "red admiral"),  # a renamed class
    lambda m: m["classes"]["label"].pop(),  # a class name dropped
    lambda m: m["preprocessing"].__setitem__("input_size", 96),
])
def test_an_edited_manifest_is_refused(model, tmp_path, edit):
    path = save_bundle(model, tmp_path / "b", CLASSES)
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(WingspanError, match="do not match their checksum"):
        load_bundle(path)
    # Without the checksum (an older bundle), a missing class name is still caught.
    manifest.pop("meaning_sha256")
    (path / MANIFEST).write_text(json.dumps(manifest))
    if len(manifest["classes"]["label"]) != 3:
        with pytest.raises(WingspanError, match="3 'label' classes but its manifest names 2"):
            load_bundle(path)


@pytest.mark.parametrize("calibration", [
    {"temperature": 0}, {"temperature": -0.25}, {"temperature": float("nan")},
    {"temperature": "abc"}, {"temperature": True}, None, "1.5"])
def test_a_temperature_that_is_no_positive_number_is_refused(model, tmp_path, calibration):
    """The calibration is outside the checksums (calibrate rewrites it): zero would answer
    NaN, a negative temperature the least likely class. A positive one loads."""
    path = save_bundle(model, tmp_path / "b", CLASSES, calibration={"temperature": 1.5})
    manifest = json.loads((path / MANIFEST).read_text())
    assert load_bundle(path)[1]["calibration"]["temperature"] == 1.5
    (path / MANIFEST).write_text(json.dumps({**manifest, "calibration": calibration}))
    with pytest.raises(WingspanError, match="calibration temperature is .*, not a positive"):
        load_bundle(path)


@pytest.mark.parametrize("manifest", ["[]", "null", '"wingspan"', "3"])
def test_a_manifest_that_is_no_json_object_is_no_bundle(model, tmp_path, manifest):
    path = save_bundle(model, tmp_path / "b", CLASSES)
    (path / MANIFEST).write_text(manifest)
    with pytest.raises(WingspanError, match="not a wingspan model bundle"):
        load_bundle(path)
