"""``train``'s grey-level memory (:mod:`semclip_batch.model.grey_memory`), as docs/quality.md's rule 17 fixes it:
fitted on the support frames the fit trains on (not those its checks hold out), its weight (0 or :data:`WEIGHT`)
chosen on the held-out support frames at the policy ``run`` scores the maps at, and, where kept, the image and
pixel thresholds fitted again on the support frames' fused maps at the frame's resolution, as ``run`` fuses them.

The memory: every clean neighbourhood (no defect pixel within :data:`MASK_MARGIN` px) of the fitting frames' levels
as ``run``'s decode stage ships them (stretched, in 1/255 steps), at most :data:`PER_FRAME` of a frame (seeded),
projected on their principal axes (exact: the covariance's eigenvectors), :data:`ENTRIES` of them chosen greedily
(PatchCore's k-centre selection: rare neighbourhoods such as wire ends and via meetings stay); a seeded fifth of the
fitting frames is kept out of the entries to fix the distance scale (the 99th percentile of their clean
neighbourhoods' distances, each also compared with its own frame's neighbourhoods, as ``run`` scores it: rule 18).

Rule 23: the line residual (:mod:`semclip_batch.model.line_residual`) joins the memory's map where, on the held-out
support frames at :data:`WEIGHT`, it gains at least :data:`RESIDUAL_MIN_GAIN` F1max and loses at most
:data:`RESIDUAL_MAX_LOSS` pixel AUROC. Rule 27, with ``train --die-to-die`` only (measured, not adopted): then the
die-to-die residual (each frame against its registered reference frame) joins it on the same bounds, where at least
:data:`REFERENCE_MIN_FRAMES` held-out frames list a readable reference. Their scales:
:mod:`semclip_batch.fewshot.residual_fit`. The weight is then chosen on the chosen map.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from semclip_batch.analysis.metrics import PixelCounts
from semclip_batch.config import NORMAL, PreprocessConfig
from semclip_batch.errors import ConfigError, ImageError
from semclip_batch.fewshot.decoded import active_rows
from semclip_batch.fewshot.maps_policy import support_maps_at
from semclip_batch.fewshot.residual_fit import (
    MASK_MARGIN,
    as_levels,
    fit_line_scale,
    fit_reference_scale,
    fused,
    reference_levels,
)
from semclip_batch.fewshot.support_maps import SupportMaps, image_threshold, pixel_threshold
from semclip_batch.fewshot.support_set import Fitted, TrainConfig
from semclip_batch.fewshot.trainset import row_frame_and_mask
from semclip_batch.io.preprocess import FRAME_LEVELS, frame_tiles, fuses_levels, maps_to_frame, shipped_levels
from semclip_batch.methods.decisions import anomaly_score, to_mask
from semclip_batch.methods.registry import get_method
from semclip_batch.methods.weights import LoadedBackbone, preprocess_config
from semclip_batch.model.data_bar import pair_bar_rows
from semclip_batch.model.grey_memory import (
    DIM,
    MIN_SCALE,
    OUTSIDE_BARS,
    OWN_MAX,
    PATCH,
    STRIDE,
    GreyMemory,
    blend,
    grid_shape,
    neighbourhoods,
)
from semclip_batch.model.line_residual import LINE

DEFAULT_STRETCH = (PreprocessConfig.percentile_low, PreprocessConfig.percentile_high)  # run's percentiles
PER_FRAME = 2048  # clean neighbourhoods drawn from one frame
ENTRIES = 4096  # memory entries
WEIGHT = 0.5  # the memory's share of the fused map where kept
MIN_GAIN = 0.01  # pixel AUROC the held-out frames must gain at WEIGHT (and no F1max lost) for it to be kept
RESIDUAL_MIN_GAIN = 0.01  # F1max a residual must gain on the held-out frames at WEIGHT to be kept (rules 23, 27)
RESIDUAL_MAX_LOSS = 0.005  # pixel AUROC it may lose there
REFERENCE_MIN_FRAMES = 3  # held-out frames that must list a reference for the die-to-die residual to be weighed


@dataclass(frozen=True)
class NativeFrame:
    """A support frame as ``run``'s decode stage ships its levels (``(H, W)`` uint8) and its defect mask."""

    levels: np.ndarray
    mask: np.ndarray | None
    normal: bool

    def as_levels(self) -> torch.Tensor:
        return torch.from_numpy(self.levels).float() / FRAME_LEVELS

    def truth(self) -> np.ndarray | None:
        """Its defect pixels (a normal frame without a mask: none), or None where nothing says which they are."""
        if self.mask is not None:
            return self.mask
        return np.zeros(self.levels.shape, bool) if self.normal else None


