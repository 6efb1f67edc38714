"""What a method fits on (:class:`Support`) and the fitting helpers the methods share: the text temperature,
the seeded holdout split, focal + dice, the support set's normal rows. The orchestration (support loading,
thresholds, reference scale, checkpoint) is :mod:`semclip_batch.fewshot.train`'s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semclip_batch.config import LossProgress
from semclip_batch.errors import ConfigError
from semclip_batch.methods.features import Features
from semclip_batch.model.encoder import EncoderOutput

MapAuroc = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]


class SupportSet(Protocol):
    """The labelled support images (``fewshot.trainset.TrainSet``): ``views`` / ``masks`` ``(N, S, S)``,
    ``labels`` ``(N,)`` class index, ``has_mask`` ``(N,)``, the class names."""

    views: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    has_mask: torch.Tensor
    classes: tuple[str, ...]
    frame: torch.Tensor | None  # (N,) the manifest row each view comes from (a frame's tiles share it), or None

    def __len__(self) -> int: ...

    def first_views(self) -> torch.Tensor: ...  # (N,) bool: each frame's whole view (tiles and crops follow it)


@dataclass(frozen=True)
class Support:
    """Everything a method's ``fit`` gets: the support set, its frozen-backbone features (encoded once), the
    backbone (``clip``, open_clip name ``clip_name``), the training options and ``map_auroc(maps, masks,
    has_mask)`` (pixel AUROC of maps against masks, for early stopping on held-out support images)."""

    data: SupportSet
    feats: Features
    clip: nn.Module
    clip_name: str
    map_auroc: MapAuroc
    seed: int = 0
    lr: float = 1e-3
    epochs: int | None = None
    batch_size: int = 8
    anchor: float = 1.0  # L2-SP weight (SEM-CLIP's Transformation Layers)
    progress: LossProgress | None = None
    copies: int = 1  # rows are `copies` augmented copies of the same frames, copy-major (fewshot.augment)
    choose_self_similarity: bool = False  # SEM-CLIP: choose the self-similarity weight with the memory's
    # fuse_reference(maps, rows): the rows' maps fused with their references as run fuses them (None: no references)
    fuse_reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # SEM-CLIP: whether the Transformation Layers train with the head, or keep the backbone's zero-shot layers and
    # the head alone trains (a backbone adapted on these frames for dense alignment: fewshot.adapt)
    fit_layers: bool = True

    @property
    def frames(self) -> int:
        """Distinct support frames (rows of the first copy)."""
        return len(self.data) // self.copies

    def rows_of(self, frames: torch.Tensor, first_copy_only: bool = False) -> torch.Tensor:
        """The rows of every copy (or the first only) of the given first-copy rows."""
        copies = 1 if first_copy_only else self.copies
        return (frames[None, :] + self.frames * torch.arange(copies)[:, None]).flatten()

    @property
    def groups(self) -> torch.Tensor:
        """``(frames,)`` the manifest row of each first-copy row: a frame's whole view and its tiles (train with a
        scale policy) share one, so that splits keep them together."""
        frame = self.data.frame
        return torch.arange(self.frames) if frame is None else frame[:self.frames]


@dataclass(frozen=True)
class HeldOutMaps:
    """What :meth:`~semclip_batch.methods.registry.Method.held_out_maps` returns: support ``rows`` whose frames the
    fit did not learn from, the fitted model's ``maps`` of them (model-input size), and ``fitted``: every row
    (copy, tile) of the frames it did learn from."""

    rows: torch.Tensor
    maps: torch.Tensor
    fitted: torch.Tensor


def grouped(support: Support, seed: int) -> list[torch.Tensor]:
    """First-copy rows grouped by frame, the groups in a seeded random order (one row per group without tiles,
    in the order ``randperm(frames)`` gives)."""
    ids, inverse = support.groups.unique(return_inverse=True)
    return [(inverse == g).nonzero().flatten() for g in frame_order(len(ids), seed)]


def frame_order(frames: int, seed: int) -> torch.Tensor:
    """The seeded random order of ``frames`` frames that folds and splits draw them in."""
    return torch.randperm(frames, generator=torch.Generator().manual_seed(seed))


def frame_folds(support: Support, folds: int, seed: int) -> list[torch.Tensor]:
    """First-copy rows of each of up to ``folds`` folds, by frame (seeded)."""
    groups = grouped(support, seed)
    return [torch.cat(groups[k::folds]) for k in range(min(folds, len(groups)))]


def fit_temperature(emb: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> float:
    """The text softmax temperature maximising the support set's log-likelihood (grid 1..200)."""
    sims = emb @ text.t()
    grid = torch.logspace(0, np.log10(200.0), 40)
    nll = torch.stack([F.cross_entropy(s * sims, labels) for s in grid])
    return float(grid[int(nll.argmin())])


