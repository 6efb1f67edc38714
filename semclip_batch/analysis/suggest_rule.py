"""The rule of ``suggest`` (README "Label suggestions"), as pure functions of arrays: each candidate's
informativeness from its class scores, image score and map peak (:func:`informativeness`), and the pick of the
``n`` to label among them, near-duplicates skipped (:func:`select`). :mod:`.suggest` reads a run's outputs into
:class:`Scores` and writes the pick as a manifest; ``benchmarks/suggest.py`` measures the rule on its own arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from semclip_batch.errors import ConfigError

# Cosine distance under which two frames count as one: the same frame stored twice, re-encoded or listed under
# several defect_ids. Of the benchmark pools' 2 x 210 synthetic frames (tiny backbone), one pair was closer (0.0005).
DUPLICATE = 1e-3


@dataclass(frozen=True)
class Weights:
    """Shares of the three informativeness terms (normalised to sum 1 where used)."""

    classes: float = 1.0
    image: float = 1.0
    pixel: float = 1.0

    def __post_init__(self) -> None:
        values = (self.classes, self.image, self.pixel)
        if min(values) < 0 or sum(values) <= 0:
            raise ConfigError(f"suggestion weights must be >= 0 and not all 0, got {values}")


@dataclass(frozen=True)
class Scores:
    """Per candidate row: class probabilities ``(N, C)`` in the run's ``classes`` order, ``anomaly_score`` and
    map peak ``(N,)``; the run's thresholds."""

    probs: np.ndarray
    score: np.ndarray
    peak: np.ndarray
    image_threshold: float
    pixel_threshold: float


