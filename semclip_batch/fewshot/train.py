"""``train``: K-shot SEM-CLIP (or a baseline) from a labelled support set (SEMCLIP.md "Training" and "Classification").

Method-agnostic orchestration: load the support set; with ``adapt_steps`` (``train``'s default with SEM-CLIP's
``transfer`` recipe) adapt the backbone on the support frames first (:mod:`semclip_batch.fewshot.adapt`, the
weights written into the checkpoint folder); encode the backbone's features once per support image, the
backbone frozen from there on; let the registered method fit itself (``get_method(cfg.model.method).fit``:
SEM-CLIP's Transformation Layers, head, temperature and alpha in :mod:`semclip_batch.methods.semclip_method`;
WinCLIP+'s memories and PromptAD's prompts in their own modules), then fit the thresholds on the support set
(and, with reference frames or cell references, the reference scales) and write the checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd
import torch

from semclip_batch.config import (
    DEFAULT_ADAPT_LR,
    SCALE_CHECK_POLICIES,
    LossProgress,
    ModelSpec,
    PreprocessConfig,
    parse_scale_policy,
    scale_policy_name,
)
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.adapt import ADAPTED_SOURCE, FitBackbone, backbone_for_fit, write_weights
from semclip_batch.fewshot.augment import augment
from semclip_batch.fewshot.fit_memory import available_bytes, coarser, too_large
from semclip_batch.fewshot.recipes import DEFAULT_RECIPE, RECIPES, Recipe, applied, copies, for_policy, recorded
from semclip_batch.fewshot.reference_fit import (
    fit_reference,
    held_out_reference_weight,
    normal_with_reference,
    support_pixel_differences,
    support_reference_fuser,
)
from semclip_batch.fewshot.scale_check import FITTED, recommend
from semclip_batch.fewshot.support_maps import emitted_views, map_auroc, pixel_counts, support_output, support_thresholds
from semclip_batch.fewshot.trainset import TrainSet, load_trainset
from semclip_batch.io.manifest import read_manifest
from semclip_batch.methods.checkpoint import CheckpointMeta, CheckpointThresholds, WeightsRef, save_checkpoint
from semclip_batch.methods.feature_cache import cached_features, feature_key
from semclip_batch.methods.features import Features, encode_views
from semclip_batch.methods.fitting import MIN_VALIDATION_FRAMES, Support, validation_count, validation_frames
from semclip_batch.methods.prompts import PromptSet, load_prompts, text_embeddings
from semclip_batch.methods.registry import Scorer, depth_of, get_method, method_taps, new_model
from semclip_batch.methods.weights import LoadedBackbone, preprocess_config
from semclip_batch.model.reference import ReferenceScorer, reference_taps
from semclip_batch.model.towers import vision_tower

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    support: str
    out: str
    model: ModelSpec = field(default_factory=lambda: ModelSpec(cls="fused"))  # backbone, weights, method, options
    shots: int | None = None
    epochs: int | None = None
    lr: float = 1e-3
    batch_size: int = 8
    anchor: float = 1.0  # L2-SP weight pulling the Transformation Layers towards their zero-shot start
    cache_dir: str | None = None  # frozen-backbone features of the support frames (methods.feature_cache)
    recipe: Recipe = field(default_factory=lambda: RECIPES[DEFAULT_RECIPE])  # SEM-CLIP's (fewshot.recipes)
    choose_reference_weight: bool = False  # --reference-weight auto: chosen on held-out support frames
    # the scale policy is the weights' recommendation (pretrain's scale check), not the user's: where the support
    # rows would not fit in memory at it, the next coarser one is taken (fewshot.fit_memory)
    policy_from_weights: bool = False
    # --scale-policy auto (train's default with the transfer recipe where no policy is given or recommended): the
    # fit at whole, then the policy run scores SEM-CLIP's maps at is chosen by the fitted model on the support frames
    # it held out (held_out_check), and what depends on the view scale is fitted again at it (maps_at_policy)
    check_scale: bool = False
    adapt_steps: int = 0  # --adapt-steps: the backbone adapted on the support frames first (fewshot.adapt); 0: frozen
    adapt_lr: float = DEFAULT_ADAPT_LR
    # train's default: adapt only where the weights classify fewer of the support frames right zero-shot; None: as asked
    adapt_below: float | None = None

    def __post_init__(self) -> None:
        m = self.model
        if not get_method(m.method).layer_options and (m.taps is not None or not m.use_vv or not m.surgery
                                                       or m.cls != "fused"):
            raise ConfigError("--taps, --no-vv, --no-surgery and --cls are SEM-CLIP options; "
                              f"--method {m.method} takes none of them")
        if self.check_scale and not get_method(m.method).recipes:
            raise ConfigError(f"--scale-policy auto chooses SEM-CLIP's policy; --method {m.method} takes a given one")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"--shots must be >= 1, got {self.shots}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.adapt_below is not None and not 0.0 < self.adapt_below <= 1.0:
            raise ConfigError(f"the adaptation's accuracy bound must be in (0, 1], got {self.adapt_below}")
        if self.adapt_steps < 0 or not self.adapt_lr > 0:
            raise ConfigError(f"--adapt-steps must be >= 0 (0: a frozen backbone) and --adapt-lr > 0, got "
                              f"{self.adapt_steps} and {self.adapt_lr}")


def _public(cfg: TrainConfig) -> dict[str, Any]:
    """The training config as stored in the checkpoint: storage options (endpoints) left out, and the map shifts
    (a ``run`` option: ``train`` never scores with them)."""
    body = asdict(cfg)
    body["model"].pop("storage_options", None)
    body["model"].pop("map_shifts", None)
    return body


def sample_shots(df: pd.DataFrame, shots: int | None, seed: int) -> pd.DataFrame:
    """K rows per class (all rows of a class with fewer), seeded; all rows when ``shots`` is None."""
    if shots is None:
        return df
    parts = [g.sample(n=min(shots, len(g)), random_state=seed) for _, g in df.groupby("label", sort=True)]
    return pd.concat(parts).sort_values("image_id").reset_index(drop=True)


@dataclass
class Fitted:
    """A trained model and what ``train`` records about it."""

    model: Scorer
    reference: ReferenceScorer | None
    summary: dict[str, Any]
    thresholds: dict[str, float]


def support_taps(cfg: TrainConfig, depth: int) -> tuple[int, ...]:
    """Every block whose tokens this configuration reads."""
    taps = set(method_taps(cfg.model, depth)) | {depth}
    if applied(cfg.recipe, cfg.model).reference_scorer:
        taps |= set(reference_taps(depth))
    return tuple(sorted(taps))


def fit(cfg: TrainConfig, backbone: LoadedBackbone, text: torch.Tensor, data: TrainSet, feats: Features,
        ref_feats: Features | None = None, progress: LossProgress | None = None, adapted: bool = False) -> Fitted:
    """Fit ``cfg.model.method`` on precomputed support features (shared across configurations by the benchmark).
    ``adapted``: the backbone was adapted on these frames (:mod:`~semclip_batch.fewshot.adapt`), and SEM-CLIP's
    Transformation Layers stay at its own zero-shot layers (the head alone trains).
    With an augmenting recipe, ``data`` and the features are already :func:`~semclip_batch.fewshot.augment.augment`-ed.
    Cell references alone, where no normal support row has one, fit no reference scorer (nothing to scale it on)."""
    torch.manual_seed(cfg.model.seed)
    spec = applied(cfg.recipe, cfg.model)
    n_copies = copies(cfg.recipe, spec.method)
    if len(data) % n_copies:
        raise ValueError(f"{len(data)} support rows are not {n_copies} copies of the same frames")
    model = new_model(spec, backbone.clip, text)
    summary: dict[str, Any] = {}
    reference = pixels = fuse = None
    if spec.reference_scorer and ref_feats is not None and (spec.use_reference or normal_with_reference(data)):
        # scaled on the normal support rows alone, before the method's fit: its map weights are chosen on maps
        # fused with the reference as run fuses them
        reference = ReferenceScorer(reference_taps(depth_of(backbone.clip)), weight=cfg.model.reference_weight,
                                    fusion=cfg.model.reference_fusion)
        pixels = support_pixel_differences(data, preprocess_config(cfg.model.backbone, tile_above=10**9).std[0])
        summary["reference_scale"] = fit_reference(reference, feats, ref_feats, data, pixels)
        summary["reference_pixel_scale"] = float(reference.pixel_scale)
        fuse = support_reference_fuser(reference, feats, ref_feats, data, pixels)
    support = Support(data=data, feats=feats, clip=backbone.clip, clip_name=cfg.model.backbone, map_auroc=map_auroc,
                      seed=cfg.model.seed, lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size, anchor=cfg.anchor,
                      progress=progress, copies=n_copies, fuse_reference=fuse,
                      choose_self_similarity=cfg.recipe.choose_self_similarity,
                      fit_layers=not adapted)
    method = get_method(spec.method)
    summary = {**method.fit(model, spec, support), **summary}
    model.eval().requires_grad_(False)
    if reference is not None and ref_feats is not None:
        if cfg.choose_reference_weight:
            choice = held_out_reference_weight(reference, method.held_out_maps(model, support), feats,
                                               ref_feats, data, pixels)
            if "kept" in choice:
                log.warning("--reference-weight auto kept %g: %s", choice["weight"], choice["kept"])
            summary["reference_weight_choice"] = choice
    thresholds = support_thresholds(model, feats, data, reference, ref_feats, pixels, cfg.model.score_mode,
                                    len(data) // n_copies)
    return Fitted(model, reference, summary, thresholds)


def _support_that_fits(cfg: TrainConfig, df: pd.DataFrame, classes: tuple[str, ...],
                       verb: str = "trained at") -> tuple[TrainConfig, PreprocessConfig, TrainSet]:
    """The support set decoded as ``run`` will score it (the whole frame, and with a scale policy its tiles,
    whatever run's --tile-above), at the config's policy (the recipe's augmentation at ``whole`` only:
    :func:`~semclip_batch.fewshot.recipes.for_policy`). Where its rows would not fit in memory
    (:mod:`~semclip_batch.fewshot.fit_memory`): without the recipe's augmentation if that fits, else, when the
    policy came from the weights or the support frames' scale check, at the next coarser policy (the config returned
    says which; ``verb`` says in the warning what is done at it); else refused."""
    recipe, asked = cfg.recipe, scale_policy_name(cfg.model.scale_policy)
    while True:
        cfg = replace(cfg, recipe=for_policy(recipe, cfg.model.scale_policy))  # a step down to whole augments again
        spec = applied(cfg.recipe, cfg.model)
        prep = preprocess_config(cfg.model.backbone, tile_above=10**9, scale_policy=cfg.model.scale_policy,
                                 tile_overlap=cfg.model.tile_overlap)
        data = load_trainset(df, classes, prep, storage_options=cfg.model.storage_options,
                             references=spec.use_reference, register=spec.register_reference,
                             self_reference=spec.self_reference)
        if not get_method(cfg.model.method).recipes:  # the estimate was measured on SEM-CLIP's fit
            return cfg, prep, data
        available, n = available_bytes(), copies(cfg.recipe, cfg.model.method)
        why = too_large(len(data) * n, cfg.model.scale_policy, available)
        if why is None:
            return cfg, prep, data
        if n > 1 and too_large(len(data), cfg.model.scale_policy, available) is None:
            log.warning("%s: trained without the recipe's augmentation (%d rows, not %d)", why, len(data), len(data) * n)
            return replace(cfg, recipe=replace(cfg.recipe, augment=False)), prep, data
        if cfg.model.scale_policy is None:
            raise ConfigError(f"{why}: train on fewer support frames (--shots)")
        if not (cfg.policy_from_weights or cfg.check_scale):
            raise ConfigError(f"{why}: train on fewer support frames (--shots) or at a coarser --scale-policy")
        policy = coarser(cfg.model.scale_policy)
        source = "the support frames' scale check" if cfg.check_scale else "the weights' recommendation"
        log.warning("%s: %s --scale-policy %s instead of %s (%s)", why, verb, scale_policy_name(policy), source, asked)
        cfg = replace(cfg, model=replace(cfg.model, scale_policy=policy, tile_overlap=None))


def train(cfg: TrainConfig, progress: LossProgress | None = None,
          adapt_progress: LossProgress | None = None) -> CheckpointMeta:
    """Train, fit, write the checkpoint; returns its meta as stored. ``progress``: the fit's epochs;
    ``adapt_progress``: the backbone's adaptation steps, where it is adapted."""
    t0 = time.perf_counter()
    prompts = load_prompts(cfg.model.prompts, cfg.model.storage_options)
    df = sample_shots(read_manifest(cfg.support, storage_options=cfg.model.storage_options), cfg.shots, cfg.model.seed)
    if cfg.check_scale:  # fitted at whole, whatever policy a library caller's spec gives; the maps' policy checked after
        cfg = replace(cfg, model=replace(cfg.model, scale_policy=None, tile_overlap=None))
    cfg, prep, data = _support_that_fits(cfg, df, prompts.classes)
    held = validation_frames(data.frame if data.frame is not None else torch.arange(len(data)), cfg.model.seed)
    cfg = _cell_references_if_any(cfg, data)
    spec = applied(cfg.recipe, cfg.model)
    views, whole = len(data), data.first_views()
    used = int(whole.sum())  # support frames (a frame's tiles follow its whole view)
    if get_method(cfg.model.method).recipes and validation_count(used) == 0:
        log.warning("%d support frames: under %d none are held out, so nothing checks the fit (its epochs, the map's "
                    "weights and the class fusion are chosen on frames it learned from; README \"How many shots\": one "
                    "shot lost pixel AUROC to zero-shot on four of six lots)", used, MIN_VALIDATION_FRAMES)
    chosen = backbone_for_fit(cfg.model, cfg.support, df, data, prompts, prep, cfg.adapt_steps, cfg.adapt_lr,
                              cfg.adapt_below, adapt_progress)
    if copies(cfg.recipe, cfg.model.method) > 1:
        data = augment(data)
    feats, ref_feats = _support_features(cfg, spec, chosen.backbone, data, prep)
    fitted = fit(cfg, chosen.backbone, torch.from_numpy(text_embeddings(chosen.backbone, prompts)), data, feats,
                 ref_feats, progress, adapted=chosen.adapted is not None)
    rows = {"config": _public(cfg), "support_rows": len(df), "used": used, "views": views,
            "rows_augmented": len(data), "skipped": data.skipped,
            "with_reference": None if data.has_ref is None else int(data.has_ref[:views][whole].sum())}
    del data, feats, ref_feats  # the fit's rows, freed before the check and the maps' views load
    scale = held_out_check(cfg, df.iloc[held.tolist()], prompts.classes, chosen.backbone,
                           fitted) if cfg.check_scale else None
    at, at_prep = _maps_checked(cfg, prep, scale, df, prompts.classes, chosen.backbone, fitted)
    state = dict(fitted.model.state_dict())
    if fitted.reference is not None:
        state.update({f"reference.{k}": v for k, v in fitted.reference.state_dict().items()})
    record = {**rows, **fitted.summary, **({} if chosen.adapted is None else {"adapted_backbone": chosen.adapted.record}),
              **({} if chosen.check is None else {"adapt_check": chosen.check}),
              **({} if scale is None else {"scale_check": scale}),
              "seconds": round(time.perf_counter() - t0, 1)}
    meta = _checkpoint_meta(cfg, applied(cfg.recipe, at.model), prompts, chosen, fitted, at_prep, record)
    write_weights(cfg.out, chosen, cfg.model.storage_options)
    return save_checkpoint(cfg.out, state, meta, cfg.model.storage_options)


