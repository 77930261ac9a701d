"""Generated reference annotations against the authors' own generators, transcribed below from their
code (syp2ysy/VRP-SAM @ 9c53a6a: ``model/VRP_encoder.py`` get_point_mask / get_scribble_mask,
``common/utils.py`` SEEM strokes, ``data/coco.py`` mask resize; FCP's copies are identical), not from
refseg's: the test-time scribble draw, scribble coverage in training and at test, where points are
drawn and what survives of them on the 64 x 64 grid, scribbles that miss the object.

The authors draw from global random streams (numpy / torch / an unseeded ``random.Random()``); the
transcription takes a ``RandomState`` and a ``torch.Generator`` instead (same distributions), so
refseg's per-episode streams are compared with theirs statistically."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy.stats import ks_2samp

from refseg_models.annotations import STROKE_PRESETS, point_move_offsets, reference_annotation, scribble_plan
from refseg_models.frames import Frame


# ------------------------------------------------------------------ the authors' code, transcribed
def authors_support_mask(mask: np.ndarray) -> torch.Tensor:
    """data/coco.py line 44: the class mask nearest-resized to the 512 x 512 input."""
    smask = torch.from_numpy((mask == 1).astype(np.float32))
    return F.interpolate(smask.unsqueeze(0).unsqueeze(0).float(), (512, 512), mode="nearest").squeeze()


def get_stroke_preset(stroke_preset):  # common/utils.py lines 94-120
    if stroke_preset == "rand_curve":
        return {"nVertexBound": [10, 30], "maxHeadSpeed": 20, "maxHeadAcceleration": (15, 0.5), "brushWidthBound": (3, 10),
                "nMovePointRatio": 0.5, "maxPiontMove": 3, "maxLineAcceleration": (5, 0.5), "boarderGap": None, "maxInitSpeed": 6}
    return {"nVertexBound": [6, 22], "maxHeadSpeed": 12, "maxHeadAcceleration": (8, 0.5), "brushWidthBound": (2.5, 5),
            "nMovePointRatio": 0.5, "maxPiontMove": 1.5, "maxLineAcceleration": (3, 0.5), "boarderGap": None, "maxInitSpeed": 3}


def get_random_points_from_mask(mask, n, gen):  # lines 122-131 (torch.randperm on the global generator there)
    h, w = mask.shape
    view_mask = mask.reshape(h * w)
    non_zero_idx = view_mask.nonzero()[:, 0]
    selected_idx = torch.randperm(len(non_zero_idx), generator=gen)[:n]
    non_zero_idx = non_zero_idx[selected_idx]
    y = torch.div(non_zero_idx, w)
    x = non_zero_idx % w
    return torch.cat((x[:, None], y[:, None]), dim=1).cpu().numpy()


def random_accelerate(rs, velocity, maxAcceleration, dist="uniform"):  # lines 216-229
    speed, angle = velocity
    d_speed, d_angle = maxAcceleration
    if dist == "uniform":
        speed += rs.uniform(-d_speed, d_speed)
        angle += rs.uniform(-d_angle, d_angle)
    else:
        speed += rs.normal(0, d_speed / 2)
        angle += rs.normal(0, d_angle / 2)
    return (speed, angle)


def random_move_control_points(rs, Xs, Ys, lineVelocity, nMovePointRatio, maxPiontMove, maxLineAcceleration):  # 232-249
    new_Xs = Xs.copy()
    new_Ys = Ys.copy()
    speed, angle = lineVelocity
    new_Xs += int(speed * np.cos(angle))
    new_Ys += int(speed * np.sin(angle))
    lineVelocity = random_accelerate(rs, lineVelocity, maxLineAcceleration, dist="guassian")
    chosen = np.arange(len(Xs))
    rs.shuffle(chosen)
    chosen = chosen[: int(len(Xs) * nMovePointRatio)]
    for i in chosen:
        new_Xs[i] += rs.randint(-maxPiontMove, maxPiontMove)
        new_Ys[i] += rs.randint(-maxPiontMove, maxPiontMove)
    return new_Xs, new_Ys


def get_random_stroke_control_points(rs, init_point, nVertexBound, maxHeadSpeed, maxHeadAcceleration, maxInitSpeed):  # 252-290
    startX, startY = init_point[0], init_point[1]
    Xs, Ys = [init_point[0]], [init_point[1]]
    numVertex = rs.randint(nVertexBound[0], nVertexBound[1])
    angle = rs.uniform(0, 2 * np.pi)
    speed = rs.uniform(0, maxHeadSpeed)
    for _ in range(numVertex):
        speed, angle = random_accelerate(rs, (speed, angle), maxHeadAcceleration)
        speed = np.clip(speed, 0, maxHeadSpeed)
        nextX = startX + speed * np.sin(angle)
        nextY = startY + speed * np.cos(angle)
        startX, startY = nextX, nextY
        Xs.append(nextX)
        Ys.append(nextY)
    velocity = (np.abs(rs.normal(0, maxInitSpeed / 2)), rs.uniform(0, 2 * np.pi))  # get_random_velocity 'guassian'
    return np.array(Xs), np.array(Ys), velocity


def draw_mask_by_control_points(mask, Xs, Ys, brushWidth, fill=255):  # lines 305-314
    radius = brushWidth // 2 - 1
    for i in range(1, len(Xs)):
        draw = ImageDraw.Draw(mask)
        draw.line((Xs[i - 1], Ys[i - 1]) + (Xs[i], Ys[i]), fill=fill, width=brushWidth)
    for x, y in zip(Xs, Ys):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    return mask


def get_mask_by_input_strokes(rs, init_points, imageWidth, imageHeight, nStroke, nVertexBound, maxHeadSpeed,
                              maxHeadAcceleration, brushWidthBound, boarderGap, nMovePointRatio, maxPiontMove,
                              maxLineAcceleration, maxInitSpeed):  # lines 134-213
    control_points_set = []
    for i in range(nStroke):
        brushWidth = rs.randint(brushWidthBound[0], brushWidthBound[1])
        Xs, Ys, velocity = get_random_stroke_control_points(rs, init_points[i], nVertexBound, maxHeadSpeed,
                                                            maxHeadAcceleration, maxInitSpeed)
        control_points_set.append((Xs, Ys, velocity, brushWidth))
        # (the authors also draw these unmoved strokes into a first mask that they discard: left out)
    mask = Image.new(mode="1", size=(imageWidth, imageHeight), color=1)
    for j in range(len(control_points_set)):
        Xs, Ys, velocity, brushWidth = control_points_set[j]
        new_Xs, new_Ys = random_move_control_points(rs, Xs, Ys, velocity, nMovePointRatio, maxPiontMove, maxLineAcceleration)
        control_points_set[j] = (new_Xs, new_Ys, velocity, brushWidth)
    for Xs, Ys, velocity, brushWidth in control_points_set:
        draw_mask_by_control_points(mask, Xs, Ys, brushWidth, fill=0)
    return np.array(mask)


def get_scribble_mask(mask, training, rs, gen, counts, stroke_preset=("rand_curve", "rand_curve_small"), stroke_prob=(0.5, 0.5)):
    """VRP_encoder.py lines 62-84 for a batch of one (``counts``: a seeded stand-in for their
    unseeded ``random.Random()`` in training)."""
    area = int(mask.sum().item())  # (a float there: Python's randint accepted it; int() avoids its warning)
    if training:
        stroke_preset_name = counts.choices(stroke_preset, weights=stroke_prob, k=1)[0]
        nStroke = counts.randint(1, min(20, area))
    else:
        stroke_preset_name = random.Random(321).choices(stroke_preset, weights=stroke_prob, k=1)[0]
        nStroke = random.Random(321).randint(1, min(20, area))
    preset = get_stroke_preset(stroke_preset_name)
    b, h, w = mask.shape
    scribble_masks = []
    for idx in range(b):
        points = get_random_points_from_mask(mask[idx].bool(), n=nStroke, gen=gen)
        rand_mask = get_mask_by_input_strokes(rs, init_points=points, imageWidth=w, imageHeight=h,
                                              nStroke=min(nStroke, len(points)), **preset)
        rand_mask = (~torch.from_numpy(rand_mask)) * mask[idx].bool().cpu()
        scribble_masks.append(rand_mask.float().unsqueeze(0))
    return torch.cat(scribble_masks, 0)


def get_point_mask(mask, training, gen, counts, max_points=20):  # VRP_encoder.py lines 38-60
    max_points = min(max_points, int(mask.sum().item()))
    num_points = counts.randint(1, max_points) if training else max_points
    b, h, w = mask.shape
    point_masks = []
    for idx in range(b):
        view_mask = mask[idx].view(-1)
        non_zero_idx = view_mask.nonzero()[:, 0]
        selected_idx = torch.randperm(len(non_zero_idx), generator=gen)[:num_points]
        non_zero_idx = non_zero_idx[selected_idx]
        rand_mask = torch.zeros(view_mask.shape)
        rand_mask[non_zero_idx] = 1
        point_masks.append(rand_mask.reshape(h, w).unsqueeze(0))
    return torch.cat(point_masks, 0)


# ------------------------------------------------------------------------------------------- tests
def _masks() -> dict[str, np.ndarray]:
    """References of COCO's usual size and smaller, objects of a few shapes (uint8, 255 = ignore)."""
    yy, xx = np.mgrid[:480, :640]
    ellipse = (((yy - 250) / 150) ** 2 + ((xx - 300) / 220) ** 2 <= 1).astype(np.uint8)
    ellipse[240:260, :] = np.where(ellipse[240:260, :] == 1, 255, 0)  # an ignore band
    small = np.zeros((300, 200), np.uint8)
    small[40:260, 90:130] = 1  # a thin upright object
    return {"coco_size_ellipse": ellipse, "small_thin_bar": small}


