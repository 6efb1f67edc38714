"""``pretrain``'s scale check: at which scale policy its own held-out frames are best mapped.

A backbone pretrained on an archive whose defects are a few pixels wide at frame resolution cannot see them
on the whole frame resized to the model input; one pretrained on large defects gains nothing from tiles but
their cost. The frames ``pretrain`` held out (never trained on, labelled, of the archive the fab will score)
say which: each is scored zero-shot as ``run`` scores it (:func:`~semclip_batch.config.zero_shot_spec`, its
tiles under each candidate policy, maps joined at the frame's size and stored as uint8; each view once, without
``run``'s half-patch shifts, which move every policy's map alike) and the pixel AUROC
pooled over them is measured per policy. The recommendation is the cheapest policy (fewest model views)
within :data:`~semclip_batch.config.SCALE_CHECK_TOLERANCE` of the best: ``run`` and ``train`` take it when no
``--scale-policy`` is given (README "The scale check").
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from semclip_batch.analysis.evaluate import truth_mask
from semclip_batch.analysis.metrics import PixelCounts
from semclip_batch.config import (
    DEFAULT_TILE_ABOVE,
    NORMAL,
    SCALE_CHECK_FRAMES,
    SCALE_CHECK_KEY,
    SCALE_CHECK_POLICIES,
    SCALE_CHECK_TOLERANCE,
    SCALE_POLICY_KEY,
    parse_scale_policy,
    zero_shot_spec,
)
from semclip_batch.errors import ImageError, OutputError
from semclip_batch.fewshot.trainset import row_frame
from semclip_batch.io.preprocess import decoded_views, frame_tiles, maps_to_frame, normalize, unpack_views
from semclip_batch.methods.decisions import to_mask_tensor
from semclip_batch.methods.features import encode_batch
from semclip_batch.methods.prompts import PromptSet, clip_text_embeddings
from semclip_batch.methods.registry import get_method, new_model, score_features
from semclip_batch.methods.weights import preprocess_config
from semclip_batch.model.towers import vision_tower

log = logging.getLogger(__name__)
BATCH = 32  # model views per forward pass
TIMED_FRAMES = 10  # frames the check's time is estimated on, before training


@dataclass(frozen=True)
class CheckFrame:
    """A held-out frame and its truth mask (all False for a normal frame without one)."""

    gray: np.ndarray
    truth: np.ndarray


def with_truth(df: pd.DataFrame) -> pd.DataFrame:
    """The rows ``eval`` has a pixel truth for: a mask file, or a normal label (no defect pixel)."""
    return df[(df["mask_url"] != "") | (df["label"] == NORMAL)]


def check_frames(df: pd.DataFrame, storage_options: Mapping[str, Any] | None) -> list[CheckFrame]:
    """The rows of ``df`` with a pixel truth (:func:`with_truth`), decoded as ``run`` and ``eval`` read them
    (``trainset.row_frame``, ``evaluate.truth_mask``); unreadable rows are left out, warned."""
    frames = []
    for _, row in with_truth(df).iterrows():
        try:
            gray = row_frame(row, storage_options)
            truth = truth_mask(row, gray.shape, storage_options)
        except (ImageError, OutputError) as exc:
            log.warning("scale check: %s left out (%s)", row["uri"], exc)
            continue
        if truth is not None:
            frames.append(CheckFrame(gray, truth))
    return frames


@torch.no_grad()
def policy_auroc(clip: torch.nn.Module, backbone: str, text: torch.Tensor, frames: Sequence[CheckFrame],
                 policy: float | None) -> tuple[float | None, int]:
    """Pixel AUROC over ``frames`` of zero-shot ``run``'s stored maps at ``policy`` (the default
    ``--tile-above``), and the number of model views it took."""
    spec = zero_shot_spec(backbone, "in-memory", scale_policy=policy)
    prep = preprocess_config(backbone, tile_above=DEFAULT_TILE_ABOVE, scale_policy=policy)
    model = new_model(spec, clip, text).eval()
    method = get_method(spec.method)
    taps, vv_from = method.taps(model), method.vv_from(model)
    counts, views = PixelCounts(), 0
    for frame in frames:
        h, w = frame.gray.shape
        packed, _ = decoded_views(frame.gray, prep)
        x = normalize(unpack_views(torch.from_numpy(packed)), prep)
        maps = []
        for part in x.split(BATCH):
            feats = encode_batch(vision_tower(model), part, taps, vv_from=vv_from, windows=method.windows)
            maps.append(score_features(model, feats, (part.shape[-2], part.shape[-1])).maps.float())
        stored = to_mask_tensor(maps_to_frame(torch.cat(maps), h, w, frame_tiles(h, w, prep))).numpy()
        counts.add(stored, frame.truth, regions=False)
        views += x.shape[0]
    return counts.auroc(), views


def scale_check(clip: torch.nn.Module, backbone: str, text: torch.Tensor,
                frames: Sequence[CheckFrame]) -> dict[str, dict[str, float | int | None]]:
    """Per candidate policy (:data:`~semclip_batch.config.SCALE_CHECK_POLICIES`, by name): its pixel AUROC on
    ``frames`` and the model views it took."""
    out: dict[str, dict[str, float | int | None]] = {}
    for name in SCALE_CHECK_POLICIES:
        auroc, views = policy_auroc(clip, backbone, text, frames, parse_scale_policy(name))
        out[name] = {"pAUROC": auroc, "views": views}
    return out


def recommend(check: Mapping[str, Mapping[str, float | int | None]],
              tolerance: float = SCALE_CHECK_TOLERANCE) -> str | None:
    """The policy with the fewest views whose pixel AUROC is within ``tolerance`` of the best; None when no
    policy could be measured (no defect pixel among the frames)."""
    auroc = {name: float(a) for name, row in check.items() if (a := row.get("pAUROC")) is not None}
    if not auroc:
        return None
    best = max(auroc.values())
    near = [name for name, a in auroc.items() if a >= best - tolerance]
    order = {name: k for k, name in enumerate(SCALE_CHECK_POLICIES)}  # ties in views: the coarser
    return min(near, key=lambda name: (int(check[name].get("views") or 0), order.get(name, len(order))))


FITTED = "the fitted model"  # train's check after the fit (its record's scored_by; before it: the starting weights)
PRETRAIN_MARK = "recommended: run and train use it unless --scale-policy is given"
MAPS_MARK = "chosen: run --model scores the maps at it (the fit at whole; stored in the checkpoint)"


def check_lines(check: Mapping[str, Mapping[str, float | int | None]], chosen: str | None, frames: int,
                source: str = "held-out", mark: str = PRETRAIN_MARK, maps: str = "zero-shot run's maps") -> list[str]:
    """The scale check as lines for ``pretrain``'s (``train``'s: ``source``, ``mark``, ``maps``) output."""
    lines = [f"scale check ({frames} {source} frames, {maps}): policy, pixel AUROC, model views"]
    for name, row in check.items():
        auroc = row.get("pAUROC")
        mark_here = f"  <- {mark}" if name == chosen else ""
        lines.append(f"  {name:<8} {'  n/a' if auroc is None else f'{auroc:.3f}'} {row.get('views') or 0:>7}{mark_here}")
    return lines


@dataclass(frozen=True)
class ScaleCheck:
    """``pretrain``'s scale check: per policy its pixel AUROC and model views, the recommended policy, and why
    nothing was recommended (``note``) where nothing was."""

    figures: dict[str, dict[str, float | int | None]]
    chosen: str | None
    note: str | None = None
    frames: int = 0

    def metadata(self) -> dict[str, str]:
        """The weights file's metadata entries (none without figures)."""
        out = {SCALE_CHECK_KEY: json.dumps(self.figures)} if self.figures else {}
        return out | ({SCALE_POLICY_KEY: self.chosen} if self.chosen is not None else {})

    def lines(self) -> list[str]:
        if self.note is not None:
            return [f"scale check: {self.note}; run and train score the whole frame unless --scale-policy is given"]
        return check_lines(self.figures, self.chosen, self.frames)