def held_out_check(cfg: TrainConfig, rows: pd.DataFrame, classes: tuple[str, ...], backbone: LoadedBackbone,
                   fitted: Fitted) -> dict[str, Any]:
    """The check of the policy ``run`` scores the maps at, after the fit at whole: ``rows`` (the support frames the
    fit held out: the backbone never adapted on them, the layers and head never trained on them) loaded at each
    candidate policy (:data:`~semclip_batch.config.SCALE_CHECK_POLICIES`) and scored by the fitted model as ``run``
    scores them (the cell references fused where fitted; the memory left out, as its bank holds these frames'
    clean patches), pixel AUROC over the views ``run`` writes a map for; the cheapest policy within the tolerance
    of the best is chosen (``pretrain``'s rule: :func:`~semclip_batch.fewshot.scale_check.recommend`). The
    checkpoint's record: per policy the figures, the chosen policy (None: whole, ``note`` says why nothing was
    measured), the frames checked, ``fitted_at: whole``."""
    record: dict[str, Any] = {"figures": {}, "chosen": None, "frames": len(rows), "fitted_at": "whole",
                              "scored_by": FITTED}
    if rows.empty:
        return record | {"note": f"under {MIN_VALIDATION_FRAMES} support frames the fit holds none out to check on"}
    method, figures = get_method(cfg.model.method), {}
    with method.without_memory(fitted.model):
        for name in SCALE_CHECK_POLICIES:
            figures[name] = _held_out_auroc(cfg, parse_scale_policy(name), rows, classes, backbone, fitted)
    if not any(row["views"] for row in figures.values()):
        return record | {"note": f"the {len(rows)} held-out support frames fit in memory at no policy"}
    if all(row["pAUROC"] is None for row in figures.values()):
        return record | {"note": f"no defect pixel among the {len(rows)} held-out support frames"}
    return record | {"figures": figures, "chosen": recommend(figures)}


