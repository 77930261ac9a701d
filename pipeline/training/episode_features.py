"""Turn episode-manifest rows into :class:`~refseg_models.modeling.inputs.EpisodeFeatures` batches.

Every method's data path goes through here, over the same feature providers: a SAM store
(``image_embedding``; target, and reference for FCP) and a backbone provider (``layer2/3/4``; a
store or live, :mod:`pipeline.store.online`). The stores are only read, so one extraction serves
VRP-SAM, ProSAM, FCP and PerSAM alike. The one backbone call that cannot be cached is VRP-SAM's
masked-support layer4 (layer4 of reference layer3 x mask, which depends on the annotation): it is
computed here with the live frozen backbone (:func:`masked_reference_layer4`), so models take
features only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.mask_cache import MaskCache
from pipeline.episodes.annotations import reference_annotation
from pipeline.errors import ConfigError
from refseg_models.modeling.inputs import BACKBONE_LAYERS, EpisodeFeatures
from refseg_models.modeling.pseudo_mask import masked_reference_layer4

SAM_FEATURE = "image_embedding"


@dataclass(frozen=True)
class EpisodeBatch:
    features: EpisodeFeatures
    target_masks: torch.Tensor  # B x S x S uint8 {0, 1, 255}: query ground truth at the model's input size
    episode_ids: list[int]
    class_ids: list[int]


def _resize_nearest(mask: np.ndarray, size: int) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(mask, dtype=np.float32))[None, None]  # copy: cached masks are read-only
    return F.interpolate(tensor, size=(size, size), mode="nearest")[0, 0]


class EpisodeFeatureBuilder:
    """Builds batches for the SAM-prompt methods from feature providers (stores or online encoders).

    Args:
        sam: provider of ``image_embedding`` (B x 256 x 64 x 64), e.g. an opened SAM feature store.
        backbone_features: provider of ``layer2``, ``layer3``, ``layer4``.
        backbone: the live frozen backbone (``forward_layer4``) for the masked-support layer4.
        masks: the target-mask cache of the episodes' dataset.
        input_size: side of the masks handed to the model (VRP-SAM: 512).
        reference_sam: also read the references' SAM embeddings (FCP).
        num_points: points per reference for ``points`` annotations (None: 1..20, training).
    """

    def __init__(
        self,
        sam: Any,
        backbone_features: Any,
        backbone: Any,
        masks: MaskCache,
        *,
        input_size: int = 512,
        reference_sam: bool = False,
        num_points: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        missing = [name for name in BACKBONE_LAYERS if name not in backbone_features.feature_names]
        if missing:
            raise ConfigError(f"backbone feature provider lacks {missing} (has {backbone_features.feature_names})")
        if SAM_FEATURE not in sam.feature_names:
            raise ConfigError(f"SAM feature provider lacks {SAM_FEATURE!r} (has {sam.feature_names})")
        self.sam = sam
        self.backbone_features = backbone_features
        self.backbone = backbone
        self.masks = masks
        self.input_size = input_size
        self.reference_sam = reference_sam
        self.num_points = num_points
        self.dtype = dtype

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

        target_masks = torch.stack(
            [_resize_nearest(self.masks.get(row["query_id"], row["class_id"]), self.input_size) for row in rows]
        ).to(torch.uint8)
        reference_masks = torch.stack(
            [
                _resize_nearest(
                    reference_annotation(
                        self.masks.get(support, row["class_id"]),
                        row["annotation_type"],
                        seed=row["annotation_seed"] + offset,
                        num_points=self.num_points,
                    ),
                    self.input_size,
                )
                for row in rows
                for offset, support in enumerate(row["support_ids"])
            ]
        ).view(batch, shot, self.input_size, self.input_size)

        target_sam = self.sam.get_batch(queries, [SAM_FEATURE])[SAM_FEATURE].to(self.dtype)
        target_backbone = {k: v.to(self.dtype) for k, v in self.backbone_features.get_batch(queries, BACKBONE_LAYERS).items()}
        flat_reference = {
            k: v.to(self.dtype) for k, v in self.backbone_features.get_batch(supports, BACKBONE_LAYERS).items()
        }
        masked_layer4 = masked_reference_layer4(
            self.backbone, flat_reference["layer3"], reference_masks.flatten(0, 1)[:, None]
        )
        reference_backbone = {k: v.view(batch, shot, *v.shape[1:]) for k, v in flat_reference.items()}
        reference_sam = None
        if self.reference_sam:
            flat = self.sam.get_batch(supports, [SAM_FEATURE])[SAM_FEATURE].to(self.dtype)
            reference_sam = flat.view(batch, shot, *flat.shape[1:])
        features = EpisodeFeatures(
            target_sam=target_sam,
            target_backbone=target_backbone,
            reference_backbone=reference_backbone,
            reference_masks=reference_masks,
            reference_sam=reference_sam,
            reference_masked_layer4=masked_layer4.view(batch, shot, *masked_layer4.shape[1:]),
            meta={"episode_ids": [row["episode_id"] for row in rows]},
        )
        return EpisodeBatch(features, target_masks, [row["episode_id"] for row in rows], [row["class_id"] for row in rows])
