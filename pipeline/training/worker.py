"""One rank's training setup, without Ray: the prepared fold, the frozen features, the method (seeded:
every run of a configuration starts from the same weights), the optimizer and schedule over its
trainable part, the sampler and the evaluation batches (:func:`setup_worker`), and the resume of a
training checkpoint (:func:`resume`). The training loop (:mod:`pipeline.training.loop`) runs on
what these return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.data.folds import novel_classes
from pipeline.errors import DataError
from pipeline.evaluation.resolution import EvalResolution
from pipeline.report import SkipReport
from pipeline.training.config import TrainConfig
from pipeline.training.epochs import rank_share
from pipeline.training.episode_features import EpisodeFeatureBuilder
from pipeline.training.evaluate import all_reduce_meter, evaluate_rows
from pipeline.training.features import FrozenFeatures, open_frozen_features
from pipeline.training.prepared import PreparedFold, PreparedRef, open_prepared
from pipeline.training.samplers import TrainingSampler, sampler_class
from pipeline.training.state import TrainState, load_state
from refseg_models.build import build_model, method_class, method_config
from refseg_models.method import RefSegMethod
from refseg_models.recipes import build_optimizer, build_scheduler


def build_method(cfg: TrainConfig, shapes: dict, sam_checkpoint: str | None, method: str | None = None) -> RefSegMethod:
    """The configured method (or a baseline) adapted to the features at hand (SAM grid, channels)."""
    name = method or cfg.method
    overrides = cfg.method_overrides if name == cfg.method else {}
    config = method_class(name).config_for_features(method_config(name, overrides), shapes)
    if method_class(name).uses_sam_decoder:
        return build_model(name, config, sam_checkpoint=sam_checkpoint)
    return build_model(name, config)


@dataclass
class FoldWorker:
    """What one rank of one fold trains and evaluates with (built once by :func:`setup_worker`)."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    data: PreparedFold
    frozen: FrozenFeatures
    model: RefSegMethod
    train_model: nn.Module  # the model as the step calls it (DistributedDataParallel with several ranks)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: TrainingSampler
    report: SkipReport  # what preparation and evaluation skipped, counted
    episodes_per_epoch: int
    steps_per_epoch: int
    checkpoint_every: int

    @property
    def resolution(self) -> EvalResolution:
        return EvalResolution("fixed", self.cfg.eval_size)

    @property
    def classes(self) -> list[int]:
        """The fold's test classes (validation episodes are drawn over them too)."""
        return novel_classes(self.cfg.dataset, self.cfg.fold)

    def builder(self, model: RefSegMethod, training: bool = False) -> EpisodeFeatureBuilder:
        """Batches of ``model``'s features from the fold's stores (evaluation draws unless ``training``)."""
        frozen = self.frozen
        return EpisodeFeatureBuilder.for_method(
            model, self.data.masks, training=training, point_style=self.cfg.point_style, sam=frozen.stores.get("sam"),
            backbone_features=frozen.stores.get("backbone"), backbone=frozen.backbone,
        )

    def evaluate(self, table: Any, model: RefSegMethod | None = None, keep: int = 0) -> tuple[dict[str, Any], list[dict]]:
        """HSNet's metric of ``model`` (default: the trained one) on this rank's share of ``table``,
        counts summed over every rank; and this rank's first ``keep`` predictions (overlays)."""
        model = model or self.model
        meter, kept = evaluate_rows(
            model, self.builder(model), rank_share(table, self.rank, self.world), self.classes, self.resolution,
            batch_size=self.cfg.batch_per_worker, device=self.device, report=self.report, keep=keep,
        )
        return all_reduce_meter(meter, self.device).compute(), kept


def setup_worker(cfg: TrainConfig, prepared: PreparedRef | dict, rank: int, world: int, device: torch.device,
                 wrap: Callable[[nn.Module], nn.Module] = lambda model: model) -> FoldWorker:
    """Rank ``rank``'s worker of the fold ``prepared`` names; ``wrap`` makes the model the step calls
    (Ray Train's ``prepare_model`` with several ranks)."""
    recipe = cfg.recipe
    data = open_prepared(prepared)
    report = data.report(f"fold {cfg.fold} rank {rank}")
    spec = method_config(cfg.method, cfg.method_overrides).feature_spec()
    frozen = open_frozen_features(cfg, spec, data.image_ids(), identities=data.identities())
    torch.manual_seed(recipe.seed)  # the same initial weights in every run of this configuration, on any cluster
    model = build_method(cfg, frozen.shapes, cfg.sam.checkpoint).to(device)
    sampler = sampler_class(cfg.sampler)(cfg, data, model, frozen)
    episodes = sampler.samples_per_epoch()
    steps_per_epoch = episodes // recipe.batch_size
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch, steps_per_epoch * recipe.epochs)
    return FoldWorker(
        cfg, rank, world, device, data, frozen, model, wrap(model), optimizer, scheduler, sampler, report, episodes,
        steps_per_epoch, max(1, steps_per_epoch // cfg.checkpoints_per_epoch),
    )


def resume(worker: FoldWorker, directory: str, source: str) -> TrainState:
    """Restore ``worker`` from the training checkpoint in ``directory`` (``source``: where it lives,
    for messages); the state to continue from."""
    state = load_state(directory, worker.cfg.fingerprint(), source=source)
    model = worker.model
    model.load_trainable_state_dict(state["model"], "training checkpoint")
    worker.optimizer.load_state_dict(state["optimizer"])
    worker.scheduler.load_state_dict(state["scheduler"])
    if "model_extra" in state or model.extra_state() is not None:  # model-side state, per rank
        per_rank = state.get("model_extra") or []
        if len(per_rank) != worker.world:
            raise DataError(f"the checkpoint holds the model state of {len(per_rank)} rank(s), this run has {worker.world}")
        model.load_extra_state(per_rank[worker.rank])
    return TrainState(state["progress"], state["best"], state["extra"])
