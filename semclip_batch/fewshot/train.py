"""``train``: K-shot SEM-CLIP (or a baseline) on a frozen backbone (SEMCLIP.md "Training" and "Classification").

SEM-CLIP: trains the Transformation Layers (focal + dice on the defect map of every tapped layer and path, at
half the input size, plus an L2-SP pull of the layers towards their zero-shot start) and the classification
head (cross-entropy) on 80 % of the support set, keeping the epochs that do best on the other 20 % (epoch 0
being the zero-shot layers), then fits the text temperature, the fusion weight alpha (5-fold cross-validation
of the head on the support set). WinCLIP+ and PromptAD are fitted by :mod:`semclip_batch.fewshot.baselines`. Every
method then gets its thresholds from the support set (and, with ``use_reference``, the reference-distance
scale) and a checkpoint. The backbone's features are computed once per support image (it is frozen).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from semclip_batch.analysis.metrics import PixelCounts
from semclip_batch.config import DEFAULT_BACKBONE, DEFAULT_MIN_REGION_PX, LossProgress, ModelSpec
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.baselines import PromptAdSettings, fit_promptad, fit_winclip
from semclip_batch.fewshot.trainset import TrainSet, load_trainset
from semclip_batch.io.manifest import read_manifest
from semclip_batch.methods.checkpoint import CheckpointMeta, CheckpointThresholds, WeightsRef, save_checkpoint
from semclip_batch.methods.decisions import anomaly_score, to_mask
from semclip_batch.methods.feature_cache import cached_features, feature_key
from semclip_batch.methods.features import Features, encode_views
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.registry import METHODS, Scorer, depth_of, method_taps, model_inputs, new_model, score_features
from semclip_batch.methods.weights import LoadedBackbone, load_backbone, preprocess_config
from semclip_batch.model import SemClip, SemClipOutput
from semclip_batch.model.encoder import EncoderOutput
from semclip_batch.model.reference import ReferenceScorer, reference_taps
from semclip_batch.model.semclip import defect_map
from semclip_batch.model.towers import vision_tower
from semclip_batch.model.winclip import WinClip

log = logging.getLogger(__name__)
SEMCLIP_EPOCHS = 40
LOSS_DOWNSCALE = 2  # focal + dice on maps at half the model-input size: 4x cheaper, same patch grid


@dataclass(frozen=True)
class TrainConfig:
    support: str
    out: str
    backbone: str = DEFAULT_BACKBONE
    pretrained: str = "none"
    pretrained_sha256: str | None = None
    seed: int = 0
    shots: int | None = None
    method: str = "semclip"
    epochs: int | None = None
    lr: float = 1e-3
    batch_size: int = 8
    prompts: str | None = None
    taps: tuple[int, ...] | None = None
    use_vv: bool = True
    surgery: bool = True
    cls: str = "fused"
    use_reference: bool = False
    anchor: float = 1.0  # L2-SP weight pulling the Transformation Layers towards their zero-shot start
    cache_dir: str | None = None  # frozen-backbone features of the support frames (methods.feature_cache)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != "semclip" and (self.taps is not None or not self.use_vv or not self.surgery
                                         or self.cls != "fused"):
            raise ConfigError("--taps, --no-vv, --no-surgery and --cls are SEM-CLIP options; "
                              f"--method {self.method} takes none of them")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"--shots must be >= 1, got {self.shots}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")

    @property
    def semclip_epochs(self) -> int:
        return self.epochs or SEMCLIP_EPOCHS


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
                 progress: LossProgress | None) -> dict[str, float]:
    """Train the Transformation Layers and the head on 80 % of the support set; keep, separately, the epoch
    (0 = the zero-shot layers) whose maps / head do best on the other 20 % (early stopping on support data)."""
    params = list(model.transform.parameters()) + list(model.head.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(cfg.seed)
    size = (data.views.shape[-2] // LOSS_DOWNSCALE, data.views.shape[-1] // LOSS_DOWNSCALE)
    targets = (F.interpolate(data.masks.float()[:, None], size=size, mode="area")[:, 0] >= 0.5).float()
    init = [p.detach().clone() for p in model.transform.parameters()]
    fit_idx, val = holdout_split(len(data), cfg.seed)
    best_map = (*_validate(model, enc, data, val), 0) if len(val) else None
    best_tl, best_head = copy.deepcopy(model.transform.state_dict()), copy.deepcopy(model.head.state_dict())
    best_head_score, best_head_epoch = -1.0, 0
    loss = torch.tensor(0.0)
    for epoch in range(1, cfg.semclip_epochs + 1):
        for idx in fit_idx[torch.randperm(len(fit_idx), generator=gen)].split(cfg.batch_size):
            sub = _subset(enc, idx)
            seg_rows = data.has_mask[idx]
            terms = model.term_logits(sub)
            seg = torch.stack([focal_dice(defect_map(t, size)[seg_rows], targets[idx][seg_rows]) for t in terms]).mean() \
                if seg_rows.any() else torch.tensor(0.0)
            _, head_logits = model.class_logits(F.normalize(sub.pooled, dim=-1))
            anchor = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.transform.parameters(), init, strict=True))
            loss = seg + F.cross_entropy(head_logits, data.labels[idx]) + cfg.anchor * anchor
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
            progress(epoch, cfg.semclip_epochs, float(loss.detach()))
    if best_map is None:
        return {"final_loss": float(loss.detach()), "map_epoch": cfg.semclip_epochs, "head_epoch": cfg.semclip_epochs}
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
        for _ in range(cfg.semclip_epochs):
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


def fit_thresholds(out: SemClipOutput, data: TrainSet, score_mode: str = "mean") -> dict[str, float]:
    """Image threshold: best balanced accuracy on the support scores; pixel: best F1 of the support maps."""
    scores = np.array([anomaly_score(float(p[0]), float(m.max()), score_mode)
                       for p, m in zip(out.class_probs, out.maps, strict=True)])
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


def fit_reference(reference: ReferenceScorer, feats: Features, ref_feats: Features, data: TrainSet) -> float:
    """The reference distance scale: 99th percentile of the normal support patches' distances."""
    assert data.has_ref is not None
    rows = ((data.labels == 0) & data.has_ref).nonzero().flatten()
    if rows.numel() == 0:
        raise ConfigError("--use-reference needs normal support rows with a readable reference_uri frame")
    dist = reference.distance(feats.subset(rows).dual, feats.taps, ref_feats.subset(rows).dual, ref_feats.taps)
    scale = float(torch.quantile(dist.flatten().float(), 0.99).clamp_min(1e-4))
    reference.scale.fill_(scale)
    return scale


