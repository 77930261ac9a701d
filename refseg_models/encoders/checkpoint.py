"""Safe, strict checkpoint loading shared by every frozen encoder.

Checkpoints are read with ``torch.load(weights_only=True)`` (never unpickling arbitrary objects) and
loaded strictly: a wrong file must fail loudly and say which keys are missing, unexpected or of the
wrong shape, instead of silently leaving layers at their random initialisation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from refseg_models.errors import ModelError, WeightsNotFoundError


class CheckpointError(ModelError):
    """A checkpoint file does not match the module it is loaded into."""


def read_state_dict(path: str | Path, nested_keys: Iterable[str] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` with ``weights_only=True``.

    Training checkpoints often wrap the weights (``{"state_dict": {...}}``, ``{"model": {...}}``);
    the first of ``nested_keys`` present is unwrapped. A ``module.`` prefix (DataParallel) is NOT
    stripped silently: it would show up as missing/unexpected keys, which is the honest error.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-weights objects
        raise CheckpointError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {exc}") from exc
    if isinstance(obj, Mapping):
        for key in nested_keys:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors (got {type(obj).__name__})")
    return dict(obj)


def _summarise(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Load ``state_dict`` into ``module`` strictly, with an error naming every problem.

    Args:
        module: the module to fill (modified in place: it is ours, freshly built by a builder).
        state_dict: weights; keys starting with one of ``ignore_prefixes`` are dropped first
            (e.g. ``"fc."`` for an unused ImageNet classifier).
        source: what to call the weights in errors (usually the checkpoint path).

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches.
    """
    wanted = module.state_dict()
    given = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)}
    # BatchNorm's num_batches_tracked appeared in PyTorch 0.4.1; older ImageNet checkpoints (PSPNet's
    # resnet50_v2, torchvision's VGG/ResNet files) lack it. It is unused in eval mode: keep ours.
    for key in wanted:
        if key.endswith(".num_batches_tracked") and key not in given:
            given[key] = wanted[key]
    missing = sorted(set(wanted) - set(given))
    unexpected = sorted(set(given) - set(wanted))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(wanted[k].shape)}"
        for k in set(wanted) & set(given)
        if given[k].shape != wanted[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_summarise(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_summarise(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(given, strict=True)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (BN/dropout frozen) and no gradients; returns ``module`` for chaining."""
    module.eval()
    module.requires_grad_(False)
    return module
