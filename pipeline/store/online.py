"""Features for training: from a store (cache mode) or computed live (online mode), one interface.

Both providers return the numbers a store would hold: the encoder's own ``preprocess``, one forward,
then the same ``tensor.to(dtype)`` cast the extraction stage does. The default mode per encoder is
decided by measurement (``bench/bench_store_reads.py``, numbers in ``docs/feature_store.md``):

* SAM image encoders and DINOv2 (hundreds of GFLOPs per image, 2 MiB fp16 per image): ``cache``.
* ResNet-50 / VGG-16 taps at 512 (layer2+3+4 = 28 MiB fp16 per image, ~2.4 TB for COCO train2014;
  VRP-SAM needs the live ``layer4`` anyway for the masked-support pseudo mask): ``online``.
* MobileNetV2 (1.1 MB per image, read in ~0.3 ms; 0.8-3.6 s per image on this 2-core CPU): ``cache``.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.store.feature_set import FeatureSetKey
from pipeline.store.layout import ImageItem
from pipeline.store.reader import DEFAULT_CACHE_BYTES, FeatureStore

# encoder id prefix -> default mode (first match wins); see the module docstring for the numbers.
DEFAULT_FEATURE_MODES: tuple[tuple[str, str], ...] = (
    ("sam_", "cache"),
    ("dinov2_", "cache"),
    ("mobilenet_v2", "cache"),
    ("resnet50", "online"),
    ("vgg16", "online"),
)


def default_feature_mode(encoder_id: str) -> str:
    for prefix, mode in DEFAULT_FEATURE_MODES:
        if encoder_id.startswith(prefix):
            return mode
    return "online"  # unknown encoders: never assume a cache exists


class FeatureProvider(Protocol):
    """What training code calls: same results whether features are cached or computed."""

    feature_names: list[str]

    def get(self, image_id: object, features: Sequence[str] | None = None) -> dict[str, np.ndarray]: ...

    def get_batch(
        self, image_ids: Sequence[object], features: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]: ...


class OnlineFeatures:
    """Compute features on demand with a live frozen encoder.

    ``images``: ``{image_id: path}`` or :class:`ImageItem` list. ``load_image``: path -> HxWx3 uint8
    (default :func:`pipeline.data.images.load_rgb`). Results are cast to ``dtype`` exactly as a store
    holds them; they come back on the CPU from :meth:`get` and on ``device`` from :meth:`get_batch`.
    """

    def __init__(
        self,
        encoder: Any,
        images: Mapping[str, str] | Sequence[ImageItem],
        *,
        dtype: str = "float16",
        device: str | torch.device = "cpu",
        load_image: Any = None,
    ) -> None:
        from pipeline.data.images import load_rgb

        self.encoder = encoder.to(device) if hasattr(encoder, "to") else encoder
        self.device = torch.device(device)
        if isinstance(images, Mapping):
            self.paths = {str(image_id): str(path) for image_id, path in images.items()}
        else:
            self.paths = {item.image_id: item.path for item in images}
        self.torch_dtype = getattr(torch, dtype)
        self.load_image = load_image or load_rgb
        self.feature_names = sorted(encoder.output_shapes())

    def _path(self, image_id: object) -> str:
        key = str(image_id)
        if key not in self.paths:
            raise KeyError(f"image {key!r} is not among the {len(self.paths)} images of this online feature source")
        return self.paths[key]

    def get_batch(self, image_ids: Sequence[object], features: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        names = list(features) if features is not None else self.feature_names
        pixels = torch.stack([self.encoder.preprocess(self.load_image(self._path(i))) for i in image_ids])
        with torch.inference_mode():
            out = self.encoder(pixels.to(self.device))
        return {name: out[name].to(self.torch_dtype) for name in names}

    def get(self, image_id: object, features: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return {name: value[0].cpu().numpy() for name, value in self.get_batch([image_id], features).items()}


def feature_provider(
    mode: str,
    *,
    store_uri: str | None = None,
    expect: FeatureSetKey | None = None,
    encoder: Any = None,
    images: Mapping[str, str] | Sequence[ImageItem] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    device: str = "cpu",
    filesystem: Any = None,
) -> FeatureProvider:
    """``mode="cache"``: the store at ``store_uri`` (validated against ``expect``, which is required so
    a stale cache can never be used silently, and against ``encoder.output_shapes()`` when an encoder
    is given); ``mode="online"``: ``encoder`` over ``images``."""
    if mode == "cache":
        if store_uri is None or expect is None:
            raise ConfigError("cache mode needs store_uri and the expected feature-set key (expect=...)")
        shapes = encoder.output_shapes() if encoder is not None else None
        return FeatureStore(
            store_uri, expect=expect, expect_shapes=shapes, filesystem=filesystem, cache_bytes=cache_bytes
        )
    if mode == "online":
        if encoder is None or images is None:
            raise ConfigError("online mode needs the live encoder and the image paths")
        dtype = expect.dtype if expect is not None else "float16"
        return OnlineFeatures(encoder, images, dtype=dtype, device=device)
    raise ConfigError(f"feature mode must be 'cache' or 'online', got {mode!r}")