def native_frames(df: pd.DataFrame, so: Mapping[str, Any] | None,
                  percentiles: tuple[float, float] = DEFAULT_STRETCH) -> dict[int, NativeFrame]:
    """The rows of ``df`` by position, stretched between ``percentiles`` (unreadable rows left out, as the support
    set leaves them out; decoded once within :func:`~semclip_batch.fewshot.decoded.rows_kept`)."""
    out: dict[int, NativeFrame] = {}
    kept = active_rows()
    for pos, (_, row) in enumerate(df.reset_index(drop=True).iterrows()):
        try:
            gray, mask = row_frame_and_mask(row, so, kept)
        except ImageError:
            continue
        out[pos] = NativeFrame(shipped_levels(gray, percentiles), mask, row["label"] == NORMAL)
    return out


def fitting_frames(frames: Mapping[int, NativeFrame],
                   held: Sequence[int]) -> list[tuple[torch.Tensor, np.ndarray | None]]:
    """The ``(levels, defect pixels)`` the memory is fitted on: every frame outside ``held`` whose defect pixels are
    known (a defect frame without a mask stays out: its defect would be learnt as normal)."""
    out_of_fit = set(held)
    return [(f.as_levels(), f.truth()) for p, f in frames.items() if p not in out_of_fit and f.truth() is not None]


def clean(mask: np.ndarray | None, shape: tuple[int, int]) -> torch.Tensor:
    """``(L,)`` True where a neighbourhood of an ``shape`` frame holds no defect pixel within :data:`MASK_MARGIN` px."""
    if mask is None or not mask.any():
        rows, cols = grid_shape(*shape)
        return torch.ones(rows * cols, dtype=torch.bool)
    # each neighbourhood's window grown by the margin, row by row: one pooling at the grid's stride (the margin's
    # padding counts as clean), not the mask grown at every pixel first
    side = PATCH + 2 * MASK_MARGIN
    return F.max_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], side, STRIDE, MASK_MARGIN).flatten() == 0


def principal_axes(centred: torch.Tensor, dim: int) -> torch.Tensor:
    """``(K*K, dim)`` eigenvectors of the neighbourhoods' covariance with the largest eigenvalues (exact and
    deterministic: ``eigh`` of a K*K x K*K matrix)."""
    cov = centred.T.double() @ centred.double() / max(len(centred) - 1, 1)
    _, vectors = torch.linalg.eigh(cov)  # eigenvalues ascending
    return vectors[:, -dim:].flip(1).float()


