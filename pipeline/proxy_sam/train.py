"""Training the proxy SAM: a single-process torch loop with on-device augmentation (GPU or CPU).

The proxy SAM is trained once and shipped (``assets/``; ``docs/proxy_sam.md`` records the command,
machine and time of the shipped file). No Ray Train here: one process, one device, everything in
memory:

* data: every TRAINING image of coco_mini (``data.split_images``; the held-out fifth is never read)
  decoded once onto the device with the non-crowd instance masks of the fold's BASE classes (novel
  classes are never targets, checked when loaded);
* views: each step draws ``images_per_step`` images (an epoch permutation seeded by ``(seed, epoch)``)
  and a random resized crop of each (area 0.3-1.0, aspect 3/4-4/3, torchvision's rule), squashed to
  the 512 frame (bilinear, antialiased), flipped with p=0.5, colour-jittered (brightness, contrast,
  saturation x[0.8, 1.2], p=0.5); the instance masks go through the same crop/flip;
* features: the frozen real MobileNetV2 (``vrp512_squash_tf128``) on the views, the neck on top;
* prompts, SAM-style: each step draws one kind for all its prompts (one decoder call): boxes (the
  instance's tight box with SAM's noise: std 10% of the side, at most 20 pixels of the 1024 frame)
  with probability ``box_prob``, otherwise 1, 2 or 3 positive points drawn uniformly inside the mask;
  a single point decodes with ``multimask_output=True`` and only the minimum-loss mask is trained
  (SAM's ambiguity rule); boxes and several points use the single-mask token;
* losses: BCE + Dice (or SAM's 20:1 focal:Dice) on the decoder's 4G x 4G low-res masks against the
  area-averaged target; the IoU head by an MSE to each mask's actual IoU;
* AdamW, linear warm-up then cosine decay, gradient clipping; the decoder transformer's q/k
  projections start at ``qk_init_scale`` x segment-anything's default (random attention over G^2
  keys is near-uniform and does not train);
* determinism: crops, jitter, prompt noise and points come from generators seeded by
  ``(seed, step)``; ``time_budget_s`` fixes the step count once, after a calibration, and records it
  (pass ``steps`` to reproduce a run exactly).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, DataError
from pipeline.training.views import random_resized_crop
from refseg_models.annotations import box_masks
from refseg_models.losses import per_sample_dice

FRAME = 1024  # SAM's input frame; the 512 squash canvas is viewed at 2x
CANVAS = 512


@dataclass(frozen=True)
class ProxyTrainConfig:
    """One proxy-SAM training run (the methods' training job has its own, pipeline.training.config.TrainConfig)."""

    annotations: str
    image_dir: str
    backbone_checkpoint: str
    output: str = "outputs/proxy_sam/run"
    fold: int = 0
    seed: int = 0
    steps: int = 4000
    # > 0: after ``calibration_steps`` the run fixes its step count to what fits this many seconds
    # (never more than ``steps``); the count is logged and recorded in the file
    time_budget_s: float = 0.0
    calibration_steps: int = 60
    images_per_step: int = 32
    prompts_per_image: int = 8
    lr: float = 4e-4
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    warmup_steps: int = 300
    grad_clip: float = 1.0
    qk_init_scale: float = 3.0
    mask_loss: str = "bce_dice"  # or "focal_dice" (SAM's 20:1)
    iou_loss_weight: float = 1.0
    box_prob: float = 0.5
    # > 0: the first N steps prompt boxes only, and their target is the filled prompt box (geometry
    # first, content second); 0 keeps SAM's recipe
    box_target_steps: int = 0
    box_noise: float = 0.1
    box_noise_max: float = 20.0  # pixels of the 1024 frame
    crop_area: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.5
    jitter: float = 0.2
    min_target_area: float = 400.0  # 512-canvas pixels (20 x 20); smaller instances are never targets
    neck: dict = field(default_factory=dict)
    snapshots: tuple[float, ...] = (0.5,)  # fractions of the run at which a file is also written
    log_every: int = 50
    device: str = "auto"  # "auto": cuda when available, else cpu
    threads: int = 0  # torch CPU threads (0: torch's default)
    bf16: bool = True  # autocast bf16 for the neck and decoder; losses in fp32
    progress: bool = True
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def validate(self) -> None:
        if self.steps <= 0 or self.images_per_step <= 0 or self.prompts_per_image <= 0:
            raise ConfigError("steps, images_per_step and prompts_per_image must be positive")
        if not 0 <= self.box_target_steps < self.steps:
            raise ConfigError(f"box_target_steps must be in [0, steps), got {self.box_target_steps} (steps {self.steps})")
        if not 0 < self.crop_area[0] <= self.crop_area[1] <= 1:
            raise ConfigError(f"crop_area must satisfy 0 < min <= max <= 1, got {self.crop_area}")
        if self.mask_loss not in ("bce_dice", "focal_dice"):
            raise ConfigError(f"unknown mask loss {self.mask_loss!r}; use 'bce_dice' or 'focal_dice'")
        for name in ("annotations", "backbone_checkpoint"):
            if not Path(getattr(self, name)).is_file():
                raise ConfigError(f"{name}: no such file {getattr(self, name)}")
        if not Path(self.image_dir).is_dir():
            raise ConfigError(f"image_dir: no such folder {self.image_dir}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------
# Data on the device
# --------------------------------------------------------------------------------------------------
class TrainingImages:
    """The fold's training images (uint8 3 x H x W) and their base-class instance masks (uint8
    K x H x W), on ``device``. Images without a base instance of at least ``min_target_area`` pixels
    in the plain 512 squash are left out (counted in ``skipped``)."""

    def __init__(self, config: ProxyTrainConfig, device: torch.device) -> None:
        from tqdm import tqdm

        from pipeline.data.coco import CocoInstances
        from pipeline.proxy_sam.data import check_no_excluded_ids, fold_classes_for, instances_of, split_images

        coco = CocoInstances(config.annotations, config.image_dir, verbose=False)
        train_ids, held_out_ids = split_images(coco.image_ids())
        base, novel = fold_classes_for(config.fold)
        self.images: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.ids: list[str] = []
        self.skipped = 0
        class_ids: list[int] = []
        for image_id in tqdm(train_ids, desc="load training images", disable=not config.progress, unit="image"):
            instances = instances_of(coco, image_id, set(base))
            if not instances:
                self.skipped += 1
                continue
            image = coco.load_image(int(image_id))
            masks = torch.from_numpy(np.stack([m for _, _, m in instances])).to(torch.uint8)
            plain = F.interpolate(masks[None].float(), size=(CANVAS, CANVAS), mode="bilinear", align_corners=False)[0]
            if int(((plain >= 0.5).flatten(1).sum(1) >= config.min_target_area).sum()) == 0:
                self.skipped += 1
                continue
            class_ids += [c for c, _, _ in instances]
            self.images.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous().to(device))
            self.masks.append(masks.to(device))
            self.ids.append(image_id)
        if not self.images:
            raise DataError("no training image with a base-class instance: check the annotation file and fold")
        check_no_excluded_ids(class_ids, novel)
        self.held_out_ids = held_out_ids
        self.base, self.novel = base, novel

    def __len__(self) -> int:
        return len(self.images)


def crop_box(rng: np.random.Generator, height: int, width: int, area: tuple[float, float], ratio: tuple[float, float]):
    """torchvision's random resized crop (:func:`pipeline.training.views.random_resized_crop`) -> (x0, y0, w, h);
    when no try fits, the whole image (the proxy SAM's fallback, not torchvision's central crop)."""
    return random_resized_crop(rng, height, width, area, ratio) or (0, 0, width, height)


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """K x S x S bool (non-empty) -> K x 4 ``(x0, y0, x1, y1)`` pixel edges (exclusive right/bottom)."""
    size = masks.shape[-1]
    index = torch.arange(size, device=masks.device, dtype=torch.float32)
    cols, rows = masks.any(1), masks.any(2)
    big = float(size)
    x0 = torch.where(cols, index, big).amin(1)
    x1 = torch.where(cols, index, -1.0).amax(1) + 1
    y0 = torch.where(rows, index, big).amin(1)
    y1 = torch.where(rows, index, -1.0).amax(1) + 1
    return torch.stack([x0, y0, x1, y1], dim=1)


def render_view(image: torch.Tensor, masks: torch.Tensor, crop, flip: bool, jitter) -> tuple[torch.Tensor, torch.Tensor]:
    """One training view: 3 x 512 x 512 float RGB in [0, 255] and K x 512 x 512 bool instance masks."""
    x0, y0, w, h = crop
    view = image[:, y0 : y0 + h, x0 : x0 + w].float()[None]
    view = F.interpolate(view, size=(CANVAS, CANVAS), mode="bilinear", align_corners=False, antialias=True)[0]
    rendered = F.interpolate(masks[:, y0 : y0 + h, x0 : x0 + w].float()[None], size=(CANVAS, CANVAS),
                             mode="bilinear", align_corners=False)[0] >= 0.5
    if flip:
        view, rendered = view.flip(-1), rendered.flip(-1)
    if jitter is not None:
        brightness, contrast, saturation = jitter
        view = view * brightness
        grey = (0.299 * view[0] + 0.587 * view[1] + 0.114 * view[2])
        view = (view - grey.mean()) * contrast + grey.mean()
        grey = (0.299 * view[0] + 0.587 * view[1] + 0.114 * view[2])[None]
        view = (view - grey) * saturation + grey
    return view.clamp(0, 255), rendered

def build_decoder_for_training(grid: int, qk_init_scale: float, seed: int, qk_tied: bool = False):
    """segment-anything's PromptEncoder + MaskDecoder (``build_sam_decoder``'s configuration),
    trainable, q/k projections of the transformer scaled by ``qk_init_scale``, the prompt encoder's
    random Fourier matrix rounded to fp16 (as it is stored)."""
    from refseg_models.modeling.sam_decoder import build_sam_decoder

    torch.manual_seed(seed)
    decoder = build_sam_decoder(None, image_embedding_size=grid)
    with torch.no_grad():
        for module in decoder.mask_decoder.transformer.modules():
            if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
                module.q_proj.weight.mul_(qk_init_scale)
                if qk_tied:
                    module.k_proj.weight.copy_(module.q_proj.weight)
                    module.k_proj.bias.copy_(module.q_proj.bias)
                else:
                    module.k_proj.weight.mul_(qk_init_scale)
        gaussian = decoder.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        gaussian.copy_(gaussian.half().float())
    decoder.requires_grad_(True)
    return decoder


# --------------------------------------------------------------------------------------------------
# Prompts and losses
# --------------------------------------------------------------------------------------------------
def noisy_boxes(boxes512: torch.Tensor, rng: torch.Generator, rel: float, cap: float) -> torch.Tensor:
    """512-canvas boxes -> 1024-frame boxes with SAM's noise (std ``rel`` x side, clipped to ``cap``)."""
    boxes = boxes512 * 2.0
    side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, dim=1)
    noise = (torch.randn(boxes.shape, generator=rng) * rel * side).clamp(-cap, cap)
    boxes = (boxes + noise).clamp(0, FRAME)
    x0, x1 = torch.minimum(boxes[:, 0], boxes[:, 2]), torch.maximum(boxes[:, 0], boxes[:, 2])
    y0, y1 = torch.minimum(boxes[:, 1], boxes[:, 3]), torch.maximum(boxes[:, 1], boxes[:, 3])
    return torch.stack([x0, y0, x1, y1], dim=1)


