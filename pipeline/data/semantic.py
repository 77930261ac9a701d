"""Label-PNG datasets: PASCAL VOC + SBD (SegmentationClassAug), ADE20k (150 classes), FSS-1000."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.base import IGNORE_INDEX, SegmentationSource
from pipeline.data.folds import PASCAL_CLASS_NAMES
from pipeline.data.images import load_label_png, load_rgb
from pipeline.errors import DataError


class _LabelPngSource(SegmentationSource):
    """A source whose targets are per-image label PNGs: class id ``c`` is stored as ``c + offset``."""

    label_offset = 1
    ignore_labels: tuple[int, ...] = (IGNORE_INDEX,)

    def __init__(self, root: str | Path, names: Sequence[str]):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.name}: dataset folder not found: {self.root}")
        self._names = list(names)
        self._name_set = set(self._names)
        self._labels = lru_cache(maxsize=256)(self._read_labels)

    def image_ids(self) -> list[str]:
        return list(self._names)

    def key(self, image_id: Hashable | str) -> str:
        key = str(image_id)
        if key not in self._name_set:
            raise DataError(f"{self.name}: image {key!r} is not in this dataset ({self.root})")
        return key

    def label_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def _read_labels(self, image_id: str) -> np.ndarray:
        labels = load_label_png(self.label_path(image_id))
        valid = ~np.isin(labels, self.ignore_labels)
        if valid.any() and int(labels[valid].max()) >= self.num_classes + self.label_offset:
            raise DataError(
                f"{self.label_path(image_id)}: label {int(labels[valid].max())} exceeds the "
                f"{self.num_classes} classes of {self.name}"
            )
        return labels

    def render_class_mask(self, image_id: Hashable, class_id: int) -> np.ndarray:
        labels = self._labels(image_id)
        mask = (labels == class_id + self.label_offset).astype(np.uint8)
        mask[np.isin(labels, self.ignore_labels)] = IGNORE_INDEX
        return mask

    def classes_in_image(self, image_id: Hashable) -> list[int]:
        labels = self._labels(self.key(image_id))
        present = np.unique(labels[~np.isin(labels, self.ignore_labels)])
        return sorted(int(label) - self.label_offset for label in present if label >= self.label_offset)


class PascalVocAug(_LabelPngSource):
    """PASCAL VOC 2012 + SBD: ``root/JPEGImages/<name>.jpg``, ``root/SegmentationClassAug/<name>.png``.

    PNG value 0 = background, 1..20 = VOC classes (class id = value - 1), 255 = boundary (ignore).
    ``names`` defaults to every PNG in SegmentationClassAug.
    """

    name = "pascal_voc_aug"
    class_names = list(PASCAL_CLASS_NAMES)

    def __init__(self, root: str | Path, names: Sequence[str] | None = None):
        root = Path(root)
        if names is None:
            label_dir = root / "SegmentationClassAug"
            if not label_dir.is_dir():
                raise DataError(f"{self.name}: label folder not found: {label_dir}")
            names = sorted(path.stem for path in label_dir.glob("*.png"))
        super().__init__(root, names)

    def image_path(self, image_id: Hashable) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def label_path(self, image_id: str) -> Path:
        return self.root / "SegmentationClassAug" / f"{image_id}.png"


class Ade20k(_LabelPngSource):
    """ADEChallengeData2016 (150 classes): ``root/images/<split>/*.jpg``, ``root/annotations/<split>/*.png``.

    PNG value 0 = "other / unlabelled" and is ignored (neither a class nor certain background),
    1..150 = classes (class id = value - 1). ``class_names`` from ``root/objectInfo150.csv`` when
    present, else ``class_<i>``.
    """

    name = "ade20k"
    ignore_labels = (0, IGNORE_INDEX)

    def __init__(self, root: str | Path, split: str = "training"):
        root = Path(root)
        self.split = split
        label_dir = root / "annotations" / split
        if not label_dir.is_dir():
            raise DataError(f"{self.name}: label folder not found: {label_dir}")
        self.class_names = self._read_class_names(root)
        super().__init__(root, sorted(path.stem for path in label_dir.glob("*.png")))

    @staticmethod
    def _read_class_names(root: Path) -> list[str]:
        info = root / "objectInfo150.csv"
        if not info.is_file():
            return [f"class_{index}" for index in range(150)]
        rows = info.read_text().strip().splitlines()[1:]
        names = [row.split(",")[-1].split(";")[0].strip() for row in rows]
        if len(names) != 150:
            raise DataError(f"{info}: expected 150 classes, found {len(names)}")
        return names

    def image_path(self, image_id: Hashable) -> Path:
        return self.root / "images" / self.split / f"{image_id}.jpg"

    def label_path(self, image_id: str) -> Path:
        return self.root / "annotations" / self.split / f"{image_id}.png"


class Fss1000(SegmentationSource):
    """FSS-1000: one folder per class, ``root/<class>/<n>.jpg`` with a mask ``<n>.png`` (white = object).

    Image id = ``"<class>/<n>"``; each image carries exactly its folder's class.
    ``classes`` restricts to a split's class list (HSNet ships trn/val/test lists of folder names).
    """

    name = "fss1000"

    def __init__(self, root: str | Path, classes: Sequence[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.name}: dataset folder not found: {self.root}")
        available = sorted(path.name for path in self.root.iterdir() if path.is_dir())
        if classes is not None:
            missing = sorted(set(classes) - set(available))
            if missing:
                raise DataError(f"{self.name}: class folders missing under {self.root}: {missing[:5]}")
        self.class_names = sorted(classes) if classes is not None else available
        self._class_of_name = {name: index for index, name in enumerate(self.class_names)}
        self._ids = [
            f"{name}/{path.stem}"
            for name in self.class_names
            for path in sorted((self.root / name).glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))
        ]
        self._id_set = set(self._ids)

    def image_ids(self) -> list[str]:
        return list(self._ids)

    def key(self, image_id: Hashable | str) -> str:
        key = str(image_id)
        if key not in self._id_set:
            raise DataError(f"{self.name}: image {key!r} not found under {self.root}")
        return key

    def image_path(self, image_id: Hashable) -> Path:
        return self.root / f"{image_id}.jpg"

    def classes_in_image(self, image_id: Hashable) -> list[int]:
        return [self._class_of_name[str(self.key(image_id)).split("/")[0]]]

    def images_of_class(self, class_id: int) -> list[str]:
        self._check_class(class_id)
        prefix = self.class_names[class_id] + "/"
        return [image_id for image_id in self._ids if image_id.startswith(prefix)]

    def render_class_mask(self, image_id: Hashable, class_id: int) -> np.ndarray:
        mask = self._object_mask(image_id)
        if self.classes_in_image(image_id) != [class_id]:
            return np.zeros(mask.shape, dtype=np.uint8)
        return mask.astype(np.uint8)

    def _object_mask(self, image_id: Hashable) -> np.ndarray:
        """The ``<n>.png`` mask at its image's size. A few FSS-1000 masks are stored at another size
        than their image (the SegIC authors skip such samples); resized (nearest), the mask stays
        aligned with the image the features are computed from."""
        mask = load_rgb(self.root / f"{image_id}.png")[..., 0] >= 128  # masks are stored as RGB or L PNGs
        with Image.open(self.image_path(image_id)) as image:
            width, height = image.size
        if mask.shape != (height, width):
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
            mask = np.asarray(resized) >= 128
        return mask
