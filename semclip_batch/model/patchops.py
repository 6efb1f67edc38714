"""Patch-grid operations the baselines and reference frames share: windows on the grid, harmonic aggregation
of window scores to patches, nearest-neighbour distances to a memory of normal features, and upsampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_index(grid: int, scale: int) -> torch.Tensor:
    """All ``scale x scale`` windows (stride 1) of a ``grid x grid`` patch grid, as flat patch indices.
    -> ``(n_windows, scale * scale)`` long, row-major windows."""
    rows = torch.arange(grid - scale + 1)
    base = (rows[:, None] * grid + rows[None, :]).flatten()
    offsets = (torch.arange(scale)[:, None] * grid + torch.arange(scale)[None, :]).flatten()
    return base[:, None] + offsets[None, :]


def harmonic_to_patches(scores: torch.Tensor, windows: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of every window that covers it (WinCLIP's aggregation).
    ``(B, n_windows)`` scores > 0 -> ``(B, n_patches)``."""
    inv = (1.0 / scores.clamp_min(1e-6))[:, :, None].expand(-1, -1, windows.shape[1]).reshape(scores.shape[0], -1)
    flat = windows.flatten().to(scores.device)
    total = torch.zeros(scores.shape[0], n_patches, dtype=scores.dtype, device=scores.device).index_add_(1, flat, inv)
    hits = torch.bincount(flat, minlength=n_patches).to(scores)
    return hits / total.clamp_min(1e-12)


def nearest_distance(feats: torch.Tensor, memory: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``(1 - max cosine) / 2`` of each feature to a memory. ``(..., D)`` and ``(M, D)``, both L2-normalised
    -> ``(...)`` in [0, 1]."""
    flat = feats.reshape(-1, feats.shape[-1])
    best = torch.cat([(part @ memory.t()).amax(dim=-1) for part in flat.split(chunk)]) if flat.shape[0] else flat[:, 0]
    return ((1.0 - best) / 2.0).reshape(feats.shape[:-1])


def neighbourhood_distance(feats: torch.Tensor, ref: torch.Tensor, radius: int) -> torch.Tensor:
    """Per patch, ``(1 - max cosine) / 2`` to the reference patches within ``radius`` patches of the same place
    (borders replicated). ``(B, N, D)`` each, L2-normalised, square grids -> ``(B, N)``."""
    b, n, d = feats.shape
    grid = round(n ** 0.5)
    side = 2 * radius + 1
    r = ref.transpose(1, 2).reshape(b, d, grid, grid)
    r = F.pad(r, (radius, radius, radius, radius), mode="replicate")
    hood = F.unfold(r, kernel_size=side).view(b, d, side * side, n)
    cos = torch.einsum("bnd,bdkn->bnk", feats, hood).amax(dim=-1)
    return (1.0 - cos) / 2.0


def grid_to_image(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch scores to a map at model-input size, bilinear. ``(B, N)`` -> ``(B, H, W)``."""
    grid = round(scores.shape[1] ** 0.5)
    return F.interpolate(scores.view(-1, 1, grid, grid).float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def state_probability(feats: torch.Tensor, normal: torch.Tensor, anomalous: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """Two-state softmax: p(anomalous) of L2-normalised features against one normal and one anomalous text
    embedding. ``(..., E)`` -> ``(...)``."""
    logits = torch.stack([feats @ normal, feats @ anomalous], dim=-1) * scale
    return logits.float().softmax(dim=-1)[..., 1]


def compose_class_probs(anomalous: torch.Tensor, sims: torch.Tensor, text_scale: torch.Tensor) -> torch.Tensor:
    """Class probabilities of a two-state detector: ``p(normal) = 1 - p(anomalous)``, the rest shared among the
    defect classes by their text softmax. ``(B,)`` and ``(B, C)`` image-text similarities -> ``(B, C)``."""
    defect = (text_scale * sims[:, 1:]).float().softmax(dim=-1)
    q = anomalous.float()[:, None]
    return torch.cat([1.0 - q, q * defect], dim=-1)
