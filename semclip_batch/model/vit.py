"""An open_clip ViT's vision tower in plain torch, for processes that only score images.

``run``'s model actors read nothing of a CLIP model but its vision tower and its logit scale: the class texts are
embedded once on the driver. Building the whole model through open_clip made every actor import open_clip,
torchvision (and with it ``torch._dynamo``) and timm: a fresh process took ~3.5 s longer to build its scoring model
on this machine's CPU (``benchmarks/actor_start.py``).
:class:`VisionBackbone` holds the same modules under the same names (``visual.conv1``, ``visual.transformer.
resblocks.N.attn``, ..., ``logit_scale``), so open_clip's weights load into it unchanged and
:mod:`semclip_batch.model.encoder` runs it as it runs open_clip's own tower.

Only the plain tower is rebuilt (:class:`VisionConfig`): learned positions, class-token pooling, ``nn.MultiheadAttention``
blocks, GELU or QuickGELU, optional LayerScale and ``ln_pre``. Every other tower (timm, ResNet, attention pooling,
custom blocks) is built by open_clip as before (:func:`semclip_batch.methods.backbone_configs.vision_config` says which).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's shape, as an open_clip model config gives it (``vision_cfg`` plus ``embed_dim`` and
    ``quick_gelu``)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    output_dim: int
    quick_gelu: bool = False
    ls_init_value: float | None = None
    ln_pre: bool = True


class LayerNorm(nn.LayerNorm):
    """Layer norm whose output keeps its input's dtype (open_clip's own, for towers held in bf16 / fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """A learned per-channel scale (``gamma``) on a residual branch."""

    def __init__(self, width: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm attention and MLP, each a residual branch: ``x + ls_1(attn(ln_1(x)))``, then ``x + ls_2(mlp(ln_2(x)))``.
    Batch first, ``(B, N, W)``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        width, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, cfg.heads, batch_first=True)
        self.ls_1: nn.Module = nn.Identity() if cfg.ls_init_value is None else LayerScale(width, cfg.ls_init_value)
        self.ln_2 = LayerNorm(width)
        act: nn.Module = QuickGELU() if cfg.quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act),
                                              ("c_proj", nn.Linear(hidden, width))]))
        self.ls_2: nn.Module = nn.Identity() if cfg.ls_init_value is None else LayerScale(width, cfg.ls_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """The stack of blocks (``resblocks``)."""

    batch_first = True

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """Patch embedding (a convolution whose stride is its kernel), class token, learned positions, ``ln_pre``, the
    blocks, then ``ln_post`` of the class token times ``proj``. It is built to be loaded with weights
    (:func:`semclip_batch.methods.weights.load_vision_only` builds it on the meta device and assigns them), so it has
    no initialisation of its own: built on a real device, the class and position embeddings and ``proj`` are zeros
    and the rest takes torch's default initialisation."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        grid = cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, cfg.width))
        self.ln_pre: nn.Module = LayerNorm(cfg.width) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(cfg)
        self.ln_post = LayerNorm(cfg.width)
        self.proj = nn.Parameter(torch.zeros(cfg.width, cfg.output_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The image embedding ``(B, E)`` of ``(B, 3, S, S)`` images at the tower's own size."""
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        x = self.transformer(x)
        return self.ln_post(x)[:, 0] @ self.proj  # as open_clip pools: the norm over every token, then the first


class VisionBackbone(nn.Module):
    """What a scorer reads of an open_clip ``CLIP``: ``visual`` and ``logit_scale``, under the same names."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.visual = VisionTransformer(cfg)
        self.logit_scale = nn.Parameter(torch.zeros(()))
