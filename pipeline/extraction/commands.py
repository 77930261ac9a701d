"""``refseg extract`` and ``refseg verify`` (argparse); ``jobs/extract_features.py`` wraps the same code."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cli import run_subcommand
from pipeline.errors import ConfigError
from pipeline.extraction.config import ExtractionConfig
from pipeline.locations import check_durable
from pipeline.store.layout import DEFAULT_TARGET_SHARD_BYTES


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="store location: a path or s3://bucket/prefix")
    parser.add_argument("--dataset", required=True, help="dataset name recorded in the feature-set key, e.g. coco2014")
    parser.add_argument("--encoder", required=True, help="encoder name (refseg_models.encoders.available_encoders())")
    parser.add_argument("--checkpoint", help="encoder weights file (its sha256 is part of the feature-set key)")
    parser.add_argument(
        "--allow-random-init", action="store_true", help="no checkpoint: random weights (tests/benchmarks only)"
    )
    parser.add_argument(
        "--encoder-options",
        default="{}",
        help='JSON dict of builder options, e.g. \'{"preprocessing": "sam_longest1024_pad"}\'',
    )
    parser.add_argument(
        "--coco-annotations", help="COCO/LVIS-style json whose 'images' list is extracted (needs --image-dir)"
    )
    parser.add_argument("--image-dir", help="image folder (alone: every image file in it, id = file stem)")
    parser.add_argument("--image-list", help="text file of 'image_id<TAB>path' lines")
    parser.add_argument("--limit", type=int, help="only the first N images by id")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument(
        "--batch-size", type=int,
        help="images per encoder call (fixed within a shard; default 8 on CPUs, the encoder's GPU batch on GPUs)",
    )
    parser.add_argument(
        "--precision", default="float32", choices=("float32", "bfloat16"),
        help="encoder arithmetic: float32 (the reference) or bfloat16 autocast (GPUs; recorded in the store's key)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder in each actor")
    parser.add_argument("--target-shard-bytes", type=int, default=DEFAULT_TARGET_SHARD_BYTES)
    parser.add_argument("--images-per-shard", type=int, help="override the size-derived images per shard")
    parser.add_argument("--num-actors", type=int, default=1, help="encoder actors (one per GPU on a GPU cluster)")
    parser.add_argument(
        "--actor-num-cpus", type=float, default=1.0, help="CPUs per encoder actor (also its torch threads)"
    )
    parser.add_argument("--decode-num-cpus", type=float, default=1.0, help="CPUs per decode task")
    parser.add_argument("--num-gpus-per-actor", type=float, help="default: 1 if the cluster has GPUs, else 0")
    parser.add_argument("--ray-address", help="default: RAY_ADDRESS (ray job submit) or a local Ray")
    parser.add_argument(
        "--writer",
        default="driver",
        choices=("driver", "actors"),
        help="who writes shards: the driver (one node) or each encoder actor (multi-node; shared/object store)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--no-retry-failed",
        action="store_true",
        help="do not re-extract finished shards that recorded failed images (default: retry them)",
    )


def config_from_args(args: argparse.Namespace) -> ExtractionConfig:
    try:
        options = json.loads(args.encoder_options)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--encoder-options is not valid JSON: {error}") from error
    if not isinstance(options, dict):
        raise ConfigError("--encoder-options must be a JSON object")
    check_durable({"the store (--output)": args.output}, hint="give --output a shared path or s3://bucket/prefix")
    return ExtractionConfig(
        output=args.output,
        dataset=args.dataset,
        encoder=args.encoder,
        checkpoint=args.checkpoint,
        allow_random_init=args.allow_random_init,
        encoder_options=options,
        coco_annotations=args.coco_annotations,
        image_dir=args.image_dir,
        image_list=args.image_list,
        limit=args.limit,
        dtype=args.dtype,
        batch_size=args.batch_size,
        precision=args.precision,
        compile=args.compile,
        target_shard_bytes=args.target_shard_bytes,
        images_per_shard=args.images_per_shard,
        num_actors=args.num_actors,
        actor_num_cpus=args.actor_num_cpus,
        decode_num_cpus=args.decode_num_cpus,
        num_gpus_per_actor=args.num_gpus_per_actor,
        ray_address=args.ray_address,
        writer=args.writer,
        progress=not args.no_progress,
        retry_failed=not args.no_retry_failed,
    )


# Exit codes: 0 every image extracted, 1 the store is complete but images failed (listed), 2 error.
EXIT_FAILED_IMAGES = 1


def report_failures(summary, prog: str) -> int:
    """Print the summary; return 1 with a stderr line when images failed, else 0."""
    print(summary.text())
    if summary.failed:
        print(
            f"{prog}: {summary.failed} of {summary.images} images failed and are not in the store "
            "(reasons above and in manifest.json 'failures'); fix them and re-run: finished shards with "
            "failed images are extracted again (--no-retry-failed skips that)",
            file=sys.stderr,
        )
        return EXIT_FAILED_IMAGES
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from pipeline.extraction.run import run_extraction

    return report_failures(run_extraction(config_from_args(args)), "refseg extract")


def run_verify(args: argparse.Namespace) -> int:
    from pipeline.store.verify import verify_store

    report = verify_store(args.store, quick=args.quick, allow_failed=args.allow_failed)
    print(report.summary())
    return 0 if report.ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``extract`` and ``verify``; each parser's ``handler(args) -> exit code`` (what pipeline.cli calls)."""
    extract = subparsers.add_parser(
        "extract", help="extract one encoder's features of a dataset into a store (resumable)"
    )
    add_extract_arguments(extract)
    extract.set_defaults(handler=run_extract)
    verify = subparsers.add_parser("verify", help="check every entry of a feature store against its manifest")
    verify.add_argument("store", help="store location: a path or s3://bucket/prefix")
    verify.add_argument(
        "--quick", action="store_true", help="tar headers and counts only: skip reading payloads (no checksums)"
    )
    verify.add_argument(
        "--allow-failed", action="store_true", help="images that failed extraction do not make verify fail"
    )
    verify.set_defaults(handler=run_verify)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m pipeline.extraction.commands extract ...``)."""
    return run_subcommand(argv, "refseg-extract", [register])


if __name__ == "__main__":
    sys.exit(main())
