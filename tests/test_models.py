import functools
import http.server
import socket
import threading
import time

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from wingspan.errors import WingspanError
from wingspan.models import BACKBONES, create_classifier, get_spec
from wingspan.models import registry as registry_module
from wingspan.models import weights as weights_module
from wingspan.models.factory import choose_backbone
from wingspan.models.weights import find_offline, resolve_weights


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches; no real download can happen."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for flag in ("HF_HUB_OFFLINE", "WINGSPAN_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    # Downloads are on, from a host that refuses at once: a port bound here and never
    # listened on (a fixed one may be served, or filtered, on some machines).
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        monkeypatch.setattr(registry_module, "TORCHVISION_URL", f"http://127.0.0.1:{port}/")
        monkeypatch.setattr(weights_module, "HF_ENDPOINT", f"http://127.0.0.1:{port}")
        yield tmp_path


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_and_runs_at_a_tiny_size(name):
    model, loaded = create_classifier(name, {"label": 3}, weights="none")
    assert loaded is None
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out["label"].shape == (2, 3)
    assert list(model.backbone.stages)[0] == "stem" and len(model.backbone.stages) >= 5
    assert model.features(torch.randn(1, 3, 32, 32)).shape == (1, model.backbone.num_features)


def test_any_timm_name_passes_through_and_unknown_names_are_explained():
    assert get_spec("mobilenetv3_small_050").timm_name == "mobilenetv3_small_050"
    with pytest.raises(WingspanError, match="(?s)Unknown backbone 'resnet5O'.*resnet50"):
        get_spec("resnet5O")
    assert get_spec("resnet18.a1_in1k").timm_name == "resnet18.a1_in1k"  # a pretrained tag
    with pytest.raises(WingspanError, match="(?s)Invalid pretrained tag.*resnet18.a1_in1k, "):
        get_spec("resnet18.a1_in1kk")
    # A Hub name: "Unknown backbone ... Any timm model name works too" was no help.
    with pytest.raises(WingspanError, match="names from the Hugging Face Hub") as e:
        get_spec("hf-hub:timm/resnet18.a1_in1k")
    assert e.value.hint.startswith("Give the timm name (resnet18.a1_in1k)")


@pytest.mark.parametrize("name", ["runs/butterflies", "../m.pth", "model.safetensors",
                                  "C:\\runs\\x"])
def test_a_path_given_as_the_backbone_points_to_weights(name):
    # `--backbone runs/x` said "Unknown backbone", and for "../m.pth" offered six
    # unrelated names as "similar" (every name begins with its empty stem).
    with pytest.raises(WingspanError, match="is a path, not an architecture") as raised:
        get_spec(name)
    assert f"--weights {name}" in raised.value.hint


def test_a_hub_repositorys_id_is_not_taken_for_a_path():
    # "timm/resnet50.a1_in1k", as its Hub page names it, was said to be a path, with a hint
    # to give it as --weights (no such file).
    with pytest.raises(WingspanError, match="names from the Hugging Face Hub") as raised:
        get_spec("timm/resnet50.a1_in1k")
    assert raised.value.hint.startswith("Give the timm name (resnet50.a1_in1k)")


@pytest.mark.parametrize("typed, meant", [("vit_tiny_patch16", "vit_tiny_patch16_224"),
                                          ("efficientnet_lite", "efficientnet_lite0"),
                                          ("resnt50", "resnet50"), ("ResNet50", "resnet50"),
                                          ("convnext_atoo", "convnext_atto")])
def test_a_mistyped_backbone_is_answered_with_the_name_meant(typed, meant):
    with pytest.raises(WingspanError) as raised:
        get_spec(typed)
    similar = raised.value.hint.split("(similar: ")[1].rstrip(").").split(", ")
    assert meant in similar[:3], similar


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_unfreezing_last_stages_changes_exactly_those_parameters(name):
    model, _ = create_classifier(name, {"label": 2}, weights="none")
    backbone = model.backbone
    stages = list(backbone.stages)
    for n in range(len(stages) + 3):  # more than there are: all of them
        chosen = backbone.unfreeze_last(n)
        assert chosen == stages[max(0, len(stages) - n):] if n else chosen == []
        expected = {p for s in chosen for p in backbone.stages[s]}
        trainable = {k for k, p in backbone.net.named_parameters() if p.requires_grad}
        assert trainable == expected
    # The stages cover every parameter exactly once.
    all_names = [p for names in backbone.stages.values() for p in names]
    assert sorted(all_names) == sorted(k for k, _ in backbone.net.named_parameters())


