"""The line residual of a frame's grey levels (docs/quality.md, rule 23): what no long horizontal or vertical run
explains. Routing on a Manhattan layer is made of such runs (wires, corners and line ends all hold one of
:data:`LINE` px or more, as does the dielectric between tracks); a particle, a residue or a hole of a few pixels
does not. Pure torch: a grey-level opening and closing by a horizontal and a vertical line (running maxima, the
erosion as the maximum of the negated levels), on levels smoothed by a Gaussian of :data:`SIGMA` px. Only pixels
inside the frame count: a run that meets the frame's edge is structure if at least half a line of it is inside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from semclip_batch.model.semclip import gaussian_blur

LINE = 15  # px: the structuring lines' length (a defect longer than this along a row or a column is kept as structure)
LINES_MAX = 255  # px: the longest line a checkpoint may ask for
SIGMA = 1.0  # px: the smoothing before the opening (shot noise left out of the residual)


def smoothed(levels: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """``(H, W)`` levels blurred by a separable Gaussian of ``sigma`` px with reflected borders (the package's
    :func:`~semclip_batch.model.semclip.gaussian_blur`: matrix products, full float32 on a GPU too, where a
    convolution may run at TF32's precision); as they are on a frame too small to reflect."""
    if min(levels.shape) <= math.ceil(4 * sigma):
        return levels.float()
    return gaussian_blur(levels.float()[None], sigma)[0]


def window_max(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """The centred running maximum of an odd ``length`` along ``dim`` of ``x`` (the border padded with -inf, so only
    pixels inside count): doubling spans, about log2(length) + 1 elementwise maxima of shifted views instead of a
    pooling window of ``length`` reads a pixel (the same values: a maximum is exact)."""
    half = length // 2
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [half, half]
    m = F.pad(x, pad, value=-math.inf)
    span = 1
    while 2 * span <= length:
        n = m.shape[dim] - span
        m = torch.maximum(m.narrow(dim, 0, n), m.narrow(dim, span, n))  # m[j]: the max over 2 * span from j
        span *= 2
    rest = length - span
    if rest:
        n = m.shape[dim] - rest
        m = torch.maximum(m.narrow(dim, 0, n), m.narrow(dim, rest, n))
    return m


def _erode(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    return -window_max(-x, length, dim)


def line_residual(levels: torch.Tensor, length: int = LINE) -> torch.Tensor:
    """``(H, W)`` levels -> ``(H, W)`` residual >= 0: the smoothed levels above the larger of their openings by a
    horizontal and a vertical ``length``-px line (bright: what no bright run holds), or below the smaller of their
    closings by the same lines (dark), whichever is larger. ``length`` must be odd."""
    if length < 3 or length % 2 == 0:
        raise ValueError(f"the line residual's length must be odd and at least 3; got {length}")
    x = smoothed(levels)
    opened = torch.maximum(window_max(_erode(x, length, 1), length, 1), window_max(_erode(x, length, 0), length, 0))
    closed = torch.minimum(_erode(window_max(x, length, 1), length, 1), _erode(window_max(x, length, 0), length, 0))
    return torch.maximum(x - opened, closed - x).clamp_min(0)
