"""The reference scorer fitted on the support set (``train --use-reference``, cell references): its scales on the
normal support rows, the fuser the method's map weights are chosen with, and ``--reference-weight auto``'s choice
on the frames the method's fit held out (README "Reference frames")."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.support_maps import emitted_views, pixel_counts
from semclip_batch.fewshot.trainset import TrainSet
from semclip_batch.methods.features import Features
from semclip_batch.methods.fitting import HeldOutMaps
from semclip_batch.methods.weights import preprocess_config
from semclip_batch.model.reference import ReferenceScorer, pixel_difference

PIXEL_SAMPLE = 4_000_000  # normal pixels drawn for the reference's pixel scale (a 99th percentile)
REFERENCE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # what --reference-weight auto chooses from
# held-out defect frames with a reference needed to choose it (a 70-frame support holds out 14, ~12 with a defect)
MIN_WEIGHT_FRAMES = 3
WITHIN_AUROC = 0.01  # the weight rule: best F1max among the weights this close to the best pixel AUROC


def support_pixel_differences(data: TrainSet, unit: float, chunk: int = 256) -> torch.Tensor | None:
    """:func:`~semclip_batch.model.reference.pixel_difference` of every support row and its reference, in the
    backbone's normalised grey units (``unit``: its std), as ``run`` computes it; None without references."""
    if data.refs is None:
        return None
    return torch.cat([pixel_difference(data.views[i:i + chunk], data.refs[i:i + chunk]) / unit
                      for i in range(0, len(data), chunk)])


def whole_pixel_differences(backbone: str, data: TrainSet) -> torch.Tensor | None:
    """:func:`support_pixel_differences` of support rows loaded at ``whole`` (the fit's views), in ``backbone``'s
    grey units."""
    return support_pixel_differences(data, preprocess_config(backbone, tile_above=10**9).std[0])


def fit_reference(reference: ReferenceScorer, feats: Features, ref_feats: Features, data: TrainSet,
                  pixels: torch.Tensor | None = None, among: torch.Tensor | None = None) -> float:
    """The reference scales: 99th percentiles of the normal support patches' token distances and of their
    pixels' differences (of the rows ``among`` only, where given)."""
    assert data.has_ref is not None
    normal = (data.labels == 0) & data.has_ref
    if among is not None:
        normal &= torch.isin(torch.arange(len(data)), among)
    rows = normal.nonzero().flatten()
    if rows.numel() == 0:
        raise ConfigError("--use-reference needs normal support rows with a readable reference_uri frame")
    dist = reference.distance(feats.subset(rows).dual, feats.taps, ref_feats.subset(rows).dual, ref_feats.taps)
    scale = float(torch.quantile(dist.flatten().float(), 0.99).clamp_min(1e-4))
    reference.scale.fill_(scale)
    if pixels is not None:
        sample = pixels[rows].flatten()
        if sample.numel() > PIXEL_SAMPLE:  # draws with replacement: no permutation of every pixel
            sample = sample[torch.randint(sample.numel(), (PIXEL_SAMPLE,), generator=torch.Generator().manual_seed(0))]
        reference.pixel_scale.fill_(float(torch.quantile(sample.float(), 0.99).clamp_min(1e-4)))
    return scale


