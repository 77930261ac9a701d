"""One typed, serialisable configuration per extraction run (recorded in the store's manifest)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import ConfigError
from pipeline.store.feature_set import SUPPORTED_PRECISIONS
from pipeline.store.layout import DEFAULT_TARGET_SHARD_BYTES

# Images per encoder call. On CPUs 8 (more only costs memory). On a GPU the batch must be large
# enough to keep it busy between chunks (the actor's per-chunk host work does not overlap its GPU
# work): sized so that the largest transient (ViT global attention: heads x 4096 x 4096 scores and
# bias per image, 0.4-0.5 GB in bf16, twice that in fp32) stays under ~20 GB, i.e. within an
# 80 GB card beside the weights. Estimates, not measurements: bench/gpu_suite.py sweeps the batch
# per encoder on a real card and the table follows its numbers (docs/scaling.md).
CPU_BATCH_SIZE = 8
GPU_BATCH_SIZES: tuple[tuple[str, int], ...] = (  # encoder id prefix -> batch (first match wins)
    ("sam_vit_h", 16),
    ("sam_vit_l", 16),
    ("sam_vit_b", 32),
    ("dinov2_vitl14", 16),
    ("dinov2_", 32),
    ("resnet50", 64),
    ("vgg16", 32),
    ("mobilenet_v2", 128),
)
GPU_BATCH_SIZE_FALLBACK = 16


def default_batch_size(encoder_id: str, on_gpu: bool) -> int:
    """Images per encoder call when none is given: :data:`CPU_BATCH_SIZE`, or the encoder's GPU batch."""
    if not on_gpu:
        return CPU_BATCH_SIZE
    for prefix, size in GPU_BATCH_SIZES:
        if encoder_id.startswith(prefix):
            return size
    return GPU_BATCH_SIZE_FALLBACK


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
    batch_size: int | None = None  # None: default_batch_size (8 on CPUs)
    precision: str = "float32"  # or "bfloat16": the encoder under bf16 autocast (part of the store's key)
    compile: bool = False  # torch.compile the encoder in each actor
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
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.precision not in SUPPORTED_PRECISIONS:
            raise ConfigError(f"precision must be one of {SUPPORTED_PRECISIONS}, got {self.precision!r}")
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