class Embeddings(Protocol):
    """Unit embeddings ``(M, E)`` of the candidates ``idx``; rows closer than ``duplicate`` (cosine distance) are
    near-duplicates."""

    @property
    def duplicate(self) -> float: ...

    def __call__(self, idx: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class FixedEmbeddings:
    """Embeddings computed beforehand ``(N, E)`` (the benchmark's)."""

    emb: np.ndarray
    duplicate: float = DUPLICATE

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        return self.emb[idx]


def rank01(values: np.ndarray) -> np.ndarray:
    """Average ranks scaled to [0, 1] (largest -> 1; all equal -> 1). ``(N,)`` -> ``(N,)``."""
    n = len(values)
    if n <= 1:
        return np.ones(n)
    ranks = pd.Series(values).rank(method="average").to_numpy()
    span = ranks.max() - ranks.min()
    return (ranks - ranks.min()) / span if span > 0 else np.ones(n)


def class_uncertainty(probs: np.ndarray) -> np.ndarray:
    """``1 - (p1 - p2)``: 1 when the two best classes tie, 0 when one class takes all. ``(N, C)`` -> ``(N,)``."""
    if probs.shape[1] < 2:
        return np.zeros(len(probs))
    top = np.sort(probs, axis=1)[:, ::-1]
    return 1.0 - (top[:, 0] - top[:, 1])


def map_peak(score: np.ndarray, p_normal: np.ndarray, score_mode: str) -> np.ndarray:
    """``max A`` of each frame's map from its ``anomaly_score`` (``mean``: ½ (1 − p(normal)) + ½ max A); exact where
    ``p_normal`` is the whole view's p(normal), which a frame's class scores hold unless it took a defect view."""
    if score_mode == "max":
        return score.astype(float)
    return np.clip(2.0 * score - (1.0 - p_normal), 0.0, 1.0)


def terms(s: Scores) -> dict[str, np.ndarray]:
    """The three informativeness terms as ranks in [0, 1] (1 = most informative)."""
    return {"classes": rank01(class_uncertainty(s.probs)),
            "image": rank01(-np.abs(s.score - s.image_threshold)),
            "pixel": rank01(np.nan_to_num(-np.abs(s.peak - s.pixel_threshold), nan=-np.inf))}  # unread: last


def informativeness(s: Scores, w: Weights) -> np.ndarray:
    """The weighted mean of :func:`terms`, in [0, 1]. ``(N,)``."""
    t = terms(s)
    total = w.classes + w.image + w.pixel
    return (w.classes * t["classes"] + w.image * t["image"] + w.pixel * t["pixel"]) / total


def diverse_pick(u: np.ndarray, emb: np.ndarray, n: int, duplicate: float = DUPLICATE) -> list[int]:
    """Greedy pick of up to ``n`` rows (``u`` ``(M,)``, unit embeddings ``(M, E)``, rows in tie-break order): first
    the largest ``u``, then the largest ``u x d``, ``d`` = cosine distance to the nearest row picked.

    Rows closer than ``duplicate`` to a pick, or whose embedding is not finite (frames unreadable now), are never
    picked (so fewer than ``n`` may come back).
    """
    blocked = ~np.isfinite(emb).all(axis=1) if len(emb) else np.zeros(0, dtype=bool)
    emb = np.where(blocked[:, None], 0.0, emb)
    weight = np.maximum(u, 1e-6)  # a shortlisted row with the lowest rank can still be picked for its distance
    nearest = np.full(len(u), 2.0)  # cosine distance to the nearest pick; 2 = none yet (the first pick is max u)
    picked: list[int] = []
    while len(picked) < n and not blocked.all():
        nxt = int(np.argmax(np.where(blocked, -1.0, weight * nearest)))
        picked.append(nxt)
        nearest = np.minimum(nearest, np.clip(1.0 - emb @ emb[nxt], 0.0, 2.0))
        blocked |= nearest < duplicate
        blocked[nxt] = True
    return picked


def top_distinct(order: np.ndarray, emb_of: Embeddings, n: int) -> list[int]:
    """The first ``n`` rows of ``order`` (most informative first) that are no near-duplicate of a row taken before
    them; embedded ``n`` at a time, so usually only ``n`` frames are."""
    picked: list[int] = []
    kept = np.zeros((0, 1))
    for start in range(0, len(order), max(n, 1)):
        chunk = order[start:start + max(n, 1)]
        emb = np.asarray(emb_of(chunk), dtype=np.float64)
        for i, e in zip(chunk, emb, strict=True):
            if not np.isfinite(e).all() or (len(kept) and float((1.0 - kept @ e).min()) < emb_of.duplicate):
                continue
            picked.append(int(i))
            kept = e[None] if not len(kept) else np.vstack([kept, e])
            if len(picked) == n:
                return picked
    return picked


def select(s: Scores, emb_of: Embeddings, n: int, w: Weights, shortlist_factor: int,
           seed: int) -> tuple[list[int], np.ndarray]:
    """The rule end to end: indexes into the candidates, in rank order, and ``u``.

    ``shortlist_factor`` 1: the ``n`` most informative rows, near-duplicates skipped; K > 1: a diverse pick
    (:func:`diverse_pick`) among the ``K x n`` most informative. ``emb_of(indexes)`` returns unit embeddings
    ``(M, E)`` of those candidates (only these are embedded).
    """
    u = informativeness(s, w)
    order = np.lexsort((np.random.default_rng(seed).permutation(len(u)), -u))
    if shortlist_factor <= 1:
        return top_distinct(order, emb_of, n), u
    short = order[:shortlist_factor * n]
    emb = np.asarray(emb_of(short), dtype=np.float64)
    return [int(short[i]) for i in diverse_pick(u[short], emb, n, emb_of.duplicate)], u


def reason(s: Scores, t: Mapping[str, np.ndarray], i: int, classes: Sequence[str]) -> str:
    """Why row ``i`` was suggested, in a few words (the terms where it ranks in the top quarter)."""
    parts = []
    if t["classes"][i] >= 0.75 and s.probs.shape[1] >= 2:
        a, b = np.argsort(-s.probs[i])[:2]
        parts.append(f"{classes[a]} {s.probs[i, a]:.2f} vs {classes[b]} {s.probs[i, b]:.2f}")
    if t["image"][i] >= 0.75:
        parts.append(f"score {s.score[i]:.3f} near threshold {s.image_threshold:.3f}")
    if t["pixel"][i] >= 0.75 and np.isfinite(s.peak[i]):  # an unread mask's peak is NaN
        parts.append(f"map peak {s.peak[i]:.3f} near pixel threshold {s.pixel_threshold:.3f}")
    return "; ".join(parts) or "informative on all terms together"
