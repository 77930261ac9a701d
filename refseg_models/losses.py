"""Mask loss terms as pure, shape-documented functions (VRP-SAM / ProSAM / FCP / SegIC).

Targets are float masks in {0, 1}; every term takes an optional ``valid`` mask of the same shape
(float/bool {0, 1}) and ignored pixels (COCO crowd, VOC boundaries, LVIS unannotated, cells warped
out of view: ``valid == 0``) contribute nothing: BCE is averaged over valid pixels only, Dice sums
over valid pixels only. With ``valid=None`` (or all ones) every term equals the authors' formula.
The per-method criteria that combine these terms with their weights are in
:mod:`refseg_models.criterion`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from refseg_models.errors import ModelError


def _check(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, what: str) -> torch.Tensor:
    if pred.shape != target.shape:
        raise ModelError(f"{what}: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if target.numel() and (target.min() < 0 or target.max() > 1):
        raise ModelError(f"{what}: target values must lie in [0, 1] (pass ignore pixels as valid = 0)")
    if valid is None:
        return torch.ones_like(target, dtype=pred.dtype)
    if valid.shape != target.shape:
        raise ModelError(f"{what}: valid shape {tuple(valid.shape)} != target shape {tuple(target.shape)}")
    return valid.to(pred.dtype)


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits averaged over the valid pixels of the batch. B x ... (same shapes) -> scalar."""
    v = _check(logits, targets, valid, "sigmoid_bce_loss")
    per_pixel = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return (per_pixel * v).sum() / v.sum().clamp(min=1.0)


def per_sample_dice(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The Dice loss with +1 smoothing, per sample: 1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1).
    N x P probabilities and targets (ignored pixels already zeroed in both) -> N."""
    return 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)


def dice_from_probabilities(probs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample Dice (:func:`per_sample_dice`) over valid pixels, summed over the batch and divided
    by the batch size (VRP-SAM's ``dice_loss``). B x ... -> scalar."""
    v = _check(probs, targets, valid, "dice_from_probabilities")
    p, t = (probs * v).flatten(1), (targets.to(probs.dtype) * v).flatten(1)
    return per_sample_dice(p, t).sum() / probs.shape[0]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """VRP-SAM's Dice on sigmoid(logits) with +1 smoothing. logits, targets: B x ... -> scalar."""
    return dice_from_probabilities(logits.sigmoid(), targets, valid)


