"""MobileNetV2 (real ImageNet weights, TF padding) - classifier check images and backbone taps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models import mobilenet_v2

from refseg_models.encoders.mobilenet_v2 import (
    Conv2dTFSame,
    build_mobilenet_v2_backbone,
    build_mobilenet_v2_tf,
    tf_scale,
)

# ../shared/weights/README.md: expected top-1 label and probability for each check image.
EXPECTED = {
    "coral_grace_hopper.bmp": ("military uniform", 0.906),
    "coral_cat.bmp": ("Egyptian cat", 0.73),
    "coral_parrot.jpg": ("macaw", 1.00),
}


@pytest.fixture(scope="module")
def classifier(mobilenet_v2_weights):
    return build_mobilenet_v2_tf(mobilenet_v2_weights)


def _check_input(path) -> torch.Tensor:
    # Coral's classify example: PIL LANCZOS resize to the 224x224 model input.
    image = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.LANCZOS))
    return tf_scale(image)[None]


def _labels(check_dir) -> list[str]:
    lines = (check_dir / "coral_imagenet_labels.txt").read_text().splitlines()
    assert lines[0] == "background" and len(lines) == 1001
    return lines


@pytest.mark.real_weights
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_check_images_classify_as_readme_says(classifier, mobilenet_check_dir, name):
    labels = _labels(mobilenet_check_dir)
    with torch.no_grad():
        probs = classifier(_check_input(mobilenet_check_dir / name)).softmax(-1)[0]
    prob, index = probs.max(0)
    label, expected_prob = EXPECTED[name]
    assert labels[index.item() + 1].split(",")[0] == label  # index 0 of the label file = background
    assert prob.item() == pytest.approx(expected_prob, abs=0.02)


@pytest.mark.real_weights
def test_symmetric_padding_loses_accuracy(mobilenet_v2_weights, mobilenet_check_dir):
    """README: without TF padding grace_hopper drops from 0.906 to about 0.26."""
    plain = mobilenet_v2(weights=None, num_classes=1000).eval()
    plain.load_state_dict(torch.load(mobilenet_v2_weights, weights_only=True), strict=True)
    with torch.no_grad():
        prob = plain(_check_input(mobilenet_check_dir / "coral_grace_hopper.bmp")).softmax(-1)[0].max()
    assert prob.item() < 0.5


def test_tf_same_padding_matches_right_bottom_zero_pad():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    same = Conv2dTFSame.from_conv(conv)
    assert same.padding == (0, 0) and conv.padding == (1, 1)  # the source conv is untouched
    x = torch.randn(2, 4, 10, 12)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(same(x), expected)
    # Odd size: TF pads 1 on both sides (total 2), i.e. torchvision's symmetric padding.
    x_odd = torch.randn(1, 4, 11, 9)
    torch.testing.assert_close(same(x_odd), conv(x_odd))


def test_state_dict_keys_are_torchvisions():
    ours = build_mobilenet_v2_tf(None)
    reference = mobilenet_v2(weights=None, num_classes=1000)
    assert list(ours.state_dict()) == list(reference.state_dict())
    n_same = sum(isinstance(m, Conv2dTFSame) for m in ours.modules())
    assert n_same == 5  # the stem conv and the four stride-2 depthwise convs
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.real_data
@pytest.mark.real_weights
def test_backbone_taps_on_a_real_image(mobilenet_v2_weights, coco_mini_dir):
    backbone = build_mobilenet_v2_backbone(mobilenet_v2_weights)
    info = json.loads((coco_mini_dir / "instances.json").read_text())
    image_path = coco_mini_dir / "images" / info["images"][0]["file_name"]
    if not image_path.exists():
        image_path = next(coco_mini_dir.rglob(info["images"][0]["file_name"]))
    image = np.asarray(Image.open(image_path).convert("RGB"))
    x = backbone.preprocess(image)
    assert x.shape == (3, 512, 512) and x.dtype == torch.float32
    assert -1.0 <= x.min().item() and x.max().item() <= 127 / 128
    with torch.no_grad():
        feats = backbone(x[None])
        layer4_again = backbone.forward_layer4(feats["layer3"])
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "layer2": (1, 32, 64, 64),
        "layer3": (1, 96, 32, 32),
        "layer4": (1, 1280, 16, 16),
    }
    assert backbone.channels == {"layer2": 32, "layer3": 96, "layer4": 1280}
    torch.testing.assert_close(layer4_again, feats["layer4"])
    # The taps are the classifier's own features: pooled layer4 -> classifier = full network.
    classifier = build_mobilenet_v2_tf(mobilenet_v2_weights)
    with torch.no_grad():
        via_taps = classifier.classifier(feats["layer4"].mean((2, 3)))
        direct = classifier(x[None])
    torch.testing.assert_close(via_taps, direct, rtol=1e-4, atol=1e-4)
    # Frozen: a parent's .train() must not put BN back into training mode.
    backbone.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())


# Two coco_mini images per class where the class covers > 20% of the image.
SEMANTIC_IMAGES = {
    "giraffe": ["000000000072.jpg", "000000057345.jpg"],
    "zebra": ["000000104455.jpg", "000000000034.jpg"],
    "airplane": ["000000221184.jpg", "000000000247.jpg"],
    "pizza": ["000000000194.jpg", "000000000450.jpg"],
    "elephant": ["000000519208.jpg", "000000000263.jpg"],
    "bus": ["000000143931.jpg", "000000359937.jpg"],
}


@pytest.mark.real_data
@pytest.mark.real_weights
def test_layer4_prototypes_are_class_consistent(mobilenet_v2_weights, coco_mini_dir):
    """What VRP-SAM uses the backbone for: masked-average layer4 prototypes of real COCO instances
    find their own class as nearest neighbour (measured 12/12; random features do not)."""
    from pycocotools.coco import COCO

    coco = COCO(str(coco_mini_dir / "instances.json"))
    by_name = {info["file_name"]: info for info in coco.dataset["images"]}
    backbone = build_mobilenet_v2_backbone(mobilenet_v2_weights)
    prototypes, labels = [], []
    for class_name, files in SEMANTIC_IMAGES.items():
        cat_id = coco.getCatIds(catNms=[class_name])[0]
        for file_name in files:
            info = by_name[file_name]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=info["id"], catIds=[cat_id], iscrowd=False))
            mask = np.zeros((info["height"], info["width"]), np.uint8)
            for ann in anns:
                mask |= coco.annToMask(ann)
            image = np.asarray(Image.open(coco_mini_dir / "images" / file_name).convert("RGB"))
            with torch.no_grad():
                layer4 = backbone(backbone.preprocess(image)[None])["layer4"]
            m = F.interpolate(torch.from_numpy(mask)[None, None].float(), layer4.shape[-2:], mode="nearest")
            prototypes.append(((layer4 * m).sum((2, 3)) / (m.sum() + 5e-4))[0])
            labels.append(class_name)
    p = F.normalize(torch.stack(prototypes), dim=1)
    similarity = p @ p.T
    similarity.fill_diagonal_(-2.0)
    nearest = similarity.argmax(1).tolist()
    correct = sum(labels[i] == labels[j] for i, j in enumerate(nearest))
    assert correct >= 11, f"only {correct}/12 prototypes have a same-class nearest neighbour"
