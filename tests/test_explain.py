"""`wingspan explain`: Grad-CAM overlays that follow what the model looks at."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import tiny

from wingspan.data import read_dataset
from wingspan.errors import WingspanError
from wingspan.training import train


@pytest.fixture(scope="module")
def run_dir(demo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    return train(read_dataset(demo_dir), tiny(tmp, image_size=96, epochs_finetune=0),
                 tmp / "runs", "r", quiet=True)


def test_explain_writes_an_overlay_per_image_and_lists_bad_ones(run_dir, demo_dir, run_cli,
                                                                 tmp_path):
    from wingspan.explain import explain

    images = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))[:2]]
    (tmp_path / "broken.jpg").write_bytes(b"")
    results = explain(run_dir, [*images, str(tmp_path / "broken.jpg")], tmp_path / "out")
    good, bad = results[:2], results[2]
    assert bad.error and "Cannot read image" in bad.error and bad.png is None
    for r in good:
        assert r.png.is_file() and 0 < r.probability <= 1
        assert r.heatmap.shape == (96, 96) and 0 <= r.heatmap.min() <= r.heatmap.max() <= 1
        assert r.heatmap.std() > 0  # a map, not a constant
        with Image.open(r.png) as im:
            assert im.width > 200 and np.asarray(im.convert("RGB")).std() > 10
    code, out, err = run_cli("explain", run_dir, images[0], "--out", tmp_path / "cli")
    assert code == 0, err
    assert len(list((tmp_path / "cli").glob("*.gradcam.png"))) == 1
    assert f"-> {tmp_path / 'cli'}" in " ".join(out.split())  # a line per image
    # -q, as the other commands take it: no line per image, the count and the folder
    code, out, err = run_cli("explain", run_dir, *images, "--out", tmp_path / "q", "-q")
    assert code == 0 and " ".join(out.split()) == f"2 overlays in {tmp_path / 'q'}", (out, err)
    # Nothing explained is a failure; --out at a file is refused before any work.
    code, _, err = run_cli("explain", run_dir, tmp_path / "broken.jpg", "--out", tmp_path / "x")
    assert code == 2 and "No image could be explained" in err
    code, _, err = run_cli("explain", run_dir, tmp_path / "nothing*.jpg")
    assert code == 2 and "No image to explain" in err
    code, _, err = run_cli("explain", run_dir, images[0], "--out", tmp_path / "broken.jpg")
    assert code == 2 and "name a folder to write into" in err  # (in typer's box)
    # Two folders' 0001.jpg: two overlays, neither written over the other.
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "0001.jpg").write_bytes(Path(images[0]).read_bytes())
    same = explain(run_dir, [str(tmp_path / f / "0001.jpg") for f in "aab"], tmp_path / "same")
    assert [r.png.name for r in same] == ["a-0001.gradcam.png", "a-0001-2.gradcam.png",
                                          "b-0001.gradcam.png"]  # each names its folder
    assert len(list((tmp_path / "same").glob("*.gradcam.png"))) == 3
    # A photo's name of 250 bytes (ext4 allows 255), two alike but for their end: both
    # written, under names that fit, not "File name too long" for the whole call.
    long = [tmp_path / "long" / ("🦋" * 60 + end) for end in ("a.jpg", "b.jpg")]
    long[0].parent.mkdir()
    for path in long:
        path.write_bytes(Path(images[0]).read_bytes())
    pngs = [r.png for r in explain(run_dir, list(map(str, long)), tmp_path / "long-out")]
    assert all(p.is_file() and len(p.name.encode()) <= 255 for p in pngs)
    assert len(set(pngs)) == 2
    # A name that is not UTF-8 (a Latin-1 disk): its overlay is written as the others are,
    # not a traceback that left the images after it unexplained.
    latin = Path(os.fsdecode(bytes(tmp_path / "latin") + b"/caf\xe9.jpg"))
    latin.parent.mkdir()
    latin.write_bytes(Path(images[0]).read_bytes())
    done = explain(run_dir, [str(latin), images[1]], tmp_path / "latin-out")
    assert not any(r.error for r in done) and all(r.png.is_file() for r in done)


def test_grad_cam_points_at_the_evidence():
    """A network scoring class 1 by the brightness of the right half, shown an image whose
    right half is a bright butterfly on a black ground: its Grad-CAM for class 1 lights
    up the right half and nothing on the left."""
    import torch
    from torch import nn

    from wingspan.explain import grad_cam

    class Backbone(nn.Conv2d):  # (N, 1, H, W) feature map, "pooled" as its right half
        def pool(self, fmap):
            return fmap[..., fmap.shape[-1] // 2:].mean((2, 3))

        def spatial(self, fmap, prefix=None):
            return fmap

        def units(self):  # (not a chain: its map drawn as it is)
            return None

    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone(3, 1, 1, bias=False)
            nn.init.constant_(self.backbone.weight, 1.0)

        def head(self, pooled):
            right = pooled[:, 0]
            return {"y": torch.stack([-right, right], 1)}

        def forward(self, x):
            return self.head(self.backbone.pool(self.backbone(x)))

    class FakePredictor:
        model, level = Half(), "y"

    x = torch.zeros(3, 16, 16)
    x[:, 4:12, 9:15] = 1.0
    cam = grad_cam(FakePredictor(), x, target=1)
    assert cam[4:12, 9:15].min() > 0.9 and cam[:, :8].max() == 0
    # No gradient is left on the weights (a server explains again and again).
    assert FakePredictor.model.backbone.weight.grad is None
    assert grad_cam(FakePredictor(), x, target=0).max() == 0  # nothing argues for class 0


def test_grad_cam_of_a_vit_that_answers_from_its_class_token_is_drawn():
    """A ViT pooled by its class token: the tokens out of its last block reach the answer
    only through that token, so their gradient was 0 and every map blank. Those into the
    last block are mapped; a network of several feature maps (CrossViT) is refused."""
    import torch

    from wingspan.explain import grad_cam
    from wingspan.models import create_classifier

    torch.manual_seed(0)
    model, _ = create_classifier("test_vit", {"label": 3}, weights="none")
    assert model.backbone.net.global_pool == "token"

    class FakePredictor:
        level = "label"

    FakePredictor.model = model
    size = model.backbone.input_size
    cam = grad_cam(FakePredictor(), torch.randn(3, size, size), target=1)
    assert cam.shape == (size, size) and cam.max() == 1.0 and (cam > 0).mean() > 0.05
    assert not model.backbone.net.blocks[-1]._forward_pre_hooks  # (taken off again)
    # A server explains in several threads with one model: another thread's forward while
    # this one's map is drawn was taken for this one's ("appears to not have been used in
    # the graph"). Here one runs within this one's forward, every time.
    import threading

    def predict_elsewhere():
        with torch.inference_mode():
            model(torch.randn(1, 3, size, size))

    def other_thread_forward(module, args, output):
        if threading.current_thread() is threading.main_thread():
            other = threading.Thread(target=predict_elsewhere)
            other.start()
            other.join()

    meddling = model.backbone.net.blocks[-1].register_forward_hook(other_thread_forward)
    assert grad_cam(FakePredictor(), torch.randn(3, size, size), target=1).max() == 1.0
    meddling.remove()
    model.backbone.forward = lambda x: [x, x]
    with pytest.raises(WingspanError, match="gives 2 feature maps, not one"):
        grad_cam(FakePredictor(), torch.randn(3, size, size), target=1)
    # CaiT's class token joins after its blocks: the tokens into the last are patches alone.
    FakePredictor.model, _ = create_classifier("cait_xxs24_224", {"label": 3}, weights="none")
    assert grad_cam(FakePredictor(), torch.randn(3, 224, 224), target=1).max() == 1.0


def test_explain_decodes_a_large_jpeg_as_predict_does(run_dir, tmp_path, monkeypatch):
    """predict decodes a large JPEG at a reduced scale; explain must see the same pixels,
    or its class and probability can differ from predict's (0.56 against 0.40 on a field
    photo, with a stronger model than this test's)."""
    from wingspan import explain as explain_module
    from wingspan.explain import explain
    from wingspan.inference import Predictor
    from wingspan.predict import predict

    drafts, real = [], explain_module.open_rgb
    monkeypatch.setattr(explain_module, "open_rgb",
                        lambda path, **kw: drafts.append(kw.get("draft")) or real(path, **kw))

    from skimage import data as skdata

    big = tmp_path / "big.jpg"
    Image.fromarray(skdata.astronaut()).resize((1024, 1024)).save(big, quality=90)
    said = predict(Predictor(run_dir, "cpu", "fp32", runtime="torch", workers=0), [str(big)],
                   progress=False).rows[0]
    (shown,) = explain(run_dir, [str(big)], tmp_path / "out")
    assert drafts == [Predictor(run_dir, "cpu").draft]  # predict's reduced decoding
    assert shown.label == said["top"][0][0]
    assert shown.probability == pytest.approx(said["top"][0][1], abs=1e-4)