def box_targets(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """1024-frame boxes (N x 4) -> N x size x size float masks: 1 where the cell centre lies inside
    (:func:`refseg_models.annotations.box_masks`; the targets the shipped proxy SAM was trained on, bit for bit)."""
    return box_masks(boxes, (FRAME, FRAME), (size, size)).float()


def sample_points(masks: torch.Tensor, count: int, rng: torch.Generator) -> torch.Tensor:
    """``count`` points per mask (B x S x S soft masks in [0, 1]) drawn uniformly from cells >= 0.5
    (the largest cell when none is), continuous 1024-frame coordinates -> B x count x 2 (x, y)."""
    b, s, _ = masks.shape
    flat = masks.flatten(1)
    inside = (flat >= 0.5).float()
    empty = inside.sum(1) == 0
    if empty.any():
        inside[empty] = F.one_hot(flat[empty].argmax(1), s * s).float()
    cells = torch.multinomial(inside, count, replacement=True, generator=rng)  # B x count
    jitter = torch.rand(b, count, 2, generator=rng)
    ys, xs = cells // s, cells % s
    scale = FRAME / s
    return torch.stack([(xs + jitter[..., 0]) * scale - 0.5, (ys + jitter[..., 1]) * scale - 0.5], dim=-1)


def per_sample_mask_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """logits N x S x S, target N x S x S in [0, 1] -> N losses: BCE (mean per sample) + Dice
    (:func:`refseg_models.losses.per_sample_dice`), or SAM's 20:1 focal + Dice."""
    p, t = logits.sigmoid().flatten(1), target.flatten(1)
    dice = per_sample_dice(p, t)
    bce = F.binary_cross_entropy_with_logits(logits.flatten(1), t, reduction="none")
    if kind == "bce_dice":
        return bce.mean(-1) + dice
    if kind == "focal_dice":
        p_t = p * t + (1 - p) * (1 - t)
        alpha_t = 0.25 * t + 0.75 * (1 - t)
        focal = (alpha_t * bce * (1 - p_t) ** 2).mean(-1)
        return 20.0 * focal + dice
    raise ConfigError(f"unknown mask loss {kind!r}; use 'bce_dice' or 'focal_dice'")


def hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with ``target >= 0.5`` per sample (N x S x S -> N); empty/empty = 1."""
    pred, gt = (logits > 0).flatten(1), (target >= 0.5).flatten(1)
    inter, union = (pred & gt).sum(-1).float(), (pred | gt).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def decode_group(decoder, embeddings: torch.Tensor, points=None, boxes=None, multimask: bool = False):
    """SAM's PromptEncoder + the batch-aligned MaskDecoder forward -> (logits N x K x S x S, iou N x K)."""
    sparse, dense = decoder.prompt_encoder(points=points, boxes=boxes, masks=None)
    if dense.shape[0] != embeddings.shape[0]:
        dense = dense.expand(embeddings.shape[0], -1, -1, -1)
    return decoder(embeddings, sparse, dense, multimask_output=multimask)




# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: ProxyTrainConfig) -> None:
        from refseg_models.encoders.mobilenet_v2 import build_mobilenet_v2_backbone
        from refseg_models.encoders.sam_proxy import DEFAULT_NECK_CONFIG, build_neck

        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.data = TrainingImages(config, self.device)
        self.backbone = build_mobilenet_v2_backbone(config.backbone_checkpoint).to(self.device).eval()
        self.backbone.requires_grad_(False)
        torch.manual_seed(config.seed)
        self.neck_config = {**DEFAULT_NECK_CONFIG, **config.neck}
        self.neck = build_neck(self.neck_config).to(self.device)
        self.grid = self.neck.grid
        self.mask_size = 4 * self.grid
        self.decoder = build_decoder_for_training(self.grid, config.qk_init_scale, config.seed + 1).to(self.device)
        params = [p for p in list(self.neck.parameters()) + list(self.decoder.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.999),
        )
        self.total_steps = config.steps
        self.step = 0

    # -- schedule and order --------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        progress = (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps)
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def images_for_step(self, step: int) -> list[int]:
        """Consecutive chunks of an epoch permutation seeded by (seed, epoch)."""
        per = self.config.images_per_step
        n = len(self.data)
        per_epoch = max(1, n // per)
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))
        picked = order[position * per : (position + 1) * per].tolist()
        return [int(i) for i in (picked + order.tolist())[:per]] if len(picked) < per else picked

    # -- one step --------------------------------------------------------------------------------------
    def batch(self, step: int) -> dict[str, Any]:
        c = self.config
        rng = np.random.Generator(np.random.PCG64([c.seed, step, 1]))
        views, owner, masks, boxes = [], [], [], []
        for n, index in enumerate(self.images_for_step(step)):
            image, instance_masks = self.data.images[index], self.data.masks[index]
            flip = bool(rng.random() < c.flip_prob)
            jitter = tuple(rng.uniform(1 - c.jitter, 1 + c.jitter, 3)) if rng.random() < c.jitter_prob else None
            for attempt in range(4):  # three random crops, then the whole image (which always has a target)
                crop = (crop_box(rng, image.shape[1], image.shape[2], c.crop_area, c.crop_ratio) if attempt < 3
                        else (0, 0, image.shape[2], image.shape[1]))
                view, rendered = render_view(image, instance_masks, crop, flip, jitter)
                area = rendered.flatten(1).sum(1)
                candidates = torch.nonzero(area >= c.min_target_area).flatten()
                if len(candidates):
                    break
            pick = candidates[torch.from_numpy(rng.integers(0, len(candidates), c.prompts_per_image)).to(candidates.device)]
            chosen = rendered[pick]
            views.append(view)
            masks.append(F.avg_pool2d(chosen.float()[:, None], CANVAS // self.mask_size)[:, 0])
            boxes.append(tight_boxes(chosen))
            owner += [n] * c.prompts_per_image
        images = (torch.stack(views) - 128.0) / 128.0  # vrp512_squash_tf128
        box_target = step < c.box_target_steps
        kind = 0 if box_target or rng.random() < c.box_prob else int(rng.integers(1, 4))
        batch = {
            "images": images, "owner": torch.tensor(owner, device=self.device), "masks": torch.cat(masks),
            "boxes": torch.cat(boxes), "kind": kind, "box_target": box_target,
            "generator": torch.Generator().manual_seed(c.seed * 1_000_003 + step * 7 + 11),
        }
        if kind == 0:
            prompt_boxes = noisy_boxes(batch["boxes"].cpu(), batch["generator"], c.box_noise, c.box_noise_max)
            batch["prompt_boxes"] = prompt_boxes.to(self.device)
            if box_target:
                batch["masks"] = box_targets(batch["prompt_boxes"], self.mask_size)
        return batch

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        with torch.no_grad():
            features = self.backbone(batch["images"])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16):
            embeddings = self.neck(features)
        kind, target = batch["kind"], batch["masks"]
        emb = embeddings[batch["owner"]]
        if kind == 0:
            prompt = {"boxes": batch["prompt_boxes"]}
        else:
            coords = sample_points(target.cpu(), kind, batch["generator"]).to(self.device)
            labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=self.device)
            prompt = {"points": (coords, labels), "multimask": kind == 1}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16):
            logits, iou_pred = decode_group(self.decoder, emb, **prompt)
        logits, iou_pred = logits.float(), iou_pred.float()
        k = logits.shape[1]
        tgt = target[:, None].expand(-1, k, -1, -1).reshape(-1, *target.shape[-2:])
        flat_logits = logits.reshape(-1, *logits.shape[-2:])
        per_mask = per_sample_mask_loss(flat_logits, tgt, c.mask_loss).view(-1, k)
        mask_loss, best = per_mask.min(dim=1)
        with torch.no_grad():
            actual_iou = hard_iou(flat_logits, tgt).view(-1, k)
        iou_loss = F.mse_loss(iou_pred, actual_iou, reduction="none").mean(dim=1)
        total = (mask_loss + c.iou_loss_weight * iou_loss).mean()
        name = ("box_fill" if batch["box_target"] else "box") if kind == 0 else f"{kind}pt"
        return total, {f"loss_{name}": mask_loss.detach().mean(), f"iou_{name}": actual_iou.gather(1, best[:, None]).mean()}

    def train(self) -> dict[str, Any]:
        from tqdm import tqdm

        c = self.config
        out = Path(c.output)
        out.mkdir(parents=True, exist_ok=True)
        log = (out / "log.jsonl").open("a")
        print(json.dumps({"device": str(self.device), "training_images": len(self.data),
                          "skipped_images": self.data.skipped, "held_out_images": len(self.data.held_out_ids)}), flush=True)
        started = time.perf_counter()
        running: dict[str, float] = {}
        snapshot_steps: set[int] = set()
        step = 0
        calibration_start = started
        bar = tqdm(total=self.total_steps, desc="proxy-sam train", disable=not c.progress, unit="step")
        self.neck.train()
        while step < self.total_steps:
            if c.time_budget_s > 0 and step == c.calibration_steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                rate = (step - 10) / (time.perf_counter() - calibration_start)
                remaining = c.time_budget_s - (time.perf_counter() - started)
                self.total_steps = max(step + 1, min(c.steps, step + int(rate * remaining)))
                bar.total = self.total_steps
                print(json.dumps({"calibrated_steps": self.total_steps, "steps_per_second": round(rate, 2)}), flush=True)
            if step == 10:
                calibration_start = time.perf_counter()
            if not snapshot_steps and (c.time_budget_s <= 0 or step >= c.calibration_steps):
                snapshot_steps = {max(1, int(f * self.total_steps)) for f in c.snapshots if 0 < f < 1}
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(step)
            loss, stats = self.loss(self.batch(step))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], c.grad_clip)
            self.optimizer.step()
            step = self.step = step + 1
            bar.update(1)
            if step % c.log_every == 0 or step == self.total_steps:
                for key, value in {"loss": loss.detach(), **stats}.items():
                    running[key] = float(value)
                record = {"step": step, "of": self.total_steps, "lr": self.lr_at(step - 1),
                          "seconds": round(time.perf_counter() - started, 1), **{k: round(v, 4) for k, v in running.items()}}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix({k: f"{v:.3f}" for k, v in running.items() if k in ("loss", "iou_box", "iou_1pt")})
            if step in snapshot_steps:
                self.export(out / f"sam_proxy_mobilenet_v2-step{step}.pt", time.perf_counter() - started)
        bar.close()
        log.close()
        seconds = time.perf_counter() - started
        return {"steps": self.total_steps, "seconds": round(seconds, 1)}

    # -- export ------------------------------------------------------------------------------------------
    def export(self, path: str | Path, seconds: float) -> Path:
        """Write the proxy SAM file (fp16) of the current weights (the training weights stay fp32)."""
        from refseg_models.encoders.sam_proxy import sha256_of_file as sha256_file
        from refseg_models.encoders.sam_proxy import proxy_checkpoint_state

        c = self.config
        meta = {
            "grid": int(self.grid),
            "neck": dict(self.neck_config),
            "backbone": "mobilenet_v2",
            "backbone_sha256": sha256_file(c.backbone_checkpoint),
            "prompt_frame": [FRAME, FRAME],
            "input": "512 x 512 squash (vrp512_squash_tf128); prompts in the 1024 frame",
            "command": c.command,
            "seed": int(c.seed),
            "steps": int(self.step),
            "total_steps": int(self.total_steps),
            "train_config": json.dumps(c.to_dict(), sort_keys=True),
            "trained_classes": f"coco20i fold {c.fold} base classes, coco_mini training images",
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "training_seconds": round(float(seconds), 1),
        }
        obj = proxy_checkpoint_state(self.neck, self.decoder, meta)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".partial")
        torch.save(obj, tmp)
        tmp.replace(path)
        return path
