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
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.fs as pafs

from pipeline.errors import USER_ERRORS, ConfigError, DataError
from pipeline.extraction.chunks import ChunkEncoder, chunk_rows, decode_chunk, write_chunk
from pipeline.extraction.config import default_batch_size
from pipeline.extraction.encoder_source import EncoderSource
from pipeline.store.builder import StoreBuilder
from pipeline.store.feature_set import SUPPORTED_PRECISIONS, FeatureSetKey
from pipeline.store.fs import Location, resolve_location
from pipeline.store.lease import (
    DEFAULT_TTL_S,
    TMP_SCRATCH_PREFIX,
    RunIdentity,
    StoreLockedError,
    clean_stale_scratch,
    lease_holder,
    make_scratch_dir,
    temp_root,
)
from pipeline.store.layout import (
    DEFAULT_TARGET_SHARD_BYTES,
    ImageItem,
    ShardSpec,
    images_per_shard_for,
    sorted_items,
)
from pipeline.store.shard_writer import ShardResult, ShardWriter
from pipeline.store.version import code_version

_DECODE_WORKER_BASE_BYTES = 768 * 1024**2

# Per worker process: the encoder resolved from the object store once, not once per task.
_WORKER_ENCODERS: dict[str, Any] = {}


def _worker_encoder(holder: list) -> Any:
    import ray

    ref = holder[0]
    key = ref.hex()
    if key not in _WORKER_ENCODERS:
        _WORKER_ENCODERS.clear()  # one extraction at a time per worker: drop stale encoders
        _WORKER_ENCODERS[key] = ray.get(ref)
    return _WORKER_ENCODERS[key]


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


def _decode_chunk(batch: dict[str, np.ndarray], holder: list) -> dict[str, np.ndarray]:
    """CPU task: :func:`~pipeline.extraction.chunks.decode_chunk` with the worker's encoder."""
    return decode_chunk(batch, _worker_encoder(holder))


class _EncodeChunk:
    """Encoder actor: one chunk in, its features (store dtype, raw bytes per feature) out
    (:class:`~pipeline.extraction.chunks.ChunkEncoder` on the actor's device)."""

    def __init__(
        self, holder: list, feature_shapes: dict[str, list[int]], dtype: str, use_gpu: bool, torch_threads: int,
        precision: str = "float32", compile: bool = False,
    ) -> None:
        import torch

        torch.set_num_threads(max(1, torch_threads))
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.encode = ChunkEncoder(_worker_encoder(holder), feature_shapes, dtype, device, precision, compile)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.encode(batch)


