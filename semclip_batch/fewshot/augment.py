"""Support-set augmentation: every frame (with its mask and reference) in four orientations, copy-major, so
row ``k * N + i`` is frame ``i`` under transform ``k`` (``methods.fitting.Support.rows_of`` relies on it).
SEM frames have no preferred orientation at the defect scale, and flips and quarter turns keep pixels exact."""

from __future__ import annotations

from collections.abc import Callable

import torch

from semclip_batch.fewshot.trainset import TrainSet

Transform = Callable[[torch.Tensor], torch.Tensor]
TRANSFORMS: dict[str, Transform] = {
    "identity": lambda t: t,
    "hflip": lambda t: t.flip(-1),
    "vflip": lambda t: t.flip(-2),
    "rot90": lambda t: t.rot90(1, dims=(-2, -1)),
}


def augment(data: TrainSet) -> TrainSet:
    """``len(TRANSFORMS)`` copies of every row, copy-major."""
    n = len(TRANSFORMS)
    each = lambda t: torch.cat([f(t) for f in TRANSFORMS.values()])  # noqa: E731
    return TrainSet(views=each(data.views), masks=each(data.masks), labels=data.labels.repeat(n),
                    has_mask=data.has_mask.repeat(n), captions=data.captions * n, classes=data.classes,
                    skipped=data.skipped, refs=None if data.refs is None else each(data.refs),
                    has_ref=None if data.has_ref is None else data.has_ref.repeat(n),
                    frame=None if data.frame is None else data.frame.repeat(n))
