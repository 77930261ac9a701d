"""Training-free prototype matching on backbone features (a no-training row for every table).

The reference prototype is the masked average of the reference backbone features (mean over shots);
the target's cosine similarity to it, min-max normalised per image, minus ``threshold`` and times
``scale`` is the mask logit map. Unlike PerSAM it needs no SAM, only the class-consistent backbone,
which makes it the cheapest real-feature sanity check of the data and evaluation path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeMatching(nn.Module):
    def __init__(self, feature: str = "layer4", threshold: float = 0.5, scale: float = 10.0, eps: float = 1e-6):
        super().__init__()
        self.feature = feature
        self.threshold = threshold
        self.scale = scale
        self.eps = eps

    def forward(
        self,
        target_features: dict[str, torch.Tensor],
        reference_features: dict[str, torch.Tensor],
        reference_masks: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            target_features: {name: B x C x h x w}.
            reference_features: {name: B x k x C x h x w}.
            reference_masks: B x k x H x W in {0, 1}.
        Returns:
            {"mask_logits": B x 1 x h x w, "similarity": B x 1 x h x w (cosine, before normalising)}.
        """
        target = target_features[self.feature]
        reference = reference_features[self.feature]
        batch, shots, channels, height, width = reference.shape
        masks = F.interpolate(
            reference_masks.float().flatten(0, 1)[:, None], size=(height, width), mode="bilinear", align_corners=False
        ).view(batch, shots, 1, height, width)
        prototype = (reference * masks).sum(dim=(1, 3, 4)) / (masks.sum(dim=(1, 3, 4)) + self.eps)  # B x C
        similarity = F.cosine_similarity(target, prototype[:, :, None, None], dim=1)[:, None]
        low = similarity.amin(dim=(2, 3), keepdim=True)
        high = similarity.amax(dim=(2, 3), keepdim=True)
        normalised = (similarity - low) / (high - low + self.eps)
        return {"mask_logits": self.scale * (normalised - self.threshold), "similarity": similarity}


def build_prototype_matching(feature: str = "layer4", threshold: float = 0.5, scale: float = 10.0) -> PrototypeMatching:
    return PrototypeMatching(feature=feature, threshold=threshold, scale=scale)
