"""``ExtractionConfig`` -> image list + encoder -> :func:`extract_store` (what the CLI and the job call)."""

from __future__ import annotations

from pipeline.extraction.config import ExtractionConfig
from pipeline.extraction.encoder_source import RegistryEncoder
from pipeline.extraction.sources import items_from_args
from pipeline.extraction.stage import ExtractionSummary, extract_store
from pipeline.store.layout import sorted_items


def run_extraction(config: ExtractionConfig) -> ExtractionSummary:
    items = sorted_items(items_from_args(config.coco_annotations, config.image_dir, config.image_list))
    if config.limit is not None:
        items = items[: config.limit]  # the first N by id: a stable subset for demos/benchmarks
    encoder = RegistryEncoder(
        config.encoder, config.checkpoint, config.allow_random_init, dict(config.encoder_options)
    )
    return extract_store(
        items,
        config.output,
        encoder,
        config.dataset,
        dtype=config.dtype,
        batch_size=config.batch_size,
        precision=config.precision,
        compile=config.compile,
        target_shard_bytes=config.target_shard_bytes,
        images_per_shard=config.images_per_shard,
        num_actors=config.num_actors,
        actor_num_cpus=config.actor_num_cpus,
        decode_num_cpus=config.decode_num_cpus,
        num_gpus_per_actor=config.num_gpus_per_actor,
        config={"extraction": config.to_dict()},
        progress=config.progress,
        ray_address=config.ray_address,
        writer=config.writer,
        retry_failed=config.retry_failed,
    )