@torch.no_grad()
def _held_out_auroc(cfg: TrainConfig, policy: float | None, rows: pd.DataFrame, classes: tuple[str, ...],
                    backbone: LoadedBackbone, fitted: Fitted) -> dict[str, float | int | None]:
    """:func:`held_out_check`'s figures at one policy: pixel AUROC (None: no defect pixel, or the views would not
    fit in memory there) and model views."""
    at = replace(cfg, model=replace(cfg.model, scale_policy=policy, tile_overlap=None), policy_from_weights=False,
                 check_scale=False)
    try:
        at, prep, data = _support_that_fits(at, rows, classes)
    except ConfigError as exc:
        log.warning("scale check at %s left out: %s", scale_policy_name(policy), exc)
        return {"pAUROC": None, "views": 0}
    feats, ref_feats = _support_features(at, applied(at.recipe, at.model), backbone, data, prep)
    reference = fitted.reference if ref_feats is not None else None
    pixels = None if reference is None else support_pixel_differences(data, prep.std[0])
    out = support_output(fitted.model, feats, data, reference, ref_feats, pixels)
    written = emitted_views(data, torch.arange(len(data)))
    return {"pAUROC": pixel_counts(out.maps[written], data.masks[written], data.has_mask[written]).auroc(),
            "views": len(data)}


