"""``train_loop_per_worker``: one fold's training on one Ray Train worker, in open_clip's shape:
set up (:func:`~pipeline.training.worker.setup_worker`), resume, :func:`train_one_epoch` per epoch
(:func:`train_step` per batch), evaluate (validation and test share
:meth:`~pipeline.training.worker.FoldWorker.evaluate`), export (:mod:`pipeline.training.export`).

The worker reads the fold the driver prepared (:mod:`pipeline.training.prepared`) and the feature
stores, never a raw dataset. Per epoch, every rank draws the same seeded table of training samples
and takes its disjoint share (``episode_id % world == rank``; the union is the table); what a sample
is comes from the configuration's sampler (:mod:`pipeline.training.samplers`: the fold's base-class
episodes by default, SegIC's mixed datasets with ``sampler="segic_mixed"``). Batches are built from
the feature stores (no frozen-encoder forward pass; the masked-reference layer4 is the one live
backbone call), the method's contract does the rest (forward, criterion, trainable parameters, and
its training hooks: ``after_step`` after each optimizer step, ``extra_state`` saved per rank in the
checkpoint). At each checkpoint point the ranks evaluate their shares of the validation episodes
(counts summed across ranks), rank 0 writes the state atomically and every rank calls
``ray.train.report`` (a barrier); then rank 0 flushes the metrics that checkpoint covers to MLflow.
At the end the best validation weights are evaluated on the fold's test episodes, and rank 0 logs the
test metrics, the per-class table, a few qualitative overlays and the inference checkpoint.
"""

from __future__ import annotations

import logging
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from pipeline.training.config import TrainConfig
from pipeline.training.epochs import rank_share
from pipeline.training.episode_features import EpisodeBatch
from pipeline.training.evaluate import chunks
from pipeline.training.export import test_and_export
from pipeline.training.failures import keeps_traceback
from pipeline.training.state import TrainState, gather_extra_state, save_state, step_seed
from pipeline.training.tracking import RunLogger
from pipeline.training.worker import FoldWorker, resume, setup_worker
from refseg_models.encoders.precision import encoder_autocast