def support_reference_fuser(reference: ReferenceScorer, feats: Features, ref_feats: Features, data: TrainSet,
                            pixels: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fuse(maps, rows)``: support rows' method maps fused with their references as ``run`` fuses them. The
    fit fuses the same rows' maps once per weight pair it tries (30 at the defaults): the references' own map
    does not depend on the method's and is kept for the last rows asked (while nothing it reads changes), so it
    is computed once, not per pair (at a fine scale policy the recomputation was a fifth of ``train``)."""
    assert data.has_ref is not None
    has_ref = data.has_ref
    distance = reference.distance(feats.dual, feats.taps, ref_feats.dual, ref_feats.taps)
    kept: list[tuple[torch.Tensor, tuple[Any, ...], torch.Tensor]] = []

    def fuse(maps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # everything reference_map reads besides the fixed distances and pixel differences
        inputs = (float(reference.scale), float(reference.pixel_scale), reference.sigma, reference.fusion,
                  maps.shape[-2], maps.shape[-1])
        if not kept or kept[0][1] != inputs or not torch.equal(kept[0][0], rows):
            ref = reference.reference_map(distance[rows], (maps.shape[-2], maps.shape[-1]),
                                          None if pixels is None else pixels[rows])
            kept[:] = [(rows.clone(), inputs, ref)]
        return reference.join(maps, kept[0][2], has_ref[rows])

    return fuse


@torch.no_grad()
def held_out_reference_weight(reference: ReferenceScorer, held: HeldOutMaps | None, feats: Features,
                              ref_feats: Features, data: TrainSet, pixels: torch.Tensor | None) -> dict[str, Any]:
    """``--reference-weight auto``: :func:`choose_reference_weight` on the views ``run`` writes of the support
    frames the method's fit held out (:meth:`~semclip_batch.methods.registry.Method.held_out_maps`), with a copy
    of the reference scorer whose scales are fitted on the other frames only. Keeps the given weight, saying
    why (the record's ``kept``), where the method held no frames out (a baseline, or SEM-CLIP under 10 support
    frames), with fewer than :data:`MIN_WEIGHT_FRAMES` held-out defect frames that have a reference, or where no
    normal frame the fit learned from has one."""
    if held is None:
        return _kept(reference, "the method holds no support frames out of its fit")
    keep = emitted_views(data, held.rows)
    rows, maps = held.rows[keep], held.maps[keep]
    assert data.has_ref is not None
    has_ref, masks, has_mask = data.has_ref[rows], data.masks[rows], data.has_mask[rows]
    usable = has_ref & has_mask & (masks >= 0.5).flatten(1).any(1)
    frames = data.frame[rows] if data.frame is not None else rows
    counted = {"frames": len(frames.unique()), "views": len(rows), "defect_frames_with_reference":
               len(frames[usable].unique())}
    if counted["defect_frames_with_reference"] < MIN_WEIGHT_FRAMES:
        return _kept(reference, f"fewer than {MIN_WEIGHT_FRAMES} held-out support frames with a defect and a "
                                "reference", counted)
    scorer = copy.deepcopy(reference)
    try:
        fit_reference(scorer, feats, ref_feats, data, pixels, among=held.fitted)
    except ConfigError:
        return _kept(reference, "no normal frame the fit learned from has a reference", counted)
    dist = scorer.distance(feats.subset(rows).dual, feats.taps, ref_feats.subset(rows).dual, ref_feats.taps)
    choice = choose_reference_weight(scorer, maps, dist, has_ref, None if pixels is None else pixels[rows],
                                     masks, has_mask)
    reference.weight = scorer.weight
    return {**choice, **counted}


def _kept(reference: ReferenceScorer, why: str, counted: dict[str, int] | None = None) -> dict[str, Any]:
    """The record of an ``auto`` weight that was not chosen: the given one, and why."""
    return {"weight": reference.weight, **(counted or {}), "kept": why}


@torch.no_grad()
def choose_reference_weight(reference: ReferenceScorer, maps: torch.Tensor, distance: torch.Tensor,
                            has_ref: torch.Tensor, pixels: torch.Tensor | None, masks: torch.Tensor,
                            has_mask: torch.Tensor) -> dict[str, Any]:
    """Set ``reference.weight`` to the one of :data:`REFERENCE_WEIGHTS` whose fused maps (the method's ``maps``
    with ``reference.fuse``) do best against ``masks``: the best F1max among the weights within
    :data:`WITHIN_AUROC` of the best pixel AUROC (the rule the default was chosen by on the validation
    families), ties to the one nearest the weight given (then the smaller). The references' own map does not
    depend on the weight: computed once, joined per weight. Returns the weight and every weight's figures."""
    given, scores = reference.weight, {}
    ref = reference.reference_map(distance, (maps.shape[-2], maps.shape[-1]), pixels)
    for w in REFERENCE_WEIGHTS:
        reference.weight = w
        counts = pixel_counts(reference.join(maps, ref, has_ref), masks, has_mask)
        scores[w] = (counts.auroc() or 0.0, counts.f1_max() or 0.0)
    best_auroc = max(a for a, _ in scores.values())
    near = [w for w, (a, _) in scores.items() if a >= best_auroc - WITHIN_AUROC]
    reference.weight = max(near, key=lambda w: (round(scores[w][1], 4), -abs(w - given)))
    return {"weight": reference.weight, "pAUROC": {str(w): round(a, 4) for w, (a, _) in scores.items()},
            "F1max": {str(w): round(f, 4) for w, (_, f) in scores.items()}}


def normal_with_reference(data: TrainSet) -> bool:
    """Whether a normal support row has a reference view: what the reference scales are fitted on."""
    return data.has_ref is not None and bool((data.has_ref & (data.labels == 0)).any())