def _bn_stats_moved_by_a_training_step(model) -> set[str]:
    model.train()
    before = {k: v.clone() for k, v in model.backbone.net.state_dict().items()
              if "running_mean" in k}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 3, 64, 64))["label"].sum().backward()
    optimizer.step()
    after = model.backbone.net.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def test_frozen_batchnorm_statistics_do_not_move_during_training():
    model, _ = create_classifier("resnet18", {"label": 2}, weights="none")
    model.backbone.unfreeze_last(1)  # stage4 trains; everything before is frozen
    assert _bn_stats_moved_by_a_training_step(model) == set()  # default: all BN in eval mode
    assert model.backbone.net.layer4[0].bn1.weight.grad is not None  # yet their affine learns
    model.backbone.train_bn = True  # opt in: unfrozen BN layers use batch statistics
    moved = _bn_stats_moved_by_a_training_step(model)
    assert moved and all(k.startswith("layer4.") for k in moved)
    assert not model.backbone.net.bn1.training and model.backbone.net.layer4[0].bn1.training


# --- weight resolution, each step ------------------------------------------------------

def _torchvision_resnet18_file(path):
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), path)
    return net.eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_explicit_file_in_torchvision_layout(isolated_caches, suffix):
    path = isolated_caches / f"weights{suffix}"
    reference = _torchvision_resnet18_file(isolated_caches / "tv.pth")
    if suffix == ".safetensors":
        save_file(reference.state_dict(), path)
    else:
        path = isolated_caches / "tv.pth"
    model, loaded = create_classifier("resnet18", {"label": 2}, weights=path)
    assert loaded.source == "file"
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.features(x)
        theirs = torch.flatten(reference.avgpool(
            torch.nn.Sequential(*list(reference.children())[:-2])(x)), 1)
    torch.testing.assert_close(ours, theirs)


def test_a_distilled_models_two_imagenet_heads_are_left_out(isolated_caches):
    """DeiT-distilled (and LeViT, ~70 timm models) name two classifiers, ('head',
    'head_dist'): loading their weights crashed on the tuple."""
    import timm

    reference = timm.create_model("deit_tiny_distilled_patch16_224").eval()
    save_file(reference.state_dict(), isolated_caches / "deit.safetensors")
    model, loaded = create_classifier("deit_tiny_distilled_patch16_224", {"label": 2},
                                      weights=isolated_caches / "deit.safetensors")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        theirs = reference.forward_head(reference.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.eval().features(x), theirs)


def test_a_size_a_fixed_size_backbone_cannot_take_is_refused_plainly():
    """LeViT takes its own 224 px only: --image-size 32 ended in a shape error deep in the
    engines' timing; a ViT is resized, and a CNN takes any size."""
    model, _ = create_classifier("levit_128s", {"label": 2}, weights="none")
    with pytest.raises(WingspanError, match="levit_128s cannot run at 32 px") as e:
        model.set_input_size(32, check=True)
    assert "Leave out --image-size (levit_128s is built for 224 px)" in e.value.hint
    for name in ("vit_tiny_patch16_224", "resnet18"):
        model, _ = create_classifier(name, {"label": 2}, weights="none")
        model.set_input_size(48, check=True)
        assert model.eval()(torch.zeros(1, 3, 48, 48))["label"].shape == (1, 2)
    # A ViT at a size its patches do not divide ran, never seeing the pixels left over (at
    # 70 px, the last 6 of each side: the answer did not change when they did).
    with pytest.raises(WingspanError, match="16-pixel patches: at 70 px the last 6 px") as e:
        model, _ = create_classifier("vit_tiny_patch16_224", {"label": 2}, weights="none")
        model.set_input_size(70, check=True)
    assert e.value.hint == "Give --image-size a multiple of 16: 64 or 80."
    # PVTv2's patch_size 7 is a padded stride-4 convolution that sees every pixel.
    model, _ = create_classifier("pvt_v2_b0", {"label": 2}, weights="none")
    model.set_input_size(72, check=True)


