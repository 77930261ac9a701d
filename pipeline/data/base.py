"""What every segmentation source offers the episode builder and the feature extractor.

A source maps (image id, class id) to a binary target mask with an ignore label:
``0`` = background, ``1`` = the class, ``255`` = ignore (COCO crowd regions, VOC boundaries,
ADE20k's unlabelled pixels). Class ids are dense 0-based indices; ``class_names[i]`` names class i.
Image ids are strings in manifests; each source normalises them with :meth:`key`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

from pipeline.data.images import load_rgb
from pipeline.errors import DataError

IGNORE_INDEX = 255
# PFENet/HSNet's rule for which (image, class) pairs exist when no official list is given.
MIN_PAIR_PIXELS = 2 * 32 * 32


class SegmentationSource(ABC):
    name: str
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def image_ids(self) -> list[Hashable]:
        """All image ids of the source, in a stable order."""

    @abstractmethod
    def image_path(self, image_id: Hashable) -> Path:
        """The image file of ``image_id``."""

    @abstractmethod
    def render_class_mask(self, image_id: Hashable, class_id: int) -> np.ndarray:
        """Render the ``H x W`` uint8 {0, 1, 255} mask of ``class_id`` in ``image_id`` (uncached)."""

    @abstractmethod
    def classes_in_image(self, image_id: Hashable) -> list[int]:
        """Class ids with at least one (non-ignored) pixel in the image, sorted."""

    def key(self, image_id: Hashable | str) -> Hashable:
        """Normalise an image id read from a manifest (always a string there) to this source's key."""
        return image_id

    def load_image(self, image_id: Hashable) -> np.ndarray:
        return load_rgb(self.image_path(self.key(image_id)))

    def class_mask(self, image_id: Hashable, class_id: int) -> np.ndarray:
        self._check_class(class_id)
        return self.render_class_mask(self.key(image_id), class_id)

    def images_of_class(self, class_id: int) -> list[Hashable]:
        self._check_class(class_id)
        return [image_id for image_id in self.image_ids() if class_id in self.classes_in_image(image_id)]

    def _check_class(self, class_id: int) -> None:
        if not 0 <= int(class_id) < self.num_classes:
            raise DataError(f"{self.name}: class id {class_id} out of range [0, {self.num_classes})")


def pairs_by_pixel_rule(
    source: SegmentationSource, class_ids: Sequence[int] | None = None, min_pixels: int = MIN_PAIR_PIXELS
) -> dict[int, list[Hashable]]:
    """Fallback pair lists: {class id: images whose class mask has >= ``min_pixels`` foreground pixels}.

    This is PFENet's rule that HSNet's lists roughly follow (docs/protocol.md: 10 of 684 checked pairs
    disagree), so it is used only for datasets without official lists.
    """
    wanted = set(range(source.num_classes) if class_ids is None else class_ids)
    pairs: dict[int, list[Hashable]] = {class_id: [] for class_id in sorted(wanted)}
    for image_id in source.image_ids():
        for class_id in source.classes_in_image(image_id):
            if class_id in wanted and int((source.class_mask(image_id, class_id) == 1).sum()) >= min_pixels:
                pairs[class_id].append(image_id)
    return pairs
