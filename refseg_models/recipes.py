"""The papers' training recipes, and the optimizer / scheduler built from them over exactly the
trainable parameters of a method (frozen SAM parts never reach the optimizer).

Sources (each recipe names its own):
* VRP-SAM: the authors' ``train.py`` / ``train.sh`` (github.com/syp2ysy/VRP-SAM): AdamW lr 1e-4,
  weight decay 1e-6, betas (0.9, 0.999), ``CosineAnnealingLR(T_max = epochs * iterations)`` stepped
  per iteration, 50 epochs, batch 2 per GPU x 4 GPUs = 8, seed 321 (re-seeded with seed + epoch
  every epoch); the same defaults for PASCAL-5i.
* ProSAM (paper, sec. 5.1): as VRP-SAM but 100 epochs and cosine annealing with warm restarts
  every 15 epochs; COCO-20i on 4 GPUs x 2 = 8, PASCAL-5i on 1 GPU with batch 2; seed 321.
* FCP (paper, Implementation Details): AdamW, cosine annealing, batch 8; PASCAL-5i lr 2e-4 for 100
  epochs, COCO-20i lr 1e-4 for 50 epochs (weight decay and seed as VRP-SAM, on which it builds).
* SegIC (paper, sec. 4.1): AdamW lr 1e-4, weight decay 1e-4, lr x 0.1 at epoch 10 of 12, batch 32,
  160k samples per epoch of mixed data (80k for the ablations); seed not stated (0 here).

An "epoch" of the SAM-prompt methods is one pass over the fold's training pairs, as HSNet's
training dataset defines its length (``samples_per_epoch=None``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refseg_models.config import FrozenConfig
from refseg_models.errors import ModelError

SCHEDULES = ("cosine", "cosine_restarts", "step", "constant")


@dataclass(frozen=True)
class Recipe(FrozenConfig):
    """Optimizer, schedule and length of a training run (global batch size, epochs)."""

    method: str = "vrp_sam"
    dataset: str = "coco20i"
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"
    epochs: int = 50
    batch_size: int = 8
    warmup_steps: int = 0
    restart_epochs: int | None = None
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    seed: int = 321
    samples_per_epoch: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.optimizer != "adamw":
            raise ModelError(f"recipe optimizer must be 'adamw' (every paper here uses it), got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ModelError(f"recipe schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "cosine_restarts" and not self.restart_epochs:
            raise ModelError("schedule 'cosine_restarts' needs restart_epochs")
        if self.schedule == "step" and not self.milestones:
            raise ModelError("schedule 'step' needs milestones (epochs)")
        for name in ("lr", "epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ModelError(f"recipe {name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ModelError("recipe warmup_steps and weight_decay must be >= 0")


_VRP = dict(lr=1e-4, weight_decay=1e-6, schedule="cosine", epochs=50, batch_size=8, seed=321)
RECIPES: dict[tuple[str, str], Recipe] = {
    ("vrp_sam", "coco20i"): Recipe("vrp_sam", "coco20i", **_VRP, source="VRP-SAM train.py / train.sh"),
    ("vrp_sam", "pascal5i"): Recipe("vrp_sam", "pascal5i", **_VRP, source="VRP-SAM train.py defaults"),
    ("prosam", "coco20i"): Recipe(
        "prosam", "coco20i", **{**_VRP, "schedule": "cosine_restarts", "epochs": 100}, restart_epochs=15,
        source="ProSAM sec. 5.1 (4 GPUs x 2)",
    ),
    ("prosam", "pascal5i"): Recipe(
        "prosam", "pascal5i", **{**_VRP, "schedule": "cosine_restarts", "epochs": 100, "batch_size": 2},
        restart_epochs=15, source="ProSAM sec. 5.1 (1 GPU, batch 2)",
    ),
    ("fcp", "coco20i"): Recipe("fcp", "coco20i", **_VRP, source="FCP Implementation Details"),
    ("fcp", "pascal5i"): Recipe(
        "fcp", "pascal5i", **{**_VRP, "lr": 2e-4, "epochs": 100}, source="FCP Implementation Details"
    ),
    ("segic", "mixed"): Recipe(
        "segic", "mixed", lr=1e-4, weight_decay=1e-4, schedule="step", epochs=12, milestones=(10,), gamma=0.1,
        batch_size=32, seed=0, samples_per_epoch=160_000, source="SegIC sec. 4.1 (main; 80k for ablations)",
    ),
}


def recipe_for(method: str, dataset: str) -> Recipe:
    """The paper's recipe of ``method`` on ``dataset`` (``coco20i``, ``pascal5i``; SegIC: ``mixed``)."""
    if (method, dataset) not in RECIPES:
        known = ", ".join(f"{m}/{d}" for m, d in sorted(RECIPES))
        raise ModelError(f"no recipe for {method} on {dataset}; known: {known}")
    return RECIPES[(method, dataset)]


def build_optimizer(model: torch.nn.Module, recipe: Recipe, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over exactly ``model.trainable_parameters()`` (raises for a training-free method).

    ``fused``: PyTorch's fused AdamW (one kernel for every parameter instead of a launch per tensor
    and operation; CUDA and CPU): the same update up to fp32 rounding
    (tests/test_training_step_equivalence.py). Off by default: the plain update is the reference."""
    params = list(model.trainable_parameters())
    if not params:
        raise ModelError(f"{getattr(model, 'name', type(model).__name__)} has no trainable parameters: nothing to train")
    options = {"fused": True} if fused else {}
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=tuple(recipe.betas), **options)


def build_scheduler(
    optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int, total_steps: int | None = None
) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's schedule, stepped once per iteration (``scheduler.step()`` after each optimizer step).

    ``cosine``: ``CosineAnnealingLR(T_max = total steps)`` (VRP-SAM); ``cosine_restarts``:
    ``CosineAnnealingWarmRestarts(T_0 = restart_epochs * steps_per_epoch)``; ``step``: x ``gamma``
    at each milestone epoch; ``constant``. ``warmup_steps`` > 0 prepends a linear warm-up.
    ``total_steps`` defaults to ``epochs * steps_per_epoch``.
    """
    if steps_per_epoch < 1:
        raise ModelError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = total_steps if total_steps is not None else recipe.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler
    after = max(1, total - recipe.warmup_steps)
    if recipe.schedule == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=after)
    elif recipe.schedule == "cosine_restarts":
        main = sched.CosineAnnealingWarmRestarts(optimizer, T_0=max(1, recipe.restart_epochs * steps_per_epoch))
    elif recipe.schedule == "step":
        main = sched.MultiStepLR(optimizer, milestones=[m * steps_per_epoch for m in recipe.milestones], gamma=recipe.gamma)
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if recipe.warmup_steps == 0:
        return main
    warmup = sched.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=recipe.warmup_steps)
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[recipe.warmup_steps])
