"""Feature surgery (CLIP Surgery): remove the redundant features every class prompt lights up.

For normalised patch features ``f`` and class text embeddings ``t_c``:
``e_c = f * t_c``; ``w_c = softmax_c(2 g.t_c) / mean_c(softmax_c(2 g.t_c))``; ``r = mean_c(w_c e_c)``;
``s_c = sum_d(w_c e_c,d - r_d)``, with ``g`` the normalised class token (``cls``) or ``f`` itself (``patch``).
"""

from __future__ import annotations

import torch


def surgery_weights(guide: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Per-class weights. ``guide (..., D)``, ``text (C, D)`` -> ``(..., C)``, mean 1 over classes."""
    prob = (2.0 * guide @ text.t()).softmax(dim=-1)
    return prob / prob.mean(dim=-1, keepdim=True)


def feature_surgery(patches: torch.Tensor, cls: torch.Tensor, text: torch.Tensor, weights: str = "cls") -> torch.Tensor:
    """Class similarities with redundant features removed.

    Args:
        patches: ``(B, N, D)`` normalised patch features.
        cls: ``(B, D)`` normalised class token of the same tap and path.
        text: ``(C, D)`` normalised class embeddings.
        weights: ``cls`` (one weight vector per image, as the reference code) or ``patch``.
    Returns:
        ``(B, N, C)`` similarities ``s_c``.
    """
    guide = cls[:, None, :] if weights == "cls" else patches
    w = surgery_weights(guide, text)  # (B, 1 | N, C)
    # sum_d(w_c e_c,d - r_d) = w_c (f . t_c) - sum_d r_d, and sum_d r_d = mean_c(w_c (f . t_c)):
    # algebraically identical to the elementwise form, without a (B, N, C, D) tensor.
    weighted = w * (patches @ text.t())
    return weighted - weighted.mean(dim=-1, keepdim=True)


def plain_similarity(patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarities without surgery. ``(B, N, D)``, ``(C, D)`` -> ``(B, N, C)``."""
    return patches @ text.t()