@dataclass
class Fitted:
    """A trained model and what ``train`` records about it."""

    model: Scorer
    reference: ReferenceScorer | None
    summary: dict[str, Any]
    thresholds: dict[str, float]


def model_spec(cfg: TrainConfig) -> ModelSpec:
    return ModelSpec(backbone=cfg.backbone, pretrained=cfg.pretrained, seed=cfg.seed, taps=cfg.taps, use_vv=cfg.use_vv,
                     surgery=cfg.surgery, cls=cfg.cls, method=cfg.method, use_reference=cfg.use_reference,
                     storage_options=cfg.storage_options)


def support_taps(cfg: TrainConfig, depth: int) -> tuple[int, ...]:
    """Every block whose tokens this configuration reads."""
    taps = set(method_taps(model_spec(cfg), depth)) | {depth}
    if cfg.use_reference:
        taps |= set(reference_taps(depth))
    return tuple(sorted(taps))


def fit(cfg: TrainConfig, backbone: LoadedBackbone, text: torch.Tensor, data: TrainSet, feats: Features,
        ref_feats: Features | None = None, progress: LossProgress | None = None) -> Fitted:
    """Fit ``cfg.method`` on precomputed support features (shared across configurations by the benchmark)."""
    torch.manual_seed(cfg.seed)
    model = new_model(model_spec(cfg), backbone.clip, text)
    summary: dict[str, Any]
    emb = F.normalize(feats.dual.pooled.float(), dim=-1)
    model.text_scale.fill_(fit_temperature(emb, model.text_embeddings, data.labels))
    if isinstance(model, SemClip):
        model.transform.train().requires_grad_(True)
        model.head.requires_grad_(True)
        summary = train_layers(model, model_inputs(model, feats), data, cfg, progress)
        model.eval().requires_grad_(False)
        with torch.enable_grad():
            alpha = fit_alpha(model, emb, data.labels, cfg) if cfg.cls == "fused" else float(cfg.cls == "text")
        model.alpha.fill_(alpha)
    elif isinstance(model, WinClip):
        summary = fit_winclip(model, feats, data)
    else:
        settings = PromptAdSettings() if cfg.epochs is None else PromptAdSettings(epochs=cfg.epochs)
        with torch.enable_grad():
            summary = fit_promptad(model, backbone.clip, cfg.backbone, data.classes, feats, data, cfg.seed, settings,
                                   progress)
    model.eval().requires_grad_(False)
    reference = None
    if cfg.use_reference and ref_feats is not None:
        reference = ReferenceScorer(reference_taps(depth_of(backbone.clip)))
        summary["reference_scale"] = fit_reference(reference, feats, ref_feats, data)
    size = (data.views.shape[-2], data.views.shape[-1])
    with torch.no_grad():
        out = score_features(model, feats, size, reference, ref_feats, data.has_ref)
    return Fitted(model, reference, summary, fit_thresholds(out, data))


