"""Evaluation cells: a trained cell's registered model, or a training-free method, on another
dataset's episodes (tracks ``fss1000`` and ``coco2pascal``), through the evaluation jobs' APIs
(:func:`pipeline.evaluation.fss1000.run`, :func:`pipeline.benchmark.coco2pascal.run`), recorded as
one MLflow run per cell (``refseg.kind = evaluation``; its metrics, the job's ``results.json``, and
tags naming the trained run it evaluates).

Like the training job's test pass, these jobs exclude an episode whose data cannot be read and count
it (``test_episodes_failed`` = manifest episodes - evaluated episodes; docs/benchmark.md).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.benchmark.cells import EvaluationCell
from pipeline.benchmark.records import KIND_EVALUATION, TAG_BENCHMARK, TAG_CELL, TAG_PROTOCOL
from pipeline.errors import DataError
from pipeline.training import tracking


def output_dir(root: str, table: str, cell: EvaluationCell) -> str:
    digest = hashlib.sha256(cell.identity.encode()).hexdigest()[:10]
    return str(Path(root) / "outputs" / "benchmark" / table / "evaluations" / f"{cell.protocol}-{cell.method}-{digest}")


def _job_config(cell: EvaluationCell, checkpoint: str | None, out: str) -> Any:
    """The evaluation job's config of this cell (its predictor: ``checkpoint`` or the baseline)."""
    spec = cell.spec
    sam, backbone = spec.encoders["sam"], spec.encoders["backbone"]
    common = dict(backbone_checkpoint=backbone.checkpoint, shot=cell.shot, seed=int(spec.evaluation.get("seed", 0)),
                  annotation_type=cell.reference, checkpoint=checkpoint, method=None if checkpoint else cell.baseline,
                  method_options={},  # a baseline with its defaults, as the training job's test rows run it
                  backbone=backbone.encoder, sam_encoder=sam.encoder, sam_checkpoint=sam.checkpoint,
                  resolution_size=int(spec.evaluation.get("resolution_size", 512)),
                  num_workers=int(spec.evaluation.get("num_workers", spec.scaling.num_workers)), output_dir=out)
    if cell.protocol == "fss1000":
        from pipeline.evaluation.fss1000 import Fss1000EvaluateConfig

        return Fss1000EvaluateConfig(root=spec.data["fss1000_root"], lists_dir=spec.data.get("fss1000_lists"),
                                     **common)
    from pipeline.benchmark.coco2pascal import Coco2PascalEvaluateConfig

    return Coco2PascalEvaluateConfig(root=spec.data["pascal_root"], lists_dir=spec.data["pascal_lists"], fold=int(cell.fold),
                                     n_episodes=int(spec.evaluation.get("episodes", 1000)), **common)


def run_evaluation_cell(cell: EvaluationCell, uri: str, experiment_id: str, benchmark_run: str, root: str,
                        trained_run: dict[str, Any] | None) -> str:
    """Evaluate one cell and record it; returns its MLflow run id. ``trained_run``: the finished
    fold run of ``cell.trained`` (None for a baseline)."""
    from pipeline.benchmark.coco2pascal import run as run_coco2pascal
    from pipeline.evaluation.fss1000 import run as run_fss1000

    identity = {tracking.TAG_KIND: KIND_EVALUATION, TAG_CELL: cell.identity}
    tags = {TAG_BENCHMARK: cell.spec.name, TAG_PROTOCOL: cell.protocol, "mlflow.parentRunId": benchmark_run,
            "refseg.method": cell.method}
    params = {"protocol": cell.protocol, "fold": str(cell.fold), "shot": str(cell.shot), "annotation_type": cell.reference,
              "method": cell.method, "predictor": "trained" if cell.trained else "training-free"}
    if trained_run is not None:
        tags["refseg.trained_run"] = trained_run["run_id"]
        tags.update({k: v for k, v in trained_run["tags"].items() if k.startswith("refseg.frozen.")})
    run_id, _ = tracking.find_or_create_run(uri, experiment_id, f"{cell.protocol}-{cell.method}", identity, params)
    tracking.set_tags(uri, run_id, tags)  # also on a re-run: the benchmark run it belongs to now
    tracking.set_running(uri, run_id)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if trained_run is not None:
                model_uri = trained_run["tags"].get(tracking.TAG_MODEL)
                if not model_uri:
                    raise DataError(f"{cell.trained.key}: its fold run {trained_run['run_id']} registered no model to evaluate")
                checkpoint = str(tracking.model_checkpoint(model_uri, uri, tmp))
            out = output_dir(root, cell.spec.name, cell)
            config = _job_config(cell, checkpoint, out)
            results = run_fss1000(config) if cell.protocol == "fss1000" else run_coco2pascal(config)
    except BaseException:
        tracking.end_unfinished(uri, [run_id], "FAILED")
        raise
    wall = time.perf_counter() - started
    metrics = {"test_miou": results["miou"], "test_fbiou": results["fbiou"],
               "test_episodes_evaluated": results["episodes"],
               "test_episodes_failed": results["manifest_episodes"] - results["episodes"],
               "cost/wall_s": wall, "cost/episodes_per_s": results["episodes"] / max(wall, 1e-9)}
    tracking.log_metrics(uri, run_id, {k: v for k, v in metrics.items() if v is not None})
    tracking.set_tags(uri, run_id, {"refseg.test_protocol": results.get("protocol", cell.protocol)})
    tracking.log_artifacts(uri, run_id, out, "evaluation")
    tracking.finish(uri, run_id)
    return run_id
