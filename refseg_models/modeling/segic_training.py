"""SegIC's training-time hooks: context reversion, negative entities and the weighted mask loss.

The training loop owns the schedule (when to apply each, with which probability); these are the
mechanics, as the authors' ``model/segic.py`` does them:

* context reversion (``--reverse_context``): a second pass with reference and target swapped, the
  detached first prediction (> 0) as the new reference mask and the original reference mask as the
  new ground truth; loss = mean of both passes;
* negative entity augmentation (``--add_neg_prompt``): instance features of classes ABSENT from the
  target, taken from a per-class queue of past instance features (``que_len`` 128), are decoded as
  extra instructions whose ground truth is an empty mask, with loss weight 0.1; the loss is
  normalised by the sum of the weights (``num_masks = mask_weight.sum()``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from refseg_models.modeling.segic_instructions import masks_to_boxes

# loss_fn(logits N x 1 x h x w, targets N x H x W) -> scalar mean over the N masks, or a dict with
# a "loss" entry (as ``refseg_models.losses.point_sampled_mask_loss`` returns).
MaskLoss = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | dict[str, torch.Tensor]"]

NEGATIVE_LOSS_WEIGHT = 0.1


def context_reversion_pass(
    model: torch.nn.Module,
    target_features: torch.Tensor,
    reference_features: torch.Tensor,
    reference_masks: torch.Tensor,
    first_mask_logits: torch.Tensor,
    **forward_kwargs: Any,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Run SegIC's second, reversed pass.

    The target becomes the (single) reference, with the first pass's detached prediction > 0
    (bilinearly resized to the reference-mask size) as its mask; the first reference shot becomes
    the target, with its annotation as ground truth (and as box prompt source in training).
    With k > 1 shots only shot 0 is reversed (the paper is 1-shot).

    Args:
        model: a SegIC module.
        target_features: B x C x h x w.
        reference_features: B x k x C x h x w.
        reference_masks: B x k x H x W in {0, 1}.
        first_mask_logits: B x 1 x h' x w' logits of the first pass (detached here).
        **forward_kwargs: passed to ``model`` (e.g. ``generator``); ``target_boxes`` is derived.

    Returns:
        (outputs of the reversed pass, its ground truth B x H x W).
    """
    size = reference_masks.shape[-2:]
    predicted = F.interpolate(first_mask_logits.detach(), size, mode="bilinear", align_corners=False) > 0
    new_reference_masks = predicted.to(reference_masks.dtype)  # B x 1 x H x W
    new_ground_truth = reference_masks[:, 0]
    forward_kwargs = {k: v for k, v in forward_kwargs.items() if k != "target_boxes"}
    outputs = model(
        reference_features[:, 0],
        target_features[:, None],
        new_reference_masks,
        target_boxes=masks_to_boxes(new_ground_truth),
        **forward_kwargs,
    )
    return outputs, new_ground_truth


def _scalar(loss: "torch.Tensor | dict[str, torch.Tensor]") -> torch.Tensor:
    return loss["loss"] if isinstance(loss, dict) else loss


def segic_mask_loss(
    outputs: dict[str, Any],
    target_masks: torch.Tensor,
    loss_fn: MaskLoss,
    negative_weight: float = NEGATIVE_LOSS_WEIGHT,
) -> torch.Tensor:
    """Weighted mean of ``loss_fn`` over positive and negative instructions.

    Args:
        outputs: SegIC outputs (``mask_logits`` B x 1 x h x w, ``negative_mask_logits`` list).
        target_masks: B x H x W ground truth of the positive instructions.
        loss_fn: per-batch mean mask loss (e.g. ``refseg_models.losses.point_sampled_mask_loss``).
        negative_weight: weight of each negative instruction (empty target), 0.1 as the authors.

    Returns:
        scalar (sum_i w_i L_i) / (sum_i w_i) with w = 1 for positives and ``negative_weight`` for
        negatives, computed as batch means times counts (exact for a mean-over-masks ``loss_fn``).
    """
    positives = outputs["mask_logits"]
    total = _scalar(loss_fn(positives, target_masks.to(positives.dtype))) * positives.shape[0]
    weight = float(positives.shape[0])
    negatives = [n for n in outputs.get("negative_mask_logits", []) if n.shape[0] > 0]
    if negatives:
        logits = torch.cat(negatives)
        empty = logits.new_zeros(logits.shape[0], *target_masks.shape[-2:])
        total = total + negative_weight * logits.shape[0] * _scalar(loss_fn(logits, empty))
        weight += negative_weight * logits.shape[0]
    return total / weight


class InstanceFeatureQueue:
    """Per-class FIFO of detached instance features, the source of negative entities.

    ``push`` after each step with the classes and instance features (``outputs["prototypes"]``) of
    the batch; ``sample_negatives`` draws one stored feature from each of up to ``max_negatives``
    random classes absent from a target. Pure torch, CPU storage.
    """

    def __init__(self, max_per_class: int = 128) -> None:
        if max_per_class < 1:
            raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
        self.max_per_class = max_per_class
        self._queues: dict[int, deque[torch.Tensor]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @property
    def classes(self) -> list[int]:
        return sorted(self._queues)

    def size(self, class_id: int) -> int:
        return len(self._queues.get(int(class_id), ()))

    def push(self, class_ids: Sequence[int], features: torch.Tensor) -> None:
        """Store ``features`` (N x C, detached copies) under ``class_ids`` (N entries)."""
        if features.dim() != 2 or features.shape[0] != len(class_ids):
            raise ValueError(
                f"push expects N class ids and N x C features, got {len(class_ids)} ids and "
                f"{tuple(features.shape)}"
            )
        for class_id, feature in zip(class_ids, features.detach().cpu()):
            queue = self._queues.setdefault(int(class_id), deque(maxlen=self.max_per_class))
            queue.append(feature.clone())

    def sample_negatives(
        self,
        present_classes: Iterable[int],
        max_negatives: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Up to ``max_negatives`` features (n x C), each from a different stored class that is not
        in ``present_classes``; 0 x C (or 0 x 0 when the queue is empty) when none qualifies."""
        present = {int(c) for c in present_classes}
        candidates = [c for c in self.classes if c not in present and self._queues[c]]
        if not candidates or max_negatives <= 0:
            width = next((q[0].shape[0] for q in self._queues.values() if q), 0)
            return torch.zeros(0, width)
        order = torch.randperm(len(candidates), generator=generator)[:max_negatives].tolist()
        picked = []
        for i in order:
            queue = self._queues[candidates[i]]
            j = int(torch.randint(len(queue), (), generator=generator))
            picked.append(queue[j])
        return torch.stack(picked)