def test_explain_gives_the_probability_of_predicts_pass_on_its_engine(run_dir, demo_dir):
    """The overlay's probability came from a second pass in fp32 PyTorch, whatever the
    engine predict (and the server) answer with: in bf16 its digits differed from the
    answer's, and the pass cost time. The network now runs once for the answer (on the
    engine) and once for the map (by its parts, with gradients)."""
    import torch

    from wingspan.data.images import open_rgb
    from wingspan.explain import explain_view
    from wingspan.inference import Predictor

    predictor = Predictor(run_dir, "cpu", "bf16", runtime="torch", workers=0)
    x = predictor.views(tta=False)[0](open_rgb(next(demo_dir.glob("*/*.jpg"))))
    calls, forward = [], predictor.model.forward
    predictor.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    explained, title = explain_view(predictor, x)
    outputs = predictor.forward(x[None])[predictor.level][0].float()
    probs = torch.softmax(outputs / predictor.temperature, 0)
    assert explained.probability == pytest.approx(float(probs.max()), abs=1e-6)
    # titled as predict and the served page say it (it said 1.00 beside the page's 99.8%)
    assert title.startswith(f"{explained.label}  {explained.probability:.1%}")
    assert not calls  # no whole pass of the PyTorch model beside the engine's


def test_a_flat_grad_cam_says_what_it_is(tmp_path):
    """At 32 px an EfficientNet's map is one cell, drawn as one colour over the whole image
    (read as evidence everywhere), and a map of zeros as none anywhere: each says so."""
    import numpy as np

    from wingspan.explain import save_overlay
    from wingspan.plotting import flat_note

    assert flat_note(np.ones((32, 32))) == "Grad-CAM: one cell at this image size, no region"
    assert flat_note(np.zeros((32, 32))) == "Grad-CAM: nothing argued for it"
    varied = np.zeros((32, 32))
    varied[4:8, 4:8] = 1
    assert flat_note(varied) == ""
    png = save_overlay(np.zeros((32, 32, 3), np.uint8), np.ones((32, 32)), "monarch 90.0%",
                       None)
    assert png[:4] == b"\x89PNG"


