"""The training checkpoint: everything a resumed run needs, in one file written atomically, with its digest.

``state.pt`` (``torch.load(weights_only=True)``-safe: tensors and plain values), beside its sha256
in ``state.pt.sha256`` (checked before loading)::

    format            "refseg-train-state/1"
    fingerprint       TrainConfig.fingerprint() of the run that wrote it (a resume must match)
    model             the method's trainable_state_dict()
    optimizer         optimizer.state_dict();  scheduler: scheduler.state_dict()
    progress          {"global_step", "epoch", "step_in_epoch"}: the next step to run
    best              {"val_miou", "step", "model"}: the best validation weights so far
    extra             {"untrained_test": {...}, ...} results computed once per run
    model_extra       (only for methods with model-side training state, e.g. SegIC's negative
                      queue) [method.extra_state() of rank 0, rank 1, ...]: each rank restores its own

Randomness is a function of (seed, rank, global step) (:func:`step_seed`), so the checkpointed
step restores it exactly: no generator state needs saving.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import DataError
from refseg_models.checkpoint import atomic_torch_save

STATE_FORMAT = "refseg-train-state/1"
STATE_FILE = "state.pt"
DIGEST_FILE = "state.pt.sha256"


@dataclass
class TrainState:
    """Where training is (``progress``: the next step to run), the best validation weights so far
    (``best``) and results computed once per run (``extra``): saved in every checkpoint."""

    progress: dict[str, int]
    best: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, weights: dict[str, Any]) -> "TrainState":
        """Before the first step: the model's initial ``weights`` are the best so far."""
        return cls({"global_step": 0, "epoch": 0, "step_in_epoch": 0}, {"val_miou": -1.0, "step": -1, "model": weights})

    @property
    def step(self) -> int:
        return self.progress["global_step"]


def step_seed(seed: int, rank: int, global_step: int) -> int:
    """The torch seed of one training step on one rank (dropout, ProSAM's samples, SegIC's points)."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(global_step), 0x5EED]).generate_state(1)[0])


def gather_extra_state(state: dict[str, Any] | None, world_size: int) -> list[dict[str, Any]] | None:
    """Every rank's ``method.extra_state()`` in rank order (all ranks call it: with several ranks it
    is a collective), or None when the method keeps none (then nothing is communicated)."""
    if state is None:
        return None
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [state]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, state)
    return gathered


def save_state(directory: str | Path, payload: dict[str, Any]) -> Path:
    """``state.pt`` and its sha256 (``state.pt.sha256``: torch's zip reader does not notice flipped
    bytes in a tensor, and a resumed run must never start from damaged weights)."""
    path = atomic_torch_save({"format": STATE_FORMAT, **payload}, Path(directory) / STATE_FILE)
    (Path(directory) / DIGEST_FILE).write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def load_state(directory: str | Path, fingerprint: str, source: str | None = None) -> dict[str, Any]:
    """The state saved in ``directory`` (``source``: where that checkpoint lives, for messages, e.g.
    its storage path when ``directory`` is a local copy). A missing, truncated or corrupt file, or
    one of another configuration, is a ``DataError`` naming it: the run cannot resume from it, and a
    retry would fail the same way."""
    path = Path(directory) / STATE_FILE
    name = f"{source.rstrip('/')}/{STATE_FILE}" if source else str(path)
    digest_path = Path(directory) / DIGEST_FILE
    if digest_path.is_file() and path.is_file():  # checkpoints written before the digest have none
        recorded, actual = digest_path.read_text().strip(), hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != recorded:
            raise DataError(
                f"training checkpoint {name} is truncated or corrupt ({path.stat().st_size} bytes, sha256 "
                f"{actual[:12]}..., {DIGEST_FILE} says {recorded[:12]}...): the run cannot resume from it; start it "
                "anew (--new-run)"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise DataError(f"training checkpoint {source or directory} has no {STATE_FILE}") from error
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:  # torch: RuntimeError for a broken zip
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise DataError(
            f"training checkpoint {name} is truncated or corrupt ({reason}): the run cannot resume from it; start it "
            "anew (--new-run)"
        ) from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DataError(f"{name}: not a {STATE_FORMAT} training checkpoint")
    if state.get("fingerprint") != fingerprint:
        raise DataError(
            f"{name} was written by another configuration (fingerprint {state.get('fingerprint')} != {fingerprint}): "
            "resume with the same configuration, or start a new run (--new-run)"
        )
    return state
