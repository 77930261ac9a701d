"""What a method reads from the frozen features: a :class:`FeatureSpec`, answered by its config.

Data paths (the training loop, the evaluation runner, the predictor) build exactly the features a
spec names, and the job opens exactly the stores of :attr:`FeatureSpec.encoders`; the config class
answers (:meth:`refseg_models.config.MethodConfig.feature_spec`), so nothing builds a model just to
read what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from refseg_models.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from refseg_models.modeling.inputs import EpisodeFeatures

ENCODER_ROLES = ("sam", "backbone")


@dataclass(frozen=True)
class FeatureSpec:
    """Which frozen features a method reads from :class:`EpisodeFeatures`.

    ``target_sam`` / ``reference_sam``: SAM image embeddings (B x 256 x G x G / B x k x 256 x G x G).
    ``backbone``: names of the backbone maps needed for target and references (``layer2/3/4`` for
    the ResNet-style backbones, ``patch_tokens`` for DINOv2). ``masked_reference_layer4``: layer4 of
    the masked reference layer3 (one live backbone call per reference, see
    :func:`refseg_models.modeling.pseudo_mask.masked_reference_layer4`). ``target_boxes``: the
    targets' GT boxes (SegIC's training-time box prompt; data paths fill it in training).
    """

    target_sam: bool = False
    reference_sam: bool = False
    backbone: tuple[str, ...] = ()
    masked_reference_layer4: bool = False
    target_boxes: bool = False

    @property
    def encoders(self) -> tuple[str, ...]:
        """The frozen encoder roles this spec needs, in ``ENCODER_ROLES`` order."""
        roles = []
        if self.target_sam or self.reference_sam:
            roles.append("sam")
        if self.backbone or self.masked_reference_layer4:
            roles.append("backbone")
        return tuple(roles)

    def check(self, features: EpisodeFeatures, method: str) -> None:
        """Raise ModelError naming every feature ``features`` lacks for ``method``."""
        missing = []
        if self.target_sam and features.target_sam is None:
            missing.append("target_sam")
        if self.reference_sam and features.reference_sam is None:
            missing.append("reference_sam")
        for name in self.backbone:
            if name not in features.target_backbone:
                missing.append(f"target_backbone[{name!r}]")
            if name not in features.reference_backbone:
                missing.append(f"reference_backbone[{name!r}]")
        if self.masked_reference_layer4 and features.reference_masked_layer4 is None:
            missing.append("reference_masked_layer4 (see refseg_models.modeling.pseudo_mask.masked_reference_layer4)")
        if missing:
            raise ModelError(f"{method} needs EpisodeFeatures fields it did not get: {', '.join(missing)}")