def _coverage(scribble: np.ndarray, support: np.ndarray) -> float:
    return float(scribble.sum() / support.sum())


def test_test_time_scribble_draw_is_the_authors_fixed_one() -> None:
    for area in list(range(1, 30)) + [500, 10**5]:
        # VRP_encoder.py lines 71-73
        preset = random.Random(321).choices(["rand_curve", "rand_curve_small"], weights=[0.5, 0.5], k=1)[0]
        strokes = random.Random(321).randint(1, min(20, area))
        for seed in (0, 1, 2):
            assert scribble_plan(area, False, np.random.default_rng(seed)) == (preset, strokes), area
    assert scribble_plan(10**5, False, np.random.default_rng(0)) == ("rand_curve", 9)
    # training: both presets, 1..min(20, area) strokes
    drawn = [scribble_plan(300, True, np.random.default_rng(seed)) for seed in range(200)]
    assert {p for p, _ in drawn} == {"rand_curve", "rand_curve_small"} and {n for _, n in drawn} == set(range(1, 21))


def test_control_points_move_as_the_authors_randint_does() -> None:
    rs, rng = np.random.RandomState(0), np.random.default_rng(0)
    for name, preset in STROKE_PRESETS.items():
        authors = get_stroke_preset(name)["maxPiontMove"]
        theirs = {int(rs.randint(-authors, authors)) for _ in range(2000)}  # common/utils.py lines 247-248
        assert set(point_move_offsets(2000, float(preset["max_point_move"]), rng).tolist()) == theirs, name
    assert theirs == {-1, 0}  # rand_curve_small


