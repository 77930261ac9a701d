"""PSPNet-style "resnet50_v2": VRP-SAM's class-consistent backbone (deep stem, dilated layer3/4).

Architecture (semseg/PFENet ``resnet50(deep_base=True)`` as VRP-SAM uses it):

* stem ``layer0``: conv1 (3->64, 3x3, stride 2) + bn1 + ReLU, conv2 (64->64, 3x3) + bn2 + ReLU,
  conv3 (64->128, 3x3) + bn3 + ReLU, max-pool 3x3 stride 2 (padding 1); 3x3 convs without bias.
* layer1..layer4: torchvision-style Bottlenecks (stride on the 3x3 conv), 3/4/6/3 blocks, layer1
  starting from 128 channels.
* PFENet/VRP-SAM dilate EVERY block of layer3 (dilation 2) and layer4 (dilation 4) and set the
  strides of their 3x3 convs and downsample convs to 1 (note: torchvision's
  ``replace_stride_with_dilation`` keeps dilation 1 in the first block of each stage, which is a
  different network). Output stride 8: at 512 input layer2/3/4 are all 64 x 64 (512/1024/2048 ch).

Checkpoint: ``resnet50_v2.pth`` (PSPNet ImageNet weights), keys ``conv1..3``, ``bn1..3``,
``layer1..4.*``, optional ``fc.*``. The authors load it with ``strict=False``; we load strictly,
ignoring only ``fc.*``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from refseg_models.encoders.base import Backbone
from refseg_models.encoders.checkpoint import freeze, load_state_dict_strict, read_state_dict
from refseg_models.encoders.transforms import vrp_squash_imagenet


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def make_bottleneck_stage(inplanes: int, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    """``blocks`` torchvision Bottlenecks; every block uses ``dilation`` (PSPNet style)."""
    downsample = None
    if stride != 1 or inplanes != planes * Bottleneck.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * Bottleneck.expansion),
        )
    layers = [Bottleneck(inplanes, planes, stride=stride, downsample=downsample, dilation=dilation)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes, dilation=dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet50V2Backbone(Backbone):
    """Deep-stem, output-stride-8 ResNet-50. Taps: layer2 512 ch, layer3 1024 ch, layer4 2048 ch,
    all at 1/8 of the input (64 x 64 for 512)."""

    encoder_id = "resnet50_v2"
    preprocessing_id = "vrp512_squash_imagenet"

    def __init__(self, input_size: int = 512) -> None:
        super().__init__()
        self.input_size = input_size
        # the id names the size: a store of 128-pixel features must never pass for a 512 one
        self.preprocessing_id = f"vrp{input_size}_squash_imagenet"
        self.channels = {"layer2": 512, "layer3": 1024, "layer4": 2048}
        self.conv1 = _conv3x3(3, 64, stride=2)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = _conv3x3(64, 64)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = _conv3x3(64, 128)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_bottleneck_stage(128, 64, 3, stride=1, dilation=1)
        self.layer2 = make_bottleneck_stage(256, 128, 4, stride=2, dilation=1)
        self.layer3 = make_bottleneck_stage(512, 256, 6, stride=1, dilation=2)
        self.layer4 = make_bottleneck_stage(1024, 512, 3, stride=1, dilation=4)
        freeze(self)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 -> 3 x 512 x 512, VRP-SAM's squash + ImageNet mean/std."""
        return vrp_squash_imagenet(image, self.input_size)

    def forward_to_layer3(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(batch)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        layer2 = self.layer2(self.layer1(self.maxpool(x)))
        return {"layer2": layer2, "layer3": self.layer3(layer2)}

    def forward_layer4(self, layer3: torch.Tensor) -> torch.Tensor:
        return self.layer4(layer3)


def build_resnet50_v2_backbone(checkpoint: str | Path | None, input_size: int = 512) -> ResNet50V2Backbone:
    """VRP-SAM's resnet50_v2, strictly loaded from ``checkpoint`` ignoring only ``fc.*``."""
    backbone = ResNet50V2Backbone(input_size=input_size)
    if checkpoint is not None:
        load_state_dict_strict(backbone, read_state_dict(checkpoint), str(checkpoint), ignore_prefixes=("fc.",))
    return backbone
