"""``pretrain``: adapt an open_clip backbone to SEM images (dense patch-text alignment + class-aware
image-text loss), so zero-shot SEM-CLIP text scores mean something.

Patch tokens of every tapped layer and both paths, through the zero-shot Transformation Layer (the
backbone's own ``ln_post`` + ``proj``) and feature surgery, are pulled towards their class text (defect class
inside the mask, normal outside, class-balanced); pooled image embeddings towards their class text (or, with
a ``caption`` column, their caption, CLIP-style). Text comes from the prompt file per ``label``.

Each step runs only a fraction (``keep``) of every image's patch tokens, those touching a defect first (token
dropping, as in masked CLIP training): steps get ~2.5x cheaper at 0.25, and thin defects whose few patches
would drown among clean ones are in every step. Inference always runs every token.

Robust to frame size and defect scale: besides each whole frame resized to the model input (what ``run``
scores), up to ``crops`` crops of frames larger than the model input (native resolution and half of it, around
a defect pixel: ``fewshot.trainset.crop_views``), so a 5 px particle of a 1024 px frame is seen at 5 px and not
at 1; steps draw rows balanced over (class, defect-area bucket), so small defects are not outnumbered by large
ones; the learning rate warms up over the first ``warmup`` share of the steps (one-cycle schedule). A seeded
``heldout`` share of the frames is never trained on: per-class patch AUROC (each class's patches against normal
patches, by 1 - p(normal)) on their whole-frame views as ``run`` scores them, the same on their crops (where a
family's small defects are big enough to be seen at all: on a whole view of a 1024 px frame a 5 px particle
covers no patch), and image accuracy of the text scores on the whole views are measured on it before and after,
returned and stored in the weights file's metadata (``heldout_check``; :mod:`.heldout`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR

from semclip_batch.config import (
    DEFAULT_KEEP_TOKENS,
    DEFAULT_PRETRAIN_BATCH,
    DEFAULT_PRETRAIN_CROPS,
    DEFAULT_PRETRAIN_HELDOUT,
    DEFAULT_PRETRAIN_LR,
    DEFAULT_PRETRAIN_MINUTES,
    DEFAULT_PRETRAIN_STEPS,
    LossProgress,
    ModelSpec,
    PreprocessConfig,
)
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.class_texts import ClassTexts, between_classes, prompt_sample, text_separation
from semclip_batch.fewshot.heldout import (
    CROP_PREFIX,
    TEXT_COSINE,
    HeldOut,
    dense_logits,
    held_frames,
    heldout_figures,
    heldout_split,
)
from semclip_batch.fewshot.pretrain_checks import (
    refuse_diverged_loss,
    refuse_diverged_weights,
    refuse_nothing_to_learn,
    refuse_out_over_inputs,
)
from semclip_batch.fewshot.scale_check import ScaleCheck, check_rows, reserve_seconds, run_check
from semclip_batch.fewshot.trainset import IGNORE, TrainSet, load_trainset, patch_labels
from semclip_batch.io import storage, targets
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.preprocess import normalize
from semclip_batch.methods.prompts import PromptSet, load_prompts
from semclip_batch.methods.registry import depth_of
from semclip_batch.methods.weights import PRETRAIN_FORMAT, canonical_sha256, load_backbone, open_clip_module, preprocess_config
from semclip_batch.model import default_taps
from semclip_batch.model.encoder import encode_dual_path
from semclip_batch.model.text import encode_prompts
from semclip_batch.model.towers import as_clip

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
    crops: int = DEFAULT_PRETRAIN_CROPS
    warmup: float = 0.1
    heldout: float = DEFAULT_PRETRAIN_HELDOUT
    max_minutes: float = DEFAULT_PRETRAIN_MINUTES  # wall-clock budget, loading included; 0: none
    separation: float = 0.0  # weight of the class-text separation term (class_texts.text_separation)
    fill_budget: bool = False  # --steps auto: as many steps as max_minutes allows (``steps``: the first 20 steps' plan)
    scale_check: bool = True  # score held-out frames at each scale policy and recommend one (fewshot.scale_check)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("--steps and --batch-size must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):  # inf trains to NaN weights, nan fails in the optimiser
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"--keep-tokens must be in (0, 1], got {self.keep}")
        if self.crops < 0:
            raise ConfigError(f"--crops must be >= 0, got {self.crops}")
        if not 0.0 < self.warmup < 1.0 or not 0.0 <= self.heldout < 0.5:
            raise ConfigError("--warmup must be in (0, 1) and --heldout in [0, 0.5)")
        if not (self.separation >= 0.0 and math.isfinite(self.separation)):
            raise ConfigError(f"--text-separation must be a finite number >= 0 (0: off), got {self.separation}")
        if not (self.max_minutes >= 0.0 and math.isfinite(self.max_minutes)):
            raise ConfigError(f"--max-minutes must be a number >= 0 (0: no limit), got {self.max_minutes}")
        if self.fill_budget and not self.max_minutes:
            raise ConfigError("--steps auto fills the --max-minutes budget; it needs one (> 0)")

    def recipe(self) -> dict[str, str]:
        """The settings that shape the weights, as stored in the weights file's metadata."""
        keys = ("steps", "batch_size", "lr", "prompts_per_step", "keep", "crops", "warmup", "heldout")
        return {k: str(getattr(self, k)) for k in keys}


