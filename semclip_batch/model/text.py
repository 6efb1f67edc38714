"""Class text embeddings: each class is the L2-normalised mean of its normalised prompt embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .towers import as_clip

TRIMMABLE_POOLS = ("argmax", "eos")  # pooled at the end-of-text token: nothing after it reaches it under a causal mask


def encode_prompts(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``clip.encode_text(tokens)`` run on the columns up to the longest prompt's last token only.

    Prompts fill a few of the 77 context columns; under the text tower's causal mask nothing in the padding after
    the end-of-text token reaches the token the tower pools at, so the embeddings are those of the full context
    (to float rounding) at a fraction of the cost: a quarter of the text tower's work for the shipped prompts.
    Towers that pool elsewhere (``first``, ``last``, a mean) or attend both ways run the full context.
    ``(P, context)`` -> ``(P, E)``.
    """
    parts = as_clip(clip)
    pool = getattr(clip, "text_pool_type", None)
    if pool not in TRIMMABLE_POOLS or getattr(clip, "attn_mask", None) is None or tokens.numel() == 0:
        return parts.encode_text(tokens)
    from open_clip.transformer import text_global_pool  # here: importing open_clip costs ~3.7 s, and scoring needs none

    used = int((tokens != 0).any(dim=0).nonzero().max()) + 1
    text = tokens[:, :used]
    x = parts.token_embedding(text) + parts.positional_embedding[:used]
    x = parts.ln_final(parts.transformer(x, attn_mask=parts.attn_mask[:used, :used]))
    x = text_global_pool(x, text, pool, eos_token_id=getattr(clip, "text_eos_id", None))
    proj = parts.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


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
