"""refseg_models' one error type (pure PyTorch side).

Everything a user can get wrong in refseg_models (an unknown method or encoder, a missing or
mismatched weights file, a checkpoint built for other encoders, bad shapes handed to a model)
raises :class:`ModelError` or a subclass. It subclasses ``ValueError`` so plain-Python callers can
catch it as such; the ``refseg`` CLI and the jobs translate it (with the pipeline's ``RefsegError``)
into one clear line, in one place (:func:`pipeline.errors.run_cli`).
"""

from __future__ import annotations


class ModelError(ValueError):
    """A model, encoder or checkpoint is unknown, misconfigured or does not match."""


class WeightsNotFoundError(ModelError, FileNotFoundError):
    """A weights or checkpoint file does not exist (also a ``FileNotFoundError``)."""
