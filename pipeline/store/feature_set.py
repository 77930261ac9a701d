"""The feature-set key: what a store's features are a function of.

Two stores hold interchangeable features only if every field of the key agrees. Anything that
changes the numbers (other weights, other preprocessing, other dtype, an encoder run in bf16) must
change the key, so a stale cache is refused with a message instead of being used silently.
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

# The precision the encoder ran in (refseg_models.encoders.precision); fp32 is the reference and the
# default, and a key at the default serialises without the field (stores written before it existed
# keep their manifests' bytes and still match).
SUPPORTED_PRECISIONS = ("float32", "bfloat16")  # = refseg_models.encoders.precision.PRECISIONS (tested)
DEFAULT_PRECISION = "float32"


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
    """(dataset, encoder id, weights sha256, preprocessing id, dtype, precision): the identity of a
    feature set. ``dtype``: what the store holds; ``precision``: what the encoder computed in."""

    dataset: str
    encoder_id: str
    weights_sha256: str
    preprocessing_id: str
    dtype: str = "float16"
    precision: str = DEFAULT_PRECISION

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"feature-set key field {item.name!r} must be a non-empty string, got {value!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"feature-set dtype {self.dtype!r} is not supported; use one of {SUPPORTED_DTYPES}")
        if self.precision not in SUPPORTED_PRECISIONS:
            raise ConfigError(
                f"feature-set precision {self.precision!r} is not supported; use one of {SUPPORTED_PRECISIONS}"
            )

    def to_dict(self) -> dict[str, str]:
        data = asdict(self)
        if data["precision"] == DEFAULT_PRECISION:
            del data["precision"]  # the bytes of every fp32 manifest stay as they were
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "feature-set key") -> "FeatureSetKey":
        names = {item.name for item in fields(cls)}
        missing = sorted(names - set(data) - {"precision"})
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
        """Short printable name, e.g. ``coco_mini/mobilenet_v2@3fa2a28e/vrp512_squash_tf128/float16``
        (``.../float16/bfloat16-compute`` for an encoder run in bf16)."""
        name = f"{self.dataset}/{self.encoder_id}@{self.weights_sha256[:8]}/{self.preprocessing_id}/{self.dtype}"
        return name if self.precision == DEFAULT_PRECISION else f"{name}/{self.precision}-compute"


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
