"""Where ``run`` scores a ``transfer`` fit's maps (``train``'s default with SEM-CLIP's ``transfer`` recipe and no
policy given or recommended; ``--scale-policy auto``): the fit at whole checked on the support frames it held out at
every candidate policy (:func:`held_out_check`), and the maps' scale-bound parts fitted again at the policy chosen
(:func:`maps_at_policy`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import pandas as pd
import torch

from semclip_batch.config import SCALE_CHECK_POLICIES, PreprocessConfig, parse_scale_policy, scale_policy_name
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.augment import augment
from semclip_batch.fewshot.recipes import applied, copies
from semclip_batch.fewshot.reference_fit import (
    fit_reference,
    normal_with_reference,
    support_pixel_differences,
    whole_pixel_differences,
)
from semclip_batch.fewshot.scale_check import FITTED, recommend
from semclip_batch.fewshot.support_maps import (
    SupportMaps,
    emitted_views,
    fit_thresholds,
    pixel_counts,
    support_output,
)
from semclip_batch.fewshot.support_set import Fitted, TrainConfig, support_features, support_that_fits
from semclip_batch.fewshot.trainset import TrainSet
from semclip_batch.methods.features import Features
from semclip_batch.methods.fitting import MIN_VALIDATION_FRAMES
from semclip_batch.methods.registry import get_method
from semclip_batch.methods.weights import LoadedBackbone
from semclip_batch.model import SemClipOutput

log = logging.getLogger(__name__)


WEAK_F1MAX = 0.05  # the held-out support frames' F1max under which train warns that the maps localise almost nothing


def held_out_localisation(training: Mapping[str, Any]) -> dict[str, Any] | None:
    """How well the checkpoint's maps found the defect pixels of the support frames the fit held out, as ``train``'s
    checks scored them (the method's memory left out: its bank holds those frames' clean patches): at the grey-level
    memory's chosen weight where it was weighed (weight 0: the maps alone), else at the policy the scale check
    chose. None where neither measured F1max (nothing held out, no defect pixel among them, or the maps' policy
    given and no grey-level memory weighed)."""
    grey, scale = training.get("grey_memory") or {}, training.get("scale_check") or {}
    if "figures" in grey:
        row, scored = grey["figures"].get(f"{grey['weight']:g}") or {}, f"grey-level memory weight {grey['weight']:g}"
    else:
        chosen = scale.get("chosen")
        row, scored = (scale.get("figures") or {}).get(chosen) or {}, f"scale policy {chosen}"
    if row.get("F1max") is None:
        return None
    frames = scale.get("frames") or grey.get("held_out")  # a policy given: no scale check, the memory's count
    return {"frames": frames, "pAUROC": row.get("pAUROC"), "F1max": row["F1max"], "scored_at": scored}


def weak_localisation_warning(localisation: Mapping[str, Any] | None) -> str | None:
    """``train``'s warning where the held-out support frames' F1max is under :data:`WEAK_F1MAX` (None otherwise)."""
    if localisation is None or localisation["F1max"] >= WEAK_F1MAX:
        return None
    auroc = localisation["pAUROC"]
    frames = "" if localisation["frames"] is None else f"{localisation['frames']} "
    return (f"the maps found almost none of the defect pixels of the {frames}support frames the fit "
            f"held out (F1max {localisation['F1max']:.3f}" + ("" if auroc is None else f", pixel AUROC {auroc:.3f}")
            + f"; under {WEAK_F1MAX:g}): on frames like these expect unreliable defect masks and areas, image scores "
            "and the classes read at the map's maximum; check run's output with eval on a labelled lot first")


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
        data, out, _ = support_maps_at(at, rows, classes, backbone, fitted)
    except ConfigError as exc:
        log.warning("scale check at %s left out: %s", scale_policy_name(policy), exc)
        return {"pAUROC": None, "F1max": None, "views": 0}
    written = emitted_views(data, torch.arange(len(data)))
    counts = pixel_counts(out.maps[written], data.masks[written], data.has_mask[written])
    return {"pAUROC": counts.auroc(), "F1max": counts.f1_max(), "views": len(data)}


def support_maps_at(cfg: TrainConfig, rows: pd.DataFrame, classes: tuple[str, ...], backbone: LoadedBackbone,
                    fitted: Fitted, with_memory: bool = True) -> tuple[TrainSet, SemClipOutput, PreprocessConfig]:
    """``rows`` loaded at ``cfg``'s policy (refused with ConfigError where they would not fit in memory there) and
    scored by the fitted model as ``run`` scores them (the reference fused where fitted; ``with_memory=False``: the
    method's normal-patch memory left out): the set, its views' maps and class scores, and the preprocessing."""
    at, prep, data = support_that_fits(cfg, rows, classes)
    feats, ref_feats = support_features(at, applied(at.recipe, at.model), backbone, data, prep)
    reference = fitted.reference if ref_feats is not None else None
    pixels = None if reference is None else support_pixel_differences(data, prep.std[0])
    memory = nullcontext() if with_memory else get_method(cfg.model.method).without_memory(fitted.model)
    with memory:
        out = support_output(fitted.model, feats, data, reference, ref_feats, pixels)
    return data, out, prep


def whole_thresholds(cfg: TrainConfig, fitted: Fitted, data: TrainSet, feats: Features, ref_feats: Features | None,
                     pixels: torch.Tensor | None = None) -> dict[str, float]:
    """The thresholds :func:`~semclip_batch.fewshot.train.fit` fits on its rows, in the fit or afterwards (``data``:
    the support set at whole, augmented as the fit's was, and its features; ``pixels``: its pixel differences from
    its cell references, where already taken)."""
    out, views = _whole_output(cfg, fitted, data, feats, ref_feats, pixels)
    return fit_thresholds(out, data, cfg.model.score_mode, views)


def whole_maps(cfg: TrainConfig, fitted: Fitted, data: TrainSet, feats: Features, ref_feats: Features | None,
               prep: PreprocessConfig) -> tuple[dict[str, float], SupportMaps]:
    """:func:`whole_thresholds` and the maps they were fitted on, the unaugmented copy's (``prep``: the set's): the
    support maps at whole as :func:`support_maps_at` would score them again, kept for the steps after the fit."""
    out, views = _whole_output(cfg, fitted, data, feats, ref_feats, None)
    return fit_thresholds(out, data, cfg.model.score_mode, views), SupportMaps.of(data, out, prep).head(views)


def _whole_output(cfg: TrainConfig, fitted: Fitted, data: TrainSet, feats: Features, ref_feats: Features | None,
                  pixels: torch.Tensor | None) -> tuple[SemClipOutput, int]:
    reference = fitted.reference if ref_feats is not None else None
    if reference is not None and pixels is None:
        pixels = whole_pixel_differences(cfg.model.backbone, data)
    return (support_output(fitted.model, feats, data, reference, ref_feats, pixels),
            len(data) // copies(cfg.recipe, cfg.model.method))


def checked_policy(scale: dict[str, Any] | None) -> float | None:
    """The policy :func:`held_out_check` chose (None: whole, or nothing checked)."""
    return None if scale is None or scale["chosen"] is None else parse_scale_policy(scale["chosen"])


def maps_checked(cfg: TrainConfig, prep: PreprocessConfig, scale: dict[str, Any] | None, df: pd.DataFrame,
                 classes: tuple[str, ...], backbone: LoadedBackbone, fitted: Fitted,
                 keep_maps: bool = False) -> tuple[TrainConfig, PreprocessConfig, SupportMaps | None]:
    """Where ``run`` will score the maps: the fit's policy, or with ``--scale-policy auto`` the one its check chose
    (:func:`maps_at_policy`; a step-down to a coarser one recorded as ``scale["maps_at"]``); with ``keep_maps``, the
    support maps the thresholds were fitted on there (None where the maps stayed at the fit's policy)."""
    policy = checked_policy(scale)
    if scale is None or policy is None:
        return cfg, prep, None
    moved = maps_at_policy(cfg, policy, df, classes, backbone, fitted, keep_maps)
    at, at_prep, kept = (cfg, prep, None) if moved is None else moved
    if scale_policy_name(at.model.scale_policy) != scale["chosen"]:
        scale["maps_at"] = scale_policy_name(at.model.scale_policy)  # stepped down: the views did not fit
    return at, at_prep, kept


def maps_at_policy(cfg: TrainConfig, policy: float, df: pd.DataFrame, classes: tuple[str, ...],
                   backbone: LoadedBackbone, fitted: Fitted,
                   keep_maps: bool = False) -> tuple[TrainConfig, PreprocessConfig, SupportMaps | None] | None:
    """``fitted`` (fitted at whole) made ready for ``run`` to score its maps at ``policy`` (``--scale-policy auto``'s
    choice): the support frames loaded again as ``run`` will score them there (their whole views and tiles; the next
    coarser policy where those would not fit in memory; None where that is whole, ``fitted`` untouched but for its
    thresholds where ``train`` left them to the maps' views (:func:`~semclip_batch.fewshot.train.fit`'s
    ``thresholds=False``): fitted on the views at whole), and
    fitted again on those views: the memory's bank (their clean patches), the reference scorer's two scales (cell
    references; the fit's where no normal view there has one) and the image and pixel thresholds. The head, the
    Transformation Layers, alpha, the map's weights and the memory's distance scale stay the fit's; what was fitted
    again is recorded under ``maps_at_policy`` beside the fit's own figures. Returns the config and preprocessing at
    the policy (the checkpoint's) and, with ``keep_maps``, the support maps the thresholds were fitted on."""
    at = replace(cfg, model=replace(cfg.model, scale_policy=policy, tile_overlap=None))
    at, prep, data = support_that_fits(at, df, classes, verb="maps at")
    if at.model.scale_policy is None:
        if not fitted.thresholds:  # train left them to the maps' views, at whole after all: the fit's own rows
            data = augment(data) if copies(cfg.recipe, cfg.model.method) > 1 else data  # augmented as the fit was
            feats, ref_feats = support_features(at, applied(at.recipe, at.model), backbone, data, prep)
            fitted.thresholds = whole_thresholds(cfg, fitted, data, feats, ref_feats)
        return None
    feats, ref_feats = support_features(at, applied(at.recipe, at.model), backbone, data, prep)
    model, reference, pixels = fitted.model, fitted.reference, None
    record: dict[str, Any] = {"policy": scale_policy_name(at.model.scale_policy), "views": len(data),
                              **({"thresholds_at_whole": fitted.thresholds} if fitted.thresholds else {})}
    if reference is not None and ref_feats is not None:
        pixels = support_pixel_differences(data, prep.std[0])
        record["reference_refit"] = normal_with_reference(data)
        if record["reference_refit"]:
            record["reference_scale"] = fit_reference(reference, feats, ref_feats, data, pixels)
            record["reference_pixel_scale"] = float(reference.pixel_scale)
    tokens = get_method(cfg.model.method).refill_memory(model, feats, data.masks, data.has_mask, cfg.model.seed)
    if tokens is not None:
        record["memory_tokens"] = tokens
    out = support_output(model, feats, data, reference, ref_feats, pixels)
    fitted.thresholds = fit_thresholds(out, data, cfg.model.score_mode, len(data))
    fitted.summary["maps_at_policy"] = record
    return at, prep, SupportMaps.of(data, out, prep) if keep_maps else None
