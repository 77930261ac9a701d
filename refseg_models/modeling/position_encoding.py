"""DETR / Mask2Former 2-D sine positional encoding (normalised coordinates), as VRP-SAM uses it."""

from __future__ import annotations

import math

import torch
from torch import nn


def sine_position_encoding(
    height: int,
    width: int,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """2-D sine encoding of an unpadded H x W grid -> 1 x (2 * num_pos_feats) x H x W.

    Coordinates are cumsum / last (eps 1e-6) times 2*pi; each axis gets ``num_pos_feats`` features
    (sin on even, cos on odd frequencies, interleaved); y-half first, then x-half. Identical to
    Mask2Former's ``PositionEmbeddingSine(normalize=True)`` with an all-valid mask.
    """
    eps, scale = 1e-6, 2 * math.pi
    ones = torch.ones(1, height, width, device=device, dtype=torch.float32)
    y_embed = ones.cumsum(1)
    x_embed = ones.cumsum(2)
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(dtype)


class PositionEmbeddingSine(nn.Module):
    """Module form of ``sine_position_encoding`` for a feature map B x C x H x W (no parameters)."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x C x H x W -> 1 x (2 * num_pos_feats) x H x W (same for every item)."""
        return sine_position_encoding(
            x.shape[-2], x.shape[-1], self.num_pos_feats, self.temperature, device=x.device, dtype=x.dtype
        )
