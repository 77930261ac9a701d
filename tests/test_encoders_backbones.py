"""ResNet-50 (PSPNet resnet50_v2 and torchvision), VGG-16-BN: architecture, strict loading, round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.models import resnet50
from torchvision.models.vgg import cfgs, make_layers

from refseg_models.encoders import CheckpointError, build_encoder
from refseg_models.encoders.transforms import IMAGENET_MEAN, IMAGENET_STD


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights AND BN statistics, so loading mistakes change outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                values = torch.rand(t.shape, generator=gen) * 0.5 + 0.75 if name.endswith("running_var") else (
                    torch.randn(t.shape, generator=gen) * 0.05
                )
                t.copy_(values)
    return module


def _pspnet_resnet50_v2_state_dict() -> dict[str, torch.Tensor]:
    """A resnet50_v2.pth as PSPNet/PFENet publish it, written from the METHODS.md description alone:
    deep stem conv1/bn1/conv2/bn2/conv3/bn3, Bottleneck layers, an fc head, and no
    num_batches_tracked (pre-0.4.1 checkpoint)."""
    gen = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, out_ch, in_ch, k):
        sd[f"{name}.weight"] = torch.randn(out_ch, in_ch, k, k, generator=gen) * (2.0 / (in_ch * k * k)) ** 0.5

    def bn(name, ch):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(ch, generator=gen)
        sd[f"{name}.bias"] = 0.1 * torch.randn(ch, generator=gen)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(ch, generator=gen)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(ch, generator=gen)

    conv("conv1", 64, 3, 3), bn("bn1", 64)
    conv("conv2", 64, 64, 3), bn("bn2", 64)
    conv("conv3", 128, 64, 3), bn("bn3", 128)
    inplanes = 128
    for layer, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
            if b == 0:
                conv(f"{p}.downsample.0", planes * 4, inplanes, 1), bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    sd["fc.weight"] = torch.randn(1000, 2048, generator=gen) * 0.01
    sd["fc.bias"] = torch.zeros(1000)
    return sd


def test_resnet50_v2_loads_the_pspnet_checkpoint_layout(tmp_path):
    path = tmp_path / "resnet50_v2.pth"
    torch.save(_pspnet_resnet50_v2_state_dict(), path)
    backbone = build_encoder("resnet50_v2", path)
    loaded = backbone.state_dict()
    reference = torch.load(path, weights_only=True)
    for key, value in reference.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert sum(p.numel() for p in backbone.parameters()) == 23_631_808


def test_resnet50_v2_is_pspnet_dilated_everywhere():
    backbone = build_encoder("resnet50_v2", allow_random_init=True)
    # PFENet/VRP-SAM dilate every block of layer3/4, the first one included (torchvision's
    # replace_stride_with_dilation would leave layer3.0.conv2 at dilation 1).
    for name, dilation in (("layer3", 2), ("layer4", 4)):
        for block in getattr(backbone, name):
            assert block.conv2.dilation == (dilation, dilation) and block.conv2.padding == (dilation, dilation)
            assert block.conv2.stride == (1, 1)
        assert getattr(backbone, name)[0].downsample[0].stride == (1, 1)
    assert backbone.conv1.stride == (2, 2) and backbone.conv3.out_channels == 128
    assert backbone.layer1[0].conv1.in_channels == 128
    assert all(m.bias is None for m in backbone.modules() if isinstance(m, torch.nn.Conv2d))


def test_resnet50_v2_strict_errors(tmp_path):
    sd = _pspnet_resnet50_v2_state_dict()
    broken = {k: v for k, v in sd.items() if k != "layer3.2.conv2.weight"}
    broken["aux.cls.weight"] = torch.zeros(3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as info:
        build_encoder("resnet50_v2", tmp_path / "broken.pth")
    message = str(info.value)
    assert "broken.pth" in message
    assert "missing keys (1): layer3.2.conv2.weight" in message
    assert "unexpected keys (1): aux.cls.weight" in message
    # A torchvision ResNet-50 file is the classic wrong file: it must not load.
    torch.save(resnet50(weights=None).state_dict(), tmp_path / "torchvision_resnet50.pth")
    with pytest.raises(CheckpointError, match=r"conv1.weight: checkpoint \(64, 3, 7, 7\) vs model \(64, 3, 3, 3\)"):
        build_encoder("resnet50_v2", tmp_path / "torchvision_resnet50.pth")


def test_torchvision_checkpoints_load_into_resnet50_tv_and_vgg16(tmp_path):
    x = torch.randn(1, 3, 64, 64)
    # vgg16_bn's feature extractor from torchvision's own builder (its 120M-parameter head is not needed).
    vgg = torch.nn.Module()
    vgg.features = make_layers(cfgs["D"], batch_norm=True)
    for name, net in (("resnet50_tv", resnet50(weights=None)), ("vgg16", vgg)):
        net = _randomise(net).eval()
        path = tmp_path / f"{name}.pth"
        state = net.state_dict()
        if name == "vgg16":  # the (ignored) classifier head, as one small stand-in key
            state["classifier.6.bias"] = torch.zeros(1000)
        torch.save(state, path)
        backbone = build_encoder(name, path)
        with torch.no_grad():
            feats = backbone(x)
            if name == "resnet50_tv":
                ref = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
                torch.testing.assert_close(feats["layer4"], ref)
            else:
                ref = net.features[:43](x)  # PFENet's layer4 ends before the last max-pool
                torch.testing.assert_close(feats["layer4"], ref)
                torch.testing.assert_close(feats["layer2"], net.features[:24](x))


@pytest.mark.parametrize("name", ["resnet50_v2", "resnet50_tv", "vgg16", "mobilenet_v2"])
def test_save_load_round_trip(name, tmp_path):
    torch.manual_seed(0)
    original = _randomise(build_encoder(name, allow_random_init=True))
    path = tmp_path / f"{name}.pth"
    torch.save(original.state_dict(), path)
    reloaded = build_encoder(name, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = original(x), reloaded(x)
        layer4_from_layer3 = reloaded.forward_layer4(a["layer3"])
    for key in ("layer2", "layer3", "layer4"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    torch.testing.assert_close(layer4_from_layer3, a["layer4"], rtol=0, atol=0)


@pytest.mark.real_data
def test_backbone_preprocess_is_vrp_sams_transform(coco_mini_dir):
    info = json.loads((coco_mini_dir / "instances.json").read_text())
    image = np.asarray(Image.open(coco_mini_dir / "images" / info["images"][2]["file_name"]).convert("RGB"))
    authors = T.Compose([T.Resize((512, 512)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = authors(Image.fromarray(image))
    for name in ("resnet50_v2", "resnet50_tv", "vgg16"):
        x = build_encoder(name, allow_random_init=True).preprocess(image)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    # MobileNetV2: same squash, its own (x - 128) / 128 scaling; a hand-computed pixel.
    x = build_encoder("mobilenet_v2", allow_random_init=True).preprocess(image)
    resized = np.asarray(Image.fromarray(image).resize((512, 512), Image.BILINEAR))
    assert x[0, 300, 17].item() == (float(resized[300, 17, 0]) - 128.0) / 128.0
