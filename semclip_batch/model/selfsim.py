"""In-frame self-similarity (beyond the paper): a patch that resembles no other part of its own frame scores high.

SEM review frames are mostly pattern that recurs within the frame (lines, contact arrays, routing with many
alike corners and ends); a defect is the part with no likeness elsewhere. Per frame, each patch's token (the
original path of the middle taps, as the normal-patch memory reads them: :func:`.memory.memory_taps`) is
compared with every patch of the same frame outside its own neighbourhood (Chebyshev radius
:data:`EXCLUDE_RADIUS` on the patch grid, so a defect spanning two patches does not match itself); the score is
``(1 - max cosine) / 2``, averaged over the taps, less the frame's median (a frame is compared with itself, not
with a bank: no support set is needed, so zero-shot models have it too). The map is
``clamp(centred / (2 * SCALE), 0, 1)`` and joins the method's map as ``(1 - w) * map + w * self``.

:data:`SCALE` and the default weight were chosen on the validation families (``classic`` with the shipped
backbone, ``contacts`` with a ``metal``-pretrained one; README "Self-similarity"); the taps, the radius and the
nearest match follow the memory (the alternatives measured there moved the figures little).
A defect that repeats across the frame, or a frame with no recurring pattern at the patch scale, gets little
from it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

EXCLUDE_RADIUS = 1  # patches within this Chebyshev distance of a patch are not its matches
SCALE = 0.05  # centred distance that maps to 0.5


@functools.lru_cache(maxsize=8)
def neighbourhood(grid: int, radius: int) -> torch.Tensor:
    """``(N, N)`` bool: patch pairs within ``radius`` of each other (Chebyshev) on a ``grid x grid`` grid."""
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    return ((yy[:, None] - yy[None]).abs() <= radius) & ((xx[:, None] - xx[None]).abs() <= radius)


def has_matches(n_patches: int, radius: int = EXCLUDE_RADIUS) -> bool:
    """Whether a square grid of ``n_patches`` has patches outside each other's neighbourhoods (more than
    ``2 * radius + 1`` a side): below that the map has nothing to say and is not fused."""
    return round(n_patches ** 0.5) > 2 * radius + 1


def self_distance(patches: torch.Tensor, radius: int = EXCLUDE_RADIUS) -> torch.Tensor:
    """``(1 - max cosine) / 2`` of each patch to the patches of its own frame outside its neighbourhood.
    ``(B, N, D)`` patch tokens of square grids -> ``(B, N)`` in [0, 1]; zeros where no patch lies outside
    (grids of at most ``2 * radius + 1`` patches a side)."""
    b, n, _ = patches.shape
    grid = round(n ** 0.5)
    if grid * grid != n:
        raise ValueError(f"{n} patches do not form a square grid")
    if not has_matches(n, radius):
        return patches.new_zeros(b, n, dtype=torch.float32)
    feats = F.normalize(patches.float(), dim=-1)
    cos = (feats @ feats.transpose(1, 2)).masked_fill(neighbourhood(grid, radius).to(feats.device), -1.0)
    return (1.0 - cos.amax(dim=-1)) / 2.0


def self_scores(distance: torch.Tensor) -> torch.Tensor:
    """Distances ``(B, N)`` -> scores in [0, 1]: less each frame's median, over ``2 * SCALE``, clamped."""
    centred = distance - distance.median(dim=1, keepdim=True).values
    return (centred / (2.0 * SCALE)).clamp(0.0, 1.0)