class _ShardActor:
    """``writer="actors"``: one call = one whole shard, written by the actor itself.

    Decoding still runs in separate CPU tasks (Ray core tasks launched from here, at most
    ``decode_window`` chunks ahead); encoding and tar writing happen in this actor, which publishes
    the shard into the store (object storage or a filesystem every node sees) and returns its stats.
    Chunks and threads are the same as in ``writer="driver"``, so the bytes are too.
    """

    def __init__(
        self,
        encoder_holder: list,
        decode_holder: list,
        location: Location,
        scratch_dir: str | None,
        feature_shapes: dict[str, list[int]],
        dtype: str,
        use_gpu: bool,
        torch_threads: int,
        batch_size: int,
        decode_num_cpus: float,
        decode_memory: int,
        code_version: str,
        run: dict,
        settings: dict,
        run_record: dict,
        lease_ttl_s: float = DEFAULT_TTL_S,
        decode_window: int = 2,
        precision: str = "float32",
        compile: bool = False,
    ) -> None:
        import ray

        self.encode = _EncodeChunk(encoder_holder, feature_shapes, dtype, use_gpu, torch_threads, precision, compile)
        self.decode = ray.remote(_decode_chunk).options(num_cpus=decode_num_cpus, memory=decode_memory)
        self.decode_holder = decode_holder
        self.location = location
        self.scratch_dir = scratch_dir
        self.feature_shapes = {name: tuple(shape) for name, shape in feature_shapes.items()}
        self.dtype = dtype
        self.batch_size = batch_size
        self.decode_window = max(1, decode_window)
        self.code_version = code_version
        self.run_id = run["run_id"]
        self.settings, self.run_record = settings, run_record
        if scratch_dir is None:
            # Object store: scratch in this node's temp dir, owned by this actor process; scratch of
            # dead runs on this node (a killed actor's half shard) is removed first.
            me = RunIdentity.from_dict(run).derived(f"actor{os.getpid()}")
            clean_stale_scratch(temp_root(), me, ttl_s=lease_ttl_s, prefix=TMP_SCRATCH_PREFIX)
            self.scratch_dir = str(make_scratch_dir(temp_root(), me, prefix=TMP_SCRATCH_PREFIX))

    def __del__(self) -> None:
        if self.location is not None and not self.location.is_local:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)

    def _check_lease(self) -> None:
        holder = lease_holder(self.location)
        if holder != self.run_id:
            raise StoreLockedError(
                f"run {self.run_id} no longer holds the lease of {self.location.join('')} (holder: {holder}); "
                "not publishing"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        items = tuple(ImageItem(*item) for item in json.loads(batch["items"][0]))
        spec = ShardSpec(int(batch["shard"][0]), items)
        rows = [{key: np.array([value]) for key, value in row.items()} for row in chunk_rows([spec], self.batch_size)]
        writer = ShardWriter(
            spec, self.location, self.scratch_dir, self.feature_shapes, self.dtype, self.code_version,
            guard=self._check_lease, settings=self.settings, run=dict(self.run_record, actor_pid=os.getpid()),
        )
        try:
            submitted = [self.decode.remote(row, self.decode_holder) for row in rows[: self.decode_window]]
            for index in range(len(rows)):
                decoded = ray.get(submitted[index])
                submitted[index] = None  # drop the reference: the pixels are freed once encoded
                if index + self.decode_window < len(rows):
                    submitted.append(self.decode.remote(rows[index + self.decode_window], self.decode_holder))
                encoded = self.encode(decoded)
                row = {key: value[0] for key, value in encoded.items()}
                write_chunk(writer, row, self.feature_shapes, self.dtype)
            result = writer.publish()
        except BaseException:
            writer.abort()
            raise
        return {"shard": batch["shard"], "result": np.array([result.to_json()], dtype=object)}


def _state_bytes(module: Any) -> int:
    state = module.state_dict() if hasattr(module, "state_dict") else {}
    return sum(t.numel() * t.element_size() for t in state.values())


def _weightless(encoder: Any) -> tuple[Any | None, tuple[int, ...]]:
    """(the encoder moved to the meta device if its ``preprocess`` is then unchanged, else None;
    the preprocessed shape). Moves ``encoder`` itself: call it after the real one is serialised."""
    import torch

    probe = np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)  # odd, non-square
    expected = encoder.preprocess(probe)
    if not isinstance(encoder, torch.nn.Module):
        return None, tuple(expected.shape)
    light = encoder.to("meta")
    try:
        again = light.preprocess(probe)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        return None, tuple(expected.shape)
    if again.device.type != "cpu" or again.dtype != expected.dtype or not torch.equal(again, expected):
        return None, tuple(expected.shape)
    return light, tuple(expected.shape)


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


