import pytest
import torch
from PIL import Image

from wingspan.data.transforms import eval_transform
from wingspan.errors import WingspanError
from wingspan.models import create_imagenet_model, resolve_policy
from wingspan.models import precision as precision_module


def test_policy_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    policy = resolve_policy()
    assert (policy.device.type, policy.precision, policy.channels_last) == ("cpu", "bf16", True)
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"avx2"}))
    assert resolve_policy().precision == "fp32"  # emulated bf16 would be slower
    assert resolve_policy(precision="bf16").precision == "bf16"  # the user decides
    assert not resolve_policy(convolutional=False).channels_last


def test_policy_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WingspanError, match="fp16 is not supported on the CPU"):
        resolve_policy(precision="fp16")
    with pytest.raises(WingspanError, match="no CUDA GPU"):
        resolve_policy(device="cuda")
    with pytest.raises(WingspanError, match="Unknown precision 'fp8'"):
        resolve_policy(precision="fp8")


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
