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

from .encoder import EncoderOutput, check_supported, encode_dual_path
from .scorer import Scorer
from .surgery import feature_surgery, plain_similarity
from .towers import as_clip, vision_tower


def default_taps(depth: int) -> tuple[int, ...]:
    """Taps at round(L*k/4), k = 1..4 (3, 6, 9, 12 of 12), deduplicated."""
    return tuple(sorted({max(1, round(depth * k / 4)) for k in range(1, 5)}))


CLS_MODES = ("text", "head", "fused")


@dataclass(frozen=True)
class SemClipConfig:
    """Model options (each [ours] choice of SEMCLIP.md is one field, so it can be ablated).

    ``cls``: class probabilities from the text scores only (zero-shot), the trained head only, or both fused
    as ``alpha * softmax(text) + (1 - alpha) * softmax(head)``.
    """

    taps: tuple[int, ...]
    use_vv: bool = True
    vv_from: int = 1
    surgery: bool = True
    surgery_weights: str = "cls"
    sigma: float = 4.0
    cls: str = "text"
    head_hidden: int = 128


@dataclass
class SemClipOutput:
    """``maps``: ``(B, S, S)`` anomaly map in [0, 1] at model input size; ``class_probs``: ``(B, C)``;
    ``embeddings``: ``(B, E)`` normalised pooled image embeddings."""

    maps: torch.Tensor
    class_probs: torch.Tensor
    embeddings: torch.Tensor


def patch_logits(feats: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, surgery: bool,
                 weights: str = "cls") -> torch.Tensor:
    """Class logits of every patch of one tap and path. ``(B, 1 + N, E)`` normalised -> ``(B, N, C)``."""
    patches, cls = feats[:, 1:], feats[:, 0]
    sim = feature_surgery(patches, cls, text, weights) if surgery else plain_similarity(patches, text)
    return scale * sim


def defect_map(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """1 - p(normal) per patch, bilinear to ``size``. ``(B, N, C)`` -> ``(B, H, W)``."""
    defect = 1.0 - logits.float().softmax(dim=-1)[..., 0]
    grid = round(defect.shape[1] ** 0.5)
    return F.interpolate(defect.view(-1, 1, grid, grid), size=size, mode="bilinear", align_corners=False)[:, 0]


class ClassHead(nn.Module):
    """Few-shot classification head on ``[z ; z T^T]`` (image embedding and its class similarities)."""

    def __init__(self, embed: int, n_classes: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed + n_classes, hidden), nn.GELU(), nn.Linear(hidden, n_classes))

    def forward(self, emb: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([emb, sims], dim=-1))


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


class SemClip(Scorer):
    """SEM-CLIP around an open_clip ``CLIP`` model (its vision tower is used, frozen)."""

    text_embeddings: torch.Tensor  # buffers, registered in __init__
    alpha: torch.Tensor
    text_scale: torch.Tensor

    def __init__(self, clip: nn.Module, cfg: SemClipConfig, n_classes: int) -> None:
        super().__init__()
        visual = vision_tower(clip)
        check_supported(visual)
        depth = len(visual.transformer.resblocks)
        if not cfg.taps or min(cfg.taps) < 1 or max(cfg.taps) > depth:
            raise ValueError(f"taps {cfg.taps} must lie in 1..{depth}")
        if not 1 <= cfg.vv_from <= depth:
            raise ValueError(f"vv_from {cfg.vv_from} must lie in 1..{depth}")
        if cfg.cls not in CLS_MODES:
            raise ValueError(f"cls mode {cfg.cls!r} not in {CLS_MODES}")
        self.cfg = cfg
        self.visual = visual
        logit_scale = as_clip(clip).logit_scale
        self.logit_scale = nn.Parameter(logit_scale.detach().clone(), requires_grad=False)
        self.transform = nn.ModuleList(TransformationLayer(visual.ln_post, visual.proj) for _ in cfg.taps)
        embed = visual.proj.shape[1]
        self.head = ClassHead(embed, n_classes, cfg.head_hidden)
        self.register_buffer("text_embeddings", torch.zeros(n_classes, embed))
        self.register_buffer("alpha", torch.tensor(1.0))
        self.register_buffer("text_scale", logit_scale.detach().exp().clone())

    def n_terms(self) -> int:
        return sum(1 + int(self.cfg.use_vv and tap >= self.cfg.vv_from) for tap in self.cfg.taps)

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        """The frozen backbone's part: pooled embedding and tapped tokens of both paths."""
        vv_from = self.cfg.vv_from if self.cfg.use_vv else None
        return encode_dual_path(self.visual, images, self.cfg.taps, vv_from)

    def term_logits(self, enc: EncoderOutput) -> list[torch.Tensor]:
        """Patch class logits per tapped layer and path (the map's terms), each ``(B, N, C)``."""
        text = self.text_embeddings.to(enc.pooled.dtype)
        scale = self.logit_scale.exp().to(enc.pooled.dtype)
        out = []
        for layer, ori, vv in zip(self.transform, enc.original, enc.vv, strict=True):
            for tokens in (ori, vv):
                if tokens is not None:
                    out.append(patch_logits(layer(tokens), text, scale, self.cfg.surgery, self.cfg.surgery_weights))
        return out

    def class_logits(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text logits (fitted temperature) and head logits for normalised embeddings ``(B, E)``."""
        sims = emb @ self.text_embeddings.to(emb.dtype).t()
        return self.text_scale.to(emb.dtype) * sims, self.head(emb, sims)

    def class_probs(self, emb: torch.Tensor) -> torch.Tensor:
        text_logits, head_logits = self.class_logits(emb)
        if self.cfg.cls == "text":
            return text_logits.float().softmax(dim=-1)
        if self.cfg.cls == "head":
            return head_logits.float().softmax(dim=-1)
        a = self.alpha.float()
        return a * text_logits.float().softmax(dim=-1) + (1 - a) * head_logits.float().softmax(dim=-1)

    def forward(self, images: torch.Tensor) -> SemClipOutput:
        """``(B, 3, S, S)`` normalised images -> :class:`SemClipOutput`."""
        enc = self.encode(images)
        return self.from_encoded(enc, (images.shape[-2], images.shape[-1]))

    def from_encoded(self, enc: EncoderOutput, size: tuple[int, int]) -> SemClipOutput:
        terms = self.term_logits(enc)
        total = sum(defect_map(t, size) for t in terms)
        assert isinstance(total, torch.Tensor)  # not sum()'s 0: every tap has its original-path term
        maps = gaussian_blur(total / len(terms), self.cfg.sigma).clamp(0.0, 1.0)
        emb = F.normalize(enc.pooled, dim=-1)
        return SemClipOutput(maps=maps, class_probs=self.class_probs(emb), embeddings=emb.float())
