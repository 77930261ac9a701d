"""Unit tests of refseg_models.losses (pure functions, exact values on small hand-made inputs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from refseg_models.losses import (
    bce_dice_loss,
    dice_loss,
    fcp_guide_loss,
    fcp_orthogonality_loss,
    point_sample,
    point_sampled_mask_loss,
    probability_bce_dice_loss,
    sigmoid_bce_loss,
    uncertain_point_coords,
)


def _manual_dice(probs: torch.Tensor, target: torch.Tensor) -> float:
    total = 0.0
    for p, t in zip(probs, target):
        total += 1 - (2 * float((p * t).sum()) + 1) / (float(p.sum()) + float(t.sum()) + 1)
    return total / probs.shape[0]


def test_dice_matches_vrp_sam_formula_per_sample_then_batch_mean() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]], [[[-2.0, 1.0], [4.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 0.0], [1.0, 1.0]]]])
    expected = _manual_dice(logits.sigmoid(), target)
    assert dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    bce = float(F.binary_cross_entropy_with_logits(logits, target))
    assert sigmoid_bce_loss(logits, target).item() == pytest.approx(bce, rel=1e-6)
    assert bce_dice_loss(logits, target).item() == pytest.approx(bce + expected, rel=1e-6)


def test_perfect_prediction_has_low_loss_and_wrong_prediction_high() -> None:
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    good = (target * 2 - 1) * 20
    assert bce_dice_loss(good, target).item() < 0.01
    assert bce_dice_loss(-good, target).item() > 10


def test_bce_dice_on_stacked_samples_is_the_mean_over_samples() -> None:
    # ProSAM eq. 10: mean over K samples of (BCE + Dice), computed as one B*K batch.
    torch.manual_seed(0)
    b, k = 3, 4
    logits = torch.randn(b, k, 1, 8, 8)
    target = (torch.rand(b, 1, 8, 8) > 0.5).float()
    per_sample = [bce_dice_loss(logits[:, j], target) for j in range(k)]
    stacked = bce_dice_loss(logits.reshape(b * k, 1, 8, 8), target[:, None].expand(-1, k, -1, -1, -1).reshape(b * k, 1, 8, 8))
    assert stacked.item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-6)


def test_losses_reject_shape_mismatch_and_ignore_labels() -> None:
    with pytest.raises(ValueError, match="shape"):
        bce_dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="ignore"):
        bce_dice_loss(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 255.0))


def test_probability_bce_is_plain_bce_not_bce_with_logits() -> None:
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.1]])[None]
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])[None]
    bce = -(target * probs.log() + (1 - target) * (1 - probs).log()).mean().item()
    expected = bce + _manual_dice(probs, target)
    assert probability_bce_dice_loss(probs, target).item() == pytest.approx(expected, rel=1e-6)
    # The authors' bug (BCE-with-logits on probabilities) gives a different value.
    buggy = float(F.binary_cross_entropy_with_logits(probs, target)) + _manual_dice(probs, target)
    assert abs(buggy - expected) > 0.1


def test_fcp_guide_loss_weights_later_layers_more() -> None:
    torch.manual_seed(1)
    target = (torch.rand(2, 8, 8) > 0.5).float()
    m0, m1 = torch.rand(2, 8, 8), torch.rand(2, 8, 8)
    l0, l1 = probability_bce_dice_loss(m0, target), probability_bce_dice_loss(m1, target)
    # T = 3: m = 0 weighted 1/3, m = 1 weighted 1/2.
    assert fcp_guide_loss([m0, m1], target).item() == pytest.approx((l0 / 3 + l1 / 2).item(), rel=1e-6)
    with pytest.raises(ValueError):
        fcp_guide_loss([], target)


def test_fcp_orthogonality_zero_for_disjoint_maps_and_positive_for_identical() -> None:
    n, length = 4, 16
    disjoint = torch.zeros(2, n, length)
    for i in range(n):
        disjoint[:, i, i * 4 : (i + 1) * 4] = 0.25
    assert fcp_orthogonality_loss([disjoint]).item() == pytest.approx(0.0, abs=1e-7)
    identical = torch.full((2, n, length), 1.0 / length)
    # Every off-diagonal cosine is 1, the diagonal is removed: mean = (n^2 - n) / n^2.
    assert fcp_orthogonality_loss([identical]).item() == pytest.approx((n * n - n) / (n * n), rel=1e-5)
    # Summed over maps.
    assert fcp_orthogonality_loss([identical, identical, disjoint]).item() == pytest.approx(2 * (n * n - n) / (n * n), rel=1e-5)


def test_point_sample_reads_pixel_centres() -> None:
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    # Centre of pixel (row 1, col 2) in [0, 1] coords (x, y) with align_corners=False.
    coords = torch.tensor([[[2.5 / 4, 1.5 / 4]]])
    assert point_sample(image, coords).item() == pytest.approx(6.0)


def test_uncertain_points_prefer_low_confidence_region() -> None:
    # Logits ~ 0 (uncertain) only in the left quarter; 75% of the points must come from there.
    logits = torch.full((1, 1, 32, 32), 10.0)
    logits[..., :8] = 0.0
    gen = torch.Generator().manual_seed(0)
    coords = uncertain_point_coords(logits, 400, 3.0, 0.75, generator=gen)
    assert coords.shape == (1, 400, 2)
    in_uncertain = (coords[0, :300, 0] < 0.25).float().mean().item()
    assert in_uncertain > 0.9


def test_point_sampled_mask_loss_values_and_gradients() -> None:
    target = torch.zeros(3, 1, 64, 64)
    target[:, :, 16:48, 16:48] = 1
    gen = torch.Generator().manual_seed(0)
    good = ((target * 2 - 1) * 15).requires_grad_(True)
    out = point_sampled_mask_loss(good, target, num_points=112 * 112, generator=gen)
    assert set(out) == {"loss_ce", "loss_dice", "loss"}
    # Uniform points: almost all far from the boundary -> small loss. Importance sampling puts 75%
    # of the points where |logit| is smallest (the blurred boundary) -> clearly larger loss.
    uniform = point_sampled_mask_loss(good, target, num_points=112 * 112, importance_sample_ratio=0.0, generator=gen)
    assert uniform["loss"].item() < 0.1
    assert out["loss_ce"].item() > 2 * uniform["loss_ce"].item()
    out["loss"].backward()
    assert good.grad is not None and good.grad.abs().sum() > 0
    bad = point_sampled_mask_loss(-(target * 2 - 1) * 15, target, num_points=1000, generator=gen)
    assert bad["loss"].item() > 5
    # Target at another resolution than the logits is sampled at the same normalised points.
    small = point_sampled_mask_loss(
        (target * 2 - 1) * 15, F.interpolate(target, size=(256, 256)), num_points=500, importance_sample_ratio=0.0
    )
    assert small["loss"].item() < 0.1
    with pytest.raises(ValueError):
        point_sampled_mask_loss(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8))


def test_point_sampled_loss_uses_exactly_num_points() -> None:
    logits = torch.randn(2, 1, 16, 16)
    coords = uncertain_point_coords(logits, 12544, 3.0, 0.75)
    assert coords.shape == (2, 12544, 2)
    assert math.isclose(float(coords.min()), 0.0, abs_tol=0.01) and float(coords.max()) <= 1.0