def _maps_checked(cfg: TrainConfig, prep: PreprocessConfig, scale: dict[str, Any] | None, df: pd.DataFrame,
                  classes: tuple[str, ...], backbone: LoadedBackbone,
                  fitted: Fitted) -> tuple[TrainConfig, PreprocessConfig]:
    """Where ``run`` will score the maps: the fit's policy, or with ``--scale-policy auto`` the one its check chose
    (:func:`maps_at_policy`; a step-down to a coarser one recorded as ``scale["maps_at"]``)."""
    policy = None if scale is None or scale["chosen"] is None else parse_scale_policy(scale["chosen"])
    if scale is None or policy is None:
        return cfg, prep
    moved = maps_at_policy(cfg, policy, df, classes, backbone, fitted)
    at, at_prep = (cfg, prep) if moved is None else moved
    if scale_policy_name(at.model.scale_policy) != scale["chosen"]:
        scale["maps_at"] = scale_policy_name(at.model.scale_policy)  # stepped down: the views did not fit
    return at, at_prep


def maps_at_policy(cfg: TrainConfig, policy: float, df: pd.DataFrame, classes: tuple[str, ...],
                   backbone: LoadedBackbone, fitted: Fitted) -> tuple[TrainConfig, PreprocessConfig] | None:
    """``fitted`` (fitted at whole) made ready for ``run`` to score its maps at ``policy`` (``--scale-policy auto``'s
    choice): the support frames loaded again as ``run`` will score them there (their whole views and tiles; the next
    coarser policy where those would not fit in memory, None and ``fitted`` untouched where that is whole), and
    fitted again on those views: the memory's bank (their clean patches), the reference scorer's two scales (cell
    references; the fit's where no normal view there has one) and the image and pixel thresholds. The head, the
    Transformation Layers, alpha, the map's weights and the memory's distance scale stay the fit's; what was fitted
    again is recorded under ``maps_at_policy`` beside the fit's own figures. Returns the config and preprocessing at
    the policy (the checkpoint's)."""
    at = replace(cfg, model=replace(cfg.model, scale_policy=policy, tile_overlap=None))
    at, prep, data = _support_that_fits(at, df, classes, verb="maps at")
    if at.model.scale_policy is None:
        return None
    feats, ref_feats = _support_features(at, applied(at.recipe, at.model), backbone, data, prep)
    model, reference, pixels = fitted.model, fitted.reference, None
    record: dict[str, Any] = {"policy": scale_policy_name(at.model.scale_policy), "views": len(data),
                              "thresholds_at_whole": fitted.thresholds}
    if reference is not None and ref_feats is not None:
        pixels = support_pixel_differences(data, prep.std[0])
        record["reference_refit"] = normal_with_reference(data)
        if record["reference_refit"]:
            record["reference_scale"] = fit_reference(reference, feats, ref_feats, data, pixels)
            record["reference_pixel_scale"] = float(reference.pixel_scale)
    tokens = get_method(cfg.model.method).refill_memory(model, feats, data.masks, data.has_mask, cfg.model.seed)
    if tokens is not None:
        record["memory_tokens"] = tokens
    fitted.thresholds = support_thresholds(model, feats, data, reference, ref_feats, pixels, cfg.model.score_mode,
                                           len(data))
    fitted.summary["maps_at_policy"] = record
    return at, prep