def check_rows(df: pd.DataFrame, positions: torch.Tensor) -> pd.DataFrame:
    """Up to :data:`SCALE_CHECK_FRAMES` of the rows at ``positions`` of ``df`` (its index reset) that have a pixel
    truth, evenly spread over them."""
    rows = with_truth(df.reset_index(drop=True).iloc[positions.tolist()])
    if len(rows) > SCALE_CHECK_FRAMES:
        rows = rows.iloc[np.linspace(0, len(rows) - 1, SCALE_CHECK_FRAMES).round().astype(int)]
    return rows


def reserve_seconds(clip: torch.nn.Module, backbone: str, prompts: PromptSet, rows: pd.DataFrame,
                    storage_options: Mapping[str, Any] | None) -> float:
    """What the check of ``rows`` will take after training: the whole check, reading included, timed now on a few
    of them evenly spread over the rows (its cost does not depend on the weights), scaled to all of them. The
    frames are not kept."""
    if rows.empty:
        return 0.0
    picks = np.unique(np.linspace(0, len(rows) - 1, min(TIMED_FRAMES, len(rows))).round().astype(int))
    t0 = time.perf_counter()  # reading the frames counts too: the check reads them again after training
    timed = check_frames(rows.iloc[picks], storage_options)
    if not timed:
        return 0.0
    with evaluating(clip):
        scale_check(clip, backbone, clip_text_embeddings(clip, backbone, prompts), timed)
    seconds = (time.perf_counter() - t0) * len(rows) / len(picks)
    log.info("scale check: %.0f s reserved for %d held-out frames", seconds, len(rows))
    return seconds


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block, its own mode back afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