def _run_pipeline(
    builder: StoreBuilder, pending: list[ShardSpec], built: Any, key: FeatureSetKey, output: str, started: float,
    *, batch_size: int | None, num_actors: int, actor_num_cpus: float, decode_num_cpus: float,
    num_gpus_per_actor: float | None, dtype: str, dataset: str, config: dict | None, progress: bool,
    on_shard_done: Callable[[ShardResult], None] | None, ray_address: str | None, writer: str, lease_ttl_s: float,
    precision: str, compile: bool,
) -> ExtractionSummary:
    import ray
    from tqdm import tqdm

    location = builder.location
    feature_shapes = builder.feature_shapes
    per_shard = builder.images_per_shard
    torch_threads = max(1, int(actor_num_cpus))
    # Each shard's stats record this run (id, host, pid) with the caller's config and the settings
    # that decide its bytes; the manifest only aggregates what the stats say (stable bytes).
    builder.run_config = json.loads(json.dumps({
        **(config or {}),
        "extract": {
            "dataset": dataset, "images_per_shard": per_shard, "num_actors": num_actors, "writer": writer,
            "actor_num_cpus": actor_num_cpus, "decode_num_cpus": decode_num_cpus,
            "num_gpus_per_actor": num_gpus_per_actor,
        },
    }, default=str))

    decode_weightless = None
    startup_seconds = extract_seconds = 0.0
    if pending:
        _ray_init(ray_address)
        resources = ray.cluster_resources()
        if num_gpus_per_actor is None:
            num_gpus_per_actor = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        _check_room(resources, num_actors, actor_num_cpus, decode_num_cpus, num_gpus_per_actor)
        if batch_size is None:
            batch_size = default_batch_size(built.encoder_id, on_gpu=num_gpus_per_actor > 0)
        builder.writer_settings = {
            "batch_size": batch_size, "torch_threads": torch_threads, "dtype": dtype,
            "device": "cuda" if num_gpus_per_actor > 0 else "cpu",
            **({"compile": True} if compile else {}),  # compiled kernels may round differently
        }
        encoder_ref = ray.put(built.cpu() if hasattr(built, "cpu") else built)
        preprocess_only, pixel_shape = _weightless(built)
        # Decode tasks only call ``preprocess``: they get a weightless copy when it gives identical
        # tensors (all encoders here), else the whole encoder (~2.5 GB per decode worker for ViT-H).
        decode_ref = ray.put(preprocess_only) if preprocess_only is not None else encoder_ref
        decode_weightless = preprocess_only is not None
        encoder_bytes = 0 if decode_weightless else _state_bytes(built)
        # A decode worker holds torch (~650 MiB RSS measured) and ~3 copies of a chunk's float32 pixels.
        decode_memory = _DECODE_WORKER_BASE_BYTES + encoder_bytes + 3 * batch_size * 4 * int(np.prod(pixel_shape))
        if resources.get("memory", float("inf")) < decode_memory:
            raise ConfigError(
                f"a decode task reserves {decode_memory / 2**30:.1f} GiB (torch + {batch_size} images of pixels), "
                f"the cluster offers {resources['memory'] / 2**30:.1f} GiB: it could never be scheduled; "
                "lower --batch-size or give Ray more memory"
            )
        del built, preprocess_only
        total = sum(len(spec.items) for spec in pending)
        specs = {spec.index: spec for spec in pending}
        context = ray.data.DataContext.get_current()
        saved = (context.execution_options.preserve_order, context.enable_progress_bars)
        context.execution_options.preserve_order = True  # rows arrive in plan order -> streaming writes
        context.enable_progress_bars = False  # one bar (ours, images/s) instead of one per operator
        pipeline_started = time.perf_counter()
        startup_seconds = pipeline_started - started
        encoder_kwargs = {
            "feature_shapes": {name: list(shape) for name, shape in feature_shapes.items()},
            "dtype": dtype,
            "use_gpu": num_gpus_per_actor > 0,
            "torch_threads": torch_threads,
            "precision": precision,
            "compile": compile,
        }
        try:
            if writer == "actors":
                shard_rows = [
                    {"shard": spec.index, "items": json.dumps([[item.image_id, item.path] for item in spec.items])}
                    for spec in pending
                ]
                dataset_ = ray.data.from_items(shard_rows, override_num_blocks=len(shard_rows)).map_batches(
                    _ShardActor,
                    batch_size=1,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=num_actors),
                    num_cpus=actor_num_cpus,
                    num_gpus=num_gpus_per_actor,
                    fn_constructor_kwargs={
                        "encoder_holder": [encoder_ref],
                        "decode_holder": [decode_ref],
                        "location": location,
                        "scratch_dir": str(builder.scratch_dir) if location.is_local else None,
                        "batch_size": batch_size,
                        "decode_num_cpus": decode_num_cpus,
                        "decode_memory": decode_memory,
                        "code_version": code_version(),
                        "run": builder.run.to_dict(),
                        "settings": builder.writer_settings,
                        "run_record": builder.run_record,
                        "lease_ttl_s": lease_ttl_s,
                        **encoder_kwargs,
                    },
                )
                _collect_shard_rows(dataset_.iter_rows(), location, total, progress, on_shard_done, tqdm)
            else:
                rows = chunk_rows(pending, batch_size)
                dataset_ = (
                    ray.data.from_items(rows, override_num_blocks=len(rows))
                    .map_batches(
                        _decode_chunk,
                        batch_size=1,
                        batch_format="numpy",
                        num_cpus=decode_num_cpus,
                        # A memory reservation for the fat float32 pixel rows; it also keeps Ray Data from
                        # fusing decode into the encoder actors (fused, decode would serialise with encode).
                        memory=decode_memory,
                        fn_kwargs={"holder": [decode_ref]},
                    )
                    .map_batches(
                        _EncodeChunk,
                        batch_size=1,
                        batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=num_actors),
                        num_cpus=actor_num_cpus,
                        num_gpus=num_gpus_per_actor,
                        fn_constructor_kwargs={
                            "holder": [encoder_ref],
                            **encoder_kwargs,
                        },
                    )
                )
                _write_rows(
                    dataset_.iter_rows(), builder, specs, feature_shapes, dtype, total, progress, on_shard_done, tqdm,
                    started=pipeline_started,
                )
        except Exception as error:
            # Ray wraps errors raised in tasks/actors (a full disk in an actor's writer, a lost lease, a
            # bad checkpoint) in its own exceptions: surface ours, as one line, not Ray's traceback.
            user_error = _user_error(error)
            if user_error is None or user_error is error:
                raise
            raise user_error from error
        finally:
            context.execution_options.preserve_order, context.enable_progress_bars = saved
        extract_seconds = time.perf_counter() - pipeline_started
    manifest = builder.finalize()
    seconds = time.perf_counter() - started
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
        seconds=seconds,
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


