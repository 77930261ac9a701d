"""Unit tests of refseg_models.losses (pure functions, exact values on small hand-made inputs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from refseg_models.criterion import FCPCriterion, PromptMaskCriterion, SegICCriterion
from refseg_models.losses import (
    dice_from_probabilities,
    dice_loss,
    fcp_guide_loss,
    fcp_orthogonality_loss,
    point_sample,
    point_sampled_mask_loss,
    probability_bce_loss,
    sigmoid_bce_loss,
    uncertain_point_coords,
)


def bce_dice_loss(logits, target, valid=None):
    return sigmoid_bce_loss(logits, target, valid) + dice_loss(logits, target, valid)


def probability_bce_dice_loss(probs, target, valid=None):
    return probability_bce_loss(probs, target, valid) + dice_from_probabilities(probs, target, valid)


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
    # T = 3, the authors' train.py: m = 0 divided by T-1-0 = 2, m = 1 by 1.
    assert fcp_guide_loss([m0, m1], target, form="paper").item() == pytest.approx((l0 / 2 + l1).item(), rel=1e-6)
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
    assert set(out) == {"loss_ce", "loss_dice"} and out["loss_ce"].shape == (3,)  # one value per mask
    out = {**{k: v.mean() for k, v in out.items()}}
    out["loss"] = out["loss_ce"] + out["loss_dice"]
    # Uniform points: almost all far from the boundary -> small loss. Importance sampling puts 75%
    # of the points where |logit| is smallest (the blurred boundary) -> clearly larger loss.
    uniform = point_sampled_mask_loss(good, target, num_points=112 * 112, importance_sample_ratio=0.0, generator=gen)
    uniform = {k: v.mean() for k, v in uniform.items()}
    assert (uniform["loss_ce"] + uniform["loss_dice"]).item() < 0.1
    assert out["loss_ce"].item() > 2 * uniform["loss_ce"].item()
    out["loss"].backward()
    assert good.grad is not None and good.grad.abs().sum() > 0
    bad = point_sampled_mask_loss(-(target * 2 - 1) * 15, target, num_points=1000, generator=gen)
    assert (bad["loss_ce"] + bad["loss_dice"]).mean().item() > 5
    # Target at another resolution than the logits is sampled at the same normalised points.
    small = point_sampled_mask_loss(
        (target * 2 - 1) * 15, F.interpolate(target, size=(256, 256)), num_points=500, importance_sample_ratio=0.0
    )
    assert (small["loss_ce"] + small["loss_dice"]).mean().item() < 0.1
    with pytest.raises(ValueError):
        point_sampled_mask_loss(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8))


def test_point_sampled_loss_uses_exactly_num_points() -> None:
    logits = torch.randn(2, 1, 16, 16)
    coords = uncertain_point_coords(logits, 12544, 3.0, 0.75)
    assert coords.shape == (2, 12544, 2)
    assert math.isclose(float(coords.min()), 0.0, abs_tol=0.01) and float(coords.max()) <= 1.0


# ----------------------------------------------------------------------------- ignore pixels
def _labelled():
    """A 2 x 4 x 4 label mask with ignore (255) pixels, split into targets and valid."""
    labels = torch.tensor(
        [
            [[1, 1, 0, 0], [1, 255, 0, 0], [0, 0, 255, 255], [0, 0, 0, 1]],
            [[0, 0, 0, 0], [0, 1, 1, 0], [255, 1, 1, 0], [0, 0, 0, 0]],
        ]
    )
    return (labels == 1).float(), (labels != 255).float()


def test_bce_and_dice_ignore_pixels_by_hand() -> None:
    target, valid = _labelled()
    logits = torch.linspace(-3, 3, 32).reshape(2, 4, 4)
    p = logits.sigmoid()
    # BCE: mean over the 28 valid pixels only
    per_pixel = -(target * p.log() + (1 - target) * (1 - p).log())
    expected_bce = float(sum(per_pixel[valid > 0].tolist())) / 28
    assert sigmoid_bce_loss(logits, target, valid).item() == pytest.approx(expected_bce, rel=1e-5)
    # Dice per sample over valid pixels only, summed / batch
    expected_dice = 0.0
    for b in range(2):
        keep = valid[b] > 0
        pp, tt = p[b][keep], target[b][keep]
        expected_dice += 1 - (2 * float((pp * tt).sum()) + 1) / (float(pp.sum()) + float(tt.sum()) + 1)
    assert dice_loss(logits, target, valid).item() == pytest.approx(expected_dice / 2, rel=1e-5)
    # ignored pixels get no gradient, whatever their logits
    x = logits.clone().requires_grad_(True)
    bce_dice_loss(x, target, valid).backward()
    assert (x.grad[valid == 0] == 0).all() and (x.grad[valid > 0] != 0).all()
    # all-valid equals the authors' formula (no valid mask)
    ones = torch.ones_like(target)
    assert bce_dice_loss(logits, target, ones).item() == pytest.approx(bce_dice_loss(logits, target).item(), rel=1e-6)


def test_guide_and_orthogonality_ignore_pixels() -> None:
    target, valid = _labelled()
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(2, 4, 4, generator=g) for _ in range(2)]
    # changing the maps on ignored pixels changes nothing
    altered = [torch.where(valid > 0, m, 1 - m) for m in masks]
    torch.testing.assert_close(fcp_guide_loss(masks, target, valid), fcp_guide_loss(altered, target, valid))
    assert not torch.allclose(fcp_guide_loss(masks, target), fcp_guide_loss(altered, target))
    # orthogonality: keys at ignored pixels are zeroed before normalising
    maps = torch.rand(2, 3, 16, generator=g)
    keys = valid.reshape(2, 16)
    by_hand = 0.0
    for b in range(2):
        a = F.normalize(maps[b] * keys[b], dim=-1)
        by_hand += F.relu(a @ a.T - torch.eye(3)).mean().item() / 2
    assert fcp_orthogonality_loss([maps], [keys]).item() == pytest.approx(by_hand, rel=1e-5)


def test_point_sampled_loss_ignores_points_on_ignored_pixels() -> None:
    target = torch.zeros(1, 1, 32, 32)
    target[..., 8:24, 8:24] = 1
    valid = torch.ones_like(target)
    valid[..., :, :16] = 0  # left half ignored
    # logits wrong on the left half only: with the valid mask the loss sees only the right half
    logits = (target * 2 - 1) * 15
    logits[..., :, :16] *= -1
    gen = torch.Generator().manual_seed(0)
    masked = point_sampled_mask_loss(logits, target, valid, num_points=2000, importance_sample_ratio=0.0, generator=gen)
    full = point_sampled_mask_loss(logits, target, num_points=2000, importance_sample_ratio=0.0, generator=gen)
    # (only points within a pixel of the valid border still see the flipped logits, bilinearly)
    assert masked["loss_ce"].item() < 0.2 and full["loss_ce"].item() > 3


def test_criteria_name_terms_and_weight_them_in_one_place() -> None:
    target, valid = _labelled()
    logits = torch.linspace(-3, 3, 32).reshape(2, 1, 4, 4)
    out = PromptMaskCriterion(bce_weight=2.0, dice_weight=0.5)({"mask_logits": logits}, target, valid)
    assert set(out) == {"loss", "loss_bce", "loss_dice"}
    torch.testing.assert_close(out["loss"], 2.0 * out["loss_bce"] + 0.5 * out["loss_dice"])
    torch.testing.assert_close(out["loss_bce"], sigmoid_bce_loss(logits[:, 0], target, valid))
    # the criterion resizes targets nearest to the logits' size: an 8 x 8 copy gives the same value
    big_t = F.interpolate(target[:, None], size=(8, 8), mode="nearest")[:, 0]
    big_v = F.interpolate(valid[:, None], size=(8, 8), mode="nearest")[:, 0]
    again = PromptMaskCriterion(bce_weight=2.0, dice_weight=0.5)({"mask_logits": logits}, big_t, big_v)
    torch.testing.assert_close(again["loss"], out["loss"])
    assert FCPCriterion().weight_dict == {"loss_bce": 1.0, "loss_dice": 1.0, "loss_guide": 0.5, "loss_ortho": 0.05}
    assert SegICCriterion().weight_dict == {"loss_ce": 1.0, "loss_dice": 1.0} and SegICCriterion().negative_weight == 0.1


def test_segic_criterion_weights_negatives_and_averages_the_reversed_pass() -> None:
    torch.manual_seed(0)  # the sampled points (a point within half a pixel of the border reads zero padding)
    target = torch.zeros(2, 16, 16)  # empty targets, predicted exactly (logit -15): CE ~ 3e-7
    valid = torch.ones_like(target)
    good = torch.full((2, 1, 16, 16), -15.0)
    crit = SegICCriterion(num_points=256, importance_sample_ratio=0.0)
    base = crit({"mask_logits": good}, target, valid)
    assert base["loss_ce"].item() < 1e-5
    # one negative instruction predicting the full mask (wrong: its target is empty): CE 15, weight
    # 0.1, normalised by the summed weights 2 + 0.1
    negatives = [torch.full((1, 1, 16, 16), 15.0), torch.zeros(0, 1, 16, 16)]
    with_neg = crit({"mask_logits": good, "negative_mask_logits": negatives}, target, valid)
    # (points within half a pixel of the border read grid_sample's zero padding: CE 14-15 there)
    assert 0.1 * 14.0 / 2.1 < with_neg["loss_ce"].item() < 0.1 * 15.0 / 2.1
    # Dice counts every mask 1 (the authors' broadcast), still divided by 2.1: the negative's Dice
    # 1 - 1 / (sum of ~256 probabilities ~1 + 1) ~ 1 over 2.1, not 0.1 x that (the positives' Dice
    # is ~0, a little above it where border points read the zero padding)
    assert 0.9 / 2.1 < with_neg["loss_dice"].item() < 1.05 / 2.1
    # context reversion: the mean of both passes
    reversed_pass = {"mask_logits": -good, "targets": target, "valid": valid}
    both = crit({"mask_logits": good, "reversed": reversed_pass}, target, valid)
    assert 0.5 * 14.0 < both["loss_ce"].item() < 0.5 * 15.0


# --- SegIC's reduction, transcribed from MengLcool/SEGIC utils/loss_mask.py (lines 91-139) --------
def _segic_dice_loss(inputs, targets, num_masks, mask_weight=None):
    inputs = inputs.sigmoid()
    inputs = inputs.flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    if mask_weight is not None:
        loss = (loss * mask_weight).sum() / num_masks
    return loss.sum() / num_masks


def _segic_sigmoid_ce_loss(inputs, targets, num_masks, mask_weight=None):
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none", weight=mask_weight)
    return loss.mean(1).sum() / num_masks


def test_segic_weighting_is_the_authors_dice_and_ce_reduction() -> None:
    from refseg_models.losses import point_mask_losses, segic_mask_weighting

    g = torch.Generator().manual_seed(0)
    point_logits = torch.randn(5, 64, generator=g) * 3  # 2 positives, 3 negatives (empty targets)
    point_labels = torch.cat([(torch.rand(2, 64, generator=g) > 0.5).float(), torch.zeros(3, 64)])
    # model/segic.py lines 761-764: mask_weight (n, 1), 0.1 for negatives, num_masks = its sum
    mask_weight = torch.tensor([[1.0], [1.0], [0.1], [0.1], [0.1]])
    num_masks = mask_weight.sum()
    ours = segic_mask_weighting(point_mask_losses(point_logits, point_labels), mask_weight[:, 0])
    torch.testing.assert_close(ours["loss_dice"], _segic_dice_loss(point_logits, point_labels, num_masks, mask_weight))
    torch.testing.assert_close(ours["loss_ce"], _segic_sigmoid_ce_loss(point_logits, point_labels, num_masks, mask_weight))
    # without negatives (the authors' mask_weight = ones(n, 1), num_masks = n): the plain mean
    ones = torch.ones(2, 1)
    plain = segic_mask_weighting(point_mask_losses(point_logits[:2], point_labels[:2]), ones[:, 0])
    torch.testing.assert_close(plain["loss_dice"], _segic_dice_loss(point_logits[:2], point_labels[:2], 2.0, ones))
    torch.testing.assert_close(plain["loss_ce"], _segic_sigmoid_ce_loss(point_logits[:2], point_labels[:2], 2.0, ones))
