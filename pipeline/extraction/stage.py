"""The Ray Data extraction stage: image list -> decode tasks -> encoder actor pool -> shard writer.

Data flow (one Ray Data pipeline per store, only over the shards still to do)::

    from_items(chunks)                      one row = one encoder batch: up to ``batch_size``
                                            consecutive images of ONE shard (fixed by the plan)
    .map_batches(_decode_chunk, batch_size=1, num_cpus=..)           CPU tasks: decode + preprocess
    .map_batches(_EncodeChunk, batch_size=1,
                 compute=ActorPoolStrategy(size=n), num_gpus=..)      encoder actors (GPU if present)
    .iter_rows()  (preserve_order)          the driver streams rows into the shard tars in plan
                                            order, publishes each shard when its last chunk lands

Why chunks and not image rows: encoder batches never cross shard boundaries and are the same in a
clean and a resumed run, so features (batch-size-sensitive on some kernels) and thus the shard
bytes are reproducible; and a row is a few images, so the fat float32 pixel tensors stay bounded.
Corrupt or missing images become failures (with reasons) in the decode tasks and never stop the run.

Modules: this one plans and runs the pipeline; :mod:`.operators` holds the Ray Data operators,
:mod:`.resources` the checks that the cluster can run them, :mod:`.shard_sink` the driver's side of
the writes, :mod:`.chunks` the per-chunk work without Ray.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.fs as pafs

from pipeline.errors import USER_ERRORS, ConfigError
from pipeline.extraction.chunks import chunk_rows
from pipeline.extraction.config import default_batch_size
from pipeline.extraction.encoder_source import EncoderSource
from pipeline.extraction.operators import _decode_chunk, _EncodeChunk, _ShardActor
from pipeline.extraction.resources import check_room, decode_memory, state_bytes, weightless
from pipeline.extraction.shard_sink import collect_shard_rows, write_rows
from pipeline.store.builder import StoreBuilder
from pipeline.store.feature_set import SUPPORTED_PRECISIONS, FeatureSetKey
from pipeline.store.fs import resolve_location
from pipeline.store.layout import DEFAULT_TARGET_SHARD_BYTES, ImageItem, ShardSpec, images_per_shard_for, sorted_items
from pipeline.store.lease import DEFAULT_TTL_S
from pipeline.store.shard_writer import ShardResult
from pipeline.store.version import code_version


@dataclass
class ExtractionSummary:
    store: str
    feature_set: str
    images: int
    written: int
    failed: int
    shards: int
    shards_extracted: int
    shards_skipped: int
    seconds: float  # the whole call
    images_per_second: float  # images extracted now / extract_seconds (0 when nothing was extracted)
    failures: list[dict[str, str]] = field(default_factory=list)
    # seconds = startup_seconds (encoder build, Ray start/connect, weights into the object store)
    #         + extract_seconds (the Ray Data pipeline: actor start-up, decode, encode, writes) + the rest
    startup_seconds: float = 0.0
    extract_seconds: float = 0.0
    # True when decode tasks got a weightless (meta-device) copy of the encoder for ``preprocess``.
    decode_weightless: bool | None = None
    # Finished shards written again because they had failed images (``retry_failed``).
    retried_shards: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [
            f"store {self.store} [{self.feature_set}]",
            f"  images {self.images}: written {self.written}, failed {self.failed}",
            f"  shards {self.shards}: extracted now {self.shards_extracted}, already done {self.shards_skipped}"
            + (f" (retried {len(self.retried_shards)} with failed images)" if self.retried_shards else ""),
            f"  {self.seconds:.1f} s: start-up {self.startup_seconds:.1f} s (encoder, Ray), extraction "
            f"{self.extract_seconds:.1f} s"
            + (f" = {self.images_per_second:.2f} images/s" if self.shards_extracted else ""),
        ]
        lines += [f"  FAILED {f['image_id']} ({f['path']}): {f['reason']}" for f in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... {len(self.failures) - 20} more failures in manifest.json")
        return "\n".join(lines)


def _ray_init(address: str | None) -> None:
    from pipeline.ray_session import init_ray

    # No address: connect to the cluster of `ray job submit` (RAY_ADDRESS) or start a local one.
    init_ray(address)


def extract_store(
    items: Sequence[ImageItem | tuple[object, str]],
    output: str,
    encoder: EncoderSource,
    dataset: str,
    *,
    dtype: str = "float16",
    batch_size: int | None = None,
    precision: str = "float32",
    compile: bool = False,
    target_shard_bytes: int = DEFAULT_TARGET_SHARD_BYTES,
    images_per_shard: int | None = None,
    num_actors: int = 1,
    actor_num_cpus: float = 1.0,
    decode_num_cpus: float = 1.0,
    num_gpus_per_actor: float | None = None,
    filesystem: pafs.FileSystem | None = None,
    config: dict | None = None,
    progress: bool = True,
    on_shard_done: Callable[[ShardResult], None] | None = None,
    ray_address: str | None = None,
    writer: str = "driver",
    lease_ttl_s: float = DEFAULT_TTL_S,
    lease_settle_s: float | None = None,
    retry_failed: bool = True,
) -> ExtractionSummary:
    """Extract ``encoder``'s features of ``items`` into the store at ``output`` (resumable).

    ``items``: ``(image_id, path)`` pairs in any order (sorted by id for the shard plan).
    ``on_shard_done``: progress callback, called in this process with each shard's
    :class:`~pipeline.store.shard_writer.ShardResult` right after the shard is published (e.g. to
    log per-shard counts and failures to MLflow); an exception it raises stops the run, and the
    next run resumes after the last published shard.
    ``config``: the caller's full call configuration, recorded in the stats of every shard this run
    writes (``run.config``), not in ``manifest.json`` (whose bytes must not depend on the invocation).
    ``writer``: ``"driver"`` (chunks stream back to this process, which writes every shard: one node)
    or ``"actors"`` (each encoder actor writes whole shards itself: scales out over nodes; the store
    must be object storage or a filesystem all nodes see). Both write the same bytes.
    ``batch_size``: images per encoder call; ``None``: 8 on CPUs, the encoder's GPU batch on GPUs
    (:func:`~pipeline.extraction.config.default_batch_size`).
    ``precision``: ``"float32"`` (the reference) or ``"bfloat16"`` (the encoder under bf16 autocast;
    recorded in the feature-set key). ``compile``: ``torch.compile`` the encoder in each actor.
    ``lease_ttl_s`` / ``lease_settle_s``: the store's write lease (one run at a time; see
    :mod:`pipeline.store.lease`). A second run on the same output is refused with the holder's name.
    ``retry_failed``: re-extract finished shards that recorded failed images (e.g. after fixing a
    wrong image folder); shards without failures are never rewritten.
    """
    if (batch_size is not None and batch_size <= 0) or num_actors <= 0:
        raise ConfigError(f"batch_size ({batch_size}) and num_actors ({num_actors}) must be positive")
    if precision not in SUPPORTED_PRECISIONS:
        raise ConfigError(f"precision must be one of {SUPPORTED_PRECISIONS}, got {precision!r}")
    if writer not in ("driver", "actors"):
        raise ConfigError(f"writer must be 'driver' or 'actors', got {writer!r}")
    started = time.perf_counter()
    ordered = sorted_items(items)
    if not ordered:
        raise ConfigError("the image list is empty")

    built = encoder.build()
    feature_shapes = {name: tuple(int(size) for size in shape) for name, shape in built.output_shapes().items()}
    key = FeatureSetKey(dataset, built.encoder_id, encoder.weights_sha256(), built.preprocessing_id, dtype, precision)
    per_shard = images_per_shard or images_per_shard_for(feature_shapes, np.dtype(dtype).itemsize, target_shard_bytes)
    location = resolve_location(output, filesystem)
    builder = StoreBuilder(
        location, key, feature_shapes, ordered, per_shard, lease_ttl_s=lease_ttl_s, lease_settle_s=lease_settle_s
    )
    pending = builder.prepare(retry_failed=retry_failed)
    try:
        return _run_pipeline(
            builder, pending, built, key, output, started, batch_size=batch_size, num_actors=num_actors,
            actor_num_cpus=actor_num_cpus, decode_num_cpus=decode_num_cpus, num_gpus_per_actor=num_gpus_per_actor,
            dtype=dtype, dataset=dataset, config=config, progress=progress, on_shard_done=on_shard_done,
            ray_address=ray_address, writer=writer, lease_ttl_s=lease_ttl_s, precision=precision, compile=compile,
        )
    finally:
        builder.close()  # scratch removed and lease given back, also when the run fails


@dataclass(frozen=True)
class _Plan:
    """What the pipeline runs with, settled against the cluster before any image is read."""

    batch_size: int
    num_gpus_per_actor: float
    torch_threads: int
    encoder_ref: Any  # the encoder in Ray's object store
    decode_ref: Any  # what decode tasks call ``preprocess`` on: a weightless copy, or the encoder
    decode_weightless: bool
    decode_memory: int


def _run_pipeline(
    builder: StoreBuilder, pending: list[ShardSpec], built: Any, key: FeatureSetKey, output: str, started: float,
    *, batch_size: int | None, num_actors: int, actor_num_cpus: float, decode_num_cpus: float,
    num_gpus_per_actor: float | None, dtype: str, dataset: str, config: dict | None, progress: bool,
    on_shard_done: Callable[[ShardResult], None] | None, ray_address: str | None, writer: str, lease_ttl_s: float,
    precision: str, compile: bool,
) -> ExtractionSummary:
    # Each shard's stats record this run (id, host, pid) with the caller's config and the settings
    # that decide its bytes; the manifest only aggregates what the stats say (stable bytes).
    builder.run_config = json.loads(json.dumps({
        **(config or {}),
        "extract": {
            "dataset": dataset, "images_per_shard": builder.images_per_shard, "num_actors": num_actors,
            "writer": writer, "actor_num_cpus": actor_num_cpus, "decode_num_cpus": decode_num_cpus,
            "num_gpus_per_actor": num_gpus_per_actor,
        },
    }, default=str))
    plan = None
    startup_seconds = extract_seconds = 0.0
    if pending:
        _ray_init(ray_address)
        plan = _plan(built, batch_size, num_actors, actor_num_cpus, decode_num_cpus, num_gpus_per_actor)
        builder.writer_settings = {
            "batch_size": plan.batch_size, "torch_threads": plan.torch_threads, "dtype": dtype,
            "device": "cuda" if plan.num_gpus_per_actor > 0 else "cpu",
            **({"compile": True} if compile else {}),  # compiled kernels may round differently
        }
        del built
        pipeline_started = time.perf_counter()
        startup_seconds = pipeline_started - started
        encoder_kwargs = {
            "feature_shapes": {name: list(shape) for name, shape in builder.feature_shapes.items()},
            "dtype": dtype, "use_gpu": plan.num_gpus_per_actor > 0, "torch_threads": plan.torch_threads,
            "precision": precision, "compile": compile,
        }
        _execute(builder, pending, plan, encoder_kwargs, num_actors=num_actors, actor_num_cpus=actor_num_cpus,
                 decode_num_cpus=decode_num_cpus, writer=writer, lease_ttl_s=lease_ttl_s, progress=progress,
                 on_shard_done=on_shard_done, started=pipeline_started)
        extract_seconds = time.perf_counter() - pipeline_started
    return _summary(builder, pending, key, output, started, startup_seconds, extract_seconds,
                    None if plan is None else plan.decode_weightless)


def _plan(
    built: Any, batch_size: int | None, num_actors: int, actor_num_cpus: float, decode_num_cpus: float,
    num_gpus_per_actor: float | None,
) -> _Plan:
    """Check the cluster's room, settle GPUs and batch size, put the encoder (and, when its
    ``preprocess`` allows, a weightless copy for decode tasks) into Ray's object store."""
    import ray

    resources = ray.cluster_resources()
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    check_room(resources, num_actors, actor_num_cpus, decode_num_cpus, num_gpus_per_actor)
    if batch_size is None:
        batch_size = default_batch_size(built.encoder_id, on_gpu=num_gpus_per_actor > 0)
    encoder_ref = ray.put(built.cpu() if hasattr(built, "cpu") else built)
    preprocess_only, pixel_shape = weightless(built)
    # Decode tasks only call ``preprocess``: they get a weightless copy when it gives identical
    # tensors (all encoders here), else the whole encoder (~2.5 GB per decode worker for ViT-H).
    decode_ref = ray.put(preprocess_only) if preprocess_only is not None else encoder_ref
    encoder_bytes = 0 if preprocess_only is not None else state_bytes(built)
    return _Plan(
        batch_size, num_gpus_per_actor, max(1, int(actor_num_cpus)), encoder_ref, decode_ref,
        preprocess_only is not None, decode_memory(batch_size, pixel_shape, encoder_bytes, resources),
    )


