"""SEM-CLIP inference model: dual-path tokens -> Transformation Layers -> surgery -> anomaly map + classes.

The few-shot / prompt state (class text embeddings) enters through :meth:`SemClip.set_text_embeddings` and
lives in a registered buffer, so it travels with ``state_dict``. Class 0 is always ``normal``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import EncoderOutput, check_supported, encode_dual_path
from .memory import PatchMemory, memory_taps
from .patchops import grid_to_image
from .scorer import Scorer
from .selfsim import has_matches, self_distance, self_scores
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
    as ``alpha * softmax(text) + (1 - alpha) * softmax(head)``. ``memory``: a normal-patch memory fused into
    the map (:mod:`.memory`). ``region_head``: the head also reads the *region embedding*, the mean projected
    token of the most anomalous patches (a small defect barely moves the pooled token). ``self_similarity``: the
    weight of the in-frame self-similarity map (:mod:`.selfsim`) in the fused map, 0 for none.
    """

    taps: tuple[int, ...]
    use_vv: bool = True
    vv_from: int = 1
    surgery: bool = True
    surgery_weights: str = "cls"
    sigma: float = 4.0
    cls: str = "text"
    head_hidden: int = 128
    memory: bool = False
    region_head: bool = False
    region_share: float = 0.02  # of the patches, at least one
    self_similarity: float = 0.0