@dataclass(frozen=True)
class Pretrained:
    """``sha256``: the weights' canonical checksum; ``before`` / ``after``: the held-out figures
    (``patch_AUROC/<class>`` on whole views, ``crop_patch_AUROC/<class>`` on crops, ``accuracy``; None where
    undefined; ``text_cosine``: between the classes' text embeddings) at the start and the end."""

    sha256: str
    before: dict[str, float | None]
    after: dict[str, float | None]
    seconds: float
    steps: int  # run: the planned ones, or those --max-minutes left room for (cut, or --steps auto)
    scale_check: ScaleCheck | None = None  # the scale check's figures and recommendation; None: not run
    start_sha256: str = ""  # the canonical checksum of the weights it started from


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
              prep: PreprocessConfig, gen: torch.Generator, caption_tokens: torch.Tensor | None, keep: float) -> torch.Tensor:
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
    dense = torch.stack([_balanced_ce(lg, targets, n_classes)
                         for lg in dense_logits(parts.visual, enc, text, scale)]).mean()
    emb = F.normalize(enc.pooled, dim=-1)
    labels = data.labels[idx]
    loss = dense
    if (labels != IGNORE).any():
        loss = loss + _balanced_ce(scale * emb @ text.t(), labels, n_classes)
    if caption_tokens is not None:
        cap = F.normalize(encode_prompts(clip, caption_tokens[idx]), dim=-1)
        logits = scale * emb @ cap.t()
        target = torch.arange(len(idx))
        loss = loss + 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    return loss


CALIBRATION_STEPS = 20  # steps timed before a --max-minutes budget sizes the rest of the schedule
BUDGET_MARGIN_S = 10.0  # of the budget kept for saving the weights and the step time's drift
OPTIMIZER = "adamw-fused"  # recorded: weights before it (the per-parameter loop) differ at float rounding; fused
# is ~15 % cheaper a step here
AUTO_RESERVE = 0.03  # --steps auto: share of the time left kept back (its length rests on 20 timed steps alone)
FEW_STEPS = 200  # --steps auto below it: warned (under 200, the 20 timed steps are more than the warm-up)


def budgeted_steps(planned: int, done: int, per_step: float, seconds_left: float, fill: bool = False) -> int:
    """The steps a budget allows: ``done`` plus as many as fit in ``seconds_left`` at ``per_step`` seconds each
    (never fewer than ``done``), at most ``planned`` unless ``fill`` (``--steps auto``: the budget decides)."""
    fit = done + max(0, int(seconds_left / per_step))
    return fit if fill else min(planned, fit)


def resumed_schedule(opt: torch.optim.Optimizer, cfg: PretrainConfig, steps: int, done: int) -> OneCycleLR:
    """The one-cycle schedule over ``steps`` in all, taking over after the ``done`` steps already taken (0: a
    fresh one). Its warm-up is the first ``cfg.warmup`` of ``steps``: a schedule cut to fewer than
    ``done / cfg.warmup`` steps is past its warm-up at ``done`` and takes over in its decay (the rate jumps up
    to it)."""
    return OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=cfg.warmup, last_epoch=done - 1)


def area_buckets(data: TrainSet) -> torch.Tensor:
    """Per row: ``class * 4 + bucket`` of the defect's share of the view (< 0.2 %, < 1 %, < 5 %, more)."""
    area = data.masks.float().mean(dim=(1, 2))
    bucket = torch.bucketize(area, torch.tensor([0.002, 0.01, 0.05]))
    return data.labels.clamp_min(0) * 4 + bucket


def balanced_weights(keys: torch.Tensor) -> torch.Tensor:
    """Sampling weights giving every key (class, area bucket) the same share of the draws."""
    _, inverse, counts = keys.unique(return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].float()


ALIKE_TEXT = 0.8  # above it after training, the text tower has not told the classes apart (README: ~0.9 at random)


