"""Cell-to-cell references (``train --self-reference``, on in the ``transfer`` recipe): a defect-free estimate of
a frame built from the frame itself where its pattern repeats, as array-mode inspection compares each cell with
its neighbours instead of with another die.

The pattern's period is found along each axis from the frame's autocorrelation (its first clear peak past
:data:`MIN_PERIOD_PX`, refined to a fraction of a pixel). Where the stronger axis repeats (correlation at the
period at least :data:`MIN_STRENGTH`: the pattern carries at least that share of the frame's variance), the
reference is, per pixel, the median of the frame shifted by -2, -1, +1 and +2 periods along that axis (linear
interpolation for the fraction; a shift that leaves the frame is replaced by the opposite one), so a defect
smaller than a period is in at most one of the shifted copies, and not in the median. Frames without such a
period (random routing, a blank field) have no cell reference: they are scored without one, as rows without a
``reference_uri`` are. A defect longer than a period along that axis is in several copies and only its ends
stand out: the reference map helps small defects, the model's own map carries large ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MIN_PERIOD_PX = 4  # shorter lags are the frame's own blur and noise, not a pattern
MAX_PERIOD_SHARE = 1 / 5  # a period repeats at least 5 times across the frame (+-2 periods fit inside it)
MIN_STRENGTH = 0.5  # autocorrelation at the period: the repeating pattern holds at least half the variance
MIN_PROMINENCE = 0.5  # the peak's rise above the lowest correlation before it
PEAK_TIE = 0.1  # peaks this close to the highest count as high (noise orders a grating's equal peaks at random)
SHIFTS = (-2, -1, 1, 2)  # periods
MAX_LINES = 128  # lines whose autocorrelation is averaged
CHUNK_LINES = 256  # lines shifted at a time


@dataclass(frozen=True)
class Period:
    axis: int  # 0: the pattern repeats down the rows (y), 1: along the columns (x)
    pixels: float  # the period, sub-pixel
    strength: float  # normalised autocorrelation at the period, in [-1, 1]


def axis_period(gray: np.ndarray, axis: int) -> Period:
    """The strongest repeat of ``gray`` ``(H, W)`` along ``axis``: the mean over up to :data:`MAX_LINES` lines of
    their autocorrelation (zero-padded FFT, normalised at lag 0), its first clear peak between :data:`MIN_PERIOD_PX` and
    :data:`MAX_PERIOD_SHARE` of the length (:func:`_first_peak`), refined by a parabola through the peak and its
    neighbours. Strength 0 where the frame is too short or flat, or no lag is such a peak."""
    length = gray.shape[axis]
    longest = int(length * MAX_PERIOD_SHARE)
    lines = np.moveaxis(gray, axis, -1)
    lines = lines[::max(1, lines.shape[0] // MAX_LINES)].astype(np.float64)  # evenly spaced lines suffice
    lines = lines - lines.mean(axis=-1, keepdims=True)
    if longest <= MIN_PERIOD_PX + 1 or not np.any(lines):
        return Period(axis, 0.0, 0.0)
    spectrum = np.fft.rfft(lines, n=2 * length, axis=-1)
    corr = np.fft.irfft(spectrum * np.conj(spectrum), axis=-1)[..., :longest + 2].mean(axis=0)
    if corr[0] <= 0:
        return Period(axis, 0.0, 0.0)
    corr = corr / corr[0]
    lag = _first_peak(corr, longest)
    if lag is None:
        return Period(axis, 0.0, 0.0)
    left, mid, right = corr[lag - 1], corr[lag], corr[lag + 1]
    bend = left - 2.0 * mid + right
    offset = 0.5 * (left - right) / bend if bend < 0 else 0.0
    return Period(axis, lag + float(np.clip(offset, -0.5, 0.5)), float(mid))


def _first_peak(corr: np.ndarray, longest: int) -> int | None:
    """The shortest lag in ``MIN_PERIOD_PX..longest`` whose autocorrelation is a local maximum within
    :data:`PEAK_TIE` of the highest one and rises at least :data:`MIN_PROMINENCE` above the lowest correlation at
    shorter lags (a pattern that repeats dips between repeats; a smooth frame's correlation only decays). The
    shortest, not the highest: a grating's peaks at 2, 3 ... periods are as high as the first."""
    lags = np.arange(MIN_PERIOD_PX, longest + 1)
    c = corr[lags]
    peaks = lags[(c > corr[lags - 1]) & (c >= corr[lags + 1])]
    peaks = peaks[corr[peaks] - np.minimum.accumulate(corr)[peaks - 1] >= MIN_PROMINENCE]
    if peaks.size == 0:
        return None
    top = float(corr[peaks].max())
    return int(peaks[corr[peaks] >= top - PEAK_TIE][0])


def frame_period(gray: np.ndarray) -> Period | None:
    """The axis whose pattern repeats more strongly, if it repeats at least :data:`MIN_STRENGTH`; else None."""
    best = max((axis_period(gray, axis) for axis in (0, 1)), key=lambda p: p.strength)
    return best if best.strength >= MIN_STRENGTH else None


def _shifted(lines: np.ndarray, by: float) -> np.ndarray:
    """``lines`` ``(R, N)`` read ``by`` pixels further along their last axis (linear interpolation); NaN where that
    leaves them."""
    n = lines.shape[1]
    pos = np.arange(n) + by
    lo = np.floor(pos).astype(np.int64)
    frac = (pos - lo).astype(lines.dtype)
    inside = (lo >= 0) & (lo + 1 <= n - 1) | (lo == n - 1) & (frac == 0)
    a, b = lines[:, np.clip(lo, 0, n - 1)], lines[:, np.clip(lo + 1, 0, n - 1)]
    return np.where(inside, a + (b - a) * frac, np.nan)


def _median_of_shifts(lines: np.ndarray, period: float) -> np.ndarray:
    """Per pixel of ``lines`` ``(R, N)`` float32, the median of the copies shifted by :data:`SHIFTS` periods along
    the last axis."""
    ahead = {k: _shifted(lines, k * period) for k in SHIFTS}
    # where a shift leaves the frame, its mirror (-k) stands in: a period is at most a fifth of the frame, so one
    # of the two is always inside, and the median is then that of the copies inside
    copies = np.stack([np.where(np.isnan(ahead[k]), ahead[-k], ahead[k]) for k in SHIFTS])
    # the median of four values, without sorting: their sum less the largest and the smallest, halved
    return 0.5 * (copies.sum(axis=0) - copies.max(axis=0) - copies.min(axis=0))


def cell_reference(gray: np.ndarray) -> np.ndarray | None:
    """A frame's cell-to-cell reference ``(H, W)`` float32, or None where its pattern does not repeat
    (:func:`frame_period`). Built :data:`CHUNK_LINES` lines at a time, so a large frame needs a few times one
    chunk's memory, not the frame's."""
    period = frame_period(gray)
    if period is None:
        return None
    lines = np.moveaxis(gray.astype(np.float32), period.axis, -1)  # the repeating axis last: shifts along lines
    out = np.empty_like(lines)
    for start in range(0, lines.shape[0], CHUNK_LINES):
        out[start:start + CHUNK_LINES] = _median_of_shifts(lines[start:start + CHUNK_LINES], period.pixels)
    return np.ascontiguousarray(np.moveaxis(out, -1, period.axis))


def cell_difference(gray: np.ndarray, sigma: float = 1.5) -> np.ndarray | None:
    """``|frame - cell reference|`` smoothed over ``sigma`` px, or None (no period): what the reference map's
    pixel term compares, at frame resolution (for inspection and tests)."""
    ref = cell_reference(gray)
    return None if ref is None else ndimage.gaussian_filter(np.abs(gray.astype(np.float32) - ref), sigma)
