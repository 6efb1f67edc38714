"""``train --adapt-steps N``: the backbone adapted on the support frames before the few-shot fit.

``pretrain``'s objective (dense patch-text alignment and the class-aware image-text loss, crops around defects,
draws balanced over class and defect area, a warmed-up one-cycle schedule) run for N steps on the support rows
``train`` sampled, from the ``--pretrained`` weights, except the frames the few-shot fit holds out for its early
stopping and fusion weight (:func:`adaptation_rows`; 14 of 70): those judge the fit, and a backbone adapted on
them too makes every epoch of the fitted layers look alike there. The text tower adapts with the image tower, so
the class texts follow the images. With ``train``'s default the backbone is adapted only where it does not know the
support frames (:func:`zero_shot_accuracy` under the bound). The weights are written into the checkpoint folder,
with the checkpoint, as :data:`ADAPTED_BACKBONE` and the checkpoint names them
``checkpoint:backbone.safetensors`` with their checksum: the folder carries all ``run`` needs wherever it is
copied, and no second file can go astray.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from semclip_batch.config import DEFAULT_ADAPT_STEPS, LossProgress, ModelSpec, PreprocessConfig
from semclip_batch.fewshot.pretrain import PretrainConfig, pretrain
from semclip_batch.fewshot.trainset import TrainSet
from semclip_batch.io import storage
from semclip_batch.methods.checkpoint import IN_CHECKPOINT
from semclip_batch.methods.features import encode_views
from semclip_batch.methods.fitting import pooled_embeddings, validation_frames
from semclip_batch.methods.prompts import PromptSet, text_embeddings
from semclip_batch.methods.registry import depth_of
from semclip_batch.methods.weights import LoadedBackbone, load_backbone
from semclip_batch.model.towers import vision_tower

log = logging.getLogger(__name__)
ADAPTED_BACKBONE = "backbone.safetensors"
ADAPTED_SOURCE = IN_CHECKPOINT + ADAPTED_BACKBONE  # the checkpoint's weights.source for them


def adaptation_rows(df: pd.DataFrame, frame: torch.Tensor, seed: int) -> tuple[pd.DataFrame, int]:
    """The support manifest rows the backbone adapts on: those ``load_trainset`` decoded (``frame``: the manifest
    row of each support view, as it numbers them) except the frames the fit will hold out
    (:func:`~semclip_batch.methods.fitting.validation_frames`), and how many were held out."""
    held = validation_frames(frame, seed)
    rows = df.reset_index(drop=True)
    return rows[rows.index.isin(frame.unique().tolist()) & ~rows.index.isin(held.tolist())], len(held)


def default_adapt_steps(method: str, recipe: str) -> int:
    """``train``'s ``--adapt-steps`` when not given: :data:`~semclip_batch.config.DEFAULT_ADAPT_STEPS` for SEM-CLIP's
    ``transfer`` recipe (the default recipe); 0 for the ``paper`` recipe (the faithful one: a frozen backbone) and
    the baselines (their papers' recipes). Library callers of ``TrainConfig`` get 0 unless they ask."""
    return DEFAULT_ADAPT_STEPS if (method, recipe) == ("semclip", "transfer") else 0


@dataclass(frozen=True)
class Adapted:
    """The adapted weights: where :func:`adapt_backbone` wrote them, their checksum, and what the checkpoint records."""

    url: str
    sha256: str
    record: dict[str, Any]


@torch.no_grad()
def zero_shot_accuracy(backbone: LoadedBackbone, prompts: PromptSet, data: TrainSet, prep: PreprocessConfig) -> float:
    """The share of the labelled support frames (their whole views) whose pooled embedding lies nearest their own
    class text: how well the backbone already knows this data (``run``'s zero-shot class decision, text alone)."""
    rows = data.first_views().nonzero().flatten()
    rows = rows[data.labels[rows] >= 0]
    if rows.numel() == 0:
        return 0.0
    feats = encode_views(vision_tower(backbone.clip), data.views[rows], prep, (depth_of(backbone.clip),))
    text = torch.from_numpy(text_embeddings(backbone, prompts))
    pred = (pooled_embeddings(feats) @ text.t()).argmax(-1)
    return float((pred == data.labels[rows]).float().mean())


@dataclass(frozen=True)
class FitBackbone:
    """What ``train`` fits on: the backbone, the adaptation (None: the given weights as they are) with the adapted
    weights file's bytes (written into the checkpoint folder with the checkpoint, :func:`write_weights`), and the
    zero-shot check's record (None: no check)."""

    backbone: LoadedBackbone
    adapted: Adapted | None = None
    weights_file: bytes | None = None
    check: dict[str, Any] | None = None


def backbone_for_fit(model: ModelSpec, support: str, df: pd.DataFrame, data: TrainSet, prompts: PromptSet,
                     prep: PreprocessConfig, steps: int, lr: float, adapt_below: float | None,
                     progress: LossProgress | None = None) -> FitBackbone:
    """``model``'s weights, or those weights adapted for ``steps`` at ``lr`` on ``df`` (:func:`adaptation_rows`;
    ``data``: its support set as loaded, before augmentation). With ``adapt_below`` (``train``'s default), only
    where the weights classify fewer than that share of the support frames right zero-shot
    (:func:`zero_shot_accuracy`). The adapted weights are written to a temporary folder and kept in memory: the
    checkpoint folder gets them with the checkpoint, never before the fit has succeeded. ``progress``: the
    adaptation's steps and loss."""
    check = None
    if not steps or adapt_below is not None:  # the given weights are fitted on, or checked first
        start = load_backbone(model.backbone, model.pretrained, seed=model.seed,
                              expected_sha256=model.pretrained_sha256, storage_options=model.storage_options)
        if steps and adapt_below is not None:
            accuracy = zero_shot_accuracy(start, prompts, data, prep)
            check = {"zero_shot_accuracy": round(accuracy, 4), "adapt_below": adapt_below,
                     "adapted": accuracy < adapt_below}
        if check is None or not check["adapted"]:
            return FitBackbone(start, check=check)
        del start  # freed: pretrain loads its own copy
    rows, held = adaptation_rows(df, data.frame if data.frame is not None else torch.arange(len(data)), model.seed)
    with tempfile.TemporaryDirectory(prefix="semclip-adapt-") as folder:
        adapted = adapt_backbone(model, support, rows, folder, steps, lr, held_out=held, progress=progress)
        backbone = load_backbone(model.backbone, adapted.url, seed=model.seed, expected_sha256=adapted.sha256)
        blob = Path(adapted.url).read_bytes()
    return FitBackbone(backbone, adapted, blob, check)


def write_weights(checkpoint_url: str, fitted: FitBackbone, storage_options: Mapping[str, Any]) -> None:
    """The adapted weights into the checkpoint folder (before its tensors and JSON); a folder trained into again
    without adaptation loses the adapted weights of the checkpoint it held (nothing would name them)."""
    url = storage.join(checkpoint_url, ADAPTED_BACKBONE)
    if fitted.weights_file is not None:
        storage.write_bytes(url, fitted.weights_file, storage_options)
    elif storage.exists(url, storage_options):
        storage.remove(url, storage_options)


def adapt_backbone(model: ModelSpec, support: str, frames: pd.DataFrame, folder: str, steps: int,
                   lr: float, held_out: int = 0, progress: LossProgress | None = None) -> Adapted:
    """Adapt ``model``'s backbone on ``frames`` (rows of the ``support`` manifest; ``held_out`` others kept out)
    for ``steps`` at peak rate ``lr``; write the weights into ``folder`` as :data:`ADAPTED_BACKBONE`."""
    url = storage.join(folder, ADAPTED_BACKBONE)
    started = time.perf_counter()
    cfg = PretrainConfig(manifest=support, out=url, model=model, steps=steps, lr=lr, heldout=0.0, max_minutes=0.0,
                         scale_check=False)
    result = pretrain(cfg, progress, frames=frames, metadata={"adapted_from": storage.redact(model.pretrained)},
                      caller="train's adaptation",
                      alike_hint="weights pretrained with pretrain --text-separation 1 start further apart")
    seconds = round(time.perf_counter() - started, 1)
    log.info("adapted the backbone on %d support frames: %d steps in %.0f s", len(frames), result.steps, seconds)
    record = {"steps": result.steps, "lr": lr, "batch_size": cfg.batch_size, "crops": cfg.crops,
              "from": storage.redact(model.pretrained), "from_sha256": result.start_sha256,
              "sha256": result.sha256, "frames": len(frames), "held_out_frames": held_out, "seconds": seconds}
    return Adapted(url=url, sha256=result.sha256, record=record)


def adaptation_lines(training: dict[str, Any]) -> list[str]:
    """What ``train`` says about the backbone's adaptation: the zero-shot check (default) and the adaptation."""
    lines = []
    check, adapted = training.get("adapt_check"), training.get("adapted_backbone")
    if check is not None:
        verb = "adapted" if check["adapted"] else "kept frozen (--adapt-steps N adapts it anyway)"
        lines.append(f"zero-shot the backbone classifies {check['zero_shot_accuracy']:.2f} of the support frames right; "
                     f"below {check['adapt_below']:.2f} it is adapted first: {verb}")
    if adapted is not None:
        held = f" ({adapted['held_out_frames']} held out for the fit's checks)" if adapted.get("held_out_frames") else ""
        lines.append(f"backbone adapted on {adapted['frames']} support frames first{held}: {adapted['steps']} steps in "
                     f"{adapted['seconds']:.0f} s, weights in the checkpoint folder ({adapted['sha256'][:12]})")
    return lines
