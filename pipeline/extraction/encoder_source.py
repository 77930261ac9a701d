"""How the extraction stage gets its encoder: a picklable builder plus the weights' identity."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from pipeline.errors import ConfigError
from pipeline.store.feature_set import RANDOM_INIT_WEIGHTS, sha256_file
from refseg_models.encoders import ENCODERS, build_encoder


class EncoderSource(Protocol):
    """Builds a :class:`~refseg_models.encoders.base.FrozenEncoder` and names its weights."""

    def build(self) -> Any: ...

    def weights_sha256(self) -> str: ...


@dataclass(frozen=True)
class RegistryEncoder:
    """An encoder from ``refseg_models.encoders.build_encoder`` (what the CLI uses).

    The registry's builder (``"module:function"``) is looked up where this is made (the driver) and
    travels with it, so the extraction actors build the same encoder even when the name was
    registered in the driver only (a test's or a benchmark's encoder)."""

    name: str
    checkpoint: str | None = None
    allow_random_init: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    target: str = ""

    def __post_init__(self) -> None:
        if not self.target:
            object.__setattr__(self, "target", ENCODERS.target(self.name))

    def build(self) -> Any:
        with contextlib.ExitStack() as registered:
            if self.name not in ENCODERS:
                registered.enter_context(ENCODERS.registered(self.name, self.target))
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
