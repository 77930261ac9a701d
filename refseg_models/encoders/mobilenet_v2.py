"""MobileNetV2 with TensorFlow "SAME" padding: the one real ImageNet backbone at hand.

The weights (``../shared/weights/mobilenet_v2_imagenet.pth``) are a torchvision
``mobilenet_v2(num_classes=1000)`` state dict converted from Google Coral's TFLite model. Two
details differ from torchvision's own MobileNetV2 and both matter for accuracy:

1. input scaling ``(x - 128) / 128`` on RGB in [0, 255] (not ImageNet mean/std);
2. TF "SAME" padding for the stride-2 convolutions: on even-sized inputs that is (left 0, right 1,
   top 0, bottom 1) instead of torchvision's symmetric padding 1.

torchvision is not modified: after building its model we replace each stride-2 ``nn.Conv2d`` in our
own module tree by :class:`Conv2dTFSame`, a ``Conv2d`` subclass with identical parameters (so the
state-dict keys stay torchvision's) whose forward pads like TensorFlow.

Backbone taps (stride for a 512 input):
    layer2 = features[:7]   -> 32 ch, stride 8  (64 x 64)
    layer3 = features[7:14] -> 96 ch, stride 16 (32 x 32)
    layer4 = features[14:]  -> 1280 ch, stride 32 (16 x 16)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2

from refseg_models.encoders.base import Backbone
from refseg_models.encoders.checkpoint import freeze, load_state_dict_strict, read_state_dict
from refseg_models.encoders.transforms import tf128_squash, to_chw_float

TF_INPUT_MEAN = 128.0
TF_INPUT_STD = 128.0


class Conv2dTFSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size.

    TF pads ``total = max((ceil(in / s) - 1) * s + (k - 1) * d + 1 - in, 0)`` per axis, the smaller
    half before and the larger half after. For a 3x3 stride-2 conv on an even-sized input that is
    (0, 1): one zero column/row on the right/bottom only.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "Conv2dTFSame":
        """A TF-SAME copy of ``conv`` (same hyper-parameters, weights copied, ``conv`` untouched)."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=0,
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
        )
        new.load_state_dict(conv.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s, d in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), reversed(self.dilation)
        ):  # F.pad order: last dim (width) first
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return self._conv_forward(F.pad(x, pads), self.weight, self.bias)


def _with_tf_same_padding(model: nn.Module) -> nn.Module:
    """Replace every strided ``nn.Conv2d`` of ``model`` (our freshly built instance) by ``Conv2dTFSame``."""
    strided = [
        name for name, m in model.named_modules() if type(m) is nn.Conv2d and m.stride != (1, 1)
    ]
    for name in strided:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Conv2dTFSame.from_conv(getattr(parent, child)))
    return model


def build_mobilenet_v2_tf(checkpoint: str | Path | None) -> nn.Module:
    """torchvision ``mobilenet_v2(num_classes=1000)`` with TF-SAME padding, loaded strictly from
    ``checkpoint`` (``None``: random init, for tests/benchmarks only). Frozen.

    Input: B x 3 x H x W scaled by ``(x - 128) / 128``; output: B x 1000 ImageNet logits (torchvision
    class order; Coral's label file has background at index 0, so label index = class index + 1).
    """
    model = _with_tf_same_padding(mobilenet_v2(weights=None, num_classes=1000))
    if checkpoint is not None:
        load_state_dict_strict(model, read_state_dict(checkpoint), source=str(checkpoint))
    return freeze(model)


def tf_scale(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 ``(x - 128) / 128``."""
    return (to_chw_float(image) - TF_INPUT_MEAN) / TF_INPUT_STD


# Index ranges of torchvision's ``features`` for the three taps.
_TAPS = {"layer2": (0, 7), "layer3": (7, 14), "layer4": (14, 19)}


class MobileNetV2Backbone(Backbone):
    """Real-weights MobileNetV2 backbone: layer2 32 ch /8, layer3 96 ch /16, layer4 1280 ch /32.

    Holds torchvision's ``features`` module unchanged (state-dict keys ``features.*``, so the
    classifier checkpoint loads with only ``classifier.*`` ignored, and a saved backbone loads back).
    """

    encoder_id = "mobilenet_v2"
    preprocessing_id = "vrp512_squash_tf128"

    def __init__(self, features: nn.Sequential, input_size: int = 512) -> None:
        super().__init__()
        self.features = features
        self.input_size = input_size
        # the id names the size: a store of 128-pixel features must never pass for a 512 one
        self.preprocessing_id = f"vrp{input_size}_squash_tf128"
        self.channels = {"layer2": 32, "layer3": 96, "layer4": 1280}
        freeze(self)

    def _run(self, x: torch.Tensor, tap: str) -> torch.Tensor:
        start, stop = _TAPS[tap]
        for block in self.features[start:stop]:
            x = block(x)
        return x

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 -> 3 x 512 x 512: VRP-SAM's PIL-bilinear squash, then ``(x - 128) / 128``."""
        return tf128_squash(image, self.input_size)

    def forward_to_layer3(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        layer2 = self._run(batch, "layer2")
        return {"layer2": layer2, "layer3": self._run(layer2, "layer3")}

    def forward_layer4(self, layer3: torch.Tensor) -> torch.Tensor:
        return self._run(layer3, "layer4")


def build_mobilenet_v2_backbone(checkpoint: str | Path | None, input_size: int = 512) -> MobileNetV2Backbone:
    """The MobileNetV2 backbone from a torchvision-layout state dict (``None``: random init).

    Loads strictly, ignoring only ``classifier.*`` (the unused ImageNet head)."""
    features = _with_tf_same_padding(mobilenet_v2(weights=None, num_classes=1000)).features
    backbone = MobileNetV2Backbone(features, input_size=input_size)
    if checkpoint is not None:
        load_state_dict_strict(backbone, read_state_dict(checkpoint), str(checkpoint), ignore_prefixes=("classifier.",))
    return backbone
