"""HSNet's few-shot segmentation metric (common/evaluation.py + common/logger.py), exactly.

Per episode, for b in {0 = background, 1 = foreground}: ``I_b = #(pred == b & gt == b)``,
``U_b = #(pred == b) + #(gt == b) - I_b``, pixels with ``gt == ignore_index`` excluded. I and U are
summed per class over all episodes, then

* ``miou``  = 100 * mean over the fold's classes c of ``I_1[c] / max(U_1[c], 1)``
* ``fbiou`` = 100 * mean over b of ``sum_c I_b[c] / sum_c U_b[c]``

i.e. the IoU of summed areas per class, not the mean of per-episode IoUs. Counts are int64, so
merging the meters of several ranks (sum of counts) gives exactly the single-process result.

Undefined values, as HSNet computes them:

* a fold class without episodes (``U_1[c] = 0``) has IoU 0 and counts in ``miou`` (HSNet divides by
  ``max(U, 1)``);
* ``fbiou`` is **NaN** when a term has no pixels at all (``sum_c U_b[c] = 0``, e.g. a meter that saw
  no episode, or only ignored pixels): HSNet divides without a guard and gets ``0/0 = nan``.
  refseg gave 0 until it followed HSNet here: 0 would read as "the model got every pixel wrong"
  where nothing was measured, and NaN is what the pixel rates below already return for an empty
  denominator. ``results.json`` writes NaN as ``null`` (strict JSON); see ``docs/evaluation.md``.
ProSAM's pixel rates (Table 6) come from the same counts: ``tpr = TP / (TP + FN)`` etc., pooled over
all pixels of all episodes of the fold's classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from pipeline.errors import ConfigError, DataError

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(value: ArrayLike) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class FewShotMeter:
    """Accumulates per-class intersection/union counts over episodes.

    ``update(pred, gt, class_id)``: ``pred`` bool or {0,1} of shape HxW or BxHxW (threshold
    probabilities yourself: HSNet uses sigmoid > 0.5); ``gt`` {0,1} with optional ``ignore_index``
    pixels, same shape; ``class_id`` an int or one per batch item.
    """

    def __init__(self, class_ids: Iterable[int], ignore_index: int | None = 255):
        self.class_ids = [int(class_id) for class_id in class_ids]
        if not self.class_ids:
            raise ConfigError("FewShotMeter needs at least one class id")
        if len(set(self.class_ids)) != len(self.class_ids):
            raise ConfigError(f"duplicate class ids: {self.class_ids}")
        self.ignore_index = ignore_index
        self._column = {class_id: column for column, class_id in enumerate(self.class_ids)}
        # [b, class column], b = 0 background, 1 foreground
        self.intersection = np.zeros((2, len(self.class_ids)), dtype=np.int64)
        self.union = np.zeros((2, len(self.class_ids)), dtype=np.int64)
        # pixel confusion counts per class column: tp, fp, tn, fn
        self.confusion = np.zeros((4, len(self.class_ids)), dtype=np.int64)
        self.episodes = np.zeros(len(self.class_ids), dtype=np.int64)

    def update(self, pred: ArrayLike, gt: ArrayLike, class_id: int | Sequence[int] | ArrayLike) -> None:
        pred_array, gt_array = _to_numpy(pred), _to_numpy(gt)
        if pred_array.shape != gt_array.shape:
            raise DataError(f"prediction shape {pred_array.shape} != ground-truth shape {gt_array.shape}")
        if pred_array.ndim == 2:
            pred_array, gt_array = pred_array[None], gt_array[None]
        if pred_array.ndim != 3:
            raise DataError(f"expected HxW or BxHxW masks, got shape {pred_array.shape}")
        class_array = np.atleast_1d(_to_numpy(class_id) if not isinstance(class_id, int) else np.asarray(class_id))
        if class_array.size == 1 and len(pred_array) > 1:
            class_array = np.repeat(class_array, len(pred_array))
        if class_array.shape != (len(pred_array),):
            raise DataError(f"{class_array.size} class ids for a batch of {len(pred_array)} masks")
        if pred_array.dtype != bool:
            values = np.unique(pred_array)
            if not np.isin(values, (0, 1)).all():
                raise DataError(f"prediction must be binary (bool or 0/1), found values {values[:5]}")
            pred_array = pred_array.astype(bool)
        for item_pred, item_gt, item_class in zip(pred_array, gt_array, class_array):
            self._update_one(item_pred, item_gt, int(item_class))

    def _update_one(self, pred: np.ndarray, gt: np.ndarray, class_id: int) -> None:
        if class_id not in self._column:
            raise DataError(f"class id {class_id} is not one of this meter's classes {self.class_ids}")
        valid = np.ones(gt.shape, dtype=bool) if self.ignore_index is None else gt != self.ignore_index
        gt_foreground = gt == 1
        other = ~np.isin(gt[valid], (0, 1))
        if other.any():
            raise DataError(f"ground truth has values other than 0/1/{self.ignore_index}: {np.unique(gt[valid])[:5]}")
        true_positive = int(np.count_nonzero(pred & gt_foreground & valid))
        false_positive = int(np.count_nonzero(pred & ~gt_foreground & valid))
        false_negative = int(np.count_nonzero(~pred & gt_foreground & valid))
        true_negative = int(np.count_nonzero(valid)) - true_positive - false_positive - false_negative
        column = self._column[class_id]
        # foreground: I = TP, U = TP + FP + FN; background: I = TN, U = TN + FN + FP
        self.intersection[1, column] += true_positive
        self.union[1, column] += true_positive + false_positive + false_negative
        self.intersection[0, column] += true_negative
        self.union[0, column] += true_negative + false_negative + false_positive
        self.confusion[:, column] += (true_positive, false_positive, true_negative, false_negative)
        self.episodes[column] += 1

    def merge(self, other: FewShotMeter) -> FewShotMeter:
        """Add ``other``'s counts (e.g. another rank's) into this meter; returns self."""
        if other.class_ids != self.class_ids or other.ignore_index != self.ignore_index:
            raise ConfigError("can only merge meters with the same class ids and ignore index")
        self.intersection += other.intersection
        self.union += other.union
        self.confusion += other.confusion
        self.episodes += other.episodes
        return self

    def state_dict(self) -> dict[str, list]:
        """Plain counts (for all-reduce or logging); :meth:`from_state_dict` restores them."""
        return {
            "class_ids": list(self.class_ids),
            "ignore_index": self.ignore_index,
            "intersection": self.intersection.tolist(),
            "union": self.union.tolist(),
            "confusion": self.confusion.tolist(),
            "episodes": self.episodes.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> FewShotMeter:
        meter = cls(state["class_ids"], ignore_index=state["ignore_index"])
        meter.intersection = np.asarray(state["intersection"], dtype=np.int64)
        meter.union = np.asarray(state["union"], dtype=np.int64)
        meter.confusion = np.asarray(state["confusion"], dtype=np.int64)
        meter.episodes = np.asarray(state["episodes"], dtype=np.int64)
        return meter

    def compute(self) -> dict[str, object]:
        iou = self.intersection / np.maximum(self.union, 1)
        union_totals = self.union.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 -> nan, as in HSNet (module docstring)
            fb_terms = self.intersection.sum(axis=1) / union_totals
        tp, fp, tn, fn = (int(value) for value in self.confusion.sum(axis=1))

        def rate(numerator: int, denominator: int) -> float:
            return 100.0 * numerator / denominator if denominator else float("nan")

        return {
            "miou": 100.0 * float(iou[1].mean()),
            "fbiou": 100.0 * float(fb_terms.mean()),
            "per_class_iou": {class_id: 100.0 * float(iou[1, column]) for class_id, column in self._column.items()},
            "tpr": rate(tp, tp + fn),
            "tnr": rate(tn, tn + fp),
            "fpr": rate(fp, fp + tn),
            "fnr": rate(fn, fn + tp),
            "episodes": int(self.episodes.sum()),
            "episodes_per_class": {class_id: int(self.episodes[column]) for class_id, column in self._column.items()},
        }
