"""Store read speed vs a raw sequential read of the same bytes, page cache warm and cold.

    .venv/bin/python bench/bench_store_reads.py [--target-mb 1024] [--repeats 5]
        [--sets mobilenet_v2,sam,resnet50_v2] [--encoders mobilenet_v2,...] [--scratch DIR]

1. For each feature set's real shapes a store of random fp16 features is written (the bytes are
   what matter; ``--target-mb`` per store, 4 shards) and fsync'ed. Read modes, per shard:
   raw    = the shard file read sequentially in 16 MiB blocks into one buffer (the floor: the same
            bytes, no format, no allocation);
   random = ``store.get(image_id)`` for every image of the shard in a shuffled order, cache off;
   random4 = the same ids through ``store.get_many(8 ids, threads=4)`` (page-cache hits read at once,
            the rest with 4 reads in flight; 8 = an episode-sized batch);
   stream = ``store.stream()`` over that shard (what a training DataLoader iterates).
   Every mode reads through the checks (crc32 + finite values, on by default); what they cost is
   measured apart: per entry, and warm random reads with and without them (``bench_checks``).
   A round reads every shard raw, mode, mode, raw (ABBA: a linear drift of this shared machine
   cancels); its ratio = raw seconds / mode seconds (1.0 = as fast as the raw read). Warm: files in
   the page cache, each timed read repeated to >= ``--warm-unit-s`` (a warm shard read is ~10-50 ms
   here, too short to time alone). Cold: before every timed read the shard file is evicted with
   ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed; works on clean pages, hence the fsync).
   The table gives the median and [min, max] over ``--repeats`` rounds.
2. Optionally (``--encoders``, default none) encoder cost per image vs the random-read time, and the
   disk a COCO train2014 cache would take: the cache-or-online decision in docs/feature_store.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_sam: the tiny SAM ViT benchmarks register

from pipeline.store import FeatureSetKey, StoreBuilder, open_store, resolve_location, sorted_items  # noqa: E402
from pipeline.store.layout import bytes_per_sample  # noqa: E402
from tiny_sam import tiny_sam_registered  # noqa: E402

COCO_TRAIN2014_IMAGES = 82_783
FEATURE_SETS = {
    "mobilenet_v2": {"layer2": (32, 64, 64), "layer3": (96, 32, 32), "layer4": (1280, 16, 16)},
    "sam": {"image_embedding": (256, 64, 64)},
    "dinov2_vits14@896": {"tokens": (384, 64, 64)},
    "dinov2_vitl14@896": {"tokens": (1024, 64, 64)},
    "resnet50_v2": {"layer2": (512, 64, 64), "layer3": (1024, 64, 64), "layer4": (2048, 64, 64)},
    "resnet50_v2 l2+l3": {"layer2": (512, 64, 64), "layer3": (1024, 64, 64)},
}
MODES = ("raw", "random", "stream")
REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import pyarrow

    return (
        f"{platform.node()}: {model}, {os.cpu_count()} CPUs, {memory:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, pyarrow {pyarrow.__version__}, "
        f"numpy {np.__version__}, load average {os.getloadavg()[0]:.1f}"
    )


def write_random_store(root: Path, shapes: dict, images: int, per_shard: int) -> str:
    key = FeatureSetKey("bench", "random", "0" * 64, "none", "float16")
    items = sorted_items([(i, f"{i}.jpg") for i in range(images)])
    builder = StoreBuilder(resolve_location(str(root)), key, shapes, items, per_shard)
    rng = np.random.default_rng(0)
    pool = [{n: rng.standard_normal(s, dtype=np.float32).astype(np.float16) for n, s in shapes.items()} for _ in range(4)]
    for spec in builder.prepare():
        writer = builder.writer(spec)
        for item in spec.items:
            writer.add(item.image_id, pool[int(item.image_id) % len(pool)])
        writer.publish()
    builder.finalize()
    for path in root.iterdir():  # clean pages only can be evicted
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    return str(root)


def evict(paths: list[Path]) -> None:
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def bench_reads(root: Path, shapes: dict, images: int, repeats: int, warm_unit_s: float) -> dict:
    uri = write_random_store(root, shapes, images, per_shard=max(1, -(-images // 4)))
    store = open_store(uri, cache_bytes=0)
    shard_files = [Path(p) for p in store.shard_paths()]
    total_bytes = sum(p.stat().st_size for p in shard_files)
    by_shard: dict[str, list[str]] = {}
    for image_id in store.image_ids:
        by_shard.setdefault(store._rows[image_id][store.feature_names[0]][0], []).append(image_id)
    orders = [by_shard[path.name][:] for path in shard_files]
    for order in orders:
        random.Random(0).shuffle(order)
    block = bytearray(16 << 20)

    def raw(i: int) -> None:
        with shard_files[i].open("rb", buffering=0) as handle:
            while handle.readinto(block):
                pass

    def random_access(i: int) -> None:
        for image_id in orders[i]:
            store.get(image_id)

    def random_4_threads(i: int) -> None:
        order = orders[i]
        for start in range(0, len(order), 8):  # episode-sized batches: results freed between them
            store.get_many(order[start : start + 8], threads=4)

    def stream(i: int) -> None:
        for _ in store.stream(rank=i, world_size=len(shard_files)):  # shard i alone
            pass

    modes = {"random": random_access, "random4": random_4_threads, "stream": stream}
    results: dict = {"bytes": total_bytes, "images": images}
    for i in range(len(shard_files)):
        raw(i)  # warm
    calibration = time.perf_counter()
    raw(0)
    # Warm reads of one shard take ~10-50 ms here: a timed unit repeats it to >= warm_unit_s.
    sweeps = max(1, round(warm_unit_s / max(time.perf_counter() - calibration, 1e-6)))
    for cache in ("warm", "cold"):
        repeat_unit = sweeps if cache == "warm" else 1
        results[cache] = {"sweeps": repeat_unit}
        for mode, function in modes.items():
            rounds = []
            for _ in range(repeats):
                raw_s = mode_s = 0.0
                for i in range(len(shard_files)):
                    for step in ("raw", "mode", "mode", "raw"):  # ABBA: a linear drift of the machine cancels
                        if cache == "cold":
                            evict([shard_files[i]])
                        start = time.perf_counter()
                        for _ in range(repeat_unit):
                            (raw if step == "raw" else function)(i)
                        if step == "raw":
                            raw_s += time.perf_counter() - start
                        else:
                            mode_s += time.perf_counter() - start
                rounds.append((raw_s, mode_s))
            read_bytes = 2 * total_bytes * repeat_unit  # per round, per side
            results[cache][mode] = {
                "ratio": [raw_s / mode_s for raw_s, mode_s in rounds],
                "raw_mb_s": [read_bytes / raw_s / 1e6 for raw_s, _ in rounds],
                "img_s": [2 * images * repeat_unit / mode_s for _, mode_s in rounds],
            }
    results["checks"] = bench_checks(uri, store, orders[0], repeats)
    cached_store = open_store(uri, cache_bytes=2 * total_bytes)
    everything = [image_id for order in orders for image_id in order]
    for image_id in everything:
        cached_store.get(image_id)
    start = time.perf_counter()
    for image_id in everything:
        cached_store.get(image_id)
    results["cached_img_s"] = images / (time.perf_counter() - start)
    results["read_s_per_img"] = 1 / statistics.median(results["warm"]["random"]["img_s"])
    return results


def bench_checks(uri: str, store, order: list[str], repeats: int) -> dict:
    """What checking every read costs (docs/feature_store.md, "Reads"): per entry, zlib's crc32 of
    its bytes and the finiteness test (:func:`pipeline.store.reader.all_finite`), medians over the
    entries of one shard; and warm random reads of that shard (cache off) with and without the
    checks, ABBA rounds, ms per image."""
    import zlib

    from pipeline.store.npy import all_finite

    crc_s, finite_s = [], []
    for image_id in order:
        for name, (shard, offset, size, _) in store._rows[image_id].items():
            buffer = np.fromfile(Path(store.location.join(shard)), dtype=np.uint8, count=size, offset=offset)
            array = store.get(image_id, [name])[name]
            start = time.perf_counter()
            zlib.crc32(buffer)
            crc_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            all_finite(array)
            finite_s.append(time.perf_counter() - start)
    unchecked = open_store(uri, cache_bytes=0, verify=False)
    checked = open_store(uri, cache_bytes=0)
    for image_id in order:  # warm both (page cache, memoised headers, read buffers)
        checked.get(image_id), unchecked.get(image_id)
    sweeps = max(1, round(0.25 / max(_timed(lambda: [checked.get(i) for i in order]), 1e-6)))
    rounds = {"checked": [], "unchecked": []}
    for _ in range(repeats):
        for which in ("unchecked", "checked", "checked", "unchecked"):
            reader = checked if which == "checked" else unchecked
            seconds = _timed(lambda: [reader.get(i) for _ in range(sweeps) for i in order])
            rounds[which].append(seconds / (sweeps * len(order)))
    entries = len(store.feature_names)
    return {
        "entries_per_image": entries,
        "crc32_ms": statistics.median(crc_s) * 1e3,
        "finite_ms": statistics.median(finite_s) * 1e3,
        "read_unchecked_ms": statistics.median(rounds["unchecked"]) * 1e3,
        "read_checked_ms": statistics.median(rounds["checked"]) * 1e3,
    }


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def encoder_cost(name: str, weights: Path | None, repeat: int) -> float:
    from refseg_models.encoders import build_encoder

    encoder = build_encoder(name, checkpoint=str(weights) if weights else None, allow_random_init=weights is None)
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pixels = encoder.preprocess(image)[None]
    with torch.inference_mode():
        encoder(pixels)
        start = time.perf_counter()
        for _ in range(repeat):
            encoder(pixels)
    return (time.perf_counter() - start) / repeat


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-mb", type=int, default=1024, help="store size per feature set (>= ~0.5 s per pass)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per mode and cache state")
    parser.add_argument("--warm-unit-s", type=float, default=0.25, help="warm: repeat each timed read to this long")
    parser.add_argument("--sets", default="mobilenet_v2,sam,resnet50_v2", help=f"of {', '.join(FEATURE_SETS)}")
    parser.add_argument("--encoders", default="", help="e.g. mobilenet_v2,sam_vit_tiny,resnet50_v2,dinov2_vits14,sam_vit_b")
    parser.add_argument("--repeat-encoders", type=int, default=3, help="timed forwards per encoder (sam_vit_b: 1)")
    parser.add_argument("--scratch", default=None, help="where to write the stores (default: a temp dir)")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="refseg-bench-reads-"))
    results = {}
    try:
        for name in [n for n in args.sets.split(",") if n]:
            shapes = FEATURE_SETS[name]
            images = max(8, args.target_mb * 2**20 // bytes_per_sample(shapes, 2))
            results[name] = bench_reads(scratch / name.replace(" ", "_"), shapes, images, args.repeats, args.warm_unit_s)
            shutil.rmtree(scratch / name.replace(" ", "_"), ignore_errors=True)
            print(f"  measured {name}: {images} images, {results[name]['bytes'] / 1e6:.0f} MB", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}; {args.repeats} rounds per cell; median [min, max] over rounds")
    print(
        "\n| feature set | MB/img | images | store MB | cache | MB read per round and side | raw MB/s "
        "| random img/s | random x raw | random, 4 threads x raw | stream img/s | stream x raw |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        per_image = bytes_per_sample(FEATURE_SETS[name], 2) / 1e6
        for cache in ("warm", "cold"):
            c = r[cache]
            raw_mb_s = c["random"]["raw_mb_s"] + c["random4"]["raw_mb_s"] + c["stream"]["raw_mb_s"]
            print(
                f"| {name} | {per_image:.2f} | {r['images']} | {r['bytes'] / 1e6:.0f} | {cache} | "
                f"{2 * r['bytes'] * c['sweeps'] / 1e6:.0f} | {_spread(raw_mb_s, '{:.0f}')} | "
                f"{_spread(c['random']['img_s'], '{:.0f}')} | {_spread(c['random']['ratio'])} | "
                f"{_spread(c['random4']['ratio'])} | "
                f"{_spread(c['stream']['img_s'], '{:.0f}')} | {_spread(c['stream']['ratio'])} |"
            )
    print("\n| feature set | entries/img | crc32 ms/entry | finite check ms/entry | warm random read ms/img, unchecked "
          "| checked | checks' share of a checked read |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        c = r["checks"]
        share = 1 - c["read_unchecked_ms"] / c["read_checked_ms"]
        print(f"| {name} | {c['entries_per_image']} | {c['crc32_ms']:.3f} | {c['finite_ms']:.3f} | "
              f"{c['read_unchecked_ms']:.3f} | {c['read_checked_ms']:.3f} | {share:.0%} |")
    print("\n| feature set | cache-hit img/s |")
    print("|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['cached_img_s']:.0f} |")

    weights = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pth"
    costs = {}
    for name in [n for n in args.encoders.split(",") if n]:
        repeat = 1 if name.startswith("sam_vit_") and name != "sam_vit_tiny" else args.repeat_encoders
        costs[name] = encoder_cost(name, weights if name == "mobilenet_v2" and weights.is_file() else None, repeat)
        print(f"  {name}: {costs[name]:.3f} s/img", flush=True)
    if costs:
        reads = {"mobilenet_v2": "mobilenet_v2", "resnet50_v2": "resnet50_v2", "dinov2_vits14": "dinov2_vits14@896"}
        print("\n| encoder | compute s/img (this CPU) | read s/img (random, warm) | compute/read | COCO train2014 cache GB |")
        print("|---|---|---|---|---|")
        for name, cost in costs.items():
            set_name = reads.get(name, "sam")
            if set_name not in results:
                continue
            r = results[set_name]
            print(
                f"| {name} | {cost:.3f} | {r['read_s_per_img']:.4f} | {cost / r['read_s_per_img']:.0f} | "
                f"{COCO_TRAIN2014_IMAGES * bytes_per_sample(FEATURE_SETS[set_name], 2) / 1e9:.0f} |"
            )


if __name__ == "__main__":
    with tiny_sam_registered():
        main()
