"""The mix's stores (driver side, before Ray starts): each source's store exists, holds the plain
images and cached views the fold's sampler reads, and is extracted (views planned and rendered
first) with ``--extract-missing``.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.extraction.encoder_source import RegistryEncoder
from pipeline.extraction.stage import extract_store
from pipeline.report import SkipReport
from pipeline.store.reader import open_store
from pipeline.store.status import store_status
from pipeline.training.config import TrainConfig
from pipeline.training.features import expected_key, store_exists
from pipeline.training.segic_mixed.part import load_plans, needed_ids
from pipeline.training.segic_mixed.sources import ResolvedPart, all_images, build_parts, image_size
from pipeline.training.views import plan_views, read_plan, render_view_items, write_plan


def prepare_stores(
    cfg: TrainConfig, data: Any, extract_missing: bool, workers: int = 1, extract: Any = None
) -> list[ResolvedPart]:
    """Driver side, before Ray: make sure every source's store exists (with ``extract_missing``:
    write the view plan, render the views, extract plain images + views in one run) and holds what
    the fold's sampler reads. Returns the resolved parts. ``extract``: the extraction function
    (default :func:`pipeline.extraction.stage.extract_store`, the Ray stage)."""
    report = SkipReport(f"segic mix, fold {cfg.fold}")
    resolved = build_parts(cfg, data, report)
    report.print()
    by_store: dict[str, list[ResolvedPart]] = {}
    for one in resolved:
        by_store.setdefault(one.part.store_uri, []).append(one)
    for uri, group in by_store.items():
        if not store_exists(uri):
            if not extract_missing:
                raise DataError(
                    f"the feature store {uri} of mix source(s) {', '.join(p.name for p in group)} "
                    f"{store_status(uri).describe()}: run the training job with --extract-missing (it writes the view "
                    "plan, renders the cached views and extracts them with the plain images; an incomplete store is "
                    "resumed)"
                )
            _extract(cfg, data, uri, group, workers, extract)
        parts = [one.part for one in group]
        store = open_store(uri, expect=replace(expected_key(cfg, "backbone"), dataset=parts[0].feature_dataset))
        load_plans(parts)
        have = set(store.image_ids)
        for part in parts:
            plain, views = needed_ids(part)
            missing = sorted((plain | views) - have)
            if missing:
                raise DataError(
                    f"the store {uri} lacks {len(missing)} image(s) / view(s) mix source {part.name!r} reads "
                    f"(e.g. {missing[:5]}); a finished store cannot grow: extract a new one (--extract-missing)"
                )
    return resolved


def _extract(cfg: TrainConfig, data: Any, uri: str, group: list[ResolvedPart], workers: int, extract: Any = None) -> None:
    extract = extract or extract_store
    items: dict[str, str] = {}
    if uri == cfg.backbone.store and cfg.dataset == "coco20i":
        for image_id in data.source.image_ids():  # everything the fold's evaluation reads, too
            items[str(image_id)] = str(data.source.image_path(image_id))
    viewed = [one for one in group if one.part.views]
    for one in group:
        if one.part.semantic or not one.part.views:
            for image_id in all_images(one):
                items.setdefault(image_id, str(one.source.image_path(one.source.key(image_id))))
    render_dir = None
    if viewed:
        first = viewed[0].part
        images: dict[str, ResolvedPart] = {}
        for one in viewed:
            for image_id in all_images(one):
                images.setdefault(image_id, one)
        sizes = {image_id: image_size(one.source, image_id) for image_id, one in images.items()}
        plan = plan_views(sizes, first.views, first.spec.view_seed, first.augmentation)
        plan_path = Path(first.plan_path)
        if plan_path.is_file():
            if read_plan(plan_path) != plan:
                raise DataError(f"{plan_path} holds another view plan than the configuration draws: remove it or point view_plan elsewhere")
        else:
            plan_path.parent.mkdir(parents=True, exist_ok=True)
            write_plan(plan, plan_path)
        render_dir = Path(f"{uri.rstrip('/')}.renders")
        print(f"rendering {len(plan)} cached views of {len(images)} images into {render_dir} ...", flush=True)

        def load(image_id: str) -> np.ndarray:
            source = images[image_id].source
            return source.load_image(source.key(image_id))

        for key, path in render_view_items(plan, load, render_dir):
            items[key] = path
    b = cfg.backbone
    encoder = RegistryEncoder(b.encoder, b.checkpoint, b.checkpoint is None, {**b.options, **b.path_options})
    print(f"extracting {len(items)} images / views into {uri} ({b.encoder}) ...", flush=True)
    summary = extract(
        sorted(items.items()), uri, encoder, group[0].part.feature_dataset, num_actors=workers, progress=False,
        precision=b.precision, config={"segic_mix": [one.part.spec.to_dict() for one in group]},
    )
    print(summary.text(), flush=True)
    if summary.failed:
        raise DataError(f"extraction of {uri}: {summary.failed} image(s) failed")
    if render_dir is not None:
        shutil.rmtree(render_dir, ignore_errors=True)  # rendered PNGs are only extraction input