def pretrain(cfg: PretrainConfig, progress: LossProgress | None = None,
             metadata: Mapping[str, str] | None = None, frames: pd.DataFrame | None = None,
             caller: str = "pretrain", alike_hint: str = "--text-separation 1 pushes them apart") -> Pretrained:
    """Train and write the weights file (safetensors, backbone, canonical sha256, recipe and held-out figures
    in its metadata). With ``max_minutes``, the schedule is shortened when the steps would not fit: the first
    :data:`CALIBRATION_STEPS` are timed and the rest of the one-cycle schedule is laid over the steps that fit
    in what is left of the budget, the final held-out check and saving included; with ``fill_budget``
    (``--steps auto``) it is laid over every step that fits, more than ``steps`` as readily as fewer. ``frames``:
    manifest rows already read (``train --adapt-steps``: its sampled support rows), instead of ``cfg.manifest``'s.
    ``caller`` / ``alike_hint``: who warns that the class texts are still alike after training, and what it advises
    (the options the caller's user has)."""
    started = time.perf_counter()
    targets.check_target(cfg.out, "file", "--out (the weights file)", cfg.model.storage_options)
    refuse_out_over_inputs(cfg)
    torch.manual_seed(cfg.model.seed)
    m = cfg.model
    prompts: PromptSet = load_prompts(m.prompts, m.storage_options)
    prep = preprocess_config(m.backbone, tile_above=10**9)
    df = read_manifest(cfg.manifest, storage_options=m.storage_options) if frames is None else frames
    refuse_nothing_to_learn(df, cfg.manifest if frames is None else None, prompts.classes, caller, m.storage_options)
    data = load_trainset(df, prompts.classes, prep, storage_options=m.storage_options, need_labels=False,
                         crops=cfg.crops, seed=m.seed)
    backbone = load_backbone(m.backbone, m.pretrained, seed=m.seed, expected_sha256=m.pretrained_sha256,
                             storage_options=m.storage_options)
    clip = backbone.clip.train()
    tokenizer = open_clip_module().get_tokenizer(m.backbone)
    texts = ClassTexts.of(tokenizer, prompts)
    caption_tokens = tokenizer(data.captions) if any(data.captions) else None
    taps = default_taps(depth_of(clip))
    held = heldout_split(data, cfg.heldout, m.seed)
    scale_rows = check_rows(df, held_frames(data, held)) if cfg.scale_check else None

    t_check = time.perf_counter()
    before = _heldout_check(clip, data, held, texts, taps, prep)
    check_s = time.perf_counter() - t_check  # the final check takes as long
    if scale_rows is not None and cfg.max_minutes:
        check_s += reserve_seconds(clip, m.backbone, prompts, scale_rows, m.storage_options)
    deadline = started + cfg.max_minutes * 60.0 - check_s - BUDGET_MARGIN_S if cfg.max_minutes else None
    steps, t0 = _train(clip, data, held.train, texts, caption_tokens, taps, prep, cfg, deadline, progress, caller)
    refuse_diverged_weights(clip, steps, cfg.lr, caller)
    after = _heldout_check(clip, data, held, texts, taps, prep)
    seconds = time.perf_counter() - t0
    scales = run_check(clip.eval(), m.backbone, prompts, scale_rows, m.storage_options) if scale_rows is not None else None
    if not cfg.separation and (after[TEXT_COSINE] or 0.0) > ALIKE_TEXT:
        log.warning("%s: the classes' text embeddings are still alike (mean cosine %.2f between classes; "
                    "%.2f before training): the loss likely sat near chance; %s", caller, after[TEXT_COSINE],
                    before[TEXT_COSINE], alike_hint)
    log.info("pretrained %s for %d steps in %.0f s on %d views of %d frames (%d skipped, %d held out)",
             m.backbone, steps, seconds, len(held.train), len(df) - data.skipped, data.skipped, len(held.whole))
    meta = {**(metadata or {}), **_recipe_metadata(cfg, steps, before, after, scales)}  # what was run wins
    digest = save_weights(clip.eval(), m.backbone, cfg.out, m.storage_options, meta)
    return Pretrained(digest, before, after, seconds, steps, scales, backbone.sha256)


def _heldout_check(clip: nn.Module, data: TrainSet, held: HeldOut, texts: ClassTexts, taps: tuple[int, ...],
                   prep: PreprocessConfig) -> dict[str, float | None]:
    """The held-out figures (:mod:`.heldout`) of the model as it is now; it is left in training mode."""
    clip.eval()
    with torch.no_grad():
        text = texts.embeddings(clip)
    out = heldout_figures(clip, data, held.whole, text, taps, prep)
    if held.crops.numel():
        out |= heldout_figures(clip, data, held.crops, text, taps, prep, prefix=CROP_PREFIX, accuracy=False)
    out[TEXT_COSINE] = float(between_classes(text).mean())
    clip.train()
    return out


