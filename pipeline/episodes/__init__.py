"""Episodes as data: HSNet-identical test episodes, seeded manifests, reference annotations."""

from pipeline.episodes.annotations import ANNOTATION_TYPES, reference_annotation
from pipeline.episodes.hsnet import HsnetEpisode, hsnet_pascal_test_episodes, hsnet_test_episodes
from pipeline.episodes.manifest import (
    MANIFEST_SCHEMA,
    build_episode_manifest,
    build_every_query_manifest,
    manifest_from_hsnet,
    read_manifest,
    write_manifest,
)

__all__ = [
    "ANNOTATION_TYPES",
    "MANIFEST_SCHEMA",
    "HsnetEpisode",
    "build_episode_manifest",
    "build_every_query_manifest",
    "hsnet_pascal_test_episodes",
    "hsnet_test_episodes",
    "manifest_from_hsnet",
    "read_manifest",
    "reference_annotation",
    "write_manifest",
]
