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
    """Stored mask = round(255 * A), uint8. ``(H, W)`` float in [0, 1] -> ``(H, W)`` uint8; a NaN level is stored
    as 0 (its cast is otherwise undefined: 0 on this CPU, with a warning)."""
    return np.rint(np.clip(np.nan_to_num(amap, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)


def to_mask_tensor(amap: torch.Tensor) -> torch.Tensor:
    """:func:`to_mask` where the map is (on the accelerator, in the model actor): ``(H, W)`` float -> uint8,
    rounding half to even as ``np.rint`` does, so both give the same bytes (NaN as 0 too)."""
    import torch

    return torch.round(torch.nan_to_num(amap.float(), nan=0.0).clamp(0.0, 1.0) * 255.0).to(torch.uint8)


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


# rule 29 (docs/quality.md): the temperature of the image decision's log odds in the written class scores, as rule 28's
# (chosen on no data): each 0.05 below the threshold multiplies normal's odds by e
DECISION_TEMPERATURE = 0.05
# the run record's ``class_scores``: "weighed" (rule 29) or "model" (the scores the model gave, as before rule 29)
CLASS_SCORES_WEIGHED = "weighed"
CLASS_SCORES_MODEL = "model"
_TINY = 1e-12


def weighs_class_scores(thresholds: Thresholds) -> bool:
    """Whether ``run`` writes :func:`weighed_class_scores`: where its image threshold is a checkpoint's (calibrated
    by ``train``) or given as a flag. Under the default threshold (zero-shot without a flag) the model's scores stay."""
    return thresholds.source.get("image", "default") != "default"


def class_scores_kind(thresholds: Thresholds) -> str:
    """The run record's ``class_scores``: which class scores ``run`` writes under these thresholds."""
    return CLASS_SCORES_WEIGHED if weighs_class_scores(thresholds) else CLASS_SCORES_MODEL


def weighed_class_scores(class_scores: np.ndarray, score: float, image_threshold: float) -> np.ndarray:
    """The class scores ``run`` writes where :func:`weighs_class_scores` (rule 29): ``[q, (1 - q) * shares]``, the
    defect classes keeping their shares of the model's defect scores (uniform where those are all 0), and normal's
    log odds against the best defect class the model's, ``log(p0 / max pk)``, plus the image decision's
    ``(threshold - score) / DECISION_TEMPERATURE``. So the scores sum to 1 and the arg-max is normal where that sum
    is positive (up to float32 rounding at a tie): the classifier's say, moved by how far the row's
    ``anomaly_score`` is from the threshold (each ``DECISION_TEMPERATURE`` multiplies normal's odds by e). A row
    without a finite score, or with normal alone, keeps the model's scores. ``class_scores``: ``(C,)``, normal
    first; returns float32 ``(C,)``."""
    p = np.nan_to_num(np.asarray(class_scores, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, None)
    defects = p[1:]
    if defects.size == 0 or not math.isfinite(score):
        return np.asarray(class_scores, dtype=np.float32)
    total = float(defects.sum())
    shares = defects / total if total > 0 else np.full(defects.shape, 1.0 / max(defects.size, 1))
    log_odds = (math.log(max(float(p[0]), _TINY) / max(float(defects.max(initial=0.0)), _TINY))
                + (image_threshold - score) / DECISION_TEMPERATURE)
    # q / (1 - q) = max(shares) * exp(log_odds), in a form that neither overflows nor loses q near 0 or 1
    z = math.log(max(float(shares.max(initial=0.0)), _TINY)) + log_odds
    q = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return np.concatenate([[q], (1.0 - q) * shares]).astype(np.float32)
