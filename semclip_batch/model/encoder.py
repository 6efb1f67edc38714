"""The dual-path image encoder: open_clip's ViT blocks run unchanged, plus a V-V attention path.

In a dual-path block, with ``h = ln_1(x_ori)`` and ``v`` from the block's own ``in_proj`` weights, per head:
``a_vv = softmax(v v^T / sqrt(d)) v``; ``x_vv = x_vv + out_proj(a_vv)`` (no MLP on this path). ``x_vv`` starts
as the input of the first dual-path block. The original path is untouched, so the pooled embedding equals
open_clip's ``encode_image``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .towers import Block, VisionTower


@dataclass
class EncoderOutput:
    """Pooled embedding and the tapped tokens (CLS first) of both paths.

    ``pooled``: ``(B, E)``, or ``(B, 0)`` where the encoder stopped at the last tap (``pooled=False``);
    ``original[i]`` / ``vv[i]``: ``(B, 1 + N, W)`` after tapped block ``taps[i]`` (``vv[i]`` is ``None`` when that
    block is not dual-path or the V-V path is off).
    """

    pooled: torch.Tensor
    original: list[torch.Tensor]
    vv: list[torch.Tensor | None]


def check_supported(visual: VisionTower) -> None:
    """Refuse vision towers this encoder does not reimplement faithfully."""
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise ValueError(f"{type(visual).__name__} is not an open_clip ViT; SEM-CLIP needs a ViT backbone")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        raise ValueError("attention-pooled or final-LN-after-pool ViTs are not supported")
    pool_type = getattr(visual, "pool_type", "tok")
    if pool_type != "tok":
        raise ValueError(f"pool type {pool_type!r} is not supported (class-token pooling only)")
    if not all(isinstance(b.attn, nn.MultiheadAttention) for b in visual.transformer.resblocks):
        raise ValueError("only ViT blocks with nn.MultiheadAttention are supported")


def vv_attention(attn: nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
    """V-V self-attention per head, then the block's ``out_proj``. ``(B, N, W)`` -> ``(B, N, W)``."""
    b, n, w = h.shape
    heads = attn.num_heads
    v = F.linear(h, attn.in_proj_weight[2 * w:], None if attn.in_proj_bias is None else attn.in_proj_bias[2 * w:])
    v = v.view(b, n, heads, w // heads).transpose(1, 2)
    a = F.scaled_dot_product_attention(v, v, v)
    return attn.out_proj(a.transpose(1, 2).reshape(b, n, w))


def fuses(block: Block) -> bool:
    """Whether :func:`dual_block` reproduces this block: open_clip's self-attention block with one packed
    ``in_proj``, no extra key/value biases, no zero-attention row, no dropout and no cross-attention norm."""
    attn = getattr(block, "attn", None)
    return (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.in_proj_weight is not None
            and attn.bias_k is None and attn.bias_v is None and not attn.add_zero_attn
            and (attn.dropout == 0.0 or not attn.training) and not hasattr(block, "ln_1_kv")
            and all(hasattr(block, name) for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")))


def dual_block(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block on the original path and its V-V attention from the same ``ln_1`` and ``in_proj``: the block's own
    values are the V-V path's (``h = ln_1(x_ori)``), so Q, K and V are projected once, and both attentions go
    through ``out_proj`` in one matrix product. ``(B, N, W)`` -> (the block's output, ``out_proj(a_vv)``)."""
    attn = block.attn
    b, n, w = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
    both = torch.cat([F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(v, v, v)])
    out = attn.out_proj(both.transpose(1, 2).reshape(2 * b, n, w))
    x = x + block.ls_1(out[:b])
    return x + block.ls_2(block.mlp(block.ln_2(x))), out[b:]


def embed_patches(visual: VisionTower, images: torch.Tensor) -> torch.Tensor:
    """Patch + class + position embeddings and ``ln_pre``. ``(B, 3, S, S)`` -> ``(B, 1 + N, W)``."""
    x = visual.conv1(images)
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding.to(x.dtype)
    if pos.shape[0] != x.shape[1]:
        pos = interpolate_positions(pos, x.shape[1] - 1)
    return visual.ln_pre(x + pos)


def interpolate_positions(pos: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Bicubic resampling of a square position grid to ``n_patches`` (another input size)."""
    old = round((pos.shape[0] - 1) ** 0.5)
    new = round(n_patches ** 0.5)
    grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(pos.dtype)])


def keep_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The class token and the patch tokens at ``keep``. ``(B, 1 + N, W)``, ``(B, K)`` -> ``(B, 1 + K, W)``."""
    idx = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def embed_kept_patches(visual: VisionTower, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """:func:`embed_patches` then :func:`keep_tokens`, computed for the kept patches only: the patch embedding is a
    convolution whose stride is its kernel, so each token is a linear map of its own pixels, and the dropped ones
    need not be computed at all, nor their share of the convolution's backward (in ``pretrain``'s steps on
    semclip-tiny, at a quarter of the tokens, the whole grid's embedding took ~35 ms of a step's ~135 ms backward).
    The same values up to float rounding. Square images; any other patch embedding (padding, dilation, groups)
    takes the whole grid. ``(B, 3, S, S)``, ``(B, K)`` -> ``(B, 1 + K, W)``."""
    conv = visual.conv1
    side = conv.kernel_size[0]
    plain = (tuple(conv.kernel_size) == tuple(conv.stride) == (side, side) and conv.padding in ((0, 0), 0)
             and tuple(conv.dilation) == (1, 1) and conv.groups == 1)
    if not plain or images.shape[-2] != images.shape[-1]:
        return keep_tokens(embed_patches(visual, images), keep)
    b, c, s, _ = images.shape
    grid = s // side
    cells = images[:, :, :grid * side, :grid * side].reshape(b, c, grid, side, grid, side)
    rows = torch.arange(b, device=images.device)[:, None]
    # advanced indices on dims 0, 2, 4 (split by slices) go first: (B, K, C, side, side), the weight's (C, kh, kw) order
    pixels = cells[rows, :, keep // grid, :, keep % grid, :].reshape(b, keep.shape[1], c * side * side)
    x = F.linear(pixels, conv.weight.reshape(conv.out_channels, -1), conv.bias)
    pos = visual.positional_embedding.to(x.dtype)
    if pos.shape[0] != 1 + grid * grid:
        pos = interpolate_positions(pos, grid * grid)
    cls = (visual.class_embedding.to(x.dtype) + pos[0]).view(1, 1, -1).expand(b, -1, -1)
    return visual.ln_pre(torch.cat([cls, x + pos[1:][keep]], dim=1))


def encode_dual_path(visual: VisionTower, images: torch.Tensor, taps: tuple[int, ...], vv_from: int | None,
                     keep: torch.Tensor | None = None, pooled: bool = True) -> EncoderOutput:
    """Run the blocks once, both paths, keeping the tokens after each tapped block (a dual-path block projects its
    queries, keys and values once for both: :func:`dual_block`).

    Args:
        taps: 1-based block indices to tap.
        vv_from: 1-based first dual-path block, or ``None`` for no V-V path.
        keep: ``(B, K)`` 0-based patch indices to run (the rest are dropped after the position embedding, as
            in token-dropping CLIP training; the outputs then hold ``1 + K`` tokens). ``None``: every patch.
        pooled: False stops after the last tapped block (the reference views need its tokens only: a quarter of
            the tower's blocks); the output's ``pooled`` is then empty, ``(B, 0)``.
    """
    x = embed_patches(visual, images) if keep is None else embed_kept_patches(visual, images, keep)
    batch_first = getattr(visual.transformer, "batch_first", True)
    x_vv: torch.Tensor | None = None
    original: list[torch.Tensor] = []
    vv: list[torch.Tensor | None] = []
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        if vv_from is not None and index >= vv_from:
            if x_vv is None:
                x_vv = x
            if fuses(block):
                x, a_vv = dual_block(block, x)
                x_vv = x_vv + block.ls_1(a_vv)
            else:
                x_vv = x_vv + block.ls_1(vv_attention(block.attn, block.ln_1(x)))
                x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        else:
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        if index in taps:
            original.append(x)
            vv.append(x_vv)
            if not pooled and len(original) == len(taps):
                return EncoderOutput(pooled=x.new_zeros((x.shape[0], 0)), original=original, vv=vv)
    embedding = visual.ln_post(x[:, 0])
    if visual.proj is not None:
        embedding = embedding @ visual.proj
    return EncoderOutput(pooled=embedding, original=original, vv=vv)
