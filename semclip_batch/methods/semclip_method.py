"""SEM-CLIP as a registered method (SEMCLIP.md "Training" and "Classification").

Fitting: the text temperature; with a memory (``ModelSpec.memory``), the normal-patch memory of the fitting
rows and its distance scale; the Transformation Layers (focal + dice on the defect map of every tapped layer
and path, at half the input size, plus an L2-SP pull of the layers towards their zero-shot start) and the
classification head (cross-entropy) trained on 80 % of the support frames, keeping the epochs that do best on
the other 20 % (epoch 0 being the zero-shot layers); the fusion weight alpha (on those 20 %, which the head
never trained on); the memory's fusion weight and the self-similarity weight (together, 5-fold
cross-validation over the frames, the zero-shot map's weights kept unless the best beat them by more than one
standard error; the evidence is recorded, :func:`choice_evidence`); then the memory of every support frame."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semclip_batch.config import ModelSpec
from semclip_batch.methods.features import Features
from semclip_batch.methods.fitting import (
    HeldOutMaps,
    Support,
    clean_patches,
    fit_temperature,
    focal_dice,
    frame_folds,
    has_defect_pixel,
    pooled_embeddings,
    subset_encoded,
    support_split,
)
from semclip_batch.methods.registry import Method, depth_of, method_taps, register
from semclip_batch.methods.weight_choice import choice_evidence, one_se_choice
from semclip_batch.model import SemClip, SemClipConfig, SemClipOutput
from semclip_batch.model.encoder import EncoderOutput
from semclip_batch.model.memory import centred
from semclip_batch.model.semclip import defect_map, head_input

SEMCLIP_EPOCHS = 40
LOSS_DOWNSCALE = 2  # focal + dice on maps at half the model-input size: 4x cheaper, same patch grid
MEMORY_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # fusion weights tried by cross-validation over the support frames
DEFAULT_MEMORY_WEIGHT = 0.5  # below 5 support frames, or no defect pixel in their masks (nothing to cross-validate)
SELF_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # self-similarity weights tried with the memory's (and the model's own)
MIN_ALPHA_FRAMES = 10  # held-out frames needed to choose alpha on them (14 of a 70-frame support set)


@register
class SemClipMethod(Method[SemClip]):
    name = "semclip"
    layer_options = True
    recipes = True

    def build(self, spec: ModelSpec, clip: nn.Module, text: torch.Tensor) -> SemClip:
        cfg = SemClipConfig(taps=method_taps(spec, depth_of(clip)), use_vv=spec.use_vv, surgery=spec.surgery,
                            sigma=spec.sigma, cls=spec.cls, memory=spec.memory, region_head=spec.region_head,
                            self_similarity=spec.self_similarity)
        model = SemClip(clip, cfg, n_classes=text.shape[0])
        model.set_text_embeddings(text)
        return model

    def load(self, model: SemClip, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        if model.memory is not None:  # the banks' sizes come from the checkpoint
            model.memory.set_banks([tensors.get(f"memory.bank{k}", b) for k, b in enumerate(model.memory.banks())])
        return super().load(model, tensors)

    def taps(self, model: SemClip) -> tuple[int, ...]:
        return model.cfg.taps

    def vv_from(self, model: SemClip) -> int | None:
        return model.cfg.vv_from if model.cfg.use_vv else None

    def score(self, model: SemClip, feats: Features, size: tuple[int, int]) -> SemClipOutput:
        return model.from_encoded(feats.select(model.cfg.taps, model.cfg.use_vv), size)

    def score_maps(self, model: SemClip, feats: Features, size: tuple[int, int]) -> SemClipOutput:
        return model.from_encoded(feats.select(model.cfg.taps, model.cfg.use_vv), size, maps_only=True)

    def fit(self, model: SemClip, spec: ModelSpec, support: Support) -> dict[str, Any]:
        emb = pooled_embeddings(support.feats)
        model.text_scale.fill_(fit_temperature(emb, model.text_embeddings, support.data.labels))
        enc = support.feats.select(model.cfg.taps, model.cfg.use_vv)
        fit_rows, val = support_split(support)
        summary: dict[str, Any] = {}
        dist = None  # every row's distances to the memory of the fitting rows: fixed while the layers train
        if model.memory is not None:
            summary["memory_scale"] = fill_memory(model, enc, support, fit_rows)
            with torch.no_grad():
                dist = model.memory_distance(enc)
        model.transform.train().requires_grad_(support.fit_layers)
        model.head.requires_grad_(True)
        summary.update(train_layers(model, enc, support, fit_rows, val, dist))
        model.eval().requires_grad_(False)
        if model.memory is not None:
            choice = choose_memory_weight(model, enc, support)
            summary["memory_weight"], summary["self_similarity"] = choice.memory_weight, choice.self_similarity
            summary["weights_choice"] = choice.evidence
        with torch.enable_grad():
            alpha = fit_alpha(model, enc, support, dist) if spec.cls == "fused" else float(spec.cls == "text")
        if model.memory is not None:
            fill_whole_memory(model, enc, support)
            summary["memory_tokens"] = int(model.memory.banks()[0].shape[0])
        model.alpha.fill_(alpha)
        return summary

    def refill_memory(self, model: SemClip, feats: Features, masks: torch.Tensor, has_mask: torch.Tensor,
                      seed: int) -> int | None:
        return None if model.memory is None else refill_memory(model, feats, masks, has_mask, seed)

    @contextmanager
    def without_memory(self, model: SemClip) -> Iterator[None]:
        """The memory's fusion weight at 0 and its distances not taken inside the block (the maps: the method's and
        the self-similarity's; the class scores there, which no check reads, rank the region head's patches alone)."""
        if model.memory is None:
            yield
            return
        weight, left_out = model.memory.weight.clone(), model.memory.left_out
        model.memory.weight.zero_()
        model.memory.left_out = True
        try:
            yield
        finally:
            model.memory.weight.copy_(weight)
            model.memory.left_out = left_out

    def memory_in_maps(self, model: SemClip) -> bool:
        return model.memory_in_map()

    @torch.no_grad()
    def held_out_maps(self, model: SemClip, support: Support) -> HeldOutMaps | None:
        """The rows early stopping held out (:func:`support_split`: the layers and head never trained on them,
        though their epoch was chosen on them, and the memory's weight was cross-validated over every frame),
        scored with a memory of the fitting rows only."""
        fit_rows, val = support_split(support)
        if not len(val):
            return None
        enc = support.feats.select(model.cfg.taps, model.cfg.use_vv)
        size = (support.data.views.shape[-2], support.data.views.shape[-1])
        if model.memory is None:
            return HeldOutMaps(val, model.from_encoded(subset_encoded(enc, val), size).maps, fit_rows)
        fill_memory(model, enc, support, fit_rows, rescale=False)
        try:
            maps = model.from_encoded(subset_encoded(enc, val), size).maps
        finally:
            fill_whole_memory(model, enc, support)  # as fit left it
        return HeldOutMaps(val, maps, fit_rows)


MIN_EPOCHS = 3  # early stopping needs a few epochs to choose from


def epochs_of(support: Support) -> int:
    """``--epochs``, or the default's passes over the frames: as many steps as the paper recipe's 40 epochs over
    the whole-frame views, whatever augmentation (``copies``) and tiles (a scale policy) add, but at least
    :data:`MIN_EPOCHS`."""
    if support.epochs:
        return support.epochs
    views_per_frame = support.frames / max(1, len(support.groups.unique()))
    return max(MIN_EPOCHS if views_per_frame > 1 else 1, round(SEMCLIP_EPOCHS / support.copies / views_per_frame))


def _grid(enc: EncoderOutput) -> int:
    return round((enc.original[0].shape[1] - 1) ** 0.5)


def fill_memory(model: SemClip, enc: EncoderOutput, support: Support, rows: torch.Tensor, rescale: bool = True) -> float:
    """Fill the memory with the clean patches of ``rows``; with ``rescale``, first fit its distance scale: the
    99th percentile of each half's clean patches' distances to a memory of the other half's frames (2-fold)."""
    memory = model.memory
    assert memory is not None
    data = support.data
    clean = clean_patches(data.masks[rows], data.has_mask[rows], _grid(enc))
    tokens = [t[rows] for t in memory.tokens(enc, model.cfg.taps)]
    if rescale and len(rows) >= 2:
        rank = support.groups.unique(return_inverse=True)[1]  # frames numbered 0.. among the kept ones
        frame = rank[rows % support.frames]  # the copies and tiles of one frame stay in one half
        halves = (frame % 2 == 0, frame % 2 == 1)
        dists = []
        for held, kept in (halves, halves[::-1]):
            memory.set_banks([t[kept][clean[kept]] for t in tokens], support.seed)
            if not memory.empty:
                dists.append(centred(memory.token_distance([t[held] for t in tokens]))[clean[held]])
        flat = torch.cat(dists) if dists else torch.zeros(0)
        if flat.numel():
            memory.scale.fill_(float(torch.quantile(flat.float(), 0.99).clamp_min(1e-4)))
    memory.set_banks([t[clean] for t in tokens], support.seed)
    return float(memory.scale)


def fill_whole_memory(model: SemClip, enc: EncoderOutput, support: Support) -> None:
    """The memory a fitted model keeps: the clean patches of every support row, at the scale already fitted."""
    fill_memory(model, enc, support, torch.arange(len(support.data)), rescale=False)


def refill_memory(model: SemClip, feats: Features, masks: torch.Tensor, has_mask: torch.Tensor, seed: int) -> int:
    """A fitted model's memory filled again from other views of its support frames (``train --scale-policy auto``:
    the whole views and tiles ``run`` will score at the policy), their clean patches as :func:`fill_memory` takes
    them; the distance scale and the fusion weight stay the fit's. Returns the tokens kept per tap."""
    memory = model.memory
    assert memory is not None
    enc = feats.select(model.cfg.taps, model.cfg.use_vv)
    clean = clean_patches(masks, has_mask, _grid(enc))
    memory.set_banks([t[clean] for t in memory.tokens(enc, model.cfg.taps)], seed)
    return int(memory.banks()[0].shape[0])


def _rows(dist: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if dist is None else dist[idx]


@dataclass(frozen=True)
class WeightChoice:
    """The memory's and the self-similarity's weights a fit chose, and the support folds' evidence for them
    (:func:`choice_evidence`; empty where nothing was cross-validated)."""

    memory_weight: float
    self_similarity: float
    evidence: dict[str, Any]


@torch.no_grad()
def choose_memory_weight(model: SemClip, enc: EncoderOutput, support: Support, folds: int = 5) -> WeightChoice:
    """The memory's fusion weight and the self-similarity weight (:mod:`semclip_batch.model.selfsim`) whose maps
    have the best pixel AUROC over the support frames, each scored against a memory of the *other* folds' frames
    (5-fold by frame) and fused with its reference where it has one, as ``run`` fuses them (a cell reference
    and the self-similarity map both compare a frame with itself). The self-similarity weights tried, where
    ``support.choose_self_similarity``, are :data:`SELF_WEIGHTS` and the model's own (0 alone where the model's
    is 0: turned off); otherwise the model's alone. The pair is :func:`one_se_choice`'s: the best, unless it is
    within one standard error of the map without the memory at the model's own weight. The layers' epochs were
    ranked with the model's own weight, and the reference joins at the given ``--reference-weight`` (``auto``
    chooses it afterwards). Every frame votes, not only the 20 % held out for early stopping: a weight chosen on
    14 frames was noisy. The map's parts are computed once and joined per pair. Leaves both set on the model."""
    memory = model.memory
    assert memory is not None
    data = support.data
    n = support.frames
    given = model.cfg.self_similarity
    fold_rows = frame_folds(support, folds, support.seed + 3)
    first = torch.arange(n)
    if len(fold_rows) < folds or not has_defect_pixel(data, first):
        memory.weight.fill_(DEFAULT_MEMORY_WEIGHT)
        return WeightChoice(DEFAULT_MEMORY_WEIGHT, given, {})
    dist = torch.zeros(n, enc.original[0].shape[1] - 1)
    for held in fold_rows:
        fill_memory(model, enc, support, support.rows_of(first[torch.isin(first, held, invert=True)]), rescale=False)
        dist[held] = memory.distance(subset_encoded(enc, held), model.cfg.taps)
    size = (data.views.shape[-2], data.views.shape[-1])
    ranked = [held for held in fold_rows if has_defect_pixel(data, held)]
    self_weights = sorted({*SELF_WEIGHTS, given}) if support.choose_self_similarity and given > 0 else [given]
    parts = model.map_parts(subset_encoded(enc, first), size, dist, with_self=given > 0)
    # the smoothing is linear: the parts smoothed once, joined for every pair (as from_encoded joins, then smooths)
    parts = parts.smoothed(model.cfg.sigma)
    scores: dict[tuple[float, float], tuple[float, list[float]]] = {}
    for w in MEMORY_WEIGHTS:
        memory.weight.fill_(w)
        for sw in self_weights:
            model.cfg = replace(model.cfg, self_similarity=sw)
            maps = model.fused_map(parts).clamp(0.0, 1.0)
            if support.fuse_reference is not None:
                maps = support.fuse_reference(maps, first)
            scores[w, sw] = (support.map_auroc(maps, data.masks[first], data.has_mask[first]),
                             [support.map_auroc(maps[held], data.masks[held], data.has_mask[held])
                              for held in ranked])  # folds with a defect pixel: the others have no AUROC
    w, sw = one_se_choice(scores, given)
    memory.weight.fill_(w)
    model.cfg = replace(model.cfg, self_similarity=sw)
    return WeightChoice(w, sw, choice_evidence(scores, given))


@torch.no_grad()
def head_inputs(model: SemClip, enc: EncoderOutput, dist: torch.Tensor | None) -> torch.Tensor:
    """What the head reads for each row of ``enc`` (region embeddings from the current layers and the rows'
    memory distances ``dist``)."""
    region = model.region_embedding(enc, model.term_logits(enc), dist)
    return head_input(F.normalize(enc.pooled, dim=-1), model.text_embeddings.to(enc.pooled.dtype), region)


@torch.no_grad()
def _validate(model: SemClip, enc: EncoderOutput, support: Support, val: torch.Tensor,
              dist: torch.Tensor | None) -> tuple[float, float]:
    """Pixel AUROC of the maps and head accuracy on the validation images."""
    data = support.data
    sub = subset_encoded(enc, val)
    out = model.from_encoded(sub, (data.views.shape[-2], data.views.shape[-1]), _rows(dist, val))
    pauroc = support.map_auroc(out.maps, data.masks[val], data.has_mask[val])
    accuracy = float((model.head(head_inputs(model, sub, _rows(dist, val))).argmax(-1) == data.labels[val]).float().mean())
    return pauroc, accuracy


def _loss(model: SemClip, enc: EncoderOutput, support: Support, idx: torch.Tensor, targets: torch.Tensor,
          init: list[torch.Tensor], dist: torch.Tensor | None) -> torch.Tensor:
    """The head's cross-entropy; with ``support.fit_layers``, plus the layers' own terms (the maps' focal + dice
    and the pull towards their start). Without, the layers do not train and neither term is computed."""
    data = support.data
    sub = subset_encoded(enc, idx)
    head = F.cross_entropy(model.head(head_inputs(model, sub, _rows(dist, idx))), data.labels[idx])
    if not support.fit_layers:
        return head
    size = (targets.shape[-2], targets.shape[-1])
    seg_rows = data.has_mask[idx]
    terms = model.term_logits(sub)
    seg = torch.stack([focal_dice(defect_map(t, size)[seg_rows], targets[idx][seg_rows]) for t in terms]).mean() \
        if seg_rows.any() else torch.tensor(0.0)
    anchor = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.transform.parameters(), init, strict=True))
    return seg + head + support.anchor * anchor