def test_torch_hub_cache_then_hf_cache(isolated_caches):
    spec = get_spec("resnet18")
    hub = isolated_caches / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    _torchvision_resnet18_file(hub / spec.torchvision_files[0])
    assert resolve_weights(spec).source == "torch-hub-cache"
    assert find_offline(spec) == "torch-hub-cache"
    (hub / spec.torchvision_files[0]).unlink()
    snap = (isolated_caches / "hf" / f"models--{spec.hf_hub_id.replace('/', '--')}" / "snapshots"
            / "abc123")
    snap.mkdir(parents=True)
    save_file(torchvision.models.resnet18().state_dict(), snap / "model.safetensors")
    assert resolve_weights(spec).source == "hf-cache"


def test_installed_package_weights(isolated_caches):
    loaded = resolve_weights(get_spec("efficientnet_lite0"))
    assert loaded.source == "package" and loaded.location.endswith(".pth")


def test_download_from_a_local_server_then_cache(isolated_caches, monkeypatch):
    spec = get_spec("resnet18")
    served = isolated_caches / "served"
    served.mkdir()
    _torchvision_resnet18_file(served / spec.torchvision_files[0])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(registry_module, "TORCHVISION_URL",
                            f"http://127.0.0.1:{server.server_address[1]}/")
        loaded = resolve_weights(spec)
        assert loaded.source == "download"
        assert resolve_weights(spec).source == "torch-hub-cache"  # kept for next time
    finally:
        server.shutdown()


def test_no_weights_anywhere_gives_a_clear_error(isolated_caches):
    with pytest.raises(WingspanError) as e:
        resolve_weights(get_spec("resnet50"))
    text = str(e.value)
    assert "No pretrained weights for backbone 'resnet50'" in text
    assert "caches: nothing in" in text and "package: none" in text
    assert str(isolated_caches / "hf") in text  # the Hugging Face cache, looked in too
    assert "download: 127.0.0.1 cannot be reached (no network?)" in text
    assert "--weights PATH" in text and "efficientnet_lite2" in text