def _train(clip: nn.Module, data: TrainSet, rows: torch.Tensor, texts: ClassTexts, caption_tokens: torch.Tensor | None,
           taps: tuple[int, ...], prep: PreprocessConfig, cfg: PretrainConfig, deadline: float | None,
           progress: LossProgress | None, caller: str = "pretrain") -> tuple[int, float]:
    """The optimisation on ``rows`` of ``data``: draws balanced over class and defect area, a sample of the prompts
    a step, and with a ``deadline`` (``max_minutes``: a ``time.perf_counter()`` time) the one-cycle schedule laid
    again once the first steps are timed, over the steps that end by then. Returns the steps run and when the
    first began. A loss that is not finite stops it (:func:`refuse_diverged_loss`): its weights would be NaN."""
    weights = balanced_weights(area_buckets(data)[rows])
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.lr, weight_decay=0.05, fused=True)
    steps, step = cfg.steps, 0
    if cfg.fill_budget:  # a plan long enough to time its first steps
        steps = max(steps, CALIBRATION_STEPS + 1)
    sched = resumed_schedule(opt, cfg, steps, 0)
    gen = torch.Generator().manual_seed(cfg.model.seed)
    t0 = time.perf_counter()
    draw = min(cfg.batch_size, len(rows))
    while step < steps:
        step += 1
        idx = rows[torch.multinomial(weights, draw, replacement=False, generator=gen)]
        text = texts.embeddings(clip, prompt_sample(texts.owner, cfg.prompts_per_step, gen))
        loss = step_loss(clip, data, idx, text, taps, prep, gen, caption_tokens, cfg.keep)
        if cfg.separation:
            loss = loss + cfg.separation * text_separation(text)
        refuse_diverged_loss(loss, step, steps, cfg.lr, caller)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if deadline is not None and step == CALIBRATION_STEPS < steps:
            now = time.perf_counter()
            fitted = _replanned(cfg, steps, step, (now - t0) / step, deadline - now)
            if fitted != steps:
                steps = fitted
                sched = resumed_schedule(opt, cfg, steps, step)
        if progress is not None and (step % 25 == 0 or step == steps):
            progress(step, steps, float(loss.detach()))
    return steps, t0


def _replanned(cfg: PretrainConfig, steps: int, done: int, per_step: float, left: float) -> int:
    """The schedule's length once ``done`` steps took ``per_step`` s each and ``left`` s remain (logged)."""
    if cfg.fill_budget:
        left *= 1.0 - AUTO_RESERVE
    fitted = budgeted_steps(steps, done, per_step, left, cfg.fill_budget)
    if cfg.fill_budget:
        few = fitted < FEW_STEPS
        log.log(logging.WARNING if few else logging.INFO,
                "pretrain: --steps auto: %d steps fit in --max-minutes %g (%.2f s a step here)%s", fitted,
                cfg.max_minutes, per_step, "; too few to learn much: a larger --max-minutes" if few else "")
    elif fitted < steps:
        log.warning("pretrain: --max-minutes %g leaves time for %d of the %d steps (%.2f s a step here); "
                    "the schedule is shortened to fit (--max-minutes 0: no limit)", cfg.max_minutes, fitted, steps,
                    per_step)
    return fitted


def _recipe_metadata(cfg: PretrainConfig, steps: int, before: Mapping[str, float | None],
                     after: Mapping[str, float | None], scales: ScaleCheck | None) -> dict[str, str]:
    """What the weights file records of how it was trained: the recipe as run, the held-out check, the scale check."""
    return {**replace(cfg, steps=steps).recipe(), "planned_steps": "auto" if cfg.fill_budget else str(cfg.steps),
            "max_minutes": str(cfg.max_minutes), "optimizer": OPTIMIZER,
            **({"text_separation": str(cfg.separation)} if cfg.separation else {}),  # absent: off, as before it
            "heldout_check": json.dumps({"before": before, "after": after}),
            **(scales.metadata() if scales is not None else {})}


def save_weights(clip: nn.Module, backbone: str, url: str, storage_options: Mapping[str, Any],
                 metadata: Mapping[str, str] | None = None) -> str:
    state = {k: v.detach().contiguous() for k, v in clip.state_dict().items()}
    digest = canonical_sha256(state)
    meta = {**(metadata or {}), "backbone": backbone, "sha256": digest, "format": PRETRAIN_FORMAT}
    blob = save_safetensors(state, metadata=meta)
    storage.write_bytes(url, io.BytesIO(blob).getvalue(), storage_options)
    return digest