HELD_OUT_WITHOUT_TRUTH = ("no held-out frame with a pixel truth (archives under 20 frames hold none out; defect rows "
                          "need a mask_uri)")


def run_check(clip: torch.nn.Module, backbone: str, prompts: PromptSet, rows: pd.DataFrame,
              storage_options: Mapping[str, Any] | None) -> ScaleCheck:
    """The scale check of the held-out ``rows`` with the weights as they are (eval mode)."""
    if rows.empty:
        return ScaleCheck({}, None, HELD_OUT_WITHOUT_TRUTH)
    frames = check_frames(rows, storage_options)
    if not any(bool(f.truth.any()) for f in frames):
        return ScaleCheck({}, None, f"no defect pixel among the {len(frames)} held-out frames", len(frames))
    t0 = time.perf_counter()
    figures = scale_check(clip, backbone, clip_text_embeddings(clip, backbone, prompts), frames)
    log.info("scale check: %d held-out frames, %d model views, %.0f s", len(frames),
             sum(int(row["views"] or 0) for row in figures.values()), time.perf_counter() - t0)
    return ScaleCheck(figures, recommend(figures), None, len(frames))


def support_check_lines(training: Mapping[str, Any]) -> list[str]:
    """``train``'s output for the check of the maps' policy recorded in a checkpoint's ``training`` (none where none
    ran): since ``scored_by`` is :data:`FITTED`, the fitted model's on the held-out support frames
    (``fewshot.maps_policy.held_out_check``); in checkpoints before it, the starting weights' zero-shot maps of the
    support frames."""
    record = training.get("scale_check")
    if not isinstance(record, Mapping):
        return []
    if record.get("note"):
        return [f"scale check: {record['note']}; maps at whole (--scale-policy sets another)"]
    stepped = record.get("maps_at")
    mark = MAPS_MARK if stepped is None else f"chosen; maps at {stepped}: the support views would not fit in memory at it"
    if record.get("scored_by") == FITTED:
        return check_lines(record["figures"], record["chosen"], int(record["frames"]), "held-out support", mark,
                           "the fitted model's maps, its memory left out")
    return check_lines(record["figures"], record["chosen"], int(record["frames"]), "support", mark)