def test_offline_is_known_at_once_and_the_default_backbone_falls_back(isolated_caches,
                                                                       monkeypatch):
    """No network: one refused connection, no download retries; HF_HUB_OFFLINE skips even
    that. `--backbone auto` is resnet50 when its weights resolve, else the best installed."""
    start = time.perf_counter()
    assert choose_backbone("auto") == ("efficientnet_lite2", "resnet50's ImageNet weights are "
                                       "unavailable (not cached here, and no network to "
                                       "download them): using efficientnet_lite2, whose "
                                       "weights are installed.")
    with pytest.raises(WingspanError, match="cannot be reached"):
        resolve_weights(get_spec("resnet50"))
    assert time.perf_counter() - start < 10  # a user waited 36 s of retries before
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WingspanError, match=r"download: skipped \(HF_HUB_OFFLINE is set\)"):
        resolve_weights(get_spec("resnet50"))
    assert "HF_HUB_OFFLINE is set" in choose_backbone("auto")[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "off")  # as huggingface_hub reads it: not offline
    assert "HF_HUB_OFFLINE" not in choose_backbone("auto")[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert choose_backbone("resnet50") == ("resnet50", "")  # a name is taken as given
    assert choose_backbone("auto", weights="none") == ("resnet50", "")
    hub = isolated_caches / "torch" / "hub" / "checkpoints"  # once cached, it is resnet50
    hub.mkdir(parents=True)
    (hub / get_spec("resnet50").torchvision_files[0]).write_bytes(b"")
    assert choose_backbone("auto") == ("resnet50", "")


def test_the_default_backbone_falls_back_when_its_host_refuses_the_file(isolated_caches,
                                                                         monkeypatch):
    """A proxy that answers but refuses the download (403): still the installed backbone."""
    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(403)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.setattr(registry_module, "TORCHVISION_URL", url + "/")
        monkeypatch.setattr(weights_module, "HF_ENDPOINT", url)
        monkeypatch.setenv("HF_ENDPOINT", url)
        backbone, why = choose_backbone("auto")
    finally:
        server.shutdown()
    assert backbone == "efficientnet_lite2" and "(downloading them failed)" in why


def test_pickled_objects_and_mismatched_weights_are_refused(isolated_caches, monkeypatch):
    evil = isolated_caches / "model.pth"
    torch.save(torchvision.models.resnet18(), evil)  # a whole pickled module, not tensors
    with pytest.raises(WingspanError, match="Pickled model objects are refused") as e:
        resolve_weights(get_spec("resnet18"), evil)
    assert e.value.message.endswith("it holds Python objects other than tensors and plain "
                                    "values (a whole pickled model, say), which are not "
                                    "loaded.")  # not torch's advice to unpickle it
    from helpers import write_image

    photo = write_image(isolated_caches / "photo.jpg", size=(8, 8), seed=0)  # a wrong path
    with pytest.raises(WingspanError, match="photo.jpg: it is no file torch.save wrote"):
        resolve_weights(get_spec("resnet18"), photo)
    _torchvision_resnet18_file(isolated_caches / "r18.pth")
    with pytest.raises(WingspanError, match="do not fit this backbone"):
        create_classifier("resnet34", {"label": 2}, weights=isolated_caches / "r18.pth")
    with pytest.raises(WingspanError, match="not found"):
        resolve_weights(get_spec("resnet18"), isolated_caches / "nope.pth")
    monkeypatch.setenv("HOME", str(isolated_caches))  # a config file's ~/ path
    assert resolve_weights(get_spec("resnet18"), "~/r18.pth").location == str(
        isolated_caches / "r18.pth")
    (isolated_caches / "empty.pth").write_bytes(b"")  # an interrupted copy
    with pytest.raises(WingspanError, match="Cannot load weights from .*empty.pth: the file is "
                                            "empty"):
        resolve_weights(get_spec("resnet18"), isolated_caches / "empty.pth")


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
def test_frozen_stages_split_off_exactly(name):
    from wingspan.models.backbone import Backbone
    from wingspan.models.registry import get_spec

    backbone = Backbone(get_spec(name)).eval()
    x = torch.randn(2, 3, 48, 48)
    backbone.freeze()
    assert backbone.split_frozen() is None  # nothing to train: nothing to split
    backbone.unfreeze_last(2)
    frozen, rest = backbone.split_frozen()
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in rest.parameters() if p.ndim > 1)
    with torch.no_grad():
        torch.testing.assert_close(rest(frozen(x)), backbone(x))
        backbone.train()  # as while fine-tuning: frozen BatchNorm keeps its statistics
        torch.testing.assert_close(rest(frozen.eval()(x)), backbone(x))


def test_dropout_ends_the_frozen_part():
    """Stochastic depth is random in training mode, so it cannot run as a fixed graph."""
    import dataclasses

    from timm.layers import DropPath

    from wingspan.models.backbone import Backbone
    from wingspan.models.registry import get_spec

    spec = dataclasses.replace(get_spec("test_efficientnet"),
                               timm_kwargs={"drop_path_rate": 0.2})
    backbone = Backbone(spec)
    backbone.unfreeze_last(1)
    frozen, rest = backbone.split_frozen()
    assert not any(isinstance(m, DropPath) and m.drop_prob > 0 for m in frozen.modules())
    assert any(isinstance(m, DropPath) and m.drop_prob > 0 for m in rest.modules())


def test_a_network_that_is_not_a_chain_is_not_split():
    from wingspan.models.backbone import Backbone
    from wingspan.models.registry import get_spec

    backbone = Backbone(get_spec("test_vit"))  # adds a position embedding between modules
    backbone.unfreeze_last(1)
    assert backbone.units() is None and backbone.split_frozen() is None


