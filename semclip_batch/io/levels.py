"""The percentile stretch of a frame's grey levels to [0, 1], shared by preprocessing (the model's input) and the
report's overlays. numpy only: the report and the CPU stages that show frames need no torch for it."""

from __future__ import annotations

import math

import numpy as np

# Percentiles come from a regular subsample of at most this many pixels: a 1024 x 1024 frame's 0.5 / 99.5 %
# levels move by well under one 12-bit grey level, and np.percentile's selection over all 1 M pixels took 11 of
# the 17 ms its preprocessing cost on one core (benchmarks/pipeline.py --decode).
_STATS_SAMPLES = 1 << 18


def stretch(gray: np.ndarray, low: float, high: float) -> np.ndarray:
    """Per-image percentile stretch to [0, 1]. ``(H, W)`` -> ``(H, W)`` float32."""
    sample = _stats_sample(gray)
    lo, hi = (np.float32(v) for v in np.percentile(sample, [low, high]))
    if hi - lo <= 1e-12:
        return np.zeros_like(gray, dtype=np.float32)
    out = np.subtract(gray, lo, dtype=np.float32)  # float32 throughout: one pass, no float64 copy
    out /= hi - lo
    return np.clip(out, 0.0, 1.0, out=out)


def _stats_sample(gray: np.ndarray) -> np.ndarray:
    """At most :data:`_STATS_SAMPLES` pixels of ``gray`` taken every ``step`` pixels in raster order, ``step``
    coprime with the width: each row then starts at another phase, so a layout whose period divides the step
    (line/space every 4 or 16 px) is not sampled at one phase only."""
    flat = gray.ravel()
    if flat.size <= _STATS_SAMPLES:
        return flat
    step = math.ceil(flat.size / _STATS_SAMPLES)
    while math.gcd(step, gray.shape[-1]) != 1:
        step += 1
    return flat[::step]
