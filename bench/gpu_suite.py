"""One prepared GPU measurement of refseg's extraction and training throughput (issue 22).

One call, time-boxed (``--budget-s``, default 300 s: under 6 minutes with start-up), random weights
at the real geometries (SAM ViT-H / ViT-B at 1024, DINOv2-L/14 at 896, ResNet-50 v2 at 512), writes
ONE JSON (``--out``) with the command, commit, versions and card, rewritten after every section so a
cut-off run still leaves what it measured. Sections, in this order; each one is fail-soft (an error
is recorded with its traceback and the next section runs) and is skipped, with the reason recorded,
when the budget left is below its minimum; inside a section the configurations stop at its own cap:

* ``ceilings``: a bf16 8192^3 matrix product (TFLOP/s, random data) and a device-to-device copy
  (GB/s, bytes read + written): the card's two ceilings (CUDA only);
* ``encoders``: encoder-only images/s per encoder x batch x precision (fp32, bf16 autocast) from
  device-resident random pixels, peak memory, GPU busy %; SAM ViT-H also with segment_anything's own
  attention (the baseline of docs/measurements/gpu_step_time_h200.json) at one batch;
* ``extraction``: images/s INTO A STORE through the extraction stage's own per-chunk code
  (``pipeline/extraction/chunks.py``: ``decode_chunk`` -> ``ChunkEncoder`` -> ``write_chunk`` into
  ``StoreBuilder`` shards) on synthetic JPEGs made on the fly: decode on a thread pool, encode in
  this thread, write on a writer thread (Ray Data, which runs these functions in the real stage, is
  not installed on the device machines); GPU busy % over the run;
* ``training``: per method (VRP-SAM, ProSAM, FCP) x micro-batch x precision: the trainable step
  (forward, the method's loss, backward, the recipe's AdamW) from device-resident features, the
  masked-reference layer4 and the online ResNet-50 on the GPU, the SAM embeddings' copy from pinned
  fp16 host memory, and episodes/s of the whole; the fused AdamW at one configuration;
* ``cosine``: per-token cosine between bf16-autocast and fp32 SAM embeddings (ViT-B, ViT-H) of the
  synthetic JPEGs (``--images DIR`` for real ones; ``--checkpoint sam_vit_b=PATH`` for real weights:
  random weights cannot show the outlier channels trained ViTs have);
* ``profile``: torch.profiler's top kernels for SAM ViT-H (bf16) and the VRP-SAM step (bf16);
* ``compile``: ``torch.compile`` of SAM ViT-B (bf16): compile time and images/s against eager.

On a device machine (docs/scaling.md, "GPU suite", has the exact command: its torch, no install of
this repository, the missing pure-Python packages carried as wheels):

    PYTHONPATH=. python3 bench/gpu_suite.py --out $OUT/gpu_suite.json --commit <hash>

Here, on a CPU, in seconds (tiny geometries; tests/test_gpu_suite.py runs it):

    python bench/gpu_suite.py --smoke --out /tmp/gpu_suite_smoke.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tiny_sam: the tiny SAM ViT benchmarks register

from refseg_models.encoders.precision import encoder_autocast, per_token_cosine  # noqa: E402
from tiny_sam import tiny_sam_registered  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class Geometry:
    """What a run measures: the real geometries, or tiny ones for ``--smoke`` on a CPU."""

    encoders: tuple[tuple[str, dict, tuple[int, ...]], ...]  # (encoder, builder options, batch sizes; fp32 at the first)
    baseline_attention: tuple[str, int] | None  # (SAM encoder, batch) also timed with SAM's own attention
    extraction: tuple[tuple[str, dict, int, int], ...]  # (encoder, options, batch, images)
    jpeg_size: tuple[int, int]
    methods: tuple[str, ...]
    micro_batches: tuple[int, ...]
    training_precisions: tuple[str, ...]  # the fused-AdamW configuration always runs in bf16
    method_overrides: dict
    backbone: str
    cosine: tuple[str, ...]
    cosine_images: int
    profile_encoder: tuple[str, int]
    profile_batch: int
    profile_steps: int
    compile_encoder: tuple[str, int] | None
    warmup: int
    reps: int


FULL = Geometry(
    encoders=(
        ("sam_vit_h", {}, (8, 16, 32)),
        ("sam_vit_b", {}, (16, 32, 64)),
        ("dinov2_vitl14", {"input_size": 896}, (8, 16, 32)),
        ("resnet50_v2", {}, (32, 64, 128)),
    ),
    baseline_attention=("sam_vit_h", 8),
    extraction=(
        ("sam_vit_h", {}, 16, 320),
        ("sam_vit_b", {}, 32, 640),
        ("dinov2_vitl14", {"input_size": 896}, 16, 320),
        ("resnet50_v2", {}, 64, 640),
    ),
    jpeg_size=(640, 480),  # a typical COCO image
    methods=("vrp_sam", "prosam", "fcp"),
    micro_batches=(2, 8, 32, 64),
    training_precisions=PRECISIONS,
    method_overrides={},
    backbone="resnet50_v2",
    cosine=("sam_vit_b", "sam_vit_h"),
    cosine_images=4,
    profile_encoder=("sam_vit_h", 8),
    profile_batch=8,
    profile_steps=3,
    compile_encoder=("sam_vit_b", 32),
    warmup=2,
    reps=5,
)

SMOKE = Geometry(
    encoders=(("sam_vit_tiny", {}, (1,)), ("dinov2_vits14", {"input_size": 224}, (1,))),
    baseline_attention=("sam_vit_tiny", 1),
    extraction=(("sam_vit_tiny", {}, 2, 2), ("mobilenet_v2", {}, 2, 2)),
    jpeg_size=(160, 120),
    methods=("vrp_sam", "prosam", "fcp"),
    micro_batches=(1,),
    training_precisions=("float32",),  # bf16 runs in the fused configuration
    # A toy backbone's channels on a 32 x 32 SAM grid, 128 output (the method tests' geometry).
    method_overrides={"backbone_channels": (32, 96, 1280), "feature_size": 32, "output_size": 128},
    backbone="mobilenet_v2",
    cosine=("sam_vit_tiny",),
    cosine_images=1,
    profile_encoder=("sam_vit_tiny", 1),
    profile_batch=1,
    profile_steps=1,
    compile_encoder=None,
    warmup=0,
    reps=1,
)


# ----------------------------------------------------------------------------- infrastructure


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int, max_s: float = 4.0) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs (device-synchronised);
    fewer runs (at least two, one in smoke mode) once ``max_s`` is spent: a slow configuration
    must not eat the budget."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < max(1, reps) and (len(times) < min(2, reps) or sum(times) < max_s):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


class Utilisation:
    """GPU busy % (the driver's 'utilization.gpu': share of time a kernel ran), sampled in a thread
    every ``interval`` s through NVML (``torch.cuda.utilization``) or, failing that, nvidia-smi."""

    def __init__(self, device: torch.device, interval: float = 0.1) -> None:
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self.source = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        if self.source in (None, "nvml"):
            try:
                value = float(torch.cuda.utilization(self.device))
                self.source = "nvml"
                return value
            except Exception:  # no pynvml / NVML: fall back once
                self.source = "nvidia-smi"
        index = self.device.index or 0
        output = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout
        return float(output.strip().splitlines()[0])

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                value = self._read()
            except Exception:
                self.source = "unavailable"
                return
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval)

    def __enter__(self) -> "Utilisation":
        if self.device.type == "cuda":
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def summary(self) -> dict:
        if self.device.type != "cuda":
            return {"gpu_busy_percent": None, "source": "no CUDA device"}
        mean = round(statistics.fmean(self.samples), 1) if self.samples else None
        return {"gpu_busy_percent": mean, "samples": len(self.samples), "source": self.source}


class Suite:
    """The time box and the one JSON: sections run in order, each fail-soft, each recorded."""

    def __init__(self, out: Path, budget_s: float, header: dict) -> None:
        self.out, self.budget_s = out, budget_s
        self.started = time.perf_counter()
        self.result = {**header, "budget_s": budget_s, "sections": {}}
        self.write()

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def write(self) -> None:
        self.result["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.out.with_name(self.out.name + ".tmp")
        temporary.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        os.replace(temporary, self.out)

    def section(self, name: str, fn: Callable[[float], dict], min_s: float, cap_s: float, device: torch.device) -> None:
        """Run ``fn(deadline)`` if at least ``min_s`` of the budget is left; it may use ``cap_s``."""
        record: dict = {}
        self.result["sections"][name] = record
        left = self.remaining()
        if left < min_s:
            record.update(status="skipped", reason=f"budget: {left:.0f} s left, the section needs {min_s:.0f} s")
            self.write()
            print(f"[{name}] skipped: {record['reason']}", flush=True)
            return
        started = time.perf_counter()
        deadline = started + min(cap_s, left)
        print(f"[{name}] up to {deadline - started:.0f} s ...", flush=True)
        try:
            record.update(status="ok", results=fn(deadline))
        except Skip as reason:
            record.update(status="skipped", reason=str(reason))
        except Exception as error:  # fail-soft: record it, run the next section
            record.update(status="error", error=f"{type(error).__name__}: {error}",
                          traceback=traceback.format_exc(limit=8)[-3000:])
        finally:
            record["seconds"] = round(time.perf_counter() - started, 1)
            with contextlib.suppress(Exception):
                reset_memory(device)
            self.write()
        print(f"[{name}] {record['status']} in {record['seconds']} s"
              + (f": {record.get('error') or record.get('reason')}" if record["status"] != "ok" else ""), flush=True)


class Skip(Exception):
    """A section that cannot run here (no CUDA, a package missing): recorded as skipped with why."""


def configurations(items: list, deadline: float, run: Callable[[Any], dict]) -> list[dict]:
    """Run ``run(item)`` for each item while the section's deadline allows; OOM and errors recorded."""
    rows = []
    for item in items:
        if time.perf_counter() >= deadline:
            rows.append({"config": item, "status": "skipped", "reason": "section budget spent"})
            continue
        try:
            rows.append({"config": item, "status": "ok", **run(item)})
        except Exception as error:
            status = "oom" if is_out_of_memory(error) else "error"
            rows.append({"config": item, "status": status, "error": f"{type(error).__name__}: {str(error)[:300]}"})
    return rows


# ----------------------------------------------------------------------------- environment


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit(given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:
        return "unknown (not a git checkout: pass --commit)"


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    card: dict = {"device": str(device)}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        card.update(name=properties.name, memory_gb=round(properties.total_memory / 2**30, 1),
                    multiprocessors=properties.multi_processor_count, capability=f"{properties.major}.{properties.minor}")
        with contextlib.suppress(Exception):
            card["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()
    packages = ("torch", "torchvision", "numpy", "pillow", "pyarrow", "segment-anything", "webdataset", "pycocotools",
                "ray", "nvidia-ml-py")
    return {
        "suite": "refseg bench/gpu_suite.py",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": _commit(args.commit),
        "mode": "smoke" if args.smoke else "full",
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in packages},
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "card": card,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ----------------------------------------------------------------------------- inputs


def synthetic_jpegs(directory: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``count`` JPEGs (quality 90) of smooth random colour fields plus noise: decode work like a
    photograph's (not flat, not pure noise). Made with a thread pool (PIL releases the GIL)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    width, height = size

    def make(index: int) -> Path:
        rng = np.random.default_rng(seed + index)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-24, 25, (height, width, 3), dtype=np.int16)
        path = directory / f"{index:06d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        return path

    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        return list(pool.map(make, range(count)))


def build(name: str, options: dict, device: torch.device | str = "cpu", **kwargs):
    """A registry encoder with random weights, created (and initialised) directly on ``device``:
    initialising ViT-H's 632M parameters on the host would take seconds of the budget."""
    from refseg_models.encoders import build_encoder

    with torch.device(device):
        return build_encoder(name, allow_random_init=True, **options, **kwargs)


def random_pixels(encoder, batch: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, 3, encoder.input_size, encoder.input_size, device=device)


def needs(*modules: str) -> None:
    """Skip the section with the reason when a package it needs is not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"not installed here: {', '.join(missing)} (carry the wheels: docs/scaling.md, 'GPU suite')")


# ----------------------------------------------------------------------------- sections


def section_ceilings(device: torch.device) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        if device.type != "cuda":
            raise Skip("no CUDA device")
        n = 8192
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        matmul_s = timed(lambda: a @ b, device, 3, 10)
        source = torch.randn(2**30 // 4, device=device)  # 1 GiB of fp32
        target = torch.empty_like(source)
        copy_s = timed(lambda: target.copy_(source), device, 3, 10)
        return {"bf16_matmul_8192_tflops": round(2 * n**3 / matmul_s / 1e12, 1),
                "copy_gb_per_s_read_plus_write": round(2 * source.numel() * 4 / copy_s / 1e9, 1)}

    return run


def section_encoders(geometry: Geometry, device: torch.device) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        needs("segment_anything")
        # fp32 (the reference) at the first batch size only; bf16, the GPU setting, at all of them.
        configs = [(name, options, batch, precision, "sdpa")
                   for name, options, batches in geometry.encoders for batch in batches for precision in PRECISIONS
                   if precision == "bfloat16" or batch == batches[0]]
        if geometry.baseline_attention:
            name, batch = geometry.baseline_attention
            configs += [(name, {}, batch, precision, "segment_anything") for precision in PRECISIONS]
        built: dict = {}

        def one(config) -> dict:
            name, options, batch, precision, attention = config
            key = (name, json.dumps(options), attention)
            if key not in built:
                built.clear()
                reset_memory(device)
                extra = {"attention": attention} if name.startswith("sam_") else {}
                built[key] = build(name, options, device, **extra)
            encoder = built[key]
            reset_memory(device)
            pixels = random_pixels(encoder, batch, device)

            def forward():
                with torch.inference_mode(), encoder_autocast(device, precision):
                    encoder(pixels)

            with Utilisation(device) as busy:
                seconds = timed(forward, device, geometry.warmup, geometry.reps)
            return {"images_per_s": round(batch / seconds, 2), "seconds_per_batch": round(seconds, 4),
                    "peak_memory_gb": peak_memory_gb(device), **busy.summary()}

        rows = configurations(configs, deadline, one)
        for row in rows:
            name, options, batch, precision, attention = row.pop("config")
            row.update(encoder=name, options=options, batch=batch, precision=precision, attention=attention)
        return {"rows": rows}

    return run


def extract_in_process(name: str, options: dict, batch: int, precision: str, paths: list[Path], workdir: Path,
                       device: torch.device, decode_threads: int) -> dict:
    """The extraction stage's chunk functions without Ray: decode (thread pool) -> encode (here) ->
    write (writer thread) into a real store; images/s from the first decode to the finished store."""
    from pipeline.extraction.chunks import ChunkEncoder, chunk_rows, decode_chunk, write_chunk
    from pipeline.store import FeatureSetKey, StoreBuilder, resolve_location
    from pipeline.store.feature_set import RANDOM_INIT_WEIGHTS
    from pipeline.store.layout import ImageItem, images_per_shard_for

    encoder = build(name, options, device)
    preprocessor = build(name, options, "meta")  # decode needs preprocess only (the stage's weightless copy)
    shapes = {k: tuple(v) for k, v in encoder.output_shapes().items()}
    key = FeatureSetKey("gpu_suite", encoder.encoder_id, RANDOM_INIT_WEIGHTS, encoder.preprocessing_id, "float16", precision)
    items = [ImageItem(f"{i:06d}", str(path)) for i, path in enumerate(paths)]
    builder = StoreBuilder(resolve_location(str(workdir)), key, shapes, items, images_per_shard_for(shapes, 2))
    encode = ChunkEncoder(encoder, shapes, "float16", device, precision)
    encode.encode(random_pixels(encoder, batch, torch.device("cpu")).numpy())  # warm-up: kernels, cuDNN choices
    try:
        pending = builder.prepare()
        specs = {spec.index: spec for spec in pending}
        rows = chunk_rows(pending, batch)
        written: queue.Queue = queue.Queue(maxsize=4)
        times = collections.Counter()
        failure: list[BaseException] = []

        def writer_loop() -> None:
            writer = None
            try:
                while (row := written.get()) is not None:
                    start = time.perf_counter()
                    writer = writer or builder.writer(specs[int(row["shard"])])
                    write_chunk(writer, row, shapes, "float16")
                    if bool(row["last"]):
                        writer.publish()
                        writer = None
                    times["write_s"] += time.perf_counter() - start
            except BaseException as error:  # surfaced in the main thread
                failure.append(error)
                while written.get() is not None:
                    pass

        reset_memory(device)
        thread = threading.Thread(target=writer_loop)
        with ThreadPoolExecutor(decode_threads) as pool, Utilisation(device) as busy:
            started = time.perf_counter()
            thread.start()
            todo = iter(rows)
            futures = collections.deque(
                pool.submit(decode_chunk, {k: np.array([v]) for k, v in row.items()}, preprocessor)
                for row in [next(todo) for _ in range(min(len(rows), 2 * decode_threads))]
            )
            while futures:
                start = time.perf_counter()
                decoded = futures.popleft().result()
                times["wait_for_decode_s"] += time.perf_counter() - start
                following = next(todo, None)
                if following is not None:
                    futures.append(pool.submit(decode_chunk, {k: np.array([v]) for k, v in following.items()}, preprocessor))
                start = time.perf_counter()
                encoded = encode(decoded)
                times["encode_s"] += time.perf_counter() - start
                start = time.perf_counter()
                written.put({k: v[0] for k, v in encoded.items()})
                times["wait_for_writer_s"] += time.perf_counter() - start
            written.put(None)
            thread.join()
            if failure:
                raise failure[0]
            manifest = builder.finalize()
            seconds = time.perf_counter() - started
    finally:
        builder.close()
    return {"images": manifest.num_written, "failed": manifest.num_failed, "seconds": round(seconds, 2),
            "images_per_s": round(manifest.num_written / seconds, 2), "decode_threads": decode_threads,
            **{k: round(v, 2) for k, v in times.items()}, "peak_memory_gb": peak_memory_gb(device), **busy.summary()}


def section_extraction(geometry: Geometry, device: torch.device, scratch: Path, images: Path | None) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        needs("segment_anything", "webdataset", "pycocotools", "pyarrow")
        most = max(n for *_, n in geometry.extraction)
        if images is not None:
            paths = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:most]
        else:
            paths = synthetic_jpegs(scratch / "jpegs", most, geometry.jpeg_size)
        decode_threads = max(1, min(12, (os.cpu_count() or 2) - 2))
        precision = "bfloat16" if device.type == "cuda" else "float32"

        def one(config) -> dict:
            name, options, batch, count = config
            store = scratch / f"store-{name}"
            try:
                return {"precision": precision, **extract_in_process(
                    name, options, batch, precision, paths[:count], store, device, decode_threads)}
            finally:
                shutil.rmtree(store, ignore_errors=True)

        rows = configurations(list(geometry.extraction), deadline, one)
        for row in rows:
            name, options, batch, count = row.pop("config")
            row.update(encoder=name, options=options, batch=batch, images_requested=count)
        return {"source": str(images) if images else f"synthetic JPEGs {geometry.jpeg_size[0]}x{geometry.jpeg_size[1]}",
                "rows": rows}

    return run


def _episode_features(model, geometry: Geometry, backbone, batch: int, device: torch.device):
    """Random features of ``batch`` one-shot episodes at the method's geometry, on ``device``."""
    from refseg_models.modeling.inputs import EpisodeFeatures

    spec = model.feature_spec()
    grid = model.config.feature_size
    shapes = backbone.output_shapes()
    size = backbone.input_size
    masks = torch.zeros(batch, 1, size, size, device=device)
    masks[..., size // 4 : 3 * size // 4, size // 5 : 4 * size // 5] = 1
    return EpisodeFeatures(
        reference_masks=masks,
        target_sam=torch.randn(batch, 256, grid, grid, device=device),
        reference_sam=torch.randn(batch, 1, 256, grid, grid, device=device) if spec.reference_sam else None,
        target_backbone={k: torch.randn(batch, *s, device=device).relu() for k, s in shapes.items()},
        reference_backbone={k: torch.randn(batch, 1, *s, device=device).relu() for k, s in shapes.items()},
        reference_masked_layer4=torch.randn(batch, 1, *shapes["layer4"], device=device).relu(),
    )


def section_training(geometry: Geometry, device: torch.device) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        needs("segment_anything")
        from refseg_models import build_model
        from refseg_models.method import split_target
        from refseg_models.modeling.pseudo_mask import masked_reference_layer4
        from refseg_models.recipes import build_optimizer, recipe_for

        backbone = build(geometry.backbone, {}, device)
        # Batch-major: if the cap cuts the sweep, the large batches go first, for every method alike.
        configs = [(m, b, p, False) for b in geometry.micro_batches for m in geometry.methods
                   for p in geometry.training_precisions]
        configs.append((geometry.methods[0], geometry.micro_batches[min(1, len(geometry.micro_batches) - 1)],
                        "bfloat16", True))  # the fused AdamW at one configuration

        def one(config) -> dict:
            method, batch, precision, fused = config
            reset_memory(device)
            torch.manual_seed(0)
            model = build_model(method, allow_random_init=True, **geometry.method_overrides).to(device).train()
            optimizer = build_optimizer(model, recipe_for(method, "coco20i"), fused=fused)
            features = _episode_features(model, geometry, backbone, batch, device)
            out = model.config.output_size
            label = torch.zeros(batch, out, out, dtype=torch.uint8, device=device)
            label[:, out // 3 : 2 * out // 3, out // 4 : 3 * out // 4] = 1
            targets, valid = split_target(label)

            def step():
                with encoder_autocast(device, precision):
                    losses = model.loss(model(features), targets, valid)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()

            layer3 = features.reference_backbone["layer3"][:, 0]
            masks = features.reference_masks[:, 0]
            pixels = random_pixels(backbone, 2 * batch, device)  # targets + references

            def masked():
                with torch.inference_mode(), encoder_autocast(device, precision):
                    masked_reference_layer4(backbone, layer3, masks)

            def online():
                with torch.inference_mode(), encoder_autocast(device, precision):
                    backbone(pixels)

            sam_images = 2 if model.feature_spec().reference_sam else 1
            host = torch.randn(sam_images * batch, 256, model.config.feature_size, model.config.feature_size).half()
            if device.type == "cuda":
                host = host.pin_memory()

            def copy_sam():
                host.to(device, non_blocking=True).float()

            with Utilisation(device) as busy:
                step_s = timed(step, device, geometry.warmup, geometry.reps)
            parts = {name: timed(fn, device, geometry.warmup, geometry.reps)
                     for name, fn in (("masked_layer4_s", masked), ("backbone_online_s", online), ("copy_sam_s", copy_sam))}
            whole = step_s + sum(parts.values())
            return {"step_s": round(step_s, 5), "episodes_per_s_step": round(batch / step_s, 2),
                    **{k: round(v, 5) for k, v in parts.items()},
                    "episodes_per_s_with_online_backbone": round(batch / whole, 2),
                    "peak_memory_gb": peak_memory_gb(device), **busy.summary()}

        rows = configurations(configs, deadline, one)
        for row in rows:
            method, batch, precision, fused = row.pop("config")
            row.update(method=method, micro_batch=batch, precision=precision, fused_adamw=fused)
        return {"backbone": geometry.backbone, "rows": rows,
                "note": "episodes_per_s_with_online_backbone = B / (step + masked layer4 + online backbone of 2B "
                        "images + SAM copy), the parts run one after another (no overlap assumed)"}

    return run


def section_cosine(geometry: Geometry, device: torch.device, scratch: Path, images: Path | None,
                   checkpoints: dict[str, str]) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        needs("segment_anything")
        from pipeline.data.images import load_rgb

        if images is not None:
            paths = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        else:
            paths = synthetic_jpegs(scratch / "cosine", geometry.cosine_images, geometry.jpeg_size, seed=1000)
        paths = paths[: geometry.cosine_images]

        def one(name) -> dict:
            reset_memory(device)
            torch.manual_seed(0)
            if name in checkpoints:
                encoder = build(name, {}, checkpoint=checkpoints[name]).to(device)
            else:
                encoder = build(name, {}, device)
            pixels = torch.stack([encoder.preprocess(load_rgb(str(p))) for p in paths]).to(device)
            with torch.inference_mode():
                reference = encoder(pixels)["image_embedding"]
                with encoder_autocast(device, "bfloat16"):
                    low = encoder(pixels)["image_embedding"]
            cosine = per_token_cosine(reference, low).flatten().cpu()
            return {"weights": checkpoints.get(name, "random (segment_anything init)"), "images": len(paths),
                    "tokens": cosine.numel(), "cosine_mean": round(cosine.mean().item(), 6),
                    "cosine_p1": round(cosine.quantile(0.01).item(), 6), "cosine_min": round(cosine.min().item(), 6),
                    "relative_error": round(((low.float() - reference).norm() / reference.norm()).item(), 6)}

        rows = configurations(list(geometry.cosine), deadline, one)
        for row in rows:
            row["encoder"] = row.pop("config")
        return {"source": str(images) if images else "synthetic JPEGs", "rows": rows}

    return run


def top_kernels(profiler, device: torch.device, rows: int = 12) -> dict:
    events = profiler.key_averages()
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    if device.type == "cuda" and not hasattr(events[0], attribute):
        attribute = "self_cuda_time_total"  # older torch
    total = sum(getattr(e, attribute) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:rows]
    return {"time": attribute, "total_ms": round(total / 1000, 3),
            "top": [{"name": e.key[:120], "calls": e.count, "ms": round(getattr(e, attribute) / 1000, 3),
                     "share": round(getattr(e, attribute) / total, 4)} for e in ranked]}


def section_profile(geometry: Geometry, device: torch.device) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        needs("segment_anything")
        from torch.profiler import ProfilerActivity, profile

        from refseg_models import build_model
        from refseg_models.method import split_target
        from refseg_models.recipes import build_optimizer, recipe_for

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        results = {}
        name, batch = geometry.profile_encoder
        encoder = build(name, {}, device)
        pixels = random_pixels(encoder, batch, device)

        def forward():
            with torch.inference_mode(), encoder_autocast(device, "bfloat16"):
                encoder(pixels)

        forward()
        synchronize(device)
        with profile(activities=activities) as profiler:
            forward()
            synchronize(device)
        results[f"{name}_bf16_batch{batch}"] = top_kernels(profiler, device)
        del encoder, pixels
        reset_memory(device)

        backbone = build(geometry.backbone, {}, device)
        model = build_model("vrp_sam", allow_random_init=True, **geometry.method_overrides).to(device).train()
        optimizer = build_optimizer(model, recipe_for("vrp_sam", "coco20i"))
        features = _episode_features(model, geometry, backbone, geometry.profile_batch, device)
        out = model.config.output_size
        targets, valid = split_target(torch.zeros(geometry.profile_batch, out, out, dtype=torch.uint8, device=device))

        def step():
            with encoder_autocast(device, "bfloat16"):
                losses = model.loss(model(features), targets, valid)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()

        step()
        synchronize(device)
        wall = time.perf_counter()
        with profile(activities=activities) as profiler:
            for _ in range(geometry.profile_steps):
                step()
            synchronize(device)
        wall = time.perf_counter() - wall
        kernels = top_kernels(profiler, device)
        kernels["wall_ms"] = round(wall * 1000, 3)
        kernels["busy_share_of_wall"] = round(kernels["total_ms"] / kernels["wall_ms"], 4)  # < 1: launch/CPU-bound
        results[f"vrp_sam_step_bf16_batch{geometry.profile_batch}_x{geometry.profile_steps}"] = kernels
        return results

    return run


def section_compile(geometry: Geometry, device: torch.device) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        if geometry.compile_encoder is None or device.type != "cuda":
            raise Skip("torch.compile is measured on a GPU only (on a CPU it needs minutes of C++ builds)")
        needs("segment_anything")
        name, batch = geometry.compile_encoder
        encoder = build(name, {}, device)
        pixels = random_pixels(encoder, batch, device)

        def forward(fn):
            def call():
                with torch.inference_mode(), encoder_autocast(device, "bfloat16"):
                    fn(pixels)
            return call

        eager_s = timed(forward(encoder), device, geometry.warmup, geometry.reps)
        compiled = torch.compile(encoder)
        start = time.perf_counter()
        forward(compiled)()
        synchronize(device)
        compile_s = time.perf_counter() - start
        compiled_s = timed(forward(compiled), device, 1, geometry.reps)
        return {"encoder": name, "batch": batch, "precision": "bfloat16", "compile_s": round(compile_s, 1),
                "eager_images_per_s": round(batch / eager_s, 2), "compiled_images_per_s": round(batch / compiled_s, 2),
                "speedup": round(eager_s / compiled_s, 3)}

    return run


# ----------------------------------------------------------------------------- main


def summary_lines(result: dict) -> list[str]:
    """A short table for the end of the output (the device tool returns the last lines)."""
    lines = [f"card: {result['card'].get('name', result['card']['device'])}  commit: {result['commit'][:12]}  "
             f"elapsed {result['elapsed_s']} s of {result['budget_s']}"]
    for name, record in result["sections"].items():
        lines.append(f"{name}: {record['status']} ({record.get('seconds', 0)} s) "
                     f"{record.get('error') or record.get('reason') or ''}"[:200])
        for row in (record.get("results") or {}).get("rows", []):
            if row.get("status") != "ok":
                continue
            if "encoder" in row and "images_per_s" in row:
                lines.append(f"  {row['encoder']:<14} b{row.get('batch')} {row.get('precision', ''):<8} "
                             f"{row['images_per_s']:>8} img/s  busy {row.get('gpu_busy_percent')}%  "
                             f"peak {row.get('peak_memory_gb')} GB")
            elif "method" in row:
                lines.append(f"  {row['method']:<8} b{row['micro_batch']:<3} {row['precision']:<8} fused={row['fused_adamw']} "
                             f"step {row['episodes_per_s_step']:>7} ep/s, with backbone {row['episodes_per_s_with_online_backbone']:>7} ep/s")
            elif "cosine_mean" in row:
                lines.append(f"  {row['encoder']} cosine mean {row['cosine_mean']} min {row['cosine_min']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny geometries on the CPU (seconds): checks the suite runs")
    parser.add_argument("--budget-s", type=float, help="the whole run's time box (default 300; smoke 180)")
    parser.add_argument("--commit", help="the commit measured (default: git rev-parse HEAD, if this is a checkout)")
    parser.add_argument("--images", type=Path, help="a folder of real images (default: synthetic JPEGs)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="ENCODER=PATH",
                        help="real weights for the cosine section, e.g. sam_vit_b=sam_vit_b_01ec64.pth")
    parser.add_argument("--sections", nargs="+", help="only these sections (default: all)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    geometry = SMOKE if args.smoke else FULL
    budget = args.budget_s or (180.0 if args.smoke else 300.0)
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the reference), bf16 is asked for
        torch.backends.cudnn.allow_tf32 = False
    suite = Suite(args.out, budget, environment(args, device))
    scratch = Path(tempfile.mkdtemp(prefix="refseg-gpu-suite-"))
    # (name, function, minimum budget left to start it, its share of the budget) in the order they
    # run: at 300 s, 10 + 75 + 60 + 60 + 20 + 20 s, and 55 s for compile when the others finish early.
    sections = [
        ("ceilings", section_ceilings(device), 10, 0.033),
        ("encoders", section_encoders(geometry, device), 20, 0.25),
        ("extraction", section_extraction(geometry, device, scratch, args.images), 20, 0.2),
        ("training", section_training(geometry, device), 20, 0.2),
        ("cosine", section_cosine(geometry, device, scratch, args.images, checkpoints), 10, 0.067),
        ("profile", section_profile(geometry, device), 10, 0.067),
        ("compile", section_compile(geometry, device), 50, 0.2),
    ]
    try:
        for name, fn, min_s, share in sections:
            if args.sections and name not in args.sections:
                continue
            suite.section(name, fn, min_s, share * budget, device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        suite.write()
    print("\n".join(summary_lines(suite.result)))
    return 0


if __name__ == "__main__":
    with tiny_sam_registered():  # the smoke geometry's tiny SAM ViT (tests/tiny_sam.py)
        sys.exit(main())
