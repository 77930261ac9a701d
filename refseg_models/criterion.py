"""Per-method criteria (Mask2Former's ``SetCriterion`` style): named loss terms in a dict, their
weights in one place (``weight_dict``, filled from the method's config), ignore-aware throughout.

``criterion(outputs, targets, valid) -> {"loss": sum_k weight_k * term_k, term_k: ...}`` where
``targets`` and ``valid`` are B x H x W float {0, 1} in the logits frame at any resolution (resized
nearest to each term's grid here). The terms themselves are the pure functions of
:mod:`refseg_models.losses`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from refseg_models.errors import ModelError
from refseg_models.losses import (
    dice_loss,
    fcp_guide_loss,
    fcp_orthogonality_loss,
    point_sampled_mask_loss,
    segic_mask_weighting,
    sigmoid_bce_loss,
)


def resize_nearest(mask: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """B x H x W -> B x size (nearest), float."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    mask = mask.float()
    if tuple(mask.shape[-2:]) == size:
        return mask
    return F.interpolate(mask[:, None], size=size, mode="nearest")[:, 0]


class Criterion(nn.Module):
    """Base: subclasses compute ``terms``; the total is the weighted sum over ``weight_dict``."""

    # Whether B x n x H x W targets (n instructions per target) are accepted besides B x H x W.
    instruction_targets: bool = False

    def __init__(self, weight_dict: Mapping[str, float]) -> None:
        super().__init__()
        self.weight_dict = dict(weight_dict)

    def terms(self, outputs: Mapping[str, Any], targets: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, outputs: Mapping[str, Any], targets: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        dims = (3, 4) if self.instruction_targets else (3,)
        if targets.dim() not in dims or valid.shape != targets.shape:
            shapes = "B x H x W (or B x n x H x W)" if self.instruction_targets else "B x H x W"
            raise ModelError(
                f"criterion: targets and valid must both be {shapes}, got {tuple(targets.shape)} and {tuple(valid.shape)}"
            )
        terms = self.terms(outputs, targets, valid)
        missing = sorted(set(self.weight_dict) - set(terms))
        if missing:
            raise ModelError(f"{type(self).__name__}: weighted terms {missing} were not computed")
        total = sum(self.weight_dict[name] * terms[name] for name in self.weight_dict)
        return {"loss": total, **terms}


class PromptMaskCriterion(Criterion):
    """VRP-SAM's loss at the output resolution (512): BCE-with-logits (mean) + Dice (+1 smoothing).

    ``outputs["mask_logits"]`` is B x K x H x W: K = 1 for one prediction, K sampled prompts for
    ProSAM, whose loss is then the mean over the K samples of BCE + Dice (eq. 10).
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, **extra: float) -> None:
        super().__init__({"loss_bce": bce_weight, "loss_dice": dice_weight, **extra})

    def terms(self, outputs, targets, valid):
        logits = outputs["mask_logits"]
        b, k, h, w = logits.shape
        t = resize_nearest(targets, (h, w)).to(logits.dtype)[:, None].expand(-1, k, -1, -1).reshape(b * k, h, w)
        v = resize_nearest(valid, (h, w)).to(logits.dtype)[:, None].expand(-1, k, -1, -1).reshape(b * k, h, w)
        flat = logits.reshape(b * k, h, w)
        return {"loss_bce": sigmoid_bce_loss(flat, t, v), "loss_dice": dice_loss(flat, t, v)}


class FCPCriterion(PromptMaskCriterion):
    """FCP: prompt BCE + Dice (x1 each) + guide (x0.5) + orthogonality (x0.05) by default.

    Guide: BCE + Dice between each intermediate attention pseudo mask (B x k x (T-1) x S x S) and
    the GT nearest-resized to S x S (``guide_weighting``: the authors' 1/(T-1-m) or the paper's
    1/(T-1); ``guide_loss``: the authors' terms on sigmoid(map) or the paper's on the map, see
    :func:`refseg_models.losses.fcp_guide_loss`). Orthogonality: over all 2T branch cross-attention
    maps (B x k x 2T x N x S*S); the query-branch maps (the last T) see only valid target cells.
    """

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        guide_weight: float = 0.5,
        ortho_weight: float = 0.05,
        guide_weighting: str = "authors",
        guide_loss: str = "authors",
    ) -> None:
        super().__init__(bce_weight, dice_weight, loss_guide=guide_weight, loss_ortho=ortho_weight)
        self.guide_weighting = guide_weighting
        self.guide_loss = guide_loss

    def terms(self, outputs, targets, valid):
        terms = super().terms(outputs, targets, valid)
        guide = outputs["attention_pseudo_masks"]  # B x k x (T-1) x S x S
        b, k, steps, s, _ = guide.shape
        gt = resize_nearest(targets, s).to(guide.dtype)[:, None].expand(-1, k, -1, -1).reshape(b * k, s, s)
        ok = resize_nearest(valid, s).to(guide.dtype)[:, None].expand(-1, k, -1, -1).reshape(b * k, s, s)
        flat = guide.reshape(b * k, steps, s, s)
        terms["loss_guide"] = fcp_guide_loss(
            [flat[:, m] for m in range(steps)], gt, ok, self.guide_weighting, self.guide_loss
        )
        maps = outputs["attention_maps"]  # B x k x 2T x N x L
        layers = maps.shape[2] // 2
        keys_valid = ok.reshape(b * k, -1)
        terms["loss_ortho"] = fcp_orthogonality_loss(
            [maps[:, :, i] for i in range(maps.shape[2])],
            [None] * layers + [keys_valid] * layers,
        )
        return terms


class SegICCriterion(Criterion):
    """SegIC: point-sampled sigmoid-CE + Dice (12,544 importance-sampled points per mask).

    Positive instructions are weighted 1, negative instructions (empty targets, fully valid)
    ``negative_weight`` (0.1, the authors') in the CE term only; both terms are divided by the sum of
    the weights (``num_masks = mask_weight.sum()``), so every Dice counts 1 as in the authors' code
    (:func:`refseg_models.losses.segic_mask_weighting`). With context reversion the outputs carry a
    ``"reversed"`` pass (its own outputs, ``targets`` and ``valid``); the loss is the mean of both passes.

    Several instructions per target: ``targets`` / ``valid`` B x n x H x W against
    ``outputs["instruction_logits"]`` B x n x h x w; an instruction without any valid pixel (a padding
    slot) is left out of the loss and of the normalisation.
    """

    instruction_targets = True

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        negative_weight: float = 0.1,
        num_points: int = 112 * 112,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__({"loss_ce": ce_weight, "loss_dice": dice_weight})
        self.negative_weight = negative_weight
        self.point_kwargs = dict(
            num_points=num_points, oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio
        )

    def _pass(self, outputs, targets, valid) -> dict[str, torch.Tensor]:
        if targets.dim() == 4:
            logits = outputs["instruction_logits"]
            if logits.shape[:2] != targets.shape[:2]:
                raise ModelError(
                    f"SegIC criterion: {tuple(targets.shape[:2])} instruction targets for "
                    f"{tuple(logits.shape[:2])} instruction logits"
                )
            keep = valid.flatten(2).amax(dim=2).flatten() > 0  # padding slots have no valid pixel
            positives = logits.flatten(0, 1)[keep][:, None]
            targets, valid = targets.flatten(0, 1)[keep], valid.flatten(0, 1)[keep]
        else:
            positives = outputs["mask_logits"]
        per_mask = point_sampled_mask_loss(positives, targets.to(positives.dtype), valid.to(positives.dtype), **self.point_kwargs)
        weights = [positives.new_ones(positives.shape[0])]
        values = [per_mask]
        negatives = [n for n in outputs.get("negative_mask_logits", []) if n.shape[0] > 0]
        if negatives:
            logits = torch.cat(negatives)
            empty = logits.new_zeros(logits.shape[0], *logits.shape[-2:])
            values.append(point_sampled_mask_loss(logits, empty, torch.ones_like(empty), **self.point_kwargs))
            weights.append(logits.new_full((logits.shape[0],), self.negative_weight))
        per_mask = {name: torch.cat([v[name] for v in values]) for name in ("loss_ce", "loss_dice")}
        return segic_mask_weighting(per_mask, torch.cat(weights))

    def terms(self, outputs, targets, valid):
        terms = self._pass(outputs, targets, valid)
        reversed_pass = outputs.get("reversed")
        if reversed_pass is not None:
            second = self._pass(reversed_pass, reversed_pass["targets"], reversed_pass["valid"])
            terms = {name: 0.5 * (terms[name] + second[name]) for name in terms}
        return terms
