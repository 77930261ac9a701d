"""Measurement harness for how a feature cache serves SegIC's augmented views (bench only).

Used by ``bench/bench_augmented_views.py`` (numbers in docs/segic_cache.md) and its test: prototype
matching accuracy on the same episodes per way of getting the query's features (recompute, feature
flip, warp of the plain image, warp of the nearest cached view). The view mechanics themselves are
:mod:`pipeline.training.views`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import DataError
from pipeline.training.views import (
    AugmentationConfig,
    ViewParams,
    apply_view,
    apply_view_to_mask,
    base_view,
    draw_view,
    flip_features,
    image_generator,
    nearest_view,
    warp_features,
    warp_grid,
)
from refseg_models.modeling.inputs import EpisodeFeatures


# --------------------------------------------------------------------------------------------------
def encode_views(encoder: Callable, images: Sequence[np.ndarray], batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Run a frozen encoder (``preprocess`` + forward) on rendered views; features cast to float16
    and back, as the store holds them. Returns one {name: C x h x w float32} per image."""
    out: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([encoder.preprocess(image) for image in images[start : start + batch_size]])
            features = encoder(batch)
            for index in range(len(batch)):
                out.append({name: value[index].to(torch.float16).float() for name, value in features.items()})
    return out


def flip_equivariance(
    original: Sequence[Mapping[str, torch.Tensor]], flipped: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, dict[str, float]]:
    """Feature flip vs recomputed features of the flipped image, per layer.

    Args:
        original: features of the images; flipped: features of the horizontally flipped images.
    Returns:
        {layer: {"rel_l2": mean over images of ||flip(f) - f_flip|| / ||f_flip||,
                 "cosine": mean over images and cells of the channel cosine similarity}}.
    """
    if len(original) != len(flipped) or not original:
        raise DataError(f"need matching non-empty feature lists, got {len(original)} and {len(flipped)}")
    result = {}
    for name in original[0]:
        rel, cos = [], []
        for a, b in zip(original, flipped):
            served = torch.flip(a[name], dims=(-1,))
            rel.append(float((served - b[name]).norm() / b[name].norm().clamp_min(1e-12)))
            cos.append(float(F.cosine_similarity(served, b[name], dim=0).mean()))
        result[name] = {"rel_l2": float(np.mean(rel)), "cosine": float(np.mean(cos))}
    return result


def predict_prototype(
    model: Callable, query: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
    reference_mask: np.ndarray, canvas: int,
) -> np.ndarray:
    """Prototype matching (``build_model("prototype_matching")``) of one episode -> ``canvas x canvas`` bool.

    ``query``/``reference``: {name: C x h x w}; ``reference_mask``: H x W {0, 1} (255 = ignored, as 0).
    The logits are upsampled bilinearly to the canvas and thresholded at 0.
    """
    mask = torch.from_numpy((np.asarray(reference_mask) == 1).astype(np.float32))[None, None]
    features = EpisodeFeatures(
        reference_masks=mask,
        target_backbone={name: value[None] for name, value in query.items()},
        reference_backbone={name: value[None, None] for name, value in reference.items()},
    )
    with torch.no_grad():
        logits = model.mask_logits(model(features))
    logits = F.interpolate(logits, size=(canvas, canvas), mode="bilinear", align_corners=False)
    return (logits[0, 0] > 0).numpy()


@dataclass(frozen=True)
class ViewEpisode:
    """A 1-shot episode whose query is a fresh augmented view (not one of the cached views)."""

    episode: int
    class_id: int
    query_id: str
    reference_id: str
    query_view: ViewParams


