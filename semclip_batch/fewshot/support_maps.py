"""The support set's maps as ``run`` would write them, shared by ``train``'s thresholds and its reference fit: which
views ``run`` writes a map for, and pixel counts of maps against the support masks."""

from __future__ import annotations

import torch

from semclip_batch.analysis.metrics import PixelCounts
from semclip_batch.fewshot.trainset import TrainSet
from semclip_batch.methods.decisions import to_mask


def emitted_views(data: TrainSet, rows: torch.Tensor) -> torch.Tensor:
    """Which of ``rows`` (every view of some frames, one copy) hold a map ``run`` writes: a frame's tiles, or its
    whole view where it has none (the whole view of a tiled frame gives class scores only)."""
    if data.frame is None:
        return torch.ones(len(rows), dtype=torch.bool)
    _, inverse, counts = data.frame[rows].unique(return_inverse=True, return_counts=True)
    return ~(data.first_views()[rows] & (counts[inverse] > 1))


def pixel_counts(maps: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> PixelCounts:
    """Per-level counts of the stored-mask form of ``maps`` against ``masks`` >= 0.5, rows with a mask only."""
    counts = PixelCounts()
    for m, t, has in zip(maps, masks, has_mask, strict=True):
        if has:
            counts.add(to_mask(m.numpy()), t.float().numpy() >= 0.5, regions=False)
    return counts


def map_auroc(maps: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> float:
    """Pixel AUROC of ``maps`` against ``masks`` (rows with a mask only); 0 when undefined."""
    return pixel_counts(maps, masks, has_mask).auroc() or 0.0
