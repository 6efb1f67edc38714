"""``pretrain``: adapt an open_clip backbone to SEM images (dense patch-text alignment + class-aware
image-text loss), so zero-shot SEM-CLIP text scores mean something.

Patch tokens of every tapped layer and both paths, through the zero-shot Transformation Layer (the
backbone's own ``ln_post`` + ``proj``) and feature surgery, are pulled towards their class text (defect class
inside the mask, normal outside, class-balanced); pooled image embeddings towards their class text (or, with
a ``caption`` column, their caption, CLIP-style). Text comes from the prompt file per ``label``.

Each step runs only a fraction (``keep``) of every image's patch tokens, those touching a defect first (token
dropping, as in masked CLIP training): steps get ~2.5x cheaper at 0.25, and thin defects whose few patches
would drown among clean ones are in every step. Inference always runs every token.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from torch import nn

from semclip_batch.config import (
    DEFAULT_KEEP_TOKENS,
    DEFAULT_PRETRAIN_BATCH,
    DEFAULT_PRETRAIN_LR,
    DEFAULT_PRETRAIN_STEPS,
    LossProgress,
    ModelSpec,
)
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.trainset import IGNORE, TrainSet, load_trainset, patch_labels
from semclip_batch.io import storage
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.preprocess import normalize
from semclip_batch.methods.prompts import PromptSet, load_prompts
from semclip_batch.methods.registry import depth_of
from semclip_batch.methods.weights import canonical_sha256, load_backbone, preprocess_config
from semclip_batch.model import default_taps
from semclip_batch.model.encoder import encode_dual_path
from semclip_batch.model.semclip import patch_logits
from semclip_batch.model.towers import VisionTower, as_clip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    manifest: str
    out: str
    model: ModelSpec = field(default_factory=ModelSpec)  # the backbone and its starting weights, prompts
    steps: int = DEFAULT_PRETRAIN_STEPS
    batch_size: int = DEFAULT_PRETRAIN_BATCH
    lr: float = DEFAULT_PRETRAIN_LR
    prompts_per_step: int = 8
    keep: float = DEFAULT_KEEP_TOKENS

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("--steps and --batch-size must be >= 1 and --lr > 0")
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"--keep-tokens must be in (0, 1], got {self.keep}")


def class_text(clip: nn.Module, tokens: torch.Tensor, owner: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Differentiable class embeddings: mean of normalised prompt embeddings per class. -> ``(C, E)``."""
    emb = F.normalize(as_clip(clip).encode_text(tokens), dim=-1)
    sums = torch.zeros(n_classes, emb.shape[1], dtype=emb.dtype).index_add(0, owner, emb)
    return F.normalize(sums, dim=-1)


