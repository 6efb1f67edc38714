"""``pretrain``'s scale check: at which scale policy its own held-out frames are best mapped.

A backbone pretrained on an archive whose defects are a few pixels wide at frame resolution cannot see them
on the whole frame resized to the model input; one pretrained on large defects gains nothing from tiles but
their cost. The frames ``pretrain`` held out (never trained on, labelled, of the archive the fab will score)
say which: each is scored zero-shot exactly as ``run`` scores it (:func:`~semclip_batch.config.zero_shot_spec`,
its tiles under each candidate policy, maps joined at the frame's size and stored as uint8) and the pixel AUROC
pooled over them is measured per policy. The recommendation is the cheapest policy (fewest model views)
within :data:`~semclip_batch.config.SCALE_CHECK_TOLERANCE` of the best: ``run`` and ``train`` take it when no
``--scale-policy`` is given (README "Scale check").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from semclip_batch.analysis.metrics import PixelCounts
from semclip_batch.config import (
    DEFAULT_TILE_ABOVE,
    NORMAL,
    SCALE_CHECK_POLICIES,
    SCALE_CHECK_TOLERANCE,
    parse_scale_policy,
    zero_shot_spec,
)
from semclip_batch.errors import ImageError
from semclip_batch.io.frames import load_frame
from semclip_batch.io.preprocess import decoded_views, frame_tiles, maps_to_frame, normalize, unpack_views
from semclip_batch.methods.decisions import to_mask_tensor
from semclip_batch.methods.features import encode_batch
from semclip_batch.methods.registry import get_method, new_model, score_features
from semclip_batch.methods.weights import preprocess_config
from semclip_batch.model.towers import vision_tower

log = logging.getLogger(__name__)
BATCH = 32  # model views per forward pass


@dataclass(frozen=True)
class CheckFrame:
    """A held-out frame and its truth mask (all False for a normal frame without one)."""

    gray: np.ndarray
    truth: np.ndarray


def check_frames(df: pd.DataFrame, storage_options: Mapping[str, Any] | None) -> list[CheckFrame]:
    """The rows of ``df`` with a pixel truth, decoded as ``eval`` reads them: a mask file, or a normal label (no
    defect pixel); defect rows without a mask and unreadable rows are left out."""
    frames = []
    for _, row in df.iterrows():
        if not row["mask_url"] and row["label"] != NORMAL:
            continue
        try:
            gray = load_frame(row["url"], storage_options)
            truth = (load_frame(row["mask_url"], storage_options) > 0 if row["mask_url"]
                     else np.zeros(gray.shape, bool))
        except ImageError as exc:
            log.warning("scale check: %s left out (%s)", row["uri"], exc)
            continue
        if truth.shape == gray.shape:
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


def check_views(frames: Sequence[CheckFrame], backbone: str) -> list[int]:
    """Per candidate policy, the model views ``frames`` take at it (the whole view and its tiles)."""
    preps = [preprocess_config(backbone, tile_above=DEFAULT_TILE_ABOVE, scale_policy=parse_scale_policy(name))
             for name in SCALE_CHECK_POLICIES]
    return [sum(1 + len(frame_tiles(f.gray.shape[0], f.gray.shape[1], prep)) for f in frames) for prep in preps]


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
    measured = {name: row for name, row in check.items() if row.get("pAUROC") is not None}
    if not measured:
        return None
    best = max(float(row["pAUROC"] or 0.0) for row in measured.values())
    near = [name for name, row in measured.items() if float(row["pAUROC"] or 0.0) >= best - tolerance]
    return min(near, key=lambda name: (int(measured[name].get("views") or 0), SCALE_CHECK_POLICIES.index(name)
                                       if name in SCALE_CHECK_POLICIES else len(SCALE_CHECK_POLICIES)))


def check_lines(check: Mapping[str, Mapping[str, float | int | None]], chosen: str | None) -> list[str]:
    """The scale check as lines for ``pretrain``'s output."""
    lines = ["scale check (held-out frames, zero-shot run's maps): policy, pixel AUROC, model views"]
    for name, row in check.items():
        auroc = row.get("pAUROC")
        mark = "  <- recommended: run and train use it unless --scale-policy is given" if name == chosen else ""
        lines.append(f"  {name:<8} {'  n/a' if auroc is None else f'{auroc:.3f}'} {row.get('views') or 0:>7}{mark}")
    return lines
