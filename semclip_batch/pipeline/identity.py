"""What identifies a run's model, resolved once in the driver before any actor starts: the full
:class:`~semclip_batch.config.ModelSpec` (a checkpoint's backbone, options, classes and thresholds, flags winning),
the weights' and the model's checksums, the class text embeddings; and the run id those and the manifest give
(:func:`compute_run_id`: the same inputs and output-affecting settings always name the same run).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from semclip_batch.config import (
    CheckpointRequest,
    ModelSpec,
    PreprocessConfig,
    RunConfig,
    Thresholds,
    parse_scale_policy,
    scale_policy_name,
)
from semclip_batch.errors import ConfigError, MissingWeightsError, WeightsError
from semclip_batch.io import storage
from semclip_batch.methods.checkpoint import IN_CHECKPOINT, CheckpointMeta, load_checkpoint, model_checksum
from semclip_batch.methods.decisions import CLASS_SCORES_WEIGHED, weighs_class_scores
from semclip_batch.methods.prompts import PromptSet, load_prompts, text_embeddings
from semclip_batch.methods.registry import get_method
from semclip_batch.methods.scoring import build_model, reads_references
from semclip_batch.methods.weights import LoadedBackbone, load_backbone, load_vision_only


@dataclass(frozen=True)
class ModelIdentity:
    model_id: str
    sha256: str
    weights_sha256: str
    text: np.ndarray
    prompts: PromptSet
    mode: str


def identify_model(cfg: RunConfig) -> tuple[RunConfig, ModelSpec, ModelIdentity]:
    """Load what identifies the model (weights checksum, class embeddings) once in the driver, and resolve the
    run's model into a full :class:`ModelSpec`.

    With a checkpoint, its backbone, options, classes and thresholds apply (thresholds given as flags win).
    """
    if isinstance(cfg.model, CheckpointRequest):
        return _identify_checkpoint(cfg, cfg.model)
    spec = cfg.model
    get_method(spec.method)  # an unknown method is refused here (one line), before any weights load or actor starts
    prompts = load_prompts(spec.prompts, cfg.storage_options)
    backbone = load_backbone(spec.backbone, spec.pretrained, seed=spec.seed, expected_sha256=spec.pretrained_sha256,
                             storage_options=cfg.storage_options)
    ident = ModelIdentity(model_id=f"zero-shot:{spec.backbone}:{backbone.sha256[:12]}", sha256=backbone.sha256,
                          weights_sha256=backbone.sha256, text=text_embeddings(backbone, prompts), prompts=prompts,
                          mode="zero-shot")
    return cfg, spec, ident


def _identify_checkpoint(cfg: RunConfig, req: CheckpointRequest) -> tuple[RunConfig, ModelSpec, ModelIdentity]:
    ckpt = load_checkpoint(req.url, cfg.storage_options)
    meta = ckpt.meta
    if req.backbone not in (None, meta.backbone):
        raise ConfigError(f"--backbone {req.backbone} differs from the checkpoint's {meta.backbone}; omit it")
    pretrained = req.pretrained or meta.weights.resolved(req.url)
    own = req.pretrained is None and meta.weights.source.startswith(IN_CHECKPOINT)
    try:
        backbone = _checkpoint_backbone(meta, pretrained, req.pretrained_sha256, cfg.storage_options)
    except MissingWeightsError:
        if own:
            raise WeightsError(f"the checkpoint's own backbone weights {storage.redact(pretrained)} are missing: copy "
                               "the whole checkpoint folder (its backbone file with it), or train again") from None
        if req.pretrained is None:
            raise WeightsError(f"the weights the checkpoint was trained on, {storage.redact(pretrained)}, are not there: "
                               "give them with --pretrained (checked against the checkpoint's checksum)") from None
        raise
    if backbone.sha256 != meta.weights.sha256:
        if own:
            raise WeightsError(f"the checkpoint's own backbone weights {storage.redact(pretrained)} have checksum "
                               f"{backbone.sha256[:12]}, not the {meta.weights.sha256[:12]} it was trained on: the file "
                               "is damaged or was replaced; copy the checkpoint folder again, or train again")
        raise WeightsError(f"--pretrained {pretrained} has checksum {backbone.sha256[:12]}, but the checkpoint was "
                           f"trained on {meta.weights.sha256[:12]} ({meta.weights.source})")
    if req.scale_policy is not None and parse_scale_policy(req.scale_policy) != meta.scale_policy:
        raise ConfigError(f"--scale-policy {req.scale_policy} differs from the checkpoint's "
                          f"{scale_policy_name(meta.scale_policy)}: a model scores with the policy it was trained "
                          "with; omit it, or train with it")
    spec = ModelSpec(backbone=meta.backbone, pretrained=pretrained,  # actors check the weights they load too
                     pretrained_sha256=req.pretrained_sha256 or meta.weights.sha256,
                     seed=meta.weights.seed, precision=req.precision, taps=meta.taps, use_vv=meta.use_vv,
                     surgery=meta.surgery, cls=meta.cls, method=meta.method, use_reference=meta.use_reference,
                     score_mode=meta.score_mode, sigma=meta.sigma, memory=meta.memory, region_head=meta.region_head,
                     scale_policy=meta.scale_policy, tile_overlap=meta.tile_overlap,
                     defect_view=meta.defect_view if req.defect_view is None else req.defect_view,
                     register_reference=meta.register_reference, self_reference=meta.self_reference,
                     reference_weight=meta.reference_weight, reference_fusion=meta.reference_fusion,
                     self_similarity=meta.self_similarity, grey_memory=meta.grey_memory,
                     region_classes=meta.region_classes,
                     reference_levels=meta.grey_memory and reads_references(ckpt.tensors),
                     map_shifts=req.map_shifts,
                     checkpoint=req.url,
                     storage_options=req.storage_options)
    get_method(spec.method)
    thresholds = _checkpoint_thresholds(cfg.thresholds, meta)
    prompts = PromptSet(classes=meta.classes, prompts=tuple(meta.prompts[c] for c in meta.classes))
    # refuse a misfit here, once, with the tensors already read and verified
    build_model(spec, ckpt.tensors["text_embeddings"].numpy(), backbone=backbone, tensors=ckpt.tensors)
    checksum = model_checksum(ckpt)
    ident = ModelIdentity(model_id=f"{ckpt.method}:{meta.backbone}:{checksum[:12]}", sha256=checksum,
                          weights_sha256=meta.weights.sha256, text=ckpt.tensors["text_embeddings"].numpy(),
                          prompts=prompts, mode="checkpoint")
    return replace(cfg, model=spec, thresholds=thresholds), spec, ident


def _checkpoint_backbone(meta: CheckpointMeta, pretrained: str, given_sha256: str | None,
                         storage_options: Mapping[str, Any] | None) -> LoadedBackbone:
    """The backbone a checkpoint run scores on. Its class embeddings are the checkpoint's, so only the vision tower is
    read: built alone (no open_clip import, ~3.7 s) where the weights hash to the checksum the checkpoint records;
    otherwise the whole model, whose checksum the caller compares to say what differs."""
    if given_sha256 is None or given_sha256.strip().lower() == meta.weights.sha256:
        alone = load_vision_only(meta.backbone, pretrained, meta.weights.sha256, storage_options)
        if alone is not None:
            return alone
    return load_backbone(meta.backbone, pretrained, seed=meta.weights.seed, expected_sha256=given_sha256,
                         storage_options=storage_options)


def _checkpoint_thresholds(given: Thresholds, meta: CheckpointMeta) -> Thresholds:
    """The checkpoint's calibrated thresholds, except those given as flags."""
    flag = {k for k, v in given.source.items() if v == "flag"}
    return Thresholds(image=given.image if "image" in flag else meta.thresholds.image,
                      pixel=given.pixel if "pixel" in flag else meta.thresholds.pixel,
                      min_region_px=given.min_region_px if "min_region_px" in flag else meta.thresholds.min_region_px,
                      source={k: "flag" if k in flag else "checkpoint" for k in ("image", "pixel", "min_region_px")})


def compute_run_id(manifest_digest: str, output_config: dict[str, Any], weights_sha256: str) -> str:
    """Short hash of (manifest content, output-affecting config, model checksum)."""
    blob = json.dumps({"manifest": manifest_digest, "config": output_config, "weights": weights_sha256},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def output_config(spec: ModelSpec, thresholds: Thresholds, prep: PreprocessConfig,
                  ident: ModelIdentity, model_stub: float | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"model": spec.output_affecting(), "classes": list(ident.prompts.classes),
                              "prompts": ident.prompts.as_record(), "preprocessing": prep.as_record(),
                              "thresholds": {k: v for k, v in thresholds.as_record().items() if k != "source"}}
    if weighs_class_scores(thresholds):  # rule 29: the written class scores weigh in the image decision
        config["class_scores"] = CLASS_SCORES_WEIGHED
    if model_stub is not None:  # a stand-in's rows are not predictions: never the run id of a real run
        config["model_stub"] = model_stub
    return config