def _bars_off_notice(record: logging.LogRecord) -> bool:
    """False for Ray Data's warning that its progress bars are off (we turned them off for our own)."""
    return not record.getMessage().startswith("Progress bars disabled")


def _execute(
    builder: StoreBuilder, pending: list[ShardSpec], plan: _Plan, encoder_kwargs: dict, *, num_actors: int,
    actor_num_cpus: float, decode_num_cpus: float, writer: str, lease_ttl_s: float, progress: bool,
    on_shard_done: Callable[[ShardResult], None] | None, started: float,
) -> None:
    """Run the Ray Data pipeline over ``pending`` with Ray Data's order kept and its bars off; an
    error of ours raised inside a task or actor comes out as itself, not wrapped in Ray's."""
    import ray
    from tqdm import tqdm

    total = sum(len(spec.items) for spec in pending)
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = True  # rows arrive in plan order -> streaming writes
    context.enable_progress_bars = False  # one bar (ours, images/s) instead of one per operator
    # Ray Data's INFO lines (dataset registered, execution plan, finished in N s) stay in its log file
    # (ray-data.log in the Ray session's logs): the console shows our bar and summary only
    console = [h for h in logging.getLogger("ray.data").handlers
               if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    console_levels = [h.level for h in console]
    for handler in console:
        handler.setLevel(max(handler.level, logging.WARNING))
        handler.addFilter(_bars_off_notice)
    try:
        if writer == "actors":
            rows = _actor_writer_dataset(builder, pending, plan, encoder_kwargs, num_actors, actor_num_cpus,
                                         decode_num_cpus, lease_ttl_s).iter_rows()
            collect_shard_rows(rows, builder.location, total, progress, on_shard_done, tqdm)
        else:
            rows = _driver_writer_dataset(pending, plan, encoder_kwargs, num_actors, actor_num_cpus,
                                          decode_num_cpus).iter_rows()
            specs = {spec.index: spec for spec in pending}
            write_rows(rows, builder, specs, builder.feature_shapes, encoder_kwargs["dtype"], total, progress,
                       on_shard_done, tqdm, started=started)
    except Exception as error:
        # Ray wraps errors raised in tasks/actors (a full disk in an actor's writer, a lost lease, a
        # bad checkpoint) in its own exceptions: surface ours, as one line, not Ray's traceback.
        user_error = _user_error(error)
        if user_error is None or user_error is error:
            raise
        raise user_error from error
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        for handler, level in zip(console, console_levels):
            handler.setLevel(level)
            handler.removeFilter(_bars_off_notice)


def _actor_pool(plan: _Plan, num_actors: int, actor_num_cpus: float) -> dict:
    """``map_batches`` options of the encoder actors (either writer): one row per call, a fixed pool."""
    import ray

    return {
        "batch_size": 1, "batch_format": "numpy", "compute": ray.data.ActorPoolStrategy(size=num_actors),
        "num_cpus": actor_num_cpus, "num_gpus": plan.num_gpus_per_actor,
    }


def _driver_writer_dataset(
    pending: list[ShardSpec], plan: _Plan, encoder_kwargs: dict, num_actors: int, actor_num_cpus: float,
    decode_num_cpus: float,
):
    """``writer="driver"``: chunk rows -> decode tasks -> encoder actors; rows come back to the driver."""
    import ray

    rows = chunk_rows(pending, plan.batch_size)
    return (
        ray.data.from_items(rows, override_num_blocks=len(rows))
        .map_batches(
            _decode_chunk,
            batch_size=1,
            batch_format="numpy",
            num_cpus=decode_num_cpus,
            # A memory reservation for the fat float32 pixel rows; it also keeps Ray Data from
            # fusing decode into the encoder actors (fused, decode would serialise with encode).
            memory=plan.decode_memory,
            fn_kwargs={"holder": [plan.decode_ref]},
        )
        .map_batches(
            _EncodeChunk,
            fn_constructor_kwargs={"holder": [plan.encoder_ref], **encoder_kwargs},
            **_actor_pool(plan, num_actors, actor_num_cpus),
        )
    )


def _actor_writer_dataset(
    builder: StoreBuilder, pending: list[ShardSpec], plan: _Plan, encoder_kwargs: dict, num_actors: int,
    actor_num_cpus: float, decode_num_cpus: float, lease_ttl_s: float,
):
    """``writer="actors"``: one row per shard -> shard actors that decode (tasks), encode and publish it."""
    import ray

    shard_rows = [
        {"shard": spec.index, "items": json.dumps([[item.image_id, item.path] for item in spec.items])}
        for spec in pending
    ]
    location = builder.location
    return ray.data.from_items(shard_rows, override_num_blocks=len(shard_rows)).map_batches(
        _ShardActor,
        **_actor_pool(plan, num_actors, actor_num_cpus),
        fn_constructor_kwargs={
            "encoder_holder": [plan.encoder_ref],
            "decode_holder": [plan.decode_ref],
            "location": location,
            "scratch_dir": str(builder.scratch_dir) if location.is_local else None,
            "batch_size": plan.batch_size,
            "decode_num_cpus": decode_num_cpus,
            "decode_memory": plan.decode_memory,
            "code_version": code_version(),
            "run": builder.run.to_dict(),
            "settings": builder.writer_settings,
            "run_record": builder.run_record,
            "lease_ttl_s": lease_ttl_s,
            **encoder_kwargs,
        },
    )


def _summary(
    builder: StoreBuilder, pending: list[ShardSpec], key: FeatureSetKey, output: str, started: float,
    startup_seconds: float, extract_seconds: float, decode_weightless: bool | None,
) -> ExtractionSummary:
    """Finalise the store's manifest and say what this call did."""
    manifest = builder.finalize()
    extracted_images = sum(len(spec.items) for spec in pending)
    return ExtractionSummary(
        store=output,
        feature_set=key.name,
        images=manifest.num_images,
        written=manifest.num_written,
        failed=manifest.num_failed,
        shards=len(manifest.shards),
        shards_extracted=len(pending),
        shards_skipped=len(manifest.shards) - len(pending),
        seconds=time.perf_counter() - started,
        images_per_second=extracted_images / extract_seconds if extract_seconds > 0 else 0.0,
        failures=list(manifest.failures),
        startup_seconds=startup_seconds,
        extract_seconds=extract_seconds,
        decode_weightless=decode_weightless,
        retried_shards=list(builder.retried),
    )


def _user_error(error: BaseException) -> BaseException | None:
    """The first refseg/model error in ``error``'s chain of causes, unwrapped from Ray's exceptions."""
    import ray.exceptions

    stack, seen = [error], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, USER_ERRORS) and not isinstance(current, ray.exceptions.RayError):
            return current
        stack += [current.__context__, current.__cause__, getattr(current, "cause", None)]
    return None
