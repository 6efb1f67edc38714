"""Evaluation metrics (SEMCLIP.md "Metrics"), exact and streaming for uint8 maps.

Pixel curves come from per-level counts: for every grey level 0..255, how many truth-positive and
truth-negative pixels the stored masks put at that level. A pixel is predicted positive at threshold t when
its level is >= t, so every ROC / PR point is a suffix sum. No image's pixels are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
from scipy import ndimage

LEVELS = 256
AUPRO_MAX_FPR = 0.3
_EIGHT = np.ones((3, 3), dtype=bool)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count 1/2), or None when only one class is present."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def _suffix(counts: np.ndarray) -> np.ndarray:
    """``out[t] = counts[t:].sum()`` for t in 0..256 (t = 256: nothing predicted)."""
    return np.concatenate([np.cumsum(counts[::-1])[::-1], [0]]).astype(np.float64)


@dataclass
class PixelCounts:
    """Streaming per-level counts over many (predicted uint8 mask, truth bool mask) pairs."""

    pos: np.ndarray = field(default_factory=lambda: np.zeros(LEVELS, np.int64))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(LEVELS, np.int64))
    region_overlap: np.ndarray = field(default_factory=lambda: np.zeros(LEVELS + 1, np.float64))
    n_regions: int = 0

    def add(self, pred: np.ndarray, truth: np.ndarray, regions: bool = True) -> None:
        """``pred``: ``(H, W)`` uint8 map; ``truth``: ``(H, W)`` bool. Without ``regions`` only the pixel
        counts (AUROC, F1) are kept, not the per-region overlaps AUPRO needs (labelling them is most of the cost)."""
        self.pos += np.bincount(pred[truth].ravel(), minlength=LEVELS)
        self.neg += np.bincount(pred[~truth].ravel(), minlength=LEVELS)
        if not regions:
            return
        labels, n = ndimage.label(truth, structure=_EIGHT)
        if n == 0:
            return
        # per region, per level: counts -> share of the region at level >= t
        flat = labels.ravel().astype(np.int64) * LEVELS + pred.ravel()
        hist = np.bincount(flat, minlength=(n + 1) * LEVELS).reshape(n + 1, LEVELS)[1:]
        suffix = np.concatenate([np.cumsum(hist[:, ::-1], axis=1)[:, ::-1], np.zeros((n, 1))], axis=1)
        self.region_overlap += (suffix / hist.sum(axis=1, keepdims=True)).sum(axis=0)
        self.n_regions += n

    def auroc(self) -> float | None:
        tp, fp = _suffix(self.pos), _suffix(self.neg)
        if tp[0] == 0 or fp[0] == 0:
            return None
        tpr, fpr = tp[::-1] / tp[0], fp[::-1] / fp[0]  # thresholds 256 -> 0: rates increasing
        return float(np.trapezoid(tpr, fpr))

    def f1_curve(self) -> np.ndarray:
        """Pixel F1 when predicting ``level >= t``, for t in 0..256: 2 TP / (predicted + positives)."""
        tp, fp = _suffix(self.pos), _suffix(self.neg)
        return 2 * tp / np.maximum(tp + fp + tp[0], 1.0)

    def f1_max(self) -> float | None:
        if self.pos.sum() == 0:
            return None
        return float(self.f1_curve().max())

    def aupro(self, max_fpr: float = AUPRO_MAX_FPR) -> float | None:
        """Area under PRO(FPR) for FPR in [0, max_fpr], divided by max_fpr."""
        fp = _suffix(self.neg)
        if self.n_regions == 0 or fp[0] == 0:
            return None
        fpr = (fp / fp[0])[::-1]
        pro = (self.region_overlap / self.n_regions)[::-1]
        return pro_area(fpr, pro, max_fpr)


def pro_area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area of a PRO curve (fpr increasing) cut at ``max_fpr`` (linear interpolation), normalised."""
    keep = fpr <= max_fpr
    xs, ys = list(fpr[keep]), list(pro[keep])
    beyond = np.nonzero(~keep)[0]
    if len(beyond):
        i = beyond[0]
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        xs.append(max_fpr)
        ys.append(y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0))
    return float(np.trapezoid(ys, xs) / max_fpr)


class Confusion(TypedDict):
    labels: list[str]
    matrix: list[list[int]]  # [truth][predicted]


class ClassificationReport(TypedDict):
    accuracy: float | None
    macro_precision: float | None
    macro_recall: float | None
    macro_F1: float | None
    per_class: dict[str, dict[str, float | int | None]]  # precision, recall, F1, support
    confusion: Confusion


def classification_report(truth: list[str], predicted: list[str], classes: list[str]) -> ClassificationReport:
    """Accuracy, macro precision / recall / F1 (over classes present in truth), per-class figures, confusion."""
    labels = list(classes) + sorted(set(truth) - set(classes))
    index = {c: i for i, c in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), np.int64)
    for t, p in zip(truth, predicted, strict=True):
        matrix[index[t], index[p]] += 1
    per_class: dict[str, dict[str, float | int | None]] = {}
    for c in labels:
        i = index[c]
        tp, support, predicted_n = int(matrix[i, i]), int(matrix[i].sum()), int(matrix[:, i].sum())
        precision = tp / predicted_n if predicted_n else None
        recall = tp / support if support else None
        f1 = None if precision is None or recall is None else (
            2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0)
        if precision is None and recall is not None:
            f1 = 0.0
        per_class[c] = {"precision": precision, "recall": recall, "F1": f1, "support": support}
    present = [c for c in labels if per_class[c]["support"]]
    n = len(truth)

    def macro(key: str) -> float | None:
        return float(np.mean([per_class[c][key] or 0.0 for c in present])) if present else None

    return {
        "accuracy": float(np.trace(matrix) / n) if n else None,
        "macro_precision": macro("precision"), "macro_recall": macro("recall"), "macro_F1": macro("F1"),
        "per_class": per_class, "confusion": {"labels": labels, "matrix": matrix.tolist()},
    }
