"""Defect classes from the defect region's attributes (rule 22 in docs/quality.md; beyond the paper): a
multinomial logistic regression on the ten attributes of
:func:`~semclip_batch.methods.region_attributes.frame_attributes`, fitted on the support frames' own maps by
``train`` and blended by ``run`` into the class scores' defect share. Where defects are a few pixels of a model
view, the backbone's embedding of the view is the pattern's; the region's size, shape and contrast are the
defect's.

Tensors (buffers, saved in ``model.safetensors`` under :data:`REGION_CLASSES`): the attributes' mean and spread
on the support, the weights ``(10, K)`` and biases ``(K,)`` over the K defect classes (the checkpoint's classes
but normal, in order), which of them it saw a support frame of (``fitted``: 1 or 0; only those share the blend), the
blend and the share of the map's maximum that bounds the region.
"""

from __future__ import annotations

import torch
from torch import nn

REGION_CLASSES = "region_classes"  # its tensors' prefix in a checkpoint's model.safetensors
BLEND = 0.5  # the attributes' share of the defect classes' scores (rule 22; not tuned)


class RegionClasses(nn.Module):
    """The logistic regression's tensors and its probabilities (float64: ten numbers a frame)."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    fitted: torch.Tensor
    blend: torch.Tensor
    share: torch.Tensor

    def __init__(self, n_attributes: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_attributes, dtype=torch.float64))
        self.register_buffer("std", torch.ones(n_attributes, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(n_attributes, n_classes, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(n_classes, dtype=torch.float64))
        self.register_buffer("fitted", torch.ones(n_classes, dtype=torch.float64))
        self.register_buffer("blend", torch.tensor(BLEND, dtype=torch.float64))
        self.register_buffer("share", torch.tensor(0.8, dtype=torch.float64))

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, attributes: torch.Tensor) -> torch.Tensor:
        """``(N, A)`` attributes -> ``(N, K)`` logits."""
        z = (attributes.to(self.mean.dtype) - self.mean) / self.std
        return z @ self.weight + self.bias

    def probs(self, attributes: torch.Tensor) -> torch.Tensor:
        """``(N, A)`` attributes -> ``(N, K)`` probabilities of the defect classes (those it never saw: ~0)."""
        return self.logits(attributes).softmax(dim=-1)

    def seen(self) -> torch.Tensor:
        """``(K,)`` bool: the classes it was fitted on a support frame of."""
        return self.fitted > 0.5

    def valid(self) -> bool:
        """Finite tensors, a spread above 0, a blend and a share in (0, 1], at least two classes fitted."""
        finite = all(bool(torch.isfinite(t).all()) for t in (self.mean, self.std, self.weight, self.bias))
        return (finite and bool((self.std > 0).all()) and 0.0 < float(self.blend) <= 1.0
                and 0.0 < float(self.share) <= 1.0 and int(self.seen().sum()) >= 2)
