"""The offline ImageNet weights must see what a person sees (slowest part of the suite)."""

import pytest
import torch
from timm.data import ImageNetInfo

from wingspan.config import AugmentConfig
from wingspan.data.images import open_rgb
from wingspan.data.transforms import eval_transform
from wingspan.models import create_classifier, create_imagenet_model

MONARCH = 323
CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _predict(name, images):
    net, loaded = create_imagenet_model(name)
    assert loaded.source == "package"
    pre = create_classifier(name, {"x": 1}, weights="none")[0].preprocessing
    transform = eval_transform(AugmentConfig(image_size=pre.input_size, eval_crop=pre.crop_pct),
                               pre.mean, pre.std, interpolation=pre.interpolation)
    logits = []
    with torch.inference_mode():
        for i in range(0, len(images), 16):
            logits.append(net(torch.stack([transform(im) for im in images[i:i + 16]])))
    return torch.cat(logits)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_offline_weights_recognise_monarchs_and_a_cat(shared_data, name):
    from PIL import Image
    from skimage import data as skdata

    monarchs = sorted((shared_data / "leeds-butterflies" / "001-danaus_plexippus").glob("*.jpg"))
    assert len(monarchs) == 82
    images = [open_rgb(p) for p in monarchs] + [Image.fromarray(skdata.chelsea())]
    logits = _predict(name, images)
    top1 = logits[:-1].argmax(1)
    share = (top1 == MONARCH).float().mean().item()
    assert share >= 0.9, f"{name}: only {share:.0%} of monarchs seen as monarchs"
    cat_top5 = set(logits[-1].topk(5).indices.tolist())
    info = ImageNetInfo()
    assert cat_top5 & CATS, [info.index_to_description(i) for i in cat_top5]
    print(f"{name}: {share:.1%} of {len(monarchs)} monarchs top-1; cat top-5: "
          f"{[info.index_to_description(i).split(',')[0] for i in cat_top5]}")
