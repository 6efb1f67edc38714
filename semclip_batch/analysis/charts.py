"""The report's pictures as PNG bytes: wafer maps, the Pareto chart, defect rates per wafer, frame overlays.

Charts are drawn on ``matplotlib.figure.Figure`` objects with the Agg renderer (no pyplot state, no GUI, no
fonts fetched: matplotlib's bundled DejaVu Sans). Overlays are plain numpy + Pillow.
"""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Arc, Circle, Patch, Rectangle
from PIL import Image
from scipy import ndimage

from semclip_batch.io.levels import stretch

ERROR = "(error)"
"""The category of rows that were not scored (any non-ok status); not a class name a run can have."""
# Distinct colours for the defect classes, in the run's class order (tab10 less its green and grey, then tab20's
# lighter tones); normal dies are pale green, dies with only error rows dark grey.
DEFECT_COLOURS = ("#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
                  "#aec7e8", "#ffbb78", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")
NORMAL_COLOUR = "#a6d9a0"
ERROR_COLOUR = "#5a5a5a"
CONTOUR_RGB = (255, 40, 40)
THUMB_SIDE = 240
DPI = 100


@dataclass(frozen=True)
class Palette:
    """Colour and legend label of every category a chart can show, in legend order."""

    normal: str
    defects: tuple[str, ...]

    @property
    def order(self) -> tuple[str, ...]:
        return (*self.defects, self.normal, ERROR)

    def colour(self, key: str) -> str:
        if key == self.normal:
            return NORMAL_COLOUR
        if key == ERROR:
            return ERROR_COLOUR
        return DEFECT_COLOURS[self.defects.index(key) % len(DEFECT_COLOURS)] if key in self.defects else "#000000"

    @staticmethod
    def label(key: str) -> str:
        return "error (not scored)" if key == ERROR else key


def _png(fig: Figure) -> bytes:
    sink = io.BytesIO()
    with warnings.catch_warnings():  # a wafer id in a script DejaVu lacks draws boxes; say nothing of it
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        fig.savefig(sink, format="png", dpi=DPI)
    return sink.getvalue()


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def wafer_map_png(dies: Sequence[tuple[int, int, str]], palette: Palette) -> bytes:
    """A wafer outline with one square per die position, coloured by the die's category, and a legend.

    Args:
        dies: ``(die_x, die_y, category)`` of every die with a frame; category is a defect class, the normal
            class or :data:`ERROR`. Die positions inside the outline without a frame are drawn empty.
    """
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    cx, cy, radius = _outline(dies)
    ax.add_patch(Circle((cx, cy), radius, facecolor="#f2f2f2", edgecolor="#404040", linewidth=1.5, zorder=0))
    notch = radius * 0.04 + 0.1  # the orientation notch: a half-disc cut out of the bottom edge
    ax.add_patch(Circle((cx, cy - radius), notch, facecolor="white", edgecolor="none", zorder=1))
    ax.add_patch(Arc((cx, cy - radius), 2 * notch, 2 * notch, theta1=0, theta2=180, edgecolor="#404040",
                     linewidth=1.5, zorder=1))
    seen = {(x, y): cat for x, y, cat in dies}
    for x, y in _positions_inside(cx, cy, radius):
        if (x, y) not in seen:
            ax.add_patch(Rectangle((x - 0.45, y - 0.45), 0.9, 0.9, facecolor="white", edgecolor="#c8c8c8",
                                   linewidth=0.6, zorder=2))
    for (x, y), cat in seen.items():
        ax.add_patch(Rectangle((x - 0.45, y - 0.45), 0.9, 0.9, facecolor=palette.colour(cat), edgecolor="#303030",
                               linewidth=0.6, hatch="//" if cat == ERROR else None, zorder=3))
    pad = radius * 0.06
    ax.set_xlim(cx - radius - pad, cx + radius + pad)
    ax.set_ylim(cy - radius - pad, cy + radius + pad)
    ax.set_aspect("equal")
    ax.axis("off")
    counts = Counter(seen.values())
    handles = [Patch(facecolor=palette.colour(k), edgecolor="#303030", hatch="//" if k == ERROR else None,
                     label=f"{_short(palette.label(k), 22)} ({counts[k]})") for k in palette.order if counts[k]]
    handles.append(Patch(facecolor="white", edgecolor="#c8c8c8", label="no frame"))
    fig.legend(handles=handles, loc="outside right center", title="dies", fontsize=9, title_fontsize=9, frameon=False)
    return _png(fig)


def _outline(dies: Sequence[tuple[int, int, str]]) -> tuple[float, float, float]:
    """Centre and radius of a circle holding every die square (a die at (x, y) covers x ± 0.5, y ± 0.5)."""
    xs = np.array([d[0] for d in dies] or [0], dtype=np.float64)
    ys = np.array([d[1] for d in dies] or [0], dtype=np.float64)
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    corner = np.hypot(np.abs(xs - cx) + 0.5, np.abs(ys - cy) + 0.5).max()
    return float(cx), float(cy), float(max(corner + 0.3, 1.5))


def _positions_inside(cx: float, cy: float, radius: float) -> list[tuple[int, int]]:
    """Integer die positions whose whole square lies inside the circle (at most ~40,000 of them)."""
    if radius > 120:  # a grid that large draws as a grey disc anyway
        return []
    out = []
    for x in range(math.floor(cx - radius), math.ceil(cx + radius) + 1):
        for y in range(math.floor(cy - radius), math.ceil(cy + radius) + 1):
            if math.hypot(abs(x - cx) + 0.5, abs(y - cy) + 0.5) <= radius:
                out.append((x, y))
    return out


def pareto_png(counts: Sequence[tuple[str, int]], palette: Palette) -> bytes:
    """Defect classes by frame count, largest first, with the cumulative share as a line (right axis)."""
    ranked = sorted(((c, n) for c, n in counts if n > 0), key=lambda cn: (-cn[1], palette.order.index(cn[0])
                                                                      if cn[0] in palette.order else 99))
    total = sum(n for _, n in ranked) or 1
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    names = [_short(c) for c, _ in ranked]
    values = [n for _, n in ranked]
    bars = ax.bar(range(len(ranked)), values, color=[palette.colour(c) for c, _ in ranked], edgecolor="#303030")
    ax.bar_label(bars, fontsize=9, padding=2)
    ax.set_xticks(range(len(ranked)), names, rotation=30 if len(ranked) > 4 else 0,
                  ha="right" if len(ranked) > 4 else "center")
    ax.set_ylabel("defective frames")
    ax.set_ylim(0, max(values, default=1) * 1.18)
    ax.spines[["top"]].set_visible(False)
    line = ax.twinx()
    cumulative = np.cumsum(values) / total * 100
    line.plot(range(len(ranked)), cumulative, color="#202020", marker="o", linewidth=1.5)
    line.set_ylim(0, 110)
    line.set_ylabel("cumulative %")
    line.spines[["top"]].set_visible(False)
    return _png(fig)


def rate_png(wafers: Sequence[tuple[str, int, Mapping[str, int]]], palette: Palette) -> bytes:
    """Defect rate per wafer (defective / ok frames, %), stacked by defect class.

    Args:
        wafers: ``(wafer_id, n_ok, {defect class: frames})`` per wafer, in display order.
    """
    fig = Figure(figsize=(max(4.8, min(12.0, 1.2 + 0.45 * len(wafers))), 3.8), layout="constrained")
    ax = fig.add_subplot()
    positions = np.arange(len(wafers))
    bottom = np.zeros(len(wafers))
    for cls in palette.defects:
        share = np.array([100 * w[2].get(cls, 0) / w[1] if w[1] else 0.0 for w in wafers])
        if share.any():
            ax.bar(positions, share, bottom=bottom, color=palette.colour(cls), edgecolor="#303030", linewidth=0.5,
                   label=_short(cls))
            bottom += share
    for i, (_, n_ok, _) in enumerate(wafers):
        ax.annotate("no ok frame" if not n_ok else f"{bottom[i]:.0f}%", (i, bottom[i]), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    many = len(wafers) > 6 or any(len(w[0]) > 6 for w in wafers)
    ax.set_xticks(positions, [_short(w[0], 14) for w in wafers], rotation=45 if many else 0, ha="right" if many else "center")
    ax.set_ylabel("defective frames, % of ok")
    ax.set_ylim(0, max(100.0, float(bottom.max(initial=0)) * 1.12))
    ax.spines[["top", "right"]].set_visible(False)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return _png(fig)


def overlay_png(frame: np.ndarray | None, mask: np.ndarray, level: int) -> bytes:
    """A thumbnail (longer side :data:`THUMB_SIDE`): the frame (percentile-stretched grey), or the mask itself
    when there is no frame, with its defect pixels (``mask >= level``) outlined in red and lightly filled.

    Args:
        frame: ``(H, W)`` float grey frame, or None.
        mask: ``(H, W)`` uint8 stored mask (``round(255 * map)``).
        level: the grey level from which a mask pixel is a defect pixel.
    """
    h, w = mask.shape
    scale = THUMB_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small_mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.BILINEAR))
    if frame is not None and frame.shape == mask.shape:
        grey = Image.fromarray((stretch(frame, 0.5, 99.5) * 255).astype(np.uint8))
        base = np.asarray(grey.resize(size, Image.Resampling.BICUBIC)).astype(np.float32)
    else:
        base = small_mask.astype(np.float32)
    rgb = np.repeat(base[..., None], 3, axis=-1)
    region = small_mask >= level
    rgb[region] = 0.75 * rgb[region] + 0.25 * np.array(CONTOUR_RGB, np.float32)
    edge = ndimage.binary_dilation(region & ~ndimage.binary_erosion(region, border_value=0))
    rgb[edge & ~ndimage.binary_erosion(region, iterations=2, border_value=0)] = CONTOUR_RGB
    sink = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(sink, format="PNG")
    return sink.getvalue()
