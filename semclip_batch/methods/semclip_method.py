"""SEM-CLIP as a registered method (SEMCLIP.md "Training" and "Classification").

Fitting: the text temperature; the Transformation Layers (focal + dice on the defect map of every tapped layer
and path, at half the input size, plus an L2-SP pull of the layers towards their zero-shot start) and the
classification head (cross-entropy) trained on 80 % of the support set, keeping the epochs that do best on the
other 20 % (epoch 0 being the zero-shot layers); then the fusion weight alpha (5-fold cross-validation of the
head on the support set)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semclip_batch.config import ModelSpec
from semclip_batch.methods.features import Features
from semclip_batch.methods.fitting import (
    Support,
    fit_temperature,
    focal_dice,
    holdout_split,
    pooled_embeddings,
    subset_encoded,
)
from semclip_batch.methods.registry import Method, depth_of, method_taps, register
from semclip_batch.model import SemClip, SemClipConfig, SemClipOutput
from semclip_batch.model.encoder import EncoderOutput
from semclip_batch.model.semclip import defect_map

SEMCLIP_EPOCHS = 40
LOSS_DOWNSCALE = 2  # focal + dice on maps at half the model-input size: 4x cheaper, same patch grid


@register
class SemClipMethod(Method[SemClip]):
    name = "semclip"
    layer_options = True

    def build(self, spec: ModelSpec, clip: nn.Module, text: torch.Tensor) -> SemClip:
        cfg = SemClipConfig(taps=method_taps(spec, depth_of(clip)), use_vv=spec.use_vv, surgery=spec.surgery,
                            sigma=spec.sigma, cls=spec.cls)
        model = SemClip(clip, cfg, n_classes=text.shape[0])
        model.set_text_embeddings(text)
        return model

    def taps(self, model: SemClip) -> tuple[int, ...]:
        return model.cfg.taps

    def vv_from(self, model: SemClip) -> int | None:
        return model.cfg.vv_from if model.cfg.use_vv else None

    def score(self, model: SemClip, feats: Features, size: tuple[int, int]) -> SemClipOutput:
        return model.from_encoded(feats.select(model.cfg.taps, model.cfg.use_vv), size)

    def fit(self, model: SemClip, spec: ModelSpec, support: Support) -> dict[str, Any]:
        emb = pooled_embeddings(support.feats)
        model.text_scale.fill_(fit_temperature(emb, model.text_embeddings, support.data.labels))
        model.transform.train().requires_grad_(True)
        model.head.requires_grad_(True)
        summary = train_layers(model, support.feats.select(model.cfg.taps, model.cfg.use_vv), support)
        model.eval().requires_grad_(False)
        with torch.enable_grad():
            alpha = fit_alpha(model, emb, support.data.labels, support) if spec.cls == "fused" else float(spec.cls == "text")
        model.alpha.fill_(alpha)
        return summary


def epochs_of(support: Support) -> int:
    return support.epochs or SEMCLIP_EPOCHS


@torch.no_grad()
def _validate(model: SemClip, enc: EncoderOutput, support: Support, val: torch.Tensor) -> tuple[float, float]:
    """Pixel AUROC of the maps and head accuracy on the validation images."""
    data = support.data
    sub = subset_encoded(enc, val)
    out = model.from_encoded(sub, (data.views.shape[-2], data.views.shape[-1]))
    pauroc = support.map_auroc(out.maps, data.masks[val], data.has_mask[val])
    _, head_logits = model.class_logits(F.normalize(sub.pooled, dim=-1))
    accuracy = float((head_logits.argmax(-1) == data.labels[val]).float().mean())
    return pauroc, accuracy


def _loss(model: SemClip, enc: EncoderOutput, support: Support, idx: torch.Tensor, targets: torch.Tensor,
          init: list[torch.Tensor]) -> torch.Tensor:
    data = support.data
    size = (targets.shape[-2], targets.shape[-1])
    sub = subset_encoded(enc, idx)
    seg_rows = data.has_mask[idx]
    terms = model.term_logits(sub)
    seg = torch.stack([focal_dice(defect_map(t, size)[seg_rows], targets[idx][seg_rows]) for t in terms]).mean() \
        if seg_rows.any() else torch.tensor(0.0)
    _, head_logits = model.class_logits(F.normalize(sub.pooled, dim=-1))
    anchor = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.transform.parameters(), init, strict=True))
    return seg + F.cross_entropy(head_logits, data.labels[idx]) + support.anchor * anchor


def train_layers(model: SemClip, enc: EncoderOutput, support: Support) -> dict[str, float]:
    """Train the Transformation Layers and the head on 80 % of the support set; keep, separately, the epoch
    (0 = the zero-shot layers) whose maps / head do best on the other 20 % (early stopping on support data)."""
    data, epochs = support.data, epochs_of(support)
    params = list(model.transform.parameters()) + list(model.head.parameters())
    opt = torch.optim.Adam(params, lr=support.lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(support.seed)
    size = (data.views.shape[-2] // LOSS_DOWNSCALE, data.views.shape[-1] // LOSS_DOWNSCALE)
    targets = (F.interpolate(data.masks.float()[:, None], size=size, mode="area")[:, 0] >= 0.5).float()
    init = [p.detach().clone() for p in model.transform.parameters()]
    fit_idx, val = holdout_split(len(data), support.seed)
    best_map = (*_validate(model, enc, support, val), 0) if len(val) else None
    best_tl, best_head = copy.deepcopy(model.transform.state_dict()), copy.deepcopy(model.head.state_dict())
    best_head_score, best_head_epoch = -1.0, 0
    loss = torch.tensor(0.0)
    for epoch in range(1, epochs + 1):
        for idx in fit_idx[torch.randperm(len(fit_idx), generator=gen)].split(support.batch_size):
            loss = _loss(model, enc, support, idx, targets, init)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if best_map is not None:
            pauroc, accuracy = _validate(model, enc, support, val)
            if pauroc > best_map[0]:
                best_map, best_tl = (pauroc, accuracy, epoch), copy.deepcopy(model.transform.state_dict())
            if accuracy >= best_head_score:
                best_head_score, best_head_epoch = accuracy, epoch
                best_head = copy.deepcopy(model.head.state_dict())
        if support.progress is not None:
            support.progress(epoch, epochs, float(loss.detach()))
    if best_map is None:
        return {"final_loss": float(loss.detach()), "map_epoch": epochs, "head_epoch": epochs}
    model.transform.load_state_dict(best_tl)
    model.head.load_state_dict(best_head)
    return {"final_loss": float(loss.detach()), "map_epoch": best_map[2], "val_pAUROC": best_map[0],
            "head_epoch": best_head_epoch, "val_accuracy": best_head_score}


def fit_alpha(model: SemClip, emb: torch.Tensor, labels: torch.Tensor, support: Support, folds: int = 5) -> float:
    """alpha in 0..1 maximising 5-fold cross-validated accuracy (then log-likelihood) of the fused scores."""
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(support.seed + 1))
    text_logits, _ = model.class_logits(emb)
    head_probs = torch.zeros(n, text_logits.shape[1])
    for k in range(min(folds, n)):
        held = order[k::folds]
        train = order[torch.isin(order, held, invert=True)]
        head = type(model.head)(emb.shape[1], text_logits.shape[1], model.cfg.head_hidden)
        head.load_state_dict(model.head.state_dict())
        opt = torch.optim.Adam(head.parameters(), lr=support.lr, betas=(0.5, 0.999))
        sims = emb @ model.text_embeddings.t()
        for _ in range(epochs_of(support)):
            loss = F.cross_entropy(head(emb[train], sims[train]), labels[train])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            head_probs[held] = head(emb[held], sims[held]).softmax(-1)
    text_probs = text_logits.softmax(-1)
    best = (-1.0, -1e9, 1.0)
    for a in np.linspace(0, 1, 11):
        p = a * text_probs + (1 - a) * head_probs
        acc = float((p.argmax(-1) == labels).float().mean())
        ll = float(p.clamp_min(1e-9).log().gather(1, labels[:, None]).mean())
        best = max(best, (acc, ll, float(a)))
    return best[2]
