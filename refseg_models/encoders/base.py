"""The contract every frozen encoder follows (SAM image encoders and class-consistent backbones).

The feature store and the extraction stage only talk to encoders through this interface:

* ``encoder_id``: stable name of the architecture/config, e.g. ``"sam_vit_b"``, ``"resnet50_v2"``,
  ``"mobilenet_v2"``. Together with the sha256 of the weights file, ``preprocessing_id`` and the dtype
  it forms the feature-set key of a store.
* ``preprocessing_id``: names the exact CPU-side preprocessing, e.g. ``"vrp512_to1024_imagenet"``.
* ``preprocess(image)``: HxWx3 uint8 RGB numpy array -> 3xHxW float32 tensor, deterministic,
  CPU only (it runs in Ray Data's decode tasks, not in the encoder actors).
* ``forward(batch)``: Bx3xHxW float32 (output of ``preprocess``, stacked) -> dict of named feature
  maps, each B x C x h x w. Run under ``torch.no_grad()`` with ``requires_grad_(False)``.
* ``input_size``: side of the square tensor ``preprocess`` returns and ``forward`` expects.
* ``output_shapes()``: {name: (C, h, w)} for one preprocessed image, used to validate stores.

Encoders are built by ``refseg_models.encoders.build_encoder`` and are frozen (eval mode, no grads).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn


@runtime_checkable
class FrozenEncoder(Protocol):
    encoder_id: str
    preprocessing_id: str
    input_size: int

    def preprocess(self, image: np.ndarray) -> torch.Tensor: ...

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def output_shapes(self) -> dict[str, tuple[int, int, int]]: ...


# The three feature taps every class-consistent backbone exposes (VRP-SAM's naming: ResNet stages).
BACKBONE_LAYERS: tuple[str, str, str] = ("layer2", "layer3", "layer4")


class Backbone(nn.Module):
    """Base class of the class-consistent backbones (ResNet-50 variants, VGG-16, MobileNetV2).

    Contract (every method - VRP-SAM, ProSAM, FCP - relies on exactly this):

    * ``encoder_id: str`` and ``preprocessing_id: str`` (see :class:`FrozenEncoder`).
    * ``input_size: int``: side of the square tensor ``preprocess`` returns (512 for VRP-SAM).
    * ``channels: dict[str, int]``: channels of ``"layer2"``, ``"layer3"``, ``"layer4"``.
    * ``preprocess(image)``: HxWx3 uint8 RGB -> 3 x 512 x 512 float32, normalised the way THIS
      backbone's weights expect (ImageNet mean/std, or (x-128)/128 for the TF MobileNetV2), so the
      output goes straight into ``forward``.
    * ``forward(batch)``: B x 3 x H x W -> {"layer2": B x C2 x h2 x w2, "layer3": ..., "layer4": ...}.
    * ``forward_layer4(layer3)``: B x C3 x h3 x w3 -> B x C4 x h4 x w4. VRP-SAM's pseudo mask needs
      layer4 of the MASKED reference layer3, so layer4 must be computable from any layer3 map.

    Backbones are built frozen: eval mode, ``requires_grad_(False)``. ``train()`` is overridden to keep
    them in eval mode (BN statistics must never update, dropout never fire).
    """

    encoder_id: str
    preprocessing_id: str
    input_size: int = 512
    channels: dict[str, int]

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def forward_to_layer3(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """B x 3 x H x W -> {"layer2", "layer3"}."""
        raise NotImplementedError

    def forward_layer4(self, layer3: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.forward_to_layer3(batch)
        return {**feats, "layer4": self.forward_layer4(feats["layer3"])}

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen by contract: a parent module's .train() must not switch BN to batch statistics.
        return super().train(False)

    def output_shapes(self) -> dict[str, tuple[int, int, int]]:
        """{layer: (C, h, w)} for one preprocessed image (a shape-only run on the meta device)."""
        with torch.no_grad():
            meta_copy = self._meta_copy()
            out = meta_copy.forward(torch.zeros(1, 3, self.input_size, self.input_size, device="meta"))
        return {k: tuple(v.shape[1:]) for k, v in out.items()}  # type: ignore[misc]

    def _meta_copy(self) -> "Backbone":
        """A weightless copy of this backbone on the meta device (for shape inference only)."""
        import copy

        return copy.deepcopy(self).to("meta")
