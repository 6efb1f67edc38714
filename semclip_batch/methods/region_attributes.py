"""The defect region at the map's maximum and its attributes, as a review tool's automatic defect classification
reads a defect (rule 22 in docs/quality.md): what :class:`~semclip_batch.model.region_classes.RegionClasses`
classifies. numpy and scipy only: the writer's side of the pipeline and ``train`` use it without a device."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SHARE = 0.8  # the region: the stored map at or above this share of its maximum (chosen on validation lot 6027)
RING_PX = 4  # the ring around the region its contrast is measured against
N_ATTRIBUTES = 10
_EIGHT = np.ones((3, 3), dtype=bool)


def region_at_max(mask: np.ndarray, share: float = SHARE) -> np.ndarray:
    """The 8-connected component of ``mask >= share * max`` holding the map's (first) maximum; a map that is zero
    everywhere: that pixel alone. ``(H, W)`` (the stored uint8 mask, or any map) -> ``(H, W)`` bool."""
    y, x = np.unravel_index(int(np.argmax(mask)), mask.shape)
    peak = float(mask[y, x])
    region = np.zeros(mask.shape, dtype=bool)
    if peak > 0:
        labels, _ = ndimage.label(mask >= share * peak, structure=_EIGHT)
        region = labels == labels[y, x]
    region[y, x] = True
    return region


def attributes(levels: np.ndarray, region: np.ndarray, full_scale: float = 1.0) -> np.ndarray:
    """Ten attributes of a region of a frame's grey levels (``levels / full_scale`` in [0, 1]; only the pixels
    read are converted): log area, log elongation (the ratio of the principal variances of its pixels'
    coordinates), its mean, median, brightest and darkest levels less the mean of a :data:`RING_PX`-px ring around
    it, the spread inside and in the ring, the share of its bounding box it fills, and the log of the box's longer
    side. ``(H, W)`` each (``region`` not empty) -> ``(10,)`` float64."""
    ys, xs = np.nonzero(region)
    # the ring within the region's box grown by RING_PX + 1 px: the same pixels as on the whole frame, at its cost
    y0, x0 = max(int(ys.min()) - RING_PX - 1, 0), max(int(xs.min()) - RING_PX - 1, 0)
    y1, x1 = int(ys.max()) + RING_PX + 2, int(xs.max()) + RING_PX + 2
    box = region[y0:y1, x0:x1]
    ring = ndimage.binary_dilation(box, structure=_EIGHT, iterations=RING_PX) & ~box
    inside = levels[region].astype(np.float64) / full_scale
    around = (levels[y0:y1, x0:x1][ring] if ring.any() else levels.ravel()).astype(np.float64) / full_scale
    spread = np.cov(np.stack([ys, xs]).astype(np.float64)) if len(ys) > 2 else np.eye(2)
    major, minor = np.sort(np.linalg.eigvalsh(spread))[::-1].clip(1e-3)
    height, width = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    base = float(around.mean())
    return np.array([np.log(len(ys)), np.log(major / minor), inside.mean() - base, np.median(inside) - base,
                     inside.max() - base, inside.min() - base, inside.std(), around.std(),
                     len(ys) / (height * width), np.log(max(height, width))], dtype=np.float64)


def frame_attributes(levels: np.ndarray, mask: np.ndarray, share: float = SHARE) -> np.ndarray:
    """:func:`attributes` of the region at the stored mask's maximum. ``levels``: the frame's uint8 levels as the
    decode stage ships them; ``mask``: its stored uint8 map; both ``(H, W)`` -> ``(10,)``."""
    return attributes(levels, region_at_max(mask, share), full_scale=255.0)
