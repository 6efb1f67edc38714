"""A routing-layer SEM lot of our own, for die-to-die (reference frame) tests: numpy + scipy + PIL only.

Deliberately independent of ``semclip_batch.synth``: a different layout model, renderer and noise, so that a
test passing on it is not the package agreeing with itself.

Layout: a Manhattan router on a track grid (pitch :data:`PITCH`). Each net walks the grid from a random node,
turning at every segment end (L-corners); some segments sit on the power-rail width. Stubs leave the middle of
existing wires at right angles (T-junctions), and square vias sit on nodes of the wires. Wire widths
:data:`WIDTHS`. The layout is drawn on a canvas :data:`MARGIN` px larger than the frame on every side.

Rendering (SEM-like): conductor brighter than the dielectric, vias brighter still; the structure is blurred
(beam spot), the gradient magnitude of the blurred structure is added (edge effect: edges bright), a faint
charging gradient across the field, then shot noise (Poisson on a per-frame electron dose) and a little
detector read noise.

The reference of a frame images the *same* site on another die: the clean canvas moved by a random sub-pixel
offset of 2-6 px in each axis (random sign; ``scipy.ndimage.shift``, cubic), then another gain (0.8-1.2),
offset (+-15 grey levels) and its own noise. With ``frame[y, x] = clean[y, x]`` the reference is
``reference[y, x] = clean[y - sy, x - sx]`` for the recorded ``(sy, sx)``, i.e. ``frame ~= ndimage.shift(
reference, (-sy, -sx))``.

Defect frames (label ``particle``) carry one bright particle, a blurred disk of radius 2-4 px, centred on the
dielectric or on a wire (alternately), at least :data:`DEFECT_MARGIN` px from the border; its truth mask
(0/255 PNG) is the disk. Normal frames (label ``normal``) get an all-zero mask.

``write_routing_lot`` writes 8-bit PNGs and two manifests (support, test); the same arguments give the same
bytes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

PITCH = 40  # px between routing tracks
WIDTHS = (6, 10, 18)  # wire widths, px
WIDTH_P = (0.45, 0.35, 0.20)
MARGIN = 24  # canvas margin around the frame: more than the largest reference shift plus the blur
SHIFT_RANGE = (2.0, 6.0)  # |reference offset| per axis, px
GAIN_RANGE = (0.8, 1.2)
OFFSET_RANGE = 15.0
RADIUS_RANGE = (2, 4)  # particle radius, px (4-8 px across)
DEFECT_MARGIN = 40  # particle centres at least this far from the frame border
COLUMNS = ("uri", "lot_id", "wafer_id", "die_x", "die_y", "label", "mask_uri", "reference_uri")


def write_routing_lot(folder: Path, n_support: int, n_test: int, seed: int,
                      size: tuple[int, int] = (512, 512)) -> dict:
    """Write a support set (``n_support`` normal + ``n_support`` particle frames) and a test set (``n_test``
    particle frames) under ``folder``, each frame with its reference frame.

    Returns ``{"support": Path, "test": Path, "defects": {uri: (row, col)}, "shifts": {uri: (sy, sx)}}``:
    the two manifests (uris relative to ``folder``), the test frames' particle centres, and for every frame
    the offset its reference was rendered with (see the module docstring for the sign).
    """
    folder = Path(folder)
    height, width = size
    lot = f"RT-S{seed}"
    streams = np.random.SeedSequence([seed, 0x5EC1]).spawn(2 * n_support + n_test)
    plan = [("support", "normal", k) for k in range(n_support)]
    plan += [("support", "particle", n_support + k) for k in range(n_support)]
    plan += [("test", "particle", k) for k in range(n_test)]
    rows: dict[str, list[dict[str, str]]] = {"support": [], "test": []}
    defects: dict[str, tuple[int, int]] = {}
    shifts: dict[str, tuple[float, float]] = {}
    for stream, (split, label, index) in zip(streams, plan, strict=True):
        rng = np.random.default_rng(stream)
        sub = folder / split
        sub.mkdir(parents=True, exist_ok=True)
        stem = f"{split}/die{index:02d}"
        frame, reference, mask, centre, shift = _render_pair(rng, height, width, defect=label == "particle",
                                                             on_wire=index % 2 == 1)
        _save(folder / f"{stem}_frame.png", frame)
        _save(folder / f"{stem}_ref.png", reference)
        _save(folder / f"{stem}_mask.png", mask)
        uri = f"{stem}_frame.png"
        shifts[uri] = shift
        if split == "test" and centre is not None:
            defects[uri] = centre
        rows[split].append({"uri": uri, "lot_id": lot, "wafer_id": "W01", "die_x": str(index % 4),
                            "die_y": str(index // 4 + (10 if split == "test" else 0)), "label": label,
                            "mask_uri": f"{stem}_mask.png", "reference_uri": f"{stem}_ref.png"})
    paths = {}
    for split, split_rows in rows.items():
        path = folder / f"{split}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(split_rows)
        paths[split] = path
    return {"support": paths["support"], "test": paths["test"], "defects": defects, "shifts": shifts}


# ---------------------------------------------------------------------------------------------------------------
# layout


def _route(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Structure of a routing layer on an ``(h, w)`` canvas: 0 dielectric, 1 wire, 1.5 via."""
    wire = np.zeros((h, w), dtype=np.float32)
    vias = np.zeros((h, w), dtype=bool)
    oy, ox = (int(v) for v in rng.integers(PITCH // 4, PITCH, 2))
    ny, nx = (h - oy - PITCH // 4) // PITCH + 1, (w - ox - PITCH // 4) // PITCH + 1  # track nodes per axis
    used: set[tuple[int, int, int]] = set()  # grid edges already routed: (axis, i, j) from node (i, j)
    interior: list[tuple[int, int, int, int]] = []  # (i, j, width, axis) nodes in the middle of a segment

    def bar(i0: int, j0: int, i1: int, j1: int, t: int) -> None:
        """A wire of width ``t`` from node (i0, j0) to (i1, j1) (same row or column), square ends half a width
        beyond the nodes so that corners close."""
        y0, y1 = sorted((oy + i0 * PITCH, oy + i1 * PITCH))
        x0, x1 = sorted((ox + j0 * PITCH, ox + j1 * PITCH))
        a, b = t // 2, t - t // 2
        wire[max(y0 - a, 0):y1 + b, max(x0 - a, 0):x1 + b] = 1.0

    def via(i: int, j: int, t: int) -> None:
        side = int(min(t + 2, 12)) if t < 18 else 10
        y, x = oy + i * PITCH - side // 2, ox + j * PITCH - side // 2
        vias[max(y, 0):y + side, max(x, 0):x + side] = True

    n_nets = max(4, (ny * nx) // 7)
    for _ in range(n_nets):
        t = int(rng.choice(WIDTHS, p=WIDTH_P))
        i, j = int(rng.integers(0, ny)), int(rng.integers(0, nx))
        axis = int(rng.integers(0, 2))  # 0: along a row (horizontal), 1: along a column (vertical)
        segments = int(rng.integers(2, 5))
        for s in range(segments):
            length = int(rng.integers(2, 7)) * (1 if rng.random() < 0.5 else -1)
            di, dj = (0, length) if axis == 0 else (length, 0)
            i1, j1 = int(np.clip(i + di, 0, ny - 1)), int(np.clip(j + dj, 0, nx - 1))
            steps = max(abs(i1 - i), abs(j1 - j))
            if steps == 0:
                axis = 1 - axis
                continue
            si, sj = np.sign(i1 - i), np.sign(j1 - j)
            edges = [(axis, min(i + k * si, i + (k + 1) * si), min(j + k * sj, j + (k + 1) * sj)) for k in range(steps)]
            if any(e in used for e in edges):  # routed already: turn instead (keeps nets from running on top)
                axis = 1 - axis
                continue
            used.update(edges)
            bar(i, j, i1, j1, t)
            interior += [(int(i + k * si), int(j + k * sj), t, axis) for k in range(1, steps)]
            if s == 0 and rng.random() < 0.6:
                via(i, j, t)
            i, j, axis = i1, j1, 1 - axis
        if rng.random() < 0.6:
            via(i, j, t)
    # T-junctions: stubs leaving the middle of existing wires at right angles
    for k in rng.permutation(len(interior))[: max(3, len(interior) // 10)].tolist():
        i, j, t, axis = interior[k]
        length = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1)
        i1, j1 = (int(np.clip(i + length, 0, ny - 1)), j) if axis == 0 else (i, int(np.clip(j + length, 0, nx - 1)))
        if (i1, j1) != (i, j):
            bar(i, j, i1, j1, min(t, 10))
            if rng.random() < 0.5:
                via(i1, j1, min(t, 10))
    return np.where(vias & (wire > 0), np.float32(1.5), wire)


# ---------------------------------------------------------------------------------------------------------------
# rendering


def _clean_canvas(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free grey canvas ``(h, w)`` float64 of a fresh routing site, and its structure."""
    structure = _route(rng, h, w)
    spot = float(rng.uniform(1.3, 1.9))
    soft = ndimage.gaussian_filter(structure.astype(np.float64), spot)
    edges = np.hypot(ndimage.sobel(soft, axis=0), ndimage.sobel(soft, axis=1))
    edges *= spot * np.sqrt(2.0 * np.pi) / 8.0  # ~1 on a unit step whatever the spot size
    dielectric, conductor, edge_gain = float(rng.uniform(45, 65)), float(rng.uniform(55, 75)), float(rng.uniform(75, 100))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    charging = float(rng.uniform(-10, 10)) * yy + float(rng.uniform(-10, 10)) * xx
    return dielectric + conductor * soft + edge_gain * np.minimum(edges, 1.6) + charging, structure


def _particle(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(blurred disk in [0, 1], disk mask) of ``radius`` px at ``centre``."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    return ndimage.gaussian_filter(disk.astype(np.float64), 0.8), disk


def _expose(rng: np.random.Generator, grey: np.ndarray) -> np.ndarray:
    """Shot noise at a random dose (electrons per grey level) plus detector read noise; uint8."""
    dose = float(rng.uniform(0.7, 1.3))
    counts = rng.poisson(np.clip(grey, 0.0, None) * dose) / dose
    return np.clip(np.rint(counts + rng.normal(0.0, 2.5, grey.shape)), 0, 255).astype(np.uint8)


def _render_pair(rng: np.random.Generator, h: int, w: int, defect: bool, on_wire: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int] | None, tuple[float, float]]:
    """(frame, reference, mask uint8 0/255, particle centre or None, reference offset (sy, sx))."""
    canvas, structure = _clean_canvas(rng, h + 2 * MARGIN, w + 2 * MARGIN)
    inner = (slice(MARGIN, MARGIN + h), slice(MARGIN, MARGIN + w))
    frame = canvas[inner].copy()
    magnitude = rng.uniform(*SHIFT_RANGE, 2)
    sign = np.where(rng.random(2) < 0.5, -1.0, 1.0)
    sy, sx = (float(v) for v in np.round(magnitude * sign, 3))
    reference = ndimage.shift(canvas, (sy, sx), order=3, mode="nearest")[inner]
    gain, offset = float(rng.uniform(*GAIN_RANGE)), float(rng.uniform(-OFFSET_RANGE, OFFSET_RANGE))
    reference = gain * reference + offset
    mask = np.zeros((h, w), dtype=np.uint8)
    centre = None
    if defect:
        if on_wire:
            on = structure[inner] > 0
        else:  # dielectric at least a few px from any wire, so the particle sits on the background
            on = ndimage.binary_erosion(structure[inner] == 0, iterations=6)
        allowed = np.zeros((h, w), dtype=bool)
        allowed[DEFECT_MARGIN:h - DEFECT_MARGIN, DEFECT_MARGIN:w - DEFECT_MARGIN] = True
        candidates = np.argwhere(on & allowed)
        if len(candidates) == 0:
            candidates = np.argwhere(allowed)
        cy, cx = (int(v) for v in candidates[int(rng.integers(0, len(candidates)))])
        radius = int(rng.integers(RADIUS_RANGE[0], RADIUS_RANGE[1] + 1))
        blob, disk = _particle((h, w), (cy, cx), radius)
        frame = frame + float(rng.uniform(90, 120)) * blob
        mask[disk] = 255
        centre = (cy, cx)
    return _expose(rng, frame), _expose(rng, reference), mask, centre, (sy, sx)


def _save(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="PNG", optimize=False)
