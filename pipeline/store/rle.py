"""COCO's compressed run-length encoding of a binary mask, decoded without pycocotools.

The driver stores instance masks as the RLE strings pycocotools makes (``COCO.annToRLE``: polygons
merged, crowd RLE compressed) and the training workers decode them here, bit for bit what
``pycocotools.mask.decode`` gives (tested against it on every coco_mini annotation), so a worker
never imports pycocotools or reads an annotation file.

Format (pycocotools ``maskApi.c``: ``rleToString`` / ``rleFrString``): run lengths of alternating 0
and 1 pixels (starting with 0) over the mask in column-major order; each count from the third on is
stored as the difference to the count two before it; each value in 5-bit groups, least significant
first, as characters ``48 + group`` with bit 0x20 set while more groups follow and bit 0x10 of the
last group the sign.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import DataError


def rle_counts(encoded: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string."""
    counts: list[int] = []
    position, length = 0, len(encoded)
    while position < length:
        value, shift, more = 0, 0, True
        while more:
            if position >= length:
                raise DataError(f"RLE string ends inside a count: {encoded[:40]!r}")
            group = ord(encoded[position]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(encoded: str, height: int, width: int) -> np.ndarray:
    """A compressed COCO RLE string -> ``height x width`` uint8 {0, 1} (``pycocotools.mask.decode``)."""
    counts = np.asarray(rle_counts(encoded), dtype=np.int64)
    if (counts < 0).any() or counts.sum() != height * width:
        raise DataError(f"RLE of a {height} x {width} mask covers {int(counts.sum())} pixels (or has a negative run)")
    values = np.arange(len(counts), dtype=np.int64) % 2
    flat = np.repeat(values.astype(np.uint8), counts)
    return np.ascontiguousarray(flat.reshape(width, height).T)
