"""``train``: K-shot SEM-CLIP on a frozen backbone (SEMCLIP.md "Training" and "Classification").

Trains the Transformation Layers (focal + dice on the defect map of every tapped layer and path) and the
classification head (cross-entropy) on 80 % of the support set, keeping the epochs that do best on the other
20 % (epoch 0 being the zero-shot layers, so training never makes the maps worse on support data), then
fits the text temperature, the fusion weight alpha (5-fold cross-validation of the head on the support set)
and the thresholds (on the support set), and writes a checkpoint. The backbone's tokens are computed once
per support image: the backbone is frozen.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .checkpoint import save_checkpoint
from .config import DEFAULT_BACKBONE, DEFAULT_MIN_REGION_PX, ModelSpec
from .inference import build_model
from .manifest import read_manifest
from .metrics import PixelCounts
from .model import SemClip
from .model.encoder import EncoderOutput
from .model.semclip import defect_map
from .pipeline import text_embeddings
from .preprocess import normalize
from .prompts import load_prompts
from .scoring import anomaly_score, to_mask
from .trainset import TrainSet, load_trainset
from .weights import load_backbone, preprocess_config

log = logging.getLogger(__name__)
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainConfig:
    support: str
    out: str
    backbone: str = DEFAULT_BACKBONE
    pretrained: str = "none"
    pretrained_sha256: str | None = None
    seed: int = 0
    shots: int | None = None
    epochs: int = 40
    lr: float = 1e-3
    batch_size: int = 8
    prompts: str | None = None
    taps: tuple[int, ...] | None = None
    use_vv: bool = True
    surgery: bool = True
    cls: str = "fused"
    storage_options: dict[str, Any] = field(default_factory=dict)


def sample_shots(df: pd.DataFrame, shots: int | None, seed: int) -> pd.DataFrame:
    """K rows per class (all rows of a class with fewer), seeded; all rows when ``shots`` is None."""
    if shots is None:
        return df
    parts = [g.sample(n=min(shots, len(g)), random_state=seed) for _, g in df.groupby("label", sort=True)]
    return pd.concat(parts).sort_values("image_id").reset_index(drop=True)


def focal_dice(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal (gamma 2) + dice loss of a defect probability map. ``(B, S, S)`` each."""
    p = prob.clamp(1e-6, 1 - 1e-6)
    pt = torch.where(target > 0.5, p, 1 - p)
    focal = (-(1 - pt) ** gamma * pt.log()).mean()
    inter = (p * target).sum(dim=(1, 2))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1)
    return focal + dice.mean()


def _subset(enc: EncoderOutput, idx: torch.Tensor) -> EncoderOutput:
    pick = lambda t: None if t is None else t[idx]  # noqa: E731
    return EncoderOutput(pooled=enc.pooled[idx], original=[t[idx] for t in enc.original],
                         vv=[pick(t) for t in enc.vv])


@torch.no_grad()
def encode_all(model: SemClip, data: TrainSet, prep, batch: int = 32) -> EncoderOutput:
    parts = [model.encode(normalize(data.views[i:i + batch], prep)) for i in range(0, len(data), batch)]
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    return EncoderOutput(pooled=torch.cat([p.pooled for p in parts]),
                         original=[torch.cat([p.original[k] for p in parts]) for k in range(len(parts[0].original))],
                         vv=[cat([p.vv[k] for p in parts]) for k in range(len(parts[0].vv))])


def holdout_split(n: int, seed: int, share: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train / validation indices of the support set (no validation below 10 images)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7))
    n_val = int(n * share) if n >= 10 else 0
    return order[n_val:], order[:n_val]