def greedy_coreset(points: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of ``size`` of ``(N, D)`` points chosen greedily, each the farthest from those already chosen
    (PatchCore's k-centre selection: rare neighbourhoods are kept, common ones thinned), starting from the first."""
    if len(points) <= size:
        return torch.arange(len(points))
    chosen = torch.zeros(size, dtype=torch.long)
    squared = (points * points).sum(dim=1)
    gap = torch.addmv(squared + squared[0], points, points[0], alpha=-2)  # squared distances: the same order
    step = torch.empty_like(gap)
    for k in range(1, size):
        chosen[k] = i = int(gap.argmax())
        torch.minimum(gap, torch.addmv(squared + squared[i], points, points[i], alpha=-2, out=step), out=gap)
    return chosen


def fit_grey_memory(frames: Sequence[tuple[torch.Tensor, np.ndarray | None]], seed: int, entries: int = ENTRIES,
                    coreset: bool = True, own: int = 0) -> GreyMemory:
    """The memory from four fifths of ``(levels in [0, 1], defect mask or None)`` frames, its distance scale from
    the rest, each of those scored with its own neighbourhoods too (``own`` of them, rule 18; 0: the entries only),
    as ``run`` scores a frame (weight 0: the caller chooses it). ``coreset=False``: a seeded random subset instead
    of the greedy one. Raises ValueError where fewer than two frames of :data:`PATCH` px or more are given."""
    if not 0 <= own <= OWN_MAX:
        raise ValueError(f"own neighbourhoods must be 0 to {OWN_MAX}; got {own}")
    usable = [(f, m) for f, m in frames if min(f.shape) >= PATCH]
    if len(usable) < 2:
        raise ValueError(f"the grey-level memory needs two support frames of {PATCH} px or more; got {len(usable)}")
    rng = np.random.default_rng(seed)
    held = set(rng.choice(len(usable), max(1, len(usable) // 5), replace=False).tolist())
    fit: list[torch.Tensor] = []
    check: list[tuple[torch.Tensor, torch.Tensor]] = []  # a held-out frame, its drawn clean neighbourhoods' indices
    for i, (frame, mask) in enumerate(usable):
        if mask is not None and mask.shape != tuple(frame.shape):
            raise ValueError(f"support frame {i}: mask {mask.shape} does not match the frame {tuple(frame.shape)}")
        kept = clean(mask, (frame.shape[0], frame.shape[1])).nonzero().flatten()
        drawn = kept[torch.from_numpy(rng.permutation(len(kept))[:PER_FRAME])]
        if i in held:
            if len(drawn):  # a frame that is all defect has nothing to hold out
                check.append((frame, drawn))
        else:
            fit.append(neighbourhoods(frame)[drawn])
    pool = torch.cat(fit)
    if not len(pool) or not sum(len(drawn) for _, drawn in check):
        raise ValueError("the grey-level memory found no clean neighbourhood to fit or to hold out")
    memory = GreyMemory()
    memory.mean.copy_(pool.mean(dim=0))
    memory.axes.copy_(principal_axes(pool - memory.mean, DIM))
    projected = memory.project(pool)
    pick = greedy_coreset(projected, entries) if coreset else torch.from_numpy(rng.permutation(len(pool))[:entries])
    memory.entries = projected[pick].contiguous()
    memory.own.fill_(own)
    distances = torch.cat([memory.distances_at(frame, drawn) for frame, drawn in check])
    memory.scale.fill_(max(float(torch.quantile(distances, 0.99)), MIN_SCALE))
    return memory


@dataclass(frozen=True)
class FrameMap:
    """One support frame's map as ``run`` assembles it (its views' maps at the frame's resolution)."""

    position: int  # in the support rows (``df``)
    map: torch.Tensor  # (H, W) float
    p_normal: float  # the whole view's
    defect: bool
    probs: np.ndarray | None = None  # (C,) the whole view's class probabilities
    as_run: bool = True  # False: a tiled frame whose tiles the support set left out, its whole view's map instead


GreyMaps = Callable[[int], torch.Tensor]  # a support row's memory map (H, W), by position


def memory_maps(memory: GreyMemory, frames: Mapping[int, NativeFrame],
                references: Mapping[int, np.ndarray] | None = None) -> GreyMaps:
    """The memory's map of each native frame, computed once: its neighbourhoods' map, and with the residuals its
    settings ask for when the map is asked for (the line residual, and the die-to-die one for frames in
    ``references``: their registered references' packed levels), the map with them (each kept: the held-out frames
    are read with and without them in the residuals' choices, and again in the weight's and the thresholds'). The
    held-out frames' maps serve the choices, every frame's the thresholds."""
    done: dict[int, torch.Tensor] = {}
    with_residuals: dict[tuple[int, int, float, int, float], torch.Tensor] = {}
    refs = references or {}

    def of(position: int) -> torch.Tensor:
        small = min(frames[position].levels.shape) < PATCH
        ref = int(memory.reference) if position in refs else 0
        lines = int(memory.lines)  # a part that is off does not key the map by its scale
        key = (position, lines, float(memory.line_scale) if lines else 0.0, ref,
               float(memory.reference_scale) if ref else 0.0)
        plain = small or (lines == 0 and ref == 0)
        if not plain and key in with_residuals:
            return with_residuals[key]
        levels = frames[position].as_levels()
        if position not in done:
            done[position] = memory.neighbourhood_map(levels)
        if plain:
            return done[position]
        with_residuals[key] = memory.with_residuals(done[position], levels,
                                                    as_levels(refs[position]) if ref else None)
        return with_residuals[key]

    return of


def _has_defect(frame: NativeFrame) -> bool:
    truth = frame.truth()
    return truth is not None and bool(truth.any())


def choose_lines(memory: GreyMemory, maps: Sequence[FrameMap], frames: Mapping[int, NativeFrame], grey: GreyMaps,
                 fitting: Sequence[tuple[torch.Tensor, np.ndarray | None]]) -> dict[str, Any]:
    """Rule 23's choice on the held-out frames' maps fused at :data:`WEIGHT`: the memory's map with the line residual
    against without; ``memory.lines`` and ``memory.line_scale`` set where kept (``grey``: :func:`memory_maps` of
    ``memory``, which follows the setting). Returns the record."""
    if not any(_has_defect(frames[m.position]) for m in maps):
        memory.lines.fill_(0)
        return {"length": LINE, "kept": False, "note": "no defect pixel among the held-out support frames"}
    scale = fit_line_scale(fitting)

    def switch(on: bool) -> None:
        memory.lines.fill_(LINE if on else 0)
        memory.line_scale.fill_(scale if on else 1.0)

    figures, kept = _weigh_residual(maps, frames, grey, switch)
    return {"length": LINE, "scale": round(scale, 5), "figures": figures, "kept": kept}


def _weigh_residual(maps: Sequence[FrameMap], frames: Mapping[int, NativeFrame], grey: GreyMaps,
                    switch: Callable[[bool], None]) -> tuple[dict[str, dict[str, float | None]], bool]:
    """The held-out frames' figures fused at :data:`WEIGHT` without and with a residual (``switch(on)`` sets it on the
    memory ``grey`` follows), and whether it is kept: at least :data:`RESIDUAL_MIN_GAIN` F1max gained and at most
    :data:`RESIDUAL_MAX_LOSS` pixel AUROC lost (rules 23 and 27). The memory is left switched as chosen."""
    figures = {}
    for name, on in (("without", False), ("with", True)):
        switch(on)
        counts = fused_counts(maps, frames, grey, (WEIGHT,))[WEIGHT]
        figures[name] = {"pAUROC": counts.auroc(), "F1max": counts.f1_max()}
    without, within = figures["without"], figures["with"]
    kept = (within["pAUROC"] is not None and without["pAUROC"] is not None
            and (within["F1max"] or 0.0) - (without["F1max"] or 0.0) >= RESIDUAL_MIN_GAIN
            and within["pAUROC"] >= without["pAUROC"] - RESIDUAL_MAX_LOSS)
    switch(kept)
    return figures, kept


def choose_reference(memory: GreyMemory, maps: Sequence[FrameMap], frames: Mapping[int, NativeFrame],
                     grey: GreyMaps, references: Mapping[int, np.ndarray], fitting: Collection[int]) -> dict[str, Any]:
    """Rule 27's choice on the held-out frames' maps fused at :data:`WEIGHT`, after rule 23's: the memory's map with
    the die-to-die residual (frames with a reference in ``references``; rule 30's, 0 in the data bars) against
    without, on the bounds of the line residual's; ``memory.reference`` and ``memory.reference_scale`` set where kept
    (``grey``: :func:`memory_maps` of ``memory`` and ``references``). ``fitting``: the positions of the memory's
    fitting frames, the scale's. Returns the record."""
    memory.reference.fill_(0)
    memory.reference_scale.fill_(1.0)
    compared = [m.position for m in maps if m.position in references and fused(frames[m.position].levels.shape)]
    listed = len(compared)
    bars = sum(bool(pair_bar_rows(frames[p].as_levels(), as_levels(references[p])).any()) for p in compared)
    record: dict[str, Any] = {"held_out_with_reference": listed, "held_out_with_data_bar": bars, "kept": False}
    if listed < REFERENCE_MIN_FRAMES:
        return record | {"note": f"{listed} held-out support frames list a reference_uri that reads (needs "
                                 f"{REFERENCE_MIN_FRAMES})"}
    if not any(_has_defect(frames[m.position]) for m in maps):
        return record | {"note": "no defect pixel among the held-out support frames"}
    known = [(frames[p].as_levels(), as_levels(references[p]), frames[p].truth())
             for p in fitting if p in references and frames[p].truth() is not None]
    if not any(fused(levels.shape) for levels, _, _ in known):
        return record | {"note": "no fitting support frame lists a readable reference to fix the residual's scale on"}
    scale = fit_reference_scale(known)

    def switch(on: bool) -> None:
        memory.reference.fill_(OUTSIDE_BARS if on else 0)
        memory.reference_scale.fill_(scale if on else 1.0)

    figures, kept = _weigh_residual(maps, frames, grey, switch)
    return record | {"scale": round(scale, 5), "figures": figures, "kept": kept}


def frame_maps(scored: SupportMaps, frames: Mapping[int, NativeFrame],
               positions: Sequence[int] | None = None) -> Iterator[FrameMap]:
    """Each frame's map from its views' (``maps_to_frame`` over the tiles ``scored.prep`` cuts: a frame whose tiles
    the support set left out, a defect frame without a mask, takes its whole view's). ``positions``: the support row
    of each row the views were loaded from (None: the same); frames missing from ``frames`` are skipped."""
    for f in scored.frame.unique().tolist():
        position = f if positions is None else positions[f]
        if position not in frames:
            continue
        rows = (scored.frame == f).nonzero().flatten()
        h, w = frames[position].levels.shape
        tiles = frame_tiles(h, w, scored.prep)
        views = scored.maps[rows[:1 + len(tiles)]]
        as_run = len(views) == 1 + len(tiles)
        first = int(rows[0])
        yield FrameMap(position, maps_to_frame(views, h, w, tiles if as_run else []),
                       float(scored.class_probs[first][0]), bool(scored.labels[first] > 0),
                       scored.class_probs[first].numpy(), as_run)


def fuse(item: FrameMap, grey: GreyMaps, weight: float) -> torch.Tensor:
    """A frame's map fused as ``run`` fuses it: ``(1 - weight) * map + weight * memory``, frames over
    :data:`~semclip_batch.io.preprocess.FRAME_MAX_PIXELS` (whose levels ``run`` does not ship) unfused
    (:func:`~semclip_batch.io.preprocess.fuses_levels`)."""
    if not fuses_levels(item.map.shape[0], item.map.shape[1]):
        return item.map
    return blend(item.map, grey(item.position), weight)


def fused_counts(maps: Iterable[FrameMap], frames: Mapping[int, NativeFrame], grey: GreyMaps,
                 weights: Sequence[float]) -> dict[float, PixelCounts]:
    """Pixel counts of the frames' maps fused with the memory's at each of ``weights`` (frames with a truth only)."""
    counts = {w: PixelCounts() for w in weights}
    for item in maps:
        truth = frames[item.position].truth()
        if truth is None:
            continue
        for w in weights:
            fused = fuse(item, grey, w)
            counts[w].add(to_mask(fused.numpy()), truth, regions=False)
    return counts


def choose_weight(maps: Iterable[FrameMap], frames: Mapping[int, NativeFrame], grey: GreyMaps,
                  at_weight: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """Rule 17's choice on the held-out frames' maps: :data:`WEIGHT` where it gains at least :data:`MIN_GAIN` pixel
    AUROC over 0 and loses no F1max, else 0; the figures of both (``at_weight``: those at :data:`WEIGHT`, where
    already scored)."""
    weights = (0.0,) if at_weight is not None else (0.0, WEIGHT)
    counts = fused_counts(maps, frames, grey, weights)
    figures = {f"{w:g}": {"pAUROC": c.auroc(), "F1max": c.f1_max()} for w, c in counts.items()}
    if at_weight is not None:
        figures[f"{WEIGHT:g}"] = {"pAUROC": at_weight["pAUROC"], "F1max": at_weight["F1max"]}
    without, within = figures["0"], figures[f"{WEIGHT:g}"]
    if without["pAUROC"] is None or within["pAUROC"] is None:
        return {"weight": 0.0, "figures": figures, "note": "no defect pixel among the held-out support frames"}
    gain = within["pAUROC"] - without["pAUROC"]
    kept = gain >= MIN_GAIN and (within["F1max"] or 0.0) >= (without["F1max"] or 0.0)
    return {"weight": WEIGHT if kept else 0.0, "figures": figures, "gain": round(gain, 4)}


def fused_thresholds(maps: Iterable[FrameMap], frames: Mapping[int, NativeFrame], grey: GreyMaps, weight: float,
                     score_mode: str) -> dict[str, float]:
    """The image threshold (best balanced accuracy of the frames' scores, each from the fused map's maximum) and
    the pixel threshold (best F1 of the fused maps), as ``fit_thresholds`` fits them on views."""
    scores, defect, counts = [], [], PixelCounts()
    for item in maps:
        fused = fuse(item, grey, weight)
        scores.append(anomaly_score(item.p_normal, float(fused.max()), score_mode))
        defect.append(item.defect)
        truth = frames[item.position].truth()
        if truth is not None:
            counts.add(to_mask(fused.numpy()), truth, regions=False)
    return {"image": image_threshold(np.array(scores), np.array(defect)), "pixel": pixel_threshold(counts)}


@dataclass
class NativeSupport:
    """The support frames at native resolution after the grey-level memory's step, for the steps after it: their
    levels, the memory's maps and weight where kept, and every frame's maps at the policy where they were scored."""

    frames: dict[int, NativeFrame]
    scored: SupportMaps | None = None
    grey: GreyMaps | None = None  # the memory's map of each frame, where the memory is kept
    weight: float = 0.0

    def final_map(self, item: FrameMap) -> torch.Tensor:
        """A frame's map as ``run`` writes it: fused with the memory's where kept."""
        return item.map if self.grey is None else fuse(item, self.grey, self.weight)


def native_support(cfg: TrainConfig, df: pd.DataFrame, scored: SupportMaps | None = None) -> NativeSupport:
    """``df``'s frames as ``run``'s decode stage ships their levels (its stretch), no memory (``scored``: the
    support maps at the policy, where already scored)."""
    return NativeSupport(native_frames(df, cfg.model.storage_options, run_percentiles(cfg)), scored)


def run_percentiles(cfg: TrainConfig) -> tuple[float, float]:
    """The percentiles ``run``'s decode stage stretches a frame between, for ``cfg``'s backbone."""
    prep = preprocess_config(cfg.model.backbone, tile_above=10**9)
    return prep.percentile_low, prep.percentile_high


def grey_memory_step(cfg: TrainConfig, df: pd.DataFrame, held: Sequence[int], classes: tuple[str, ...],
                     backbone: LoadedBackbone, fitted: Fitted,
                     scored: SupportMaps | None = None) -> tuple[GreyMemory | None, dict[str, Any], NativeSupport]:
    """Rule 17 after the maps' policy is settled (``cfg``'s): the memory fitted on ``df``'s rows outside ``held``
    (positions), its weight chosen on ``held`` (scored as the maps' scale check scores them: the method's own
    memory left out), and with the weight kept, ``fitted``'s thresholds fitted again on every support frame's
    fused map (``scored``: the support maps the thresholds were last fitted on, when kept; else scored here).
    Returns the memory (None: not kept), the checkpoint's record and the frames for the steps after it."""
    support = native_support(cfg, df, scored)
    frames = support.frames
    held_rows = [p for p in held if p in frames]
    if not held_rows:  # nothing to choose the weight on: not fitted
        return None, {"weight": 0.0, "note": "no support frame is held out to choose the weight on"}, support
    known = fitting_frames(frames, held_rows)
    try:
        memory = fit_grey_memory(known, cfg.model.seed, own=cfg.grey_own)
    except ValueError as exc:
        return None, {"weight": 0.0, "note": str(exc)}, support
    record: dict[str, Any] = {"entries": len(memory.entries), "own": int(memory.own),
                              "scale": round(float(memory.scale), 5), "fitted_on": len(known), "held_out": len(held_rows)}
    at = replace(cfg, policy_from_weights=False, check_scale=False)
    try:
        held_maps = _held_out_maps(at, df, held_rows, frames, classes, backbone, fitted, scored)
    except ConfigError as exc:
        note = f"the held-out frames do not load at the maps' policy: {exc}"
        return None, record | {"weight": 0.0, "note": note}, support
    started = time.perf_counter()
    references = _references(cfg, df, frames) if cfg.reference_residual else {}
    loaded = time.perf_counter() - started
    grey = memory_maps(memory, frames, references)
    started = time.perf_counter()
    record["lines"] = choose_lines(memory, held_maps, frames, grey, known)
    record["lines"]["seconds"] = round(time.perf_counter() - started, 2)  # what the choice adds to train
    if cfg.reference_residual:
        started = time.perf_counter()
        out_of_fit = set(held_rows)
        fitting = [p for p in frames if p not in out_of_fit]
        record["reference"] = choose_reference(memory, held_maps, frames, grey, references, fitting)
        record["reference"]["seconds"] = round(time.perf_counter() - started + loaded, 2)  # with the references' loading
    chosen = _chosen_figures(record.get("reference", {})) or _chosen_figures(record["lines"])
    record |= choose_weight(held_maps, frames, grey, at_weight=chosen)
    del held_maps
    if not record["weight"]:
        return None, record, support
    memory.weight.fill_(record["weight"])
    if scored is None:
        scored = SupportMaps.of(*support_maps_at(at, df, classes, backbone, fitted))
    thresholds = fused_thresholds(frame_maps(scored, frames), frames, grey, record["weight"],
                                  cfg.model.score_mode)
    record["thresholds_before"] = {k: fitted.thresholds[k] for k in ("image", "pixel")}
    fitted.thresholds = {**fitted.thresholds, **thresholds}
    return memory, record, NativeSupport(frames, scored, grey, record["weight"])


def _held_out_maps(cfg: TrainConfig, df: pd.DataFrame, held_rows: Sequence[int], frames: Mapping[int, NativeFrame],
                   classes: tuple[str, ...], backbone: LoadedBackbone, fitted: Fitted,
                   scored: SupportMaps | None) -> list[FrameMap]:
    """The ``held_rows``' maps at ``cfg``'s policy with the method's memory left out (its bank holds their clean
    patches), in their order: read from ``scored`` (every support frame's maps at the policy) where leaving the memory
    out would not change them (:meth:`~semclip_batch.methods.registry.Method.memory_in_maps`), else scored again.
    Read from ``scored``, their class scores are those with the memory in (its distances rank the region head's
    patches): the weight's choices read the maps alone."""
    if scored is None or get_method(cfg.model.method).memory_in_maps(fitted.model):
        held_scored = SupportMaps.of(*support_maps_at(cfg, df.iloc[list(held_rows)], classes, backbone, fitted,
                                                      with_memory=False))
        return list(frame_maps(held_scored, frames, held_rows))
    by_position = {item.position: item for item in frame_maps(scored, {p: frames[p] for p in held_rows})}
    return [by_position[p] for p in held_rows if p in by_position]


def _references(cfg: TrainConfig, df: pd.DataFrame, frames: Mapping[int, NativeFrame]) -> dict[int, np.ndarray]:
    """``train --die-to-die``: the registered references' levels of the support frames whose maps ``run`` fuses,
    stretched as ``run``'s decode stage stretches a frame."""
    return reference_levels(df, {p for p, f in frames.items() if fused(f.levels.shape)}, cfg.model.storage_options,
                            run_percentiles(cfg))


def _chosen_figures(choice: Mapping[str, Any]) -> dict[str, float | None] | None:
    """A residual's choice's figures at :data:`WEIGHT` for the map it chose (None where it weighed nothing)."""
    figures = choice.get("figures")
    return None if not figures else figures["with" if choice["kept"] else "without"]


def grey_memory_lines(training: Mapping[str, Any]) -> list[str]:
    """``train``'s line on the grey-level memory: kept or not, and on what figures (none where it was not fitted)."""
    record = training.get("grey_memory")
    if not record:
        return []
    if "figures" not in record:
        return [f"grey-level memory: not kept ({record.get('note', 'not fitted')})"]
    figures = record["figures"]
    seen = "; ".join(f"weight {w}: pAUROC {_show(f['pAUROC'])}, F1max {_show(f['F1max'])}" for w, f in figures.items())
    verdict = (f"kept at weight {record['weight']:g}, thresholds fitted again on the fused maps" if record["weight"]
               else f"not kept (needs +{MIN_GAIN:g} pAUROC and no F1max lost{'; ' + record['note'] if 'note' in record else ''})")
    own = f", each frame also against {record['own']} of its own" if record.get("own") else ""
    return [f"grey-level memory ({record['entries']} entries{own}, fitted on {record['fitted_on']} frames): {verdict}; "
            f"the frames the fit held out score {seen}", *_lines_line(record.get("lines"), bool(record["weight"])),
            *_reference_line(record.get("reference"), bool(record["weight"]))]


def _lines_line(record: Mapping[str, Any] | None, stored: bool) -> list[str]:
    """``train``'s line on rule 23's line residual (``stored``: the memory is kept, and the residual with it)."""
    return [] if not record else [_residual_line(f"line residual ({record['length']} px lines)", record, stored)]


def _reference_line(record: Mapping[str, Any] | None, stored: bool) -> list[str]:
    """``train``'s line on rules 27 and 30's die-to-die residual (``stored``: as :func:`_lines_line`'s)."""
    if not record:
        return []
    bars = record.get("held_out_with_data_bar")  # absent: a checkpoint written before rule 30
    title = (f"die-to-die residual ({record['held_out_with_reference']} held-out frames with a reference"
             f"{'' if bars is None else f', {bars} with a data bar (its rows left out)'})")
    return [_residual_line(title, record, stored)]


def _residual_line(title: str, record: Mapping[str, Any], stored: bool) -> str:
    if "figures" not in record:
        return f"{title}: not kept ({record.get('note', 'not fitted')})"
    seen = "; ".join(f"{k}: pAUROC {_show(f['pAUROC'])}, F1max {_show(f['F1max'])}" for k, f in record["figures"].items())
    verdict = (("kept in the memory's map" if stored else "chosen, but the memory is not kept") if record["kept"]
               else f"not kept (needs +{RESIDUAL_MIN_GAIN:g} F1max, at most -{RESIDUAL_MAX_LOSS:g} pAUROC)")
    return f"{title}: {verdict}; the held-out frames at weight {WEIGHT:g}, {seen}"


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
