"""SegIC's mixed loader: does it keep up with the training step, and what does the negative queue
cost? (issue: SegIC mixed training; docs/segic_training.md "Throughput").

No ADE20k or LVIS exist here: like the tests, the mix is built from ADE20k- and LVIS-format copies of
``--images`` real coco_mini images (``tests/segic_mix_data.py``), with the REAL MobileNetV2's layer4
standing in for DINOv2 (512 squash input, 16 x 16 grid; SegIC at input 512, grid 32), four sources
(COCO semantic, ADE20k semantic, COCO instances, LVIS instances; uniform weights; 2 cached views for
the instance sources, warps with p = 0.3). Three measurements, one run:

* ``loader_vs_step``: in one process with one torch thread (a worker's share of this machine),
  samples/s of the mixed loader (``SegICMixedSampler.build``: store reads, views, flips, warps, masks,
  instructions) against samples/s of the training step on the same batches (forward with context
  reversion, loss, backward, AdamW, queue push);
* ``job``: the real training job (``run_training``: embedded local Ray, local MLflow in a temporary
  folder) with 1 and 2 Ray Train workers at the same global batch; medians of what the loop logs per
  step (``time/data_s`` = waiting for the batch, ``time/step_s``, ``time/data_share``);
* ``queue``: the negative-entity queue (256-d features, float32) filled to ``L`` per class for COCO's
  80 and LVIS's 1,203 classes: its tensor bytes (``nbytes``), the process's resident memory it adds
  (tensor bytes + per-entry overhead; measured first, in a fresh process, and still approximate: the
  allocator reuses freed memory) and the bytes it adds to a training checkpoint (``torch.save`` of
  ``extra_state()``).

    python bench/bench_segic_mixed.py --shared ../shared [--images 120] [--json out.json]

Prints one JSON object; the derived data and stores are made once into ``--work``
(default outputs/bench_segic).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # segic_mix_data: the derived ADE20k / LVIS copies

from bench_output import emit, machine  # noqa: E402

SEGIC_AT_512 = dict(feature_key="layer4", input_size=512, feature_size=32, mask_down_strides=(4, 4),
                    similarity_size=64, loss_points=4096)


def workspace(shared: Path, work: Path, images: int):
    """The derived mix's configuration (fold 0, global batch 8) with its stores extracted, and the fold
    prepared as the job's driver prepares it (what the workers' sampler reads)."""
    import torch
    from coco_helpers import coco_subset
    from segic_mix_data import derive_ade20k, derive_lvis, extract_in_process

    from pipeline.training.config import StoreSpec, TrainConfig
    from pipeline.training.data import load_fold_data
    from pipeline.training.mix_config import MixConfig, MixSource
    from pipeline.locations import resolve_root
    from pipeline.training.prepare import FoldWriter
    from pipeline.training.prepared import open_prepared
    from pipeline.training.segic_mixed.preparation import prepare_mix

    coco = shared / "data/coco_mini"
    work.mkdir(parents=True, exist_ok=True)
    subset = work / f"subset{images}.json"
    if not subset.exists():
        coco_subset(coco / "instances.json", images, subset)
    ade, lvis_root = work / f"ade{images}", work / f"lvis{images}"
    if not (ade / "objectInfo150.csv").exists():
        derive_ade20k(subset, coco / "images", ade)
    lvis = lvis_root / "lvis_v1_train.json"
    if not lvis.exists():
        derive_lvis(subset, coco / "images", lvis_root)
    instances = str(work / f"stores{images}" / "instances")
    mix = MixConfig(
        sources=(
            MixSource("coco_semantic", "coco_semantic"),
            MixSource("ade20k", "ade20k_semantic", images=str(ade)),
            MixSource("coco_instances", "coco_instances", store=instances, views=2, feature_dataset="bench_inst"),
            MixSource("lvis", "lvis_instances", annotations=str(lvis), images=str(lvis_root), store=instances, views=2,
                      feature_dataset="bench_inst"),
        ),
        warp_prob=0.3,
    )
    weights = shared / "weights/mobilenet_v2_imagenet.pth"
    cfg = TrainConfig(
        method="segic", sampler="segic_mixed", mix=mix, annotations=str(subset), images=str(coco / "images"),
        feature_dataset="bench", backbone=StoreSpec("mobilenet_v2", str(weights), str(work / f"stores{images}" / "main")),
        method_overrides=SEGIC_AT_512, recipe_overrides=dict(batch_size=8), num_workers=2,
        val_episodes=4, test_episodes=8, log_every=1,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    data = load_fold_data(cfg)
    writer = FoldWriter(cfg, data, resolve_root(str(work)))
    prepare_mix(cfg, data, writer, extract_missing=True, extract=extract_in_process)
    torch.set_num_threads(threads)
    return cfg, open_prepared(writer.write())


def loader_vs_step(cfg, data, batches: int, per_batch: int) -> dict:
    import torch

    from pipeline.training.worker import build_method
    from pipeline.training.segic_mixed import SegICMixedSampler
    from pipeline.training.evaluate import chunks

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_method(cfg, {"backbone": {"layer4": (1280, 16, 16)}}, None).train()
    sampler = SegICMixedSampler(cfg, data, model, None)
    table = sampler.epoch_table(0, (batches + 1) * per_batch).to_pylist()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    build_s, step_s, sources = [], [], {}
    for index, rows in enumerate(chunks(table, per_batch)[: batches + 1]):
        started = time.perf_counter()
        batch = sampler.build(rows)
        built = time.perf_counter()
        targets, valid = (batch.target_masks == 1).float(), (batch.target_masks != 255).float()
        outputs = model(batch.features)
        losses = model.loss(outputs, targets, valid)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        model.after_step(outputs, batch.features)
        done = time.perf_counter()
        if index == 0:
            continue  # warm-up: first reads open the stores, first step allocates
        build_s.append(built - started)
        step_s.append(done - built)
        for source in batch.features.meta["sources"]:
            sources[source] = sources.get(source, 0) + 1
    loader_rate = per_batch / statistics.median(build_s)
    step_rate = per_batch / statistics.median(step_s)
    return {
        "batches": batches, "samples_per_batch": per_batch, "torch_threads": 1, "sources_drawn": sources,
        "loader_s_per_batch_median": round(statistics.median(build_s), 4),
        "step_s_per_batch_median": round(statistics.median(step_s), 4),
        "loader_samples_per_s": round(loader_rate, 2), "step_samples_per_s": round(step_rate, 2),
        "loader_over_step": round(loader_rate / step_rate, 2),
        "queue_entries_after": len(model.queue), "queue_classes_after": len(model.queue.classes),
    }


def job(cfg, work: Path, workers: int, samples: int) -> dict:
    from dataclasses import replace

    from mlflow.tracking import MlflowClient

    from pipeline.locations import resolve_root
    from pipeline.training.job import JobOptions, run_training

    tracking = Path(tempfile.mkdtemp(prefix="segic-mlflow-", dir=work))
    run_cfg = cfg.replace(num_workers=workers, mix=replace(cfg.mix, samples_per_epoch=samples),
                          recipe_overrides=dict(batch_size=8, epochs=1), storage_path=str(tracking / "ray"),
                          run_name=f"bench-segic-{workers}w")
    uri = f"sqlite:///{tracking}/mlflow.db"
    options = JobOptions(folds=(0,), tracking_uri=uri, ray_init_kwargs={"num_cpus": 2, "include_dashboard": False},
                         root=resolve_root(str(tracking)))
    import ray

    try:
        summary = run_training(run_cfg, options)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    run_id = summary["folds"][0]["run_id"]
    client = MlflowClient(uri)

    def median(key: str) -> float | None:
        values = [m.value for m in client.get_metric_history(run_id, key)][1:]  # step 1 warms up
        return round(statistics.median(values), 4) if values else None

    data_s, step_s = median("time/data_s"), median("time/step_s")
    per_worker = 8 // workers
    return {"workers": workers, "global_batch": 8, "steps": samples // 8,
            "data_s_median": data_s, "step_s_median": step_s, "data_share_median": median("time/data_share"),
            "loader_samples_per_s_per_worker": round(per_worker / data_s, 1) if data_s else None,
            "step_samples_per_s_per_worker": round(per_worker / step_s, 2) if step_s else None}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def queue_memory(lengths: tuple[int, ...], class_counts: tuple[int, ...], dim: int = 256) -> list[dict]:
    import torch

    from refseg_models.modeling.segic_training import InstanceFeatureQueue

    rows, kept = [], []
    for classes in class_counts:
        for length in lengths:
            before = _rss_mb()
            queue = InstanceFeatureQueue(max_per_class=length)
            started = time.perf_counter()
            for _ in range(length):
                queue.push(list(range(classes)), torch.randn(classes, dim))
            push_s = time.perf_counter() - started
            resident = _rss_mb() - before
            started = time.perf_counter()
            sampled = queue.sample_from(list(range(min(40, classes))), 10, torch.Generator().manual_seed(0))
            sample_ms = (time.perf_counter() - started) * 1e3
            buffer = io.BytesIO()
            torch.save({"negative_queue": queue.state_dict()}, buffer)
            rows.append({"classes": classes, "per_class": length, "entries": len(queue),
                         "tensor_mb": round(queue.nbytes() / 2**20, 2), "rss_added_mb": round(resident, 1),
                         "checkpoint_mb": round(buffer.tell() / 2**20, 2),
                         "push_us_per_entry": round(push_s / len(queue) * 1e6, 2),
                         "sample_10_of_40_classes_ms": round(sample_ms, 3), "sampled": int(sampled.shape[0])})
            kept.append(queue)  # kept alive: freed memory would be reused by the next, larger queue
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench_segic")
    parser.add_argument("--images", type=int, default=120, help="coco_mini images the derived sources copy")
    parser.add_argument("--batches", type=int, default=8, help="timed batches of the in-process comparison")
    parser.add_argument("--job-samples", type=int, default=48, help="samples of the one-epoch job runs")
    parser.add_argument("--skip-job", action="store_true", help="only the in-process comparison and the queue")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.shared / "data/coco_mini/instances.json").is_file():
        parser.error(f"no coco_mini under {args.shared}/data (pass --shared)")
    # absolute: the Ray Train workers of the job runs do not share this process's working directory
    queue = queue_memory((32, 128, 512), (80, 1203))  # first: a fresh process, so RSS growth is the queue's
    cfg, data = workspace(args.shared.resolve(), args.work.resolve(), args.images)
    result = {
        "machine": machine(),
        "setup": {"images": args.images, "backbone": "mobilenet_v2 layer4 (512 squash, 16 x 16)",
                  "segic": {k: list(v) if isinstance(v, tuple) else v for k, v in SEGIC_AT_512.items()}},
        "loader_vs_step": loader_vs_step(cfg, data, args.batches, per_batch=4),
        "queue": queue,
    }
    if not args.skip_job:
        result["job"] = [job(cfg, args.work, workers, args.job_samples) for workers in (1, 2)]
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
