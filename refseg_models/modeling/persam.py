"""PerSAM (Zhang et al., ICLR 2024), the training-free baseline: reference prototype -> SAM prompts.

Per episode, on frozen SAM image embeddings (authors' ``persam.py``, training-free variant):

1. prototype = masked mean of the reference SAM embedding (reference mask bilinearly resized to
   the 64 x 64 grid, positions where it is > 0); k-shot: the mean of the k per-shot prototypes;
2. location prior = cosine similarity of every target embedding position with the prototype,
   upsampled bilinearly (x4, then to the SAM input frame, as ``postprocess_masks`` does);
3. top-1 position -> positive point, bottom-1 position -> negative point (within the valid, unpadded
   part of the input frame), in SAM's 1024-input pixel coordinates;
4. SAM (frozen prompt encoder + mask decoder) with the two points, single-mask output;
5. cascaded post-refinement: (a) the same points + the previous low-res logits as mask prompt,
   multimask output, best of 3 by predicted IoU; (b) the same points + the box of that mask + its
   logits as mask prompt, multimask, best of 3.

Deliberate deviations: PerSAM's target-guided attention and target-semantic prompting modify SAM's
transformer (``attn_sim``, ``target_embedding``); segment-anything is used unmodified here, so they are
left out (the points + refinement path is what every paper table calls the PerSAM baseline's core).
The similarity map is evaluated in the SAM input frame instead of the original image size, which
only changes the point quantisation. An item whose refined mask is empty keeps its step-(a) result
(the authors' code crashes on an empty mask there).

No trainable parameters: the module's only weights are the frozen SAM decoder's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from refseg_models.config import MethodConfig
from refseg_models.criterion import PromptMaskCriterion
from refseg_models.errors import ModelError
from refseg_models.feature_spec import FeatureSpec
from refseg_models.method import RefSegMethod, check_sam_decoder_grid
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.modeling.sam_decoder import SAM_INPUT_SIZE, SamDecoder


def persam_prototypes(reference_sam: torch.Tensor, reference_masks: torch.Tensor) -> torch.Tensor:
    """Masked mean of the reference SAM embeddings, averaged over shots.

    Args:
        reference_sam: B x k x C x h x w embeddings.
        reference_masks: B x k x H x W masks in the SAM input frame.

    Returns:
        B x C prototypes (an empty mask contributes a zero vector).
    """
    b, k, c, h, w = reference_sam.shape
    masks = F.interpolate(reference_masks.flatten(0, 1)[:, None].float(), (h, w), mode="bilinear", align_corners=False)
    masks = (masks[:, 0] > 0).to(reference_sam.dtype)  # (B k) x h x w
    area = masks.sum(dim=(-1, -2)).clamp(min=1.0)
    per_shot = torch.einsum("nchw,nhw->nc", reference_sam.flatten(0, 1), masks) / area[:, None]
    return per_shot.view(b, k, c).mean(dim=1)


def location_prior(target_sam: torch.Tensor, prototypes: torch.Tensor, input_size: int = SAM_INPUT_SIZE) -> torch.Tensor:
    """Cosine map of the target embeddings with the prototypes in the SAM input frame.

    Args:
        target_sam: B x C x h x w; prototypes: B x C.

    Returns:
        B x input_size x input_size similarities (bilinear x4 then to the input size, as PerSAM's
        ``F.interpolate(scale_factor=4)`` + ``postprocess_masks``).
    """
    target = target_sam / target_sam.norm(dim=1, keepdim=True).clamp(min=1e-12)
    proto = prototypes / prototypes.norm(dim=1, keepdim=True).clamp(min=1e-12)
    sim = torch.einsum("bchw,bc->bhw", target, proto)[:, None]
    sim = F.interpolate(sim, scale_factor=4, mode="bilinear", align_corners=False)
    sim = F.interpolate(sim, (input_size, input_size), mode="bilinear", align_corners=False)
    return sim[:, 0]


def select_points(similarity: torch.Tensor, valid_sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 (positive) and bottom-1 (negative) locations inside each item's valid region.

    Args:
        similarity: B x S x S maps; valid_sizes: per item (h, w) of the unpadded image in the frame.

    Returns:
        (coords B x 2 x 2 as (x, y) pixels, labels B x 2 = [1, 0]).
    """
    coords = []
    for sim, (h, w) in zip(similarity, valid_sizes):
        valid = sim[:h, :w].reshape(-1)
        top, bottom = int(valid.argmax()), int(valid.argmin())
        coords.append([[top % w, top // w], [bottom % w, bottom // w]])
    points = torch.tensor(coords, dtype=similarity.dtype, device=similarity.device)
    labels = torch.tensor([[1, 0]] * len(coords), dtype=torch.int64, device=similarity.device)
    return points, labels


def _boxes_of(logits: torch.Tensor, valid_sizes: list[tuple[int, int]], input_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (x0, y0, x1, y1) in input pixels of the masks ``logits > 0`` (B x 1 x 256 x 256), and
    which items had a non-empty mask; empty masks get the valid-region box."""
    masks = F.interpolate(logits, (input_size, input_size), mode="bilinear", align_corners=False)[:, 0] > 0
    boxes, nonempty = [], []
    for mask, (h, w) in zip(masks, valid_sizes):
        ys, xs = torch.nonzero(mask[:h, :w], as_tuple=True)
        if ys.numel() == 0:
            boxes.append([0.0, 0.0, float(w - 1), float(h - 1)])
            nonempty.append(False)
        else:
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())])
            nonempty.append(True)
    return torch.tensor(boxes, device=logits.device), torch.tensor(nonempty, device=logits.device)


def _best(masks: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """B x 3 x h x w masks, B x 3 scores -> B x 1 x h x w of the best-scoring mask."""
    index = scores.argmax(dim=1)
    return masks[torch.arange(masks.shape[0]), index][:, None]


@dataclass(frozen=True)
class PerSamConfig(MethodConfig):
    """PerSAM's options: refinement passes (0, 1 or 2; the authors' 2) and the SAM grid G."""

    refinement_steps: int = 2
    feature_size: int = 64
    bce_weight: float = 1.0
    dice_weight: float = 1.0

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(target_sam=True, reference_sam=True)


class PerSAM(RefSegMethod):
    config_class = PerSamConfig
    uses_sam_decoder = True
    logits_frame = "sam"
    trainable = False

    def __init__(self, config: PerSamConfig, sam_decoder: SamDecoder) -> None:
        super().__init__()
        if config.refinement_steps not in (0, 1, 2):
            raise ModelError(f"refinement_steps must be 0, 1 or 2, got {config.refinement_steps}")
        self.config = config
        self.sam_decoder = sam_decoder
        self.refinement_steps = config.refinement_steps
        self.input_size = int(sam_decoder.prompt_encoder.input_image_size[0])
        # Training-free: the criterion only monitors (nothing to train).
        self.criterion = PromptMaskCriterion(config.bce_weight, config.dice_weight)

    @classmethod
    def from_config(cls, config: PerSamConfig, sam_decoder: SamDecoder | None = None) -> "PerSAM":
        check_sam_decoder_grid(sam_decoder, config.feature_size, cls.name)
        return cls(config, sam_decoder)

    def frame_size(self) -> int:
        return self.input_size  # SAM's prompt frame (1024): points and valid sizes live there

    @classmethod
    def config_for_features(cls, config: PerSamConfig, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> PerSamConfig:
        if "sam" in shapes:
            return config.replace(feature_size=int(shapes["sam"]["image_embedding"][-1]))
        return config

    def loss(self, outputs: Mapping[str, Any], targets: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """BCE + Dice of the (training-free) prediction, for monitoring."""
        return self.criterion(outputs, targets, valid)

    def _decode(
        self,
        embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor],
        boxes: torch.Tensor | None,
        mask_logits: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.sam_decoder.prompt_encoder(points=points, boxes=boxes, masks=mask_logits)
        return self.sam_decoder(embeddings, sparse, dense, multimask_output=multimask)

    def forward(self, features: EpisodeFeatures) -> dict[str, Any]:
        """The contract's forward: :meth:`segment` on ``features`` (``valid_sizes`` from there)."""
        self.check_features(features)
        sizes = None if features.valid_sizes is None else [tuple(v) for v in features.valid_sizes]
        return self.segment(features.target_sam, features.reference_sam, features.reference_masks, sizes)

    def segment(
        self,
        target_sam: torch.Tensor,
        reference_sam: torch.Tensor,
        reference_masks: torch.Tensor,
        valid_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, Any]:
        """Segment each target from its k references.

        Args:
            target_sam: B x 256 x 64 x 64 SAM embeddings of the targets.
            reference_sam: B x k x 256 x 64 x 64 SAM embeddings of the references.
            reference_masks: B x k x H x W reference masks in the SAM input frame.
            valid_sizes: per target (h, w) of the unpadded image inside the S x S input frame
                (SAM's longest-side preprocessing); None = the whole frame (squash preprocessing).

        Returns:
            dict: ``mask_logits`` B x 1 x 4G x 4G low-res logits over the SAM input frame,
            ``iou_predictions`` B x 1, ``points`` B x 2 x 2 (positive, negative; (x, y) input
            pixels), ``similarity`` B x S x S, ``prototypes`` B x 256.
        """
        if target_sam.dim() != 4 or reference_sam.dim() != 5 or reference_masks.dim() != 4:
            raise ModelError(
                "PerSAM expects target_sam B x 256 x h x w, reference_sam B x k x 256 x h x w and "
                f"reference_masks B x k x H x W; got {tuple(target_sam.shape)}, {tuple(reference_sam.shape)}, "
                f"{tuple(reference_masks.shape)}"
            )
        b = target_sam.shape[0]
        size = self.input_size
        if valid_sizes is None:
            valid_sizes = [(size, size)] * b
        if len(valid_sizes) != b:
            raise ModelError(f"valid_sizes needs one (h, w) per target ({b}), got {len(valid_sizes)}")
        prototypes = persam_prototypes(reference_sam, reference_masks)
        similarity = location_prior(target_sam, prototypes, size)
        points = select_points(similarity, valid_sizes)

        logits, scores = self._decode(target_sam, points, None, None, multimask=False)
        if self.refinement_steps >= 1:
            masks, all_scores = self._decode(target_sam, points, None, logits, multimask=True)
            logits, scores = _best(masks, all_scores), all_scores.max(dim=1, keepdim=True).values
        if self.refinement_steps >= 2:
            boxes, nonempty = _boxes_of(logits, valid_sizes, size)
            masks, all_scores = self._decode(target_sam, points, boxes, logits, multimask=True)
            refined, refined_scores = _best(masks, all_scores), all_scores.max(dim=1, keepdim=True).values
            keep = nonempty.view(b, 1, 1, 1)
            logits = torch.where(keep, refined, logits)
            scores = torch.where(keep.view(b, 1), refined_scores, scores)
        return {
            "mask_logits": logits,
            "iou_predictions": scores,
            "points": points[0],
            "similarity": similarity,
            "prototypes": prototypes,
        }
