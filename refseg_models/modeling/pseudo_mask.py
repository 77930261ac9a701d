"""VRP-SAM's prior ("conventional") pseudo mask of the target from frozen layer4 features.

Two steps, split so that models take features only:
1. ``masked_reference_layer4`` (data / training side, a frozen-backbone call): layer4 of
   (reference layer3 * mask), the mask nearest-resized to layer3's grid.
2. ``prior_pseudo_mask`` (inside the models): that map is multiplied by the mask again (bilinear,
   align_corners=True, to layer4's grid); for each target position the max over reference positions
   of the cosine similarity (eps 1e-7) between target layer4 and the masked reference layer4.
   No min-max scaling (VRP-SAM; PFENet scales, VRP-SAM does not).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from refseg_models.errors import ModelError


def masked_reference_layer4(backbone: Any, layer3: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Layer4 of the masked reference layer3.

    Args:
      backbone: frozen backbone with ``forward_layer4(layer3) -> layer4`` (refseg_models.encoders).
      layer3: B x C3 x h3 x w3 reference layer3 features.
      mask: B x H x W or B x 1 x H x W reference mask in {0, 1} (any resolution).
    Returns:
      B x C4 x h4 x w4, computed under ``torch.no_grad()``.
    """
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[0] != layer3.shape[0]:
        raise ModelError(f"mask must be B x [1 x] H x W with B={layer3.shape[0]}, got {tuple(mask.shape)}")
    with torch.no_grad():
        small = F.interpolate(mask.to(layer3.dtype), size=layer3.shape[-2:], mode="nearest")
        return backbone.forward_layer4(layer3 * small)


def prior_pseudo_mask(
    target_layer4: torch.Tensor, reference_masked_layer4: torch.Tensor, reference_mask: torch.Tensor
) -> torch.Tensor:
    """Max-over-reference cosine similarity map.

    Args:
      target_layer4: B x C x h x w.
      reference_masked_layer4: B x C x h' x w' (from ``masked_reference_layer4``).
      reference_mask: B x 1 x H x W {0,1} on the model's feature grid (VRP-SAM: nearest to 64 x 64).
    Returns:
      B x 1 x h x w similarities in [-1, 1] (>= 0 for post-ReLU features), no min-max scaling.
    """
    b, c, h, w = target_layer4.shape
    mask = F.interpolate(
        reference_mask.to(reference_masked_layer4.dtype),
        size=reference_masked_layer4.shape[-2:],
        mode="bilinear",
        align_corners=True,
    )
    support = (reference_masked_layer4 * mask).reshape(b, c, -1).permute(0, 2, 1)  # B x L' x C
    query = target_layer4.reshape(b, c, -1)  # B x C x L
    support_norm = support.norm(2, dim=2, keepdim=True)
    query_norm = query.norm(2, dim=1, keepdim=True)
    similarity = torch.bmm(support, query) / (torch.bmm(support_norm, query_norm) + 1e-7)
    return similarity.max(dim=1)[0].reshape(b, 1, h, w)
