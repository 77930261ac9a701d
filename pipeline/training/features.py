"""The frozen features a training worker reads: the feature stores (validated against the
feature-set keys the configuration implies), the live backbone for the masked-reference layer4,
and the identities recorded in inference checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import ConfigError, DataError
from pipeline.store.feature_set import FeatureSetKey, sha256_file
from pipeline.store.reader import FeatureStore, open_store
from pipeline.store.status import store_status
from pipeline.training.config import StoreSpec, TrainConfig
from refseg_models.checkpoint import RANDOM_INIT, EncoderIdentity
from refseg_models.encoders import build_encoder
from refseg_models.feature_spec import FeatureSpec

STORE_DTYPE = "float16"


def encoder_identity(spec: StoreSpec) -> EncoderIdentity:
    """(encoder id, weights sha256, preprocessing id, options) of a store spec, without loading weights:
    the encoder is built on the meta device only to read its ids."""
    with torch.device("meta"):
        encoder = build_encoder(spec.encoder, None, allow_random_init=True, **spec.options)
    sha = RANDOM_INIT if spec.checkpoint is None else sha256_file(spec.checkpoint)
    return EncoderIdentity(str(encoder.encoder_id), sha, str(encoder.preprocessing_id), dict(spec.options))


def expected_key(cfg: TrainConfig, role: str, identity: EncoderIdentity | None = None) -> FeatureSetKey:
    """The feature-set key the store of ``role`` must have for this configuration (``identity``: the
    encoder's, when known already)."""
    identity = identity or encoder_identity(getattr(cfg, role))
    return FeatureSetKey(cfg.feature_dataset, identity.encoder_id, identity.weights_sha256, identity.preprocessing_id, STORE_DTYPE,
                         getattr(cfg, role).precision)


def extraction_command(cfg: TrainConfig, role: str) -> str:
    """The ``refseg extract`` command that builds the store of ``role``."""
    spec: StoreSpec = getattr(cfg, role)
    parts = [
        "refseg extract", f"--output {spec.store}", f"--dataset {cfg.feature_dataset}", f"--encoder {spec.encoder}",
    ]
    if spec.checkpoint:
        parts.append(f"--checkpoint {spec.checkpoint}")
    if spec.precision != "float32":
        parts.append(f"--precision {spec.precision}")
    options = {**spec.options, **spec.path_options}
    if options:
        import json

        parts.append(f"--encoder-options '{json.dumps(options)}'")
    if cfg.dataset == "coco20i":
        parts.append(f"--coco-annotations {cfg.annotations} --image-dir {cfg.images}")
    else:
        parts.append(f"--image-dir {cfg.images}/JPEGImages")
    return " ".join(parts)


def store_exists(uri: str) -> bool:
    """Whether a finished store (its manifest, written last) is at ``uri``."""
    return store_status(uri).finished


def missing_store_error(cfg: TrainConfig, role: str) -> DataError:
    """The error for a store of ``role`` that is not finished: absent, or incomplete (an interrupted
    extraction, which the same command resumes), with the command that builds or resumes it."""
    spec: StoreSpec = getattr(cfg, role)
    status = store_status(spec.store)
    then = "the same command resumes it (finished shards are kept)" if status.incomplete else "build it with"
    return DataError(
        f"the {role} feature store {spec.store} {status.describe()}; {then}:\n  {extraction_command(cfg, role)}\n"
        "(or run the training job with --extract-missing)"
    )


@dataclass
class FrozenFeatures:
    stores: dict[str, FeatureStore]
    backbone: Any  # the live frozen backbone (masked-reference layer4), or None
    identities: dict[str, EncoderIdentity]

    @property
    def shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return {role: {k: tuple(v) for k, v in store.manifest.feature_shapes.items()} for role, store in self.stores.items()}

    def unchecksummed_note(self) -> str | None:
        """A line saying which stores hold entries without a crc32 (shards written before per-entry
        checksums: the reader checks their values are finite, but cannot detect flipped bytes)."""
        stores = {role: store for role, store in self.stores.items() if store.unchecksummed_entries}
        if not stores:
            return None
        listed = ", ".join(f"{role} {store.uri} ({store.unchecksummed_entries} entries)" for role, store in stores.items())
        return (f"warning: entries without a crc32 in {listed}: they were written before per-entry checksums, so a "
                "corrupted byte in them cannot be detected; extract those stores again into new locations")

    def manifest_sha256(self) -> dict[str, str]:
        import hashlib

        from pipeline.store.layout import MANIFEST_NAME

        return {
            role: hashlib.sha256(store.location.read_bytes(MANIFEST_NAME)).hexdigest() for role, store in self.stores.items()
        }


def open_frozen_features(
    cfg: TrainConfig, spec: FeatureSpec, image_ids: set[str] | None = None, live_backbone: bool = True,
    identities: Mapping[str, EncoderIdentity] | None = None,
) -> FrozenFeatures:
    """Open (and check) the stores ``spec`` reads; build the live backbone if it needs one.

    ``identities``: the encoders' identities when the driver computed them already (the training
    workers get them: no worker hashes a weights file or looks an encoder up by name to know them).

    Raises a clear error before any training step for a missing store (naming the extraction command
    that builds it), a store made with other weights / preprocessing / dtype than the configuration
    implies (every differing field named), a shard whose size is not the manifest's, and images the
    episodes need but the store lacks. Every feature read from the stores is then checked (crc32,
    finite values: :class:`~pipeline.store.reader.FeatureStore`), in training and in its evaluations.
    """
    stores: dict[str, FeatureStore] = {}
    known: dict[str, EncoderIdentity] = {}
    for role in spec.encoders:
        store_spec: StoreSpec = getattr(cfg, role)
        if not store_spec.encoder or not store_spec.store:
            raise ConfigError(f"{cfg.method} reads {role} features: configure the {role} encoder and its store")
        known[role] = (identities or {}).get(role) or encoder_identity(store_spec)
        if not store_exists(store_spec.store):
            raise missing_store_error(cfg, role)
        stores[role] = open_store(store_spec.store, expect=expected_key(cfg, role, known[role]))
        if image_ids is not None:
            missing = sorted(image_ids - set(stores[role].image_ids))
            if missing:
                raise DataError(
                    f"the {role} store {store_spec.store} lacks {len(missing)} image(s) the episodes need "
                    f"(e.g. {missing[:5]}): extract them into it (the same extraction command resumes)"
                )
    backbone = None
    if live_backbone and spec.masked_reference_layer4:
        b = cfg.backbone
        backbone = build_encoder(b.encoder, b.checkpoint, allow_random_init=b.checkpoint is None, **b.options, **b.path_options)
    return FrozenFeatures(stores, backbone, known)
