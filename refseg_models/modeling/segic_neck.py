"""SegIC's neck: frozen-encoder features (C channels) -> the decoder's 256-d image embedding."""

from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class SegICNeck(nn.Module):
    """1x1 conv C->256 (no bias) + LayerNorm2d + 3x3 conv 256->256 (no bias) + LayerNorm2d.

    Exactly the authors' ``neck`` (``model/backbone/__init__.py``), trained from scratch.
    """

    def __init__(self, in_channels: int, embed_dim: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, embed_dim, kernel_size=1, bias=False),
            LayerNorm2d(embed_dim),
            nn.Conv2d(embed_dim, embed_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(embed_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """B x C x h x w -> B x 256 x h x w."""
        return self.layers(features)
