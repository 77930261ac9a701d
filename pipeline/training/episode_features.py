"""Turn episode-manifest rows into :class:`~refseg_models.modeling.inputs.EpisodeFeatures` batches.

Every method's data path goes through here, driven by the method's
:class:`~refseg_models.method.FeatureSpec`: a SAM feature provider (``image_embedding``; targets,
and references for FCP / PerSAM) and a backbone feature provider (``layer2/3/4`` or DINOv2's
``patch_tokens``; a store or live, :mod:`pipeline.store.online`). The stores are only read, so one
extraction serves every method alike. The one backbone call that cannot be cached is VRP-SAM's
masked-support layer4 (layer4 of reference layer3 x mask, which depends on the annotation): it is
computed here with the live frozen backbone (:func:`masked_reference_layer4`), so models take
features only.

Geometry: reference annotations are generated where the authors draw them
(:func:`pipeline.episodes.annotations.reference_annotation`, seeded per episode: masks and boxes at
the reference's size, points and scribbles in VRP-SAM's 512 x 512 frame; each covers the whole
reference) and, like the target's label mask, mapped into the method's logits frame of the
reference image (:class:`refseg_models.frames.Frame`, nearest; the padding of a padded frame is
ignore = 255 in targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.data.base import IGNORE_INDEX
from pipeline.episodes.annotations import reference_annotation
from pipeline.errors import ConfigError
from refseg_models.frames import Frame, frame_size_of
from refseg_models.feature_spec import FeatureSpec
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.modeling.pseudo_mask import masked_reference_layer4
from refseg_models.modeling.segic_instructions import masks_to_boxes

SAM_FEATURE = "image_embedding"


class LabelMasks(Protocol):
    """Label masks by (image id, class id): a prepared fold's :class:`~pipeline.store.masks.MaskStore`
    (training workers) or a :class:`~pipeline.data.mask_cache.MaskCache` over a source (evaluation)."""

    def get(self, image_id: Any, class_id: int) -> np.ndarray: ...


@dataclass(frozen=True)
class EpisodeBatch:
    features: EpisodeFeatures
    target_masks: torch.Tensor  # B x S x S uint8 {0, 1, 255}: query ground truth in the logits frame
    episode_ids: list[int]
    class_ids: list[int]


class EpisodeFeatureBuilder:
    """Builds batches for any method from feature providers (stores or online encoders).

    Args:
        spec: what the method reads (``method.feature_spec()``).
        masks: the label masks of the episodes' dataset (uint8 {0, 1, 255} by image and class).
        frame_preprocessing / frame_size: the logits frame (the preprocessing id of the encoder named
            by ``method.logits_frame`` and the frame side: that encoder's input size, or
            ``method.frame_size()`` when the method says so).
        sam: provider of ``image_embedding`` (needed when the spec reads SAM features).
        backbone_features: provider of the spec's backbone maps.
        backbone: the live frozen backbone (``forward_layer4``, ``preprocessing_id``, ``input_size``)
            for the masked-support layer4.
        training: training-time annotation draws (1..20 points / strokes) instead of test ones.
        point_style: ``"pixel"`` (the authors') or ``"disc"``.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        masks: LabelMasks,
        *,
        frame_preprocessing: str,
        frame_size: int,
        sam: Any = None,
        backbone_features: Any = None,
        backbone: Any = None,
        training: bool = False,
        point_style: str = "pixel",
        dtype: torch.dtype = torch.float32,
    ):
        if (spec.target_sam or spec.reference_sam) and (sam is None or SAM_FEATURE not in sam.feature_names):
            raise ConfigError(f"this method reads SAM features: give a provider of {SAM_FEATURE!r}")
        if spec.backbone:
            if backbone_features is None:
                raise ConfigError(f"this method reads backbone features {list(spec.backbone)}: give a provider")
            missing = [name for name in spec.backbone if name not in backbone_features.feature_names]
            if missing:
                raise ConfigError(
                    f"backbone feature provider lacks {missing} (has {backbone_features.feature_names})"
                )
        if spec.masked_reference_layer4 and backbone is None:
            raise ConfigError("this method needs the live frozen backbone for the masked-reference layer4")
        self.spec = spec
        self.masks = masks
        self.frame_preprocessing = frame_preprocessing
        self.frame_size = int(frame_size)
        self.sam = sam
        self.backbone_features = backbone_features
        self.backbone = backbone
        self.training = training
        self.point_style = point_style
        self.dtype = dtype

    @classmethod
    def for_method(
        cls,
        method: Any,
        masks: LabelMasks,
        *,
        sam: Any = None,
        backbone_features: Any = None,
        backbone: Any = None,
        training: bool = False,
        point_style: str = "pixel",
        dtype: torch.dtype = torch.float32,
    ) -> "EpisodeFeatureBuilder":
        """The builder for ``method`` (a :class:`~refseg_models.method.RefSegMethod`): its feature spec,
        and its logits frame taken from the provider of the encoder it names."""
        provider = {"sam": sam, "backbone": backbone_features}[method.logits_frame]
        if provider is None:
            raise ConfigError(f"{method.name} predicts in the {method.logits_frame} frame: give that feature provider")
        preprocessing = _preprocessing_id(provider)
        size = method.frame_size() or frame_size_of(preprocessing)
        return cls(
            method.feature_spec(), masks, frame_preprocessing=preprocessing, frame_size=size, sam=sam,
            backbone_features=backbone_features, backbone=backbone, training=training, point_style=point_style,
            dtype=dtype,
        )

    def _frame(self, shape: tuple[int, ...]) -> Frame:
        return Frame.of(self.frame_preprocessing, self.frame_size, shape[:2])

    def __call__(self, rows: Sequence[dict]) -> EpisodeBatch:
        if not rows:
            raise ConfigError("an episode batch needs at least one manifest row")
        shots = {len(row["support_ids"]) for row in rows}
        if len(shots) != 1:
            raise ConfigError(f"rows of one batch must have the same shot count, got {sorted(shots)}")
        shot = shots.pop()
        batch = len(rows)
        queries = [row["query_id"] for row in rows]
        supports = [support for row in rows for support in row["support_ids"]]

        target_labels = [self.masks.get(row["query_id"], row["class_id"]) for row in rows]
        frames = [self._frame(label.shape) for label in target_labels]
        target_masks = torch.stack(
            [frame.mask_to_frame(label, pad_value=IGNORE_INDEX) for frame, label in zip(frames, target_labels)]
        ).to(torch.uint8)
        # (reference image size, annotation): the frame is the reference's, whatever the resolution the
        # annotation was drawn at (points and scribbles: the authors' 512 x 512 frame)
        annotations = []
        for row in rows:
            for offset, support in enumerate(row["support_ids"]):
                label = self.masks.get(support, row["class_id"])
                drawn = reference_annotation(
                    label, row["annotation_type"], seed=row["annotation_seed"] + offset, training=self.training,
                    point_style=self.point_style,
                )
                annotations.append((label.shape, drawn))
        reference_masks = torch.stack([self._frame(shape).mask_to_frame(a) for shape, a in annotations])
        reference_masks = reference_masks.view(batch, shot, self.frame_size, self.frame_size)

        fields: dict[str, Any] = {"reference_masks": reference_masks}
        spec = self.spec
        if spec.target_sam:
            fields["target_sam"] = self.sam.get_batch(queries, [SAM_FEATURE])[SAM_FEATURE].to(self.dtype)
        if spec.reference_sam:
            flat = self.sam.get_batch(supports, [SAM_FEATURE])[SAM_FEATURE].to(self.dtype)
            fields["reference_sam"] = flat.view(batch, shot, *flat.shape[1:])
        if spec.backbone:
            names = list(spec.backbone)
            if spec.masked_reference_layer4 and "layer3" not in names:
                names.append("layer3")
            target = self.backbone_features.get_batch(queries, names)
            reference = self.backbone_features.get_batch(supports, names)
            fields["target_backbone"] = {k: target[k].to(self.dtype) for k in spec.backbone}
            fields["reference_backbone"] = {
                k: reference[k].to(self.dtype).view(batch, shot, *reference[k].shape[1:]) for k in spec.backbone
            }
            if spec.masked_reference_layer4:
                # The annotation in the backbone's own frame (the layer3 grid is its grid).
                backbone_masks = torch.stack(
                    [
                        Frame.of(self.backbone.preprocessing_id, self.backbone.input_size, shape).mask_to_frame(a)
                        for shape, a in annotations
                    ]
                )
                masked = masked_reference_layer4(self.backbone, reference["layer3"].to(self.dtype), backbone_masks[:, None])
                fields["reference_masked_layer4"] = masked.view(batch, shot, *masked.shape[1:])
        if spec.target_boxes:
            fields["target_boxes"] = masks_to_boxes((target_masks == 1).float())
        if frames[0].padded:
            fields["valid_sizes"] = tuple(frame.valid for frame in frames)
        fields["meta"] = {"episode_ids": [row["episode_id"] for row in rows]}
        return EpisodeBatch(
            EpisodeFeatures(**fields), target_masks, [row["episode_id"] for row in rows], [row["class_id"] for row in rows]
        )


def _preprocessing_id(provider: Any) -> str:
    """The preprocessing id of a feature provider: a store's feature-set key, or a live encoder's."""
    feature_set = getattr(provider, "feature_set", None)
    if feature_set is not None:
        return feature_set.preprocessing_id
    return provider.encoder.preprocessing_id
