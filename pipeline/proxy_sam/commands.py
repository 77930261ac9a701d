"""``refseg proxy-sam train | evaluate``: train the proxy SAM on coco_mini, measure a proxy SAM file."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from pipeline.cli import run_subcommand
from pipeline.errors import ConfigError


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", type=Path, required=True, help="coco_mini instances.json")
    parser.add_argument("--images", type=Path, required=True, help="coco_mini image folder")
    parser.add_argument(
        "--backbone-checkpoint", type=Path, required=True, help="the real MobileNetV2 (mobilenet_v2_imagenet.pth)"
    )
    parser.add_argument("--fold", type=int, default=0, help="COCO-20i fold: its novel classes are never trained on")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-progress", action="store_true")


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("proxy-sam", help="train / measure the proxy SAM (a small SAM stand-in for CPU machines)")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser(
        "train", help="train the proxy SAM (base classes of a fold, held-out images kept out; a GPU job of minutes)"
    )
    _data_arguments(train)
    train.add_argument("--output-dir", default="outputs/proxy_sam/run", help="log.jsonl, config.json, the files")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps", type=int, default=4000, help="optimizer steps (an upper bound with --time-budget)")
    train.add_argument("--time-budget", type=float, default=0.0,
                       help="seconds: fix the step count after a short calibration to fit this (0: exactly --steps)")
    train.add_argument("--images-per-step", type=int, default=32)
    train.add_argument("--prompts-per-image", type=int, default=8)
    train.add_argument("--lr", type=float, default=4e-4)
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--warmup-steps", type=int, default=300)
    train.add_argument("--mask-loss", choices=("bce_dice", "focal_dice"), default="bce_dice")
    train.add_argument("--box-prob", type=float, default=0.5)
    train.add_argument("--box-target-steps", type=int, default=0,
                       help="warm-up steps that prompt boxes only and train the filled box as the target (0: off)")
    train.add_argument("--neck", default="{}", help='JSON neck options, e.g. \'{"grid": 16}\'')
    train.add_argument("--snapshots", type=float, nargs="*", default=[0.5],
                       help="fractions of the run at which a file is also written")
    train.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1'...")
    train.add_argument("--no-evaluate", action="store_true", help="skip the held-out measurement at the end")
    train.set_defaults(handler=_train)

    evaluate = verbs.add_parser("evaluate", help="measure a proxy SAM file on the held-out coco_mini instances")
    _data_arguments(evaluate)
    evaluate.add_argument("--checkpoint", type=Path, help="proxy SAM file (default: the shipped, verified asset)")
    evaluate.add_argument("--min-side", type=int, default=32, help="instances whose box is at least this (original pixels)")
    evaluate.add_argument("--json", type=Path, help="also write the numbers here")
    evaluate.set_defaults(handler=_evaluate)


def _train(args: argparse.Namespace) -> int:
    from pipeline.proxy_sam.train import ProxyTrainConfig, Trainer
    from refseg_models.encoders.sam_proxy import sha256_of_file as sha256_file

    try:
        neck = json.loads(args.neck)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--neck is not valid JSON: {error}") from error
    if not isinstance(neck, dict):
        raise ConfigError("--neck must be a JSON object")
    config = ProxyTrainConfig(
        annotations=str(args.annotations), image_dir=str(args.images), backbone_checkpoint=str(args.backbone_checkpoint),
        output=args.output_dir, fold=args.fold, seed=args.seed, steps=args.steps, time_budget_s=args.time_budget,
        images_per_step=args.images_per_step, prompts_per_image=args.prompts_per_image, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, mask_loss=args.mask_loss,
        box_prob=args.box_prob, box_target_steps=args.box_target_steps, neck=neck, snapshots=tuple(args.snapshots),
        device=args.device, threads=args.threads, progress=not args.no_progress,
        command="refseg proxy-sam " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["proxy-sam"]
        else " ".join(shlex.quote(a) for a in sys.argv),
    )
    config.validate()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    trainer = Trainer(config)
    started = time.perf_counter()
    summary = trainer.train()
    path = trainer.export(out_dir / "sam_proxy_mobilenet_v2.pt", time.perf_counter() - started)
    result = {"checkpoint": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size, **summary}
    print(json.dumps(result), flush=True)
    if not args.no_evaluate:
        quality = measure_checkpoint(path, args.annotations, args.images, args.backbone_checkpoint, args.fold)
        (out_dir / "held_out.json").write_text(json.dumps(quality, indent=1) + "\n")
        print(json.dumps(quality, indent=1))
    return 0


def measure_checkpoint(
    checkpoint: Path | None, annotations: Path, images: Path, backbone_checkpoint: Path, fold: int = 0,
    min_side: int = 32,
) -> dict:
    """Load a proxy file exactly as users do (``build_encoder`` + ``build_sam_decoder``), run it on the
    held-out images' files and return :func:`evaluate_proxy`'s numbers."""
    from pipeline.data.coco import CocoInstances
    from pipeline.proxy_sam.data import fold_classes_for, split_images
    from pipeline.proxy_sam.evaluate import HeldOutSet, evaluate_proxy, live_features
    from refseg_models.encoders import build_encoder
    from refseg_models.encoders.sam_proxy import default_proxy_sam_checkpoint, proxy_sam_grid
    from refseg_models.modeling.sam_decoder import build_sam_decoder

    path = checkpoint or default_proxy_sam_checkpoint()
    encoder = build_encoder("sam_proxy_mobilenet_v2", path, backbone_checkpoint=backbone_checkpoint)
    decoder = build_sam_decoder(path, image_embedding_size=proxy_sam_grid(path))
    coco = CocoInstances(annotations, images, verbose=False)
    _, held_ids = split_images(coco.image_ids())
    _, novel = fold_classes_for(fold)
    held = HeldOutSet.build(coco, held_ids, novel, live_features(encoder.backbone, coco), min_side=min_side)
    return {"checkpoint": str(path), **evaluate_proxy(encoder.neck, decoder, held)}


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    result = measure_checkpoint(args.checkpoint, args.annotations, args.images, args.backbone_checkpoint, args.fold,
                                args.min_side)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m pipeline.proxy_sam.commands proxy-sam train ...``)."""
    return run_subcommand(argv, "refseg-proxy-sam", [register])


if __name__ == "__main__":
    sys.exit(main())
