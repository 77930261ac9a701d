"""Training-free prototype matching on backbone features (a no-training row for every table).

The reference prototype is the masked average of the reference backbone features (mean over shots);
the target's cosine similarity to it, min-max normalised per image, minus ``threshold`` and times
``scale`` is the mask logit map. Unlike PerSAM it needs no SAM, only the class-consistent backbone,
which makes it the cheapest real-feature sanity check of the data and evaluation path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from refseg_models.config import MethodConfig
from refseg_models.criterion import PromptMaskCriterion
from refseg_models.feature_spec import FeatureSpec
from refseg_models.method import RefSegMethod
from refseg_models.modeling.inputs import EpisodeFeatures


@dataclass(frozen=True)
class PrototypeMatchingConfig(MethodConfig):
    feature: str = "layer4"
    threshold: float = 0.5
    scale: float = 10.0
    eps: float = 1e-6

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(backbone=(self.feature,))


class PrototypeMatching(RefSegMethod):
    config_class = PrototypeMatchingConfig
    uses_sam_decoder = False
    logits_frame = "backbone"
    frozen_modules = ()
    trainable = False

    def __init__(self, config: PrototypeMatchingConfig) -> None:
        super().__init__()
        self.config = config
        self.feature = config.feature
        self.threshold = config.threshold
        self.scale = config.scale
        self.eps = config.eps
        self.criterion = PromptMaskCriterion()

    @classmethod
    def from_config(cls, config: PrototypeMatchingConfig, sam_decoder: Any = None) -> "PrototypeMatching":
        return cls(config)

    def forward(self, features: EpisodeFeatures) -> dict[str, torch.Tensor]:
        """
        Uses ``target_backbone[feature]`` (B x C x h x w), ``reference_backbone[feature]``
        (B x k x C x h x w) and ``reference_masks`` (B x k x H x W).
        Returns {"mask_logits": B x 1 x h x w, "similarity": B x 1 x h x w (cosine, before normalising)}.
        """
        self.check_features(features)
        target = features.target_backbone[self.feature]
        reference = features.reference_backbone[self.feature]
        batch, shots, channels, height, width = reference.shape
        masks = F.interpolate(
            features.reference_masks.float().flatten(0, 1)[:, None], size=(height, width), mode="bilinear", align_corners=False
        ).view(batch, shots, 1, height, width).to(reference.dtype)
        prototype = (reference * masks).sum(dim=(1, 3, 4)) / (masks.sum(dim=(1, 3, 4)) + self.eps)  # B x C
        similarity = F.cosine_similarity(target, prototype[:, :, None, None], dim=1)[:, None]
        low = similarity.amin(dim=(2, 3), keepdim=True)
        high = similarity.amax(dim=(2, 3), keepdim=True)
        normalised = (similarity - low) / (high - low + self.eps)
        return {"mask_logits": self.scale * (normalised - self.threshold), "similarity": similarity}

    def loss(self, outputs: Mapping[str, Any], targets: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """BCE + Dice of the (training-free) prediction, for monitoring."""
        return self.criterion(outputs, targets, valid)
