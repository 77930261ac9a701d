"""How the extraction stage gets its encoder: a picklable builder plus the weights' identity."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from pipeline.errors import ConfigError
from pipeline.store.feature_set import RANDOM_INIT_WEIGHTS, sha256_file


class EncoderSource(Protocol):
    """Builds a :class:`~refseg_models.encoders.base.FrozenEncoder` and names its weights."""

    def build(self) -> Any: ...

    def weights_sha256(self) -> str: ...


@dataclass(frozen=True)
class RegistryEncoder:
    """An encoder from ``refseg_models.encoders.build_encoder`` (what the CLI uses)."""

    name: str
    checkpoint: str | None = None
    allow_random_init: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        from refseg_models.encoders import build_encoder

        return build_encoder(
            self.name, checkpoint=self.checkpoint, allow_random_init=self.allow_random_init, **self.options
        )

    def weights_sha256(self) -> str:
        if self.checkpoint is not None:
            return sha256_file(self.checkpoint)
        if not self.allow_random_init:
            raise ConfigError(
                f"encoder {self.name!r}: no checkpoint given (pass allow_random_init for tests/benchmarks)"
            )
        return RANDOM_INIT_WEIGHTS


@dataclass(frozen=True)
class FactoryEncoder:
    """Any zero-argument builder (tests, custom encoders) with an explicit weights identity."""

    factory: Callable[[], Any]
    weights: str

    def build(self) -> Any:
        return self.factory()

    def weights_sha256(self) -> str:
        return self.weights
