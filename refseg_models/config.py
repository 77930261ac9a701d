"""One config pattern: a frozen dataclass with its defaults written once (methods, recipes, training).

``to_dict()`` is what the checkpoint records and MLflow logs (plain JSON values); ``from_dict()``
rebuilds it and names unknown keys instead of ignoring them; ``replace(**changes)`` derives a
variant. Builders take the config, never a second copy of the defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from refseg_models.errors import ModelError
from refseg_models.feature_spec import FeatureSpec

C = TypeVar("C", bound="FrozenConfig")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class FrozenConfig:
    """Base of every refseg config: method configs, recipes, the training config."""

    def to_dict(self) -> dict[str, Any]:
        """Field -> plain value (tuples become lists), JSON- and ``weights_only``-safe."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | None = None) -> C:
        """Rebuild from ``to_dict()`` output (lists back to tuples where the default is a tuple)."""
        data = dict(data or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ModelError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(known)}")
        defaults = cls()
        values = {}
        for name, value in data.items():
            if isinstance(getattr(defaults, name), tuple) and isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        return type(self).from_dict({**self.to_dict(), **changes})


@dataclasses.dataclass(frozen=True)
class MethodConfig(FrozenConfig):
    """Base class of the per-method configs (``VRPSamConfig``, ``FCPConfig``, ...)."""

    def feature_spec(self) -> FeatureSpec:
        """The frozen features a method with this configuration reads."""
        raise NotImplementedError
