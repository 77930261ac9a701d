"""The training checkpoint: everything a resumed run needs, in one file written atomically.

``state.pt`` (``torch.load(weights_only=True)``-safe: tensors and plain values)::

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

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import DataError
from refseg_models.checkpoint import atomic_torch_save

STATE_FORMAT = "refseg-train-state/1"
STATE_FILE = "state.pt"


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
    return atomic_torch_save({"format": STATE_FORMAT, **payload}, Path(directory) / STATE_FILE)


def load_state(directory: str | Path, fingerprint: str) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise DataError(f"training checkpoint {directory} has no {STATE_FILE}") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DataError(f"{path}: not a {STATE_FORMAT} training checkpoint")
    if state.get("fingerprint") != fingerprint:
        raise DataError(
            f"{path} was written by another configuration (fingerprint {state.get('fingerprint')} != {fingerprint}): "
            "resume with the same configuration, or start a new run (--new-run)"
        )
    return state