@pytest.mark.parametrize("missing", [AttributeError, AssertionError])
def test_a_network_timm_does_not_group_is_split_by_its_modules(missing, monkeypatch):
    """PoolFormer and PiT have no group_matcher, RDNet's asserts "coarse grouping is not
    implemented": building them stopped every command with a traceback. Their top-level
    modules (each member of a Sequential) in order are the stages."""
    import timm.models.efficientnet as effnet

    from wingspan.models.backbone import Backbone
    from wingspan.models.registry import get_spec

    def refuse(self, coarse=False):
        raise missing("coarse grouping is not implemented")

    monkeypatch.setattr(effnet.EfficientNet, "group_matcher", refuse)
    backbone = Backbone(get_spec("test_efficientnet"))
    named = [n for names in backbone.stages.values() for n in names]
    assert sorted(named) == sorted(n for n, _ in backbone.net.named_parameters())
    assert list(backbone.stages)[:2] == ["stem", "stage1"] and len(backbone.stages) > 3
    assert backbone.stages["stem"][0].startswith("conv_stem")
    assert any(all(n.startswith("blocks.0.") for n in names)  # a Sequential's member
               for names in backbone.stages.values())
    # The modules after the blocks (the final conv and norm) join the last blocks: a stage
    # of a norm alone would train nothing else.
    last = list(backbone.stages.values())[-1]
    assert last[0].startswith("blocks.") and "conv_head.weight" in last and "bn2.weight" in last
    chosen = backbone.unfreeze_last(2)
    trained = {n for n, p in backbone.net.named_parameters() if p.requires_grad}
    assert trained == {n for stage in chosen for n in backbone.stages[stage]} - \
        backbone.unreached()


def test_unreached_parameters_are_found_on_the_networks_own_device():
    """The probe ran a CPU input: on a GPU model it failed, which read as "nothing
    unreached", so a GPU run trained parameters a CPU run kept frozen (and DDP would wait
    for their gradients). The meta device stands in for a GPU here."""
    from wingspan.models.backbone import Backbone
    from wingspan.models.registry import get_spec

    found = []
    for device in ("cpu", "meta"):
        backbone = Backbone(get_spec("test_efficientnet"))
        backbone.net.unused = torch.nn.Linear(2, 2)  # a module the network never calls
        found.append(backbone.to(device).unreached())
    assert found[0] == found[1] == {"unused.weight", "unused.bias"}
    backbone = Backbone(get_spec("test_efficientnet"))
    backbone.net.unused = torch.nn.Linear(2, 2)
    with torch.inference_mode():  # (backward failed there, read as "none unreached")
        assert backbone.unreached() == {"unused.weight", "unused.bias"}
    # A weight used directly, not through its module's call (BEiT's qkv.weight, taken by
    # F.linear), is reached: it trains (a module's call was the test, which missed it).
    class Direct(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.inner.weight, None, self.inner.stride,
                                              self.inner.padding)

    backbone = Backbone(get_spec("test_efficientnet"))
    backbone.net.conv_stem = Direct(backbone.net.conv_stem)
    assert not backbone.unreached()


@pytest.mark.parametrize("name", ["test_convnext", "test_vit_relpos", "test_resnet"])
def test_every_unfrozen_parameter_gets_a_gradient(name):
    """timm groups parts of its head (ConvNeXt's head.norm) with the last stage: the
    pooling (`forward_head(pre_logits=True)`) uses them, so they train; a parameter that
    nothing uses stays frozen (under DDP one without a gradient would stop the run)."""
    from wingspan.models.backbone import Backbone
    from wingspan.models.registry import get_spec

    backbone = Backbone(get_spec(name))
    stages = backbone.unfreeze_last(1)
    assert stages and any(p.requires_grad for p in backbone.parameters())
    size = backbone.net.pretrained_cfg["input_size"][1]
    backbone.train()
    backbone.pool(backbone(torch.randn(2, 3, size, size))).square().mean().backward()
    missing = [n for n, p in backbone.net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
