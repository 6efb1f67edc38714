"""Typed views of the parts of an open_clip ``CLIP`` model this package reads.

open_clip ships no type information, and ``nn.Module.__getattr__`` types every submodule and parameter as
``Tensor | Module``. These Protocols name the attributes the code uses, as open_clip defines them;
:func:`vision_tower` and :func:`as_clip` are the only places where a module is taken to have that shape
(:func:`~semclip_batch.model.encoder.check_supported` refuses vision towers this package cannot run). Nothing
here exists at runtime beyond the two functions, which return their argument's attribute / the argument itself.
A model that only scores images may be :class:`~semclip_batch.model.vit.VisionBackbone` instead: the same
``visual`` (:class:`VisionTower`) and ``logit_scale``, no text tower (``ClipModel``'s text attributes are absent).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, cast

import torch
from torch import nn


class Block(Protocol):
    """``open_clip.transformer.ResidualAttentionBlock``."""

    attn: nn.MultiheadAttention  # check_supported refuses towers whose blocks have another attention
    ln_1: nn.Module
    ls_1: nn.Module  # LayerScale or nn.Identity
    ln_2: nn.Module
    mlp: nn.Module
    ls_2: nn.Module

    def __call__(self, x: torch.Tensor, /) -> torch.Tensor: ...


class Blocks(Protocol):
    """The ``nn.ModuleList`` of blocks."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Block]: ...

    def __getitem__(self, index: int, /) -> Block: ...


class BlockStack(Protocol):
    """``open_clip.transformer.Transformer`` (its ``batch_first`` is read with ``getattr``: older towers lack it)."""

    resblocks: Blocks


class VisionTower(Protocol):
    """``open_clip.transformer.VisionTransformer``, a CLIP model's ``.visual``.

    ``proj`` is ``None`` only after ``prune_intermediate_layers(prune_head=True)``, which this package never calls.
    """

    conv1: nn.Conv2d
    class_embedding: nn.Parameter
    positional_embedding: nn.Parameter
    ln_pre: nn.Module
    transformer: BlockStack
    ln_post: nn.LayerNorm
    proj: nn.Parameter


class ClipModel(Protocol):
    """``open_clip.model.CLIP``: the vision tower, the text tower's parts and the logit scale."""

    visual: VisionTower
    logit_scale: nn.Parameter
    token_embedding: nn.Embedding
    positional_embedding: nn.Parameter
    transformer: nn.Module  # the text transformer, called as transformer(x, attn_mask=attn_mask)
    attn_mask: torch.Tensor
    ln_final: nn.Module
    text_projection: nn.Parameter | nn.Linear

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...


def as_clip(clip: nn.Module) -> ClipModel:
    """``clip`` (an open_clip ``CLIP``, as :func:`~semclip_batch.weights.load_backbone` builds) with its parts typed."""
    return cast(ClipModel, clip)


def vision_tower(module: nn.Module) -> VisionTower:
    """The ``.visual`` of a CLIP model, or of a scorer built around one."""
    return cast(VisionTower, module.visual)
