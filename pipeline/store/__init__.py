"""Feature store: sharded WebDataset tars of fp16 ``.npy`` features + Parquet index + manifest.

See ``docs/feature_store.md``. Public API::

    key = FeatureSetKey(dataset, encoder_id, weights_sha256, preprocessing_id, dtype="float16")
    store = open_store("stores/coco_mini-mobilenet_v2", expect=key)   # refuses another feature set
    store.get(image_id)            # {name: C x h x w np.float16}, bounded LRU cache
    store.get_batch([q, s1, s2])   # {name: B x C x h x w torch tensor}
    store.stream()                 # WebDataset pipeline, split by node then worker
    verify_store(uri)              # every index entry readable, shapes/dtypes/counts as the manifest says
"""

from pipeline.store.builder import StoreBuilder
from pipeline.store.feature_set import (
    RANDOM_INIT_WEIGHTS,
    FeatureSetKey,
    StoreMismatchError,
    check_key,
    sha256_file,
)
from pipeline.store.fs import Location, resolve_location
from pipeline.store.layout import ImageItem, images_per_shard_for, plan_shards, sorted_items
from pipeline.store.manifest import Manifest
from pipeline.store.online import OnlineFeatures, default_feature_mode, feature_provider
from pipeline.store.reader import FeatureStore, open_store
from pipeline.store.verify import VerifyReport, verify_store
from pipeline.store.version import code_version

__all__ = [
    "RANDOM_INIT_WEIGHTS",
    "FeatureSetKey",
    "FeatureStore",
    "ImageItem",
    "Location",
    "Manifest",
    "OnlineFeatures",
    "StoreBuilder",
    "StoreMismatchError",
    "VerifyReport",
    "check_key",
    "code_version",
    "default_feature_mode",
    "feature_provider",
    "images_per_shard_for",
    "open_store",
    "plan_shards",
    "resolve_location",
    "sha256_file",
    "sorted_items",
    "verify_store",
]
