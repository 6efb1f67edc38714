"""``pretrain``'s held-out check: a seeded share of the input frames is never trained on, and per-class patch
AUROC (each class's patches against normal ones, by 1 - p(normal)) on their whole-frame views as ``run`` scores
them, the same on their crops, and the text scores' image accuracy are measured on them before and after training
(README "Few-shot: pretrain, train, checkpoints"), so a fab sees whether the backbone learned on its data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from semclip_batch.analysis.metrics import roc_auc
from semclip_batch.config import PreprocessConfig
from semclip_batch.fewshot.trainset import IGNORE, TrainSet, patch_labels
from semclip_batch.io.preprocess import normalize
from semclip_batch.model.encoder import EncoderOutput, encode_dual_path
from semclip_batch.model.semclip import patch_logits
from semclip_batch.model.towers import VisionTower, as_clip


def to_text_space(visual: VisionTower, tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens through the backbone's own ``ln_post`` + ``proj`` (the zero-shot Transformation Layer),
    normalised: what the dense loss and the held-out figures compare with the class texts."""
    return F.normalize(visual.ln_post(tokens) @ visual.proj, dim=-1)


def dense_logits(visual: VisionTower, enc: EncoderOutput, text: torch.Tensor, scale: torch.Tensor) -> list[torch.Tensor]:
    """Patch-text logits ``(B, N, C)`` of every tap and path of an encoding (the original path, and the v-v path
    where it was computed), through :func:`to_text_space`: what the dense loss trains and the held-out check
    scores."""
    terms = [t for pair in zip(enc.original, enc.vv, strict=True) for t in pair if t is not None]
    return [patch_logits(to_text_space(visual, t), text, scale, True) for t in terms]


class HeldOut(NamedTuple):
    """Row indices of a :func:`heldout_split`."""

    train: torch.Tensor  # every view of ~(1 - share) of the frames
    whole: torch.Tensor  # the whole-frame view of the others
    crops: torch.Tensor  # their crops (frames larger than the model input)


CROP_PREFIX = "crop_patch_AUROC"  # held-out figures on the crops (native and half resolution), not whole views
TEXT_COSINE = "text_cosine"  # mean cosine between the classes' text embeddings


def held_frames(data: TrainSet, held: HeldOut) -> torch.Tensor:
    """The manifest positions (``load_trainset``'s, the index reset) of the held-out frames."""
    return data.frame[held.whole] if data.frame is not None else held.whole


def heldout_split(data: TrainSet, share: float, seed: int) -> HeldOut:
    """Training rows and the held-out frames' rows (none held out below 20 frames)."""
    frame = data.frame if data.frame is not None else torch.arange(len(data))
    frames = frame.unique()
    n_held = int(len(frames) * share) if len(frames) >= 20 else 0
    held_frames = frames[torch.randperm(len(frames), generator=torch.Generator().manual_seed(seed + 11))[:n_held]]
    held = torch.isin(frame, held_frames)
    first = data.first_views()
    return HeldOut((~held).nonzero().flatten(), (held & first).nonzero().flatten(), (held & ~first).nonzero().flatten())


@torch.no_grad()
def heldout_figures(clip: nn.Module, data: TrainSet, rows: torch.Tensor, text: torch.Tensor, taps: tuple[int, ...],
                    prep: PreprocessConfig, batch: int = 32, prefix: str = "patch_AUROC",
                    accuracy: bool = True) -> dict[str, float | None]:
    """Per-class patch AUROC (``{prefix}/{class}``: each class's patches against normal ones, by 1 - p(normal)
    averaged over taps and paths) and, with ``accuracy``, text-score accuracy of the pooled embeddings, on
    ``rows``."""
    if rows.numel() == 0:
        return {}
    parts = as_clip(clip)
    scale = parts.logit_scale.exp().clamp(max=100.0)
    probs, targets, correct = [], [], []
    for idx in rows.split(batch):
        x = normalize(data.views[idx], prep)
        grid = x.shape[-1] // parts.visual.conv1.kernel_size[0]
        enc = encode_dual_path(parts.visual, x, taps, 1)
        probs.append(torch.stack([lg.softmax(-1) for lg in dense_logits(parts.visual, enc, text, scale)])
                     .mean(0).flatten(0, 1))
        targets.append(patch_labels(data.masks[idx], data.labels[idx], data.has_mask[idx], grid).flatten())
        labels = data.labels[idx]
        known = labels != IGNORE
        pred = (F.normalize(enc.pooled, dim=-1) @ text.t()).argmax(-1)
        correct.append((pred[known] == labels[known]).float())
    p, t = torch.cat(probs), torch.cat(targets)
    figures: dict[str, float | None] = {}
    for c, name in enumerate(data.classes[1:], start=1):
        pick = (t == c) | (t == 0)
        figures[f"{prefix}/{name}"] = roc_auc((1.0 - p[pick, 0]).numpy(), (t[pick] == c).numpy())
    if accuracy:
        hits = torch.cat(correct)
        figures["accuracy"] = float(hits.mean()) if hits.numel() else None
    return figures


def heldout_table(before: Mapping[str, float | None], after: Mapping[str, float | None]) -> list[str]:
    """The held-out figures as lines: one per class on whole views, one per class on crops, the classes' text
    cosine, then accuracy; before -> after."""
    show = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"held-out check ({'before':>6} -> after)"]
    last = {TEXT_COSINE: 1, "accuracy": 2}
    for key, value in sorted(after.items(), key=lambda kv: last.get(kv[0], 0)):
        view, _, name = key.partition("/")
        what = ("image accuracy (text)" if key == "accuracy" else "class-text cosine (mean)" if key == TEXT_COSINE
                else f"patch AUROC {name}" + (" (crops)" if view == CROP_PREFIX else ""))
        lines.append(f"  {what:<36} {show(before.get(key))} -> {show(value)}")
    return lines
