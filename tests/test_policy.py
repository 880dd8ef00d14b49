"""The policy's candidates: what the hardware runs natively, narrowed by what is forced."""

import pytest
import torch
from PIL import Image

from wingspan.data.transforms import eval_transform
from wingspan.errors import WingspanError
from wingspan.models import create_imagenet_model, resolve_policy
from wingspan.models import engine as engine_module


@pytest.fixture
def auto(monkeypatch):
    """A CPU-only machine with nothing forced, whatever the environment says."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WINGSPAN_PRECISION", raising=False)
    monkeypatch.delenv("WINGSPAN_RUNTIME", raising=False)

    def cpu(*flags):
        monkeypatch.setattr(engine_module, "cpu_flags", lambda: frozenset(flags))

    return cpu


def names(engines):
    return [e.name for e in engines]


def test_candidates_follow_the_cpu(auto):
    auto("avx2", "fma")  # no bf16 in hardware: emulated bf16 is not worth timing
    policy = resolve_policy()
    assert (policy.device.type, policy.channels_last) == ("cpu", True)
    assert names(policy.frozen_candidates) == ["torch-fp32", "onnx-fp32"]
    assert policy.frozen is None  # two candidates: to be measured
    assert policy.train.engine.name == "torch-fp32"  # the only one: chosen, no timing
    assert "the only candidate" in policy.train.how and "emulated" in policy.train.how
    assert "emulated" in policy.left_out["torch-bf16"]
    for flag in ("avx512_bf16", "amx_bf16"):
        auto("avx2", flag)
        policy = resolve_policy()
        assert names(policy.frozen_candidates) == ["torch-fp32", "torch-bf16", "onnx-fp32"]
        assert names(policy.train_candidates) == ["torch-fp32", "torch-bf16"]
        assert policy.frozen is None and policy.train is None
    assert not resolve_policy(convolutional=False).channels_last


def test_forcing_narrows_the_candidates(auto):
    auto("avx2")
    policy = resolve_policy(precision="bf16")  # emulated here, but the user decides
    assert policy.frozen.engine.name == policy.train.engine.name == "torch-bf16"
    # honoured, but the user learns it is likely slow here, for both kinds of pass
    for choice in (policy.frozen, policy.train):
        assert choice.how.startswith("forced by precision bf16; likely slower than fp32")
        assert "emulated" in choice.how
    assert "likely slower" in policy.describe()
    policy = resolve_policy(runtime="onnx")
    assert policy.frozen.engine.name == "onnx-fp32"
    assert policy.frozen.how == "forced by runtime onnx"
    assert policy.train.engine.name == "torch-fp32"  # training always runs in PyTorch,
    assert policy.train.how.startswith("the only candidate")  # and here bf16 is emulated
    auto("amx_bf16")
    assert resolve_policy(precision="bf16").frozen.how == "forced by precision bf16"  # native
    policy = resolve_policy(runtime="torch")
    assert names(policy.frozen_candidates) == ["torch-fp32", "torch-bf16"]
    assert policy.frozen is None
    policy = resolve_policy(precision="fp32")
    assert names(policy.frozen_candidates) == ["torch-fp32", "onnx-fp32"]
    assert policy.train.engine.name == "torch-fp32"
    assert "onnx-fp32" in policy.describe() and "torch-fp32" in policy.describe()


def test_the_environment_forces_every_auto(auto, monkeypatch):
    auto("avx2")
    monkeypatch.setenv("WINGSPAN_PRECISION", "bf16")
    policy = resolve_policy()
    assert policy.frozen.engine.name == "torch-bf16"
    assert policy.frozen.how.startswith("forced by WINGSPAN_PRECISION=bf16; likely slower")
    assert resolve_policy(precision="fp32").train.engine.name == "torch-fp32"  # the argument wins
    monkeypatch.setenv("WINGSPAN_PRECISION", "fp32")
    monkeypatch.setenv("WINGSPAN_RUNTIME", "onnx")
    policy = resolve_policy()
    assert (policy.frozen.engine.name, policy.train.engine.name) == ("onnx-fp32", "torch-fp32")
    assert "WINGSPAN_RUNTIME=onnx" in policy.describe()
    monkeypatch.setenv("WINGSPAN_PRECISION", "auto")  # the same as unset
    monkeypatch.setenv("WINGSPAN_RUNTIME", "")
    assert resolve_policy().frozen is None
    monkeypatch.setenv("WINGSPAN_RUNTIME", "tvm")
    with pytest.raises(WingspanError, match=r"Unknown runtime 'tvm' \(WINGSPAN_RUNTIME=tvm\)"):
        resolve_policy()
    # A combination nothing runs names the variable that set half of it.
    monkeypatch.setenv("WINGSPAN_RUNTIME", "onnx")
    with pytest.raises(WingspanError, match="set by precision bf16 and WINGSPAN_RUNTIME=onnx"):
        resolve_policy(precision="bf16")
    # What a run records as its own settings (a resumed run keeps them).
    from wingspan.models.policy import settings_with_environment

    monkeypatch.setenv("WINGSPAN_PRECISION", "bf16")
    assert settings_with_environment("auto", "auto") == ("bf16", "onnx")
    assert settings_with_environment("fp32", "torch") == ("fp32", "torch")


def test_policy_errors(auto, monkeypatch):
    auto("avx2")
    with pytest.raises(WingspanError, match="fp16 is not supported on the CPU"):
        resolve_policy(precision="fp16")
    # Where it came from, and advice that holds on this CPU (not bf16, emulated here)
    monkeypatch.setenv("WINGSPAN_PRECISION", "fp16")
    with pytest.raises(WingspanError, match=r"CPU \(WINGSPAN_PRECISION=fp16\)") as e:
        resolve_policy()
    assert e.value.hint.startswith("Use fp32, or auto")
    monkeypatch.delenv("WINGSPAN_PRECISION")
    with pytest.raises(WingspanError, match="no CUDA GPU"):
        resolve_policy(device="cuda")
    # (not "Unknown precision 'fp8' (precision fp8)", the value said twice)
    with pytest.raises(WingspanError, match=r"Unknown precision 'fp8'\.\n"):
        resolve_policy(precision="fp8")
    with pytest.raises(WingspanError, match=r"Unknown runtime 'tvm'\.\n"):
        resolve_policy(runtime="tvm")
    with pytest.raises(WingspanError, match=r"not supported on the CPU\.\n"):
        resolve_policy(precision="fp16")
    with pytest.raises(WingspanError, match="Nothing can run precision bf16 with runtime onnx"):
        resolve_policy(precision="bf16", runtime="onnx")
    monkeypatch.setattr(engine_module, "onnx_available", lambda: False)
    assert names(resolve_policy().frozen_candidates) == ["torch-fp32"]  # still works
    with pytest.raises(WingspanError, match="onnxruntime is not installed"):
        resolve_policy(runtime="onnx")


def test_bf16_agrees_with_fp32_within_tolerance():
    """Stated tolerance: logits' cosine similarity >= 0.99; bf16's top-1 class is among fp32's
    top 3, and the same as fp32's wherever fp32 is confident (probability >= 0.5)."""
    from skimage import data as skdata

    net, _ = create_imagenet_model("efficientnet_lite0")
    transform = eval_transform(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    x = torch.stack([transform(Image.fromarray(im).convert("RGB")) for im in
                     (skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket())])
    fp32 = resolve_policy("cpu", "fp32")
    bf16 = resolve_policy("cpu", "bf16")
    outputs = []
    for policy in (fp32, bf16):
        model = policy.prepare_model(net)
        with torch.inference_mode(), policy.autocast():
            outputs.append(model(policy.prepare_batch(x)).float())
    ref, low = outputs
    assert low.dtype == torch.float32 and not torch.equal(ref, low)  # bf16 really ran
    cosine = torch.nn.functional.cosine_similarity(ref, low, dim=1)
    assert cosine.min() >= 0.99, cosine
    top3 = ref.topk(3, dim=1).indices
    assert all(low.argmax(1)[i] in top3[i] for i in range(len(x)))
    confident = ref.softmax(1).max(1).values >= 0.5
    assert confident.any()
    assert torch.equal(ref.argmax(1)[confident], low.argmax(1)[confident])


def test_a_gpu_the_machine_lacks_is_named_with_those_it_has(monkeypatch):
    """--device cuda:3 on a one-GPU machine passed, then failed in torch ("invalid device
    ordinal"); an Apple GPU is refused as such, and other device types by their name."""
    from wingspan.models.policy import torch_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(WingspanError, match=r"--device cuda:3: this machine has 2 GPUs "
                                            r"\(cuda:0 to cuda:1\)"):
        torch_device("cuda:3")
    assert torch_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(WingspanError, match="an Apple GPU \\(mps\\) is not supported yet"):
        torch_device("mps")
    with pytest.raises(WingspanError, match="xpu devices are not supported yet"):
        torch_device("xpu")
