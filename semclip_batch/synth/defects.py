"""Defects of the non-classic families, sized by the family's scale (px at frame resolution).

Same defining looks as :func:`semclip_batch.synth.render.add_defect`: a bridge fills the space between two
adjacent conductors (parallel wire segments, or two neighbouring contacts), a scratch is long and thin, a particle
a round bright dome, in-film faint, copper residue an irregular mottled blob, a hole a dark void with a bright rim.
Every shape is computed in a local window (no full-frame grids). Masks are exactly the defect pixels, rows
``[0, usable_h)`` only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from semclip_batch.synth.layouts import Drawn

Window = tuple[slice, slice]


def add_scaled_defect(label: str, structure: np.ndarray, layout: Drawn, rng: np.random.Generator, usable_h: int,
                      size_px: tuple[float, float], margin_x: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one ``label`` defect of characteristic size ``size_px`` (log-uniform). Returns (structure, extra
    intensity, mask bool); ``margin_x`` keeps it that far from the left / right edges (scan drift)."""
    h, w = structure.shape
    d = float(np.exp(rng.uniform(np.log(size_px[0]), np.log(size_px[1]))))
    d = min(d, max(2.0, min(usable_h, w - 2 * margin_x) / 5))  # frames far smaller than the family's: fit
    m = int(d) + 4
    cy = float(rng.integers(m, max(m + 1, usable_h - m))) + rng.uniform(-0.5, 0.5)
    cx = float(rng.integers(m + margin_x, max(m + margin_x + 1, w - m - margin_x))) + rng.uniform(-0.5, 0.5)
    s, extra, mask = structure.copy(), np.zeros((h, w)), np.zeros((h, w), bool)
    if label == "bridge":
        bridge = _contact_bridge if layout.kind == "holes" else _wire_bridge
        mask = bridge(s, layout, rng, usable_h, d, m + margin_x)
        s[mask] = 1.0
    elif label == "particle":
        _particle(extra, mask, cy, cx, max(2.0, d / 2))
    elif label == "hole":
        _hole(s, extra, mask, cy, cx, max(2.5, d / 2))
    elif label == "scratch":
        _scratch(extra, mask, rng, usable_h, d, margin_x)
    elif label == "infilm":
        ry, rx = max(1.5, d / 2 * rng.uniform(0.7, 1.0)), max(2.0, d / 2 * rng.uniform(1.0, 1.6))
        sigma = max(0.8, d / 10)
        win, inside = _ellipse(h, w, cy, cx, ry, rx, rng.uniform(0, np.pi), pad=3 * sigma)
        extra[win] += 0.07 * ndimage.gaussian_filter(inside.astype(float), sigma) * inside
        mask[win] |= inside
    elif label == "copper_residue":
        _residue(extra, mask, rng, cy, cx, d)
    else:
        raise ValueError(f"unknown defect type {label!r}")
    mask[usable_h:] = False
    return s, extra, mask


