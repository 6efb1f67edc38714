"""What the two baselines share: a normal / anomalous pair of text embeddings (``states``), the class text, and
one way from patch scores and the pooled embedding to :class:`SemClipOutput`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import check_supported
from .patchops import compose_class_probs, grid_to_image, state_probability
from .scorer import Scorer
from .semclip import SemClipOutput, gaussian_blur
from .towers import as_clip, vision_tower


class TwoStateScorer(Scorer):
    text_embeddings: torch.Tensor  # buffers, registered in __init__
    states: torch.Tensor
    state_scale: torch.Tensor
    text_scale: torch.Tensor

    def __init__(self, clip: nn.Module, n_classes: int, sigma: float) -> None:
        super().__init__()
        visual = vision_tower(clip)
        check_supported(visual)
        self.visual = visual
        self.sigma = sigma
        embed = visual.proj.shape[1]
        logit_scale = as_clip(clip).logit_scale
        self.register_buffer("text_embeddings", torch.zeros(n_classes, embed))
        self.register_buffer("states", torch.zeros(2, embed))
        self.register_buffer("state_scale", logit_scale.detach().exp().clone())
        self.register_buffer("text_scale", logit_scale.detach().exp().clone())

    def state_probability(self, feats: torch.Tensor) -> torch.Tensor:
        """p(anomalous) of normalised features ``(..., E)``."""
        states = self.states.to(feats.dtype)  # held in bf16 / fp16: the windows score in it, the pooled embedding in float32
        return state_probability(feats, states[0], states[1], self.state_scale.to(feats.dtype))

    def output(self, patch_scores: torch.Tensor, pooled: torch.Tensor, size: tuple[int, int]) -> SemClipOutput:
        """``(B, N)`` patch scores and ``(B, E)`` pooled embeddings -> smoothed maps at ``size`` and class
        probabilities (p(normal) = 1 - the pooled embedding's p(anomalous))."""
        maps = gaussian_blur(grid_to_image(patch_scores, size), self.sigma).clamp(0.0, 1.0)
        emb = F.normalize(pooled.float(), dim=-1)
        probs = compose_class_probs(self.state_probability(emb), emb @ self.text_embeddings.float().t(),
                                    self.text_scale.float())
        return SemClipOutput(maps=maps, class_probs=probs, embeddings=emb)
