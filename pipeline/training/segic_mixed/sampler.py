"""The ``segic_mixed`` sampler (worker side): the epoch table of mixed samples, and batches built
from their rows alone (module docstring of :mod:`pipeline.training.segic_mixed`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline.data.base import IGNORE_INDEX
from pipeline.errors import ConfigError
from pipeline.store.reader import open_store
from pipeline.training.config import TrainConfig
from pipeline.training.episode_features import EpisodeBatch
from pipeline.training.features import expected_key
from pipeline.training.prepared import PreparedFold
from pipeline.training.segic_mixed.rendering import Side, _to_frame, render_masks
from pipeline.training.segic_mixed.part import MixPart, backbone_preprocessing, load_plans, read_parts
from pipeline.training.views import base_view, draw_view, nearest_view
from refseg_models.frames import Frame, frame_size_of, is_padded
from refseg_models.modeling.inputs import EpisodeFeatures, InstructionSet
from refseg_models.modeling.segic_instructions import masks_to_boxes

PLAIN = -1  # the variant "plain image" (view index -1)
_TABLE_SALT = 0x5E61C


class SegICMixedSampler:
    """The ``segic_mixed`` sampler (module docstring)."""

    def __init__(self, cfg: TrainConfig, data: PreparedFold, model: Any, frozen: Any) -> None:
        self.cfg, self.data, self.mix = cfg, data, cfg.mix
        self.key = model.feature_key
        self.frame_size = int(model.frame_size() or 0)
        self.preprocessing = backbone_preprocessing(cfg)
        if not self.frame_size:
            self.frame_size = frame_size_of(self.preprocessing)
        parts = read_parts(cfg, data.artifact)
        stores: dict[str, Any] = {}
        fold_store = None if frozen is None else frozen.stores.get("backbone")
        for part in parts:
            if part.store_uri not in stores:
                if fold_store is not None and part.store_uri == cfg.backbone.store:
                    stores[part.store_uri] = fold_store
                else:
                    expect = replace(expected_key(cfg, "backbone"), dataset=part.feature_dataset)
                    stores[part.store_uri] = open_store(part.store_uri, expect=expect)
            part.store = stores[part.store_uri]
        load_plans(parts)
        self.parts = parts
        self.part_index = {part.name: index for index, part in enumerate(parts)}
        for part in parts:
            if not part.semantic and max(part.views, 1) * (2 if self.mix.feature_flip_prob > 0 else 1) < 2:
                raise ConfigError(
                    f"mix source {part.name!r}: instance samples need two distinct (view, flip) variants of an "
                    "image: cache views >= 2, or allow feature flips"
                )
        weights = np.array([part.spec.weight for part in parts], dtype=np.float64)
        self.weights = weights / weights.sum()

    # -- the epoch table ----------------------------------------------------------------------------
    def samples_per_epoch(self) -> int:
        wanted = self.mix.samples_per_epoch or self.cfg.recipe.samples_per_epoch
        if not wanted:
            raise ConfigError("the segic_mixed sampler needs samples_per_epoch (mix or recipe)")
        batch = self.cfg.recipe.batch_size
        if wanted < batch:
            raise ConfigError(f"an epoch of {wanted} samples is less than one global batch ({batch})")
        return (wanted // batch) * batch

    def epoch_table(self, epoch: int, num_samples: int) -> pa.Table:
        """Epoch ``epoch``'s samples: a function of (seed, epoch) and the mix only."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(self.cfg.seed), int(epoch), _TABLE_SALT])))
        n = int(num_samples)
        which = rng.choice(len(self.parts), size=n, p=self.weights)
        seeds = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
        columns: dict[str, list] = {name: [None] * n for name in (
            "image_id", "class_id", "reference_id", "target_view", "target_flip", "target_warp",
            "reference_view", "reference_flip", "reference_warp")}
        for index, part in enumerate(self.parts):
            rows = np.flatnonzero(which == index)
            if not len(rows):
                continue
            drawn = self._draw(part, len(rows), rng)
            for name, values in drawn.items():
                for row, value in zip(rows.tolist(), values):
                    columns[name][row] = value
        return pa.table({
            "episode_id": pa.array(np.arange(n, dtype=np.int64)),
            "source": pa.array([self.parts[i].name for i in which.tolist()], pa.string()),
            "kind": pa.array(["semantic" if self.parts[i].semantic else "instance" for i in which.tolist()], pa.string()),
            "image_id": pa.array(columns["image_id"], pa.string()),
            "class_id": pa.array(columns["class_id"], pa.int32()),
            "reference_id": pa.array(columns["reference_id"], pa.string()),
            "target_view": pa.array(columns["target_view"], pa.int16()),
            "target_flip": pa.array(columns["target_flip"], pa.bool_()),
            "target_warp": pa.array(columns["target_warp"], pa.bool_()),
            "reference_view": pa.array(columns["reference_view"], pa.int16()),
            "reference_flip": pa.array(columns["reference_flip"], pa.bool_()),
            "reference_warp": pa.array(columns["reference_warp"], pa.bool_()),
            "sample_seed": pa.array(seeds),
            "epoch": pa.array(np.full(n, epoch, dtype=np.int32)),
        })

    def _draw(self, part: MixPart, m: int, rng: np.random.Generator) -> dict[str, list]:
        mix = self.mix
        u = rng.random((m, 3))
        if part.spec.kind == "coco_semantic":  # class first, then an image of it (authors' DatasetCOCO)
            classes = sorted(part.class_images)
            picked = [classes[int(x * len(classes))] for x in u[:, 0]]
            images, references = [], []
            for c, a, b in zip(picked, u[:, 1], u[:, 2]):
                pool = part.class_images[c]
                i = int(a * len(pool))
                j = int(b * (len(pool) - 1))
                images.append(pool[i])
                references.append(pool[j + (j >= i)])
        elif part.spec.kind in ("ade20k_semantic", "fss1000_semantic"):
            # image first, then one of its classes (authors' SemADE; DatasetFSS: an image of the split,
            # its folder's class, another image of that folder as the reference)
            images, picked, references = [], [], []
            for a, b, c in u:
                image = part.images[int(a * len(part.images))]
                cls = part.image_classes[image][int(b * len(part.image_classes[image]))]
                pool = part.class_images[cls]
                i = part.position(cls, image)
                j = int(c * (len(pool) - 1))
                images.append(image)
                picked.append(cls)
                references.append(pool[j + (j >= i)])
        else:  # instance data: an image, the reference is another view of it
            images = [part.images[int(a * len(part.images))] for a in u[:, 0]]
            picked = [-1] * m
            references = list(images)
        out: dict[str, list] = {"image_id": images, "class_id": [int(c) for c in picked], "reference_id": references}
        flips = rng.random((m, 2)) < mix.feature_flip_prob
        warps = rng.random((m, 2)) < mix.warp_prob
        if part.semantic:
            variants = 1 + part.views  # the plain image and the cached views
            drawn = rng.integers(0, variants, size=(m, 2)) - 1
        else:
            variants = part.views or 1
            drawn = rng.integers(0, variants, size=(m, 2)) - (0 if part.views else 1)
            # two DISTINCT (view, flip) variants of the image (redrawn until they differ), unless a
            # side is a fresh (warped) view
            while True:
                same = (drawn[:, 0] == drawn[:, 1]) & (flips[:, 0] == flips[:, 1]) & ~warps.any(axis=1)
                if not same.any():
                    break
                k = int(same.sum())
                drawn[same] = rng.integers(0, variants, size=(k, 2)) - (0 if part.views else 1)
                flips[same] = rng.random((k, 2)) < mix.feature_flip_prob
        out.update(
            target_view=drawn[:, 0].tolist(), reference_view=drawn[:, 1].tolist(),
            target_flip=flips[:, 0].tolist(), reference_flip=flips[:, 1].tolist(),
            target_warp=warps[:, 0].tolist(), reference_warp=warps[:, 1].tolist(),
        )
        return out

    # -- building batches ---------------------------------------------------------------------------
    def _side(self, part: MixPart, image_id: str, view: int, flip: bool, warp: bool, rng: np.random.Generator) -> Side:
        if warp:
            height, width = part.size(image_id)
            fresh = draw_view(rng, image_id, -2, height, width, part.augmentation)
            cached = list(part.plan.get(image_id, []))
            if part.semantic or not part.views:
                cached.append(base_view(image_id, height, width, frame_size_of(self.preprocessing), is_padded(self.preprocessing)))
            source = nearest_view(fresh, cached)
            store_id = image_id if source.view < 0 else source.view_id
            return Side(part, image_id, store_id, fresh, warp_from=source)
        if view == PLAIN:
            return Side(part, image_id, image_id, None, feature_flip=flip)
        cached = part.plan[image_id][view]
        return Side(part, image_id, cached.view_id, replace(cached, flip=cached.flip != flip), feature_flip=flip)

    def _render(self, side: Side, masks: torch.Tensor, fill: int, valid: torch.Tensor | None) -> torch.Tensor:
        """``N x H x W`` uint8 masks at the source's resolution -> ``N x S x S`` in the model's frame."""
        if side.view is None:
            out = _to_frame(masks, Frame.of(self.preprocessing, self.frame_size, tuple(masks.shape[1:])), fill)
            out = out.flip(-1) if side.feature_flip else out
        else:
            canvas = render_masks(masks, side.view, fill)
            out = _to_frame(canvas, Frame.of(self.preprocessing, self.frame_size, tuple(canvas.shape[1:])), fill)
        if valid is not None:
            out[:, ~self._cells_to_frame(valid)] = fill
        return out

    def _cells_to_frame(self, valid: torch.Tensor) -> torch.Tensor:
        return F.interpolate(valid[None, None].float(), (self.frame_size, self.frame_size), mode="nearest")[0, 0] > 0.5

    def resolve(self, rows: Sequence[dict]) -> list[dict[str, Any]]:
        """The samples of ``rows``: per row its sides' features, the source-resolution masks of every
        instruction (targets {0, 1, 255}, references {0, 1}) and their rendering in the model's frame."""
        plans = []
        for row in rows:
            part = self.parts[self.part_index[row["source"]]]
            rng = np.random.Generator(np.random.PCG64(int(row["sample_seed"])))
            target = self._side(part, row["image_id"], row["target_view"], row["target_flip"], row["target_warp"], rng)
            reference = self._side(part, row["reference_id"], row["reference_view"], row["reference_flip"], row["reference_warp"], rng)
            plans.append((row, part, rng, target, reference))
        raw = self._read([(p[1], p[3].store_id) for p in plans] + [(p[1], p[4].store_id) for p in plans])
        samples = []
        for index, (row, part, rng, target, reference) in enumerate(plans):
            t_features, t_valid = target.features(raw[index], self.key)
            r_features, r_valid = reference.features(raw[len(plans) + index], self.key)
            sample = {"row": row, "part": part, "target_features": t_features, "reference_features": r_features}
            ones = torch.ones(1, *part.size(row["reference_id"]), dtype=torch.uint8)
            sample["reference_valid"] = self._render(reference, ones, 0, r_valid)[0]
            if part.semantic:
                self._semantic(sample, part, row, target, reference, t_valid, r_valid)
            else:
                self._instances(sample, part, row, rng, target, reference, t_valid, r_valid)
            samples.append(sample)
        return samples

    def _read(self, wanted: list[tuple[MixPart, str]]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(wanted)
        by_store: dict[int, list[int]] = {}
        for index, (part, _) in enumerate(wanted):
            by_store.setdefault(id(part.store), []).append(index)
        for indices in by_store.values():
            store = wanted[indices[0]][0].store
            arrays = store.get_many([wanted[i][1] for i in indices], [self.key])
            for i, array in zip(indices, arrays):
                out[i] = torch.from_numpy(np.asarray(array[self.key], dtype=np.float32))
        return out  # type: ignore[return-value]

    def _semantic(self, sample, part, row, target, reference, t_valid, r_valid) -> None:
        class_id = int(row["class_id"])
        label = torch.from_numpy(np.array(part.masks.get(row["image_id"], class_id), dtype=np.uint8))[None]
        ref = torch.from_numpy(np.array(part.masks.get(row["reference_id"], class_id) == 1, dtype=np.uint8))[None]
        present = {int(part.class_keys[c]) for c in part.present[row["image_id"]]}
        negatives = tuple(sorted(part.candidate_keys() - present)) if part.labels_every_class else ()
        sample.update(
            class_ids=[class_id], keys=[int(part.class_keys[class_id])],
            target_labels=label, reference_labels=ref,
            target_frame=self._render(target, label, IGNORE_INDEX, t_valid),
            reference_frame=self._render(reference, ref, 0, r_valid),
            negative_classes=negatives,
        )

    def _instances(self, sample, part, row, rng, target, reference, t_valid, r_valid) -> None:
        mix = self.mix
        instances = part.instances[row["image_id"]]  # its usable instances, in the annotation file's order
        # bounded work per sample: decode at most 2 x instances_drawn random instances
        order = rng.permutation(len(instances))[: 2 * mix.instances_drawn]
        chosen = [instances[i] for i in order.tolist()]
        masks = torch.from_numpy(np.stack([instance.mask() for instance in chosen]))
        t_frame = self._render(target, masks, IGNORE_INDEX, t_valid)
        r_frame = self._render(reference, masks, 0, r_valid)
        usable = ((t_frame == 1).flatten(1).sum(1) >= mix.min_instance_pixels) & (
            (r_frame == 1).flatten(1).sum(1) >= mix.min_instance_pixels)
        candidates = torch.nonzero(usable).flatten().tolist()
        count = min(max(1, int(rng.integers(0, mix.instances_drawn))), mix.max_instances)
        picked = [candidates[i] for i in rng.permutation(len(candidates))[:count].tolist()] if candidates else [0]
        sample.update(
            class_ids=[chosen[i].class_id for i in picked],
            keys=[-1] * len(picked),  # the authors queue semantic samples only
            target_labels=masks[picked], reference_labels=masks[picked],
            target_frame=t_frame[picked], reference_frame=r_frame[picked],
            negative_classes=(),  # queue negatives are for semantic samples (authors)
        )

    def build(self, rows: Sequence[dict]) -> EpisodeBatch:
        samples = self.resolve(rows)
        b, s = len(samples), self.frame_size
        n = max(len(sample["keys"]) for sample in samples)
        targets = torch.full((b, n, s, s), IGNORE_INDEX, dtype=torch.uint8)
        instructions = torch.zeros(b, n, 1, s, s, dtype=torch.uint8)
        classes = torch.full((b, n), -1, dtype=torch.long)
        for i, sample in enumerate(samples):
            count = len(sample["keys"])
            targets[i, :count] = sample["target_frame"]
            instructions[i, :count, 0] = sample["reference_frame"]
            classes[i, :count] = torch.as_tensor(sample["keys"], dtype=torch.long)
        boxes = masks_to_boxes((targets == 1).flatten(0, 1).float()).view(b, n, 4)
        instruction_set = InstructionSet(
            masks=instructions,
            counts=tuple(len(sample["keys"]) for sample in samples),
            boxes=boxes,
            classes=classes,
            negative_classes=tuple(sample["negative_classes"] for sample in samples),
            reference_valid=torch.stack([sample["reference_valid"] for sample in samples])[:, None].float(),
        )
        features = EpisodeFeatures(
            reference_masks=instructions[:, 0].float(),
            target_backbone={self.key: torch.stack([sample["target_features"] for sample in samples])},
            reference_backbone={self.key: torch.stack([sample["reference_features"] for sample in samples])[:, None]},
            target_boxes=boxes[:, 0],
            instructions=instruction_set,
            meta={"episode_ids": [int(sample["row"]["episode_id"]) for sample in samples],
                  "sources": [sample["row"]["source"] for sample in samples]},
        )
        return EpisodeBatch(
            features, targets, [int(sample["row"]["episode_id"]) for sample in samples],
            [int(sample["class_ids"][0]) if sample["part"].semantic else -1 for sample in samples],
        )

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        coco = next((p for p in self.parts if p.spec.kind == "coco_semantic"), None)
        out["data/train_pairs"] = float(sum(len(v) for v in coco.class_images.values())) if coco else 0.0
        for part, weight in zip(self.parts, self.weights):
            out[f"data/mix/{part.name}/weight"] = float(weight)
            out[f"data/mix/{part.name}/images"] = float(len(part.sampled_images()))
            out[f"data/mix/{part.name}/classes"] = float(len(part.usable_classes))
        return out
