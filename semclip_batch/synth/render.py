"""SEM-like frames and defects, rendered with numpy only (used by ``synth``).

A frame is a line/space or contact-hole layout with bright edges (SEM edge effect), shot noise and an
optional info banner. Each defect type has its defining shape: bridges join two adjacent lines, scratches are
long and thin, particles round and bright, in-film defects faint, copper residue an irregular blob, holes dark
voids with a bright rim. Masks are exactly the defect pixels, never under the banner.

``render`` / ``add_defect`` / ``pattern`` are the ``classic`` family's (byte-stable: do not change them);
:func:`render_sem`, :func:`scan_drift` and :func:`shift_rows` image the other families (see ``families.py``,
``layouts.py``, ``defects.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage, signal

from semclip_batch.synth.families import Regime

DEFECTS = ("bridge", "copper_residue", "hole", "infilm", "particle", "scratch")
CLASSES = ("normal", *DEFECTS)


@dataclass(frozen=True)
class Layout:
    """A site's pattern: ``lines`` (vertical, pitch/width in px) or ``contacts`` (hole grid)."""

    kind: str
    pitch: int
    width: int
    phase: int


def random_layout(rng: np.random.Generator, label: str) -> Layout:
    kind = "lines" if label == "bridge" or rng.random() < 0.6 else "contacts"
    pitch = int(rng.integers(18, 30))
    width = int(pitch * rng.uniform(0.4, 0.55))
    return Layout(kind=kind, pitch=pitch, width=width, phase=int(rng.integers(0, pitch)))


def pattern(layout: Layout, h: int, w: int, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Binary pattern (1 = line / contact) as float ``(H, W)``."""
    yy, xx = np.mgrid[0:h, 0:w]
    x = (xx + layout.phase + shift[1]) % layout.pitch
    if layout.kind == "lines":
        return (x < layout.width).astype(np.float64)
    y = (yy + layout.phase + shift[0]) % layout.pitch
    c = layout.pitch / 2.0
    return (((x - c) ** 2 + (y - c) ** 2) < (layout.width / 2.0) ** 2).astype(np.float64)


def render(structure: np.ndarray, rng: np.random.Generator, extra: np.ndarray | None = None) -> np.ndarray:
    """SEM contrast: material level + bright edges + shot noise. Returns ``(H, W)`` in [0, 1]."""
    soft = ndimage.gaussian_filter(structure, 1.0)
    edge = np.hypot(ndimage.sobel(soft, 0), ndimage.sobel(soft, 1))
    edge /= max(edge.max(), 1e-6)
    img = 0.28 + 0.22 * soft + 0.38 * edge
    if extra is not None:
        img = img + extra
    img = ndimage.gaussian_filter(img, 0.6)
    noise = rng.normal(0.0, 1.0, img.shape) * 0.045 * np.sqrt(np.clip(img, 0.02, None))
    return np.clip(img + noise, 0.0, 1.0)


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    c, s = np.cos(angle), np.sin(angle)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def add_defect(label: str, structure: np.ndarray, layout: Layout, rng: np.random.Generator,
               usable_h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one defect in rows ``[0, usable_h)``. Returns (structure, extra intensity, mask bool)."""
    h, w = structure.shape
    scale = min(usable_h, w) / 256.0
    margin = int(24 * scale) + 8
    cy = float(rng.integers(margin, max(margin + 1, usable_h - margin)))
    cx = float(rng.integers(margin, max(margin + 1, w - margin)))
    extra = np.zeros_like(structure)
    s = structure.copy()
    if label == "bridge":
        mask = _bridge(s, layout, cy, cx, rng, scale)
        s[mask] = 1.0
    elif label == "particle":
        r = rng.uniform(6, 11) * scale + 2
        yy, xx = np.mgrid[0:h, 0:w]
        dome = np.sqrt(np.clip(1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2, 0, 1))  # bright, shaded sphere
        mask = dome > 0
        extra += 0.55 * dome + 0.15 * mask
    elif label == "scratch":
        mask = _scratch(h, w, usable_h, rng, scale)
        extra += np.where(mask, rng.choice([-0.18, 0.22]), 0.0)
    elif label == "infilm":
        mask = _ellipse(h, w, cy, cx, rng.uniform(10, 18) * scale + 3, rng.uniform(14, 26) * scale + 3,
                        rng.uniform(0, np.pi))
        extra += 0.09 * ndimage.gaussian_filter(mask.astype(float), 2.0) * mask
    elif label == "copper_residue":
        mask = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(3, 6))):
            mask |= _ellipse(h, w, cy + rng.normal(0, 6 * scale), cx + rng.normal(0, 6 * scale),
                             rng.uniform(4, 9) * scale + 2, rng.uniform(5, 12) * scale + 2, rng.uniform(0, np.pi))
        mottle = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), 1.5)
        extra += mask * (0.25 + 0.12 * mottle / max(np.abs(mottle).max(), 1e-6))
    elif label == "hole":
        r = rng.uniform(5, 10) * scale + 2
        mask = _disk(h, w, cy, cx, r)
        s[mask] = 0.0
        rim = _disk(h, w, cy, cx, r + 2) & ~mask
        extra += -0.25 * mask + 0.3 * rim
        mask = mask | rim
    else:
        raise ValueError(f"unknown defect type {label!r}")
    mask[usable_h:] = False
    return s, extra, mask


