"""A memory of normal grey-level neighbourhoods at native resolution, measured against a run's maps: a candidate for
defects of a few pixels on large frames (README "Quality that transfers": `logic`'s 3–10 px defects on 512–1024 px
frames, which no map of the ViT's 16-px patches has found). Not part of `run`; nothing here changes a default.

    .venv/bin/python benchmarks/pixel_memory.py SUPPORT.csv TEST.csv --out RUN_OUT    # RUN_OUT: `run` of TEST.csv

The support frames (grey levels stretched between their 0.5 and 99.5 % levels, as `run`'s preprocessing does) give
every K x K neighbourhood (``--patch``) with no defect pixel within 4 px of it, each less its mean and divided by
its norm plus a floor (so a flat noisy patch stays near zero and a charging streak's offset drops out), projected on
its ``--dim`` principal components (exact: the covariance's eigenvectors); of at most 2,048 a frame (seeded),
``--bank`` are kept, chosen greedily as PatchCore does (each the farthest from those already kept, so rare
neighbourhoods stay; ``--random``: a seeded random subset). A fifth of the support frames (seeded) is held out of
the memory to fix the distance scale (the 99th percentile of their clean patches' distances). A test frame's
neighbourhoods, every ``--stride`` px, score their distance to the nearest memory entry; the grid is resized to the
frame, smoothed over 5 px and stored as ``clamp(d / (2 * scale), 0, 1)`` in uint8.

Scored with ``eval``'s own pixel counts (pAUROC, F1max, AUPRO) against the test manifest's masks, next to the maps
`run` stored in RUN_OUT and their fusions ``(1 - w) * run + w * pixel`` for each ``--weights`` value. Which weight
to use is a choice: make it on validation lots, never on the lots reported.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from semclip_batch.analysis.evaluate import joined_rows, truth_mask
from semclip_batch.analysis.metrics import PixelCounts
from semclip_batch.config import PreprocessConfig
from semclip_batch.errors import OK
from semclip_batch.io import storage
from semclip_batch.io.frames import load_frame
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.levels import stretch
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.masks import mask_array, open_masks

MASK_MARGIN = 4  # px around a defect pixel that no memory patch may touch
SMOOTH = 5  # px of the box filter over the resized map


@dataclass(frozen=True)
class Bank:
    mean: torch.Tensor  # (K*K,)
    axes: torch.Tensor  # (K*K, D)
    entries: torch.Tensor  # (M, D)
    scale: float


def levels(url: str, page: int | None = None) -> torch.Tensor:
    """A frame's grey levels stretched to [0, 1] as `run`'s preprocessing does (its default percentiles)."""
    gray = load_frame(url, page=page)
    return torch.from_numpy(stretch(gray, PreprocessConfig.percentile_low, PreprocessConfig.percentile_high))


def row_levels(row: pd.Series) -> torch.Tensor:
    page = row.get("page")
    return levels(row["url"], None if page is None or pd.isna(page) else int(page))


def grid_shape(height: int, width: int, patch: int, stride: int) -> tuple[int, int]:
    """Rows and columns of the neighbourhoods :func:`neighbourhoods` takes from an ``(height, width)`` frame."""
    return (height - patch) // stride + 1, (width - patch) // stride + 1


def neighbourhoods(frame: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """``(L, patch*patch)`` neighbourhoods of ``(H, W)`` every ``stride`` px, each centred and norm-scaled."""
    cols = F.unfold(frame[None, None], patch, stride=stride)[0].T
    cols = cols - cols.mean(dim=1, keepdim=True)
    return cols / (cols.norm(dim=1, keepdim=True) + 0.05 * patch)


def clean(mask: np.ndarray | None, shape: tuple[int, int], patch: int, stride: int) -> torch.Tensor:
    """``(L,)`` True where a neighbourhood holds no defect pixel within :data:`MASK_MARGIN` px."""
    if mask is None or not mask.any():
        rows, cols = grid_shape(shape[0], shape[1], patch, stride)
        return torch.ones(rows * cols, dtype=torch.bool)
    grown = F.max_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], 2 * MASK_MARGIN + 1, 1, MASK_MARGIN)
    return F.unfold(grown, patch, stride=stride)[0].amax(dim=0) == 0


def support_mask(row: pd.Series) -> np.ndarray | None:
    url = row.get("mask_url") or ""
    return load_frame(url) > 0 if url else None


def fit_bank(frames: Sequence[tuple[torch.Tensor, np.ndarray | None]], patch: int, stride: int, size: int, dim: int,
             seed: int, coreset: bool = True) -> Bank:
    """The memory from four fifths of the support ``(levels, defect mask or None)`` frames (at most 2,048 clean
    neighbourhoods of each, seeded), its distance scale from the rest (at least two frames)."""
    rng = np.random.default_rng(seed)
    held = set(rng.choice(len(frames), max(1, len(frames) // 5), replace=False).tolist())
    fit: list[torch.Tensor] = []
    check: list[torch.Tensor] = []
    for i, (frame, mask) in enumerate(frames):
        if min(frame.shape) < patch:
            continue
        if mask is not None and mask.shape != frame.shape:
            raise ValueError(f"support frame {i}: mask {mask.shape} does not match the frame {tuple(frame.shape)}")
        cols = neighbourhoods(frame, patch, stride)[clean(mask, (frame.shape[0], frame.shape[1]), patch, stride)]
        (check if i in held else fit).append(cols[torch.from_numpy(rng.permutation(len(cols))[:2048])])
    if not fit or not check:
        raise ValueError(f"the memory needs support frames of {patch} px or more to fit and to hold out; got {len(frames)}")
    pool = torch.cat(fit)
    mean = pool.mean(dim=0)
    axes = principal_axes(pool - mean, dim)
    projected = (pool - mean) @ axes
    if coreset:
        entries = projected[greedy_coreset(projected, size)]
    else:
        entries = projected[torch.from_numpy(rng.permutation(len(pool))[:size])]
    held_out = nearest(torch.cat(check), Bank(mean, axes, entries, 1.0))
    return Bank(mean, axes, entries, float(torch.quantile(held_out, 0.99)))


def greedy_coreset(points: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of ``size`` of ``(N, D)`` points chosen greedily, each the farthest from those already chosen
    (PatchCore's k-centre selection: rare neighbourhoods are kept, common ones thinned), starting from the first."""
    if len(points) <= size:
        return torch.arange(len(points))
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = 0
    gap = (points - points[0]).norm(dim=1)
    for k in range(1, size):
        chosen[k] = int(gap.argmax())
        gap = torch.minimum(gap, (points - points[chosen[k]]).norm(dim=1))
    return chosen