def test_explain_gives_each_overlay_as_it_is_written(run_dir, demo_dir, tmp_path):
    """The command's line per image comes as each is drawn: a run over many photos (or one
    piped to a log, with no bar) said nothing until the last was done."""
    from wingspan.explain import explain_each

    images = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))[:3]]
    each = explain_each(run_dir, images, tmp_path / "out", progress=False)
    first = next(each)
    assert first.path == images[0] and first.png.is_file()
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == [first.png.name]
    assert len([first, *each]) == 3


@pytest.mark.parametrize("size, last, drawn", [(96, 3, 6), (192, 6, 6)])
def test_a_coarse_last_map_is_drawn_from_the_map_a_stride_finer(run_dir, size, last, drawn):
    """A CNN's last map at the demo's 96 px is 3 x 3: its peak fell in a demo butterfly's
    box no more often than chance (20% for a box of 19%), the 6 x 6 map a stride before
    it 70%. Below MIN_MAP_SIDE cells that finer map is drawn; at 6 and above, the last."""
    from wingspan.explain import grad_cam
    from wingspan.inference import Predictor

    predictor = Predictor(run_dir, "cpu", "fp32", runtime="torch", workers=0)
    backbone = predictor.model.backbone
    seen, spatial = [], backbone.spatial
    backbone.spatial = lambda maps, prefix=None: seen.append(maps.shape[-2:]) or spatial(
        maps, prefix)
    features = backbone(torch.zeros(1, 3, size, size))
    assert tuple(features.shape[-2:]) == (last, last)
    heatmap = grad_cam(predictor, torch.randn(3, size, size,
                                              generator=torch.Generator().manual_seed(0)), 0)
    assert heatmap.shape == (size, size)
    assert [tuple(s) for s in seen] == [(drawn, drawn)] * 2  # (the map and its gradient)


def test_a_coarse_maps_evidence_is_placed_by_the_map_a_stride_finer():
    """A chain whose last unit halves a 6 x 6 map to 3 x 3, shown evidence in one cell of
    the 6 x 6 grid (the image's top-left sixth): drawn from the 3 x 3 map, the heat spread
    over the whole top-left third of the image (half of it away from the evidence); from
    the 6 x 6 map, it stays on the evidence."""
    from torch import nn

    from wingspan.explain import grad_cam

    class Chain(nn.Module):  # 12 x 12 image -> 6 x 6 -> 3 x 3 map, pooled as its mean
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 1, 1, bias=False), nn.AvgPool2d(2),
                                     nn.AvgPool2d(2))
            nn.init.constant_(self.net[0].weight, 1.0)

        def forward(self, x):
            return self.net(x)

        def units(self):
            return list(self.net)

        def pool(self, fmap):
            return fmap.mean((2, 3))

        def spatial(self, fmap, prefix=None):
            return fmap

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Chain()

        def head(self, pooled):
            return {"y": torch.cat([-pooled, pooled], 1)}

    class FakePredictor:
        model, level = Model(), "y"

    x = torch.zeros(3, 12, 12)
    x[:, :2, :2] = 1.0  # (the top-left cell of the 6 x 6 grid)
    cam = grad_cam(FakePredictor(), x, target=1)
    assert cam[0, 0] > 0.9
    assert cam[3, 3] < 0.2 and cam[2:4, 2:4].mean() < 0.2  # (the 3 x 3 map's cell, outside)