def train(cfg: TrainConfig, progress: LossProgress | None = None) -> CheckpointMeta:
    """Train, fit, write the checkpoint; returns its meta as stored."""
    t0 = time.perf_counter()
    prompts = load_prompts(cfg.prompts, cfg.storage_options)
    prep = preprocess_config(cfg.backbone, tile_above=10**9)
    df = sample_shots(read_manifest(cfg.support, storage_options=cfg.storage_options), cfg.shots, cfg.seed)
    data = load_trainset(df, prompts.classes, prep, storage_options=cfg.storage_options, references=cfg.use_reference)
    backbone = load_backbone(cfg.backbone, cfg.pretrained, seed=cfg.seed, expected_sha256=cfg.pretrained_sha256,
                             storage_options=cfg.storage_options)
    text = torch.from_numpy(text_embeddings(backbone, prompts))
    visual = vision_tower(backbone.clip)
    depth = depth_of(backbone.clip)
    taps = support_taps(cfg, depth)
    windows = cfg.method == "winclip"
    feats = cached_features(cfg.cache_dir, feature_key(backbone.sha256, data.views, prep, taps, 1, windows),
                            lambda: encode_views(visual, data.views, prep, taps, windows=windows), cfg.storage_options)
    ref_feats = None
    if cfg.use_reference:
        assert data.refs is not None
        refs, ref_taps = data.refs, reference_taps(depth)
        ref_feats = cached_features(cfg.cache_dir, feature_key(backbone.sha256, refs, prep, ref_taps, None, False),
                                    lambda: encode_views(visual, refs, prep, ref_taps, vv_from=None), cfg.storage_options)
    fitted = fit(cfg, backbone, text, data, feats, ref_feats, progress)
    model = fitted.model
    state = dict(model.state_dict())
    if fitted.reference is not None:
        state.update({f"reference.{k}": v for k, v in fitted.reference.state_dict().items()})
    spec = model_spec(cfg)
    meta = CheckpointMeta(
        method=cfg.method, backbone=cfg.backbone,
        weights=WeightsRef(source=backbone.source, sha256=backbone.sha256, seed=cfg.seed),
        classes=prompts.classes, prompts=dict(zip(prompts.classes, prompts.prompts, strict=True)),
        taps=method_taps(spec, depth), use_vv=cfg.use_vv, surgery=cfg.surgery, cls=cfg.cls,
        use_reference=cfg.use_reference, alpha=float(getattr(model, "alpha", torch.tensor(1.0))),
        temperature=float(model.text_scale),
        thresholds=CheckpointThresholds(image=float(fitted.thresholds["image"]), pixel=float(fitted.thresholds["pixel"]),
                                        min_region_px=int(fitted.thresholds["min_region_px"])),
        preprocessing={k: v for k, v in prep.as_record().items() if k != "tile_above"},
        training={"config": {k: v for k, v in asdict(cfg).items() if k != "storage_options"},
                  "support_rows": len(df), "used": len(data), "skipped": data.skipped,
                  "with_reference": None if data.has_ref is None else int(data.has_ref.sum()), **fitted.summary,
                  "seconds": round(time.perf_counter() - t0, 1)},
        score_mode=spec.score_mode, sigma=spec.sigma,
    )
    return save_checkpoint(cfg.out, state, meta, cfg.storage_options)
