"""torchvision's ResNet-50 as a backbone (native strides: layer2 /8, layer3 /16, layer4 /32).

This is NOT VRP-SAM's backbone (see ``resnet50_v2``): single 7x7 stem, no dilation. It exists for
comparisons and for users holding torchvision's ImageNet weights (``resnet50-*.pth``, loaded
strictly ignoring only ``fc.*``). At 512 input: layer2 512 x 64 x 64, layer3 1024 x 32 x 32,
layer4 2048 x 16 x 16; methods resize layer2 to layer3's size as VRP-SAM does for such backbones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.models import resnet50

from refseg_models.encoders.base import Backbone
from refseg_models.encoders.checkpoint import freeze, load_state_dict_strict, read_state_dict
from refseg_models.encoders.transforms import vrp_squash_imagenet


class ResNet50TVBackbone(Backbone):
    encoder_id = "resnet50_tv"
    preprocessing_id = "vrp512_squash_imagenet"

    def __init__(self, input_size: int = 512) -> None:
        super().__init__()
        net = resnet50(weights=None)
        # Same attribute names as torchvision's ResNet, so its checkpoints load (minus fc.*).
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.input_size = input_size
        # the id names the size: a store of 128-pixel features must never pass for a 512 one
        self.preprocessing_id = f"vrp{input_size}_squash_imagenet"
        self.channels = {"layer2": 512, "layer3": 1024, "layer4": 2048}
        freeze(self)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 -> 3 x 512 x 512, VRP-SAM's squash + ImageNet mean/std."""
        return vrp_squash_imagenet(image, self.input_size)

    def forward_to_layer3(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(batch))))
        layer2 = self.layer2(self.layer1(x))
        return {"layer2": layer2, "layer3": self.layer3(layer2)}

    def forward_layer4(self, layer3: torch.Tensor) -> torch.Tensor:
        return self.layer4(layer3)


def build_resnet50_tv_backbone(checkpoint: str | Path | None, input_size: int = 512) -> ResNet50TVBackbone:
    """torchvision ResNet-50, strictly loaded from ``checkpoint`` ignoring only ``fc.*``."""
    backbone = ResNet50TVBackbone(input_size=input_size)
    if checkpoint is not None:
        load_state_dict_strict(backbone, read_state_dict(checkpoint), str(checkpoint), ignore_prefixes=("fc.",))
    return backbone
