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


NEAREST_ROWS, NEAREST_COLUMNS = 1024, 2048  # a 8 MiB block of cosines at float32: written and read back in cache


def nearest_distance(feats: torch.Tensor, memory: torch.Tensor, rows: int = NEAREST_ROWS,
                     columns: int = NEAREST_COLUMNS) -> torch.Tensor:
    """``(1 - max cosine) / 2`` of each feature to a memory. ``(..., D)`` and ``(M, D)``, both L2-normalised
    -> ``(...)`` in [0, 1]. Block by block (``rows`` features against ``columns`` memory entries), the running
    maximum kept: the same products as one ``(N, M)`` matrix (each an entry's dot product with a feature), about
    twice as fast on a CPU as blocks of 4,096 x 8,192, whose cosines left the cache before their maximum was taken."""
    flat = feats.reshape(-1, feats.shape[-1])
    best = torch.cat([_block_max(part, memory, columns) for part in flat.split(rows)]) if flat.shape[0] else flat[:, 0]
    return ((1.0 - best) / 2.0).reshape(feats.shape[:-1])


def _block_max(part: torch.Tensor, memory: torch.Tensor, columns: int) -> torch.Tensor:
    """``(R,)`` the largest dot product of each row of ``part`` with ``memory``'s rows, ``columns`` at a time."""
    blocks = memory.split(columns)
    best = (part @ blocks[0].t()).amax(dim=-1)
    for block in blocks[1:]:
        best = torch.maximum(best, (part @ block.t()).amax(dim=-1))
    return best


NEIGHBOURHOOD_VIEWS = 64  # views a block: their (N, N) cosines, 12 MiB at float32 on a 15 x 15 grid


def neighbourhood_distance(feats: torch.Tensor, ref: torch.Tensor, radius: int,
                           views: int = NEIGHBOURHOOD_VIEWS) -> torch.Tensor:
    """Per patch, ``(1 - max cosine) / 2`` to the reference patches within ``radius`` patches of the same place
    (borders replicated). ``(B, N, D)`` each, L2-normalised, square grids -> ``(B, N)``.

    Each block of ``views`` takes every patch's cosine to every reference patch of its view in one batched matrix
    product and picks the neighbourhood's from it (:func:`neighbour_index`). Unfolding the padded reference
    instead wrote ``(2 radius + 1)^2`` copies of it (1.5 GB for 1,489 views at width 128) and was ~14x slower
    here; the cosines are the same dot products, equal up to float rounding (1 ulp)."""
    b, n, _ = feats.shape
    grid = round(n ** 0.5)
    if grid * grid != n:
        raise ValueError(f"neighbourhood distances need a square patch grid, got {n} patches")
    if b == 0:
        return feats.new_zeros((0, n))
    index = neighbour_index(grid, radius, feats.device)
    best = []
    for part, part_ref in zip(feats.split(views), ref.split(views), strict=True):
        cos = torch.bmm(part, part_ref.transpose(1, 2))
        best.append(cos.gather(2, index.expand(part.shape[0], -1, -1)).amax(dim=-1))
    return (1.0 - torch.cat(best)) / 2.0


def neighbour_index(grid: int, radius: int, device: torch.device | None = None) -> torch.Tensor:
    """``(N, (2 radius + 1)^2)``: per patch of a square ``grid`` (row-major), the patches within ``radius`` of it,
    clamped at the borders (the replicated border of a padded grid)."""
    ys, xs = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij")
    steps = range(-radius, radius + 1)
    near = [((ys + dy).clamp(0, grid - 1) * grid + (xs + dx).clamp(0, grid - 1)).flatten()
            for dy in steps for dx in steps]
    return torch.stack(near, dim=1)


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