def probability_bce_loss(probs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Plain BCE on probabilities (log clamped at -100 by torch), mean over valid pixels."""
    v = _check(probs, targets, valid, "probability_bce_loss")
    per_pixel = F.binary_cross_entropy(probs.clamp(0.0, 1.0), targets.to(probs.dtype), reduction="none")
    return (per_pixel * v).sum() / v.sum().clamp(min=1.0)


GUIDE_WEIGHTINGS = ("authors", "paper")
GUIDE_LOSSES = ("authors", "paper")


def fcp_guide_loss(
    attention_masks: Sequence[torch.Tensor],
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    weighting: str = "authors",
    form: str = "authors",
) -> torch.Tensor:
    """FCP guide loss over the T-1 intermediate attention pseudo masks.

    Args:
      attention_masks: T-1 tensors B x H x W of probabilities (head-averaged attention, min-max
        normalised per prototype, max over prototypes), m = 0 .. T-2.
      targets, valid: B x H x W GT of the target and its valid mask on the attention grid.
      weighting: ``"authors"`` (FCP's train.py lines 52-53: layer m's term divided by (T - 1 - m),
        i.e. 1/2 and 1 for T = 3: later layers count more) or ``"paper"`` (eq. 9: a uniform 1 / (T - 1)).
      form: ``"authors"``: the authors' ``compute_pseudo_objective`` (FCP model/VRP_encoder.py
        lines 310-314), BCE-with-logits + Dice on sigmoid(map): a second sigmoid on maps that are
        already probabilities (their Dice adds 1e-9 to the denominator, negligible next to the +1
        smoothing and left out); their published numbers come from it. ``"paper"``: plain BCE +
        Dice on the probabilities themselves, as the paper writes eq. 9.
    Returns: the weighted sum of the per-layer terms (scalar).
    """
    if len(attention_masks) == 0:
        raise ModelError("fcp_guide_loss needs at least one attention mask (T >= 2)")
    if weighting not in GUIDE_WEIGHTINGS:
        raise ModelError(f"guide-loss weighting must be one of {GUIDE_WEIGHTINGS}, got {weighting!r}")
    if form not in GUIDE_LOSSES:
        raise ModelError(f"guide-loss form must be one of {GUIDE_LOSSES}, got {form!r}")
    steps = len(attention_masks)  # T - 1
    total = attention_masks[0].new_zeros(())
    for m, mask in enumerate(attention_masks):
        weight = 1.0 / (steps - m) if weighting == "authors" else 1.0 / steps
        if form == "authors":
            term = sigmoid_bce_loss(mask, targets, valid) + dice_loss(mask, targets, valid)
        else:
            term = probability_bce_loss(mask, targets, valid) + dice_from_probabilities(mask, targets, valid)
        total = total + weight * term
    return total


def fcp_orthogonality_loss(attention_maps: Sequence[torch.Tensor], valid: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """FCP orthogonality loss: sum over maps of mean(ReLU(A A^T - I)).

    Args:
      attention_maps: cross-attention maps, each ... x N x L (N prototypes over L = H*W keys);
        leading dims are flattened as a batch. Each prototype's map is L2-normalised over L, so
        A A^T holds cosine similarities; the diagonal (1) is removed by - I.
      valid: optional, per map, a (flattened-batch) x L mask of keys that count (ignored target
        pixels are zeroed before normalising), or None for all keys.
    Returns: scalar (mean over batch and the N x N entries, summed over the maps).
    """
    if len(attention_maps) == 0:
        raise ModelError("fcp_orthogonality_loss needs at least one attention map")
    total = attention_maps[0].new_zeros(())
    for i, attn in enumerate(attention_maps):
        a = attn.reshape(-1, attn.shape[-2], attn.shape[-1])
        keep = None if valid is None else valid[i]
        if keep is not None:
            a = a * keep.reshape(a.shape[0], 1, a.shape[-1]).to(a.dtype)
        a = F.normalize(a, p=2, dim=-1)
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
    valid: torch.Tensor | None = None,
    num_points: int = 112 * 112,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Mask2Former / SegIC point-sampled mask loss, per mask.

    Args:
      logits: M x 1 x h x w mask logits (or M x h x w), M masks.
      targets: M x 1 x H x W (or M x H x W) {0,1} GT masks; sampled at the same normalised coords,
        so h x w and H x W may differ. valid: same shape as targets (or None); a point counts when
        the valid mask sampled there is >= 0.5, and its label is interpolated over valid pixels only.
      num_points: points per mask (112 * 112 = 12,544); oversample 3.0; importance ratio 0.75.
    Returns:
      {"loss_ce": M sigmoid-CE values (mean over the valid points of each mask),
       "loss_dice": M Dice values (+1 smoothing, over the valid points)}: per-mask vectors, so the
      caller reduces them (SegIC: :func:`segic_mask_weighting`).
    """
    if logits.dim() == 3:
        logits = logits[:, None]
    if targets.dim() == 3:
        targets = targets[:, None]
    if valid is not None and valid.dim() == 3:
        valid = valid[:, None]
    if logits.dim() != 4 or targets.dim() != 4 or logits.shape[:2] != targets.shape[:2] or logits.shape[1] != 1:
        raise ModelError(
            f"point_sampled_mask_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
            "must be M x 1 x h x w and M x 1 x H x W"
        )
    if targets.numel() and (targets.min() < 0 or targets.max() > 1):
        raise ModelError("point_sampled_mask_loss: target values must lie in [0, 1] (pass ignore pixels as valid = 0)")
    if valid is not None and valid.shape != targets.shape:
        raise ModelError(f"point_sampled_mask_loss: valid {tuple(valid.shape)} != targets {tuple(targets.shape)}")
    with torch.no_grad():
        coords = uncertain_point_coords(
            logits.detach(), num_points, oversample_ratio, importance_sample_ratio, generator=generator
        )
        if valid is None:
            point_targets = point_sample(targets.to(logits.dtype), coords)[:, 0]  # M x P
            point_valid = torch.ones_like(point_targets)
        else:
            # interpolate the labels over valid pixels only, so labels under ignored pixels never leak
            v = valid.to(logits.dtype)
            weight = point_sample(v, coords)[:, 0]
            point_targets = point_sample(targets.to(logits.dtype) * v, coords)[:, 0] / weight.clamp(min=1e-6)
            point_valid = (weight >= 0.5).to(logits.dtype)
    point_logits = point_sample(logits, coords)[:, 0]  # M x P
    return point_mask_losses(point_logits, point_targets, point_valid)


def point_mask_losses(
    point_logits: torch.Tensor, point_targets: torch.Tensor, point_valid: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-mask sigmoid CE (mean over the valid points) and Dice (+1 smoothing) of sampled points.

    M x P logits, targets in [0, 1] and valid {0, 1} -> {"loss_ce": M, "loss_dice": M}; with every
    point valid these are SegIC's ``sigmoid_ce_loss`` / ``dice_loss`` before their reduction
    (MengLcool/SEGIC utils/loss_mask.py lines 106-110 and 137-139)."""
    if point_valid is None:
        point_valid = torch.ones_like(point_targets)
    ce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none")
    loss_ce = (ce * point_valid).sum(1) / point_valid.sum(1).clamp(min=1.0)
    loss_dice = per_sample_dice(point_logits.sigmoid() * point_valid, point_targets * point_valid)
    return {"loss_ce": loss_ce, "loss_dice": loss_dice}


def segic_mask_weighting(per_mask: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """SegIC's reduction of per-mask losses over positive and negative instructions.

    ``per_mask``: {"loss_ce": M, "loss_dice": M}; ``weights``: M (1 for positives, 0.1 for
    negatives). As the authors' code computes it (model/segic.py lines 759-766: ``mask_weight``
    (M, 1), ``num_masks = mask_weight.sum()``; utils/loss_mask.py): CE is weighted per mask,
    sum(w_i ce_i) / sum(w); their ``dice_loss`` multiplies the (M,) Dice vector by the (M, 1)
    weights, an M x M broadcast whose sum is sum(dice) * sum(w), then divides by ``num_masks``
    twice, so every mask's Dice counts 1: sum(dice_i) / sum(w). Scalars out."""
    total = weights.sum().clamp(min=1e-12)
    return {"loss_ce": (per_mask["loss_ce"] * weights).sum() / total, "loss_dice": per_mask["loss_dice"].sum() / total}