def sample_view_episodes(
    source, query_ids: Sequence, num_episodes: int, seed: int, config: AugmentationConfig,
    min_foreground: float = 0.005, max_tries: int = 20,
) -> list[ViewEpisode]:
    """Seeded episodes: class and query image from ``query_ids``, reference = another image of the
    class (un-augmented), query view drawn fresh from ``config`` until the class covers at least
    ``min_foreground`` of the canvas (LSJ at 0.1 or a crop can remove the object: those draws are
    redrawn, up to ``max_tries``, then the episode is skipped and counted in the result's length).

    ``source``: a :class:`~pipeline.data.coco.CocoInstances`-like source (``classes_in_image``,
    ``images_of_class``, ``class_mask``, ``image_info``).
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0xE915])))
    pairs = [
        (str(image_id), class_id)
        for image_id in query_ids
        for class_id in source.classes_in_image(image_id)
        if len(source.images_of_class(class_id)) >= 2
    ]
    if not pairs:
        raise DataError("no (query image, class) pair has a second image of the class for a reference")
    episodes = []
    for index in range(num_episodes):
        query_id, class_id = pairs[int(rng.integers(len(pairs)))]
        others = [str(i) for i in source.images_of_class(class_id) if str(i) != query_id]
        reference_id = others[int(rng.integers(len(others)))]
        info = source.image_info(query_id)
        mask = source.class_mask(query_id, class_id)
        view_rng = image_generator(seed, query_id, stream=f"episode{index}")
        for _ in range(max_tries):
            view = draw_view(view_rng, query_id, 0, int(info["height"]), int(info["width"]), config)
            if (apply_view_to_mask(mask, view, fill=255) == 1).mean() >= min_foreground:
                episodes.append(ViewEpisode(index, class_id, query_id, reference_id, view))
                break
    return episodes


def _episode_iou(prediction: np.ndarray, gt: np.ndarray) -> float:
    valid = gt != 255
    foreground = gt == 1
    union = np.count_nonzero((prediction | foreground) & valid)
    return np.count_nonzero(prediction & foreground & valid) / union if union else 0.0


def evaluate_view_serving(
    source,
    episodes: Sequence[ViewEpisode],
    plan: Sequence[ViewParams],
    encoder,
    cached_features: Callable[[ViewParams], Mapping[str, torch.Tensor]],
    models: Mapping[str, Callable],
    num_views: Sequence[int] = (1, 2, 4, 8),
) -> dict[str, dict]:
    """Prototype-matching accuracy on the same episodes, per way of getting the query's features.

    Arms (the reference is always the un-augmented image's cached features):

    * ``recompute``: the encoder on the exact query view (the reference point).
    * ``feature_flip``: the encoder on the query view with its flip toggled, then :func:`flip_features`.
    * ``original_warp``: only the plain image is cached (``base_view``), warped into the query view.
    * ``cached_v{V}_warp``: the plain image + the first ``V`` plan views of the query image are
      cached; the :func:`nearest_view` is warped into the query view.

    Args:
        cached_features: {name: C x h x w} of a ``base_view`` or a plan view (a store read, or the
            encoder in tests).
        models: {label: prototype-matching model} (e.g. one per feature layer).
    Returns:
        {arm: {"miou": {label: HSNet mIoU}, "fbiou": {label: ...}, "delta_iou": {label: [mean, standard
        error] of the per-episode foreground IoU minus recompute's, in points}, "rel_l2": {layer: mean
        ||served - exact|| / ||exact|| over the query's image cells}, "cosine": {layer: mean cosine over
        those cells}, "coverage": mean fraction of those cells the served features have, "episodes"}},
        plus ``"per_episode"``: [{"episode", "class_id", "zoom" (query magnification / the plain
        image's: < 1 means the view is smaller than the cached plain image), "iou": {arm: {label}}}].
    """
    from pipeline.evaluation.meter import FewShotMeter

    if not episodes:
        raise DataError("no episodes to evaluate")
    by_image: dict[str, list[ViewParams]] = {}
    for view in plan:
        by_image.setdefault(view.image_id, []).append(view)
    class_ids = sorted({episode.class_id for episode in episodes})
    arms = ["recompute", "feature_flip", "original_warp", *[f"cached_v{v}_warp" for v in num_views]]
    meters = {(arm, label): FewShotMeter(class_ids) for arm in arms for label in models}
    ious: dict[tuple[str, str], list[float]] = {key: [] for key in meters}
    rel: dict[tuple[str, str], list[float]] = {}
    cos: dict[tuple[str, str], list[float]] = {}
    coverage: dict[str, list[float]] = {arm: [] for arm in arms}
    canvas = episodes[0].query_view.canvas
    per_episode: list[dict] = []
    for episode in episodes:
        view = episode.query_view
        image = source.load_image(source.key(episode.query_id))
        gt = apply_view_to_mask(source.class_mask(episode.query_id, episode.class_id), view, fill=255)
        info = source.image_info(episode.reference_id)
        reference = cached_features(base_view(episode.reference_id, int(info["height"]), int(info["width"]), canvas))
        reference_mask = source.class_mask(episode.reference_id, episode.class_id)
        toggled = replace(view, flip=not view.flip)
        exact, exact_toggled = encode_views(encoder, [apply_view(image, view), apply_view(image, toggled)])
        content = {name: warp_grid(view, view, *value.shape[-2:])[1] for name, value in exact.items()}
        full = {name: torch.ones_like(mask) for name, mask in content.items()}
        base = base_view(episode.query_id, view.height, view.width, canvas)
        served: dict[str, tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]] = {
            "recompute": (exact, full),
            "feature_flip": (flip_features(exact_toggled), full),
            "original_warp": warp_features(cached_features(base), base, view),
        }
        cached = by_image.get(episode.query_id, [])
        for count in num_views:
            if len(cached) < count:
                raise DataError(f"plan has {len(cached)} views of image {episode.query_id!r}, need {count}")
            source_view = nearest_view(view, [base, *cached[:count]])
            served[f"cached_v{count}_warp"] = warp_features(cached_features(source_view), source_view, view)
        for arm, (features, valid) in served.items():
            for label, model in models.items():
                prediction = predict_prototype(model, features, reference, reference_mask, canvas)
                meters[arm, label].update(prediction, gt, episode.class_id)
                ious[arm, label].append(_episode_iou(prediction, gt))
            for name, mask in content.items():
                if not mask.any():
                    continue
                served_cells, exact_cells = features[name][:, mask], exact[name][:, mask]
                norm = exact_cells.norm().clamp_min(1e-12)
                rel.setdefault((arm, name), []).append(float((served_cells - exact_cells).norm() / norm))
                cos.setdefault((arm, name), []).append(float(F.cosine_similarity(served_cells, exact_cells, dim=0).mean()))
            layer = next(iter(content))
            coverage[arm].append(float((valid[layer] & content[layer]).sum() / content[layer].sum().clamp_min(1)))
        per_episode.append({
            "episode": episode.episode, "class_id": episode.class_id,
            "zoom": view.pixels_per_pixel() / base.pixels_per_pixel(),
            "iou": {arm: {label: ious[arm, label][-1] for label in models} for arm in arms},
        })
    result: dict[str, dict] = {}
    for arm in arms:
        entry: dict = {"miou": {}, "fbiou": {}, "delta_iou": {}, "rel_l2": {}, "cosine": {}}
        for label in models:
            metrics = meters[arm, label].compute()
            entry["miou"][label] = float(metrics["miou"])
            entry["fbiou"][label] = float(metrics["fbiou"])
            delta = 100.0 * (np.asarray(ious[arm, label]) - np.asarray(ious["recompute", label]))
            error = float(delta.std(ddof=1) / math.sqrt(len(delta))) if len(delta) > 1 else 0.0
            entry["delta_iou"][label] = [float(delta.mean()), error]
            entry["episodes"] = int(metrics["episodes"])
        for (name_arm, name), values in rel.items():
            if name_arm == arm:
                entry["rel_l2"][name] = float(np.mean(values))
                entry["cosine"][name] = float(np.mean(cos[name_arm, name]))
        entry["coverage"] = float(np.mean(coverage[arm]))
        result[arm] = entry
    result["per_episode"] = per_episode
    return result
