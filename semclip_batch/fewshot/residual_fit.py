"""The scales of the residuals the grey-level memory's map may take in (:mod:`semclip_batch.model.grey_memory`), and
the support frames' registered references the die-to-die one is read on. Chosen per checkpoint by
:mod:`semclip_batch.fewshot.grey_memory_fit` (docs/quality.md, rules 23 and 27).

A residual's scale is the :data:`QUANTILE` quantile of its values on the memory's fitting frames' clean pixels (no
defect pixel within :data:`MASK_MARGIN` px), every :data:`EVERY` th row and column, floored at
:data:`~semclip_batch.model.grey_memory.MIN_SCALE`: the line residual's (rule 23) on every such frame, the die-to-die
residual's (rules 27 and 30) on those that list a reference frame, outside their data bars.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from semclip_batch.errors import ImageError
from semclip_batch.fewshot.decoded import active_rows
from semclip_batch.fewshot.trainset import row_frame_and_mask
from semclip_batch.io.frames import load_reference
from semclip_batch.io.preprocess import FRAME_LEVELS, fuses_levels, shipped_levels
from semclip_batch.io.storage import redact
from semclip_batch.model.data_bar import pair_bar_rows
from semclip_batch.model.grey_memory import MIN_SCALE, PATCH, GreyMemory
from semclip_batch.model.line_residual import LINE, line_residual

log = logging.getLogger(__name__)
MASK_MARGIN = 4  # px around a defect pixel that no memory neighbourhood may touch, nor a residual's scale read on
QUANTILE = 0.999  # of the fitting frames' clean pixels' residuals: a residual's scale
EVERY = 4  # px between the pixels a scale is read on, in row and column

Fitting = Sequence[tuple[torch.Tensor, np.ndarray | None]]  # (levels in [0, 1], defect mask or None) a frame


def clean_pixels(mask: np.ndarray | None, shape: tuple[int, int]) -> torch.Tensor:
    """``(H, W)`` True where no defect pixel lies within :data:`MASK_MARGIN` px (the mask grown within the defect
    pixels' box and its margin only: every pixel outside it is clean)."""
    out = torch.ones(shape, dtype=torch.bool)
    if mask is None or not mask.any():
        return out
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1 = max(int(rows[0]) - MASK_MARGIN, 0), min(int(rows[-1]) + MASK_MARGIN + 1, shape[0])
    x0, x1 = max(int(cols[0]) - MASK_MARGIN, 0), min(int(cols[-1]) + MASK_MARGIN + 1, shape[1])
    box = torch.from_numpy(mask[y0:y1, x0:x1].astype(np.float32))[None, None]
    out[y0:y1, x0:x1] = F.max_pool2d(box, 2 * MASK_MARGIN + 1, 1, MASK_MARGIN)[0, 0] == 0
    return out


def _scale(residuals: Sequence[tuple[torch.Tensor, np.ndarray | None]]) -> float:
    """:data:`QUANTILE` of ``(residual (H, W), mask)`` pairs' clean pixels, every :data:`EVERY` th row and column."""
    every = slice(None, None, EVERY)
    values = [r[every, every][clean_pixels(mask, (r.shape[0], r.shape[1]))[every, every]] for r, mask in residuals]
    pooled = torch.cat(values).numpy() if values else np.zeros(0)
    return max(float(np.quantile(pooled, QUANTILE)) if len(pooled) else 0.0, MIN_SCALE)


def fused(shape: Sequence[int]) -> bool:
    """Whether ``run`` fuses the memory's map of a frame of this ``(H, W)`` (:data:`PATCH` px or more, levels shipped)."""
    return min(shape) >= PATCH and fuses_levels(shape[0], shape[1])


def fit_line_scale(frames: Fitting, length: int = LINE) -> float:
    """The line residual's scale on those of ``frames`` that ``run`` fuses."""
    return _scale([(line_residual(levels, length), mask) for levels, mask in frames if fused(levels.shape)])


def fit_reference_scale(frames: Sequence[tuple[torch.Tensor, torch.Tensor, np.ndarray | None]]) -> float:
    """The die-to-die residual's scale on those of ``(levels, reference levels, mask)`` frames that ``run`` fuses
    (:meth:`~semclip_batch.model.grey_memory.GreyMemory.reference_residual` outside the data bars, rule 30: their rows
    read 0 and do not set it)."""
    residuals = []
    for levels, ref, mask in frames:
        if fused(levels.shape):
            imaged = ~pair_bar_rows(levels, ref)
            kept = None if mask is None else mask[imaged.cpu().numpy()]
            residuals.append((GreyMemory.reference_residual(levels, ref)[imaged], kept))
    return _scale(residuals)


def reference_levels(df: pd.DataFrame, positions: AbstractSet[int], storage_options: Mapping[str, Any] | None,
                     percentiles: tuple[float, float]) -> dict[int, np.ndarray]:
    """By position in ``df``, the ``(H, W)`` uint8 levels of each of ``positions``' reference frames as ``run``'s
    decode stage ships them: registered onto the frame, stretched between ``percentiles`` and packed. Rows without
    a ``reference_url`` are left out, as are (warned) rows whose reference cannot be read or registered: ``run``
    would make them ``reference_error`` rows."""
    out: dict[int, np.ndarray] = {}
    kept = active_rows()
    for pos, (_, row) in enumerate(df.reset_index(drop=True).iterrows()):
        url = row.get("reference_url")
        if pos not in positions or not isinstance(url, str) or not url:
            continue
        try:
            gray, _ = row_frame_and_mask(row, storage_options, kept)
            out[pos] = shipped_levels(load_reference(url, gray, storage_options), percentiles)
        except ImageError as exc:
            log.warning("support frame %s: its reference is left out of the die-to-die residual (%s)",
                        redact(str(row["url"])), exc)
    return out


def as_levels(packed: np.ndarray) -> torch.Tensor:
    """Packed uint8 levels -> ``(H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(packed).float() / FRAME_LEVELS
