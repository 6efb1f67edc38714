"""Class text embeddings: each class is the L2-normalised mean of its normalised prompt embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .towers import as_clip


@torch.no_grad()
def class_embeddings(clip: nn.Module, tokens: list[torch.Tensor]) -> torch.Tensor:
    """Encode each class's prompts with the CLIP text tower.

    Args:
        clip: an open_clip ``CLIP`` model.
        tokens: one ``(P_c, context)`` token tensor per class.
    Returns:
        ``(C, E)`` normalised class embeddings.
    """
    out = []
    for class_tokens in tokens:
        emb = F.normalize(as_clip(clip).encode_text(class_tokens).float(), dim=-1)
        out.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(out)
