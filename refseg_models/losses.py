"""Mask losses as pure, shape-documented functions (VRP-SAM / ProSAM / FCP / SegIC).

Targets are float masks in {0, 1}. Ignore labels (COCO's 255) must be mapped by the data layer
before they reach these functions (they raise on values outside [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def _check_pair(pred: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{what}: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if target.numel() and (target.min() < 0 or target.max() > 1):
        raise ValueError(f"{what}: target values must lie in [0, 1] (map ignore labels before the loss)")


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over every pixel. logits, targets: B x ... (same shape) -> scalar."""
    _check_pair(logits, targets, "sigmoid_bce_loss")
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def dice_from_probabilities(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample 1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1), summed over the batch and divided
    by the batch size. probs, targets: B x ... -> scalar."""
    _check_pair(probs, targets, "dice_from_probabilities")
    p, t = probs.flatten(1), targets.to(probs.dtype).flatten(1)
    per_sample = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    return per_sample.sum() / probs.shape[0]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """VRP-SAM's Dice on sigmoid(logits) with +1 smoothing. logits, targets: B x ... -> scalar."""
    return dice_from_probabilities(logits.sigmoid(), targets)


def bce_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """VRP-SAM / ProSAM / FCP prompt loss: BCE-with-logits (mean) + Dice. B x 1 x H x W -> scalar.

    For ProSAM's K samples, pass B*K logits against the targets repeated K times: equal to the
    mean over the K samples of the per-sample loss (eq. 10).
    """
    return sigmoid_bce_loss(logits, targets) + dice_loss(logits, targets)


def probability_bce_dice_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain BCE (on probabilities, log clamped at -100 by torch) + Dice. B x ... -> scalar."""
    _check_pair(probs, targets, "probability_bce_dice_loss")
    bce = F.binary_cross_entropy(probs.clamp(0.0, 1.0), targets.to(probs.dtype))
    return bce + dice_from_probabilities(probs, targets)


def fcp_guide_loss(attention_masks: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """FCP guide loss over the T-1 intermediate attention pseudo masks.

    Args:
      attention_masks: T-1 tensors B x H x W, probabilities in [0, 1] (head-averaged attention,
        min-max normalised per prototype, max over prototypes), m = 0 .. T-2.
      targets: B x H x W GT of the target, nearest-resized to the attention grid (64 x 64).
    Returns:
      sum_m 1/(T-m) * (BCE + Dice)(mask_m, GT): later layers count more. Plain BCE on probabilities
      (the authors' code applies BCE-with-logits to probabilities; that is a bug we do not copy).
    """
    if len(attention_masks) == 0:
        raise ValueError("fcp_guide_loss needs at least one attention mask (T >= 2)")
    num_layers = len(attention_masks) + 1  # T
    total = attention_masks[0].new_zeros(())
    for m, mask in enumerate(attention_masks):
        total = total + probability_bce_dice_loss(mask, targets) / (num_layers - m)
    return total


def fcp_orthogonality_loss(attention_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """FCP orthogonality loss: sum over maps of mean(ReLU(A A^T - I)).

    Args:
      attention_maps: cross-attention maps of both branches, each ... x N x L (N prototypes over L
        = H*W keys); leading dims are flattened as a batch. Each prototype's map is L2-normalised
        over L, so A A^T holds cosine similarities; the diagonal (1) is removed by - I.
    Returns: scalar (mean over batch and the N x N entries, summed over the maps).
    """
    if len(attention_maps) == 0:
        raise ValueError("fcp_orthogonality_loss needs at least one attention map")
    total = attention_maps[0].new_zeros(())
    for attn in attention_maps:
        a = F.normalize(attn.reshape(-1, attn.shape[-2], attn.shape[-1]), p=2, dim=-1)
        gram = a @ a.transpose(1, 2)
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        total = total + F.relu(gram - eye).mean()
    return total


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of B x C x H x W at B x P x 2 coords in [0, 1] (x, y) -> B x C x P
    (Mask2Former / detectron2 ``point_sample``, align_corners=False)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)
    return F.grid_sample(inputs, grid, mode="bilinear", align_corners=False).squeeze(3)


def uncertain_point_coords(
    logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mask2Former's importance sampling: B x 1 x H x W logits -> B x P x 2 coords in [0, 1].

    Oversample ``num_points * oversample_ratio`` uniform points, keep the ``importance_sample_ratio``
    fraction with the highest uncertainty -|logit|, fill the rest with fresh uniform points.
    """
    b = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(b, num_sampled, 2, device=logits.device, dtype=logits.dtype, generator=generator)
    uncertainty = -point_sample(logits, coords).abs()  # B x 1 x S
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1)[1]
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        extra = torch.rand(b, num_random, 2, device=logits.device, dtype=logits.dtype, generator=generator)
        picked = torch.cat([picked, extra], dim=1)
    return picked


def point_sampled_mask_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_points: int = 112 * 112,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Mask2Former / SegIC point-sampled mask loss.

    Args:
      logits: M x 1 x h x w mask logits (or M x h x w), M masks.
      targets: M x 1 x H x W (or M x H x W) {0,1} GT masks; sampled at the same normalised coords,
        so h x w and H x W may differ.
      num_points: points per mask (112 * 112 = 12,544); oversample 3.0; importance ratio 0.75.
    Returns:
      {"loss_ce": sigmoid-CE averaged over points, summed over masks / M,
       "loss_dice": Dice (+1 smoothing) on the points, summed / M, "loss": their sum}.
    """
    if logits.dim() == 3:
        logits = logits[:, None]
    if targets.dim() == 3:
        targets = targets[:, None]
    if logits.dim() != 4 or targets.dim() != 4 or logits.shape[:2] != targets.shape[:2] or logits.shape[1] != 1:
        raise ValueError(
            f"point_sampled_mask_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
            "must be M x 1 x h x w and M x 1 x H x W"
        )
    if targets.numel() and (targets.min() < 0 or targets.max() > 1):
        raise ValueError("point_sampled_mask_loss: target values must lie in [0, 1]")
    num_masks = max(logits.shape[0], 1)
    with torch.no_grad():
        coords = uncertain_point_coords(
            logits.detach(), num_points, oversample_ratio, importance_sample_ratio, generator=generator
        )
        point_targets = point_sample(targets.to(logits.dtype), coords)[:, 0]  # M x P
    point_logits = point_sample(logits, coords)[:, 0]  # M x P
    loss_ce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none").mean(1).sum() / num_masks
    probs = point_logits.sigmoid()
    dice = 1 - (2 * (probs * point_targets).sum(-1) + 1) / (probs.sum(-1) + point_targets.sum(-1) + 1)
    loss_dice = dice.sum() / num_masks
    return {"loss_ce": loss_ce, "loss_dice": loss_dice, "loss": loss_ce + loss_dice}
