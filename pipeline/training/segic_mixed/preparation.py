"""The mix's driver-side preparation (the job calls it before Ray starts, through
:func:`pipeline.training.sampler_registry.sampler_preparation`): its stores, then each part as data
in the fold's prepared artifact (the tables of :mod:`pipeline.training.segic_mixed.part`, semantic
label masks rendered once into the mask store), so the workers never open a source.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.training.config import TrainConfig
from pipeline.training.prepare import FoldWriter
from pipeline.training.segic_mixed.part import (
    CLASS_IMAGES_SCHEMA,
    IMAGES_SCHEMA,
    INSTANCES_SCHEMA,
    MIX_FILE,
    part_record,
)
from pipeline.training.segic_mixed.sources import ResolvedPart
from pipeline.training.segic_mixed.stores import prepare_stores


def prepare_mix(cfg: TrainConfig, data: Any, writer: FoldWriter, extract_missing: bool, workers: int = 1,
                extract: Any = None) -> list[ResolvedPart]:
    """Make sure the mix's stores exist (:func:`~pipeline.training.segic_mixed.stores.prepare_stores`)
    and add its parts to ``writer``; returns the resolved parts."""
    resolved = prepare_stores(cfg, data, extract_missing, workers, extract)
    records = []
    for index, one in enumerate(resolved):
        folder = _write_part(writer, index, one)
        records.append(part_record(one.part, folder))
    writer.add_json(MIX_FILE, records)
    return resolved


def _write_part(writer: FoldWriter, index: int, resolved: ResolvedPart) -> str | None:
    """Part ``index``'s tables (and, for semantic data, its label masks); the masks' folder or None."""
    part = resolved.part
    eligible = dict.fromkeys(part.images)
    rows = [{"image_id": image, "height": part.sizes[image][0], "width": part.sizes[image][1], "eligible": True,
             "classes": part.image_classes.get(image, []), "present": part.present.get(image, [])} for image in eligible]
    rows += [{"image_id": image, "height": part.sizes[image][0], "width": part.sizes[image][1], "eligible": False,
              "classes": [], "present": part.present.get(image, [])}
             for image in sorted(set(part.sizes) - set(eligible))]
    writer.add_table(f"mix_{index}_images", pa.Table.from_pylist(rows, IMAGES_SCHEMA))
    if not part.semantic:
        instances = [{"image_id": image, "class_id": i.class_id, "rle": i.rle, "height": i.height, "width": i.width}
                     for image, listed in part.instances.items() for i in listed]
        writer.add_table(f"mix_{index}_instances", pa.Table.from_pylist(instances, INSTANCES_SCHEMA))
        return None
    pairs = [{"class_id": c, "image_id": image} for c, images in part.class_images.items() for image in images]
    writer.add_table(f"mix_{index}_class_images", pa.Table.from_pylist(pairs, CLASS_IMAGES_SCHEMA))
    keys = [(row["image_id"], row["class_id"]) for row in pairs]
    return writer.add_masks(f"mix_{index}_masks", resolved.source, keys, resolved.masks)