def head_input(emb: torch.Tensor, text: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """``[z ; z T^T]`` (and ``[r ; r T^T]`` of the region embedding when given). ``(B, E)`` -> ``(B, F)``."""
    parts = [emb, emb @ text.t()]
    if region is not None:
        parts += [region, region @ text.t()]
    return torch.cat(parts, dim=-1)


@dataclass
class MapParts:
    """The anomaly map's parts ``(B, H, W)`` before they are joined and smoothed: the method's own (the mean
    over the taps' and paths' defect maps), the normal-patch memory's scores and the self-similarity scores
    (None where the model has no such part)."""

    method: torch.Tensor
    memory: torch.Tensor | None
    self_similarity: torch.Tensor | None

    def smoothed(self, sigma: float) -> MapParts:
        """Each part smoothed by :func:`gaussian_blur` (linear: joining smoothed parts smooths the joined map)."""
        def blur(part: torch.Tensor | None) -> torch.Tensor | None:
            return None if part is None else gaussian_blur(part, sigma)
        return MapParts(gaussian_blur(self.method, sigma), blur(self.memory), blur(self.self_similarity))


def join_parts(parts: MapParts, memory_weight: float | torch.Tensor, self_weight: float) -> torch.Tensor:
    """``(1 - s)·((1 - m)·method + m·memory) + s·self``, unsmoothed; a missing part's weight is ignored."""
    total = parts.method
    if parts.memory is not None:
        total = (1.0 - memory_weight) * total + memory_weight * parts.memory
    if parts.self_similarity is not None:
        total = (1.0 - self_weight) * total + self_weight * parts.self_similarity
    return total


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


def patch_defect(logits: torch.Tensor) -> torch.Tensor:
    """1 - p(normal) per patch, in float32. ``(B, N, C)`` -> ``(B, N)``."""
    return 1.0 - logits.float().softmax(dim=-1)[..., 0]


def defect_map(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`patch_defect` bilinear to ``size``. ``(B, N, C)`` -> ``(B, H, W)``."""
    return grid_to_image(patch_defect(logits), size)


class ClassHead(nn.Module):
    """Few-shot classification head on :func:`head_input` (embeddings and their class similarities)."""

    def __init__(self, features: int, n_classes: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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


BLUR_BLOCK = 128  # output columns (rows) per product where :func:`gaussian_blur` takes a long axis in blocks


def gaussian_radius(sigma: float) -> int:
    """The Gaussian's half-width in samples: ``ceil(4 sigma)``, at least 1."""
    return max(1, math.ceil(4.0 * sigma))


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = gaussian_radius(sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian with reflected borders. ``(B, H, W)`` -> ``(B, H, W)``.

    Each axis is one matrix product with :func:`blur_matrix` (the padded 1-D convolution as a linear map): a
    one-channel ``conv2d`` with a 33-tap kernel ran at a few GFLOP/s on CPU and took a third of
    semclip-tiny's forward pass; the product does more arithmetic at the matmul rate, 10-20x faster here. The matrix
    is a band (no entry farther than the radius from its diagonal), so a map with a side longer than ``2 * BLUR_BLOCK``
    is taken in blocks of ``BLUR_BLOCK`` outputs along both axes, each from the inputs its band reaches
    (:func:`banded_product`): a 1024 px map ~32 -> ~10 ms here (``benchmarks/train_kernels.py``), the same sums up to
    float rounding (a few ulp); maps whose sides are all at most ``2 * BLUR_BLOCK`` (the model's views) as before, to
    the bit."""
    if sigma <= 0:
        return maps
    along_w = blur_matrix(maps.shape[-1], sigma, maps.device, maps.dtype)
    along_h = blur_matrix(maps.shape[-2], sigma, maps.device, maps.dtype)
    radius = gaussian_radius(sigma)
    if max(maps.shape[-2:]) <= 2 * BLUR_BLOCK:
        return along_h.t() @ (maps @ along_w)
    return banded_product(banded_product(maps, along_w, radius), along_h.t(), radius, left=True)


def banded_product(x: torch.Tensor, band: torch.Tensor, radius: int, *, left: bool = False) -> torch.Tensor:
    """``x @ band`` (``band @ x`` with ``left``) for an ``(n, n)`` matrix whose entries vanish farther than ``radius``
    from its diagonal: blocks of ``BLUR_BLOCK`` outputs, each the product with the ``BLUR_BLOCK + 2 radius`` inputs its
    band reaches (about ``n / (BLUR_BLOCK + 2 radius)`` times less arithmetic than the whole product)."""
    n = band.shape[-1]
    out = x.new_empty(x.shape)
    for start in range(0, n, BLUR_BLOCK):
        stop = min(n, start + BLUR_BLOCK)
        lo, hi = max(0, start - radius), min(n, stop + radius)
        if left:
            out[..., start:stop, :] = band[start:stop, lo:hi] @ x[..., lo:hi, :]
        else:
            out[..., start:stop] = x[..., lo:hi] @ band[lo:hi, start:stop]
    return out


@functools.lru_cache(maxsize=16)
def blur_matrix(n: int, sigma: float, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 1-D Gaussian of ``sigma`` with reflected borders on ``n`` samples, as the ``(n, n)`` matrix ``A``
    with ``blurred = x @ A`` for rows ``x``: the padded convolution applied to each unit vector. Cached per
    device and dtype, so a GPU actor builds and copies each matrix once, not on every batch."""
    k = gaussian_kernel(sigma)
    r = k.numel() // 2
    # a plain tensor even when first asked for under inference mode: training saves it for backward
    with torch.inference_mode(False), torch.no_grad():
        unit = torch.eye(n, dtype=torch.float32)[:, None, None]  # (n, 1, 1, n): one unit row per batch entry
        matrix = F.conv2d(F.pad(unit, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))[:, 0, 0]
        return matrix.to(device=device, dtype=dtype)


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
        if not 0.0 <= cfg.self_similarity <= 1.0:
            raise ValueError(f"self-similarity weight {cfg.self_similarity:g} must lie in [0, 1]")
        self.cfg = cfg
        self.visual = visual
        logit_scale = as_clip(clip).logit_scale
        self.logit_scale = nn.Parameter(logit_scale.detach().clone(), requires_grad=False)
        self.transform = nn.ModuleList(TransformationLayer(visual.ln_post, visual.proj) for _ in cfg.taps)
        embed = visual.proj.shape[1]
        self.head = ClassHead((embed + n_classes) * (2 if cfg.region_head else 1), n_classes, cfg.head_hidden)
        self.memory = PatchMemory(memory_taps(cfg.taps), visual.proj.shape[0]) if cfg.memory else None
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

    def class_logits(self, emb: torch.Tensor, region: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text logits (fitted temperature) and head logits for normalised embeddings ``(B, E)`` (and region
        embeddings, with ``region_head``)."""
        return self.text_logits(emb), self.head(head_input(emb, self.text_embeddings.to(emb.dtype), region))

    def text_logits(self, emb: torch.Tensor) -> torch.Tensor:
        """Class logits of the text scores alone (fitted temperature) for normalised embeddings ``(B, E)``."""
        return self.text_scale.to(emb.dtype) * (emb @ self.text_embeddings.to(emb.dtype).t())

    def class_probs(self, emb: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
        text_logits, head_logits = self.class_logits(emb, region)
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

    def memory_in_map(self) -> bool:
        """Whether the normal-patch memory is weighed in the map: filled, not left out, its weight above 0 (one
        device sync). Where not, the map is the same without its distances."""
        memory = self.memory
        return memory is not None and not memory.empty and not memory.left_out and float(memory.weight) != 0.0

    def memory_distance(self, enc: EncoderOutput) -> torch.Tensor | None:
        """``(B, N)`` distances to the normal-patch memory, or None (no memory, an empty one, or one left out of the
        maps: ``memory.left_out``, where the region head's patch ranking reads the map's terms alone)."""
        if self.memory is None or self.memory.empty or self.memory.left_out:
            return None
        return self.memory.distance(enc, self.cfg.taps)

    def self_similarity_map(self, enc: EncoderOutput, size: tuple[int, int]) -> torch.Tensor | None:
        """``(B, H, W)`` in-frame self-similarity scores (:mod:`.selfsim`) of the middle taps' original-path
        patches, bilinear to ``size``; None where the grid is too small for any patch to have a match."""
        if not has_matches(enc.original[0].shape[1] - 1):
            return None
        taps = memory_taps(self.cfg.taps)
        dist = torch.stack([self_distance(enc.original[self.cfg.taps.index(t)][:, 1:]) for t in taps]).mean(dim=0)
        return grid_to_image(self_scores(dist), size)

    @torch.no_grad()
    def region_embedding(self, enc: EncoderOutput, terms: list[torch.Tensor],
                         distance: torch.Tensor | None) -> torch.Tensor | None:
        """The normalised mean of the backbone-projected last-tap tokens of the most anomalous patches (by the
        mean of the map terms' and, with a memory, the memory's patch scores), or None without ``region_head``."""
        if not self.cfg.region_head:
            return None
        score = torch.stack([1.0 - t.float().softmax(dim=-1)[..., 0] for t in terms]).mean(dim=0)
        if distance is not None and self.memory is not None:
            score = 0.5 * (score + self.memory.patch_scores(distance))
        k = max(1, round(score.shape[1] * self.cfg.region_share))
        top = score.topk(k, dim=1).indices
        tokens = enc.original[-1][:, 1:]
        picked = torch.gather(tokens, 1, top[..., None].expand(-1, -1, tokens.shape[-1]))
        proj = self.visual.ln_post(picked) @ self.visual.proj
        return F.normalize(F.normalize(proj.float(), dim=-1).mean(dim=1), dim=-1).to(enc.pooled.dtype)

    def map_parts(self, enc: EncoderOutput, size: tuple[int, int], distance: torch.Tensor | None = None,
                  terms: list[torch.Tensor] | None = None, with_self: bool | None = None,
                  with_memory: bool = True) -> MapParts:
        """The map's unsmoothed parts at ``size`` (``distance``: the memory distances, when already computed;
        ``terms``: :meth:`term_logits`, when already computed; ``with_self``: whether to compute the
        self-similarity part, by default where the model's weight is non-zero). ``distance`` None means "compute
        them": a model with a filled memory always has its memory part, unless ``with_memory`` is False (where its
        weight is 0, :func:`join_parts` gives the same map without it)."""
        terms = self.term_logits(enc) if terms is None else terms
        # the terms' mean on the patch grid, resized once: bilinear resizing is linear, so this is the mean of the
        # resized terms (to float32 rounding) at a term's cost (a 1024 px frame at native: 26 views, 8 terms each)
        method = grid_to_image(torch.stack([patch_defect(t) for t in terms]).mean(dim=0), size)
        if distance is None and with_memory:
            distance = self.memory_distance(enc)
        memory = None
        if with_memory and distance is not None and self.memory is not None:
            memory = grid_to_image(self.memory.patch_scores(distance), size)
        if with_self is None:
            with_self = self.cfg.self_similarity > 0
        return MapParts(method, memory, self.self_similarity_map(enc, size) if with_self else None)

    def fused_map(self, parts: MapParts) -> torch.Tensor:
        """``parts`` joined with the model's memory and self-similarity weights (:func:`join_parts`)."""
        memory_weight = 0.0 if self.memory is None else self.memory.weight.float()  # a tensor: no device sync
        return join_parts(parts, memory_weight, self.cfg.self_similarity)

    def from_encoded(self, enc: EncoderOutput, size: tuple[int, int],
                     distance: torch.Tensor | None = None, maps_only: bool = False) -> SemClipOutput:
        """Maps, class probabilities and embeddings of an encoding (``distance``: its memory distances, when
        already computed). ``maps_only``: the class probabilities are NaN, and neither the region embedding nor,
        where the memory's weight is 0, the memory distances are taken (``run``'s shifted passes: the same maps,
        for about half a pass less there)."""
        terms = self.term_logits(enc)
        # the memory's distances serve the map where it is weighed and the region head's ranking: maps only, the first
        with_memory = not maps_only or self.memory_in_map()
        if distance is None and with_memory:
            distance = self.memory_distance(enc)
        maps = gaussian_blur(self.fused_map(self.map_parts(enc, size, distance, terms, with_memory=with_memory)),
                             self.cfg.sigma).clamp(0.0, 1.0)
        emb = F.normalize(enc.pooled, dim=-1)
        if maps_only:
            probs = torch.full((maps.shape[0], self.text_embeddings.shape[0]), math.nan, device=maps.device)
        else:
            probs = self.class_probs(emb, self.region_embedding(enc, terms, distance))
        return SemClipOutput(maps=maps, class_probs=probs, embeddings=emb.float())
