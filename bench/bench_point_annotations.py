"""What single-pixel point annotations become on a method's 64 x 64 grid (docs/methods.md).

The authors' reference points are single object pixels (20 at test); VRP-SAM / ProSAM / FCP
nearest-resize the reference mask to their 64 x 64 feature grid, where most single pixels vanish.
This measures it on real coco_mini masks, as refseg's episodes draw them (in the authors' 512 x 512
frame: the mask nearest-resized to 512, points drawn there; then nearest to 64 x 64), for both
point styles.

    python bench/bench_point_annotations.py --coco ../shared/data/coco_mini --instances 300
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import CocoInstances  # noqa: E402
from refseg_models.annotations import reference_annotation  # noqa: E402


def on_grid(mask: np.ndarray, frame: int = 512, grid: int = 64) -> torch.Tensor:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    t = F.interpolate(t, size=(frame, frame), mode="nearest")
    return F.interpolate(t, size=(grid, grid), mode="nearest")[0, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", default=str(Path(__file__).resolve().parents[2] / "shared/data/coco_mini"))
    parser.add_argument("--instances", type=int, default=300, help="(image, class) masks to draw on")
    args = parser.parse_args()
    coco = CocoInstances(Path(args.coco) / "instances.json", Path(args.coco) / "images", verbose=False)
    pairs = [(i, c) for i in coco.image_ids() for c in coco.classes_in_image(i)][: args.instances]
    rows = {}
    for style in ("pixel", "disc"):
        drawn, survived, empty, cells = [], [], 0, []
        for seed, (image_id, class_id) in enumerate(pairs):
            mask = coco.class_mask(image_id, class_id)
            points = reference_annotation(mask, "points", seed, point_style=style)
            grid = on_grid(points)
            count = int(points.sum()) if style == "pixel" else 20
            drawn.append(count)
            kept = int(grid.sum())
            cells.append(kept)
            empty += kept == 0
            if style == "pixel":
                survived.append(kept / max(count, 1))
        rows[style] = {
            "masks": len(pairs), "mean_points": float(np.mean(drawn)), "mean_cells_on_grid": float(np.mean(cells)),
            "empty_on_grid": empty / len(pairs),
            "point_survival": float(np.mean(survived)) if survived else None,
        }
    print(f"{len(pairs)} coco_mini (image, class) masks, 20 test points each (fewer on tiny objects), 512 frame -> 64 grid")
    for style, row in rows.items():
        extra = f", {100 * row['point_survival']:.1f}% of the points survive" if row["point_survival"] is not None else ""
        print(f"  {style:5s}: {row['mean_cells_on_grid']:.2f} grid cells on average{extra}; "
              f"{100 * row['empty_on_grid']:.1f}% of references are EMPTY on the grid")


if __name__ == "__main__":
    main()