def _cell_references_if_any(cfg: TrainConfig, data: TrainSet) -> TrainConfig:
    """The config without cell references where the recipe asks for them but no normal support frame repeats its
    pattern (a warning; ``data`` loses the references it has)."""
    spec = applied(cfg.recipe, cfg.model)
    if not spec.self_reference or spec.use_reference or normal_with_reference(data):
        return cfg
    log.warning("no normal support frame repeats its pattern: trained without cell references")
    data.refs = data.has_ref = None
    return replace(cfg, model=replace(cfg.model, self_reference=False), recipe=replace(cfg.recipe, self_reference=False))


def _support_features(cfg: TrainConfig, spec: ModelSpec, backbone: LoadedBackbone, data: TrainSet,
                      prep: PreprocessConfig) -> tuple[Features, Features | None]:
    """The support rows' features at the fit's taps, and the reference frames' where a reference scorer reads them
    (both from ``cfg.cache_dir`` when it holds them)."""
    visual, depth = vision_tower(backbone.clip), depth_of(backbone.clip)
    taps, windows = support_taps(cfg, depth), get_method(cfg.model.method).windows
    feats = cached_features(cfg.cache_dir, feature_key(backbone.sha256, data.views, prep, taps, 1, windows),
                            lambda: encode_views(visual, data.views, prep, taps, windows=windows), cfg.model.storage_options)
    if not spec.reference_scorer:
        return feats, None
    assert data.refs is not None
    refs, ref_taps = data.refs, reference_taps(depth)
    return feats, cached_features(cfg.cache_dir, feature_key(backbone.sha256, refs, prep, ref_taps, None, False),
                                  lambda: encode_views(visual, refs, prep, ref_taps, vv_from=None, pooled=False),
                                  cfg.model.storage_options)


