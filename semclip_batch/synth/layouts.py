"""Layouts of the non-classic families: Manhattan routing, contact/via hole arrays and wide metal line/space.

A layout is drawn once as boxes (conductors) and stamped dots (vias / contacts) in frame coordinates with a
margin around the frame, so the reference frame is the same layout shifted by a few px. In the drawn structure
0 is background, 1 conductor and :data:`VIA` a via landing on a conductor (rendered brighter, its own rim).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

VIA = 1.6


@dataclass(frozen=True, eq=False)
class Drawn:
    """A drawn layout. ``boxes``: ``(N, 4)`` int ``y0, x0, y1, x1`` (end exclusive); ``dots``: ``(M, 2)`` int
    centres of identical ``stamp`` ellipses (``(K, 2)`` int offsets) of value ``dot_value``. ``vertical``: the
    conductors run along y (neighbours are found across x)."""

    kind: str
    pitch: int
    vertical: bool
    boxes: np.ndarray
    dots: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    stamp: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    dot_value: float = 1.0
    dot_radii: tuple[float, float] = (0.0, 0.0)


def make_layout(kind: str, rng: np.random.Generator, h: int, w: int, pitch: tuple[int, int]) -> Drawn:
    p = min(int(rng.integers(pitch[0], pitch[1] + 1)), max(8, min(h, w) // 4))  # at least ~4 pitches a frame
    if kind == "routing":
        return _routing(rng, h, w, p)
    if kind == "holes":
        return _holes(rng, h, w, p)
    if kind == "metal":
        return _metal(rng, h, w, p)
    raise ValueError(f"unknown layout kind {kind!r}")


def draw(layout: Drawn, h: int, w: int, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The structure ``(H, W)`` float of ``layout`` moved by ``shift`` (dy, dx) px."""
    s = np.zeros((h, w))
    dy, dx = shift
    for y0, x0, y1, x1 in layout.boxes.tolist():
        s[max(y0 + dy, 0):max(y1 + dy, 0), max(x0 + dx, 0):max(x1 + dx, 0)] = 1.0
    if len(layout.dots):
        pts = (layout.dots + np.array([dy, dx]))[:, None, :] + layout.stamp[None, :, :]
        ys, xs = pts[..., 0].ravel(), pts[..., 1].ravel()
        keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        s[ys[keep], xs[keep]] = layout.dot_value
    return s


