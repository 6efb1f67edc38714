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
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from semclip_batch.config import LossProgress, ModelSpec, PreprocessConfig
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.adapt import ADAPTED_BACKBONE, ADAPTED_SOURCE, FitBackbone, backbone_for_fit, write_weights
from semclip_batch.fewshot.augment import augment
from semclip_batch.fewshot.decoded import kept_budget, rows_kept
from semclip_batch.fewshot.fit_memory import available_bytes
from semclip_batch.fewshot.grey_memory_fit import grey_memory_step, native_support
from semclip_batch.fewshot.maps_policy import (
    checked_policy,
    held_out_check,
    held_out_localisation,
    maps_checked,
    weak_localisation_warning,
    whole_maps,
    whole_thresholds,
)
from semclip_batch.fewshot.recipes import applied, copies, recorded
from semclip_batch.fewshot.reference_fit import (
    fit_reference,
    held_out_reference_weight,
    normal_with_reference,
    support_reference_fuser,
    whole_pixel_differences,
)
from semclip_batch.fewshot.region_fit import region_classes_step
from semclip_batch.fewshot.support_maps import map_auroc
from semclip_batch.fewshot.support_set import (
    Fitted,
    TrainConfig,
    cell_references_if_any,
    public_config,
    sample_shots,
    support_features,
    support_that_fits,
)
from semclip_batch.fewshot.trainset import TrainSet
from semclip_batch.io import storage, targets
from semclip_batch.io.manifest import read_manifest
from semclip_batch.methods.checkpoint import (
    META,
    TENSORS,
    CheckpointMeta,
    CheckpointThresholds,
    WeightsRef,
    save_checkpoint,
)
from semclip_batch.methods.features import Features
from semclip_batch.methods.fitting import (
    MIN_VALIDATION_FRAMES,
    Support,
    has_defect_pixel,
    validation_count,
    validation_frames,
)
from semclip_batch.methods.prompts import PromptSet, load_prompts, text_embeddings
from semclip_batch.methods.registry import depth_of, get_method, method_taps, new_model
from semclip_batch.methods.shipped import SHIPPED
from semclip_batch.methods.weights import RANDOM, LoadedBackbone, first_non_finite
from semclip_batch.model.grey_memory import GREY_MEMORY
from semclip_batch.model.reference import ReferenceScorer, reference_taps
from semclip_batch.model.region_classes import REGION_CLASSES

log = logging.getLogger(__name__)


def fit(cfg: TrainConfig, backbone: LoadedBackbone, text: torch.Tensor, data: TrainSet, feats: Features,
        ref_feats: Features | None = None, progress: LossProgress | None = None, adapted: bool = False,
        thresholds: bool = True) -> Fitted:
    """Fit ``cfg.model.method`` on precomputed support features (shared across configurations by the benchmark).
    ``adapted``: the backbone was adapted on these frames (:mod:`~semclip_batch.fewshot.adapt`), and SEM-CLIP's
    Transformation Layers stay at its own zero-shot layers (the head alone trains).
    With an augmenting recipe, ``data`` and the features are already :func:`~semclip_batch.fewshot.augment.augment`-ed.
    Cell references alone, where no normal support row has one, fit no reference scorer (nothing to scale it on).
    ``thresholds=False``: none fitted (``train``'s scale check settles the views they are fitted on first)."""
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
        pixels = whole_pixel_differences(cfg.model.backbone, data)
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
    fitted = Fitted(model, reference, summary, {})
    if thresholds:
        fitted.thresholds = whole_thresholds(cfg, fitted, data, feats, ref_feats, pixels)
    return fitted


def train(cfg: TrainConfig, progress: LossProgress | None = None,
          adapt_progress: LossProgress | None = None) -> CheckpointMeta:
    """Train, fit, write the checkpoint; returns its meta as stored. ``progress``: the fit's epochs;
    ``adapt_progress``: the backbone's adaptation steps, where it is adapted. Each support row is decoded once
    however often its views are loaded (:func:`~semclip_batch.fewshot.decoded.rows_kept`)."""
    with rows_kept(kept_budget(available_bytes())):
        return _train(cfg, progress, adapt_progress)