def _checkpoint_meta(cfg: TrainConfig, spec: ModelSpec, prompts: PromptSet, chosen: FitBackbone, fitted: Fitted,
                     prep: PreprocessConfig, training: dict[str, Any]) -> CheckpointMeta:
    """What the checkpoint records: the model as fitted (its options, taps, fusion and thresholds), the weights it
    was fitted on and ``training``'s record."""
    backbone, model = chosen.backbone, fitted.model
    return CheckpointMeta(
        method=cfg.model.method, backbone=cfg.model.backbone,
        weights=WeightsRef(source=backbone.source if chosen.adapted is None else ADAPTED_SOURCE, sha256=backbone.sha256,
                           seed=cfg.model.seed),
        classes=prompts.classes, prompts=dict(zip(prompts.classes, prompts.prompts, strict=True)),
        taps=method_taps(spec, depth_of(backbone.clip)), use_vv=cfg.model.use_vv, surgery=cfg.model.surgery,
        cls=cfg.model.cls, use_reference=spec.use_reference, alpha=float(getattr(model, "alpha", torch.tensor(1.0))),
        temperature=float(model.text_scale),
        thresholds=CheckpointThresholds(image=float(fitted.thresholds["image"]), pixel=float(fitted.thresholds["pixel"]),
                                        min_region_px=int(fitted.thresholds["min_region_px"])),
        preprocessing={k: v for k, v in prep.as_record().items() if k != "tile_above"},
        training=training,
        score_mode=spec.score_mode, sigma=spec.sigma, recipe=recorded(cfg.recipe, spec.method),
        memory=spec.memory, region_head=spec.region_head, scale_policy=spec.scale_policy,
        defect_view=spec.defect_view, register_reference=spec.register_reference and spec.use_reference,
        reference_weight=spec.reference_weight if fitted.reference is None else fitted.reference.weight,
        reference_fusion=spec.reference_fusion, self_reference=spec.self_reference,
        self_similarity=float(fitted.summary.get("self_similarity", spec.self_similarity)),  # the fit's choice
    )
