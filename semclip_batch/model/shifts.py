"""The map averaged over half-patch shifts of the view (``run --map-shifts``).

A ViT scores a view on a fixed grid of patches (16 px at model input for the shipped backbones): a defect that
straddles two patches, or is smaller than one, lands in each patch's token diluted, and the map upsampled from the
grid is blurred by the grid's own phase. Scoring the view again with its content moved by half a patch puts the
patch borders where the first grid had patch centres; each map is moved back onto the view and the maps are
averaged. Pure torch; what is shifted and scored is the caller's (:mod:`semclip_batch.methods.scoring`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def half_patch_offsets(shifts: int, patch: int) -> tuple[tuple[int, int], ...]:
    """The ``(down, right)`` pixel offsets scored besides the view itself for ``shifts`` views in all (1, 2 or 4,
    ``config.MAP_SHIFTS``): none, the diagonal half patch, or the three half-patch offsets."""
    half = patch // 2
    offsets = {1: (), 2: ((half, half),), 4: ((0, half), (half, 0), (half, half))}
    if shifts not in offsets:
        raise ValueError(f"map shifts must be one of {', '.join(map(str, offsets))}, got {shifts}")
    return offsets[shifts]


def shift_views(views: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """Content moved ``down`` and ``right`` pixels, the border it leaves reflected in; the size kept.
    ``(..., H, W)`` with at least one leading dimension -> the same shape."""
    h, w = views.shape[-2], views.shape[-1]
    if down >= h or right >= w:
        raise ValueError(f"a shift of ({down}, {right}) px does not fit a {h} x {w} view")
    flat = views.reshape(-1, 1, h, w) if views.dim() != 4 else views
    moved = F.pad(flat, (right, 0, down, 0), mode="reflect")[..., :h, :w]
    return moved.reshape(views.shape)


def unshift_maps(maps: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """Maps of shifted views moved back onto the view (the inverse of :func:`shift_views` where both are defined);
    the ``down`` bottom rows and ``right`` last columns, which no shifted pixel covers, repeat their neighbours.
    ``(B, H, W)`` -> ``(B, H, W)``."""
    back = maps[:, down:, right:]
    return F.pad(back[:, None], (0, right, 0, down), mode="replicate")[:, 0]


def patch_size(conv: torch.nn.Conv2d) -> int:
    """The patch side of a ViT's patch embedding (its convolution's kernel)."""
    kernel = conv.kernel_size
    return int(kernel[0] if isinstance(kernel, tuple) else kernel)
