"""Small feature-space helpers shared by VRP-SAM, ProSAM and FCP."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def masked_average_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VRP-SAM's masked average pooling: B x C x H x W features, B x 1 x H x W mask -> B x C x 1 x 1.

    Divides by (mask area + 0.0005), as the authors' ``mask_feature`` does, so an empty mask gives 0.
    """
    area = mask.sum(dim=(2, 3), keepdim=True) + 0.0005
    return (features * mask).sum(dim=(2, 3), keepdim=True) / area


def resize_mask_nearest(mask: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """B x 1 x H x W (or B x H x W) {0,1} mask -> B x 1 x size x size float, nearest."""
    if mask.dim() == 3:
        mask = mask[:, None]
    size = (size, size) if isinstance(size, int) else size
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.float()
    return F.interpolate(mask.float(), size=size, mode="nearest")


def resize_to_grid(x: torch.Tensor, size: int) -> torch.Tensor:
    """B x C x h x w -> B x C x size x size, bilinear (align_corners=True) when h, w differ.

    Deviation needed only for non-dilated backbones (MobileNetV2, VGG, DINOv2 at other strides):
    the paper's dilated ResNet-50 already gives 64 x 64 maps, where this is the identity. The
    authors' own VGG path resizes the same way.
    """
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
