"""Data bars: the info strip a review tool draws at a frame's top or bottom edge (tool, lot, magnification), found
on the frame's levels alone (docs/quality.md, rule 30).

A bar is drawn, not imaged: each of its rows keeps at least :data:`ROW_SHARE` of its pixels at one level (text
covers less), the same level in every row of it to :data:`LEVEL_TOLERANCE` levels (a registered reference's bar lies beside
the strip the registration filled with the frame's own bar, stretched with the reference's percentiles: a level
apart), and its edge toward the image is a bare row (at least :data:`BARE_SHARE` of it at one level). Imaged rows
carry shot noise, so hardly any of their pixels share an exact level; a frame flat over more than :data:`MAX_HEIGHT`
of its height (a blank frame) holds no bar. The die-to-die residual (:mod:`semclip_batch.model.grey_memory`) is 0 in
a bar grown by :data:`GROW` rows toward the image: the reference's bar, moved by the registration onto the frame,
would meet the frame's along every edge of its text.
"""

from __future__ import annotations

import torch

ROW_SHARE = 0.4  # of a bar row's pixels at the bar's level, at least (text rows of a 300 px frame keep 0.46)
BARE_SHARE = 0.98  # of the bar's inner row's pixels at one level, at least
MAX_HEIGHT = 0.25  # of the frame's rows a bar may take, at most
GROW = 3  # rows added on the image side of a bar: the registration's cubic shift mixes 2 px across an edge
LEVEL_TOLERANCE = 2  # levels (of 255): a row within 2 levels of the bar's is in it
LEVELS = 256  # levels are read as run ships them, 8-bit


def data_bar_rows(levels: torch.Tensor, grow: int = GROW) -> torch.Tensor:
    """``(H,)`` bool: the rows of ``(H, W)`` levels in [0, 1] (or uint8 levels, as packed; read at 8 bits either way)
    in a data bar at the top or bottom edge, each bar grown by ``grow`` rows toward the image; all False where there
    is none."""
    height = levels.shape[0]
    rows = torch.zeros(height, dtype=torch.bool, device=levels.device)
    if height < 2 or levels.shape[1] == 0:
        return rows
    window = int(height * MAX_HEIGHT) + 1  # a bar a quarter high, and the row past it
    top = _bar_height(levels[:window])
    bottom = _bar_height(levels[height - window:].flip(0))
    if top:
        rows[:min(height, top + grow)] = True
    if bottom:
        rows[max(0, height - bottom - grow):] = True
    return rows


def pair_bar_rows(levels: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``(H,)`` bool: the rows the die-to-die residual leaves out, a data bar's of the frame or of its registered
    reference (:func:`data_bar_rows` of each)."""
    return data_bar_rows(levels) | data_bar_rows(reference)


def _packed(levels: torch.Tensor) -> torch.Tensor:
    """Levels as 8-bit integers (long)."""
    if levels.dtype == torch.uint8:
        return levels.long()
    return (levels.float() * (LEVELS - 1)).round().clamp(0, LEVELS - 1).long()


def _bar_height(edge_first: torch.Tensor) -> int:
    """Rows of the bar at the start of ``(R, W)`` levels read from the frame's edge inward (0: none): the rows up
    to the innermost bare row of the run from the edge whose rows keep :data:`ROW_SHARE` of their pixels within
    :data:`LEVEL_TOLERANCE` of the edge row's most common level; none where that run fills all ``R`` rows (a frame
    flat that far is not a bar). Most frames end at their edge row, which holds no such share."""
    width = edge_first.shape[1]
    edge = torch.bincount(_packed(edge_first[0]), minlength=LEVELS)
    level = int(edge.argmax())
    if int(edge[max(0, level - LEVEL_TOLERANCE):level + LEVEL_TOLERANCE + 1].sum()) < ROW_SHARE * width:
        return 0  # an imaged edge row: no bar on this side
    edge_first = _packed(edge_first)
    near = ((edge_first - level).abs() <= LEVEL_TOLERANCE).float().mean(dim=1)
    run = int((near >= ROW_SHARE).long().cumprod(dim=0).sum())
    if run == 0 or run == len(near):
        return 0
    counts = torch.zeros(run, LEVELS, device=edge_first.device).scatter_add_(
        1, edge_first[:run], torch.ones(run, width, device=edge_first.device))
    bare = (counts.amax(dim=1) >= BARE_SHARE * width).nonzero().flatten()  # a row's own most common level
    return int(bare[-1]) + 1 if len(bare) else 0