def _pixel_counts(maps: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> PixelCounts:
    """Per-level counts of the stored-mask form of ``maps`` against ``masks`` >= 0.5, rows with a mask only."""
    counts = PixelCounts()
    for m, t, has in zip(maps, masks, has_mask, strict=True):
        if has:
            counts.add(to_mask(m.numpy()), t.float().numpy() >= 0.5)
    return counts


@torch.no_grad()
def _validate(model: SemClip, enc: EncoderOutput, data: TrainSet, val: torch.Tensor) -> tuple[float, float]:
    """Pixel AUROC of the maps and head accuracy on the validation images."""
    sub = _subset(enc, val)
    out = model.from_encoded(sub, (data.views.shape[-2], data.views.shape[-1]))
    counts = _pixel_counts(out.maps, data.masks[val], data.has_mask[val])
    _, head_logits = model.class_logits(F.normalize(sub.pooled, dim=-1))
    accuracy = float((head_logits.argmax(-1) == data.labels[val]).float().mean())
    return counts.auroc() or 0.0, accuracy


def train_layers(model: SemClip, enc: EncoderOutput, data: TrainSet, cfg: TrainConfig,
                 progress: Progress | None) -> dict[str, float]:
    """Train the Transformation Layers and the head on 80 % of the support set; keep, separately, the epoch
    (0 = the zero-shot layers) whose maps / head do best on the other 20 % (early stopping on support data)."""
    params = list(model.transform.parameters()) + list(model.head.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(cfg.seed)
    size = (data.views.shape[-2], data.views.shape[-1])
    targets = (data.masks.float() >= 0.5).float()
    fit_idx, val = holdout_split(len(data), cfg.seed)
    best_map = (*_validate(model, enc, data, val), 0) if len(val) else None
    best_tl, best_head = copy.deepcopy(model.transform.state_dict()), copy.deepcopy(model.head.state_dict())
    best_head_score, best_head_epoch = -1.0, 0
    loss = torch.tensor(0.0)
    for epoch in range(1, cfg.epochs + 1):
        for idx in fit_idx[torch.randperm(len(fit_idx), generator=gen)].split(cfg.batch_size):
            sub = _subset(enc, idx)
            seg_rows = data.has_mask[idx]
            terms = model.term_logits(sub)
            seg = torch.stack([focal_dice(defect_map(t, size)[seg_rows], targets[idx][seg_rows]) for t in terms]).mean() \
                if seg_rows.any() else torch.tensor(0.0)
            _, head_logits = model.class_logits(F.normalize(sub.pooled, dim=-1))
            loss = seg + F.cross_entropy(head_logits, data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if best_map is not None:
            pauroc, accuracy = _validate(model, enc, data, val)
            if pauroc > best_map[0]:
                best_map, best_tl = (pauroc, accuracy, epoch), copy.deepcopy(model.transform.state_dict())
            if accuracy >= best_head_score:
                best_head_score, best_head_epoch = accuracy, epoch
                best_head = copy.deepcopy(model.head.state_dict())
        if progress is not None:
            progress(epoch, cfg.epochs, float(loss.detach()))
    if best_map is None:
        return {"final_loss": float(loss.detach()), "map_epoch": cfg.epochs, "head_epoch": cfg.epochs}
    model.transform.load_state_dict(best_tl)
    model.head.load_state_dict(best_head)
    return {"final_loss": float(loss.detach()), "map_epoch": best_map[2], "val_pAUROC": best_map[0],
            "head_epoch": best_head_epoch, "val_accuracy": best_head_score}


def fit_temperature(emb: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> float:
    """The text softmax temperature maximising the support set's log-likelihood (grid 1..200)."""
    sims = emb @ text.t()
    grid = torch.logspace(0, np.log10(200.0), 40)
    nll = torch.stack([F.cross_entropy(s * sims, labels) for s in grid])
    return float(grid[int(nll.argmin())])


def fit_alpha(model: SemClip, emb: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, folds: int = 5) -> float:
    """alpha in 0..1 maximising 5-fold cross-validated accuracy (then log-likelihood) of the fused scores."""
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))
    text_logits, _ = model.class_logits(emb)
    head_probs = torch.zeros(n, text_logits.shape[1])
    for k in range(min(folds, n)):
        held = order[k::folds]
        train = order[torch.isin(order, held, invert=True)]
        head = type(model.head)(emb.shape[1], text_logits.shape[1], model.cfg.head_hidden)
        head.load_state_dict(model.head.state_dict())
        opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        sims = emb @ model.text_embeddings.t()
        for _ in range(cfg.epochs):
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


@torch.no_grad()
def fit_thresholds(model: SemClip, enc: EncoderOutput, data: TrainSet) -> dict[str, float]:
    """Image threshold: best balanced accuracy on the support scores; pixel: best F1 of the support maps."""
    size = (data.views.shape[-2], data.views.shape[-1])
    out = model.from_encoded(enc, size)
    scores = np.array([anomaly_score(float(p[0]), float(m.max())) for p, m in zip(out.class_probs, out.maps, strict=True)])
    defect = (data.labels > 0).numpy()
    image = 0.5
    if defect.any() and (~defect).any():
        cands = np.unique(scores)
        bal = [0.5 * ((scores[defect] >= c).mean() + (scores[~defect] < c).mean()) for c in cands]
        i = int(np.argmax(bal))
        image = float((cands[i] + (cands[i - 1] if i > 0 else cands[i] - 0.01)) / 2)
    counts = _pixel_counts(out.maps, data.masks, data.has_mask)
    pixel = float(int(np.argmax(counts.f1_curve()[:256])) / 255.0) if counts.pos.sum() else 0.5
    return {"image": float(np.clip(image, 0, 1)), "pixel": pixel, "min_region_px": DEFAULT_MIN_REGION_PX}


def train(cfg: TrainConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train, fit, write the checkpoint; returns its JSON body."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    prompts = load_prompts(cfg.prompts, cfg.storage_options)
    prep = preprocess_config(cfg.backbone, tile_above=10**9)
    df = sample_shots(read_manifest(cfg.support, storage_options=cfg.storage_options), cfg.shots, cfg.seed)
    data = load_trainset(df, prompts.classes, prep, storage_options=cfg.storage_options)
    backbone = load_backbone(cfg.backbone, cfg.pretrained, seed=cfg.seed, expected_sha256=cfg.pretrained_sha256,
                             storage_options=cfg.storage_options)
    text = text_embeddings(backbone, prompts)
    spec = ModelSpec(backbone=cfg.backbone, pretrained=cfg.pretrained, seed=cfg.seed, taps=cfg.taps,
                     use_vv=cfg.use_vv, surgery=cfg.surgery, cls=cfg.cls, storage_options=cfg.storage_options)
    model = build_model(spec, text, backbone=backbone)
    enc = encode_all(model, data, prep)
    for p in model.transform.parameters():
        p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)
    model.transform.train()
    fit_summary = train_layers(model, enc, data, cfg, progress)
    model.eval().requires_grad_(False)
    emb = F.normalize(enc.pooled, dim=-1)
    model.text_scale.fill_(fit_temperature(emb, model.text_embeddings, data.labels))
    with torch.enable_grad():
        model.alpha.fill_(fit_alpha(model, emb, data.labels, cfg) if cfg.cls == "fused" else float(cfg.cls == "text"))
    thresholds = fit_thresholds(model, enc, data)
    meta = {
        "method": "semclip", "backbone": cfg.backbone,
        "weights": {"source": backbone.source, "sha256": backbone.sha256, "seed": cfg.seed},
        "classes": list(prompts.classes), "prompts": prompts.as_record(),
        "taps": list(model.cfg.taps), "use_vv": cfg.use_vv, "surgery": cfg.surgery, "cls": cfg.cls,
        "alpha": float(model.alpha), "temperature": float(model.text_scale), "thresholds": thresholds,
        "preprocessing": {k: v for k, v in prep.as_record().items() if k != "tile_above"},
        "training": {"config": {k: v for k, v in asdict(cfg).items() if k != "storage_options"},
                     "support_rows": len(df), "used": len(data), "skipped": data.skipped, **fit_summary,
                     "seconds": round(time.perf_counter() - t0, 1)},
    }
    save_checkpoint(cfg.out, model.state_dict(), meta, cfg.storage_options)
    return meta
