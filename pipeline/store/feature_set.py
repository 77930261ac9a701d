"""The feature-set key: what a store's features are a function of.

Two stores hold interchangeable features only if every field of the key agrees. Anything that
changes the numbers (other weights, other preprocessing, other dtype) must change the key, so a
stale cache is refused with a message instead of being used silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline.errors import ConfigError, DataError

# dtypes a store may hold; .npy has no bfloat16, and fp16 is the default (half the bytes of fp32).
SUPPORTED_DTYPES = ("float16", "float32")

# Weights marker for encoders built without a checkpoint (tests, benchmarks): never a real cache.
RANDOM_INIT_WEIGHTS = "random-init"


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (a weights file: the store key names weights by content)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file not found: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FeatureSetKey:
    """(dataset, encoder id, weights sha256, preprocessing id, dtype): the identity of a feature set."""

    dataset: str
    encoder_id: str
    weights_sha256: str
    preprocessing_id: str
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"feature-set key field {item.name!r} must be a non-empty string, got {value!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"feature-set dtype {self.dtype!r} is not supported; use one of {SUPPORTED_DTYPES}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "feature-set key") -> "FeatureSetKey":
        names = {item.name for item in fields(cls)}
        missing = sorted(names - set(data))
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise DataError(f"{source}: missing fields {missing}, unknown fields {unknown}")
        return cls(**data)

    def differences(self, requested: "FeatureSetKey") -> list[str]:
        """Human-readable list of fields where ``requested`` differs from this (stored) key."""
        return [
            f"{item.name}: store has {getattr(self, item.name)!r}, requested {getattr(requested, item.name)!r}"
            for item in fields(self)
            if getattr(self, item.name) != getattr(requested, item.name)
        ]

    @property
    def name(self) -> str:
        """Short printable name, e.g. ``coco_mini/mobilenet_v2@3fa2a28e/vrp512_squash_tf128/float16``."""
        return f"{self.dataset}/{self.encoder_id}@{self.weights_sha256[:8]}/{self.preprocessing_id}/{self.dtype}"


class StoreMismatchError(DataError):
    """A store exists but holds another feature set than the one asked for."""


def check_key(stored: FeatureSetKey, requested: FeatureSetKey, where: str) -> None:
    """Raise :class:`StoreMismatchError` listing every differing field, or return silently."""
    differences = stored.differences(requested)
    if differences:
        raise StoreMismatchError(
            f"feature store {where} holds another feature set than requested ({'; '.join(differences)}). "
            "Refusing to use a stale cache: extract into a new location or pass the matching key."
        )