@pytest.mark.parametrize(
    "name, training", [("coco_size_ellipse", False), ("coco_size_ellipse", True), ("small_thin_bar", False)],
    ids=["coco_size-test", "coco_size-training", "small_thin-test"],
)
def test_scribbles_cover_the_object_as_the_authors_scribbles_do(name: str, training: bool) -> None:
    mask = _masks()[name]
    support = authors_support_mask(mask)
    draws = 100
    rs, gen, counts = np.random.RandomState(0), torch.Generator().manual_seed(0), random.Random(0)
    theirs = [_coverage(get_scribble_mask(support[None], training, rs, gen, counts)[0].numpy(), support.numpy())
              for _ in range(draws)]
    ours = []
    for seed in range(draws):
        scribble = reference_annotation(mask, "scribble", seed, training=training)
        assert scribble.shape == (512, 512) and not (scribble & (support.numpy() == 0)).any()
        ours.append(_coverage(scribble, support.numpy()))
    error = np.sqrt(np.var(theirs) / draws + np.var(ours) / draws)
    same = ks_2samp(ours, theirs).pvalue
    print(f"{name} {'training' if training else 'test'}: coverage ours {np.mean(ours):.4f}, authors {np.mean(theirs):.4f} "
          f"(standard error of the difference {error:.4f}); two-sample KS p = {same:.3f}")
    assert abs(np.mean(ours) - np.mean(theirs)) < 4 * error
    assert same > 1e-3  # the whole distribution of coverages, not only its mean


