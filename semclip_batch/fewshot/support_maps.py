"""The support set's maps as ``run`` would write them, shared by ``train``'s thresholds and its reference fit: which
views ``run`` writes a map for, pixel counts of maps against the support masks, and the image and pixel thresholds
fitted on them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from semclip_batch.analysis.metrics import PixelCounts
from semclip_batch.config import DEFAULT_MIN_REGION_PX, PreprocessConfig
from semclip_batch.fewshot.trainset import TrainSet
from semclip_batch.methods.decisions import anomaly_score, to_mask
from semclip_batch.methods.features import Features
from semclip_batch.methods.registry import Scorer, get_method, score_features
from semclip_batch.model import SemClipOutput
from semclip_batch.model.reference import ReferenceScorer


@dataclass(frozen=True)
class SupportMaps:
    """Support views as ``run`` scores them, kept for a later step: each view's frame (a position in the rows it
    was loaded from), label, map and class probabilities, and the preprocessing that cut the views."""

    frame: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)
    maps: torch.Tensor  # (N, S, S)
    class_probs: torch.Tensor  # (N, C)
    prep: PreprocessConfig

    @classmethod
    def of(cls, data: TrainSet, out: SemClipOutput, prep: PreprocessConfig) -> SupportMaps:
        frame = data.frame if data.frame is not None else torch.arange(len(data))
        return cls(frame, data.labels, out.maps.float(), out.class_probs.float(), prep)

    def head(self, rows: int) -> SupportMaps:
        """The first ``rows`` views (an augmented set's unaugmented copy), copied: the rest's memory is freed."""
        return SupportMaps(self.frame[:rows].clone(), self.labels[:rows].clone(), self.maps[:rows].clone(),
                           self.class_probs[:rows].clone(), self.prep)


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


def frame_scores(out: SemClipOutput, data: TrainSet, score_mode: str, views: int) -> tuple[np.ndarray, np.ndarray]:
    """Per support frame, as ``run`` scores it: ``anomaly_score`` of its whole view's p(normal) and the maximum
    over its views' maps (the whole view, or its tiles under a scale policy), and whether it is a defect frame.
    Only the first ``views`` rows (the unaugmented copy) count."""
    frame = data.frame[:views] if data.frame is not None else torch.arange(views)
    written = emitted_views(data, torch.arange(views))
    scores, defect = [], []
    for f in frame.unique():
        rows = (frame == f).nonzero().flatten()
        first = int(rows[0])  # the whole view comes first, then its tiles
        peak = float(out.maps[rows[written[rows]]].amax())
        scores.append(anomaly_score(float(out.class_probs[first][0]), peak, score_mode))
        defect.append(bool(data.labels[first] > 0))
    return np.array(scores), np.array(defect)


def fit_thresholds(out: SemClipOutput, data: TrainSet, score_mode: str = "mean",
                   views: int | None = None) -> dict[str, float]:
    """Image threshold: best balanced accuracy on the support frames' scores (:func:`frame_scores`); pixel: best
    F1 of the support maps."""
    scores, defect = frame_scores(out, data, score_mode, len(data) if views is None else views)
    return {"image": image_threshold(scores, defect), "pixel": pixel_threshold(pixel_counts(out.maps, data.masks,
                                                                                              data.has_mask)),
            "min_region_px": DEFAULT_MIN_REGION_PX}


def image_threshold(scores: np.ndarray, defect: np.ndarray) -> float:
    """The frames' score threshold of best balanced accuracy (midway to the next lower score; 0.5 without both
    kinds of frame), in [0, 1]."""
    if not (defect.any() and (~defect).any()):
        return 0.5
    cands = np.unique(scores)
    bal = [0.5 * ((scores[defect] >= c).mean() + (scores[~defect] < c).mean()) for c in cands]
    i = int(np.argmax(bal))
    return float(np.clip((cands[i] + (cands[i - 1] if i > 0 else cands[i] - 0.01)) / 2, 0, 1))


def pixel_threshold(counts: PixelCounts) -> float:
    """The map level of best pixel F1 (0.5 without a defect pixel)."""
    return float(int(np.argmax(counts.f1_curve()[:256])) / 255.0) if counts.pos.sum() else 0.5


VIEWS_A_BLOCK = 64  # views scored at a time: their (64, 240, 240) maps stay in cache through the map's steps


@torch.no_grad()
def support_output(model: Scorer, feats: Features, data: TrainSet, reference: ReferenceScorer | None,
                   ref_feats: Features | None, pixels: torch.Tensor | None) -> SemClipOutput:
    """The support rows' maps and class scores as ``run`` scores them (the reference fused in where fitted), in
    blocks of :data:`VIEWS_A_BLOCK` views (a whole set's maps at once went through each of the map's steps out of
    cache: about twice as slow here at 1,024 views). Only a frame's whole view's class scores are read
    (:func:`frame_scores`): its other views (tiles) are scored for their maps alone
    (:meth:`~semclip_batch.methods.registry.Method.score_maps`; their class scores may be NaN)."""
    whole = data.first_views()
    blocks = [_block_output(model, feats, data, reference, ref_feats, pixels, whole,
                            torch.arange(start, min(start + VIEWS_A_BLOCK, len(data))))
              for start in range(0, len(data), VIEWS_A_BLOCK)]
    return SemClipOutput(*(torch.cat([getattr(out, name) for out in blocks])
                           for name in ("maps", "class_probs", "embeddings")))


def _block_output(model: Scorer, feats: Features, data: TrainSet, reference: ReferenceScorer | None,
                  ref_feats: Features | None, pixels: torch.Tensor | None, whole: torch.Tensor,
                  rows: torch.Tensor) -> SemClipOutput:
    """:func:`support_output` of ``rows``: in one pass where all are whole views or the method's maps-only scoring
    skips nothing; else every row's maps alone, and the whole views among them again with their class scores."""
    def scored(at: torch.Tensor, maps_only: bool) -> SemClipOutput:
        return score_features(model, feats.subset(at), (data.views.shape[-2], data.views.shape[-1]), reference,
                              None if ref_feats is None else ref_feats.subset(at),
                              None if data.has_ref is None else data.has_ref[at],
                              None if pixels is None else pixels[at], maps_only=maps_only)

    if bool(whole[rows].all()) or not get_method(model.method).skips_in_maps_only():
        return scored(rows, maps_only=False)
    out = scored(rows, maps_only=True)
    first = whole[rows].nonzero().flatten()
    if len(first):
        full = scored(rows[first], maps_only=False)
        out.maps[first], out.class_probs[first] = full.maps.to(out.maps.dtype), full.class_probs.to(out.class_probs.dtype)
    return out
