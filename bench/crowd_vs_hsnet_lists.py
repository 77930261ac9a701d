"""Which crowd rule reproduces the official HSNet COCO-20i lists? (numbers in docs/evaluation.md)

    .venv/bin/python bench/crowd_vs_hsnet_lists.py [--coco ../shared/data/coco_mini] [--lists ../shared/data/splits/coco20i_hsnet]

HSNet's lists keep an (image, class) pair when the class has >= 2*32*32 pixels in the semantic label
PNG (PFENet's rule). For every image of the dataset that the lists cover, label maps are painted
from the COCO json under several crowd rules (annotations in file order, later ones overwrite), and
each rule's pair decisions are compared with the lists.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.base import MIN_PAIR_PIXELS  # noqa: E402
from pipeline.data.splits import coco_image_id, read_coco20i_list  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RULES = {
    "non-crowd annotations only, crowd pixels left 0 (background)": "skip",
    "crowd annotations painted as 255 (ignore)": "ignore",
    "crowd annotations painted as 0": "zero",
    "crowd annotations painted as the class (foreground)": "class",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", type=Path, default=SHARED / "coco_mini")
    parser.add_argument("--lists", type=Path, default=SHARED / "splits" / "coco20i_hsnet")
    args = parser.parse_args()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(args.coco / "instances.json"))
    rank = {category: index for index, category in enumerate(sorted(coco.getCatIds()))}
    order = {a["id"]: i for i, a in enumerate(json.loads((args.coco / "instances.json").read_text())["annotations"])}
    listed, covered = set(), set()
    for split in ("trn", "val"):
        for fold in range(4):
            for class_id, names in read_coco20i_list(args.lists, split, fold).items():
                for name in names:
                    covered.add(coco_image_id(name))
                    listed.add((coco_image_id(name), class_id))
    images = sorted(set(coco.getImgIds()) & covered)
    agree = dict.fromkeys(RULES, 0)
    union_agree = pairs = 0
    for image_id in images:
        info = coco.imgs[image_id]
        annotations = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: order[a["id"]])
        masks = [(rank[a["category_id"]], bool(a.get("iscrowd", 0)), coco.annToMask(a).astype(bool)) for a in annotations]
        for name, rule in RULES.items():
            label = np.zeros((info["height"], info["width"]), np.uint8)
            for class_id, crowd, mask in masks:
                if crowd and rule == "skip":
                    continue
                label[mask] = {"ignore": 255, "zero": 0}.get(rule, class_id + 1) if crowd else class_id + 1
            for class_id in {class_id for class_id, _, _ in masks}:
                agree[name] += (int((label == class_id + 1).sum()) >= MIN_PAIR_PIXELS) == ((image_id, class_id) in listed)
        for class_id in {class_id for class_id, _, _ in masks}:
            own = np.zeros((info["height"], info["width"]), bool)
            for other, crowd, mask in masks:
                if other == class_id and not crowd:
                    own |= mask
            pairs += 1
            union_agree += (int(own.sum()) >= MIN_PAIR_PIXELS) == ((image_id, class_id) in listed)
    print(f"{len(images)} images covered by the lists, {pairs} (image, class) pairs\n")
    print("| label map (annotations painted in file order) | pairs agreeing with the official lists |")
    print("|---|---|")
    for name, count in agree.items():
        print(f"| {name} | {count} / {pairs} |")
    print(f"| refseg's per-class masks (union of non-crowd instances, no overwriting) | {union_agree} / {pairs} |")


if __name__ == "__main__":
    main()
