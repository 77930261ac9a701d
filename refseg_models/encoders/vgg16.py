"""VGG-16 (with batch norm) backbone, tapped as PFENet / VRP-SAM do.

PFENet's ``get_vgg16_layer`` (reused by VRP-SAM for its VGG-16 results) uses torchvision's
``vgg16_bn`` and splits ``features`` as layer0 = [0, 7), layer1 = [7, 14), layer2 = [14, 24),
layer3 = [24, 34), layer4 = [34, 43) - layer4 stops before the last max-pool. Hence:

    layer2: 256 ch, stride 8  (64 x 64 at 512)   after conv3_3 + pool3
    layer3: 512 ch, stride 16 (32 x 32 at 512)   after conv4_3 + pool4
    layer4: 512 ch, stride 16 (32 x 32 at 512)   conv5_3 + ReLU, no pool5

(VRP-SAM then uses 256 + 512 = 768 channels for its ``down`` conv with VGG.) The registry name is
``vgg16`` but the network is ``vgg16_bn``, the variant those authors use. Checkpoint: torchvision's
``vgg16_bn`` layout (``features.N.*``), loaded strictly ignoring only ``classifier.*``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from refseg_models.encoders.base import Backbone
from refseg_models.encoders.checkpoint import freeze, load_state_dict_strict, read_state_dict
from refseg_models.encoders.transforms import vrp_squash_imagenet

_TAPS = {"layer2": (0, 24), "layer3": (24, 34), "layer4": (34, 43)}


class VGG16Backbone(Backbone):
    encoder_id = "vgg16"
    preprocessing_id = "vrp512_squash_imagenet"

    def __init__(self, input_size: int = 512) -> None:
        super().__init__()
        # torchvision's vgg16_bn feature extractor (config "D" with BN), built without the 120M-parameter
        # classifier head that the backbone never uses; same module indices, so same state-dict keys.
        self.features: nn.Sequential = make_layers(cfgs["D"], batch_norm=True)
        self.input_size = input_size
        # the id names the size: a store of 128-pixel features must never pass for a 512 one
        self.preprocessing_id = f"vrp{input_size}_squash_imagenet"
        self.channels = {"layer2": 256, "layer3": 512, "layer4": 512}
        freeze(self)

    def _run(self, x: torch.Tensor, tap: str) -> torch.Tensor:
        start, stop = _TAPS[tap]
        for layer in self.features[start:stop]:
            x = layer(x)
        return x

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 -> 3 x 512 x 512, VRP-SAM's squash + ImageNet mean/std."""
        return vrp_squash_imagenet(image, self.input_size)

    def forward_to_layer3(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        layer2 = self._run(batch, "layer2")
        return {"layer2": layer2, "layer3": self._run(layer2, "layer3")}

    def forward_layer4(self, layer3: torch.Tensor) -> torch.Tensor:
        return self._run(layer3, "layer4")


def build_vgg16_backbone(checkpoint: str | Path | None, input_size: int = 512) -> VGG16Backbone:
    """VGG-16-BN, strictly loaded from ``checkpoint`` ignoring only ``classifier.*``."""
    backbone = VGG16Backbone(input_size=input_size)
    if checkpoint is not None:
        load_state_dict_strict(backbone, read_state_dict(checkpoint), str(checkpoint), ignore_prefixes=("classifier.",))
    return backbone