def train_layers(model: SemClip, enc: EncoderOutput, support: Support, fit_idx: torch.Tensor,
                 val: torch.Tensor, dist: torch.Tensor | None) -> dict[str, float]:
    """Train the Transformation Layers and the head on the fitting rows; keep, separately, the epoch
    (0 = the zero-shot layers) whose maps / head do best on the validation rows (early stopping on support data).
    Validation rows without a defect pixel cannot rank maps: the layers of the last epoch are kept then. Without
    ``support.fit_layers`` the layers stay at their zero-shot start and the head alone trains, on region inputs
    from the layers it will score with."""
    data, epochs = support.data, epochs_of(support)
    params = list(model.head.parameters()) + (list(model.transform.parameters()) if support.fit_layers else [])
    opt = torch.optim.Adam(params, lr=support.lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(support.seed)
    size = (data.views.shape[-2] // LOSS_DOWNSCALE, data.views.shape[-1] // LOSS_DOWNSCALE)
    targets = (F.interpolate(data.masks.float()[:, None], size=size, mode="area")[:, 0] >= 0.5).float()
    init = [p.detach().clone() for p in model.transform.parameters()]
    best_map = (*_validate(model, enc, support, val, dist), 0) if len(val) else None
    rank_maps = bool(len(val)) and has_defect_pixel(data, val) and support.fit_layers
    best_tl, best_head = copy.deepcopy(model.transform.state_dict()), copy.deepcopy(model.head.state_dict())
    best_head_score, best_head_epoch = -1.0, 0
    loss = torch.tensor(0.0)
    for epoch in range(1, epochs + 1):
        for idx in fit_idx[torch.randperm(len(fit_idx), generator=gen)].split(support.batch_size):
            loss = _loss(model, enc, support, idx, targets, init, dist)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if best_map is not None:
            pauroc, accuracy = _validate(model, enc, support, val, dist)
            if rank_maps and pauroc > best_map[0]:
                best_map, best_tl = (pauroc, accuracy, epoch), copy.deepcopy(model.transform.state_dict())
            if accuracy >= best_head_score:
                best_head_score, best_head_epoch = accuracy, epoch
                best_head = copy.deepcopy(model.head.state_dict())
        if support.progress is not None:
            support.progress(epoch, epochs, float(loss.detach()))
    if best_map is None:
        return {"final_loss": float(loss.detach()), "map_epoch": epochs if support.fit_layers else 0,
                "head_epoch": epochs}
    if rank_maps:
        model.transform.load_state_dict(best_tl)
    elif support.fit_layers:
        best_map = (best_map[0], best_map[1], epochs)
    model.head.load_state_dict(best_head)
    return {"final_loss": float(loss.detach()), "map_epoch": best_map[2], "val_pAUROC": best_map[0],
            "head_epoch": best_head_epoch, "val_accuracy": best_head_score}


def fit_alpha(model: SemClip, enc: EncoderOutput, support: Support, dist: torch.Tensor | None, folds: int = 5) -> float:
    """alpha in 0..1 maximising accuracy (then log-likelihood) of the fused scores on the frames early stopping held
    out (:func:`support_split`, same seed: the same rows). The head never trained on them, though its epoch was
    chosen on them, so its score there is still a little optimistic. Scored on whole-frame views, the ones ``run``
    takes class scores from. With fewer than :data:`MIN_ALPHA_FRAMES` held out: 5-fold cross-validation by frame,
    each fold's head continued from the trained head (which has seen the held-out frames, so it overrates the
    head more)."""
    val = alpha_rows(support)
    if len(val) >= MIN_ALPHA_FRAMES:
        sub = subset_encoded(enc, val)
        head_probs = model.head(head_inputs(model, sub, _rows(dist, val))).softmax(-1)
        text_probs = model.text_logits(F.normalize(sub.pooled, dim=-1)).softmax(-1)
        return best_alpha(text_probs.detach(), head_probs.detach(), support.data.labels[val])
    labels = support.data.labels
    x = head_inputs(model, enc, dist)
    text_logits = model.text_logits(F.normalize(enc.pooled, dim=-1))
    n = support.frames
    first = torch.arange(n)
    head_probs = torch.zeros(n, text_logits.shape[1])
    for held in frame_folds(support, folds, support.seed + 1):
        train = support.rows_of(first[torch.isin(first, held, invert=True)])
        head = copy.deepcopy(model.head).requires_grad_(True)
        opt = torch.optim.Adam(head.parameters(), lr=support.lr, betas=(0.5, 0.999))
        for _ in range(support.epochs or SEMCLIP_EPOCHS):  # full-batch steps
            loss = F.cross_entropy(head(x[train]), labels[train])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            head_probs[held] = head(x[held]).softmax(-1)
    keep = support.data.first_views()[:n]
    return best_alpha(text_logits[:n][keep].softmax(-1).detach(), head_probs[keep], labels[:n][keep])


def alpha_rows(support: Support) -> torch.Tensor:
    """The rows alpha is chosen on: the whole-frame view of each frame early stopping held out."""
    _, val = support_split(support)
    return val[support.data.first_views()[val]]


def best_alpha(text_probs: torch.Tensor, head_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The weight on a 0.1 grid whose ``alpha * text + (1 - alpha) * head`` has the best accuracy on ``labels``,
    then the best log-likelihood, then the larger alpha (the text scores need no training)."""
    best = (-1.0, -1e9, 1.0)
    for a in np.linspace(0, 1, 11):
        p = a * text_probs + (1 - a) * head_probs
        acc = float((p.argmax(-1) == labels).float().mean())
        ll = float(p.clamp_min(1e-9).log().gather(1, labels[:, None]).mean())
        best = max(best, (acc, ll, float(a)))
    return best[2]