def test_explain_says_how_many_earlier_overlays_it_replaced(run_dir, demo_dir, tmp_path,
                                                           run_cli):
    """Its folder (RUN/explain by default) keeps every call's overlays, and a photo named as
    one explained before took that overlay's place without a word."""
    images = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))[:2]]
    code, out, err = run_cli("explain", run_dir, images[0], "--out", tmp_path / "x", "-q")
    assert code == 0 and "replaced" not in out, (out, err)
    code, out, err = run_cli("explain", run_dir, *images, "--out", tmp_path / "x", "-q")
    assert code == 0 and " ".join(out.split()) == (
        f"2 overlays in {tmp_path / 'x'} (1 overlay replaced an earlier one of the same "
        "name)"), (out, err)
    code, out, err = run_cli("explain", run_dir, *images, "--out", tmp_path / "x")
    assert code == 0 and "2 overlays replaced earlier ones of the same name in " \
        f"{tmp_path / 'x'}" in " ".join(out.split()), (out, err)


def test_predict_explain_and_evaluate_say_what_a_ctrl_c_left(run_dir, demo_dir, tmp_path,
                                                             run_cli, monkeypatch):
    """Stopped by Ctrl-C (or SIGTERM) they ended 130 without a word, as train and `data
    audit` do not: one line says what was kept."""
    import wingspan.evaluate.run
    import wingspan.explain
    import wingspan.predict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    images = [str(p) for p in sorted(demo_dir.rglob("*.jpg"))[:2]]
    (tmp_path / "old.csv").write_text("path\n")
    monkeypatch.setattr(wingspan.predict, "predict", interrupted)
    code, out, err = run_cli("predict", run_dir, *images, "--output", tmp_path / "old.csv")
    said = " ".join(err.split())
    assert code == 130 and "Stopped: no prediction was shown or written; " \
        f"{tmp_path / 'old.csv'} is as it was" in said, err
    assert (tmp_path / "old.csv").read_text() == "path\n"
    real = wingspan.explain.explain_each

    def one_then_interrupted(*args, **kwargs):
        yield next(real(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(wingspan.explain, "explain_each", one_then_interrupted)
    code, out, err = run_cli("explain", run_dir, *images, "--out", tmp_path / "x", "-q")
    said = " ".join(err.split())
    assert code == 130 and f"Stopped: 1 overlay of 2 written, kept in {tmp_path / 'x'}" \
        in said, err
    assert len(list((tmp_path / "x").glob("*.png"))) == 1
    # Stopped before the first overlay (the model loading): no folder said to keep them
    monkeypatch.setattr(wingspan.explain, "explain_each", interrupted)
    code, out, err = run_cli("explain", run_dir, *images, "--out", tmp_path / "y", "-q")
    said = " ".join(err.split())
    assert code == 130 and "Stopped: 0 overlays of 2 written" in said and "kept" not in said, err
    assert not (tmp_path / "y").exists()
    monkeypatch.setattr(wingspan.evaluate.run, "evaluate", interrupted)
    code, out, err = run_cli("evaluate", run_dir)
    assert code == 130 and "Stopped: this evaluation wrote nothing" in err, err


def test_calibrate_adapt_export_and_split_say_what_a_ctrl_c_left(run_dir, demo_dir, tmp_path,
                                                                 run_cli, monkeypatch):
    """They too ended 130 without a word; each writes its files at the end in one go, so
    a Ctrl-C before leaves the earlier ones as they were, which the line says."""
    import wingspan.data.split
    import wingspan.evaluate.calibrate
    import wingspan.export
    import wingspan.training.adapt

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    manifest = (run_dir / "model" / "manifest.json").read_bytes()
    for module, name, args, said in [
            (wingspan.evaluate.calibrate, "calibrate", [],
             "the model's temperature is as it was"),
            (wingspan.evaluate.calibrate, "fit_unknown", ["--unknown"],
             "the model's unknown scores and thresholds are as they were"),
            (wingspan.training.adapt, "adapt", [str(demo_dir)],
             "no adapted run was written"),
            (wingspan.export, "export_model", [], "nothing was exported")]:
        monkeypatch.setattr(module, name, interrupted)
        command = "export" if name == "export_model" else name.replace("fit_unknown",
                                                                       "calibrate")
        code, out, err = run_cli(command, run_dir, *args)
        assert code == 130 and f"Stopped: {said}" in " ".join(err.split()), (name, err)
    assert (run_dir / "model" / "manifest.json").read_bytes() == manifest
    monkeypatch.setattr(wingspan.data.split, "split_and_sample", interrupted)
    code, out, err = run_cli("data", "split", demo_dir, "--out", tmp_path / "s")
    assert code == 130 and "Stopped: no split was written" in err, err