def ellipse_stamp(ry: float, rx: float) -> np.ndarray:
    """Integer offsets ``(K, 2)`` of the pixels of an axis-aligned ellipse centred on a pixel."""
    yy, xx = np.mgrid[-int(ry) - 1:int(ry) + 2, -int(rx) - 1:int(rx) + 2]
    inside = (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0
    return np.stack([yy[inside], xx[inside]], axis=1).astype(np.int64)


def _oriented(boxes: list[tuple[float, float, float, float]], vertical: bool) -> np.ndarray:
    """Track-space boxes ``(across0, along0, across1, along1)`` -> frame ``(y0, x0, y1, x1)`` int."""
    arr = np.rint(np.asarray(boxes, np.float64).reshape(-1, 4)).astype(np.int64)
    return arr[:, [1, 0, 3, 2]] if vertical else arr


class _Router:
    """Manhattan routing on a track grid: nets of segments along tracks, jogs (corners), T-junctions, line ends,
    power rails and vias with landing pads. Different nets never touch (spaces >= ~0.35 pitch)."""

    def __init__(self, rng: np.random.Generator, across: int, along: int, pitch: int) -> None:
        self.rng, self.p = rng, pitch
        pad = 2 * pitch
        self.k_n, self.j_n = (across + 2 * pad) // pitch + 1, (along + 2 * pad) // pitch + 1
        self.org_a = -pad + int(rng.integers(0, pitch))
        self.org_l = -pad + int(rng.integers(0, pitch))
        self.narrow, self.wide = pitch * rng.uniform(0.36, 0.46), pitch * rng.uniform(0.55, 0.62)
        self.occ = np.zeros((self.k_n, self.j_n), bool)
        self.boxes: list[tuple[float, float, float, float]] = []
        self.vias: list[tuple[float, float]] = []

    def ca(self, k: int) -> float:
        return self.org_a + k * self.p

    def cl(self, j: int) -> float:
        return self.org_l + j * self.p

    def segment(self, k: int, a: int, b: int, wd: float) -> None:
        self.occ[k, a:b + 1] = True
        self.boxes.append((self.ca(k) - wd / 2, self.cl(a) - wd / 2, self.ca(k) + wd / 2, self.cl(b) + wd / 2))

    def connector(self, k: int, k2: int, j: int, wd: float) -> None:
        self.occ[k:k2 + 1, j] = True
        self.boxes.append((self.ca(k) - wd / 2, self.cl(j) - wd / 2, self.ca(k2) + wd / 2, self.cl(j) + wd / 2))

    def via(self, k: int, j: int) -> None:
        half = self.wide / 2
        self.boxes.append((self.ca(k) - half, self.cl(j) - half, self.ca(k) + half, self.cl(j) + half))
        self.vias.append((self.ca(k), self.cl(j)))

    def free(self, k: int, a: int, b: int) -> bool:
        return 0 <= k < self.k_n and a >= 0 and b < self.j_n and not self.occ[k, a:b + 1].any()

    def run(self) -> None:
        rng = self.rng
        for k in range(self.k_n):
            if k + 1 < self.k_n and not self.occ[k:k + 2].any() and rng.random() < 0.06:
                self.occ[k:k + 2] = True  # a power rail: one wide line over two tracks
                half = self.narrow / 2
                self.boxes.append((self.ca(k) - half, self.cl(0), self.ca(k + 1) + half, self.cl(self.j_n - 1)))
                continue
            j = int(rng.integers(0, 3))
            while j < self.j_n:
                if self.occ[k, j]:
                    j += 1
                    continue
                length, end = int(rng.integers(2, 15)), j
                while end + 1 < self.j_n and not self.occ[k, end + 1] and end - j + 1 < length:
                    end += 1
                if end > j:  # no one-cell islands
                    self.net(k, j, end)
                j = end + 1 + int(rng.choice([0, 0, 1, 1, 2]))

    def net(self, k: int, a: int, b: int) -> None:
        rng = self.rng
        wd = self.wide if rng.random() < 0.2 else self.narrow
        self.segment(k, a, b, wd)
        roll = rng.random()
        if roll < 0.2 and self.free(k + 1, b, b + 6):  # jog: corner down to the next track and on
            m = b + int(rng.integers(1, 7))
            self.connector(k, k + 1, b, wd)
            self.segment(k + 1, b, m, wd)
        elif roll < 0.35 and b > a + 1:  # T-junction: a stub from the middle, ending on a short cross segment
            mid = int(rng.integers(a + 1, b))
            depth = int(rng.integers(1, 4))
            if all(self.free(k + d, mid, mid) for d in range(1, depth)) and self.free(k + depth, mid - 1, mid + 1):
                self.connector(k, k + depth, mid, wd)
                self.segment(k + depth, mid - 1, mid + 1, wd)
        elif roll < 0.5:  # L: turn to the perpendicular and end
            depth = int(rng.integers(1, 4))
            if all(self.free(k + d, b, b) for d in range(1, depth + 1)):
                self.connector(k, k + depth, b, wd)
        for j in (a, b):
            if rng.random() < 0.3:
                self.via(k, j)


def _routing(rng: np.random.Generator, h: int, w: int, pitch: int) -> Drawn:
    vertical = bool(rng.random() < 0.5)
    router = _Router(rng, w if vertical else h, h if vertical else w, pitch)
    router.run()
    r = 0.2 * pitch
    vias = np.rint(np.asarray(router.vias, np.float64).reshape(-1, 2)).astype(np.int64)
    return Drawn(kind="routing", pitch=pitch, vertical=vertical, boxes=_oriented(router.boxes, vertical),
                 dots=vias[:, ::-1] if vertical else vias, stamp=ellipse_stamp(r, r), dot_value=VIA, dot_radii=(r, r))


def _holes(rng: np.random.Generator, h: int, w: int, pitch: int) -> Drawn:
    """Contact / via holes: square or staggered grid, x/y pitch differ, round or slightly elliptical."""
    py = round(pitch * rng.uniform(0.85, 1.3))
    stagger = bool(rng.random() < 0.5)
    d = min(pitch, py) * rng.uniform(0.45, 0.62)
    e = 1.0 if rng.random() < 0.5 else rng.uniform(0.85, 1.18)
    ry, rx = d / 2 * e, d / 2 / e
    oy, ox = int(rng.integers(0, py)), int(rng.integers(0, pitch))
    rows = np.arange(-2, h // py + 3) * py + oy
    cols = np.arange(-2, w // pitch + 3) * pitch + ox
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    if stagger:
        xx = xx + (np.arange(len(rows))[:, None] % 2) * (pitch // 2)
    dots = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.int64)
    return Drawn(kind="holes", pitch=pitch, vertical=True, boxes=np.zeros((0, 4), np.int64), dots=dots,
                 stamp=ellipse_stamp(ry, rx), dot_value=1.0, dot_radii=(ry, rx))


def _metal(rng: np.random.Generator, h: int, w: int, pitch: int) -> Drawn:
    """Wide line/space, vertical or horizontal, pitch and width varying line by line (some double lines)."""
    vertical = bool(rng.random() < 0.5)
    across, along = (w, h) if vertical else (h, w)
    boxes: list[tuple[float, float, float, float]] = []
    pos = -2.0 * pitch + rng.uniform(0, pitch)
    while pos < across + 2 * pitch:
        local = pitch * rng.uniform(0.85, 1.2)
        wd = local * rng.uniform(0.42, 0.6) * (1.8 if rng.random() < 0.12 else 1.0)
        boxes.append((pos, -2 * pitch, pos + wd, along + 2 * pitch))
        pos += wd + local * rng.uniform(0.4, 0.6) + (local if rng.random() < 0.08 else 0.0)
    return Drawn(kind="metal", pitch=pitch, vertical=vertical, boxes=_oriented(boxes, vertical))
