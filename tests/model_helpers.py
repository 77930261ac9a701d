"""Helpers shared by the method tests: thread pinning, parameter counting, toy feature batches, the
overfit episodes and the free-prompt-token probe."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from refseg_models.modeling.inputs import EpisodeFeatures

SMALL_CHANNELS = (16, 24, 40)  # layer2 / layer3 / layer4 channels of a toy backbone


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two threads oversubscribe and run far slower.
    Import it into a test module to apply it there (autouse, module scope)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_gradients_reach_exactly_the_trainable_parameters(model: torch.nn.Module) -> None:
    """After a backward pass: every trainable parameter has a non-zero gradient, no frozen one has any."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def toy_episode_features(
    b: int = 2,
    k: int = 1,
    *,
    channels: tuple[int, int, int] = SMALL_CHANNELS,
    grid: int = 32,
    layer2_size: int = 64,
    seed: int = 0,
    with_sam_refs: bool = False,
    empty: bool = False,
) -> EpisodeFeatures:
    """Random post-ReLU backbone maps (layer2 at ``layer2_size``, layer3/4 at 1/2 and 1/4 of it), a
    random SAM embedding on a ``grid`` x ``grid`` grid and 128 x 128 reference masks (a box, or empty)."""
    g = torch.Generator().manual_seed(seed)
    c2, c3, c4 = channels
    s2, s3, s4 = layer2_size, layer2_size // 2, layer2_size // 4
    masks = torch.zeros(b, k, 128, 128)
    if not empty:
        masks[..., 32:96, 40:100] = 1
    return EpisodeFeatures(
        target_sam=torch.randn(b, 256, grid, grid, generator=g),
        target_backbone={
            "layer2": torch.randn(b, c2, s2, s2, generator=g).relu(),
            "layer3": torch.randn(b, c3, s3, s3, generator=g).relu(),
            "layer4": torch.randn(b, c4, s4, s4, generator=g).relu(),
        },
        reference_backbone={
            "layer2": torch.randn(b, k, c2, s2, s2, generator=g).relu(),
            "layer3": torch.randn(b, k, c3, s3, s3, generator=g).relu(),
            "layer4": torch.randn(b, k, c4, s4, s4, generator=g).relu(),
        },
        reference_masks=masks,
        reference_sam=torch.randn(b, k, 256, grid, grid, generator=g) if with_sam_refs else None,
        reference_masked_layer4=torch.randn(b, k, c4, s4, s4, generator=g).relu(),
    )


def pick_overfit_episodes(coco, n: int, lo: float = 0.2, hi: float = 0.6) -> list[tuple[int, int, int]]:
    """The overfit episodes (tests/test_overfit_sam_methods.py, bench/bench_proxy_sam.py's free
    tokens): the first ``n`` classes with two images whose class mask covers ``lo``..``hi`` of the
    image, as (class, reference image, target image)."""
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


def fit_free_prompt_tokens(
    decoder, image_embeddings: torch.Tensor, target: torch.Tensor, steps: int = 50, tokens: int = 50, lr: float = 0.1
) -> torch.Tensor:
    """How promptable a frozen SAM decoder is (tests/test_overfit_sam_methods.py,
    bench/bench_proxy_sam.py): Adam fits ``tokens`` free prompt tokens per episode, LayerNorm'd to the
    methods' unit scale, to each target mask with BCE + Dice (as the overfit test's methods).

    image_embeddings: B x 256 x G x G; target: B x 1 x 512 x 512 in {0, 1}. Returns the B mask IoUs.
    """
    from torch.nn import functional as F

    from refseg_models.losses import dice_loss, sigmoid_bce_loss
    from refseg_models.modeling.robustness import mask_iou
    from refseg_models.modeling.sam_decoder import upsample_logits

    generator = torch.Generator().manual_seed(0)
    free = torch.randn(image_embeddings.shape[0], tokens, 256, generator=generator).requires_grad_(True)
    optimiser = torch.optim.Adam([free], lr=lr)

    def logits() -> torch.Tensor:
        return upsample_logits(decoder.decode(image_embeddings, F.layer_norm(free, (256,))), 512)

    for _ in range(steps):
        out = logits()
        loss = sigmoid_bce_loss(out, target) + dice_loss(out, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return mask_iou(logits() > 0, target > 0.5)