def _box(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> tuple[Window, np.ndarray, np.ndarray]:
    """The window around ``(cy, cx)`` of half sizes ``ry, rx`` (+1 px) and its absolute coordinates (open grids)."""
    y0, y1 = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, h)
    x0, x1 = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, w)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    return (slice(y0, y1), slice(x0, x1)), yy, xx


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float, angle: float,
             pad: float = 0.0) -> tuple[Window, np.ndarray]:
    r = max(ry, rx) + pad
    win, yy, xx = _box(h, w, cy, cx, r, r)
    c, s = np.cos(angle), np.sin(angle)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    return win, (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _particle(extra: np.ndarray, mask: np.ndarray, cy: float, cx: float, r: float) -> None:
    """A bright, shaded sphere."""
    h, w = extra.shape
    win, yy, xx = _box(h, w, cy, cx, r, r)
    dome = np.sqrt(np.clip(1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2, 0, 1))
    inside = dome > 0
    extra[win] += 0.55 * dome + 0.15 * inside
    mask[win] |= inside


def _hole(s: np.ndarray, extra: np.ndarray, mask: np.ndarray, cy: float, cx: float, r: float) -> None:
    """A dark void (the material gone) with a bright rim."""
    rim = max(1.0, 0.2 * r)
    h, w = s.shape
    win, yy, xx = _box(h, w, cy, cx, r, r)
    dist2 = (yy - cy) ** 2 + (xx - cx) ** 2
    void = dist2 <= (r - rim) ** 2
    ring = (dist2 <= r * r) & ~void
    s[win][void] = 0.0
    extra[win] += -0.25 * void + 0.3 * ring
    mask[win] |= void | ring


def _scratch(extra: np.ndarray, mask: np.ndarray, rng: np.random.Generator, usable_h: int, d: float,
             margin_x: int) -> None:
    """A long, thin straight line, 8-14x the defect size (at least 30 px), inside the usable area if it fits."""
    h, w = extra.shape
    length = float(np.clip(d * rng.uniform(8, 14), 30, 0.8 * min(usable_h, w - 2 * margin_x)))
    half_w = max(0.6, d / 14)
    angle = rng.uniform(0, np.pi)
    ey, ex = length / 2 * abs(np.sin(angle)) + half_w + 1, length / 2 * abs(np.cos(angle)) + half_w + 1 + margin_x
    cy = rng.uniform(ey, usable_h - ey) if usable_h > 2 * ey else usable_h / 2
    cx = rng.uniform(ex, w - ex) if w > 2 * ex else w / 2
    win, yy, xx = _box(h, w, cy, cx, ey, ex)
    c, s = np.cos(angle), np.sin(angle)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    line = (np.abs(u) <= length / 2) & (np.abs(v) <= half_w)
    extra[win] += np.where(line, rng.choice([-0.18, 0.22]), 0.0)
    mask[win] |= line


def _residue(extra: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cy: float, cx: float, d: float) -> None:
    """An irregular blob of 3-5 overlapping ellipses with a mottled surface."""
    h, w = extra.shape
    win, _, _ = _box(h, w, cy, cx, 1.2 * d + 2, 1.2 * d + 2)
    blob = np.zeros(mask[win].shape, bool)
    for _ in range(int(rng.integers(3, 6))):
        oy, ox = rng.normal(0, d / 6, 2)
        sub, inside = _ellipse(h, w, cy + oy, cx + ox, max(1.2, d * rng.uniform(0.18, 0.35)),
                               max(1.5, d * rng.uniform(0.22, 0.45)), rng.uniform(0, np.pi))
        blob[sub[0].start - win[0].start:sub[0].stop - win[0].start,
             sub[1].start - win[1].start:sub[1].stop - win[1].start] |= inside
    mottle = ndimage.gaussian_filter(rng.normal(0, 1, blob.shape), 1.5)
    extra[win] += blob * (0.25 + 0.12 * mottle / max(np.abs(mottle).max(), 1e-6))
    mask[win] |= blob


def _space_runs(row: np.ndarray, lo: int, hi: int, max_gap: float) -> list[tuple[int, int]]:
    """Runs ``[a, b]`` of background in ``row`` bounded by conductor on both sides, inside ``[lo, hi)``."""
    cond = (row > 0.5).astype(np.int8)
    step = np.diff(cond)
    starts, ends = np.nonzero(step == -1)[0] + 1, np.nonzero(step == 1)[0]
    ends = ends[ends >= (starts[0] if len(starts) else len(row))]
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=False)
            if a - 1 >= lo and b + 1 < hi and b - a + 1 <= max_gap]