@keeps_traceback  # a user error ends the run without a retry, its traceback kept for the driver's log
def train_loop_per_worker(config: dict[str, Any]) -> None:
    _quiet_report_lines()
    cfg = TrainConfig.from_dict(config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    worker = setup_worker(cfg, config["prepared"], rank, world, ray.train.torch.get_device(), wrap=_distributed(world))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        state = TrainState.start(worker.model.trainable_state_dict())
    else:
        with checkpoint.as_directory() as directory:
            state = resume(worker, directory, source=checkpoint.path)
    logger = RunLogger(config["tracking"]["uri"], config["tracking"]["run_id"]) if rank == 0 else None
    if checkpoint is None:
        _log_start(worker, state, logger)
    worker.train_model.train()
    for epoch in range(state.progress["epoch"], cfg.recipe.epochs):
        train_one_epoch(worker, state, epoch, logger)
    ray.train.report({**test_and_export(worker, state, logger), "done": 1})


def _distributed(world: int) -> Callable[[nn.Module], nn.Module]:
    """The model the step calls: DistributedDataParallel (Ray Train's) with several ranks."""
    def wrap(model: nn.Module) -> nn.Module:
        if world == 1:
            return model
        find_unused = bool(getattr(model, "ddp_find_unused_parameters", False))
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": find_unused})
    return wrap


def _log_start(worker: FoldWorker, state: TrainState, logger: RunLogger | None) -> None:
    """Before the first step: the run's configuration and data sizes (rank 0), and the test rows of
    the same model untrained when configured (measured once, logged at step 0)."""
    cfg, data = worker.cfg, worker.data
    if logger is not None:
        logger.log_dict(cfg.to_dict(), "config.json")
        logger.add(  # flushed with the first checkpoint: a restart before it never logs them twice
            {**worker.sampler.summary(), "data/episodes_per_epoch": worker.episodes_per_epoch,
             "data/steps_per_epoch": worker.steps_per_epoch, "data/val_episodes": data.val.num_rows,
             "data/test_episodes": data.test.num_rows,
             "model/trainable_parameters": sum(p.numel() for p in worker.model.trainable_parameters())}, 0,
        )
        prepared = data.artifact.ref
        logger.set_tags({"refseg.test_protocol": data.test_protocol, "refseg.world_size": str(worker.world),
                         "refseg.prepared": prepared.uri, "refseg.prepared_sha256": prepared.sha256})
    if cfg.evaluate_untrained:
        computed, _ = worker.evaluate(data.test)
        state.extra["untrained_test"] = {"miou": computed["miou"], "fbiou": computed["fbiou"]}
        if logger is not None:
            logger.add({"test_untrained_miou": computed["miou"], "test_untrained_fbiou": computed["fbiou"]}, 0)


class _Batches(torch.utils.data.Dataset):
    """One epoch's batches of this rank (a map-style dataset so a DataLoader can prefetch them)."""

    def __init__(self, build: Callable[[list[dict]], EpisodeBatch], batches: list[list[dict]]) -> None:
        self.build, self.batches = build, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> EpisodeBatch:
        return self.build(self.batches[index])


def train_one_epoch(worker: FoldWorker, state: TrainState, epoch: int, logger: RunLogger | None) -> None:
    """Epoch ``epoch``'s steps not run yet (a resumed run skips those its checkpoint covers), each seeded
    by (seed, rank, step); validation and a checkpoint ``checkpoints_per_epoch`` times per epoch."""
    cfg = worker.cfg
    table = worker.sampler.epoch_table(epoch, worker.episodes_per_epoch)
    batches = chunks(rank_share(table, worker.rank, worker.world), cfg.batch_per_worker)[state.progress["step_in_epoch"]:]
    loader = torch.utils.data.DataLoader(
        _Batches(worker.sampler.build, batches), batch_size=None, shuffle=False, num_workers=cfg.loader_workers,
        collate_fn=lambda batch: batch,
    )
    waited = time.perf_counter()
    for batch in loader:
        data_s = time.perf_counter() - waited
        started = time.perf_counter()
        torch.manual_seed(step_seed(cfg.recipe.seed, worker.rank, state.step))
        losses = train_step(worker, batch)
        step_s = time.perf_counter() - started
        state.progress["global_step"] += 1
        state.progress["step_in_epoch"] += 1
        if logger is not None and (state.step % cfg.log_every == 0 or state.step == 1):
            logged = {f"train/{k}": float(v.detach()) for k, v in losses.items()}
            # every rank steps in lockstep (DDP), so rank 0's step time gives the run's rate
            logged.update({"train/lr": worker.optimizer.param_groups[0]["lr"], "time/data_s": data_s,
                           "time/step_s": step_s, "time/data_share": data_s / max(data_s + step_s, 1e-9),
                           "time/episodes_per_s": batch.target_masks.shape[0] * worker.world / max(data_s + step_s, 1e-9), "epoch": epoch})
            logger.add(logged, state.step)
        if state.progress["step_in_epoch"] == worker.steps_per_epoch:
            state.progress["epoch"], state.progress["step_in_epoch"] = epoch + 1, 0
        if state.step % worker.checkpoint_every == 0 or state.progress["step_in_epoch"] == 0:
            validate_and_checkpoint(worker, state, logger)
            worker.train_model.train()
        waited = time.perf_counter()


def train_step(worker: FoldWorker, batch: EpisodeBatch) -> dict[str, torch.Tensor]:
    """One optimizer step on ``batch``: forward, the method's loss, backward, step, schedule, and the
    method's ``after_step`` hook; the named loss terms."""
    model, device = worker.model, worker.device
    targets = (batch.target_masks == 1).float().to(device)
    valid = (batch.target_masks != 255).float().to(device)
    features = batch.features.to(device)
    with encoder_autocast(device, worker.cfg.precision):  # bf16: forward and loss; backward follows autocast's casts
        outputs = worker.train_model(features)
        losses = model.loss(outputs, targets, valid)
    worker.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    worker.optimizer.step()
    worker.scheduler.step()
    model.after_step(outputs, features)
    return losses


def validate_and_checkpoint(worker: FoldWorker, state: TrainState, logger: RunLogger | None) -> None:
    """The validation episodes' mIoU (the best weights kept), then a checkpoint every rank reports."""
    computed, _ = worker.evaluate(worker.data.val)
    if computed["miou"] > state.best["val_miou"]:
        state.best = {"val_miou": computed["miou"], "step": state.step, "model": worker.model.trainable_state_dict()}
    if logger is not None:
        logger.add({"val_miou": computed["miou"], "val_fbiou": computed["fbiou"], "val_best_miou": state.best["val_miou"],
                    "memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}, state.step)
    save_checkpoint(worker, state, {"val_miou": computed["miou"], "step": state.step, "epoch": state.progress["epoch"]})
    if logger is not None:
        logger.flush()  # only metrics the reported checkpoint covers


def save_checkpoint(worker: FoldWorker, state: TrainState, metrics: dict[str, float]) -> None:
    """Rank 0 writes the training state (:mod:`pipeline.training.state`) and every rank reports it to
    Ray Train (a barrier); model-side state (SegIC's queue) is gathered from every rank first."""
    directory = None
    model_extra = gather_extra_state(worker.model.extra_state(), worker.world)  # a collective when there is any
    if worker.rank == 0:
        directory = tempfile.mkdtemp(prefix="refseg-ckpt-")
        payload = {
            "fingerprint": worker.cfg.fingerprint(), "model": worker.model.trainable_state_dict(),
            "optimizer": worker.optimizer.state_dict(), "scheduler": worker.scheduler.state_dict(),
            "progress": state.progress, "best": state.best, "extra": state.extra,
        }
        if model_extra is not None:
            payload["model_extra"] = model_extra
        save_state(directory, payload)
    ray.train.report(
        metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None,
        checkpoint_dir_name=f"checkpoint_step{state.step:07d}",
    )
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def _quiet_report_lines() -> None:
    """Ray 2.60 logs every ``ray.train.report`` at INFO ("Reporting training result N: ...", once per
    rank and checkpoint) through a logger named after its source file, not ``ray.train.*``, so
    ``RunConfig(logging_config=LoggingConfig("WARNING"))`` does not reach it: set that logger to WARNING."""
    suffix = "/train/v2/_internal/execution/context.py"
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(suffix):
            logging.getLogger(name).setLevel(logging.WARNING)