def prompt_sample(owner: torch.Tensor, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of up to ``per_class`` random prompts of every class (a fresh draw each step: the text tower
    sees every prompt over the schedule at a fraction of the cost of all of them per step)."""
    picks = []
    for c in owner.unique():
        members = (owner == c).nonzero().flatten()
        picks.append(members[torch.randperm(members.numel(), generator=gen)[:per_class]])
    return torch.cat(picks)


def _project(visual: VisionTower, tokens: torch.Tensor) -> torch.Tensor:
    return F.normalize(visual.ln_post(tokens) @ visual.proj, dim=-1)


def _balanced_ce(logits: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    valid = target[target != IGNORE]
    if valid.numel() == 0:
        return logits.sum() * 0.0
    counts = torch.bincount(valid, minlength=n_classes).float()
    weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
    return F.cross_entropy(logits.reshape(-1, n_classes), target.reshape(-1), weight=weight * n_classes,
                           ignore_index=IGNORE)


def _flip(views: torch.Tensor, masks: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.rand((), generator=gen) < 0.5:
        views, masks = views.flip(-1), masks.flip(-1)
    if torch.rand((), generator=gen) < 0.5:
        views, masks = views.flip(-2), masks.flip(-2)
    return views, masks


def kept_patches(targets: torch.Tensor, ratio: float, gen: torch.Generator) -> torch.Tensor | None:
    """The patches each image runs this step, ``round(ratio * N)`` of them: every patch touching a defect
    (labelled or ignored) first, the rest drawn at random. ``(B, N)`` targets -> ``(B, K)`` sorted indices, or
    ``None`` (all patches) at ratio 1."""
    if ratio >= 1.0:
        return None
    k = max(1, round(targets.shape[1] * ratio))
    priority = torch.rand(targets.shape, generator=gen) + 2.0 * (targets != 0)
    return priority.topk(k, dim=1).indices.sort(dim=1).values


def step_loss(clip: nn.Module, data: TrainSet, idx: torch.Tensor, text: torch.Tensor, taps: tuple[int, ...],
              prep, gen: torch.Generator, caption_tokens: torch.Tensor | None, keep: float) -> torch.Tensor:
    parts = as_clip(clip)
    views, masks = _flip(data.views[idx], data.masks[idx], gen)
    x = normalize(views, prep)
    grid = x.shape[-1] // parts.visual.conv1.kernel_size[0]
    targets = patch_labels(masks, data.labels[idx], data.has_mask[idx], grid)
    kept = kept_patches(targets, keep, gen)
    if kept is not None:
        targets = torch.gather(targets, 1, kept)
    enc = encode_dual_path(parts.visual, x, taps, 1, keep=kept)
    scale = parts.logit_scale.exp().clamp(max=100.0)
    n_classes = text.shape[0]
    terms = [t for pair in zip(enc.original, enc.vv, strict=True) for t in pair if t is not None]
    dense = torch.stack([_balanced_ce(patch_logits(_project(parts.visual, t), text, scale, True), targets, n_classes)
                         for t in terms]).mean()
    emb = F.normalize(enc.pooled, dim=-1)
    labels = data.labels[idx]
    loss = dense
    if (labels != IGNORE).any():
        loss = loss + _balanced_ce(scale * emb @ text.t(), labels, n_classes)
    if caption_tokens is not None:
        cap = F.normalize(parts.encode_text(caption_tokens[idx]), dim=-1)
        logits = scale * emb @ cap.t()
        target = torch.arange(len(idx))
        loss = loss + 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    return loss


def pretrain(cfg: PretrainConfig, progress: LossProgress | None = None, metadata: Mapping[str, str] | None = None) -> str:
    """Train and write the weights file (safetensors, backbone + canonical sha256 in its metadata).

    Returns the canonical sha256.
    """
    torch.manual_seed(cfg.model.seed)
    prompts: PromptSet = load_prompts(cfg.model.prompts, cfg.model.storage_options)
    prep = preprocess_config(cfg.model.backbone, tile_above=10**9)
    df = read_manifest(cfg.manifest, storage_options=cfg.model.storage_options)
    data = load_trainset(df, prompts.classes, prep, storage_options=cfg.model.storage_options, need_labels=False)
    m = cfg.model
    backbone = load_backbone(m.backbone, m.pretrained, seed=m.seed, expected_sha256=m.pretrained_sha256,
                             storage_options=m.storage_options)
    clip = backbone.clip.train()
    tokenizer = open_clip.get_tokenizer(cfg.model.backbone)
    tokens = torch.cat([tokenizer(list(p)) for p in prompts.prompts])
    owner = torch.cat([torch.full((len(p),), c) for c, p in enumerate(prompts.prompts)])
    caption_tokens = tokenizer(data.captions) if any(data.captions) else None
    taps = default_taps(depth_of(clip))
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.model.seed)
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        idx = torch.randperm(len(data), generator=gen)[: cfg.batch_size]
        pick = prompt_sample(owner, cfg.prompts_per_step, gen)
        text = class_text(clip, tokens[pick], owner[pick], len(prompts.classes))
        loss = step_loss(clip, data, idx, text, taps, prep, gen, caption_tokens, cfg.keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None and (step % 25 == 0 or step == cfg.steps):
            progress(step, cfg.steps, float(loss.detach()))
    log.info("pretrained %s for %d steps in %.0f s on %d images (%d skipped)", cfg.model.backbone, cfg.steps,
             time.perf_counter() - t0, len(data), data.skipped)
    return save_weights(clip.eval(), cfg.model.backbone, cfg.out, cfg.model.storage_options, metadata)


def save_weights(clip: nn.Module, backbone: str, url: str, storage_options: Mapping[str, Any],
                 metadata: Mapping[str, str] | None = None) -> str:
    state = {k: v.detach().contiguous() for k, v in clip.state_dict().items()}
    digest = canonical_sha256(state)
    meta = {**(metadata or {}), "backbone": backbone, "sha256": digest, "format": "semclip-batch/pretrain"}
    blob = save_safetensors(state, metadata=meta)
    storage.write_bytes(url, io.BytesIO(blob).getvalue(), storage_options)
    return digest
