"""Episodes as data: HSNet-identical test episodes, seeded manifests, reference annotations.

The names below are imported on first use: the training workers import ``manifest`` and
``annotations`` and must not load the HSNet list readers (``hsnet``, pipeline/data/splits.py).
"""

from refseg_models.registry import Registry

_EXPORTS = Registry("name in pipeline.episodes", {
    "ANNOTATION_TYPES": "pipeline.episodes.annotations:ANNOTATION_TYPES",
    "reference_annotation": "pipeline.episodes.annotations:reference_annotation",
    "HsnetEpisode": "pipeline.episodes.hsnet:HsnetEpisode",
    "hsnet_pascal_test_episodes": "pipeline.episodes.hsnet:hsnet_pascal_test_episodes",
    "hsnet_test_episodes": "pipeline.episodes.hsnet:hsnet_test_episodes",
    "MANIFEST_SCHEMA": "pipeline.episodes.manifest:MANIFEST_SCHEMA",
    "build_episode_manifest": "pipeline.episodes.manifest:build_episode_manifest",
    "build_every_query_manifest": "pipeline.episodes.manifest:build_every_query_manifest",
    "manifest_from_hsnet": "pipeline.episodes.manifest:manifest_from_hsnet",
    "read_manifest": "pipeline.episodes.manifest:read_manifest",
    "write_manifest": "pipeline.episodes.manifest:write_manifest",
}, error=AttributeError)
__all__ = _EXPORTS.names()


def __getattr__(name: str) -> object:
    return _EXPORTS.get(name)
