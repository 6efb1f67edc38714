"""From an anomaly map and class probabilities to the prediction row's numbers (README "Architecture": Scores)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from scipy import ndimage

from semclip_batch.config import Thresholds

if TYPE_CHECKING:  # the writer's workers use this module without torch (seconds and ~600 MB to import)
    import torch

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")


@dataclass(frozen=True)
class Regions:
    n_regions: int
    area_px: int
    area_frac: float


def to_mask(amap: np.ndarray) -> np.ndarray:
    """Stored mask = round(255 * A), uint8. ``(H, W)`` float in [0, 1] -> ``(H, W)`` uint8."""
    return np.rint(np.clip(amap, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_mask_tensor(amap: torch.Tensor) -> torch.Tensor:
    """:func:`to_mask` where the map is (on the accelerator, in the model actor): ``(H, W)`` float -> uint8,
    rounding half to even as ``np.rint`` does, so both give the same bytes."""
    import torch

    return torch.round(amap.float().clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def with_defect_view(whole: ArrayT, crop: ArrayT) -> ArrayT:
    """A frame's class probabilities with its defect view: the mean of the whole view's and the crop's (numpy
    or torch, any matching shapes)."""
    return 0.5 * (whole + crop)


def with_region_classes(scores: np.ndarray, probs: np.ndarray, blend: float, seen: np.ndarray | None = None) -> np.ndarray:
    """A frame's class scores (normal first) with the defect classes' share given out anew by the region's
    classes (:class:`~semclip_batch.model.region_classes.RegionClasses`): each of the ``seen`` defect classes (all
    where None) gets ``(1 - blend)`` of its score plus ``blend`` of their summed score times the region's
    probability of it among them; normal's score and the unseen classes' are kept, and the scores still sum as
    before. ``(C,)``, ``(C - 1,)``, ``(C - 1,)`` bool -> ``(C,)`` in ``scores``' dtype."""
    out = scores.astype(np.float64)
    defect = out[1:]  # a view: written below
    if seen is None or bool(seen.all()):  # the probabilities as they are (no renormalising: the same bits)
        defect[:] = (1.0 - blend) * defect + blend * float(defect.sum()) * probs
    else:
        share = probs / max(float(probs[seen].sum()), 1e-300)
        defect[seen] = (1.0 - blend) * defect[seen] + blend * float(defect[seen].sum()) * share[seen]
    return out.astype(scores.dtype)


def anomaly_score(p_normal: float, map_max: float, mode: str = "mean") -> float:
    """``mean``: 1/2 (1 - p(normal)) + 1/2 max A; ``max``: max A only."""
    if mode == "max":
        return float(map_max)
    return 0.5 * (1.0 - float(p_normal)) + 0.5 * float(map_max)


def pixel_level(pixel_threshold: float) -> int:
    """Defect pixels are mask >= ceil(255 * pixel_threshold)."""
    return math.ceil(255.0 * pixel_threshold - 1e-9)


def defect_regions(mask: np.ndarray, pixel_threshold: float, min_region_px: int) -> Regions:
    """8-connected components of defect pixels with at least ``min_region_px`` pixels. ``mask``: ``(H, W)``."""
    defect = mask >= pixel_level(pixel_threshold)
    labels, n = ndimage.label(defect, structure=_EIGHT_CONNECTED)
    if n == 0:
        return Regions(0, 0, 0.0)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    kept = sizes[sizes >= min_region_px]
    area = int(kept.sum())
    return Regions(int(kept.size), area, area / float(mask.size))


def decide(score: float, class_scores: np.ndarray, classes: tuple[str, ...],
           thresholds: Thresholds) -> tuple[bool, str | None]:
    """``is_defect`` = score >= image threshold; the class = best non-normal class when defective."""
    is_defect = score >= thresholds.image
    if not is_defect:
        return False, None
    best = int(np.argmax(class_scores[1:])) + 1
    return True, classes[best]
