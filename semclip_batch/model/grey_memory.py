"""A memory of normal grey-level neighbourhoods at the frame's native resolution, fused into the frame's map: defects
of a few pixels on large frames, which the ViT's 16-px patches blur (docs/quality.md, rule 17; beyond the paper:
PatchCore's nearest-neighbour distance taken on pixels instead of tokens).

Every :data:`PATCH` x :data:`PATCH` neighbourhood of the frame's stretched grey levels, every :data:`STRIDE` px, less
its mean and divided by its norm plus a floor (a flat noisy patch stays near zero; a charging streak's offset drops
out), projected on the support neighbourhoods' :data:`DIM` principal axes, scores its distance to the nearest memory
entry or, where nearer, to the nearest of the frame's own neighbourhoods more than :data:`OWN_GAP` grid steps away
(rule 18: a wire end or a via meeting that no support frame holds recurs in the frame itself, a defect of a few
pixels does not; ``own`` of them in a fixed seeded draw, 0: the entries only). The grid is resized to the frame
(each score on its neighbourhood's centre), smoothed over :data:`SMOOTH` px and mapped to
``clamp(d / (2 * scale), 0, 1)``, ``scale`` the 99th percentile of held-out clean support neighbourhoods'
distances. Where ``lines`` is above 0 (rule 23), the memory's map is the mean of that and the frame's line residual
(:mod:`semclip_batch.model.line_residual`, lines of ``lines`` px) mapped to ``clamp(r / (2 * line_scale), 0, 1)``.
Where ``reference`` is 1 (rule 27), a frame given its registered reference frame's levels (die-to-die) also takes
their smoothed absolute difference mapped to ``clamp(d / (2 * reference_scale), 0, 1)`` into that mean; a frame
without one keeps the map it had. Where it is 2 (rule 30), that difference is 0 in the rows of a data bar found on
the frame or on the reference (:mod:`semclip_batch.model.data_bar`): drawn, not imaged. The fused map is
``(1 - weight) * map + weight * memory``. The entries, axes, scale, own count, residuals' settings and weight are
fitted by ``train`` (:mod:`semclip_batch.fewshot.grey_memory_fit`) and saved with the model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from semclip_batch.model.data_bar import pair_bar_rows
from semclip_batch.model.line_residual import line_residual, smoothed

PATCH = 11  # px: a neighbourhood's side
STRIDE = 4  # px between neighbourhoods
DIM = 16  # principal axes kept
SMOOTH = 5  # px of the box filter over the resized map
NORM_FLOOR = 0.05  # per px of the side: added to a neighbourhood's norm, so shot noise on a flat patch stays small
GREY_MEMORY = "grey_memory"  # its tensors' prefix in a checkpoint's model.safetensors
MIN_SCALE = 1e-3  # the distance scale's floor (support frames whose neighbourhoods all match: a flat lot)
NEAREST_ROWS, NEAREST_ENTRIES = 1024, 512  # a block of squared distances: 2 MiB, kept in cache while its least is taken
CHUNK = 4096  # neighbourhoods per distance block: a (CHUNK, entries) and a (CHUNK, own) matrix, 64 MiB at 4,096
OWN = 4096  # rule 18's draw of a frame's own neighbourhoods (train --own-neighbourhoods; its default is 0)
OWN_MAX = 16_384  # the most a checkpoint may ask for (a (CHUNK, OWN_MAX) block is 256 MiB)
OWN_GAP = 6  # grid steps (24 px) in row or column beyond which an own neighbourhood may match: none overlapping the
# scored one (a defect longer than ~24 px, or one the frame repeats, can still match itself and be quietened)
OWN_SEED = 0  # the own draw's seed: a frame's bank depends on its size only, so runs repeat
REFERENCE_PLAIN, OUTSIDE_BARS = 1, 2  # ``reference``: rule 27's die-to-die residual; rule 30's, 0 in the data bars


def grid_shape(height: int, width: int) -> tuple[int, int]:
    """Rows and columns of the neighbourhoods :func:`neighbourhoods` takes from an ``(height, width)`` frame."""
    return (height - PATCH) // STRIDE + 1, (width - PATCH) // STRIDE + 1


def neighbourhoods(levels: torch.Tensor) -> torch.Tensor:
    """``(L, PATCH * PATCH)`` neighbourhoods of ``(H, W)`` levels in [0, 1], row by row, each centred and norm-scaled."""
    cols = F.unfold(levels.float()[None, None], PATCH, stride=STRIDE)[0].T
    cols = cols - cols.mean(dim=1, keepdim=True)
    return cols / (cols.norm(dim=1, keepdim=True) + NORM_FLOOR * PATCH)


class GreyMemory(nn.Module):
    """The memory's tensors (buffers: saved with the model, their sizes from the checkpoint) and its frame map."""

    mean: torch.Tensor
    axes: torch.Tensor
    entries: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    own: torch.Tensor
    lines: torch.Tensor
    line_scale: torch.Tensor
    reference: torch.Tensor
    reference_scale: torch.Tensor

    def __init__(self, entries: int = 0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(PATCH * PATCH))
        self.register_buffer("axes", torch.zeros(PATCH * PATCH, DIM))
        self.register_buffer("entries", torch.zeros(entries, DIM))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("weight", torch.tensor(0.0))
        self.register_buffer("own", torch.tensor(0))
        self.register_buffer("lines", torch.tensor(0))
        self.register_buffer("line_scale", torch.tensor(1.0))
        self.register_buffer("reference", torch.tensor(0))
        self.register_buffer("reference_scale", torch.tensor(1.0))

    def project(self, cols: torch.Tensor) -> torch.Tensor:
        """``(L, DIM)``: neighbourhoods ``(L, PATCH * PATCH)`` on the memory's axes."""
        return (cols.float() - self.mean) @ self.axes

    def nearest(self, q: torch.Tensor) -> torch.Tensor:
        """``(L,)`` distance of each projected neighbourhood ``(L, DIM)`` to its nearest entry, in blocks of
        :data:`NEAREST_ROWS` neighbourhoods by :data:`NEAREST_ENTRIES` entries, the running least kept (a block of
        4,096 x 4,096 left the cache before its least was taken: ~5 times slower on a CPU, and 1,024 x 4,096 ~1.4
        times). The whole matrix's least to the bit where the blocks are full (``train``'s 4,096 entries here); a short
        last block may round a distance 1 ulp apart (the matrix product's kernel for its width)."""
        squared = (self.entries * self.entries).sum(dim=1)
        blocks = list(zip(self.entries.split(NEAREST_ENTRIES), squared.split(NEAREST_ENTRIES), strict=True))
        # |q - e|^2 = |e|^2 - 2 q.e + |q|^2: one matrix product a block, the root of the least only
        least = [self._least(part, blocks) + (part * part).sum(dim=1) for part in q.split(NEAREST_ROWS)]
        return torch.cat(least).clamp_min(0).sqrt()

    @staticmethod
    def _least(part: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``(R,)`` the least ``|e|^2 - 2 q.e`` of each row of ``part`` over the entry ``blocks`` (entries, their
        squared norms)."""
        entries, squared = blocks[0]
        least = torch.addmm(squared, part, entries.T, alpha=-2).amin(dim=1)
        for entries, squared in blocks[1:]:
            torch.minimum(least, torch.addmm(squared, part, entries.T, alpha=-2).amin(dim=1), out=least)
        return least

    def projected(self, levels: torch.Tensor) -> torch.Tensor:
        """``(gh * gw, DIM)``: the frame's neighbourhoods, row by row, projected in bands of about :data:`CHUNK` (a
        large frame's raw neighbourhoods are never all held at once; their projections are)."""
        return torch.cat(list(self._bands(levels)))

    def _bands(self, levels: torch.Tensor) -> Iterator[torch.Tensor]:
        gh, gw = grid_shape(*levels.shape)
        band = max(1, CHUNK // gw)
        for r in range(0, gh, band):
            yield self.project(neighbourhoods(levels[r * STRIDE:(min(gh, r + band) - 1) * STRIDE + PATCH]))

    def grid_distances(self, levels: torch.Tensor) -> torch.Tensor:
        """``(gh * gw,)`` distances of the frame's neighbourhoods, row by row: to the nearest entry, or to the nearest
        own neighbourhood (:func:`own_nearest`) where that is nearer; band by band where ``own`` is 0 (as written
        before rule 18, to the bit)."""
        if int(self.own) == 0:
            return torch.cat([self.nearest(q) for q in self._bands(levels)])
        return self.distances_at(levels)

    def distances_at(self, levels: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`grid_distances` of the neighbourhoods at grid positions ``at`` (row by row; None: all) only, the
        frame projected in one pass."""
        q = self.projected(levels)
        distances = self.nearest(q if at is None else q[at])
        if int(self.own) > 0:
            distances = torch.minimum(distances, own_nearest(q, grid_shape(*levels.shape)[1], int(self.own), at))
        return distances

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors as a checkpoint stores them: ``own`` only where above 0, ``lines`` and ``line_scale`` only where
        the line residual is kept, ``reference`` and ``reference_scale`` only where the die-to-die residual is, so a
        memory without them writes the tensors written before rules 18, 23 and 27 (the same checksum and run ids; an
        older release loads it)."""
        left_out = (({"own"} if int(self.own) == 0 else set())
                    | ({"lines", "line_scale"} if int(self.lines) == 0 else set())
                    | ({"reference", "reference_scale"} if int(self.reference) == 0 else set()))
        return {k: v for k, v in self.state_dict().items() if k not in left_out}

    def frame_map(self, levels: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """``(H, W)`` levels in [0, 1] -> the memory's map ``(H, W)`` in [0, 1] (float32, on their device): the
        neighbourhoods' map, with the line residual's where kept and the die-to-die residual's where kept and the
        frame has a ``reference`` (its registered reference's levels, as ``levels``) (:meth:`with_residuals`)."""
        return self.with_residuals(self.neighbourhood_map(levels), levels, reference)

    def neighbourhood_map(self, levels: torch.Tensor) -> torch.Tensor:
        """The neighbourhoods' distances as a ``(H, W)`` map in [0, 1]; all zero on a frame under :data:`PATCH` px."""
        h, w = levels.shape
        if min(h, w) < PATCH:
            return torch.zeros(h, w, device=levels.device)
        gh, gw = grid_shape(h, w)
        grid = self.grid_distances(levels).reshape(1, 1, gh, gw)
        inner = F.interpolate(grid, size=((gh - 1) * STRIDE + 1, (gw - 1) * STRIDE + 1), mode="bilinear",
                              align_corners=True)
        lo = PATCH // 2
        full = F.pad(inner, (lo, w - lo - inner.shape[-1], lo, h - lo - inner.shape[-2]), mode="replicate")
        full = F.avg_pool2d(full, SMOOTH, 1, SMOOTH // 2, count_include_pad=False)[0, 0]
        return torch.clamp(full / (2 * self.scale), 0, 1)

    def line_map(self, levels: torch.Tensor) -> torch.Tensor:
        """The line residual of ``lines`` px as a ``(H, W)`` map in [0, 1] (``lines`` above 0 only)."""
        return torch.clamp(line_residual(levels, int(self.lines)) / (2 * self.line_scale), 0, 1)

    @staticmethod
    def reference_residual(levels: torch.Tensor, reference: torch.Tensor, outside_bars: bool = False) -> torch.Tensor:
        """The die-to-die residual ``(H, W)``: the smoothed ``|levels - reference|`` (both in [0, 1], the reference
        registered onto the frame; the line residual's 1-px Gaussian); with ``outside_bars``, 0 in the rows of a data
        bar of either (:func:`~semclip_batch.model.data_bar.pair_bar_rows`)."""
        residual = smoothed((levels.float() - reference.float()).abs())
        if outside_bars:
            residual[pair_bar_rows(levels, reference)] = 0.0
        return residual

    def reference_map(self, levels: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """:meth:`reference_residual` (outside the data bars where ``reference`` is :data:`OUTSIDE_BARS`) as a
        ``(H, W)`` map in [0, 1]: over twice ``reference_scale``, clamped."""
        residual = self.reference_residual(levels, reference, int(self.reference) == OUTSIDE_BARS)
        return torch.clamp(residual / (2 * self.reference_scale), 0, 1)

    def with_residuals(self, neighbourhood_map: torch.Tensor, levels: torch.Tensor,
                       reference: torch.Tensor | None = None) -> torch.Tensor:
        """The memory's map from its neighbourhoods' map: the mean of that, :meth:`line_map` where ``lines`` is above 0
        and :meth:`reference_map` where ``reference`` is above 0 and a reference is given; the map as it is where neither
        applies or the frame holds no neighbourhood."""
        if min(levels.shape) < PATCH:
            return neighbourhood_map
        parts = [neighbourhood_map]
        if int(self.lines) > 0:
            parts.append(self.line_map(levels))
        if int(self.reference) > 0 and reference is not None:
            parts.append(self.reference_map(levels, reference))
        return sum(parts[1:], parts[0]) / len(parts)

    def fuse(self, frame_map: torch.Tensor, levels: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`blend` of the frame's ``(H, W)`` map with this memory's map of its levels in [0, 1] (``reference``:
        its registered reference's levels, where the row has one)."""
        return blend(frame_map, self.frame_map(levels, reference), float(self.weight))


def own_nearest(q: torch.Tensor, columns: int, size: int, at: torch.Tensor | None = None) -> torch.Tensor:
    """Distance of each of a frame's projected neighbourhoods ``(L, DIM)`` (row by row, ``columns`` a row; ``at``:
    those at these positions only) to the nearest of ``size`` of them (a draw seeded by :data:`OWN_SEED`: all where
    fewer) lying more than :data:`OWN_GAP` grid steps away in row or column; infinite where none does (a frame too
    small to hold one). The pairs too close to compare are indexed on the CPU and moved to ``q``'s device once."""
    count = len(q)
    if at is not None and not len(at):
        return q.new_empty(0)
    bank = torch.randperm(count, generator=torch.Generator().manual_seed(OWN_SEED))[:size]
    steps = torch.arange(-OWN_GAP, OWN_GAP + 1)
    rows = (bank // columns)[:, None, None] + steps[None, :, None]  # each entry's window of grid positions
    cols = (bank % columns)[:, None, None] + steps[None, None, :]
    inside = (rows >= 0) & (rows < count // columns) & (cols >= 0) & (cols < columns)
    queries = torch.arange(count) if at is None else at.cpu()
    slot = torch.full((count,), -1, dtype=torch.long)
    slot[queries] = torch.arange(len(queries))
    query = slot[(rows * columns + cols)[inside]]
    entry = torch.arange(len(bank))[:, None, None].expand_as(inside)[inside]
    query, entry = query[query >= 0], entry[query >= 0]
    order = query.argsort()
    query, entry = query[order], entry[order]
    bounds = torch.searchsorted(query, torch.arange(0, len(queries) + CHUNK, CHUNK)).tolist()
    query, entry = query.to(q.device), entry.to(q.device)
    entries = q[bank.to(q.device)]
    squared = (entries * entries).sum(dim=1)
    chosen = q if at is None else q[at.to(q.device)]
    least = []
    for k, part in enumerate(chosen.split(CHUNK)):
        block = torch.addmm(squared, part, entries.T, alpha=-2)
        lo, hi = bounds[k], bounds[k + 1]
        block[query[lo:hi] - k * CHUNK, entry[lo:hi]] = float("inf")
        least.append(block.amin(dim=1) + (part * part).sum(dim=1))
    return torch.cat(least).clamp_min(0).sqrt()


def blend(frame_map: torch.Tensor, memory_map: torch.Tensor, weight: float) -> torch.Tensor:
    """The fused map ``(1 - weight) * frame_map + weight * memory_map`` (``run``'s and ``train``'s one rule); the map
    as it is where the weight is 0 or the frame holds no neighbourhood (under :data:`PATCH` px)."""
    if weight == 0.0 or min(frame_map.shape) < PATCH:
        return frame_map
    return (1.0 - weight) * frame_map.float() + weight * memory_map