def _bridge(s: np.ndarray, layout: Layout, cy: float, cx: float, rng: np.random.Generator,
            scale: float) -> np.ndarray:
    """Fill the space between two adjacent lines over a short run of rows."""
    h, w = s.shape
    row = s[int(cy)]
    col = int(cx)
    while col < w - 1 and row[col] > 0.5:  # step into a space
        col += 1
    left = col
    while left > 0 and row[left - 1] < 0.5:
        left -= 1
    right = col
    while right < w - 1 and row[right + 1] < 0.5:
        right += 1
    half = max(2, int(rng.uniform(3, 6) * scale))
    mask = np.zeros((h, w), bool)
    mask[int(cy) - half:int(cy) + half + 1, left:right + 1] = True
    return mask


def _scratch(h: int, w: int, usable_h: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    length = rng.uniform(0.5, 0.8) * min(usable_h, w)
    angle = rng.uniform(0, np.pi)
    cy, cx = usable_h / 2 + rng.normal(0, usable_h * 0.08), w / 2 + rng.normal(0, w * 0.08)
    half_w = max(1.0, 1.2 * scale)
    yy, xx = np.mgrid[0:h, 0:w]
    c, s = np.cos(angle), np.sin(angle)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    return (np.abs(u) <= length / 2) & (np.abs(v) <= half_w)


def banner_height(h: int) -> int:
    return max(12, round(h * 0.09))


def draw_banner(img: np.ndarray, text: str) -> np.ndarray:
    """An info strip with text at the bottom of the frame (rows ``H - banner_height .. H``)."""
    h, w = img.shape
    bh = banner_height(h)
    strip = Image.new("L", (w, bh), 10)
    ImageDraw.Draw(strip).text((4, max(0, (bh - 11) // 2)), text, fill=235)
    out = img.copy()
    out[h - bh:] = np.asarray(strip, dtype=np.float64) / 255.0
    return out


def render_sem(structure: np.ndarray, rng: np.random.Generator, regime: Regime, extra: np.ndarray | None = None,
               gain: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """A family's imaging: material level, bright edges, metal grain, charging streaks, beam blur, shot noise and
    detector gain / offset. Returns ``(H, W)`` in [0, 1]."""
    soft = ndimage.gaussian_filter(structure, 1.0)
    edge = np.hypot(ndimage.sobel(soft, 0), ndimage.sobel(soft, 1))
    edge /= max(edge.max(), 1e-6)
    img = regime.base + regime.material * soft + regime.edge_gain * edge
    if regime.texture:
        img += regime.texture * _mottle(rng, *soft.shape) * (0.35 + np.clip(soft, 0, 1))
    if extra is not None:
        img += extra
    if rng.random() < regime.streak_prob:
        img += _charging(edge, rng, regime.streak_strength)
    if regime.blur:
        img = ndimage.gaussian_filter(img, regime.blur)
    img += rng.standard_normal(img.shape) * regime.noise * np.sqrt(np.clip(img, 0.02, None))
    return np.clip(offset + gain * img, 0.0, 1.0)


def _mottle(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Grainy low-frequency mottling (unit-ish amplitude): coarse and medium noise upsampled bicubically."""
    out = np.zeros((h, w), np.float32)
    for cell, weight in ((24, 0.7), (6, 0.45)):
        small = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
        big = Image.fromarray(small).resize(((w // cell + 2) * cell, (h // cell + 2) * cell), Image.Resampling.BICUBIC)
        out += weight * np.asarray(big)[:h, :w]
    return out


def _charging(edge: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Charging: bright tails fading to the right of bright edges along the scan rows (short on every row, long
    and strong on a few streak rows)."""
    h = edge.shape[0]
    hot = ndimage.uniform_filter1d(np.where(rng.random(h) < 0.04, rng.uniform(0.6, 1.6, h), 0.0), 2)
    out = np.zeros_like(edge)
    for rows, length in ((np.full(h, 0.35), rng.uniform(6, 20)), (hot, rng.uniform(40, 160))):
        decay = float(np.exp(-1.0 / length))
        out += signal.lfilter([1 - decay], [1, -decay], edge * rows[:, None], axis=1)
    return strength * out / max(float(np.percentile(out, 99.5)), 1e-6)


def scan_drift(rng: np.random.Generator, h: int, regime: Regime) -> np.ndarray:
    """Integer horizontal offset per row: row-wise jitter plus a slow sinusoidal distortion (px)."""
    if not (regime.jitter or regime.drift):
        return np.zeros(h, np.int64)
    jitter = ndimage.gaussian_filter1d(rng.standard_normal(h), 1.0)
    jitter *= regime.jitter / max(float(jitter.std()), 1e-6)
    y = np.arange(h) / h
    slow = regime.drift * rng.uniform(0.4, 1.0) * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * y + rng.uniform(0, 6.3))
    return np.rint(jitter + slow).astype(np.int64)


def shift_rows(arr: np.ndarray, dx: np.ndarray, fill: float | bool | None = None) -> np.ndarray:
    """``out[y, x] = arr[y, x - dx[y]]``; columns from outside the frame repeat the edge, or are ``fill``."""
    if not dx.any():
        return arr
    w = arr.shape[1]
    cols = np.arange(w)[None, :] - dx[:, None]
    out = np.take_along_axis(arr, np.clip(cols, 0, w - 1), axis=1)
    if fill is not None:
        out[(cols < 0) | (cols >= w)] = fill
    return out