def _wire_bridge(s: np.ndarray, layout: Drawn, rng: np.random.Generator, usable_h: int, d: float,
                 margin: int) -> np.ndarray:
    """Fill the space between two neighbouring parallel conductors (different nets) over a short run of rows
    (columns for horizontal wires). Works on the transposed frame for horizontal wires."""
    t = s if layout.vertical else s.T
    labels = ndimage.label(t > 0.5)[0]
    along_hi, across_hi = (usable_h, s.shape[1]) if layout.vertical else (s.shape[1], usable_h)
    run = max(2, round(d * rng.uniform(0.6, 1.0)))
    strict = (min(margin, along_hi // 2 - run), min(margin, across_hi // 4),
              layout.pitch * (1.0 if layout.kind == "routing" else 2.0))
    for tries, (lo, side, max_gap) in ((400, strict), (400, (1, 1, float(across_hi)))):  # then: anywhere in frame
        found = _find_gap(t, labels, rng, run, (lo, along_hi - lo), (side, across_hi - side), max_gap, tries)
        if found is not None:
            rows, a, b = found
            out = np.zeros(t.shape, bool)
            out[rows, a:b + 1] = _necked(run, b - a + 1, rng)
            return out if layout.vertical else out.T
    raise RuntimeError("no pair of neighbouring conductors found for a bridge")


def _find_gap(t: np.ndarray, labels: np.ndarray, rng: np.random.Generator, run: int, along: tuple[int, int],
              across: tuple[int, int], max_gap: float, tries: int) -> tuple[slice, int, int] | None:
    """Rows ``r0:r0+run`` and background columns ``a..b`` with a different conductor at ``a-1`` and at ``b+1`` on
    every row (vertical conductors), within the ``along`` x ``across`` ranges."""
    for _ in range(tries):
        r0 = int(rng.integers(along[0], max(along[0] + 1, along[1] - run)))
        runs = _space_runs(t[min(r0 + run // 2, t.shape[0] - 1)], across[0], across[1], max_gap)
        if not runs:
            continue
        a, b = runs[int(rng.integers(len(runs)))]
        rows = slice(r0, r0 + run)
        left, right = labels[rows, a - 1], labels[rows, b + 1]
        if len(left) == run and (t[rows, a:b + 1] < 0.5).all() and (left > 0).all() and (right > 0).all() \
                and len(set(left.tolist())) == 1 and len(set(right.tolist())) == 1 and left[0] != right[0]:
            return rows, a, b
    return None


def _necked(run: int, gap: int, rng: np.random.Generator) -> np.ndarray:
    """A ``(run, gap)`` bridge shape: full width where it meets the conductors, necked and rough in between."""
    t = (np.arange(gap) + 0.5) / gap
    half = run / 2 * np.clip(0.55 + 0.45 * (2 * t - 1) ** 2 + rng.uniform(-0.12, 0.12, gap), 0.3, 1.0)
    half[[0, -1]] = run / 2
    r = np.arange(run)[:, None] + 0.5 - run / 2
    return np.abs(r) <= np.maximum(half, 0.5)[None, :]


def _contact_bridge(s: np.ndarray, layout: Drawn, rng: np.random.Generator, usable_h: int, d: float,
                    margin: int) -> np.ndarray:
    """A band joining a contact and its nearest neighbour (same row, column or stagger diagonal)."""
    h, w = s.shape
    dots = layout.dots.astype(np.float64)
    ry, rx = layout.dot_radii
    reach = max(ry, rx) + 2
    inner = dots[(dots[:, 0] >= reach) & (dots[:, 0] < usable_h - reach) & (dots[:, 1] >= margin)
                 & (dots[:, 1] < w - margin)]
    if len(inner) < 2:  # a frame far smaller than the family's: anywhere inside it
        inner = dots[(dots[:, 0] >= 0) & (dots[:, 0] < usable_h) & (dots[:, 1] >= 0) & (dots[:, 1] < w)]
    p1 = inner[int(rng.integers(len(inner)))]
    dist = np.hypot(*(inner - p1).T)
    dist[dist == 0] = np.inf
    near = np.nonzero(dist <= dist.min() * 1.05)[0]
    p2 = inner[near[int(rng.integers(len(near)))]]
    vec = p2 - p1
    length = float(np.hypot(*vec))
    uy, ux = vec / length
    half_w = max(1.5, min(min(ry, rx) * 0.8, d * rng.uniform(0.15, 0.3)))
    mid = (p1 + p2) / 2
    win, yy, xx = _box(h, w, mid[0], mid[1], abs(vec[0]) / 2 + half_w + 1, abs(vec[1]) / 2 + half_w + 1)
    u = (yy - p1[0]) * uy + (xx - p1[1]) * ux
    v = -(yy - p1[0]) * ux + (xx - p1[1]) * uy
    band = (u >= 0) & (u <= length) & (np.abs(v) <= half_w) & (s[win] < 0.5)
    out = np.zeros((h, w), bool)
    out[win] = band
    return out