def principal_axes(centred: torch.Tensor, dim: int) -> torch.Tensor:
    """``(K*K, dim)`` eigenvectors of the neighbourhoods' covariance with the largest eigenvalues (exact and
    deterministic: ``eigh`` of a K*K x K*K matrix)."""
    cov = centred.T.double() @ centred.double() / max(len(centred) - 1, 1)
    _, vectors = torch.linalg.eigh(cov)  # eigenvalues ascending
    return vectors[:, -dim:].flip(1).float()


def nearest(cols: torch.Tensor, bank: Bank) -> torch.Tensor:
    """``(L,)`` distance of each neighbourhood to its nearest memory entry."""
    q = (cols - bank.mean) @ bank.axes
    return torch.cat([torch.cdist(part, bank.entries).amin(dim=1) for part in q.split(16384)])


def pixel_map(frame: torch.Tensor, bank: Bank, patch: int, stride: int) -> np.ndarray:
    """The frame's uint8 map ``(H, W)`` of distances to the memory (see the module's docstring)."""
    h, w = frame.shape
    gh, gw = grid_shape(h, w, patch, stride)
    grid = nearest(neighbourhoods(frame, patch, stride), bank).reshape(1, 1, gh, gw)
    inner = F.interpolate(grid, size=((gh - 1) * stride + 1, (gw - 1) * stride + 1), mode="bilinear",
                          align_corners=True)
    lo = patch // 2
    full = F.pad(inner, (lo, w - lo - inner.shape[-1], lo, h - lo - inner.shape[-2]), mode="replicate")
    full = F.avg_pool2d(full, SMOOTH, 1, SMOOTH // 2, count_include_pad=False)[0, 0]
    return (torch.clamp(full / (2 * bank.scale), 0, 1) * 255).round().to(torch.uint8).numpy()


def figures(counts: PixelCounts) -> str:
    return " ".join(f"{name} {value:.3f}" if value is not None else f"{name} n/a"
                    for name, value in (("pAUROC", counts.auroc()), ("F1max", counts.f1_max()),
                                        ("AUPRO", counts.aupro())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("support")
    ap.add_argument("test")
    ap.add_argument("--out", help="a `run` of TEST on which to compare and fuse (its stored maps)")
    ap.add_argument("--patch", type=int, default=11)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--bank", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--weights", default="0.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random", action="store_true", help="draw the memory at random instead of greedily (k-centre)")
    args = ap.parse_args()
    start = time.perf_counter()
    support = [(row_levels(row), support_mask(row)) for _, row in read_manifest(args.support).iterrows()]
    bank = fit_bank(support, args.patch, args.stride, args.bank, args.dim, args.seed, coreset=not args.random)
    print(f"memory ({'random' if args.random else 'greedy'}): {len(bank.entries)} neighbourhoods of {args.patch} px "
          f"in {args.dim} dims, "
          f"scale {bank.scale:.4f}, {time.perf_counter() - start:.0f} s")
    weights = [float(w) for w in args.weights.split(",")] if args.out else []
    counts = {name: PixelCounts() for name in ["pixel memory", *(["run"] if args.out else []),
                                               *(f"fused w={w:g}" for w in weights)]}
    if args.out:
        rows, _ = joined_rows(args.out, args.test, None)
        rows = rows[rows["status"] == OK].merge(read_manifest(args.test)[["image_id", "url", "page"]], on="image_id")
        root = open_masks(OutLayout(storage.normalize_root(args.out)).masks, None, mode="r")
    else:
        rows, root = read_manifest(args.test), None
    seconds, n = 0.0, 0
    for _, row in rows.iterrows():
        frame = row_levels(row)
        if min(frame.shape) < args.patch:
            continue
        start = time.perf_counter()
        ours = pixel_map(frame, bank, args.patch, args.stride)
        seconds += time.perf_counter() - start
        truth = truth_mask(row, ours.shape, None)
        if truth is None:
            continue
        counts["pixel memory"].add(ours, truth)
        n += 1
        if root is None:
            continue
        theirs = np.asarray(mask_array(root, row["mask_path"])[int(row["mask_index"])])
        counts["run"].add(theirs, truth)
        for w in weights:
            fused = (1 - w) * theirs.astype(np.float32) + w * ours.astype(np.float32)
            counts[f"fused w={w:g}"].add(fused.round().astype(np.uint8), truth)
    print(f"{n} test frames, the memory's map {seconds / max(n, 1):.2f} s a frame (this machine; decode and scoring apart)")
    for name, c in counts.items():
        print(f"  {name:14s} {figures(c)}")


if __name__ == "__main__":
    main()
