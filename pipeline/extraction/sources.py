"""Image lists for extraction: ``(image_id, path)`` pairs from COCO/LVIS jsons, folders or list files."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import ConfigError, DataError
from pipeline.store.layout import ImageItem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def coco_items(annotation_file: str | Path, image_dir: str | Path) -> list[ImageItem]:
    """Every image of a COCO-style json (COCO, LVIS): id -> ``image_dir / file_name``.

    Only the ``images`` list is read (no pycocotools index), so this is cheap even for LVIS.
    Missing files are not checked here: extraction records them as failures.
    """
    annotation_file = Path(annotation_file)
    if not annotation_file.is_file():
        raise DataError(f"annotation file not found: {annotation_file}")
    try:
        images = json.loads(annotation_file.read_text())["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{annotation_file}: not a COCO-style json with an 'images' list ({error!r})") from error
    items = []
    for image in images:
        try:
            name = image.get("file_name") or Path(image["coco_url"]).name  # LVIS has coco_url only
            items.append(ImageItem(str(image["id"]), str(Path(image_dir) / name)))
        except (KeyError, TypeError, AttributeError) as error:
            raise DataError(f"{annotation_file}: image entry {image!r} has no id/file_name") from error
    if not items:
        raise DataError(f"{annotation_file}: its 'images' list is empty: nothing to extract")
    return items


def folder_items(image_dir: str | Path) -> list[ImageItem]:
    """Every image file directly in ``image_dir``; id = file stem (ADE20k, custom folders)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder not found: {image_dir}")
    items = [
        ImageItem(path.stem, str(path))
        for path in sorted(image_dir.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise DataError(
            f"image folder {image_dir} holds no image file ({', '.join(IMAGE_SUFFIXES)}) directly in it: nothing to "
            "extract (sub-folders are not searched)"
        )
    return items


def list_file_items(list_file: str | Path, root: str | Path | None = None) -> list[ImageItem]:
    """A text file of ``image_id<TAB>path`` lines (paths relative to ``root`` or the list's folder)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"image list not found: {list_file}")
    base = Path(root) if root is not None else list_file.parent
    items = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"{list_file}:{number}: expected 'image_id<TAB>path', got {line!r}")
        items.append(ImageItem(parts[0].strip(), str(base / parts[1].strip())))
    if not items:
        raise DataError(f"image list {list_file} lists no image: nothing to extract")
    return items


def items_from_args(
    coco_annotations: str | None, image_dir: str | None, image_list: str | None
) -> list[ImageItem]:
    if coco_annotations:
        if not image_dir:
            raise ConfigError("--coco-annotations needs --image-dir")
        return coco_items(coco_annotations, image_dir)
    if image_list:
        return list_file_items(image_list, image_dir)
    if image_dir:
        return folder_items(image_dir)
    raise ConfigError("give an image source: --coco-annotations + --image-dir, --image-list, or --image-dir")
