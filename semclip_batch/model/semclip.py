"""SEM-CLIP inference model: dual-path tokens -> Transformation Layers -> surgery -> anomaly map + classes.

The few-shot / prompt state (class text embeddings) enters through :meth:`SemClip.set_text_embeddings` and
lives in a registered buffer, so it travels with ``state_dict``. Class 0 is always ``normal``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import check_supported, encode_dual_path
from .surgery import feature_surgery, plain_similarity


def default_taps(depth: int) -> tuple[int, ...]:
    """Taps at round(L*k/4), k = 1..4 (3, 6, 9, 12 of 12), deduplicated."""
    return tuple(sorted({max(1, round(depth * k / 4)) for k in range(1, 5)}))


@dataclass(frozen=True)
class SemClipConfig:
    """Model options (each [ours] choice of SEMCLIP.md is one field, so it can be ablated)."""

    taps: tuple[int, ...]
    use_vv: bool = True
    vv_from: int = 1
    surgery: bool = True
    surgery_weights: str = "cls"
    sigma: float = 4.0


@dataclass
class SemClipOutput:
    """``maps``: ``(B, S, S)`` anomaly map in [0, 1] at model input size; ``class_probs``: ``(B, C)``;
    ``embeddings``: ``(B, E)`` normalised pooled image embeddings."""

    maps: torch.Tensor
    class_probs: torch.Tensor
    embeddings: torch.Tensor


class TransformationLayer(nn.Module):
    """LayerNorm + Linear (width -> embed), initialised as the backbone's ``ln_post`` + ``proj``."""

    def __init__(self, ln_post: nn.LayerNorm, proj: torch.Tensor) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(ln_post.normalized_shape, eps=ln_post.eps)
        self.norm.load_state_dict(ln_post.state_dict())
        self.linear = nn.Linear(proj.shape[0], proj.shape[1], bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(proj.t())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, W)`` -> ``(B, T, E)``, L2-normalised."""
        return F.normalize(self.linear(self.norm(tokens)), dim=-1)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(4.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian with reflected borders. ``(B, H, W)`` -> ``(B, H, W)``."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel(sigma).to(maps)
    r = k.numel() // 2
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x[:, 0]


class SemClip(nn.Module):
    """SEM-CLIP around an open_clip ``CLIP`` model (its vision tower is used, frozen)."""

    def __init__(self, clip: nn.Module, cfg: SemClipConfig, n_classes: int) -> None:
        super().__init__()
        visual = clip.visual
        check_supported(visual)
        depth = len(visual.transformer.resblocks)
        if not cfg.taps or min(cfg.taps) < 1 or max(cfg.taps) > depth:
            raise ValueError(f"taps {cfg.taps} must lie in 1..{depth}")
        if not 1 <= cfg.vv_from <= depth:
            raise ValueError(f"vv_from {cfg.vv_from} must lie in 1..{depth}")
        self.cfg = cfg
        self.visual = visual
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone(), requires_grad=False)
        self.transform = nn.ModuleList(TransformationLayer(visual.ln_post, visual.proj) for _ in cfg.taps)
        embed = visual.proj.shape[1]
        self.register_buffer("text_embeddings", torch.zeros(n_classes, embed))

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def set_text_embeddings(self, text: torch.Tensor) -> None:
        """The one entry for prompt state: ``(C, E)`` class embeddings, class 0 = normal."""
        if text.shape != self.text_embeddings.shape:
            raise ValueError(f"text embeddings {tuple(text.shape)} != {tuple(self.text_embeddings.shape)}")
        self.text_embeddings.copy_(F.normalize(text.to(self.text_embeddings), dim=-1))

    def n_terms(self) -> int:
        return sum(1 + int(self.cfg.use_vv and tap >= self.cfg.vv_from) for tap in self.cfg.taps)

    def forward(self, images: torch.Tensor) -> SemClipOutput:
        """``(B, 3, S, S)`` normalised images -> :class:`SemClipOutput`."""
        vv_from = self.cfg.vv_from if self.cfg.use_vv else None
        enc = encode_dual_path(self.visual, images, self.cfg.taps, vv_from)
        text = self.text_embeddings.to(images.dtype)
        scale = self.logit_scale.exp().to(images.dtype)
        total = torch.zeros(images.shape[0], images.shape[-2], images.shape[-1], dtype=torch.float32,
                            device=images.device)
        for layer, ori, vv in zip(self.transform, enc.original, enc.vv, strict=False):
            for tokens in (ori, vv):
                if tokens is not None:
                    total = total + self._path_map(layer(tokens), text, scale, images.shape[-2:])
        maps = gaussian_blur(total / self.n_terms(), self.cfg.sigma).clamp(0.0, 1.0)
        emb = F.normalize(enc.pooled, dim=-1)
        probs = (scale * emb @ text.t()).float().softmax(dim=-1)
        return SemClipOutput(maps=maps, class_probs=probs, embeddings=emb.float())

    def _path_map(self, feats: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                  size: torch.Size) -> torch.Tensor:
        """Defect probability of one tap and path, upsampled. ``(B, 1 + N, E)`` -> ``(B, S, S)``."""
        patches, cls = feats[:, 1:], feats[:, 0]
        if self.cfg.surgery:
            sim = feature_surgery(patches, cls, text, self.cfg.surgery_weights)
        else:
            sim = plain_similarity(patches, text)
        defect = 1.0 - (scale * sim).float().softmax(dim=-1)[..., 0]
        grid = round(defect.shape[1] ** 0.5)
        defect = defect.view(-1, 1, grid, grid)
        return F.interpolate(defect, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
