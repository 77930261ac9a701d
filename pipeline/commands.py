"""Data and episode subcommands of ``refseg``: ``folds``, ``episodes hsnet``, ``episodes build``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.data.base import pairs_by_pixel_rule
from pipeline.data.coco import Coco2014Instances, CocoInstances
from pipeline.data.folds import COCO_CLASS_NAMES, PASCAL_CLASS_NAMES, fold_classes
from pipeline.data.splits import coco_image_id, map_coco20i_list, read_coco20i_list
from pipeline.episodes.annotations import ANNOTATION_TYPES
from pipeline.episodes.hsnet import hsnet_pascal_test_episodes, hsnet_test_episodes
from pipeline.episodes.manifest import build_episode_manifest, manifest_from_hsnet, write_manifest
from pipeline.errors import ConfigError
from pipeline.report import SkipReport


def register(subparsers: argparse._SubParsersAction) -> None:
    folds = subparsers.add_parser("folds", help="print the classes of a COCO-20i / PASCAL-5i fold")
    folds.add_argument("--benchmark", choices=("coco20i", "pascal5i"), default="coco20i")
    folds.add_argument("--fold", type=int, required=True)
    folds.add_argument("--split", choices=("train", "test"), default="test")
    folds.set_defaults(handler=_folds)

    episodes = subparsers.add_parser("episodes", help="write a seeded episode manifest (Parquet)")
    kinds = episodes.add_subparsers(dest="kind", required=True, metavar="KIND")

    hsnet = kinds.add_parser("hsnet", help="HSNet-identical test episodes from the official lists")
    hsnet.add_argument("--benchmark", choices=("coco20i", "pascal5i"), default="coco20i")
    hsnet.add_argument("--lists-dir", type=Path, required=True, help="HSNet split lists folder")
    hsnet.add_argument("--fold", type=int, required=True)
    hsnet.add_argument("--shot", type=int, default=1)
    hsnet.add_argument("--n", type=int, default=1000, help="number of episodes (HSNet: 1000)")
    hsnet.add_argument("--seed", type=int, default=0, help="HSNet: 0")
    hsnet.add_argument("--annotation-type", choices=ANNOTATION_TYPES, default="mask")
    hsnet.add_argument("--out", type=Path, required=True)
    hsnet.set_defaults(handler=_episodes_hsnet)

    build = kinds.add_parser("build", help="episodes sampled from a COCO-style dataset you have")
    build.add_argument("--annotations", type=Path, required=True, help="COCO instances json")
    build.add_argument("--images", type=Path, required=True, help="image folder")
    build.add_argument("--layout", choices=("2017", "2014"), default="2017")
    build.add_argument("--lists-dir", type=Path, help="HSNet COCO-20i lists; omit to use the pixel rule")
    build.add_argument("--fold", type=int, required=True)
    build.add_argument("--split", choices=("train", "test"), default="test")
    build.add_argument("--shot", type=int, default=1)
    build.add_argument("--n", type=int, default=1000)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--annotation-type", choices=ANNOTATION_TYPES, default="mask")
    build.add_argument("--out", type=Path, required=True)
    build.set_defaults(handler=_episodes_build)


def _folds(args: argparse.Namespace) -> int:
    names = COCO_CLASS_NAMES if args.benchmark == "coco20i" else PASCAL_CLASS_NAMES
    classes = fold_classes(args.benchmark, args.fold, args.split)
    print(json.dumps({str(class_id): names[class_id] for class_id in classes}, indent=1))
    return 0


def _episodes_hsnet(args: argparse.Namespace) -> int:
    if args.benchmark == "coco20i":
        episodes = hsnet_test_episodes(args.lists_dir, args.fold, n=args.n, shot=args.shot, seed=args.seed)
        image_id_of = lambda name: str(coco_image_id(name))  # noqa: E731 - lists name 2014 files
    else:
        episodes = hsnet_pascal_test_episodes(args.lists_dir, args.fold, n=args.n, shot=args.shot, seed=args.seed)
        image_id_of = str
    table = manifest_from_hsnet(
        episodes, dataset=args.benchmark, fold=args.fold, shot=args.shot, seed=args.seed,
        annotation_type=args.annotation_type, image_id_of=image_id_of,
    )
    print(f"wrote {table.num_rows} HSNet {args.benchmark} fold {args.fold} {args.shot}-shot episodes to "
          f"{write_manifest(table, args.out)}")
    return 0


def _episodes_build(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ConfigError(f"n (the number of episodes) must be >= 1, got {args.n}")
    source_type = Coco2014Instances if args.layout == "2014" else CocoInstances
    source = source_type(args.annotations, args.images)
    classes = fold_classes("coco20i", args.fold, args.split)
    report = SkipReport(f"coco fold {args.fold} {args.split} episodes")
    if args.lists_dir is not None:
        list_split = "val" if args.split == "test" else "trn"
        pairs = map_coco20i_list(read_coco20i_list(args.lists_dir, list_split, args.fold), source, report)
        pairs = {class_id: pairs.get(class_id, []) for class_id in classes}
    else:
        pairs = pairs_by_pixel_rule(source, classes)
    table = build_episode_manifest(
        pairs, dataset="coco", fold=args.fold, split=args.split, n_episodes=args.n, shot=args.shot,
        seed=args.seed, annotation_type=args.annotation_type, report=report,
    )
    report.print()
    print(f"wrote {table.num_rows} episodes to {write_manifest(table, args.out)}")
    return 0