@dataclass
class StepClock:
    """The seconds each of ``train``'s steps took, in the order they ran (its record's ``seconds_by_step``)."""

    now: Callable[[], float] = time.perf_counter
    steps: dict[str, float] = field(default_factory=dict)
    last: float = field(init=False)

    def __post_init__(self) -> None:
        self.last = self.now()

    def lap(self, step: str) -> None:
        """The time since the last lap counted to ``step``."""
        now = self.now()
        self.steps[step] = round(self.steps.get(step, 0.0) + now - self.last, 1)
        self.last = now


def step_time_line(training: Mapping[str, Any]) -> list[str]:
    """``train``'s line on where its time went (none for a checkpoint written before the record had it)."""
    steps = training.get("seconds_by_step")
    if not steps:
        return []
    return ["time by step: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in steps.items())]


def _train(cfg: TrainConfig, progress: LossProgress | None, adapt_progress: LossProgress | None) -> CheckpointMeta:
    clock = StepClock()
    t0 = clock.last
    targets.check_target(cfg.out, "folder", "--out (the checkpoint folder)", cfg.model.storage_options)
    _refuse_writing_over_inputs(cfg)
    prompts = load_prompts(cfg.model.prompts, cfg.model.storage_options)
    df = sample_shots(read_manifest(cfg.support, storage_options=cfg.model.storage_options), cfg.shots, cfg.model.seed)
    if cfg.check_scale:  # fitted at whole, whatever policy a library caller's spec gives; the maps' policy checked after
        cfg = replace(cfg, model=replace(cfg.model, scale_policy=None, tile_overlap=None))
    cfg, prep, data = support_that_fits(cfg, df, prompts.classes)
    held = validation_frames(data.frame if data.frame is not None else torch.arange(len(data)), cfg.model.seed)
    if not has_defect_pixel(data, torch.arange(len(data))):
        log.warning("no support frame's mask holds a defect pixel (no mask_uri, or empty masks): nothing is fitted on "
                    "pixels; the pixel threshold and the weights a method chooses on its maps keep their defaults")
    cfg = cell_references_if_any(cfg, data)
    spec = applied(cfg.recipe, cfg.model)
    views, whole = len(data), data.first_views()
    absent = data.absent_classes()
    if absent:
        log.warning("no usable support frame of class %s (none in the manifest, or every one skipped above): the "
                    "fitted head has never seen it, and run scores it through its class text only", ", ".join(absent))
    used = int(whole.sum())  # support frames (a frame's tiles follow its whole view)
    if get_method(cfg.model.method).recipes and validation_count(used) == 0:
        log.warning("%d support frames: under %d none are held out, so nothing checks the fit (its epochs, the map's "
                    "weights and the class fusion are chosen on frames it learned from; README \"How many shots\": one "
                    "shot lost pixel AUROC to zero-shot on four of six lots)", used, MIN_VALIDATION_FRAMES)
    clock.lap("support set")
    chosen = backbone_for_fit(cfg.model, cfg.support, df, data, prompts, prep, cfg.adapt_steps, cfg.adapt_lr,
                              cfg.adapt_below, adapt_progress)
    clock.lap("adaptation" if chosen.adapted is not None else "backbone check" if chosen.check is not None
              else "backbone")
    if copies(cfg.recipe, cfg.model.method) > 1:
        data = augment(data)
    feats, ref_feats = support_features(cfg, spec, chosen.backbone, data, prep)
    fitted = fit(cfg, chosen.backbone, torch.from_numpy(text_embeddings(chosen.backbone, prompts)), data, feats,
                 ref_feats, progress, adapted=chosen.adapted is not None, thresholds=not cfg.check_scale)
    clock.lap("fit" if cfg.check_scale else "fit and thresholds")  # without the check, fit() fits them
    rows = {"config": public_config(cfg), "support_rows": len(df), "used": used, "views": views,
            "rows_augmented": len(data), "skipped": data.skipped,
            "with_reference": None if data.has_ref is None else int(data.has_ref[:views][whole].sum())}
    scale = held_out_check(cfg, df.iloc[held.tolist()], prompts.classes, chosen.backbone,
                           fitted) if cfg.check_scale else None
    keep_maps = spec.grey_memory or spec.region_classes  # the support maps at the policy, for the steps after it
    at_whole = None
    if cfg.check_scale and checked_policy(scale) is None:  # the maps stay at whole: thresholds on the fit's views
        if keep_maps:
            fitted.thresholds, at_whole = whole_maps(cfg, fitted, data, feats, ref_feats, prep)
        else:
            fitted.thresholds = whole_thresholds(cfg, fitted, data, feats, ref_feats)
    del data, feats, ref_feats  # the fit's rows, freed before the maps' views load
    at, at_prep, scored = maps_checked(cfg, prep, scale, df, prompts.classes, chosen.backbone, fitted, keep_maps)
    scored = at_whole if scored is None else scored
    if cfg.check_scale:
        clock.lap("maps' policy and thresholds")
    grey = regions = None
    native = native_support(at, df, scored) if spec.region_classes and not spec.grey_memory else None
    if spec.grey_memory:  # after the maps' policy is settled: its weight is chosen, its thresholds fitted, there
        grey, fitted.summary["grey_memory"], native = grey_memory_step(at, df, held.tolist(), prompts.classes,
                                                                       chosen.backbone, fitted, scored)
        clock.lap("grey-level memory")
    del scored
    if spec.region_classes and native is not None:  # on the support maps at the policy, the memory fused where kept
        regions, fitted.summary["region_classes"] = region_classes_step(at, df, held.tolist(), prompts.classes,
                                                                        chosen.backbone, fitted, native)
        clock.lap("region classes")
    del native  # the support frames' levels and maps, freed before the checkpoint is written
    state = dict(fitted.model.state_dict())
    if fitted.reference is not None:
        state.update({f"reference.{k}": v for k, v in fitted.reference.state_dict().items()})
    if grey is not None:
        state.update({f"{GREY_MEMORY}.{k}": v for k, v in grey.checkpoint_tensors().items()})
    if regions is not None:
        state.update({f"{REGION_CLASSES}.{k}": v for k, v in regions.state_dict().items()})
    record = {**rows, **fitted.summary, **({} if chosen.adapted is None else {"adapted_backbone": chosen.adapted.record}),
              **({} if chosen.check is None else {"adapt_check": chosen.check}),
              **({} if scale is None else {"scale_check": scale}),
              "seconds": round(clock.now() - t0, 1), "seconds_by_step": clock.steps}
    record["held_out_localisation"] = held_out_localisation(record)
    weak = weak_localisation_warning(record["held_out_localisation"])
    if weak:
        log.warning(weak)
    meta = _checkpoint_meta(cfg, replace(applied(cfg.recipe, at.model), grey_memory=grey is not None,
                                         region_classes=regions is not None), prompts, chosen, fitted, at_prep, record)
    _refuse_diverged_fit(state, meta, cfg)
    write_weights(cfg.out, chosen, cfg.model.storage_options)
    return save_checkpoint(cfg.out, state, meta, cfg.model.storage_options)


def _refuse_writing_over_inputs(cfg: TrainConfig) -> None:
    """The files ``train`` writes into ``--out`` must be none it reads: a ``--pretrained`` file named
    ``model.safetensors`` inside the folder was overwritten by the fit's tensors (exit 0, the checkpoint broken)."""
    read = {"--pretrained weights": cfg.model.pretrained if cfg.model.pretrained not in (SHIPPED, RANDOM) else None,
            "--prompts file": cfg.model.prompts, "support manifest": cfg.support}
    for name in (TENSORS, META, ADAPTED_BACKBONE):
        targets.refuse_overwriting_inputs(storage.join(cfg.out, name), read)


def _refuse_diverged_fit(state: Mapping[str, torch.Tensor], meta: CheckpointMeta, cfg: TrainConfig) -> None:
    """A fit whose loss went NaN left tensors and thresholds that are not finite: nothing is written (the checkpoint
    was, exit 0, and `run` refused it)."""
    bad = first_non_finite(state.items())
    if bad is None and not all(math.isfinite(t) for t in (meta.thresholds.image, meta.thresholds.pixel)):
        bad = "image or pixel threshold"
    if bad is not None:
        raise ConfigError(f"train: the fitted {bad} is not finite: the fit diverged (--lr {cfg.lr:g} too high?); "
                          "nothing was written")


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
        grey_memory=spec.grey_memory, region_classes=spec.region_classes,
    )