def test_points_are_drawn_on_the_authors_512_mask_and_survive_the_grid_as_theirs() -> None:
    for name, mask in _masks().items():
        support = authors_support_mask(mask).numpy() > 0
        points = reference_annotation(mask, "points", seed=5)
        assert points.shape == (512, 512) and points.sum() == 20 and not (points & ~support).any(), name
        # what a VRP-SAM model reads: the annotation mapped into its 512 squash frame of the reference
        in_frame = Frame.of("vrp512_squash_tf128", 512, mask.shape).mask_to_frame(points).numpy()
        assert np.array_equal(in_frame, points), name
    # survival on the 64 x 64 grid (the models' nearest resize) of a small reference, whose own
    # pixels would survive 4 x more often: the authors' expected count vs refseg's mean
    mask = _masks()["small_thin_bar"]
    support = authors_support_mask(mask)
    draws = 300

    def on_grid(annotation: torch.Tensor) -> float:
        return float(F.interpolate(annotation[None, None].float(), (64, 64), mode="nearest").sum())

    gen, counts = torch.Generator().manual_seed(0), random.Random(0)
    theirs = [on_grid(get_point_mask(support[None], False, gen, counts)[0]) for _ in range(draws)]
    ours = [on_grid(torch.from_numpy(reference_annotation(mask, "points", seed))) for seed in range(draws)]
    error = np.sqrt(np.var(theirs) / draws + np.var(ours) / draws)
    print(f"points on the 64 grid: ours {np.mean(ours):.3f}, authors {np.mean(theirs):.3f} (standard error {error:.3f})")
    assert abs(np.mean(ours) - np.mean(theirs)) < 4 * error


def test_an_object_thinner_than_the_512_sampling_is_drawn_at_its_own_size() -> None:
    mask = np.zeros((40, 1500), np.uint8)
    mask[5:30, 1] = 1  # column 1: the 512 resize samples columns 0, 2, 5, ... (the authors' code fails here)
    assert authors_support_mask(mask).sum() == 0
    for kind in ("points", "scribble"):
        drawn = reference_annotation(mask, kind, seed=0)
        assert drawn.shape == mask.shape and drawn.any() and not (drawn & (mask != 1)).any()


def test_a_scribble_that_misses_the_object_stays_empty_as_the_authors_does() -> None:
    mask = np.zeros((512, 512), np.uint8)
    mask[200, 300] = 1  # one pixel: the strokes' random move shifts most of them off it
    ours = [reference_annotation(mask, "scribble", seed) for seed in range(40)]
    rs, gen, counts = np.random.RandomState(0), torch.Generator().manual_seed(0), random.Random(0)
    theirs = [get_scribble_mask(authors_support_mask(mask)[None], False, rs, gen, counts)[0] for _ in range(40)]
    empty_ours = sum(not s.any() for s in ours)
    empty_theirs = sum(not bool(s.any()) for s in theirs)
    print(f"one-pixel object: {empty_ours} / 40 scribbles empty (authors: {empty_theirs} / 40)")
    assert empty_theirs > 0 and empty_ours > 0
    assert all(not (s & (mask != 1)).any() for s in ours)


class _Masks:
    """The label masks of a data path (``MaskCache.get``), here fixed arrays."""

    def __init__(self, masks: dict[str, np.ndarray]) -> None:
        self.masks = masks

    def get(self, image_id: str, class_id: int) -> np.ndarray:
        return self.masks[image_id]


@pytest.mark.parametrize("kind", ["points", "scribble"])
def test_the_data_path_hands_the_model_the_annotation_drawn_in_the_authors_frame(kind: str) -> None:
    from pipeline.training.episode_features import EpisodeFeatureBuilder
    from refseg_models.method import FeatureSpec

    reference = _masks()["coco_size_ellipse"]  # 480 x 640
    masks = _Masks({"ref": reference, "query": reference})
    row = {"episode_id": 0, "class_id": 1, "query_id": "query", "support_ids": ["ref"], "annotation_type": kind,
           "annotation_seed": 11}
    drawn = reference_annotation(reference, kind, 11)
    # VRP-SAM's 512 squash frame: exactly the authors' annotation
    squash = EpisodeFeatureBuilder(FeatureSpec(), masks, frame_preprocessing="vrp512_squash_tf128", frame_size=512)([row])
    assert torch.equal(squash.features.reference_masks[0, 0], torch.from_numpy(drawn).float())
    # a padded frame (longest side 896): the annotation covers the image's part of it, not the padding
    padded = EpisodeFeatureBuilder(FeatureSpec(), masks, frame_preprocessing="longest896_pad_imagenet", frame_size=896)([row])
    in_frame = padded.features.reference_masks[0, 0]
    assert in_frame[:672].sum() > 0 and in_frame[672:].sum() == 0  # 480 x 640 -> 672 x 896 + padding
    expected = F.interpolate(torch.from_numpy(drawn).float()[None, None], (672, 896), mode="nearest")[0, 0]
    assert torch.equal(in_frame[:672], expected)
