"""One small registry: names -> ``"module:attribute"`` targets, imported on first use.

refseg names three kinds of things by string: methods (:data:`refseg_models.build.METHODS`), frozen
encoders (:data:`refseg_models.encoders.ENCODERS`) and training samplers
(:data:`pipeline.training.sampler_registry.SAMPLERS`). Each is one :class:`Registry`: a table written
once, one resolver, one error message for an unknown name (listing the known ones). Targets are
strings so that importing a registry stays cheap and one entry's optional dependency never breaks
another's import (segment-anything's ``sam_model_registry`` is a plain dict of builders; ours defers
the import as well).

Tests add entries of their own with :meth:`Registry.registered` (a context manager), never by
editing a table.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from refseg_models.errors import ModelError


class Registry:
    """``name -> "module:attribute"``; :meth:`get` imports the module and returns the attribute.

    ``kind`` names what is registered in messages ("method", "encoder", "training sampler");
    ``error`` is the exception type raised for an unknown name (the caller's layer's user error).
    """

    def __init__(self, kind: str, targets: Mapping[str, str], error: type[Exception] = ModelError) -> None:
        for name, target in targets.items():
            _split(name, target)
        self.kind = kind
        self.error = error
        self._targets: dict[str, str] = dict(targets)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def check(self, name: str) -> None:
        """Raise ``error`` naming ``name`` and the known names, unless ``name`` is registered."""
        if name not in self._targets:
            raise self.error(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")

    def target(self, name: str) -> str:
        """The ``"module:attribute"`` string of ``name``."""
        self.check(name)
        return self._targets[name]

    def get(self, name: str) -> Any:
        """The object registered as ``name`` (its module imported on first use)."""
        module, attribute = _split(name, self.target(name))
        return getattr(importlib.import_module(module), attribute)

    def name_of(self, cls: type) -> str:
        """The name under which ``cls`` (or the nearest registered class it derives from) is registered."""
        by_target = {target: name for name, target in self._targets.items()}
        for klass in cls.__mro__:
            name = by_target.get(f"{klass.__module__}:{klass.__qualname__}")
            if name is not None:
                return name
        raise self.error(f"{cls.__qualname__} is not a registered {self.kind}")

    @contextmanager
    def registered(self, name: str, target: str) -> Iterator[None]:
        """``name`` registered as ``target`` inside the ``with`` block (tests, benchmarks)."""
        if name in self._targets:
            raise self.error(f"{self.kind} {name!r} is registered already")
        _split(name, target)
        self._targets[name] = target
        try:
            yield
        finally:
            del self._targets[name]


def _split(name: str, target: str) -> tuple[str, str]:
    module, _, attribute = target.partition(":")
    if not module or not attribute:
        raise ModelError(f"registry entry {name!r}: target must be 'module:attribute', got {target!r}")
    return module, attribute