def _check_room(resources: dict, num_actors: int, actor_cpus: float, decode_cpus: float, gpus: float) -> None:
    """Refuse settings under which the pipeline could never make progress (it would hang silently).

    Ray Data starts the encoder actor pool first; if the actors hold every CPU, no decode task can
    ever be scheduled and nothing moves. Both writers need room for one decode task beside the
    actors (``writer="actors"``: each actor waits on its own decode tasks)."""
    cpus, gpus_available = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    actors_cpus = num_actors * actor_cpus
    if actors_cpus + decode_cpus > cpus:
        raise ConfigError(
            f"{num_actors} encoder actor(s) x {actor_cpus:g} CPU (--num-actors x --actor-num-cpus) = {actors_cpus:g} "
            f"of the cluster's {cpus:g} CPUs leave {max(cpus - actors_cpus, 0):g} for decode tasks, each needs "
            f"{decode_cpus:g} (--decode-num-cpus): no image could ever be decoded and the extraction would hang. "
            "Lower --actor-num-cpus / --num-actors or --decode-num-cpus."
        )
    if num_actors * gpus > gpus_available:
        raise ConfigError(
            f"{num_actors} encoder actor(s) x {gpus:g} GPU need {num_actors * gpus:g} GPUs, the cluster has "
            f"{gpus_available:g}: the actors could never start. Lower --num-actors or --num-gpus-per-actor."
        )


def _collect_shard_rows(rows, location, total, progress, on_shard_done, tqdm) -> None:
    """``writer="actors"``: shards arrive finished (any order); report them."""
    failed = 0
    with tqdm(total=total, unit="img", desc="extract", disable=not progress, smoothing=0.1) as bar:
        for row in rows:
            result = ShardResult.from_json(row["result"], location.join(f"shard {row['shard']}"))
            failed += len(result.failures)
            bar.update(result.count)
            bar.set_postfix(shard=result.shard, failed=failed, refresh=False)  # failed so far, all shards
            if on_shard_done is not None:
                on_shard_done(result)


def _write_rows(
    rows, builder, specs, feature_shapes, dtype, total, progress, on_shard_done, tqdm, started: float | None = None
) -> None:
    """Stream ordered chunk rows into their shard tars; publish each shard after its last chunk.

    A shard's ``duration_s`` is the wall time the run spent on it: from the previous shard's publish
    (the first shard: from ``started``, the pipeline's start, so it includes actor start-up) to its
    own publish. Decode and encode of a shard overlap the previous shard's writes, so these add up to
    the pipeline's wall time instead of measuring only how long the tar was open.
    """
    writer = None
    current = None
    failed = 0
    shard_started = time.perf_counter() if started is None else started
    with tqdm(total=total, unit="img", desc="extract", disable=not progress, smoothing=0.1) as bar:
        try:
            for row in rows:
                shard = int(row["shard"])
                if shard != current:
                    if writer is not None:
                        raise DataError(f"shard {current} ended without its last chunk (rows out of order)")
                    current, writer = shard, builder.writer(specs[shard], started=shard_started)
                bar.update(write_chunk(writer, row, feature_shapes, dtype))
                failed += len(json.loads(row["failures"]))
                bar.set_postfix(shard=specs[shard].name, failed=failed, refresh=False)  # failed so far, all shards
                if bool(row["last"]):
                    result = writer.publish()
                    writer, current = None, None
                    shard_started = time.perf_counter()
                    if on_shard_done is not None:
                        on_shard_done(result)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
    if writer is not None:
        raise DataError(f"shard {current} was not completed (its last chunk never arrived)")
