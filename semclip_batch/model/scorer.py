"""What every method's model is: a module around a CLIP vision tower (``visual``) holding the class text
embeddings ``(C, E)`` (class 0 = normal) and the text temperature in buffers. Class text enters through one
method, :meth:`Scorer.set_text_embeddings`, for SEM-CLIP, the baselines and any registered method alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Scorer(nn.Module):
    """Subclasses register the ``text_embeddings`` ``(C, E)`` and ``text_scale`` buffers themselves."""

    text_embeddings: torch.Tensor
    text_scale: torch.Tensor
    method: str  # the registered method that built it (set by ``methods.registry.new_model``)

    def set_text_embeddings(self, text: torch.Tensor) -> None:
        """The one entry for prompt state: ``(C, E)`` class embeddings, class 0 = normal, stored normalised."""
        if text.shape != self.text_embeddings.shape:
            raise ValueError(f"text embeddings {tuple(text.shape)} != {tuple(self.text_embeddings.shape)}")
        self.text_embeddings.copy_(F.normalize(text.to(self.text_embeddings), dim=-1))
