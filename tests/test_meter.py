"""FewShotMeter against hand-computed cases (PROTOCOL.md's metric, HSNet's logger)."""

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, DataError
from pipeline.evaluation import EvalResolution, FewShotMeter


def _mask(rows):
    return np.array(rows, dtype=np.uint8)


def test_single_episode_by_hand():
    pred = _mask([[1, 1, 0, 0], [1, 1, 0, 0]])
    gt = _mask([[1, 0, 0, 0], [1, 1, 1, 0]])
    meter = FewShotMeter([3, 7])
    meter.update(pred, gt, 3)
    result = meter.compute()
    # fg: I = 3, U = 4 + 4 - 3 = 5; bg: I = 3, U = 4 + 4 - 3 = 5. class 7 has no episode -> IoU 0.
    assert result["per_class_iou"][3] == pytest.approx(100 * 3 / 5, abs=1e-9)
    assert result["per_class_iou"][7] == 0.0
    assert result["miou"] == pytest.approx(100 * (3 / 5 + 0) / 2, abs=1e-9)
    assert result["fbiou"] == pytest.approx(100 * (3 / 5 + 3 / 5) / 2, abs=1e-9)
    # tp 3, fp 1, fn 1, tn 3
    assert result["tpr"] == pytest.approx(75.0, abs=1e-9)
    assert result["tnr"] == pytest.approx(75.0, abs=1e-9)
    assert result["fpr"] == pytest.approx(25.0, abs=1e-9)
    assert result["fnr"] == pytest.approx(25.0, abs=1e-9)


def test_ignore_pixels_are_excluded():
    pred = _mask([[1, 1, 1], [0, 0, 0]])
    gt = _mask([[1, 255, 255], [0, 255, 1]])
    meter = FewShotMeter([0])
    meter.update(pred, gt, 0)
    # valid pixels: (0,0) pred1 gt1; (1,0) pred0 gt0; (1,2) pred0 gt1
    # fg: I = 1, U = 1 + 2 - 1 = 2; bg: I = 1, U = 2 + 1 - 1 = 2
    result = meter.compute()
    assert result["miou"] == pytest.approx(50.0, abs=1e-9)
    assert result["fbiou"] == pytest.approx(50.0, abs=1e-9)


def test_summed_areas_not_mean_of_episode_ious():
    # episode A: small object, perfect; episode B: large object, half right. Same class.
    gt_a = np.zeros((10, 10), np.uint8)
    gt_a[0, 0] = 1
    pred_a = gt_a.copy()
    gt_b = np.zeros((10, 10), np.uint8)
    gt_b[:, :5] = 1  # 50 px
    pred_b = np.zeros((10, 10), np.uint8)
    pred_b[:, :3] = 1  # 30 px inside
    meter = FewShotMeter([5])
    meter.update(np.stack([pred_a, pred_b]), np.stack([gt_a, gt_b]), [5, 5])
    summed = (1 + 30) / (1 + 50)
    mean_of_episodes = (1.0 + 30 / 50) / 2
    result = meter.compute()
    assert result["miou"] == pytest.approx(100 * summed, abs=1e-9)
    assert abs(result["miou"] - 100 * mean_of_episodes) > 10
    # background: A: I = 99, U = 99; B: I = 50, U = 70
    assert result["fbiou"] == pytest.approx(100 * ((1 + 30) / 51 + (99 + 50) / (99 + 70)) / 2, abs=1e-9)


def test_merge_of_rank_meters_equals_single_process():
    rng = np.random.default_rng(0)
    classes = [0, 4, 8]
    preds = rng.integers(0, 2, size=(12, 16, 16)).astype(bool)
    gts = rng.choice([0, 1, 255], size=(12, 16, 16), p=[0.5, 0.4, 0.1]).astype(np.uint8)
    ids = rng.choice(classes, size=12)
    single = FewShotMeter(classes)
    single.update(preds, gts, ids)
    ranks = [FewShotMeter(classes), FewShotMeter(classes)]
    for index in range(12):
        ranks[index % 2].update(preds[index], gts[index], int(ids[index]))
    merged = ranks[0].merge(ranks[1])
    assert merged.compute() == single.compute()
    restored = FewShotMeter.from_state_dict(single.state_dict())
    assert restored.compute() == single.compute()


def test_torch_inputs_and_per_item_class_ids():
    pred = torch.tensor([[[True, False]], [[False, True]]])
    gt = torch.tensor([[[1, 0]], [[1, 1]]], dtype=torch.uint8)
    meter = FewShotMeter([1, 2])
    meter.update(pred, gt, torch.tensor([1, 2]))
    result = meter.compute()
    assert result["per_class_iou"][1] == pytest.approx(100.0, abs=1e-9)
    assert result["per_class_iou"][2] == pytest.approx(50.0, abs=1e-9)


def test_bad_inputs_are_clear_errors():
    meter = FewShotMeter([1])
    with pytest.raises(DataError, match="shape"):
        meter.update(np.zeros((2, 2)), np.zeros((2, 3)), 1)
    with pytest.raises(DataError, match="not one of this meter's classes"):
        meter.update(np.zeros((2, 2)), np.zeros((2, 2)), 9)
    with pytest.raises(DataError, match="binary"):
        meter.update(np.full((2, 2), 0.7), np.zeros((2, 2)), 1)
    with pytest.raises(DataError, match="values other than"):
        meter.update(np.zeros((2, 2)), np.full((2, 2), 3), 1)
    with pytest.raises(ConfigError):
        FewShotMeter([])
    with pytest.raises(ConfigError, match="merge"):
        meter.merge(FewShotMeter([2]))


def test_resolution_modes():
    logits = torch.full((1, 4, 4), -1.0)
    logits[0, :2, :2] = 1.0
    gt = np.zeros((8, 8), np.uint8)
    gt[:4, :4] = 1
    pred, gt_fixed = EvalResolution("fixed", 16).prepare(logits, gt)
    assert pred.shape == gt_fixed.shape == (16, 16)
    assert gt_fixed[:8, :8].all() and not gt_fixed[8:].any()
    pred, gt_original = EvalResolution("original").prepare(logits, gt)
    assert pred.shape == (8, 8) and (gt_original == gt).all()
    assert pred[:3, :3].all() and not pred[5:, 5:].any()
    with pytest.raises(ConfigError):
        EvalResolution("half")


def test_fbiou_without_valid_pixels_is_nan_as_in_hsnet():
    """HSNet's FB-IoU divides summed areas without a guard: no valid pixel -> 0/0 = NaN. mIoU keeps
    HSNet's max(U, 1): classes without episodes count 0."""
    import math

    empty = FewShotMeter([1, 2]).compute()
    assert math.isnan(empty["fbiou"]) and empty["miou"] == 0.0
    all_ignored = FewShotMeter([1])
    all_ignored.update(np.ones((2, 2), np.uint8), np.full((2, 2), 255, np.uint8), 1)
    assert math.isnan(all_ignored.compute()["fbiou"])
    measured = FewShotMeter([1])
    measured.update(np.ones((2, 2), np.uint8), np.ones((2, 2), np.uint8), 1)  # no background pixel at all
    assert math.isnan(measured.compute()["fbiou"])  # HSNet: the background term is 0/0


def test_results_json_writes_undefined_numbers_as_null(tmp_path):
    import json

    from pipeline.evaluation.job import write_json

    write_json(tmp_path / "r.json", {"fbiou": float("nan"), "miou": 1.5, "per_class": [float("inf")]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"fbiou": None, "miou": 1.5, "per_class": [None]}
