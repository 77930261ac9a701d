"""SegIC's negative-entity queue (the authors' ``--add_neg_prompt``).

Instance features of classes ABSENT from a target, taken from a per-class queue of past instance
features (``que_len`` 128), are decoded as extra instructions whose ground truth is an empty mask,
with loss weight 0.1 (:class:`refseg_models.criterion.SegICCriterion`). Context reversion lives in
:meth:`refseg_models.modeling.segic.SegIC.forward`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Mapping, Sequence

import torch

from refseg_models.errors import ModelError


class InstanceFeatureQueue:
    """Per-class FIFO of detached instance features, the source of negative entities.

    ``push`` after each step with the classes and instance features (``outputs["prototypes"]``) of
    the batch; ``sample_negatives`` draws one stored feature from each of up to ``max_negatives``
    random classes absent from a target. Pure torch, CPU storage.
    """

    def __init__(self, max_per_class: int = 128) -> None:
        if max_per_class < 1:
            raise ModelError(f"max_per_class must be >= 1, got {max_per_class}")
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
            raise ModelError(
                f"push expects N class ids and N x C features, got {len(class_ids)} ids and "
                f"{tuple(features.shape)}"
            )
        for class_id, feature in zip(class_ids, features.detach().cpu()):
            queue = self._queues.setdefault(int(class_id), deque(maxlen=self.max_per_class))
            queue.append(feature.clone())

    def nbytes(self) -> int:
        """Bytes held by the stored features (the queue's memory, excluding Python overhead)."""
        return sum(f.numel() * f.element_size() for q in self._queues.values() for f in q)

    def state_dict(self) -> dict[str, Any]:
        """The contents (``torch.load(weights_only=True)``-safe): per class, its features oldest
        first as one n x C tensor."""
        return {
            "max_per_class": self.max_per_class,
            "classes": [int(c) for c in self.classes],
            "features": [torch.stack(list(self._queues[c])) for c in self.classes],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the contents with :meth:`state_dict` output (same order, same FIFO position)."""
        try:
            max_per_class, classes, features = int(state["max_per_class"]), list(state["classes"]), list(state["features"])
        except (KeyError, TypeError) as error:
            raise ModelError(f"not an InstanceFeatureQueue state: {error!r}") from error
        if max_per_class != self.max_per_class:
            raise ModelError(f"queue state holds {max_per_class} features per class, this queue {self.max_per_class}")
        if len(classes) != len(features):
            raise ModelError("queue state: classes and features differ in length")
        self._queues = {}
        for class_id, stacked in zip(classes, features):
            queue = self._queues.setdefault(int(class_id), deque(maxlen=self.max_per_class))
            for feature in stacked:
                queue.append(feature.detach().cpu().clone())

    def sample_from(
        self, candidates: Iterable[int], max_negatives: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Up to ``max_negatives`` features (n x C), each from a different class among ``candidates``
        that has stored features (classes drawn at random, then one random feature of each); the
        authors' negatives for a target are drawn from the classes absent from it this way."""
        wanted = sorted({int(c) for c in candidates})
        stored = [c for c in wanted if self._queues.get(c)]
        if not stored or max_negatives <= 0:
            width = next((q[0].shape[0] for q in self._queues.values() if q), 0)
            return torch.zeros(0, width)
        order = torch.randperm(len(stored), generator=generator)[:max_negatives].tolist()
        picked = []
        for i in order:
            queue = self._queues[stored[i]]
            j = int(torch.randint(len(queue), (), generator=generator))
            picked.append(queue[j])
        return torch.stack(picked)

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
