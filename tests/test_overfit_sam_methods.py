"""VRP-SAM, ProSAM and FCP on real images: real coco_mini episodes, the real MobileNetV2 backbone and
a small random-init SAM, features computed ONCE (frozen) and only the trainable part trained, as
the training pipeline does with cached features.

Test-size SAM (stated deviations, CPU budget): a 2-block ViT (embed 96) on a 256 x 256 input gives a
256 x 16 x 16 embedding, the frozen SAM prompt encoder / mask decoder (segment-anything's own
modules) run on that 16 x 16 grid and the models use ``feature_size=16``. The random-init decoder's
attention is nearly uniform for unit-scale prompt tokens (what the methods' post-norm decoders emit),
so it can hardly be steered; its attention q/k projections are therefore initialised at 3x the
default scale (a sharper decoder, as a trained SAM is). ``test_decoder_is_steerable_by_unit_scale_tokens``
checks that this decoder can be driven to the masks by free unit-scale tokens.

Measured (1 thread, to be robust on a shared machine; numbers in docs/methods.md): free unit-scale
tokens reach mean IoU > 0.6 within 50 steps; with the learned query / prototype embeddings at
lr 0.05 and everything else at 1e-3, VRP-SAM (150 steps), ProSAM (180 steps, K = 2, heads
initialised with mu at unit scale and sigma 0.13) and FCP (240 steps) reach mean IoU >= 0.6.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from torch.nn import functional as F

from model_helpers import single_thread  # noqa: F401  (one intra-op thread for this module)

from refseg_models import build_model
from refseg_models.encoders import build_encoder
from refseg_models.encoders.transforms import vrp_squash_imagenet
from refseg_models.losses import dice_loss, sigmoid_bce_loss
from refseg_models.modeling.features import resize_mask_nearest, resize_to_grid
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.modeling.pseudo_mask import masked_reference_layer4, prior_pseudo_mask
from refseg_models.modeling.robustness import mask_iou
from refseg_models.modeling.sam_decoder import SamDecoder, build_sam_decoder, upsample_logits

pytestmark = [pytest.mark.real_data, pytest.mark.real_weights, pytest.mark.slow]

GRID = 16  # test SAM embedding grid (SAM's is 64)
NUM_EPISODES = 4
MOBILENET_CHANNELS = (32, 96, 1280)


def _mask_512(mask: np.ndarray) -> torch.Tensor:
    # Class mask {0, 1, 255}: crowd / ignore counts as background here.
    t = torch.from_numpy((mask == 1).astype(np.float32))[None, None]
    return F.interpolate(t, size=(512, 512), mode="nearest")[0, 0]


def _pick_episodes(coco, n: int, lo: float = 0.2, hi: float = 0.6) -> list[tuple[int, int, int]]:
    """First n classes with two images whose class mask covers lo..hi of the image: (class, ref, target)."""
    episodes = []
    for class_id in range(coco.num_classes):
        good = []
        for image_id in coco.images_of_class(class_id):
            if lo <= float((coco.class_mask(image_id, class_id) == 1).mean()) <= hi:
                good.append(image_id)
            if len(good) == 2:
                episodes.append((class_id, good[0], good[1]))
                break
        if len(episodes) == n:
            break
    return episodes


def _tiny_sam_encoder() -> ImageEncoderViT:
    return ImageEncoderViT(
        depth=2, embed_dim=96, img_size=GRID * 16, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=3, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=14,
        out_chans=256,
    ).eval()


def _test_sam_decoder() -> SamDecoder:
    torch.manual_seed(0)
    decoder = build_sam_decoder(image_embedding_size=GRID)
    with torch.no_grad():
        for module in decoder.mask_decoder.transformer.modules():
            if hasattr(module, "q_proj"):
                module.q_proj.weight.mul_(3.0)
                module.k_proj.weight.mul_(3.0)
    return decoder


@pytest.fixture(scope="module")
def episodes(coco_mini_dir: Path, mobilenet_v2_weights: Path) -> dict:
    from pipeline.data.coco import CocoInstances

    coco = CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images", verbose=False)
    chosen = _pick_episodes(coco, NUM_EPISODES)
    assert len(chosen) == NUM_EPISODES
    backbone = build_encoder("mobilenet_v2", mobilenet_v2_weights)
    torch.manual_seed(0)
    sam = _tiny_sam_encoder()
    refs = [coco.load_image(r) for _, r, _ in chosen]
    tgts = [coco.load_image(t) for _, _, t in chosen]
    ref_masks = torch.stack([_mask_512(coco.class_mask(r, c)) for c, r, _ in chosen])
    tgt_masks = torch.stack([_mask_512(coco.class_mask(t, c)) for c, _, t in chosen])
    with torch.no_grad():
        ref_bb = backbone(torch.stack([backbone.preprocess(i) for i in refs]))
        tgt_bb = backbone(torch.stack([backbone.preprocess(i) for i in tgts]))
        masked_l4 = masked_reference_layer4(backbone, ref_bb["layer3"], ref_masks)
        ref_sam = sam(torch.stack([vrp_squash_imagenet(i, GRID * 16) for i in refs]))
        tgt_sam = sam(torch.stack([vrp_squash_imagenet(i, GRID * 16) for i in tgts]))
    features = EpisodeFeatures(
        target_sam=tgt_sam,
        target_backbone=tgt_bb,
        reference_backbone={k: v[:, None] for k, v in ref_bb.items()},
        reference_masks=ref_masks[:, None],
        reference_sam=ref_sam[:, None],
        reference_masked_layer4=masked_l4[:, None],
        meta={"episodes": chosen},
    )
    return {"features": features, "target_masks": tgt_masks, "episodes": chosen}


def test_vrp_sam_pseudo_mask_finds_the_object_better_than_chance(episodes: dict) -> None:
    feats: EpisodeFeatures = episodes["features"]
    ref_mask = resize_mask_nearest(feats.reference_masks[:, 0], 64)
    pseudo = prior_pseudo_mask(feats.target_backbone["layer4"], feats.reference_masked_layer4[:, 0], ref_mask)
    pseudo = resize_to_grid(pseudo, 64)[:, 0]
    gt = resize_mask_nearest(episodes["target_masks"], 64)[:, 0] > 0.5
    aucs, ious, chance = [], [], []
    for p, g in zip(pseudo, gt):
        inside, outside = p[g], p[~g]
        aucs.append(float((inside[:, None] > outside[None, :]).float().mean()))
        # IoU of the top-|GT| pixels vs a random mask of the same area (expected IoU f / (2 - f)).
        k = int(g.sum())
        top = p >= p.flatten().topk(k).values[-1]
        ious.append(float(mask_iou(top[None], g[None])))
        f = float(g.float().mean())
        chance.append(f / (2 - f))
    print(f"pseudo-mask AUC {np.round(aucs, 3)}, top-area IoU {np.round(ious, 3)}, chance IoU {np.round(chance, 3)}")
    assert min(aucs) > 0.6 and float(np.mean(aucs)) > 0.75
    assert float(np.mean(ious)) > 1.5 * float(np.mean(chance))


def test_decoder_is_steerable_by_unit_scale_tokens(episodes: dict) -> None:
    """Calibration of the test SAM: free tokens, LayerNorm'd to the methods' unit scale, reach the masks."""
    feats: EpisodeFeatures = episodes["features"]
    target = episodes["target_masks"][:, None]
    decoder = _test_sam_decoder()
    torch.manual_seed(0)
    tokens = torch.randn(NUM_EPISODES, 50, 256).requires_grad_(True)
    opt = torch.optim.Adam([tokens], lr=0.1)
    for _ in range(50):
        logits = upsample_logits(decoder.decode(feats.target_sam, F.layer_norm(tokens, (256,))), 512)
        loss = sigmoid_bce_loss(logits, target) + dice_loss(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = upsample_logits(decoder.decode(feats.target_sam, F.layer_norm(tokens, (256,))), 512)
    iou = mask_iou(logits > 0, target > 0.5)
    print(f"free unit-scale tokens, 50 steps: IoU {iou.numpy().round(3)}")
    assert float(iou.mean()) >= 0.6


# method -> (config, steps). Dropout off (feature and attention dropout 0) so memorisation is not
# fought by regularisation. ProSAM: K = 2 samples instead of 10 (CPU budget), and its heads start
# with mu at the scale of VRP-SAM's tokens (xavier) and sigma at 0.13 instead of nn.Linear's default
# (mu RMS ~0.6, sigma ~0.69): with the default init the samples are mostly noise for this random SAM
# and the mean IoU stays at ~0.18 within 150 steps (measured).
OVERFIT = {
    "vrp_sam": ({"feature_dropout": 0.0}, 150),
    "prosam": ({"feature_dropout": 0.0, "num_samples": 2, "initial_sigma": 0.13, "mu_init": "xavier"}, 180),
    "fcp": ({"feature_dropout": 0.0, "branch_attention_dropout": 0.0, "match_attention_dropout": 0.0}, 240),
}
# Optimiser for the step budget: Adam lr 1e-3, except the learned query / prototype embeddings
# (nn.Embedding: they play the role of free prompt tokens) at lr 0.05. With one lr of 1e-3 for
# everything no method gets past mean IoU ~0.2 in 300 steps; 3e-3 or more for the rest stalls too.
BASE_LR, EMBEDDING_LR = 1e-3, 0.05


def _is_embedding(name: str) -> bool:
    return name.endswith("queries.weight") or name.endswith("prototypes.weight")


@pytest.mark.parametrize("method", sorted(OVERFIT))
def test_method_learns_on_real_episodes(method: str, episodes: dict) -> None:
    feats: EpisodeFeatures = episodes["features"]
    target = episodes["target_masks"]
    config, steps = OVERFIT[method]
    torch.manual_seed(0)
    model = build_model(
        method, backbone_channels=MOBILENET_CHANNELS, feature_size=GRID, sam_decoder=_test_sam_decoder(), **config
    )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    embeddings = [p for n, p in named if _is_embedding(n)]
    assert embeddings, "expected learned query / prototype embeddings"
    opt = torch.optim.Adam(
        [{"params": embeddings, "lr": EMBEDDING_LR}, {"params": [p for n, p in named if not _is_embedding(n)]}],
        lr=BASE_LR,
    )

    def evaluate() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return mask_iou(model.mask_logits(model(feats)) > 0, target[:, None] > 0.5)

    initial = evaluate()
    losses = []
    model.train()
    for _ in range(steps):
        loss = model.loss(model(feats), target, torch.ones_like(target))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = evaluate()
    print(f"{method}: IoU {initial.numpy().round(3)} -> {final.numpy().round(3)} (mean {final.mean():.3f}); "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert all(p.grad is None for p in model.sam_decoder.parameters())
    # The trainable part learns on real features: the training loss falls clearly.
    assert np.mean(losses[-5:]) < losses[0] - 0.02
    # Acceptance target (an all-foreground mask scores ~0.3 on these episodes).
    assert float(final.mean()) >= 0.6
