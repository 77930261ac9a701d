"""One typed, serialisable configuration per extraction run (recorded in the store's manifest)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import ConfigError
from pipeline.store.layout import DEFAULT_TARGET_SHARD_BYTES


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything ``extract`` needs; ``asdict`` of it is written into ``manifest.json``.

    Image source: ``coco_annotations`` + ``image_dir`` (COCO/LVIS json), or ``image_list``
    (``id<TAB>path`` lines), or ``image_dir`` alone (every image file, id = stem).
    """

    output: str
    dataset: str
    encoder: str
    checkpoint: str | None = None
    allow_random_init: bool = False
    encoder_options: dict[str, Any] = field(default_factory=dict)
    coco_annotations: str | None = None
    image_dir: str | None = None
    image_list: str | None = None
    limit: int | None = None
    dtype: str = "float16"
    batch_size: int = 8
    target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES
    images_per_shard: int | None = None
    num_actors: int = 1
    actor_num_cpus: float = 1.0
    decode_num_cpus: float = 1.0
    num_gpus_per_actor: float | None = None
    ray_address: str | None = None
    writer: str = "driver"
    progress: bool = True
    retry_failed: bool = True

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"limit must be positive, got {self.limit}")
        if self.images_per_shard is not None and self.images_per_shard <= 0:
            raise ConfigError(f"images_per_shard must be positive, got {self.images_per_shard}")
        if self.writer not in ("driver", "actors"):
            raise ConfigError(f"writer must be 'driver' or 'actors', got {self.writer!r}")
        if self.num_actors <= 0 or self.actor_num_cpus <= 0 or self.decode_num_cpus <= 0:
            raise ConfigError("num_actors, actor_num_cpus and decode_num_cpus must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)
