"""Prompt-robustness measurement (ProSAM's claim): mask IoU vs Gaussian noise on the prompt tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from refseg_models.errors import ModelError
from refseg_models.modeling.features import resize_mask_nearest
from refseg_models.modeling.inputs import EpisodeFeatures


class PromptModel(Protocol):
    training: bool

    def prompt_tokens(self, features: EpisodeFeatures) -> torch.Tensor: ...

    def decode_tokens(self, target_sam: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-item IoU of binary masks B x ... -> B (an empty prediction of an empty target counts 1)."""
    p, t = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (p & t).sum(1).float()
    union = (p | t).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@torch.no_grad()
def prompt_robustness_curve(
    model: PromptModel,
    features: EpisodeFeatures,
    gt_masks: torch.Tensor,
    noise_scales: Sequence[float],
    generator: torch.Generator | None = None,
    relative: bool = False,
) -> list[float]:
    """Mean mask IoU per noise scale when N(0, scale^2) noise is added to every prompt-token entry.

    Args:
      model: VRP-SAM, ProSAM (its mean prompt) or FCP, in eval mode (raises otherwise: dropout would
        confound the measurement).
      features: the episodes; gt_masks: B x H x W {0,1} target GT (resized nearest to the output).
      noise_scales: standard deviations; 0 gives the clean IoU.
      relative: scale the noise by each item's token RMS over all its prompt entries (B x N x C for
        VRP-SAM / ProSAM, B x k x N x C for FCP: one RMS per episode either way; compares models
        whose token norms differ).
    Returns:
      list of mean IoU, one per noise scale.
    """
    if model.training:
        raise ModelError("prompt_robustness_curve: put the model in eval mode first (model.eval())")
    tokens = model.prompt_tokens(features)
    per_item = (tokens.shape[0],) + (1,) * (tokens.dim() - 1)
    if relative:
        rms = tokens.pow(2).flatten(1).mean(dim=1).sqrt().reshape(per_item)
    else:
        rms = tokens.new_ones(per_item)
    curve = []
    for scale in noise_scales:
        noise = torch.randn(tokens.shape, device=tokens.device, dtype=tokens.dtype, generator=generator)
        logits = model.decode_tokens(features.target_sam, tokens + float(scale) * rms * noise)
        gt = resize_mask_nearest(gt_masks, logits.shape[-2:])
        curve.append(float(mask_iou(logits > 0, gt > 0.5).mean()))
    return curve