def pooled_embeddings(feats: Features) -> torch.Tensor:
    """The support images' normalised pooled embeddings ``(N, E)``."""
    return F.normalize(feats.dual.pooled.float(), dim=-1)


VALIDATION_SHARE = 0.2  # of the support frames early stopping holds out
MIN_VALIDATION_FRAMES = 10  # below it none are held out
SPLIT_SEED = 7  # added to the support's seed for the split


def validation_frames(groups: torch.Tensor, seed: int, share: float = VALIDATION_SHARE) -> torch.Tensor:
    """The frames (values of ``groups``, e.g. ``TrainSet.frame``) :func:`support_split` holds out at ``seed``:
    known before the fit, so that ``train --adapt-steps`` can keep them out of the backbone's adaptation too."""
    ids = groups.unique()
    return ids[frame_order(len(ids), seed + SPLIT_SEED)[:validation_count(len(ids), share)]]


def validation_count(frames: int, share: float = VALIDATION_SHARE) -> int:
    """How many of ``frames`` support frames early stopping holds out: ``share`` of them, none below
    :data:`MIN_VALIDATION_FRAMES`."""
    return int(frames * share) if frames >= MIN_VALIDATION_FRAMES else 0


def support_split(support: Support, share: float = VALIDATION_SHARE) -> tuple[torch.Tensor, torch.Tensor]:
    """Fitting rows (every augmented copy of 80 % of the frames) and validation rows (the first copy of the
    other 20 %, none below 10 frames): no copy or tile of a validation frame is fitted on."""
    groups = grouped(support, support.seed + SPLIT_SEED)
    n_val = validation_count(len(groups), share)
    fit = torch.cat(groups[n_val:])
    val = torch.cat(groups[:n_val]) if n_val else torch.zeros(0, dtype=torch.long)
    return support.rows_of(fit), support.rows_of(val, first_copy_only=True)


def clean_patches(masks: torch.Tensor, has_mask: torch.Tensor, grid: int) -> torch.Tensor:
    """Patches holding no defect pixel, of rows with a mask. ``(B, S, S)`` -> ``(B, grid * grid)`` bool."""
    frac = F.adaptive_avg_pool2d(masks.float()[:, None], grid)[:, 0].flatten(1)
    return (frac == 0) & has_mask[:, None]


def has_defect_pixel(data: SupportSet, rows: torch.Tensor) -> bool:
    """Whether any of ``rows`` with a mask holds a defect pixel (mask >= 0.5): what a map AUROC over them needs."""
    return bool((data.masks[rows][data.has_mask[rows]] >= 0.5).any())


def focal_dice(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal (gamma 2) + dice loss of a defect probability map. ``(B, S, S)`` each."""
    p = prob.clamp(1e-6, 1 - 1e-6)
    pt = torch.where(target > 0.5, p, 1 - p)
    focal = (-(1 - pt) ** gamma * pt.log()).mean()
    inter = (p * target).sum(dim=(1, 2))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1)
    return focal + dice.mean()


def subset_encoded(enc: EncoderOutput, idx: torch.Tensor) -> EncoderOutput:
    pick = lambda t: None if t is None else t[idx]  # noqa: E731
    return EncoderOutput(pooled=enc.pooled[idx], original=[t[idx] for t in enc.original],
                         vv=[pick(t) for t in enc.vv])


def normal_rows(data: SupportSet, method: str) -> torch.Tensor:
    """Indices of the normal support images (for methods that learn from normal images only)."""
    idx = (data.labels == 0).nonzero().flatten()
    if idx.numel() == 0:
        raise ConfigError(f"--method {method} learns from normal images; the support set has none")
    return idx
